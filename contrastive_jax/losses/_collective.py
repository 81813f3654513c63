"""Candidates for in-batch losses: the local batch, all devices, a memory.

Each device keeps its own anchors and contrasts them against the candidates of
every device along ``axis_name`` (``all_gather``, whose transpose is a
reduce-scatter, so gradients reach the device that owns each embedding). Sums
and counts are ``psum``-ed so that every device returns the loss of the whole
global batch: under ``shard_map`` that value is replicated (``out_specs=P()``)
and its gradient is exact; under ``pmap`` the usual ``pmean`` of gradients is
exact as well.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


def check_axis_name(axis_name) -> None:
  """Raises a clear error when ``axis_name`` is not bound by a mapping."""
  if axis_name is None:
    return
  try:
    lax.axis_size(axis_name)
  except NameError as e:
    raise ValueError(
        f"axis_name={axis_name!r} is not bound: call the loss inside"
        " jax.shard_map, jax.pmap or jax.vmap over that axis (shard_map or"
        " pmap for block_size's ring and enqueue_memory), or pass"
        " axis_name=None.") from e


def axis_size(axis_name) -> int:
  return 1 if axis_name is None else lax.axis_size(axis_name)


def all_gather(x, axis_name, *, invariant: bool = False):
  """Concatenates ``x [n, ...]`` of every device into ``[n * devices, ...]``.

  ``invariant=True`` marks the result as identical on every device (needed by
  ``shard_map`` to return it with a replicated ``out_specs=P()``); the
  default keeps it device-varying, which is what a loss differentiates.
  """
  if axis_name is None:
    return x
  return lax.all_gather(x, axis_name, tiled=True,
                        to="invarying" if invariant else "varying")


def anchor_indices(n: int, axis_name):
  """Global index of each local anchor within the gathered batch."""
  offset = 0 if axis_name is None else lax.axis_index(axis_name) * n
  return offset + jnp.arange(n)


def global_sum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def global_mean(total, count, axis_name):
  """``sum(total) / sum(count)`` over devices; 0 where the count is 0."""
  # Counted in the loss dtype: an int32 psum of triplet counts can wrap.
  count = jnp.asarray(count).astype(jnp.asarray(total).dtype)
  total = global_sum(total, axis_name)
  count = global_sum(count, axis_name)
  return total / jnp.maximum(count, 1.0)


class Candidates(NamedTuple):
  """Local anchors against every candidate.

  Attributes:
    anchors: ``[n, D]`` this device's embeddings.
    anchor_labels: ``[n]``.
    embeddings: ``[C, D]`` global batch, then memory entries.
    labels: ``[C]``.
    valid: ``[C]`` bool, False for empty memory slots.
    anchor_index: ``[n]`` position of each anchor among the candidates.
  """
  anchors: jax.Array
  anchor_labels: jax.Array
  embeddings: jax.Array
  labels: jax.Array
  valid: jax.Array
  anchor_index: jax.Array

  def is_self(self):
    """``[n, C]`` bool, True where a candidate is the anchor itself."""
    return self.anchor_index[:, None] == jnp.arange(self.labels.shape[0])

  def positive_mask(self):
    same = self.anchor_labels[:, None] == self.labels[None, :]
    return same & ~self.is_self() & self.valid[None, :]

  def negative_mask(self):
    differ = self.anchor_labels[:, None] != self.labels[None, :]
    return differ & self.valid[None, :]


def in_batch_candidates(embeddings, labels, *, axis_name=None,
                        memory=None) -> Candidates:
  """Builds the anchor/candidate view of a batch (validated beforehand)."""
  check_axis_name(axis_name)
  n = embeddings.shape[0]
  cand = all_gather(embeddings, axis_name)
  cand_labels = all_gather(labels, axis_name)
  valid = jnp.ones(cand.shape[0], dtype=bool)
  if memory is not None:
    mem_emb, mem_labels, mem_valid = memory_candidates(memory, embeddings)
    cand = jnp.concatenate([cand, mem_emb.astype(cand.dtype)], axis=0)
    # Compared in a dtype that holds both: narrowing either side (int32
    # memory labels into int8 batch labels) would wrap and mismatch classes.
    common = jnp.promote_types(labels.dtype, mem_labels.dtype)
    labels = labels.astype(common)
    cand_labels = jnp.concatenate(
        [cand_labels.astype(common), mem_labels.astype(common)], axis=0)
    valid = jnp.concatenate([valid, mem_valid], axis=0)
  return Candidates(embeddings, labels, cand, cand_labels, valid,
                    anchor_indices(n, axis_name))


def memory_candidates(memory, embeddings):
  """Memory entries as extra candidates, with no gradient into the memory."""
  if memory.embeddings.shape[-1] != embeddings.shape[-1]:
    raise ValueError(
        "memory holds embeddings of feature size"
        f" {memory.embeddings.shape[-1]} (shape {memory.embeddings.shape}),"
        f" but the batch has shape {embeddings.shape}.")
  return (lax.stop_gradient(memory.embeddings), memory.labels,
          memory.valid)
