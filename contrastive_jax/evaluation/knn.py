"""Weighted k-nearest-neighbour classification of frozen embeddings.

The protocol of Wu et al. (InstDisc) as used by solo-learn and most
self-supervised papers: cosine similarity between L2-normalised query and
reference embeddings, the ``k`` most similar references vote for their class
with weight ``exp(s / temperature)`` (``temperature = 0.07``), and the class
with the largest summed weight is the prediction. ``k = 20`` and ``k = 200``
are the customary settings.

Queries are processed in chunks of ``chunk_size``: each chunk computes a
``[chunk_size, M]`` block of similarities with
:func:`contrastive_jax.similarity.pairwise_cosine_similarity` and keeps only
its ``jax.lax.top_k``, so 10,000 queries against 50,000 references never hold
the full ``[10000, 50000]`` matrix. Every chunk has the same (padded) shape, so
the kernel compiles once.

Ties: equal similarities are ranked by reference index (lower first, as
``jax.lax.top_k`` does); equal class scores go to the lower class id.
"""

from __future__ import annotations

import functools
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import similarity
from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int
from contrastive_jax.evaluation.metrics import check_class_range
from contrastive_jax.evaluation.metrics import check_embeddings
from contrastive_jax.evaluation.metrics import check_labels

__all__ = ["knn_class_scores", "knn_classify", "knn_accuracy"]

DEFAULT_CHUNK_SIZE = 1024


# ----------------------------------------------------------------------------
# Shared helpers (also used by retrieval.py).


def iter_chunks(x: np.ndarray, chunk_size: int) -> Iterator[
    tuple[int, int, np.ndarray]]:
  """Yields ``(start, num_valid, chunk)``; every chunk has ``chunk_size`` rows.

  The last chunk is zero-padded so that a jitted kernel sees one shape.
  ``chunk_size`` is first clipped to ``len(x)``.
  """
  n = x.shape[0]
  for start in range(0, n, chunk_size):
    chunk = x[start:start + chunk_size]
    valid = chunk.shape[0]
    if valid < chunk_size:
      pad = np.zeros((chunk_size - valid,) + x.shape[1:], x.dtype)
      chunk = np.concatenate([chunk, pad], axis=0)
    yield start, valid, chunk


def prepare_query_reference(query, reference, *, query_name="query_embeddings",
                            reference_name="reference_embeddings"):
  """Validates both matrices and casts them to one float dtype (>= float32)."""
  query = check_embeddings(query_name, query)
  reference = check_embeddings(reference_name, reference)
  if query.shape[1] != reference.shape[1]:
    raise ValueError(
        f"{query_name} and {reference_name} must have the same feature size,"
        f" got shapes {query.shape} and {reference.shape}.")
  dtype = np.promote_types(np.promote_types(query.dtype, reference.dtype),
                           np.float32)
  if not jax.config.jax_enable_x64:
    dtype = np.float32
  return query.astype(dtype, copy=False), reference.astype(dtype, copy=False)


def _check_temperature(temperature) -> float:
  if isinstance(temperature, bool) or not isinstance(
      temperature, (int, float, np.floating, np.integer)):
    raise TypeError(f"temperature must be a number, got {temperature!r}.")
  if not temperature > 0:
    raise ValueError(f"temperature must be > 0, got {temperature}.")
  return float(temperature)


def _prepare(query, reference, reference_labels, k_max, num_classes,
             chunk_size, exclude_self=False):
  check_bool("exclude_self", exclude_self)
  query, reference = prepare_query_reference(query, reference)
  reference_labels = check_labels("reference_labels", reference_labels,
                                  reference.shape[0])
  if exclude_self:
    if query.shape[0] != reference.shape[0]:
      raise ValueError(
          "exclude_self needs the queries to be the references (query i is"
          f" reference i), got shapes {query.shape} and {reference.shape}.")
    k_max += 1  # the query's own row is one of the M candidates
  if num_classes is None:
    num_classes = int(reference_labels.max()) + 1
  num_classes = check_int("num_classes", num_classes)
  check_class_range("reference_labels", reference_labels, num_classes)
  if k_max > reference.shape[0]:
    raise ValueError(
        f"k={k_max - exclude_self} exceeds the number of references"
        f" ({reference.shape[0]}{' less the query itself' if exclude_self else ''}).")
  chunk_size = min(check_int("chunk_size", chunk_size),
                   query.shape[0])
  return query, reference, reference_labels, num_classes, chunk_size


# ----------------------------------------------------------------------------
# Jitted chunk kernels.


