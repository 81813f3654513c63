"""BatchNorm fused with the residual add and ReLU, with a choice of backward pass.

A CIFAR ResNet step on a GPU spends about 40% of its time in memory-bound
BatchNorm / ReLU / residual passes (H200 profile, ``experiments/RESULTS.md``).
Under plain autodiff, ``relu(batch_norm(y) + r)`` in bfloat16 saves per
element a float32 ``y - mean``, a float32 square, a bfloat16 copy and a
boolean mask for the backward pass: about 11 bytes written in the forward
pass and read again in the backward one. Two backward passes that keep only
bfloat16 activations (``backward=``):

* ``"remat"``: the module under ``nn.remat``; the backward pass recomputes
  the statistics, normalisation, add and mask from the saved input ``y``.
  In float32 the values, gradients and ``batch_stats`` are the same to the
  bit as autodiff's (tested on the CPU); in bfloat16 the recomputation rounds at other points,
  with the same error against float32.
* ``"custom"``: a ``jax.custom_vjp`` with the batch-norm gradient written out
  (two reductions, then one elementwise pass). It keeps ``y``, the output
  (whose sign is the ReLU mask, and which the next convolution keeps
  anyway) and the per-channel statistics, so nothing is recomputed and no
  optimisation barrier stands between the passes. It equals autodiff's
  gradient up to float32 rounding.

The variables keep ``nn.BatchNorm``'s names and layout in every mode, so
checkpoints load either way (``tests/test_models.py``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

from contrastive_jax._checks import check_module_bools
from contrastive_jax.models._varying import varying_axes

__all__ = ["BACKWARDS", "BatchNormAct", "batch_norm_act"]

BACKWARDS = ("autodiff", "remat", "custom")


def _stats_dtype(x: jax.Array):
  return jnp.promote_types(x.dtype, jnp.float32)  # as flax: at least float32


def _stats(x: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and variance as flax's (fast variance, clipped at 0)."""
  xf = x.astype(_stats_dtype(x))
  axes = tuple(range(x.ndim - 1))
  moments = jnp.stack([jnp.mean(xf, axes), jnp.mean(jnp.square(xf), axes)])
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  mean, mean_sq = moments[0], moments[1]
  return mean, jnp.maximum(0.0, mean_sq - jnp.square(mean))


def _count(x: jax.Array, axis_name: str | None) -> int:
  """Examples per channel in the (global) batch."""
  return x.size // x.shape[-1] * (1 if axis_name is None else lax.axis_size(axis_name))


def _forward(x, scale, bias, residual, epsilon, axis_name, relu, dtype):
  mean, var = _stats(x, axis_name)
  rstd = lax.rsqrt(var + epsilon)
  # flax's order of operations, so float32 results match it to the bit.
  y = jnp.asarray((x - mean) * (rstd * scale) + bias, dtype)
  if residual is not None:
    y = y + residual
  out = jnp.maximum(y, 0) if relu else y
  return out, mean, var, rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _batch_norm_act(x, scale, bias, residual, epsilon, axis_name, relu, dtype):
  out, mean, var, _ = _forward(x, scale, bias, residual, epsilon, axis_name, relu, dtype)
  return out, mean, var


def _batch_norm_act_fwd(x, scale, bias, residual, epsilon, axis_name, relu, dtype):
  out, mean, var, rstd = _forward(x, scale, bias, residual, epsilon, axis_name, relu,
                                  dtype)
  # The axis size is read here: the backward pass may be traced where the
  # mapped axis is no longer bound (e.g. under vmap). Keeping ``residual``
  # costs no memory: it is the block's input or the shortcut's output, both
  # kept for their own backward passes anyway.
  count = jnp.asarray(_count(x, axis_name), mean.dtype)
  return (out, mean, var), (x, out, mean, rstd, scale, bias, residual, count)


def _like_primal(cotangent: jax.Array, primal: jax.Array) -> jax.Array:
  """Sums ``cotangent`` over the axes along which it varies and ``primal`` does not.

  Under ``shard_map`` a replicated parameter's gradient is the sum of every
  shard's contribution, as autodiff makes it; under ``vmap`` or ``pmap``
  nothing is summed here.
  """
  extra = varying_axes(cotangent) - varying_axes(primal)
  return lax.psum(cotangent, tuple(sorted(extra))) if extra else cotangent


