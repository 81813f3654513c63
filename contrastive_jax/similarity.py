"""Similarity and distance measures: element-wise and pairwise (matmul-based).

Element-wise functions reduce over the last axis and broadcast over leading
axes. Pairwise kernels take ``x [N, D]`` and ``y [M, D]`` (``y=None`` means
``y = x``) and return ``[N, M]`` built from one matrix product, never an
``[N, M, D]`` array.

Inputs in bfloat16/float16 are computed in float32 and the result is float32;
float64 inputs stay float64.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from contrastive_jax._checks import check_bool

__all__ = [
    "euclidean_distance",
    "cosine_similarity",
    "pearson_correlation",
    "dot_product",
    "hamming_distance",
    "pairwise_euclidean_distance",
    "pairwise_cosine_similarity",
    "pairwise_pearson_correlation",
    "pairwise_dot_product",
    "pairwise_hamming_distance",
]


# ----------------------------------------------------------------------------
# Validation and numerics shared with contrastive_jax.losses.


def compute_dtype(*arrays) -> jnp.dtype:
  """Float dtype used internally: at least float32."""
  return jnp.promote_types(jnp.result_type(*arrays), jnp.float32)


def check_floating(name: str, x) -> None:
  dtype = jnp.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
        f"{name} must have a floating dtype, got {dtype} with shape"
        f" {jnp.shape(x)}; cast integer or boolean codes with"
        " .astype(jnp.float32).")


def check_matrix(name: str, x) -> None:
  check_floating(name, x)
  if jnp.ndim(x) != 2:
    raise ValueError(
        f"{name} must be a matrix [N, D], got shape {jnp.shape(x)}"
        f" (rank {jnp.ndim(x)}).")


def check_same_features(x_name: str, x, y_name: str, y) -> None:
  if jnp.shape(x)[-1] != jnp.shape(y)[-1]:
    raise ValueError(
        f"{x_name} and {y_name} must have the same feature size (last axis),"
        f" got shapes {jnp.shape(x)} and {jnp.shape(y)}.")


def _prepare_pair(x, y, *, pairwise: bool):
  """Validates and casts (x, y); returns arrays in the compute dtype."""
  if pairwise:
    check_matrix("x", x)
    if y is None:
      y = x
    check_matrix("y", y)
  else:
    check_floating("x", x)
    check_floating("y", y)
    if jnp.ndim(x) == 0 or jnp.ndim(y) == 0:
      raise ValueError(
          f"x and y need a feature axis, got shapes {jnp.shape(x)} and"
          f" {jnp.shape(y)}.")
  check_same_features("x", x, "y", y)
  dtype = compute_dtype(x, y)
  return jnp.asarray(x, dtype), jnp.asarray(y, dtype)


def safe_sqrt(x):
  """sqrt with a zero (not infinite) gradient at 0."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def safe_normalize(x, *, eps: float = 1e-8):
  """x / ||x|| along the last axis; a vector of norm <= eps maps to zero.

  Below ``eps`` the result is exactly 0 with a zero gradient: dividing by
  ``max(||x||, eps)`` instead would give such a vector a gradient of
  ``1 / eps`` (inf in float16), which swamps every other row's.
  """
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  big = sq > eps * eps
  return jnp.where(big, x * jax.lax.rsqrt(jnp.where(big, sq, 1.0)), 0.0)


def _center(x):
  return x - jnp.mean(x, axis=-1, keepdims=True)


def _signs(x):
  # Zero counts as positive so that every position carries one bit.
  return jnp.where(x >= 0, 1.0, -1.0).astype(x.dtype)


# ----------------------------------------------------------------------------
# Element-wise measures.


