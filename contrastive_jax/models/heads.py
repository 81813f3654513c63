"""Heads placed on top of a backbone: SimCLR projection, linear classifier, and K-bit hashing."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax._checks import check_int
from contrastive_jax._checks import check_module_bools
from contrastive_jax.models.cnn import torch_uniform_init

Dtype = Any

__all__ = ["ClassifierHead", "HashHead", "ProjectionHead", "hash_scale"]


def _check_features(name: str, x) -> None:
    """Heads take ``[batch, features]``: a lone vector would be normalised
    over no batch (BatchNorm then outputs its bias whatever the input)."""
    if jnp.ndim(x) != 2:
        raise ValueError(f"{name} expects features of shape (batch, features),"
                         f" got shape {jnp.shape(x)}.")


class ProjectionHead(nn.Module):
    """SimCLR projection MLP: ``(Dense -> BN -> ReLU) x (num_layers - 1)``, then ``Dense``.

    With the defaults this is SimCLR v1's 2-layer head (as in solo-learn and
    lightly). ``final_bn=True`` adds the BatchNorm that SimCLR v2's code puts
    on the output (scale only, no centring, and no Dense bias before it).
    Hidden Dense layers have no bias because the BatchNorm that follows would
    cancel it.

    Attributes:
        hidden_dim: width of each hidden layer.
        output_dim: width of the projection.
        num_layers: number of Dense layers, >= 1 (1 is a linear projection).
        final_bn: apply BatchNorm (scale only) to the output.
        axis_name: mapped axis over which BatchNorm statistics are averaged, so
            that statistics cover the global batch (SimCLR global BN).
        bn_momentum: BatchNorm running-average momentum (flax convention).
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, features)``. Output: ``(batch, output_dim)`` in ``dtype``.
    """

    hidden_dim: int = 2048
    output_dim: int = 128
    num_layers: int = 2
    final_bn: bool = False
    axis_name: str | None = None
    bn_momentum: float = 0.9
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        check_int("num_layers", self.num_layers, 1)
        _check_features("ProjectionHead", x)
        x = jnp.asarray(x, self.dtype)

        def norm(name: str, use_bias: bool = True) -> nn.BatchNorm:
            return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                                epsilon=1e-5, use_bias=use_bias, axis_name=self.axis_name,
                                dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        for i in range(self.num_layers - 1):
            x = nn.Dense(self.hidden_dim, use_bias=False, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=f"hidden_{i}")(x)
            x = nn.relu(norm(f"hidden_norm_{i}")(x))
        x = nn.Dense(self.output_dim, use_bias=not self.final_bn, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="output")(x)
        if self.final_bn:
            x = norm("output_norm", use_bias=False)(x)
        return x


class ClassifierHead(nn.Module):
    """Linear classifier (e.g. for linear evaluation of frozen features).

    Attributes:
        num_classes: number of output logits.
        use_bias: add a bias.
        logit_scale: a constant multiplying the logits (airbench: 1/9, which
            with label smoothing slows the last layer's saturation).
        torch_init: PyTorch's default ``Linear`` init (kernel and bias
            uniform with bound ``1 / sqrt(fan_in)``) instead of flax's LeCun
            normal kernel and zero bias.
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, features)``. Output: ``(batch, num_classes)`` logits in ``dtype``.
    """

    num_classes: int
    use_bias: bool = True
    logit_scale: float = 1.0
    torch_init: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        # No train-dependent behaviour; the argument keeps call sites uniform.
        del train
        _check_features("ClassifierHead", x)
        init = {}
        if self.torch_init:
            bound = 1.0 / x.shape[-1] ** 0.5

            def bias_init(key, shape, dtype=jnp.float32):
                return jax.random.uniform(key, shape, dtype, -bound, bound)

            init = {"kernel_init": torch_uniform_init, "bias_init": bias_init}
        logits = nn.Dense(self.num_classes, use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=self.param_dtype, name="logits",
                          **init)(jnp.asarray(x, self.dtype))
        if self.logit_scale != 1.0:
            logits = logits * jnp.asarray(self.logit_scale, self.dtype)
        return logits


class HashHead(nn.Module):
    """Linear map to ``num_bits`` codes: ``tanh(scale * z)`` when training, ``sign(z)`` at inference.

    ``sign`` has zero gradient almost everywhere, so training uses the HashNet
    continuation: ``tanh(scale * z)`` with ``scale`` growing over training (see
    ``hash_scale``) converges to ``sign(z)`` while staying differentiable. At
    inference the codes are exactly +-1 (``z == 0`` maps to +1 so no code is
    ever 0), and the Hamming distance between codes ``b1, b2`` is
    ``(num_bits - b1 @ b2) / 2``.

    Attributes:
        num_bits: code length K.
        dtype: computation dtype (also the output dtype).
        param_dtype: parameter dtype.

    Input: ``(batch, features)``; ``scale`` a scalar (Python float or traced array).
    Output: ``(batch, num_bits)`` in ``dtype``: values in (-1, 1) when ``train``,
    in {-1, +1} otherwise.
    """

    num_bits: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, scale: float | jax.Array = 1.0,
                 train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        _check_features("HashHead", x)
        z = nn.Dense(self.num_bits, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="codes")(jnp.asarray(x, self.dtype))
        if train:
            return jnp.tanh(jnp.asarray(scale, self.dtype) * z)
        return jnp.where(z >= 0, 1, -1).astype(self.dtype)


def hash_scale(step: int | jax.Array, *, initial: float = 1.0, growth: float = 0.005,
               power: float = 0.5, every: int = 1) -> jax.Array:
    """HashNet's continuation schedule ``initial * (1 + growth * step) ** power``.

    HashNet (Cao et al., 2017) uses ``growth=0.005``, ``power=0.5`` and updates
    the scale every 200 iterations (``every=200``); ``every=1`` grows it smoothly.
    Works on traced ``step`` values, so it can be called inside ``jit``.

    Args:
        step: current training step (scalar).
        initial: scale at step 0.
        growth: multiplier of ``step`` inside the power.
        power: exponent; 0.5 grows the scale like ``sqrt(step)``.
        every: hold the scale constant for this many steps (staircase).

    Returns:
        Scalar float32 scale, to pass as ``HashHead(...)(x, scale=..., train=True)``.
    """
    step = jnp.asarray(step, jnp.float32)
    if every > 1:
        step = jnp.floor(step / every) * every
    return initial * (1.0 + growth * step) ** power
