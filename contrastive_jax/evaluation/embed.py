"""Batched, jitted, data-parallel feature extraction for a whole dataset."""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax._checks import check_int

__all__ = ["embed"]


def _num_rows(images) -> int:
  leaves = jax.tree.leaves(images)
  if not leaves:
    raise ValueError("images is empty (no arrays).")
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
  if None in sizes:
    raise ValueError("every array in images needs a leading batch axis.")
  if len(sizes) != 1:
    raise ValueError(
        f"arrays in images disagree on the number of examples: {sorted(sizes)}.")
  return sizes.pop()


def _batch(images, start, stop, padded_size):
  """Rows ``[start, stop)`` of every leaf, zero-padded to ``padded_size``."""

  def take(leaf):
    rows = np.asarray(leaf[start:stop])
    if rows.shape[0] < padded_size:
      pad = np.zeros((padded_size - rows.shape[0],) + rows.shape[1:],
                     rows.dtype)
      rows = np.concatenate([rows, pad], axis=0)
    return rows

  return jax.tree.map(take, images)


def embed(
    apply_fn: Callable[[Any, Any], Any],
    variables: Any,
    images: Any,
    *,
    batch_size: int = 256,
    mesh: Mesh | None = None,
    data_axis: str = "data",
) -> Any:
  """Forward-only extraction of features/embeddings for a whole dataset.

  ``apply_fn(variables, batch)`` runs jitted on batches of ``batch_size``
  examples, each batch sharded over the ``data_axis`` of ``mesh`` (all local
  devices when ``mesh`` is None) with ``variables`` replicated. The last batch
  is zero-padded to the full size (one compilation) and the padded rows are
  dropped. Batch ``i + 1`` is dispatched before the outputs of batch ``i`` are
  copied to the host, so transfers overlap compute. Nothing is
  differentiated and no state is updated: pass inference-mode functions
  (e.g. ``lambda v, x: model.apply(v, x, train=False)``).

  Args:
    apply_fn: ``(variables, batch) -> array [B, ...]`` or a pytree (e.g. a
      dict of features and embeddings) of such arrays.
    variables: model variables (any pytree), replicated on every device.
    images: ``[N, ...]`` array (NumPy or anything sliceable) or a pytree of
      arrays sharing ``N``.
    batch_size: examples per step; rounded up to a multiple of the number of
      devices on ``data_axis``.
    mesh: a ``jax.sharding.Mesh`` with axis ``data_axis``; None builds a 1-D
      mesh of ``jax.local_devices()``. A mesh over the devices of several
      processes (multi-host) works too: every process must call ``embed``
      with the same ``images``, and every process gets all the outputs.
    data_axis: name of the mesh axis the batch is split over.

  Returns:
    The outputs of ``apply_fn`` for all ``N`` examples, concatenated along the
    first axis, as NumPy arrays with the same pytree structure.

  Raises:
    ValueError: empty input, ``data_axis`` missing from ``mesh``, or outputs
      without a batch axis of size ``B``.
    TypeError: ``apply_fn`` not callable.
  """
  if not callable(apply_fn):
    raise TypeError(f"apply_fn must be callable, got {type(apply_fn)}.")
  batch_size = check_int("batch_size", batch_size)
  num = _num_rows(images)
  if num == 0:
    raise ValueError("images has no examples.")
  if mesh is None:
    mesh = Mesh(np.asarray(jax.local_devices()), (data_axis,))
  if data_axis not in mesh.axis_names:
    raise ValueError(
        f"mesh has axes {mesh.axis_names}, not the data axis {data_axis!r}.")
  num_shards = mesh.shape[data_axis]
  batch_size = -(-batch_size // num_shards) * num_shards
  batch_size = min(batch_size, -(-num // num_shards) * num_shards)

  data_sharding = NamedSharding(mesh, P(data_axis))
  replicated = NamedSharding(mesh, P())
  variables = jax.device_put(variables, replicated)
  # A mesh spanning several processes (multi-host): each process feeds the
  # rows of its own devices (``device_put`` of the host batch places only the
  # addressable slices); the outputs are all-gathered on device so that every
  # process can copy the whole batch of outputs to its host.
  spans_processes = any(d.process_index != jax.process_index()
                        for d in mesh.devices.flat)
  forward = jax.jit(apply_fn,
                    out_shardings=replicated if spans_processes else None)

  def check(out):
    for leaf in jax.tree.leaves(out):
      if leaf.ndim == 0 or leaf.shape[0] != batch_size:
        raise ValueError(
            f"apply_fn must return arrays with a leading batch axis of size"
            f" {batch_size}, got shape {leaf.shape}.")
    return out

  outputs = []
  pending = None
  for start in range(0, num, batch_size):
    stop = min(start + batch_size, num)
    batch = jax.device_put(_batch(images, start, stop, batch_size),
                           data_sharding)
    out = check(forward(variables, batch))
    if pending is not None:
      outputs.append(jax.tree.map(lambda a, n=pending[1]: np.asarray(a)[:n],
                                  pending[0]))
    pending = (out, stop - start)
  outputs.append(jax.tree.map(lambda a, n=pending[1]: np.asarray(a)[:n],
                              pending[0]))
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=0), *outputs)