@functools.partial(jax.jit, static_argnames=("squared",))
def euclidean_distance(x: jax.Array, y: jax.Array, *,
                       squared: bool = False) -> jax.Array:
  """Euclidean distance between ``x`` and ``y`` along the last axis.

  Args:
    x: array ``[..., D]``.
    y: array ``[..., D]``, broadcastable against ``x``.
    squared: return the squared distance.

  Returns:
    ``[...]`` distances; the gradient is zero (finite) where ``x == y``.

  References:
    scipy.spatial.distance.euclidean.
  """
  check_bool("squared", squared)
  x, y = _prepare_pair(x, y, pairwise=False)
  sq = jnp.sum(jnp.square(x - y), axis=-1)
  return sq if squared else safe_sqrt(sq)


@jax.jit
def cosine_similarity(x: jax.Array, y: jax.Array, *,
                      eps: float = 1e-8) -> jax.Array:
  """Cosine similarity ``x·y / (|x| |y|)``; 0 where a norm is at most ``eps``.

  Args:
    x: array ``[..., D]``.
    y: array ``[..., D]``, broadcastable against ``x``.
    eps: a vector of norm at most ``eps`` (a zero vector) has similarity 0,
      with a zero gradient.

  Returns:
    ``[...]`` similarities in ``[-1, 1]``.

  References:
    torch.nn.functional.cosine_similarity.
  """
  x, y = _prepare_pair(x, y, pairwise=False)
  return jnp.sum(safe_normalize(x, eps=eps) * safe_normalize(y, eps=eps),
                 axis=-1)


@jax.jit
def pearson_correlation(x: jax.Array, y: jax.Array, *,
                        eps: float = 1e-8) -> jax.Array:
  """Pearson correlation: cosine similarity of the mean-centred vectors.

  Args:
    x: array ``[..., D]``.
    y: array ``[..., D]``, broadcastable against ``x``.
    eps: a vector whose centred norm is at most ``eps`` (a constant vector)
      gives 0, with a zero gradient.

  Returns:
    ``[...]`` correlations in ``[-1, 1]``.

  References:
    scipy.stats.pearsonr.
  """
  x, y = _prepare_pair(x, y, pairwise=False)
  return jnp.sum(safe_normalize(_center(x), eps=eps)
                 * safe_normalize(_center(y), eps=eps), axis=-1)


@jax.jit
def dot_product(x: jax.Array, y: jax.Array) -> jax.Array:
  """Inner product along the last axis.

  Args:
    x: array ``[..., D]``.
    y: array ``[..., D]``, broadcastable against ``x``.

  Returns:
    ``[...]`` inner products.
  """
  x, y = _prepare_pair(x, y, pairwise=False)
  return jnp.sum(x * y, axis=-1)


@jax.jit
def hamming_distance(x: jax.Array, y: jax.Array) -> jax.Array:
  """Number of positions whose signs differ (for ±1 hash codes).

  Zero counts as positive. Piecewise constant: its gradient is zero.

  Args:
    x: array ``[..., D]`` of codes (any float values; only signs matter).
    y: array ``[..., D]``, broadcastable against ``x``.

  Returns:
    ``[...]`` counts in ``[0, D]``, as floats of the compute dtype.

  References:
    Cao et al., HashNet: Deep Learning to Hash by Continuation, ICCV 2017.
  """
  x, y = _prepare_pair(x, y, pairwise=False)
  return jnp.sum((_signs(x) != _signs(y)).astype(x.dtype), axis=-1)


# ----------------------------------------------------------------------------
# Pairwise kernels.


def sq_euclidean_matrix(x, y, zero_mask=None):
  """``|x|^2 + |y|^2 - 2 x·y^T`` clamped at 0, and exactly 0 on ``zero_mask``.

  Round-off leaves ``|x|^2 + |x|^2 - 2 x·x`` slightly off zero, so pairs known
  to be the same point are set to 0 explicitly.
  """
  sq = (jnp.sum(x * x, axis=-1)[:, None] + jnp.sum(y * y, axis=-1)[None, :]
        - 2.0 * (x @ y.T))
  sq = jnp.maximum(sq, 0.0)
  if zero_mask is not None:
    sq = jnp.where(zero_mask, 0.0, sq)
  return sq