def _topk_votes(query, reference, reference_labels, k, self_offset=None):
  """Top-``k`` cosine similarities of a chunk, their labels.

  With ``self_offset``, query ``i`` of the chunk is reference
  ``self_offset + i`` and does not vote for itself.
  """
  sims = similarity.pairwise_cosine_similarity(query, reference)
  if self_offset is not None:
    own = (self_offset + jnp.arange(query.shape[0]))[:, None]
    sims = jnp.where(jnp.arange(reference.shape[0])[None, :] == own,
                     -jnp.inf, sims)
  values, indices = jax.lax.top_k(sims, k)
  return values, reference_labels[indices]


def _scores(values, labels, k, temperature, num_classes):
  """Class scores ``sum_{j < k, label_j = c} exp(s_j / T)``: ``[B, C]``."""
  # Mask rather than slice: slicing the outputs of lax.top_k makes XLA:CPU
  # fall back from its top-k kernel to a full sort (about 10x slower).
  weights = jnp.exp(values / temperature)
  if k < values.shape[1]:
    weights = jnp.where(jnp.arange(values.shape[1]) < k, weights, 0.0)
  rows = jnp.arange(values.shape[0])[:, None]
  return jnp.zeros((values.shape[0], num_classes), weights.dtype).at[
      rows, labels].add(weights)


@functools.partial(jax.jit, static_argnames=("k", "num_classes"))
def _scores_kernel(query, reference, reference_labels, temperature,
                   self_offset, *, k, num_classes):
  values, labels = _topk_votes(query, reference, reference_labels, k,
                               self_offset)
  return _scores(values, labels, k, temperature, num_classes)


@functools.partial(jax.jit, static_argnames=("ks", "num_classes"))
def _accuracy_kernel(query, query_labels, reference, reference_labels,
                     temperature, self_offset, *, ks, num_classes):
  """Per-query top-1 and top-5 hits ``[len(ks), 2, B]`` from one top_k."""
  values, labels = _topk_votes(query, reference, reference_labels, max(ks),
                               self_offset)
  hits = []
  for k in ks:
    scores = _scores(values, labels, k, temperature, num_classes)
    top = min(5, k, num_classes)
    _, ranked = jax.lax.top_k(scores, top)
    top1 = jnp.argmax(scores, axis=1) == query_labels
    hits.append(jnp.stack(
        [top1, jnp.any(ranked == query_labels[:, None], axis=1)]))
  return jnp.stack(hits)


# ----------------------------------------------------------------------------
# Public API.


