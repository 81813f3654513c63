"""Which ``shard_map`` mesh axes a value varies along, across JAX releases.

The custom-gradient layers (``conv.py``, ``norm.py``) must give a replicated
parameter a replicated gradient, as autodiff does, so they read the
varying-axes part of the value's type. JAX has renamed it between releases:
``aval.vma``; ``aval.mat.varying`` (0.9+); ``aval.manual_axis_type.varying``;
the last resort reads the printed type, ``float32[8,5]{V:data}``.
"""

from __future__ import annotations

import re

import jax


def varying_axes(x) -> frozenset:
  """The mesh axes along which ``x`` varies inside ``shard_map`` (empty elsewhere)."""
  aval = jax.typeof(x)
  if hasattr(aval, "vma"):
    return frozenset(aval.vma)
  for name in ("mat", "manual_axis_type"):
    part = getattr(aval, name, None)
    if part is not None and hasattr(part, "varying"):
      return frozenset(part.varying)
  found = re.search(r"\{V:([^}]*)\}", str(aval))
  return frozenset(a.strip() for a in found.group(1).split(",")) if found else frozenset()