@functools.partial(jax.jit, static_argnames=("squared",))
def pairwise_euclidean_distance(x: jax.Array, y: jax.Array | None = None, *,
                                squared: bool = False) -> jax.Array:
  """All-pairs Euclidean distances ``|x_i - y_j|`` from one matrix product.

  Computed as ``|x|^2 + |y|^2 - 2 x·y^T`` clamped at 0; with ``y=None`` the
  diagonal is exactly 0. The gradient is zero where two points coincide.
  The cancellation costs precision at small distances: the error is about
  ``sqrt(eps) |x|`` (``3e-4 |x|`` in float32), so smaller distances are not
  resolved (they may come out 0). Use
  :func:`euclidean_distance` (element-wise, exact), float64, or normalised
  embeddings where near-duplicates matter; every loss with
  ``metric="euclidean"`` inherits this.

  Args:
    x: ``[N, D]``.
    y: ``[M, D]`` or ``None`` (``y = x``).
    squared: return squared distances.

  Returns:
    ``[N, M]`` distances.

  References:
    scipy.spatial.distance.cdist(metric="euclidean").
  """
  check_bool("squared", squared)
  same = y is None
  x, y = _prepare_pair(x, y, pairwise=True)
  sq = sq_euclidean_matrix(
      x, y, jnp.eye(x.shape[0], dtype=bool) if same else None)
  return sq if squared else safe_sqrt(sq)


@jax.jit
def pairwise_cosine_similarity(x: jax.Array, y: jax.Array | None = None, *,
                               eps: float = 1e-8) -> jax.Array:
  """All-pairs cosine similarities.

  Args:
    x: ``[N, D]``.
    y: ``[M, D]`` or ``None`` (``y = x``).
    eps: vectors of norm at most ``eps`` (zero vectors) have similarity 0.

  Returns:
    ``[N, M]`` similarities.

  References:
    sklearn.metrics.pairwise.cosine_similarity.
  """
  x, y = _prepare_pair(x, y, pairwise=True)
  return safe_normalize(x, eps=eps) @ safe_normalize(y, eps=eps).T


@jax.jit
def pairwise_pearson_correlation(x: jax.Array, y: jax.Array | None = None, *,
                                 eps: float = 1e-8) -> jax.Array:
  """All-pairs Pearson correlations (centred over features, then cosine).

  Args:
    x: ``[N, D]``.
    y: ``[M, D]`` or ``None`` (``y = x``).
    eps: vectors whose centred norm is at most ``eps`` (constant vectors)
      give 0.

  Returns:
    ``[N, M]`` correlations.

  References:
    numpy.corrcoef.
  """
  x, y = _prepare_pair(x, y, pairwise=True)
  return (safe_normalize(_center(x), eps=eps)
          @ safe_normalize(_center(y), eps=eps).T)


@jax.jit
def pairwise_dot_product(x: jax.Array,
                         y: jax.Array | None = None) -> jax.Array:
  """All-pairs inner products ``x @ y.T``.

  Args:
    x: ``[N, D]``.
    y: ``[M, D]`` or ``None`` (``y = x``).

  Returns:
    ``[N, M]`` inner products.
  """
  x, y = _prepare_pair(x, y, pairwise=True)
  return x @ y.T


@jax.jit
def pairwise_hamming_distance(x: jax.Array,
                              y: jax.Array | None = None) -> jax.Array:
  """All-pairs Hamming distances of sign codes, as ``(D - b_x·b_y^T) / 2``.

  Exact in float32 for ``D < 2**24``. Zero counts as positive.

  Args:
    x: ``[N, D]`` codes (only signs matter).
    y: ``[M, D]`` or ``None`` (``y = x``).

  Returns:
    ``[N, M]`` counts in ``[0, D]``, as floats of the compute dtype.
  """
  x, y = _prepare_pair(x, y, pairwise=True)
  bx, by = _signs(x), _signs(y)
  return 0.5 * (x.shape[-1] - bx @ by.T)