def knn_class_scores(
    query_embeddings: Any,
    reference_embeddings: Any,
    reference_labels: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> np.ndarray:
  """Weighted-kNN class scores: summed ``exp(cos / T)`` of the top-``k`` votes.

  Args:
    query_embeddings: ``[Q, D]`` floating embeddings (need not be normalised).
    reference_embeddings: ``[M, D]`` embeddings of the labelled references.
    reference_labels: ``[M]`` integer class ids in ``[0, num_classes)``.
    k: number of neighbours, ``1 <= k <= M``.
    temperature: ``T > 0`` of the vote weights ``exp(s / T)``.
    num_classes: number of classes ``C``; default ``max(reference_labels)+1``.
    chunk_size: queries per chunk; peak memory is about
      ``chunk_size * M * 4`` bytes on top of the inputs.
    exclude_self: leave-one-out: the queries are the references (query
      ``i`` is reference ``i``) and none votes for itself; ``k <= M - 1``.

  Returns:
    ``[Q, C]`` float32 NumPy array of class scores (zero for classes without
    a vote).

  Raises:
    ValueError: shapes mismatch, non-finite rows, ``k > M``, labels out of
      range.
    TypeError: non-floating embeddings or non-integer labels.

  References:
    Wu et al., Unsupervised Feature Learning via Non-Parametric Instance
    Discrimination, CVPR 2018 (Sec. 3.4); solo-learn
    ``WeightedKNNClassifier``.
  """
  k = check_int("k", k)
  temperature = _check_temperature(temperature)
  query, reference, reference_labels, num_classes, chunk_size = _prepare(
      query_embeddings, reference_embeddings, reference_labels, k,
      num_classes, chunk_size, exclude_self)
  reference = jax.device_put(reference)
  reference_labels = jax.device_put(reference_labels.astype(np.int32))
  outputs = []
  for start, valid, chunk in iter_chunks(query, chunk_size):
    out = _scores_kernel(chunk, reference, reference_labels, temperature,
                         np.int32(start) if exclude_self else None,
                         k=k, num_classes=num_classes)
    outputs.append((valid, out))
  return np.concatenate(
      [np.asarray(out)[:valid] for valid, out in outputs], axis=0)


def knn_classify(
    query_embeddings: Any,
    reference_embeddings: Any,
    reference_labels: Any,
    *,
    k: int = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> np.ndarray:
  """Weighted-kNN predicted labels: argmax of :func:`knn_class_scores`.

  Args:
    query_embeddings: ``[Q, D]`` floating embeddings.
    reference_embeddings: ``[M, D]`` embeddings of the labelled references.
    reference_labels: ``[M]`` integer class ids.
    k: number of neighbours, ``1 <= k <= M``.
    temperature: ``T > 0`` of the vote weights ``exp(s / T)``.
    num_classes: number of classes; default ``max(reference_labels) + 1``.
    chunk_size: queries per chunk.
    exclude_self: leave-one-out: the queries are the references (query
      ``i`` is reference ``i``) and none votes for itself; ``k <= M - 1``.

  Returns:
    ``[Q]`` int64 NumPy array of predicted class ids (ties: lower id).

  References:
    Wu et al., CVPR 2018; solo-learn ``WeightedKNNClassifier``.
  """
  scores = knn_class_scores(
      query_embeddings, reference_embeddings, reference_labels, k=k,
      temperature=temperature, num_classes=num_classes, chunk_size=chunk_size,
      exclude_self=exclude_self)
  return np.argmax(scores, axis=1).astype(np.int64)


def knn_accuracy(
    query_embeddings: Any,
    query_labels: Any,
    reference_embeddings: Any,
    reference_labels: Any,
    *,
    ks: Sequence[int] = (20, 200),
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    exclude_self: bool = False,
) -> dict[str, float]:
  """Weighted-kNN top-1 and top-5 accuracy for several ``k`` at once.

  One ``top_k`` at ``max(ks)`` per chunk; smaller ``k`` reuse its leading
  columns. Top-5 counts a query as correct when its label is among the
  ``min(5, k, C)`` best-scoring classes (as solo-learn does), so with
  ``k < 5`` it is top-``k``.

  Args:
    query_embeddings: ``[Q, D]`` floating embeddings.
    query_labels: ``[Q]`` integer ground-truth class ids.
    reference_embeddings: ``[M, D]`` embeddings of the labelled references.
    reference_labels: ``[M]`` integer class ids.
    ks: neighbour counts to evaluate, each in ``[1, M]``.
    temperature: ``T > 0`` of the vote weights ``exp(s / T)``.
    num_classes: number of classes ``C``; default
      ``max(reference_labels, query_labels) + 1``.
    chunk_size: queries per chunk.
    exclude_self: leave-one-out: the queries are the references (query
      ``i`` is reference ``i``) and none votes for itself; ``k <= M - 1``.

  Returns:
    ``{"top1_k20": float, "top5_k20": float, "top1_k200": ..., ...}``:
    fractions in ``[0, 1]``, one pair per ``k`` in ``ks``.

  References:
    Wu et al., CVPR 2018; Caron et al., Emerging Properties in
    Self-Supervised Vision Transformers (DINO), ICCV 2021 (k = 20);
    solo-learn ``WeightedKNNClassifier``.
  """
  if isinstance(ks, (int, np.integer)):
    ks = (ks,)
  ks = tuple(sorted({check_int("ks entry", k) for k in ks}))
  if not ks:
    raise ValueError("ks must name at least one k.")
  temperature = _check_temperature(temperature)
  query_labels_np = check_labels("query_labels", query_labels)
  if num_classes is None:
    reference_labels = check_labels("reference_labels", reference_labels)
    num_classes = int(max(reference_labels.max(initial=0),
                          query_labels_np.max(initial=0))) + 1
  query, reference, reference_labels, num_classes, chunk_size = _prepare(
      query_embeddings, reference_embeddings, reference_labels, max(ks),
      num_classes, chunk_size, exclude_self)
  query_labels_np = check_labels("query_labels", query_labels_np,
                                 query.shape[0])
  check_class_range("query_labels", query_labels_np, num_classes)
  reference = jax.device_put(reference)
  reference_labels = jax.device_put(reference_labels.astype(np.int32))
  labels_padded = np.zeros(
      (-(-query.shape[0] // chunk_size) * chunk_size,), np.int32)
  labels_padded[:query.shape[0]] = query_labels_np
  outputs = []
  for start, valid, chunk in iter_chunks(query, chunk_size):
    out = _accuracy_kernel(chunk, labels_padded[start:start + chunk_size],
                           reference, reference_labels, temperature,
                           np.int32(start) if exclude_self else None,
                           ks=ks, num_classes=num_classes)
    outputs.append((valid, out))
  counts = sum(np.asarray(out)[:, :, :valid].sum(axis=-1, dtype=np.int64)
               for valid, out in outputs)
  result = {}
  for i, k in enumerate(ks):
    result[f"top1_k{k}"] = float(counts[i, 0] / query.shape[0])
    result[f"top5_k{k}"] = float(counts[i, 1] / query.shape[0])
  return result