def _batch_norm_act_bwd(epsilon, axis_name, relu, dtype, saved, cotangents):
  del epsilon, dtype
  x, out, mean, rstd, scale, bias, residual, count = saved
  # The statistics' cotangents are dropped: they only feed the running
  # averages in batch_stats, which no loss differentiates.
  g = cotangents[0].astype(_stats_dtype(x))
  if relu:
    g = jnp.where(out > 0, g, 0.0)
  xhat = (x.astype(g.dtype) - mean) * rstd
  axes = tuple(range(x.ndim - 1))
  dbias = jnp.sum(g, axes)
  dscale = jnp.sum(g * xhat, axes)
  # The parameter gradients are this shard's own sums (``_like_primal`` adds
  # the shards up where the parameters are replicated, as autodiff does);
  # the input gradient needs the global sums, since the statistics are global.
  sums = jnp.stack([dbias, dscale])
  if axis_name is not None:
    sums = lax.psum(sums, axis_name)
  dx = (scale * rstd) * (g - sums[0] / count - xhat * (sums[1] / count))
  dresidual = None if residual is None else _like_primal(g.astype(residual.dtype), residual)
  return (_like_primal(dx.astype(x.dtype), x),
          _like_primal(dscale.astype(scale.dtype), scale),
          _like_primal(dbias.astype(bias.dtype), bias), dresidual)


_batch_norm_act.defvjp(_batch_norm_act_fwd, _batch_norm_act_bwd)


class BatchNormAct(nn.BatchNorm):
  """``nn.BatchNorm``, then ``+ residual`` if one is given, then ReLU if ``relu``.

  Attributes:
    relu: apply ReLU to the output.
    custom_vjp: in training mode, use the written-out gradient (see the
      module docstring) instead of autodiff through ``nn.BatchNorm``. It
      supports the default ``nn.BatchNorm`` options only (last-axis
      features, scale and bias, fast variance, no mask or axis groups).
    (Every ``nn.BatchNorm`` attribute.)

  Input: ``x [..., C]`` and optionally ``residual`` of the same shape.
  Output: the same shape, in ``dtype``.
  """

  relu: bool = True
  custom_vjp: bool = False

  @nn.compact
  def __call__(self, x: jax.Array,
               residual: jax.Array | None = None) -> jax.Array:
    check_module_bools(self)
    # ``use_running_average`` is an attribute only: under ``nn.remat`` a call
    # argument would be traced, and BatchNorm branches on it in Python.
    if residual is not None and residual.shape != x.shape:
      raise ValueError(f"BatchNormAct: residual shape {residual.shape} != input shape"
                       f" {x.shape}.")
    if not self.custom_vjp or self.use_running_average or self.is_initializing():
      y = super().__call__(x)
      if residual is not None:
        y = y + residual
      return nn.relu(y) if self.relu else y
    if (self.axis not in (-1, x.ndim - 1) or not (self.use_scale and self.use_bias)
        or not self.use_fast_variance or self.axis_index_groups is not None
        or not self.force_float32_reductions):
      raise ValueError("BatchNormAct(custom_vjp=True) supports only the default"
                       " nn.BatchNorm options (axis=-1, scale, bias, fast variance).")
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32),
                            features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32),
                           features)
    scale = self.param("scale", self.scale_init, features, self.param_dtype)
    bias = self.param("bias", self.bias_init, features, self.param_dtype)
    dtype = dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
    out, mean, var = _batch_norm_act(x, scale, bias, residual, self.epsilon,
                                     self.axis_name, self.relu, dtype)
    ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
    ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return out


# The lifted class, built once: nothing is saved inside it, so the backward
# pass recomputes it from its inputs.
_RematBatchNormAct = nn.remat(BatchNormAct)


def batch_norm_act(*, backward: str = "autodiff", **kwargs) -> BatchNormAct:
  """A ``BatchNormAct`` (``kwargs`` are its attributes) with the given backward pass.

  ``backward``: ``"autodiff"`` (plain), ``"remat"`` (``nn.remat`` with no
  saved intermediates) or ``"custom"`` (the written-out gradient); see the
  module docstring. The three compute the same function.
  """
  if backward not in BACKWARDS:
    raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}.")
  if backward == "remat":
    return _RematBatchNormAct(**kwargs)
  return BatchNormAct(custom_vjp=backward == "custom", **kwargs)
