"""Triplet losses: explicit triplets and in-batch mining by masks."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax import similarity as sim
from contrastive_jax.losses import _collective as col
from contrastive_jax.losses import _common

__all__ = [
    "triplet_margin_loss",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "semi_hard_triplet_loss",
]

_STATIC = ("metric", "axis_name")


def _paired_distance(a, b, metric):
  if metric == "cosine":
    return 1.0 - jnp.sum(sim.safe_normalize(a) * sim.safe_normalize(b), -1)
  sq = jnp.sum(jnp.square(a - b), axis=-1)
  return sim.safe_sqrt(sq) if metric == "euclidean" else sq


@functools.partial(jax.jit, static_argnames=("metric",))
def triplet_margin_loss(anchors: jax.Array, positives: jax.Array,
                        negatives: jax.Array, *, margin: float = 1.0,
                        metric: str = "euclidean") -> jax.Array:
  """Triplet margin loss ``relu(d(a, p) - d(a, n) + margin)`` per anchor.

  This is the standard sign: the anchor should be closer to its positive than
  to its negative. (The design documents print ``d(a, n) - d(a, p)``, which
  would push positives away; that is a typo.)

  Examples:
    >>> a, p, n = jnp.zeros((2, 4)), jnp.zeros((2, 4)), jnp.ones((2, 4))
    >>> triplet_margin_loss(a, p, n, margin=1.0)
    Array([0., 0.], dtype=float32)

  Args:
    anchors: ``[N, D]``.
    positives: ``[N, D]``.
    negatives: ``[N, D]``, or ``[N, K, D]`` for K negatives per anchor, in
      which case the K triplet losses of an anchor are averaged.
    margin: the margin.
    metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``
      (1 - cosine similarity).

  Returns:
    ``[N]`` losses, float32 (float64 for float64 inputs).

  References:
    Schroff et al., FaceNet: A Unified Embedding for Face Recognition and
    Clustering, CVPR 2015.
  """
  _common.check_metric(metric)
  _common.check_scalars(margin=margin)
  sim.check_matrix("anchors", anchors)
  sim.check_matrix("positives", positives)
  sim.check_floating("negatives", negatives)
  if positives.shape != anchors.shape:
    raise ValueError(f"positives must have the shape of anchors {anchors.shape},"
                     f" got {positives.shape}.")
  if negatives.ndim not in (2, 3) or negatives.shape[0] != anchors.shape[0] \
      or negatives.shape[-1] != anchors.shape[-1]:
    raise ValueError(
        f"negatives must have shape [N, D] = {anchors.shape} or [N, K, D],"
        f" got {negatives.shape}.")
  if negatives.ndim == 3 and negatives.shape[1] == 0:
    raise ValueError(f"negatives [N, K, D] needs K >= 1, got {negatives.shape}.")
  dtype = sim.compute_dtype(anchors, positives, negatives)
  a, p, n = (x.astype(dtype) for x in (anchors, positives, negatives))
  d_ap = _paired_distance(a, p, metric)
  if n.ndim == 2:
    return jax.nn.relu(d_ap - _paired_distance(a, n, metric) + margin)
  d_an = _paired_distance(a[:, None, :], n, metric)
  return jnp.mean(jax.nn.relu(d_ap[:, None] - d_an + margin), axis=1)


def _mined_view(embeddings, labels, metric, axis_name, memory):
  _common.check_metric(metric)
  embeddings, labels = _common.prepare_embeddings(embeddings, labels)
  c = col.in_batch_candidates(embeddings, labels, axis_name=axis_name,
                              memory=memory)
  d = _common.distance_matrix(c.anchors, c.embeddings, metric, c.is_self())
  return d, c.positive_mask(), c.negative_mask()


@functools.partial(jax.jit, static_argnames=_STATIC)
def batch_all_triplet_loss(embeddings: jax.Array, labels: jax.Array, *,
                           margin: float = 1.0, metric: str = "euclidean",
                           axis_name: str | None = None,
                           memory=None) -> jax.Array:
  """Mean triplet loss over all valid in-batch triplets with a positive loss.

  Every (anchor, positive, negative) of the batch is used; the loss is averaged
  over the triplets whose loss is > 0 (0 when there is none), like
  pytorch-metric-learning's ``TripletMarginLoss`` with its default
  ``AvgNonZeroReducer`` and ``distance=LpDistance(normalize_embeddings=False)``
  (PML's default distance normalises the embeddings first: pass normalised
  embeddings for the same values). Memory is ``O(N^3)``: for large batches prefer
  :func:`batch_hard_triplet_loss` or :func:`semi_hard_triplet_loss`
  (``O(N^2)``).

  Examples:
    >>> x = jnp.array([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
    >>> batch_all_triplet_loss(x, jnp.array([0, 0, 1, 1]), margin=1.0)
    Array(0., dtype=float32)

  Args:
    embeddings: ``[N, D]`` float embeddings.
    labels: ``[N]`` integer labels; equal labels are positives.
    margin: the triplet margin.
    metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    axis_name: mapped axis along which to gather candidates from all devices;
      every device then returns the loss of the global batch.
    memory: optional :class:`CrossBatchMemory` whose entries are extra
      positives/negatives (no gradient).

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Hermans et al., In Defense of the Triplet Loss for Person
    Re-Identification, 2017.
  """
  _common.check_scalars(margin=margin)
  d, pos, neg = _mined_view(embeddings, labels, metric, axis_name, memory)
  losses = jax.nn.relu(d[:, :, None] - d[:, None, :] + margin)
  losses = jnp.where(pos[:, :, None] & neg[:, None, :], losses, 0.0)
  count = jnp.sum(losses > 0, dtype=losses.dtype)  # can pass 2**31
  return col.global_mean(jnp.sum(losses), count, axis_name)


@functools.partial(jax.jit, static_argnames=_STATIC)
def batch_hard_triplet_loss(embeddings: jax.Array, labels: jax.Array, *,
                            margin: float = 1.0, metric: str = "euclidean",
                            axis_name: str | None = None,
                            memory=None) -> jax.Array:
  """Triplet loss of each anchor's hardest positive and hardest negative.

  For each anchor with at least one positive and one negative:
  ``relu(max_p d(a, p) - min_n d(a, n) + margin)``; mean over those anchors.

  Shrinking every distance to 0 lowers the loss to ``margin`` whenever the
  hardest positive is farther than the hardest negative, which is the rule
  early in training; so an embedding that nothing else constrains can
  collapse to one point (the loss then sits at exactly ``margin``, with no
  gradient). On a CIFAR-10 run with a BatchNorm projection head it did,
  within 300 steps (experiments/RESULTS.md); apply it to features that
  another loss also shapes, or use :func:`semi_hard_triplet_loss`.

  Examples:
    >>> x = jnp.array([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
    >>> batch_hard_triplet_loss(x, jnp.array([0, 0, 1, 1]), margin=3.0)
    Array(1., dtype=float32)

  Args:
    embeddings: ``[N, D]`` float embeddings.
    labels: ``[N]`` integer labels; equal labels are positives.
    margin: the triplet margin.
    metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    axis_name: mapped axis along which to gather candidates from all devices.
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Hermans et al., In Defense of the Triplet Loss for Person
    Re-Identification, 2017.
    Schroff et al., FaceNet: A Unified Embedding for Face Recognition and
    Clustering, 2015 (section 3.2: hardest negatives and the collapse).
  """
  _common.check_scalars(margin=margin)
  d, pos, neg = _mined_view(embeddings, labels, metric, axis_name, memory)
  valid = jnp.any(pos, axis=1) & jnp.any(neg, axis=1)
  hardest_pos = _common.masked_max(d, pos)
  hardest_neg = _common.masked_min(d, neg)
  losses = jnp.where(valid,
                     jax.nn.relu(hardest_pos - hardest_neg + margin), 0.0)
  return col.global_mean(jnp.sum(losses), jnp.sum(valid), axis_name)


@functools.partial(jax.jit, static_argnames=_STATIC)
def semi_hard_triplet_loss(embeddings: jax.Array, labels: jax.Array, *,
                           margin: float = 1.0, metric: str = "euclidean",
                           axis_name: str | None = None,
                           memory=None) -> jax.Array:
  """Triplet loss with FaceNet's semi-hard negatives.

  For every positive pair (a, p) of an anchor that has negatives, the negative
  is the closest one farther from a than p, or the farthest negative if none
  is farther; the loss ``relu(d(a, p) - d(a, n) + margin)`` is averaged over
  those pairs (zeros included, as in TensorFlow Addons).

  Examples:
    >>> x = jnp.array([[0., 0.], [0., 1.], [3., 0.], [3., 1.]])
    >>> semi_hard_triplet_loss(x, jnp.array([0, 0, 1, 1]), margin=3.0)
    Array(1., dtype=float32)

  Args:
    embeddings: ``[N, D]`` float embeddings.
    labels: ``[N]`` integer labels; equal labels are positives.
    margin: the triplet margin.
    metric: ``"euclidean"``, ``"squared_euclidean"`` or ``"cosine"``.
    axis_name: mapped axis along which to gather candidates from all devices.
    memory: optional :class:`CrossBatchMemory` of extra candidates.

  Returns:
    Scalar loss, float32 (float64 for float64 inputs).

  References:
    Schroff et al., FaceNet: A Unified Embedding for Face Recognition and
    Clustering, CVPR 2015.
  """
  _common.check_scalars(margin=margin)
  d, pos, neg = _mined_view(embeddings, labels, metric, axis_name, memory)
  # Each row's negative distances in ascending order (the others last, as
  # +inf): the closest negative farther than d(a, p) is the first entry past
  # d(a, p), found by a binary search, so memory stays O(N^2) rather than
  # the O(N^3) of comparing every (p, n) pair.
  sorted_neg = jnp.sort(jnp.where(neg, d, jnp.inf), axis=1)
  first_farther = jax.vmap(
      functools.partial(jnp.searchsorted, side="right"))(sorted_neg, d)
  has_farther = first_farther < jnp.sum(neg, axis=1)[:, None]
  semi_hard = jnp.take_along_axis(
      sorted_neg, jnp.minimum(first_farther, d.shape[1] - 1), axis=1)
  farthest = _common.masked_max(d, neg)[:, None]
  chosen = jnp.where(has_farther, semi_hard, farthest)
  pairs = pos & jnp.any(neg, axis=1)[:, None]
  losses = jnp.where(pairs, jax.nn.relu(d - chosen + margin), 0.0)
  return col.global_mean(jnp.sum(losses), jnp.sum(pairs), axis_name)
