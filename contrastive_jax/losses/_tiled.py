"""Blockwise losses that never hold the [n, C] similarity matrix.

Every loss here (the softmax losses, and SigLIP's sigmoid loss with no
log-sum-exp at all) has the form

    total = sum_a h(L_a) + sum_{a, j} phi(s_aj, L_a)

where ``s = a @ c.T`` (normalised embeddings, temperature folded into ``a``;
for the sigmoid loss ``a = [scale * q, bias]`` and ``c = [k, 1]``) and
``L_a`` is a masked log-sum-exp of row ``a``. The forward pass streams
over blocks of candidates twice: an online log-sum-exp for ``L``, then the
``phi`` sum together with ``W_a = h'(L_a) + sum_j dphi/dL_a``. Where ``phi``
is a per-row count times a per-row sum of ``s`` and does not involve ``L``
(SupCon, InfoNCE: ``_Spec.row_sums``), that sum rides along in the first
pass and the second is skipped. The backward pass recomputes each block and
applies

    dtotal/ds_aj = dphi/ds_aj + W_a * softmax_weight_aj,

so memory is O(n * block + C * D) in both directions (``jax.custom_vjp``
with ``lax.scan`` over blocks).

Across devices, the ring schedule never gathers the candidates: each device
keeps its own share and passes it to the next device with ``lax.ppermute``
after processing it, like Ring Attention (Liu et al., 2023) and Inf-CL
(Cheng et al., 2024). In the backward pass each share travels with its
accumulated gradient and arrives home after a full turn.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from contrastive_jax.losses import _collective as col
from contrastive_jax.losses import _common


class _Rows(NamedTuple):
  labels: jax.Array   # [n]
  index: jax.Array    # [n] global index of the anchor


class _Cols(NamedTuple):
  labels: jax.Array   # [C]
  valid: jax.Array    # [C]
  index: jax.Array    # [C] global index of the candidate (-1: padding)


class _Spec(NamedTuple):
  """Static description of one loss (its functions must be hashable)."""
  lse_mask: Callable  # (rows, cols) -> [n, b] bool
  phi: Callable       # (s, L, rows, cols, aux) -> scalar, sum over the block
  h: Callable         # (L, aux) -> scalar
  aux: Callable       # (rows, cols) -> [n] additive per-row count
  # Optional one-pass form of a phi that is independent of L and linear in
  # per-row sums of s: phi(s, L, rows, cols, aux) == phi_of_rows(
  # row_sums(s, rows, cols), aux), so the forward pass can accumulate the
  # row sums beside the log-sum-exp instead of streaming a second time.
  row_sums: Callable | None = None    # (s, rows, cols) -> [n]
  phi_of_rows: Callable | None = None  # ([n] sums, aux) -> scalar


def _pad_blocks(c, cols: _Cols, block_size: int):
  size = c.shape[0]
  nb = -(-size // block_size)
  pad = nb * block_size - size
  c = jnp.pad(c, ((0, pad), (0, 0)))
  cols = _Cols(jnp.pad(cols.labels, (0, pad), constant_values=-1),
               jnp.pad(cols.valid, (0, pad), constant_values=False),
               jnp.pad(cols.index, (0, pad), constant_values=-1))
  reshape = lambda x: x.reshape((nb, block_size) + x.shape[1:])
  return reshape(c), jax.tree.map(reshape, cols), size


def _softmax_weights(s, L, mask):
  finite = jnp.isfinite(L)[:, None]
  safe_l = jnp.where(finite, L[:, None], 0.0)
  return jnp.where(mask & finite, jnp.exp(jnp.where(mask, s, 0.0) - safe_l),
                   0.0)


def _ring_perm(axis_name):
  n = lax.axis_size(axis_name)
  return [(i, (i + 1) % n) for i in range(n)]


def _fold(body, init, c, cols: _Cols, block_size: int, ring_axis):
  """``carry = body(carry, c_b, cols_b)`` over every block of candidates.

  Without ``ring_axis`` the blocks are slices of ``c``. With it, ``c`` is this
  device's share: it is processed block by block, then passed to the next
  device (``ppermute``), until every share has visited every device.
  """
  def local(carry, c_dev, cols_dev):
    cb, colsb, _ = _pad_blocks(c_dev, cols_dev, block_size)
    carry, _ = lax.scan(lambda cr, blk: (body(cr, *blk), None), carry,
                        (cb, colsb))
    return carry

  if ring_axis is None:
    return local(init, c, cols)

  def ring_step(state, _):
    carry, c_dev, cols_dev = state
    carry = local(carry, c_dev, cols_dev)
    c_dev, cols_dev = lax.ppermute((c_dev, cols_dev), ring_axis,
                                   _ring_perm(ring_axis))
    return (carry, c_dev, cols_dev), None

  (carry, _, _), _ = lax.scan(ring_step, (init, c, cols), None,
                              length=lax.axis_size(ring_axis))
  return carry


def _forward(spec: _Spec, block_size: int, ring_axis, a, c, rows: _Rows,
             cols: _Cols):
  one_pass = spec.row_sums is not None

  def lse_step(carry, c_b, cols_b):
    m, l, aux, r = carry
    s = a @ c_b.T
    mask = spec.lse_mask(rows, cols_b)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, -jnp.inf), axis=1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    l = l * jnp.exp(jnp.where(jnp.isfinite(m), m, m_safe) - m_safe) + jnp.sum(
        jnp.where(mask, jnp.exp(jnp.where(mask, s, 0.0) - m_safe[:, None]),
                  0.0), axis=1)
    if one_pass:
      r = r + spec.row_sums(s, rows, cols_b)
    return m_new, l, aux + spec.aux(rows, cols_b), r

  # *_like(a) keeps a's device-varying type inside shard_map, which scan
  # requires of its carry.
  row = a[:, 0]
  init = (jnp.full_like(row, -jnp.inf), jnp.zeros_like(row),
          jnp.zeros_like(row, dtype=jnp.int32), jnp.zeros_like(row))
  m, l, aux, r = _fold(lse_step, init, c, cols, block_size, ring_axis)
  L = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
  if one_pass:  # phi does not involve L: dphi/dL = 0
    phi_total, dphi_dl = spec.phi_of_rows(r, aux), jnp.zeros_like(row)
  else:
    phi_and_grad = jax.value_and_grad(spec.phi, argnums=1)

    def phi_step(carry, c_b, cols_b):
      total, dl = carry
      value, grad_l = phi_and_grad(a @ c_b.T, L, rows, cols_b, aux)
      return total + value, dl + grad_l

    phi_total, dphi_dl = _fold(phi_step, (jnp.zeros_like(row[0]),
                                          jnp.zeros_like(row)),
                               c, cols, block_size, ring_axis)
  h_value, dh_dl = jax.value_and_grad(spec.h)(L, aux)
  total = h_value + phi_total
  w = jnp.where(jnp.isfinite(L), dh_dl + dphi_dl, 0.0)
  return total, aux, (L, w)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _tiled_sum(spec, block_size, ring_axis, a, c, rows, cols):
  total, aux, _ = _forward(spec, block_size, ring_axis, a, c, rows, cols)
  return total, aux


def _tiled_sum_fwd(spec, block_size, ring_axis, a, c, rows, cols):
  total, aux, (L, w) = _forward(spec, block_size, ring_axis, a, c, rows,
                                cols)
  return (total, aux), (a, c, rows, cols, aux, L, w)


def _tiled_sum_bwd(spec, block_size, ring_axis, residuals, cts):
  a, c, rows, cols, aux, L, w = residuals
  ct = cts[0]
  dphi_ds = jax.grad(spec.phi, argnums=0)

  def step(da, blk):
    c_b, cols_b = blk
    s = a @ c_b.T
    ds = dphi_ds(s, L, rows, cols_b, aux) + w[:, None] * _softmax_weights(
        s, L, spec.lse_mask(rows, cols_b))
    ds = ds * ct
    return da + ds @ c_b, ds.T @ a

  def local(da, c_dev, cols_dev):
    cb, colsb, size = _pad_blocks(c_dev, cols_dev, block_size)
    da, dcb = lax.scan(step, da, (cb, colsb))
    return da, dcb.reshape((-1, c_dev.shape[1]))[:size]

  if ring_axis is None:
    da, dc = local(jnp.zeros_like(a), c, cols)
  else:
    # Each share carries its gradient around the ring and arrives home with
    # the contributions of every device.
    def ring_step(state, _):
      da, c_dev, cols_dev, dc_dev = state
      da, dc_part = local(da, c_dev, cols_dev)
      c_dev, cols_dev, dc_dev = lax.ppermute(
          (c_dev, cols_dev, dc_dev + dc_part), ring_axis,
          _ring_perm(ring_axis))
      return (da, c_dev, cols_dev, dc_dev), None

    (da, _, _, dc), _ = lax.scan(
        ring_step, (jnp.zeros_like(a), c, cols, jnp.zeros_like(c)), None,
        length=lax.axis_size(ring_axis))
  zeros = lambda t: jax.tree.map(lambda x: None, t)
  return da, dc, zeros(rows), zeros(cols)


_tiled_sum.defvjp(_tiled_sum_fwd, _tiled_sum_bwd)


# ----------------------------------------------------------------------------
# The losses as (lse_mask, phi, h, aux).


def _is_self(rows, cols):
  return rows.index[:, None] == cols.index[None, :]


def _positive(rows, cols):
  return ((rows.labels[:, None] == cols.labels[None, :]) & ~_is_self(rows, cols)
          & cols.valid[None, :])


def _negative(rows, cols):
  return (rows.labels[:, None] != cols.labels[None, :]) & cols.valid[None, :]


def _count_positives(rows, cols):
  return jnp.sum(_positive(rows, cols), axis=1, dtype=jnp.int32)


def _nt_xent_phi(s, L, rows, cols, aux):
  del aux
  return jnp.sum(jnp.where(_positive(rows, cols),
                           _common.softplus(L[:, None] - s), 0.0))


def _zero_h(L, aux):
  del aux
  return jnp.zeros((), L.dtype)


_NT_XENT = _Spec(_negative, _nt_xent_phi, _zero_h, _count_positives)


def _not_self(rows, cols):
  return ~_is_self(rows, cols) & cols.valid[None, :]


def _supcon_rows(s, rows, cols):
  return jnp.sum(jnp.where(_positive(rows, cols), s, 0.0), axis=1)


def _supcon_of_rows(r, aux):
  return -jnp.sum(r / jnp.maximum(aux, 1).astype(r.dtype))


def _supcon_phi(s, L, rows, cols, aux):
  del L
  return _supcon_of_rows(_supcon_rows(s, rows, cols), aux)


def _supcon_h(L, aux):
  return jnp.sum(jnp.where(aux > 0, L, 0.0))


_SUPCON = _Spec(_not_self, _supcon_phi, _supcon_h, _count_positives,
                _supcon_rows, _supcon_of_rows)


def _valid(rows, cols):
  return jnp.broadcast_to(cols.valid[None, :],
                          (rows.index.shape[0], cols.valid.shape[0]))


def _info_nce_rows(s, rows, cols):
  return jnp.sum(jnp.where(_is_self(rows, cols), s, 0.0), axis=1)


def _info_nce_of_rows(r, aux):
  del aux
  return -jnp.sum(r)


def _info_nce_phi(s, L, rows, cols, aux):
  del L
  return _info_nce_of_rows(_info_nce_rows(s, rows, cols), aux)


def _info_nce_h(L, aux):
  del aux
  return jnp.sum(L)


def _no_aux(rows, cols):
  del cols
  return jnp.zeros(rows.index.shape, jnp.int32)


_INFO_NCE = _Spec(_valid, _info_nce_phi, _info_nce_h, _no_aux,
                  _info_nce_rows, _info_nce_of_rows)


def _no_softmax(rows, cols):
  # No log-sum-exp: L is -inf, so the softmax term of the gradient is zero
  # and XLA drops the first pass's product (a select on a constant mask).
  return jnp.zeros((rows.index.shape[0], cols.index.shape[0]), bool)


def _sigmoid_phi(s, L, rows, cols, aux):
  del L, aux
  z = jnp.where(_is_self(rows, cols), 1.0, -1.0).astype(s.dtype)
  return jnp.sum(jnp.where(cols.valid[None, :], _common.softplus(-z * s),
                           0.0))


_SIGMOID = _Spec(_no_softmax, _sigmoid_phi, _zero_h, _no_aux)


def _from_candidates(c: col.Candidates, inv_temp):
  # The temperature is folded into the anchors so that it may be traced
  # (learnable) without being an argument of the custom_vjp.
  a = _common.normalize(c.anchors) * inv_temp
  cand = _common.normalize(c.embeddings)
  rows = _Rows(c.anchor_labels, c.anchor_index.astype(jnp.int32))
  cols = _Cols(c.labels, c.valid, jnp.arange(cand.shape[0], dtype=jnp.int32))
  return a, cand, rows, cols


def _ring_inputs(embeddings, labels, inv_temp, axis_name):
  """Local anchors and the local share of candidates for the ring schedule."""
  a = _common.normalize(embeddings) * inv_temp
  index = col.anchor_indices(embeddings.shape[0], axis_name).astype(jnp.int32)
  rows = _Rows(labels, index)
  cols = _Cols(labels, jnp.ones_like(labels, dtype=bool), index)
  return a, _common.normalize(embeddings), rows, cols


# Per loss: its spec, and its denominator from the per-anchor positive counts
# (NT-Xent averages over positive pairs, SupCon over anchors with positives).
_IN_BATCH = {
    "nt_xent": (_NT_XENT, jnp.sum),
    "supcon": (_SUPCON, lambda n_pos: jnp.sum(n_pos > 0)),
}


def in_batch_sums(kind: str, c: col.Candidates, inv_temp, block_size: int):
  """(sum of losses, count) of local anchors against gathered candidates."""
  spec, count = _IN_BATCH[kind]
  total, n_pos = _tiled_sum(spec, block_size, None,
                            *_from_candidates(c, inv_temp))
  return total, count(n_pos)


def ring_sums(kind: str, embeddings, labels, inv_temp, block_size: int,
              axis_name: str):
  """:func:`in_batch_sums` with candidates passed around the device ring."""
  spec, count = _IN_BATCH[kind]
  total, n_pos = _tiled_sum(spec, block_size, axis_name,
                            *_ring_inputs(embeddings, labels, inv_temp,
                                          axis_name))
  return total, count(n_pos)


def info_nce_sum(queries, candidates, targets, inv_temp, block_size: int,
                 ring_axis=None):
  """Sum over queries of the cross-entropy to candidate ``targets[i]``.

  With ``ring_axis``, ``candidates`` are this device's keys only (global
  index ``targets``), passed around the ring.
  """
  a = _common.normalize(queries) * inv_temp
  cand = _common.normalize(candidates)
  total, _ = _tiled_sum(_INFO_NCE, block_size, ring_axis, a, cand,
                        *_query_key_index(targets, cand.shape[0], ring_axis))
  return total


def _query_key_index(targets, num_candidates: int, ring_axis):
  """Rows and columns of a query-key loss: query i's positive is column
  ``targets[i]``; ring shares carry their keys' global indices."""
  targets = targets.astype(jnp.int32)
  rows = _Rows(jnp.zeros_like(targets), targets)
  index = (targets if ring_axis is not None
           else jnp.arange(num_candidates, dtype=jnp.int32))
  cols = _Cols(jnp.zeros_like(index), jnp.ones_like(index, dtype=bool), index)
  return rows, cols


def sigmoid_sum(queries, keys, targets, scale, bias, block_size: int,
                ring_axis=None):
  """Sum over queries of SigLIP's pair terms against every key.

  The logit ``scale * cos + bias`` is one product of extended vectors,
  ``[scale * q, bias] . [k, 1]``, so a traced scale and bias get their
  gradients by autodiff outside the custom VJP. ``targets[i]`` is the global
  index of query i's own key; with ``ring_axis``, ``keys`` are this device's
  keys only (global index ``targets``), passed around the ring.
  """
  # The untiled loss's dtype: a float64 scale or bias promotes, as there.
  dtype = jnp.result_type(queries, scale, bias)
  q = _common.normalize(queries).astype(dtype)
  k = _common.normalize(keys).astype(dtype)
  bias = jnp.broadcast_to(jnp.asarray(bias, dtype), (q.shape[0], 1))
  a = jnp.concatenate([q * jnp.asarray(scale, dtype), bias], axis=1)
  c = jnp.concatenate([k, jnp.ones((k.shape[0], 1), dtype)], axis=1)
  total, _ = _tiled_sum(_SIGMOID, block_size, ring_axis, a, c,
                        *_query_key_index(targets, c.shape[0], ring_axis))
  return total
