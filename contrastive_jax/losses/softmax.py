"""Softmax (InfoNCE-family) losses: NT-Xent, supervised contrastive, InfoNCE."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from contrastive_jax import similarity as sim
from contrastive_jax._checks import check_bool
from contrastive_jax.losses import _collective as col
from contrastive_jax.losses import _common
from contrastive_jax.losses import _rowblock
from contrastive_jax.losses import _tiled

__all__ = ["nt_xent_loss", "supervised_contrastive_loss", "info_nce_loss"]

_STATIC = ("axis_name", "block_size")


def _in_batch(kind, embeddings, labels, temperature, axis_name, block_size,
              memory):
  """NT-Xent or SupCon by the ring, the tiles, or the dense matrix."""
  _common.check_block_size(block_size)
  _common.check_scalars(temperature=temperature)
  embeddings, labels = _common.prepare_embeddings(embeddings, labels)
  inv_temp = 1.0 / temperature
  if _use_ring(block_size, axis_name, memory):
    total, count = _tiled.ring_sums(kind, embeddings, labels, inv_temp,
                                    block_size, axis_name)
  else:
    c = col.in_batch_candidates(embeddings, labels, axis_name=axis_name,
                                memory=memory)
    if block_size is not None:
      total, count = _tiled.in_batch_sums(kind, c, inv_temp, block_size)
    else:
      total, count = _dense_sums(kind, c, inv_temp)
  return col.global_mean(total, count, axis_name)


def _dense_sums(kind, c: col.Candidates, inv_temp):
  if c.embeddings is c.anchors:  # one device, no memory
    # Large NT-Xent batches: complete row blocks need no [B, B] buffer and
    # fewer elementwise passes (SupCon has no such path yet).
    block = (_rowblock.block_size(c.anchors.shape[0])
             if kind == "nt_xent" else None)
    if block is not None:
      return (_rowblock.nt_xent_sum(_common.normalize(c.anchors), c.labels,
                                    inv_temp, block),
              _rowblock.positive_pair_count(c.labels))
    n_pos = jnp.sum(c.positive_mask(), axis=1)
    count = jnp.sum(n_pos) if kind == "nt_xent" else jnp.sum(n_pos > 0)
    return _symmetric_sum(kind, _common.normalize(c.anchors), c.labels,
                          inv_temp), count
  s = _common.cosine_matrix(c.anchors, c.embeddings) * inv_temp
  pos = c.positive_mask()
  if kind == "nt_xent":
    return _nt_xent_dense_sum(s, pos, c.negative_mask()), jnp.sum(pos)
  return (_supcon_dense_sum(s, pos, ~c.is_self() & c.valid[None, :]),
          jnp.sum(jnp.any(pos, axis=1)))


# The dense [n, C] parts of NT-Xent and SupCon with hand-written backward
# passes: autodiff of the masked log-sum-exp and softplus costs several more
# passes over the matrix (and transcendentals) than the closed forms, which
# need one exp per entry. The matrix products around them stay autodiff.


@jax.custom_vjp
def _nt_xent_dense_sum(s, pos, neg):
  """sum over positive pairs of softplus(lse_neg(s_a) - s_ap)."""
  return _nt_xent_dense_fwd(s, pos, neg)[0]


def _nt_xent_dense_fwd(s, pos, neg):
  lse = _common.masked_logsumexp(s, neg)
  total = jnp.sum(jnp.where(pos, _common.softplus(lse[:, None] - s), 0.0))
  return total, (s, pos, neg, lse)


def _nt_xent_dense_bwd(residuals, g):
  s, pos, neg, lse = residuals
  finite = jnp.isfinite(lse)[:, None]
  # q = e^{s - lse}: the softmax weight of a negative, and sigmoid(lse - s)
  # = 1 / (1 + q) for a positive (q = inf gives 0, not NaN).
  q = jnp.exp(jnp.where(finite & (pos | neg), s, 0.0)
              - jnp.where(finite, lse[:, None], 0.0))
  pos = pos & finite
  sig = jnp.where(pos, 1.0 / (1.0 + q), 0.0)
  weight = jnp.sum(sig, axis=1, keepdims=True)
  ds = jnp.where(neg & finite, weight * q, 0.0) - sig
  return g * ds, None, None


_nt_xent_dense_sum.defvjp(_nt_xent_dense_fwd, _nt_xent_dense_bwd)


@jax.custom_vjp
def _supcon_dense_sum(s, pos, others):
  """sum over anchors with positives of lse_others(s_a) - mean_p s_ap."""
  return _supcon_dense_fwd(s, pos, others)[0]


def _supcon_dense_fwd(s, pos, others):
  n_pos = jnp.sum(pos, axis=1)
  has_pos = n_pos > 0
  lse = _common.masked_logsumexp(s, others)
  mean_pos = jnp.sum(jnp.where(pos, s, 0.0), axis=1) / jnp.maximum(n_pos, 1)
  total = jnp.sum(jnp.where(has_pos, lse - mean_pos, 0.0))
  return total, (s, pos, others, lse, n_pos)


def _supcon_dense_bwd(residuals, g):
  s, pos, others, lse, n_pos = residuals
  has_pos = (n_pos > 0)[:, None]
  softmax = jnp.exp(jnp.where(has_pos & others, s, 0.0)
                    - jnp.where(has_pos, lse[:, None], 0.0))
  ds = (jnp.where(has_pos & others, softmax, 0.0)
        - jnp.where(pos, 1.0 / jnp.maximum(n_pos, 1)[:, None], 0.0))
  return g * ds.astype(s.dtype), None, None


_supcon_dense_sum.defvjp(_supcon_dense_fwd, _supcon_dense_bwd)


# When the candidates are the anchors themselves, s = n n^T / T is symmetric
# and so are the masks, so the gradient (ds + ds^T) n needs no transposed
# product: ds_ij depends only on s_ij and the statistics of row i, and
# ds^T_ij = ds_ji on s_ij and those of row j, so both are built elementwise
# from the same s. That saves a transposed [B, B] x [B, D] product (the
# slowest of the three on CPU).


def _symmetric_masks(labels):
  same = labels[:, None] == labels[None, :]
  others = ~jnp.eye(labels.shape[0], dtype=bool)
  return same & others, ~same, others


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _symmetric_sum(kind, n, labels, inv_temp):
  """NT-Xent or SupCon loss sum of normalised ``n [B, D]`` against itself."""
  return _symmetric_fwd(kind, n, labels, inv_temp)[0]


def _symmetric_fwd(kind, n, labels, inv_temp):
  s = (n @ n.T) * inv_temp
  pos, neg, others = _symmetric_masks(labels)
  if kind == "nt_xent":
    total, (_, _, _, lse) = _nt_xent_dense_fwd(s, pos, neg)
    stats = (lse, _nt_xent_weight(s, pos, lse[:, None]))
  else:
    total, (_, _, _, lse, n_pos) = _supcon_dense_fwd(s, pos, others)
    stats = (lse, n_pos)
  return total, (n, labels, inv_temp, s, stats)


def _symmetric_bwd(kind, residuals, g):
  n, labels, inv_temp, s, stats = residuals
  pos, neg, others = _symmetric_masks(labels)
  ds = _nt_xent_ds if kind == "nt_xent" else _supcon_ds
  second = neg if kind == "nt_xent" else others
  by_row = ds(s, pos, second, *(x[:, None] for x in stats))
  by_col = ds(s, pos, second, *(x[None, :] for x in stats))
  dn = (g * inv_temp) * ((by_row + by_col) @ n)
  # s = inv_temp * n n^T, so ds/dinv_temp = s / inv_temp.
  dinv_temp = (g * jnp.sum(by_row * s) / inv_temp).astype(
      jnp.result_type(inv_temp))  # a bf16 or weak f64 temperature keeps it
  return dn, None, dinv_temp


_symmetric_sum.defvjp(_symmetric_fwd, _symmetric_bwd)


def _nt_xent_q(s, pos, neg, lse):
  """``e^{s - lse}`` where the row has negatives (broadcast ``lse``)."""
  finite = jnp.isfinite(lse)
  return finite, jnp.exp(jnp.where(finite & (pos | neg), s, 0.0)
                         - jnp.where(finite, lse, 0.0))


def _nt_xent_weight(s, pos, lse):
  """sum_p sigmoid(lse - s_ap) per row: the loss's derivative w.r.t. lse."""
  finite, q = _nt_xent_q(s, pos, pos, lse)
  return jnp.sum(jnp.where(pos & finite, 1.0 / (1.0 + q), 0.0), axis=1)


