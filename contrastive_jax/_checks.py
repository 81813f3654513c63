"""Argument checks shared by every subpackage (private).

One place for the "an int >= n" rule, so every module refuses the same
values with the same words: ``bool`` is refused although it subclasses
``int`` (``batch_size=True`` is a mistake, not a 1), NumPy integers are
accepted (they come out of configs and ``np.arange``), floats are refused
even when integral (``2.0`` steps usually means a division went wrong
upstream). A wrong type is a ``TypeError``, a value below the minimum a
``ValueError``; both messages read the same. Likewise one "a bool" rule
(``check_bool``) for on/off options, a ``TypeError`` for anything else.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int = 1, *,
              hint: str = "") -> int:
  """Returns ``int(value)``, or raises naming ``name`` and the value.

  Args:
    name: the argument's name as the user spells it (``"batch_size"``,
      ``"checkpoint.keep"``).
    value: what the user passed.
    minimum: the smallest value accepted.
    hint: appended to "an int >= minimum", e.g. ``" (0: min(H, W) // 2)"``.

  Raises:
    TypeError: ``value`` is not an ``int``/NumPy integer, or is a ``bool``.
    ValueError: ``value < minimum``.
  """
  message = f"{name} must be an int >= {minimum}{hint}, got {value!r}."
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, np.integer)):
    raise TypeError(message)
  if value < minimum:
    raise ValueError(message)
  return int(value)


def check_bool(name: str, value: Any) -> bool:
  """Returns ``bool(value)`` for a ``bool``/NumPy bool, else a ``TypeError``.

  Truthiness is not enough: ``"False"`` and ``"no"`` are true, and ``0``/``1``
  usually mean a config key was spelt as a number by hand, so both are refused
  rather than guessed at.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f"{name} must be a bool, got {value!r}.")
  return bool(value)


def check_module_bools(module: Any, **call_args: Any) -> None:
  """``check_bool`` on every ``bool`` field of a (flax) dataclass ``module``,
  named ``Class.field``, and on the given call arguments (e.g. ``train``)."""
  for field in dataclasses.fields(module):
    if field.type in (bool, "bool"):
      check_bool(f"{type(module).__name__}.{field.name}",
                 getattr(module, field.name))
  for name, value in call_args.items():
    check_bool(name, value)
