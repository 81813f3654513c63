"""Sigmoid pairwise loss (SigLIP)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import _collective as col
from contrastive_jax.losses import _common
from contrastive_jax.losses import _tiled

__all__ = ["sigmoid_contrastive_loss"]


@_common.positive("scale")
@functools.partial(jax.jit, static_argnames=("axis_name", "block_size"))
def sigmoid_contrastive_loss(queries: jax.Array, keys: jax.Array, *,
                             scale: float = 10.0, bias: float = -10.0,
                             axis_name: str | None = None,
                             block_size: int | None = None) -> jax.Array:
  """SigLIP loss: an independent binary decision for every (query, key) pair.

  Logits ``scale * cos(q_i, k_j) + bias``; each query costs
  ``sum_j -log sigmoid(z_ij * logit_ij)`` with ``z = +1`` for its own key and
  ``-1`` for every other key; mean over queries. ``scale`` and ``bias`` may be
  traced (learnable: SigLIP learns ``log scale`` and ``bias``).

  Examples:
    >>> q = jax.random.normal(jax.random.key(0), (4, 8))
    >>> sigmoid_contrastive_loss(q, q).shape
    ()

  Args:
    queries: ``[N, D]``.
    keys: ``[N, D]``; key i is the positive of query i.
    scale: logit scale (``t`` in the paper).
    bias: logit bias (``b``).
    axis_name: mapped axis along which to gather keys from all devices
      (with ``block_size``, to pass them around instead).
    block_size: compute the ``[N, N]`` logits ``block_size`` keys at a time,
      in the forward and the backward pass (memory ``O(N * block_size)``);
      with ``axis_name`` the keys are not gathered but passed from device to
      device (``ppermute``), as big_vision's chunked sigmoid loss (under
      ``jax.shard_map`` or ``jax.pmap``: see :func:`nt_xent_loss`).

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Zhai et al., Sigmoid Loss for Language Image Pre-Training, ICCV 2023.
  """
  _common.check_block_size(block_size)
  _common.check_scalars(scale=scale, bias=bias)
  queries, keys = _common.prepare_pair(queries, keys)
  col.check_axis_name(axis_name)
  n = queries.shape[0]
  if block_size is not None:
    total = _tiled.sigmoid_sum(queries, keys, col.anchor_indices(n, axis_name),
                               scale, bias, block_size, ring_axis=axis_name)
    return col.global_mean(total, n, axis_name)
  all_keys = col.all_gather(keys, axis_name)
  logits = scale * _common.cosine_matrix(queries, all_keys) + bias
  own = (col.anchor_indices(n, axis_name)[:, None]
         == jnp.arange(all_keys.shape[0])[None, :])
  z = jnp.where(own, 1.0, -1.0).astype(logits.dtype)
  total = jnp.sum(_common.softplus(-z * logits))
  return col.global_mean(total, n, axis_name)