def _nt_xent_ds(s, pos, neg, lse, weight):
  finite, q = _nt_xent_q(s, pos, neg, lse)
  return (jnp.where(neg & finite, weight * q, 0.0)
          - jnp.where(pos & finite, 1.0 / (1.0 + q), 0.0))


def _supcon_ds(s, pos, others, lse, n_pos):
  has_pos = n_pos > 0
  softmax = jnp.exp(jnp.where(has_pos & others, s, 0.0)
                    - jnp.where(has_pos, lse, 0.0))
  return (jnp.where(has_pos & others, softmax, 0.0)
          - jnp.where(pos, 1.0 / jnp.maximum(n_pos, 1), 0.0)).astype(s.dtype)


def _use_ring(block_size, axis_name, extra) -> bool:
  """Tiled and across devices: pass candidate shares around the ring.

  With a memory or extra negatives (identical on every device) the batch is
  gathered instead, and the tiles run over the gathered candidates.
  """
  if block_size is None or axis_name is None or extra is not None:
    return False
  col.check_axis_name(axis_name)
  return True


@_common.positive("temperature")
@functools.partial(jax.jit, static_argnames=_STATIC)
def nt_xent_loss(embeddings: jax.Array, labels: jax.Array, *,
                 temperature: float = 0.1, axis_name: str | None = None,
                 block_size: int | None = None, memory=None) -> jax.Array:
  """NT-Xent: softmax of each positive against the anchor's negatives.

  With cosine similarities ``s`` divided by ``temperature``, every positive
  pair (a, p) costs ``-log(e^{s_ap} / (e^{s_ap} + sum_{n neg of a} e^{s_an}))``
  (other positives are not in the denominator); the loss is the mean over
  positive pairs. SimCLR is the case ``labels = [0..B-1, 0..B-1]``; this is
  pytorch-metric-learning's ``NTXentLoss`` and optax's ``ntxent``.

  Examples:
    >>> key = jax.random.key(0)
    >>> views = jax.random.normal(key, (8, 16))
    >>> labels = jnp.concatenate([jnp.arange(4), jnp.arange(4)])
    >>> nt_xent_loss(views, labels, temperature=0.5).shape
    ()

  Args:
    embeddings: ``[N, D]`` float embeddings (normalised internally).
    labels: ``[N]`` integer labels; equal labels are positives.
    temperature: softmax temperature, > 0 (a host number <= 0 raises).
    axis_name: mapped axis along which to gather candidates from all devices;
      every device then returns the loss of the global batch.
    block_size: if set, similarities are computed ``block_size`` candidates at
      a time with a streaming log-sum-exp, and recomputed in the backward
      pass: memory ``O(N * block_size)`` instead of ``O(N^2)``. With
      ``axis_name`` too (and no ``memory``), candidates are not gathered:
      each device's share is passed around a ring (``lax.ppermute``), so no
      device ever holds all of them; the ring's gradient needs the axis bound
      by ``jax.shard_map`` or ``jax.pmap`` (a ``jax.vmap`` axis does not
      reach a custom gradient's backward pass). Without it, on one device and with no
      ``memory``, a batch of 1024 or more that is a multiple of 128 is
      already processed a block of anchor rows at a time (memory
      ``O(N * 256)``), in fewer passes than the tiles.
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs); 0 when the batch has no
    positive pair.

  References:
    Chen et al., A Simple Framework for Contrastive Learning of Visual
    Representations, ICML 2020.
  """
  return _in_batch("nt_xent", embeddings, labels, temperature, axis_name,
                   block_size, memory)


