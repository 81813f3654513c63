"""Cross-batch memory (XBM / MoCo queue) as functional state.

The memory is a ring buffer of past embeddings and labels: a pytree that lives
in the training state and is checkpointed with it. Losses take it through
their ``memory=`` argument and use its valid entries as extra candidates,
without gradient. Enqueue *after* computing the loss, so that a batch is never
contrasted with its own stale copy (pytorch-metric-learning #24).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive_jax import similarity as sim
from contrastive_jax._checks import check_int
from contrastive_jax.losses import _collective
from contrastive_jax.losses import _common

__all__ = ["CrossBatchMemory", "create_memory", "enqueue_memory"]


class CrossBatchMemory(NamedTuple):
  """Ring buffer of past embeddings.

  Attributes:
    embeddings: ``[S, D]`` stored embeddings (zeros where empty).
    labels: ``[S]`` integer labels (``create_memory``'s ``label_dtype``).
    valid: ``[S]`` bool, True for filled slots.
    index: scalar int32, the next slot to write.
  """
  embeddings: jax.Array
  labels: jax.Array
  valid: jax.Array
  index: jax.Array


def create_memory(size: int, dim: int, *, dtype=jnp.float32,
                  label_dtype=None) -> CrossBatchMemory:
  """An empty memory of ``size`` slots for ``dim``-dimensional embeddings.

  Args:
    size: number of slots S.
    dim: feature size D.
    dtype: storage dtype of the embeddings.
    label_dtype: storage dtype of the labels; default JAX's default integer
      (int32, or int64 with ``jax_enable_x64``). ``enqueue_memory`` refuses
      labels that it cannot hold exactly.

  Returns:
    A :class:`CrossBatchMemory` with no valid entry.

  References:
    Wang et al., Cross-Batch Memory for Embedding Learning, CVPR 2020.
    He et al., Momentum Contrast for Unsupervised Visual Representation
    Learning, CVPR 2020.
  """
  check_int("size", size, 1)
  check_int("dim", dim, 1)
  labels = jnp.zeros((size,), int if label_dtype is None else label_dtype)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"label_dtype must be an integer dtype, got {labels.dtype}.")
  if not jnp.issubdtype(jnp.dtype(dtype), jnp.floating):
    raise TypeError(f"dtype must be a floating dtype, got {jnp.dtype(dtype)}.")
  return CrossBatchMemory(
      embeddings=jnp.zeros((size, dim), dtype),
      labels=labels,
      valid=jnp.zeros((size,), bool),
      index=jnp.zeros((), jnp.int32))


def enqueue_memory(memory: CrossBatchMemory, embeddings: jax.Array,
                   labels: jax.Array, *,
                   axis_name: str | None = None) -> CrossBatchMemory:
  """Writes a batch into the memory, overwriting the oldest entries.

  Args:
    memory: the current memory, ``S`` slots of size ``D``.
    embeddings: ``[B, D]`` embeddings (no gradient is kept).
    labels: ``[B]`` integer labels.
    axis_name: under ``shard_map``/``pmap`` (not ``vmap``), the global batch
      is gathered along this axis and enqueued on every device, so memories
      stay identical.

  Returns:
    The new memory. The newest ``min(B, S)`` entries of the batch are kept.
  """
  embeddings, labels = _common.prepare_embeddings(embeddings, labels)
  sim.check_same_features("memory.embeddings", memory.embeddings,
                          "embeddings", embeddings)
  # NumPy's int64 is what JAX would make int32 of anyway (without x64).
  label_dtype = jax.dtypes.canonicalize_dtype(labels.dtype)
  if not jnp.can_cast(label_dtype, memory.labels.dtype):
    raise TypeError(
        f"labels of dtype {label_dtype} do not fit the memory's"
        f" {memory.labels.dtype} labels exactly; create the memory with"
        f" create_memory(..., label_dtype={label_dtype}).")
  _collective.check_axis_name(axis_name)
  embeddings = _collective.all_gather(lax.stop_gradient(embeddings), axis_name,
                                      invariant=True)
  labels = _collective.all_gather(labels, axis_name, invariant=True)
  size = memory.embeddings.shape[0]
  if embeddings.shape[0] > size:
    embeddings, labels = embeddings[-size:], labels[-size:]
  n = embeddings.shape[0]
  slots = (memory.index + jnp.arange(n)) % size
  return CrossBatchMemory(
      embeddings=memory.embeddings.at[slots].set(
          embeddings.astype(memory.embeddings.dtype)),
      labels=memory.labels.at[slots].set(labels.astype(memory.labels.dtype)),
      valid=memory.valid.at[slots].set(True),
      index=((memory.index + n) % size).astype(jnp.int32))
