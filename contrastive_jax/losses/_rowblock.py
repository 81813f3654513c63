"""Row-blocked NT-Xent when the candidates are the anchors themselves.

On one device with no memory, the dense path spends more time in its
elementwise passes over the [B, B] matrix (masks, exps, fresh buffers that
are page-faulted in) than in its two matrix products. Here ``lax.scan`` goes
over blocks of anchor rows against all B candidates, so each block holds
complete rows:

* forward: the negatives' log-sum-exp ``L``, the pair losses and
  ``W = sum_p sigmoid(L - s_ap)`` (the loss's derivative w.r.t. ``L``) all
  come from one pass, with no online log-sum-exp and no second scan;
* backward: ``s`` is symmetric, so ``M = ds + ds^T`` is built elementwise
  from the recomputed block with ``(L, W)`` broadcast along its rows and
  along its columns, and the gradient block is the untransposed
  ``M_block @ n`` (a transposed product runs about twice as slow on
  XLA:CPU).

That is three B x B x D products in all, and memory O(block * B) instead of
O(B^2). The values are those of ``softmax._symmetric_sum``: same masks, same
shift by the row maximum over negatives (a static shift by 1/T would
underflow below T ~ 0.023), and ``L = -inf`` where a row has no negative, so
that its pairs cost 0 and pass no gradient. The backward scan runs in the
bwd rule, not in the forward as in the prototype
(experiments/benchmarks/rowblock_nt_xent_prototype.py, LOSSES.md section 1),
so that a value without gradient costs one scan.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

# Below this batch the [B, B] matrix is small and the dense path is as fast;
# the scan needs B to be a multiple of the block (half the block is tried
# too). 256 rows beat 128 and 512 at batches 4096 and 8192 on XLA:CPU: a
# [256, B] float32 block is still cache-sized while its products stay
# efficient. Tests lower both constants to force this path on small batches.
_MIN_BATCH = 1024
_BLOCK_SIZE = 256


def block_size(batch: int) -> int | None:
  """Row block for ``batch`` anchors; None where the dense path is used."""
  if batch < _MIN_BATCH:
    return None
  for size in (_BLOCK_SIZE, _BLOCK_SIZE // 2):
    if size > 0 and batch % size == 0:
      return size
  return None


def positive_pair_count(labels):
  """Number of ordered (anchor, positive) pairs.

  By sorting: counting a [B, B] positive mask would cost a pass of its own.
  """
  ordered = jnp.sort(labels)
  per_label = (jnp.searchsorted(ordered, labels, side="right")
               - jnp.searchsorted(ordered, labels, side="left"))
  return jnp.sum(per_label - 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def nt_xent_sum(n, labels, inv_temp, block: int):
  """sum over positive pairs of softplus(lse_neg(s_a) - s_ap).

  ``s = n n^T * inv_temp`` for normalised ``n [B, D]``; ``B`` is a multiple
  of ``block``.
  """
  return _forward(n, labels, inv_temp, block)[0]


def _blocks(x, block):
  return x.reshape((x.shape[0] // block, block) + x.shape[1:])


def _block_masks(lab_b, idx_b, labels):
  same = lab_b[:, None] == labels[None, :]
  pos = same & (idx_b[:, None] != jnp.arange(labels.shape[0])[None, :])
  return same, pos


def _pair_terms(s, L):
  """``softplus(L - s)`` and ``sigmoid(L - s)`` from one exp.

  ``L = -inf`` (a row with no negative) gives 0 and 0.
  """
  z = L - s
  t = jnp.exp(-jnp.abs(z))
  softplus = jnp.maximum(z, 0.0) + jnp.log1p(t)
  return softplus, jnp.where(z >= 0, 1.0, t) / (1.0 + t)


def _forward(n, labels, inv_temp, block):
  a = n * inv_temp
  idx = jnp.arange(n.shape[0])

  def step(_, blk):
    a_b, lab_b, idx_b = blk
    s = a_b @ n.T
    same, pos = _block_masks(lab_b, idx_b, labels)
    m = jnp.max(jnp.where(same, -jnp.inf, s), axis=1)
    has_neg = jnp.isfinite(m)
    m = jnp.where(has_neg, m, 0.0)
    total = jnp.sum(jnp.where(same, 0.0, jnp.exp(s - m[:, None])), axis=1)
    L = jnp.where(has_neg, jnp.log(jnp.where(has_neg, total, 1.0)) + m,
                  -jnp.inf)
    softplus, sigmoid = _pair_terms(s, L[:, None])
    loss = jnp.sum(jnp.where(pos, softplus, 0.0), axis=1)
    weight = jnp.sum(jnp.where(pos, sigmoid, 0.0), axis=1)
    return None, (loss, L, weight)

  _, (loss, L, weight) = lax.scan(
      step, None, (_blocks(a, block), _blocks(labels, block),
                   _blocks(idx, block)))
  return jnp.sum(loss), (L.reshape(-1), weight.reshape(-1))


def _fwd(n, labels, inv_temp, block):
  total, (L, weight) = _forward(n, labels, inv_temp, block)
  return total, (n, labels, inv_temp, L, weight)


def _bwd(block, residuals, g):
  n, labels, inv_temp, L, weight = residuals
  a = n * inv_temp
  idx = jnp.arange(n.shape[0])

  def step(_, blk):
    a_b, lab_b, idx_b, L_b, w_b = blk
    s = a_b @ n.T
    same, pos = _block_masks(lab_b, idx_b, labels)
    # sym = ds + ds^T on these rows; entry (i, j) of ds^T is ds_ji, from row
    # j's statistics broadcast along the columns. q = e^{s - L} is a
    # negative's softmax weight, and sigmoid(L - s) = 1 / (1 + q) a
    # positive's derivative (q = inf, also where L = -inf for want of
    # negatives, gives 0).
    q_r = jnp.exp(s - L_b[:, None])
    q_c = jnp.exp(s - L[None, :])
    neg = w_b[:, None] * q_r + weight[None, :] * q_c
    sym = jnp.where(pos, -(1.0 / (1.0 + q_r) + 1.0 / (1.0 + q_c)),
                    jnp.where(same, 0.0, neg))
    return None, sym @ n

  _, p = lax.scan(step, None, (_blocks(a, block), _blocks(labels, block),
                               _blocks(idx, block), _blocks(L, block),
                               _blocks(weight, block)))
  p = p.reshape(n.shape)
  # s = inv_temp * n n^T: d total / d inv_temp = sum_ij ds_ij (n n^T)_ij,
  # which is half of sum_ij M_ij (n n^T)_ij = sum(n * p) (M and n n^T are
  # symmetric), so the temperature costs no extra pass over the matrix.
  dinv_temp = ((0.5 * g) * jnp.sum(n * p)).astype(jnp.result_type(inv_temp))
  return (g * inv_temp) * p, None, dinv_temp


nt_xent_sum.defvjp(_fwd, _bwd)
