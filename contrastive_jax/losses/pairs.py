"""Pair-based losses: contrastive (margin), multi-similarity, circle."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax.losses import _collective as col
from contrastive_jax.losses import _common

__all__ = ["contrastive_loss", "multi_similarity_loss", "circle_loss"]


def _view(embeddings, labels, axis_name, memory):
  embeddings, labels = _common.prepare_embeddings(embeddings, labels)
  return col.in_batch_candidates(embeddings, labels, axis_name=axis_name,
                                 memory=memory)


@functools.partial(jax.jit, static_argnames=("metric", "axis_name"))
def contrastive_loss(embeddings: jax.Array, labels: jax.Array, *,
                     pos_margin: float = 0.0, neg_margin: float = 1.0,
                     metric: str = "euclidean", axis_name: str | None = None,
                     memory=None) -> jax.Array:
  """Margin contrastive loss over all in-batch pairs.

  Mean of the non-zero ``relu(d - pos_margin)`` over positive pairs plus mean
  of the non-zero ``relu(neg_margin - d)`` over negative pairs (each term 0
  when it has no non-zero pair), as pytorch-metric-learning's
  ``ContrastiveLoss`` with ``AvgNonZeroReducer`` and
  ``distance=LpDistance(normalize_embeddings=False)`` (PML's default distance
  normalises the embeddings first). Ordered pairs (i, j) and (j, i) both
  count.

  Examples:
    >>> x = jnp.array([[0., 0.], [0., 1.], [3., 0.]])
    >>> contrastive_loss(x, jnp.array([0, 0, 1]), neg_margin=1.0)
    Array(1., dtype=float32)

  Args:
    embeddings: ``[N, D]`` float embeddings.
    labels: ``[N]`` integer labels.
    pos_margin: positives closer than this cost nothing.
    neg_margin: negatives farther than this cost nothing.
    metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    axis_name: mapped axis along which to gather candidates from all devices.
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Hadsell et al., Dimensionality Reduction by Learning an Invariant Mapping,
    CVPR 2006.
  """
  _common.check_metric(metric)
  _common.check_scalars(pos_margin=pos_margin, neg_margin=neg_margin)
  c = _view(embeddings, labels, axis_name, memory)
  d = _common.distance_matrix(c.anchors, c.embeddings, metric, c.is_self())
  pos_losses = jnp.where(c.positive_mask(), jax.nn.relu(d - pos_margin), 0.0)
  neg_losses = jnp.where(c.negative_mask(), jax.nn.relu(neg_margin - d), 0.0)
  return (col.global_mean(jnp.sum(pos_losses), jnp.sum(pos_losses > 0),
                          axis_name)
          + col.global_mean(jnp.sum(neg_losses), jnp.sum(neg_losses > 0),
                            axis_name))


@_common.positive("alpha", "beta")
@functools.partial(jax.jit, static_argnames=("axis_name",))
def multi_similarity_loss(embeddings: jax.Array, labels: jax.Array, *,
                          alpha: float = 2.0, beta: float = 50.0,
                          base: float = 0.5, axis_name: str | None = None,
                          memory=None) -> jax.Array:
  """Multi-similarity loss on cosine similarities, mean over all anchors.

  Per anchor: ``(1/alpha) log(1 + sum_p exp(-alpha (s_ap - base)))
  + (1/beta) log(1 + sum_n exp(beta (s_an - base)))``; an empty set
  contributes 0. Matches pytorch-metric-learning's ``MultiSimilarityLoss``
  (without a miner).

  Examples:
    >>> x = jnp.array([[1., 0.], [1., 0.], [0., 1.]])
    >>> multi_similarity_loss(x, jnp.array([0, 0, 1]))  # doctest: +ELLIPSIS
    Array(0.1..., dtype=float32)

  Args:
    embeddings: ``[N, D]`` float embeddings.
    labels: ``[N]`` integer labels.
    alpha: positive-pair scale.
    beta: negative-pair scale.
    base: similarity offset (lambda in the paper).
    axis_name: mapped axis along which to gather candidates from all devices.
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Wang et al., Multi-Similarity Loss with General Pair Weighting for Deep
    Metric Learning, CVPR 2019.
  """
  _common.check_scalars(alpha=alpha, beta=beta, base=base)
  c = _view(embeddings, labels, axis_name, memory)
  s = _common.cosine_matrix(c.anchors, c.embeddings)
  pos_term = _common.softplus(
      _common.masked_logsumexp(-alpha * (s - base), c.positive_mask())) / alpha
  neg_term = _common.softplus(
      _common.masked_logsumexp(beta * (s - base), c.negative_mask())) / beta
  losses = pos_term + neg_term
  return col.global_mean(jnp.sum(losses), losses.shape[0], axis_name)


@_common.positive("gamma")
@functools.partial(jax.jit, static_argnames=("axis_name",))
def circle_loss(embeddings: jax.Array, labels: jax.Array, *, m: float = 0.4,
                gamma: float = 80.0, axis_name: str | None = None,
                memory=None) -> jax.Array:
  """Circle loss on cosine similarities (pytorch-metric-learning semantics).

  Per anchor with at least one positive and one negative, with weights
  ``alpha_p = relu(1 + m - s_p)`` and ``alpha_n = relu(s_n + m)`` (no gradient
  through the weights): ``softplus(logsumexp_p(-gamma alpha_p (s_p - (1 - m)))
  + logsumexp_n(gamma alpha_n (s_n - m)))``; mean of the non-zero values.

  Examples:
    >>> x = jnp.array([[1., 0.], [1., 0.], [0., 1.]])
    >>> circle_loss(x, jnp.array([0, 0, 1]))  # doctest: +ELLIPSIS
    Array(..., dtype=float32)

  Args:
    embeddings: ``[N, D]`` float embeddings.
    labels: ``[N]`` integer labels.
    m: relaxation margin.
    gamma: scale.
    axis_name: mapped axis along which to gather candidates from all devices.
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Sun et al., Circle Loss: A Unified Perspective of Pair Similarity
    Optimization, CVPR 2020.
  """
  _common.check_scalars(m=m, gamma=gamma)
  c = _view(embeddings, labels, axis_name, memory)
  s = _common.cosine_matrix(c.anchors, c.embeddings)
  pos, neg = c.positive_mask(), c.negative_mask()
  alpha_p = jax.lax.stop_gradient(jax.nn.relu(1.0 + m - s))
  alpha_n = jax.lax.stop_gradient(jax.nn.relu(s + m))
  logit_p = _common.masked_logsumexp(-gamma * alpha_p * (s - (1.0 - m)), pos)
  logit_n = _common.masked_logsumexp(gamma * alpha_n * (s - m), neg)
  valid = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  losses = jnp.where(
      valid,
      _common.softplus(jnp.where(valid, logit_p + logit_n, 0.0)), 0.0)
  return col.global_mean(jnp.sum(losses), jnp.sum(losses > 0), axis_name)