@_common.positive("temperature")
@functools.partial(jax.jit, static_argnames=_STATIC)
def supervised_contrastive_loss(embeddings: jax.Array, labels: jax.Array, *,
                                temperature: float = 0.1,
                                axis_name: str | None = None,
                                block_size: int | None = None,
                                memory=None) -> jax.Array:
  """Supervised contrastive loss (SupCon's L_out).

  Per anchor a with at least one positive:
  ``-mean_{p} log(e^{s_ap} / sum_{k != a} e^{s_ak})`` with cosine similarities
  divided by ``temperature``; mean over those anchors. Matches
  pytorch-metric-learning's ``SupConLoss``, except on a batch with no
  negative pair at all (one class): PML returns 0 there, while this follows
  the paper's formula, whose denominator then holds positives only.

  Examples:
    >>> x = jax.random.normal(jax.random.key(0), (6, 8))
    >>> supervised_contrastive_loss(x, jnp.array([0, 0, 1, 1, 2, 2])).shape
    ()

  Args:
    embeddings: ``[N, D]`` float embeddings (normalised internally).
    labels: ``[N]`` integer labels; equal labels are positives.
    temperature: softmax temperature, > 0 (a host number <= 0 raises).
    axis_name: mapped axis along which to gather candidates from all devices.
    block_size: tile size for the memory-efficient path (see
      :func:`nt_xent_loss`).
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs); 0 when no anchor has a
    positive.

  References:
    Khosla et al., Supervised Contrastive Learning, NeurIPS 2020.
  """
  return _in_batch("supcon", embeddings, labels, temperature, axis_name,
                   block_size, memory)


