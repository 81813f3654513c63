"""Retrieval metrics for embeddings and hash codes.

``retrieval_metrics`` follows the semantics of pytorch-metric-learning's
``AccuracyCalculator`` (Musgrave et al., 2020):

* With no separate reference set (or ``ref_includes_query=True``) each query's
  own entry is removed from its neighbour list, by index.
* ``R`` for a query is the number of references with its label (less itself).
  Queries whose ``R`` is 0 ("lone" queries) are left out of every
  neighbour-based metric; a metric is NaN when every query is lone.
* ``precision_at_1``: fraction of queries whose nearest neighbour shares
  their label. ``r_precision``: fraction of the ``R`` nearest that share it.
  ``mean_average_precision_at_r``: ``(1/R) sum_{i<=R} P(i) rel(i)``.
* ``recall_at_K`` (K = 1, 2, 4, 8): fraction of queries with at least one
  same-label item among their ``K`` nearest, as in the Recall@K of the
  deep-metric-learning literature (Oh Song et al., 2016). It equals
  ``precision_at_1`` for ``K = 1``.
* ``nmi`` / ``ami``: scikit-learn ``KMeans`` with as many clusters as query
  classes, on the query embeddings (L2-normalised first for the cosine
  metric), scored against the query labels.

Neighbours come from the project's pairwise kernels and ``jax.lax.top_k`` in
chunks of queries, at ``k = max(R) `` (at least the largest recall K), so the
full ``[Q, M]`` matrix never exists. Ties are ranked by reference index (lower
first).

``hash_retrieval_map`` ranks a database by Hamming distance to each query
code and reports mean average precision; ``bit_balance`` measures how evenly
each bit splits the codes.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax import similarity
from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int
from contrastive_jax.evaluation.knn import iter_chunks
from contrastive_jax.evaluation.knn import prepare_query_reference
from contrastive_jax.evaluation.metrics import check_embeddings
from contrastive_jax.evaluation.metrics import check_labels

__all__ = ["retrieval_metrics", "hash_retrieval_map", "bit_balance"]

RECALL_KS = (1, 2, 4, 8)
DEFAULT_CHUNK_SIZE = 1024
_METRICS = ("cosine", "euclidean")


# ----------------------------------------------------------------------------
# Embedding retrieval.


def _scores(query, reference, metric):
  """Larger is nearer: cosine similarity or minus squared distance."""
  if metric == "cosine":
    return similarity.pairwise_cosine_similarity(query, reference)
  return -similarity.pairwise_euclidean_distance(query, reference,
                                                 squared=True)


@functools.partial(jax.jit,
                   static_argnames=("k", "metric", "recall_ks", "exclude_self"))
def _retrieval_kernel(query, query_codes, query_index, num_relevant, reference,
                      reference_codes, *, k, metric, recall_ks, exclude_self):
  """Per-query metrics of one chunk: ``[3 + len(recall_ks), B]`` float32."""
  scores = _scores(query, reference, metric)
  if exclude_self:
    columns = jnp.arange(reference.shape[0])
    scores = jnp.where(columns[None, :] == query_index[:, None], -jnp.inf,
                       scores)
  _, indices = jax.lax.top_k(scores, k)
  relevant = reference_codes[indices] == query_codes[:, None]
  position = jnp.arange(k)
  within_r = position[None, :] < num_relevant[:, None]
  hits_r = jnp.logical_and(relevant, within_r).astype(jnp.float32)
  r = jnp.maximum(num_relevant, 1).astype(jnp.float32)
  r_precision = jnp.sum(hits_r, axis=1) / r
  precision_at_i = jnp.cumsum(hits_r, axis=1) / (position + 1.0)
  map_at_r = jnp.sum(precision_at_i * hits_r, axis=1) / r
  # Masks, not slices, of the top_k outputs: slicing them makes XLA:CPU
  # replace its top-k kernel with a full sort.
  rows = [r_precision, map_at_r]
  for kk in (1,) + tuple(recall_ks):
    rows.append(jnp.any(relevant & (position[None, :] < kk), axis=1).astype(
        jnp.float32))
  return jnp.stack(rows)


def _check_metric(metric):
  if metric not in _METRICS:
    raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}.")


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    *,
    reference_embeddings: Any = None,
    reference_labels: Any = None,
    ref_includes_query: bool = False,
    metric: str = "cosine",
    recall_ks: Sequence[int] = RECALL_KS,
    cluster: bool = True,
    kmeans_seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, float]:
  """Precision@1, R-precision, MAP@R, Recall@K, NMI and AMI of embeddings.

  Args:
    embeddings: ``[Q, D]`` query embeddings.
    labels: ``[Q]`` query labels (any values comparable with ``==``).
    reference_embeddings: ``[M, D]`` reference embeddings, or ``None`` to
      retrieve among the queries themselves (each query excluded from its own
      neighbours).
    reference_labels: ``[M]`` labels of the references (required with
      ``reference_embeddings``).
    ref_includes_query: the first ``Q`` references are the queries (as in
      PML's ``get_accuracy(..., ref_includes_query=True)``); query ``i``
      is excluded from its own neighbours by index.
    metric: ``"cosine"`` (similarity of L2-normalised embeddings) or
      ``"euclidean"``.
    recall_ks: the ``K`` of the ``recall_at_K`` keys.
    cluster: compute ``nmi``/``ami`` (k-means); NaN when False.
    kmeans_seed: ``random_state`` of scikit-learn's ``KMeans``.
    chunk_size: queries per chunk; peak memory is about
      ``chunk_size * M * 4`` bytes on top of the inputs.

  Returns:
    ``{"precision_at_1", "r_precision", "mean_average_precision_at_r",
    "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8", "nmi",
    "ami"}`` as Python floats (NaN where undefined, see the module docstring
    for lone queries).

  Raises:
    ValueError: shape mismatches, non-finite rows, unknown metric,
      ``ref_includes_query`` with references that do not start with the
      queries.
    TypeError: non-floating embeddings.

  References:
    Musgrave, Belongie and Lim, A Metric Learning Reality Check, ECCV 2020;
    pytorch-metric-learning ``AccuracyCalculator``;
    Oh Song et al., Deep Metric Learning via Lifted Structured Feature
    Embedding, CVPR 2016 (Recall@K).
  """
  _check_metric(metric)
  recall_ks = tuple(check_int("recall_ks entry", kk)
                    for kk in recall_ks)
  chunk_size = check_int("chunk_size", chunk_size)
  check_bool("ref_includes_query", ref_includes_query)
  check_bool("cluster", cluster)
  query = check_embeddings("embeddings", embeddings)
  query_labels = check_labels("labels", labels, query.shape[0], integer=False)
  if (reference_embeddings is None) != (reference_labels is None):
    raise ValueError(
        "reference_embeddings and reference_labels go together; pass both or"
        " neither.")
  if reference_embeddings is None:
    reference, ref_labels = query, query_labels
    exclude_self = True
  else:
    query, reference = prepare_query_reference(
        query, reference_embeddings, query_name="embeddings")
    ref_labels = check_labels("reference_labels", reference_labels,
                              reference.shape[0], integer=False)
    exclude_self = bool(ref_includes_query)
    if exclude_self and not (
        reference.shape[0] >= query.shape[0]
        and np.array_equal(reference[:query.shape[0]], query)
        and np.array_equal(ref_labels[:query.shape[0]], query_labels)):
      raise ValueError(
          "ref_includes_query=True needs the first len(embeddings) reference"
          " rows and labels to equal the queries.")
  query = query.astype(np.float32, copy=False)
  reference = reference.astype(np.float32, copy=False)

  num_queries, num_refs = query.shape[0], reference.shape[0]
  _, codes = np.unique(np.concatenate([query_labels, ref_labels]),
                       return_inverse=True)
  codes = codes.reshape(-1).astype(np.int32)
  query_codes, ref_codes = codes[:num_queries], codes[num_queries:]
  num_relevant = np.bincount(ref_codes, minlength=codes.max() + 1)[query_codes]
  num_relevant = (num_relevant - int(exclude_self)).astype(np.int32)
  not_lone = num_relevant > 0

  result = {}
  names = (["r_precision", "mean_average_precision_at_r", "precision_at_1"]
           + [f"recall_at_{kk}" for kk in recall_ks])
  candidates = num_refs - int(exclude_self)
  if not_lone.any() and candidates > 0:
    k = min(max(int(num_relevant.max()), max(recall_ks, default=1)),
            candidates)
    chunk = min(chunk_size, num_queries)
    padded = -(-num_queries // chunk) * chunk
    pad = lambda a, v: np.concatenate(  # pylint: disable=g-long-lambda
        [a, np.full((padded - num_queries,), v, a.dtype)])
    query_codes_p = pad(query_codes, -1)
    index_p = pad(np.arange(num_queries, dtype=np.int32), -1)
    relevant_p = pad(num_relevant, 1)
    reference_d = jax.device_put(reference)
    ref_codes_d = jax.device_put(ref_codes)
    outputs = []
    for start, valid, block in iter_chunks(query, chunk):
      sl = slice(start, start + chunk)
      out = _retrieval_kernel(
          block, query_codes_p[sl], index_p[sl], relevant_p[sl], reference_d,
          ref_codes_d, k=k, metric=metric, recall_ks=recall_ks,
          exclude_self=exclude_self)
      outputs.append((valid, out))
    per_query = np.concatenate(
        [np.asarray(out)[:, :valid] for valid, out in outputs], axis=1)
    per_query = per_query[:, not_lone].astype(np.float64)
    for name, values in zip(names, per_query):
      result[name] = float(np.mean(values))
  else:
    result.update({name: float("nan") for name in names})

  result["nmi"], result["ami"] = (
      _cluster_scores(query, query_codes, metric, kmeans_seed) if cluster
      else (float("nan"), float("nan")))
  order = [names[2], names[0], names[1]] + names[3:] + ["nmi", "ami"]
  return {key: result[key] for key in order}


def _cluster_scores(query, query_codes, metric, seed):
  from sklearn import cluster as skc  # pylint: disable=g-import-not-at-top
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top

  x = query.astype(np.float64)
  if metric == "cosine":
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  num_clusters = len(np.unique(query_codes))
  assignments = skc.KMeans(n_clusters=num_clusters, n_init=1,
                           random_state=seed).fit_predict(x)
  return (float(skm.normalized_mutual_info_score(query_codes, assignments)),
          float(skm.adjusted_mutual_info_score(query_codes, assignments)))


# ----------------------------------------------------------------------------
# Hash-code retrieval.


def _check_codes(name, codes):
  """±1 float32 codes from bool (True = +1) or signed numeric codes."""
  codes = np.asarray(codes)
  if codes.ndim != 2 or 0 in codes.shape:
    raise ValueError(f"{name} must be a non-empty matrix [N, B], got shape"
                     f" {codes.shape}.")
  if codes.dtype == np.bool_:
    return np.where(codes, 1.0, -1.0).astype(np.float32)
  if np.issubdtype(codes.dtype, np.integer):
    codes = codes.astype(np.float32)
  codes = check_embeddings(name, codes)
  if np.isin(codes, (0.0, 1.0)).all() and (codes == 0).any():
    raise ValueError(
        f"{name} looks like 0/1 codes; pass ±1 codes (or booleans), since"
        " only signs are compared and 0 counts as +1.")
  return np.where(codes >= 0, 1.0, -1.0).astype(np.float32)


def _check_hash_labels(name, labels, n):
  labels = np.asarray(labels)
  if labels.ndim not in (1, 2):
    raise ValueError(f"{name} must be [N] class ids or [N, C] multi-hot,"
                     f" got shape {labels.shape}.")
  if labels.shape[0] != n:
    raise ValueError(f"{name} has {labels.shape[0]} rows but the codes have"
                     f" {n}; they must match.")
  return labels


@functools.partial(jax.jit, static_argnames=("k", "multi_label"))
def _hash_ap_kernel(query, query_labels, reference, reference_labels, *, k,
                    multi_label):
  distances = similarity.pairwise_hamming_distance(query, reference)
  # top_k ranks equal distances by index (lower first): a stable ranking.
  _, indices = jax.lax.top_k(-distances, k)
  if multi_label:
    relevant = (query_labels @ reference_labels.T) > 0
  else:
    relevant = query_labels[:, None] == reference_labels[None, :]
  relevant = jnp.take_along_axis(relevant, indices, axis=1).astype(jnp.float32)
  num = jnp.sum(relevant, axis=1)
  precision = jnp.cumsum(relevant, axis=1) / jnp.arange(1.0, k + 1.0)
  return jnp.where(num > 0,
                   jnp.sum(precision * relevant, axis=1) / jnp.maximum(num, 1),
                   0.0)


def hash_retrieval_map(
    query_codes: Any,
    query_labels: Any,
    reference_codes: Any,
    reference_labels: Any,
    *,
    top_k: int | None = None,
    chunk_size: int = 256,
) -> float:
  """Mean average precision of Hamming ranking (mAP, or mAP@top_k).

  The database is sorted by Hamming distance to each query code; equal
  distances keep database order (a stable sort: lower reference index
  first), so the result is deterministic. For the ranked list cut at
  ``top_k`` (the whole database when ``None``),
  ``AP = sum_i P(i) rel(i) / sum_i rel(i)``; a query with no relevant item in
  its list has ``AP = 0``. mAP averages over all queries.

  Args:
    query_codes: ``[Q, B]`` codes: ±1 (only signs matter; 0 counts as +1) or
      booleans (True = +1). 0/1 integer codes are refused.
    query_labels: ``[Q]`` class ids, or ``[Q, C]`` multi-hot labels (relevant
      when sharing at least one class, as for NUS-WIDE).
    reference_codes: ``[M, B]`` database codes.
    reference_labels: ``[M]`` or ``[M, C]``, like ``query_labels``.
    top_k: cut-off of the ranked list (e.g. 1000 or 5000), ``None`` for all.
    chunk_size: queries per chunk.

  Returns:
    mAP as a Python float in ``[0, 1]``.

  References:
    Cao et al., HashNet: Deep Learning to Hash by Continuation, ICCV 2017;
    DeepHash-pytorch ``CalcTopMap`` (the same definition, with a stable sort).
  """
  query = _check_codes("query_codes", query_codes)
  reference = _check_codes("reference_codes", reference_codes)
  if query.shape[1] != reference.shape[1]:
    raise ValueError(
        f"query_codes and reference_codes must have the same number of bits,"
        f" got shapes {query.shape} and {reference.shape}.")
  q_labels = _check_hash_labels("query_labels", query_labels, query.shape[0])
  r_labels = _check_hash_labels("reference_labels", reference_labels,
                                reference.shape[0])
  if q_labels.ndim != r_labels.ndim or (
      q_labels.ndim == 2 and q_labels.shape[1] != r_labels.shape[1]):
    raise ValueError(
        f"query_labels {q_labels.shape} and reference_labels"
        f" {r_labels.shape} must both be [N] ids or both [N, C] multi-hot.")
  multi_label = q_labels.ndim == 2
  if multi_label:
    q_labels = (q_labels > 0).astype(np.float32)
    r_labels = (r_labels > 0).astype(np.float32)
  else:
    _, codes = np.unique(np.concatenate([q_labels, r_labels]),
                         return_inverse=True)
    codes = codes.reshape(-1).astype(np.int32)
    q_labels, r_labels = codes[:query.shape[0]], codes[query.shape[0]:]
  k = reference.shape[0] if top_k is None else min(
      check_int("top_k", top_k), reference.shape[0])
  chunk = min(check_int("chunk_size", chunk_size), query.shape[0])
  padded = -(-query.shape[0] // chunk) * chunk
  q_labels_p = np.zeros((padded,) + q_labels.shape[1:], q_labels.dtype)
  q_labels_p[:query.shape[0]] = q_labels
  reference_d = jax.device_put(reference)
  r_labels_d = jax.device_put(r_labels)
  outputs = []
  for start, valid, block in iter_chunks(query, chunk):
    out = _hash_ap_kernel(block, q_labels_p[start:start + chunk], reference_d,
                          r_labels_d, k=k, multi_label=multi_label)
    outputs.append((valid, out))
  ap = np.concatenate([np.asarray(out)[:valid] for valid, out in outputs])
  return float(np.mean(ap.astype(np.float64)))


def bit_balance(codes: Any, *, per_bit: bool = False) -> float | np.ndarray:
  """How evenly each bit splits the codes between +1 and -1.

  Args:
    codes: ``[N, B]`` ±1 codes (0 counts as +1) or booleans (True = +1).
    per_bit: return the per-bit fraction of +1 instead of the summary.

  Returns:
    With ``per_bit=False``, ``mean_b |p_b - 0.5|`` as a Python float, where
    ``p_b`` is the fraction of codes whose bit ``b`` is +1: 0 for perfectly
    balanced bits, 0.5 when every bit is constant. With ``per_bit=True``,
    ``p`` itself as a ``[B]`` float64 NumPy array.

  References:
    Weiss, Torralba and Fergus, Spectral Hashing, NIPS 2008 (the bit-balance
    criterion).
  """
  check_bool("per_bit", per_bit)
  codes = _check_codes("codes", codes)
  fraction = np.mean(codes > 0, axis=0, dtype=np.float64)
  if per_bit:
    return fraction
  return float(np.mean(np.abs(fraction - 0.5)))