@_common.positive("temperature")
@functools.partial(jax.jit, static_argnames=("symmetric",) + _STATIC)
def info_nce_loss(queries: jax.Array, keys: jax.Array, *,
                  temperature: float = 0.1,
                  negatives: jax.Array | None = None, symmetric: bool = False,
                  axis_name: str | None = None,
                  block_size: int | None = None) -> jax.Array:
  """InfoNCE: cross-entropy of each query over all keys, key i being positive.

  Logits are cosine similarities divided by ``temperature`` of query i against
  every key of the (global) batch and the optional extra ``negatives``;
  the loss is ``softmax_cross_entropy`` to index i, averaged over queries.
  ``symmetric=True`` averages with the keys-to-queries direction (CLIP), which
  uses the batch only.

  Examples:
    >>> q = jax.random.normal(jax.random.key(0), (4, 8))
    >>> info_nce_loss(q, q + 0.01, temperature=0.1).shape
    ()

  Args:
    queries: ``[N, D]``.
    keys: ``[N, D]``; key i is the positive of query i.
    temperature: softmax temperature, > 0 (a host number <= 0 raises).
    negatives: optional ``[M, D]`` extra negatives for every query (a MoCo
      queue or memory bank); no gradient is stopped here, so pass
      ``jax.lax.stop_gradient(queue)`` for a queue.
    symmetric: also compute keys -> queries and average both directions.
    axis_name: mapped axis along which to gather keys (and queries, when
      symmetric) from all devices. ``negatives`` are used as given.
    block_size: tile size for the memory-efficient path (see
      :func:`nt_xent_loss`).

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    van den Oord et al., Representation Learning with Contrastive Predictive
    Coding, 2018. Radford et al., Learning Transferable Visual Models From
    Natural Language Supervision, ICML 2021.
  """
  _common.check_block_size(block_size)
  _common.check_scalars(temperature=temperature)
  check_bool("symmetric", symmetric)
  queries, keys = _common.prepare_pair(queries, keys)
  if negatives is not None:
    sim.check_matrix("negatives", negatives)
    sim.check_same_features("queries", queries, "negatives", negatives)
    negatives = negatives.astype(queries.dtype)
  col.check_axis_name(axis_name)
  loss = _info_nce_direction(queries, keys, negatives, 1.0 / temperature,
                             axis_name, block_size)
  if symmetric:
    loss = 0.5 * (loss + _info_nce_direction(
        keys, queries, None, 1.0 / temperature, axis_name, block_size))
  return loss


def _info_nce_direction(queries, keys, negatives, inv_temp, axis_name,
                        block_size):
  n = queries.shape[0]
  targets = col.anchor_indices(n, axis_name)
  if _use_ring(block_size, axis_name, negatives):
    total = _tiled.info_nce_sum(queries, keys, targets, inv_temp, block_size,
                                ring_axis=axis_name)
    return col.global_mean(total, n, axis_name)
  candidates = col.all_gather(keys, axis_name)
  if negatives is not None:
    candidates = jnp.concatenate([candidates, negatives], axis=0)
  if block_size is not None:
    total = _tiled.info_nce_sum(queries, candidates, targets, inv_temp,
                                block_size)
  else:
    logits = _common.cosine_matrix(queries, candidates) * inv_temp
    total = jnp.sum(optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, targets))
  return col.global_mean(total, n, axis_name)
