"""CIFAR-style ResNet backbones (ResNet-18/34/50) returning pooled features, no classifier."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax._checks import check_module_bools
from contrastive_jax.models.cnn import check_image_batch
from contrastive_jax.models.cnn import torch_uniform_init
from contrastive_jax.models.conv import select_conv
from contrastive_jax.models.norm import batch_norm_act

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet34", "ResNet50"]

Dtype = Any

# He (Kaiming) normal with fan_out, as torchvision's ResNet initialises its
# convolutions; keeps parity with solo-learn / lightly reference runs.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv(module: nn.Module) -> functools.partial:
    """Bias-free ``nn.Conv`` factory from ``module``'s dtypes and ``torch_init``."""
    init = torch_uniform_init if module.torch_init else _conv_init
    return functools.partial(nn.Conv, use_bias=False, kernel_init=init,
                             conv_general_dilated=select_conv(module.cpu_kernel_grad),
                             dtype=module.dtype, param_dtype=module.param_dtype)


def _norm(train: bool, module: nn.Module) -> functools.partial:
    """BatchNorm(+ residual)(+ ReLU) factory from ``module``'s attributes.

    Epsilon 1e-5 as in PyTorch, optional cross-device sync axis; ReLU on
    unless ``relu=False`` is passed.
    """
    return functools.partial(batch_norm_act, backward=module.norm_backward,
                             use_running_average=not train, momentum=module.bn_momentum,
                             epsilon=1e-5, axis_name=module.axis_name, dtype=module.dtype,
                             param_dtype=module.param_dtype)


def _last_scale_init(zero: bool) -> nn.initializers.Initializer:
    return nn.initializers.zeros if zero else nn.initializers.ones


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1 projection) shortcut; expansion 1.

    Attributes:
        features: output channels.
        strides: spatial stride of the first convolution (and of the shortcut).
        axis_name: mapped axis over which BatchNorm statistics are averaged.
        bn_momentum: BatchNorm running-average momentum (flax convention).
        zero_init_residual: start the last BN scale of the block at zero, so the
            block is initially the identity (Goyal et al., 2017).
        norm_backward: backward pass of each BatchNorm (+ add) + ReLU:
            ``"autodiff"``, ``"remat"`` or ``"custom"`` (``models.norm``).
        torch_init: PyTorch's default convolution init (``torch_uniform_init``)
            instead of He normal with fan-out.
        cpu_kernel_grad: see ``ResNet``.
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, H, W, C)``. Output: ``(batch, H/strides, W/strides, features)``.
    """

    features: int
    strides: int = 1
    axis_name: str | None = None
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    norm_backward: str = "autodiff"
    torch_init: bool = False
    cpu_kernel_grad: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        conv = _conv(self)
        norm = _norm(train, self)
        s = (self.strides, self.strides)
        y = conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = norm(name="norm1")(y)
        y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        if x.shape[-1] != self.features or self.strides != 1:
            x = conv(self.features, (1, 1), s, name="shortcut_conv")(x)
            x = norm(relu=False, name="shortcut_norm")(x)
        return norm(scale_init=_last_scale_init(self.zero_init_residual), name="norm2")(y, x)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4) with a projection shortcut; stride on the 3x3 (ResNet v1.5).

    Attributes:
        features: bottleneck width; the block outputs ``4 * features`` channels.
        strides: spatial stride of the 3x3 convolution (and of the shortcut).
        axis_name: mapped axis over which BatchNorm statistics are averaged.
        bn_momentum: BatchNorm running-average momentum (flax convention).
        zero_init_residual: start the last BN scale of the block at zero.
        norm_backward: ``"autodiff"``, ``"remat"`` or ``"custom"`` (``models.norm``).
        torch_init: PyTorch's default convolution init instead of He normal.
        cpu_kernel_grad: see ``ResNet``.
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, H, W, C)``. Output: ``(batch, H/strides, W/strides, 4 * features)``.
    """

    features: int
    strides: int = 1
    axis_name: str | None = None
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    norm_backward: str = "autodiff"
    torch_init: bool = False
    cpu_kernel_grad: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        conv = _conv(self)
        norm = _norm(train, self)
        out = self.features * self.expansion
        s = (self.strides, self.strides)
        y = conv(self.features, (1, 1), name="conv1")(x)
        y = norm(name="norm1")(y)
        y = conv(self.features, (3, 3), s, padding=((1, 1), (1, 1)), name="conv2")(y)
        y = norm(name="norm2")(y)
        y = conv(out, (1, 1), name="conv3")(y)
        if x.shape[-1] != out or self.strides != 1:
            x = conv(out, (1, 1), s, name="shortcut_conv")(x)
            x = norm(relu=False, name="shortcut_norm")(x)
        return norm(scale_init=_last_scale_init(self.zero_init_residual), name="norm3")(y, x)


class ResNet(nn.Module):
    """ResNet backbone with a CIFAR stem, returning globally average-pooled features.

    The CIFAR stem (3x3 convolution, stride 1, no max-pool) replaces ImageNet's
    7x7/stride-2 convolution and max-pool, which would shrink a 32x32 image to
    8x8 before the first stage; this matches the solo-learn and lightly CIFAR
    backbones. ``stem="imagenet"`` restores the original stem for larger images.
    Stages have ``num_filters * (1, 2, 4, 8)`` base widths; all but the first
    halve the resolution.

    Attributes:
        stage_sizes: number of blocks in each stage.
        block_cls: ``BasicBlock`` or ``Bottleneck``.
        num_filters: base width of the first stage (64 in the paper).
        stem: ``"cifar"`` or ``"imagenet"``.
        axis_name: mapped axis (``pmap``/``shard_map``/``vmap``) over which
            BatchNorm statistics are averaged, for SimCLR-style global BN.
        bn_momentum: BatchNorm running-average momentum in the flax convention
            (0.9 == PyTorch's ``momentum=0.1``).
        zero_init_residual: start each block's last BN scale at zero.
        norm_backward: backward pass of each BatchNorm (+ residual add) +
            ReLU: ``"autodiff"``, or ``"remat"`` / ``"custom"``, which keep
            only bfloat16 activations instead of float32 intermediates: the
            same function with fewer bytes moved, for memory-bound
            accelerator steps (``contrastive_jax.models.norm``).
        torch_init: PyTorch's default ``Conv2d`` init (uniform, bound
            ``1 / sqrt(fan_in)``; ``models.cnn.torch_uniform_init``), as in
            PyTorch CIFAR code that leaves the init alone (kuangliu's
            pytorch-cifar), instead of torchvision's He normal with fan-out.
        cpu_kernel_grad: the convolutions of ``models.conv``, whose kernel
            gradient is 3-4x faster on XLA:CPU (elsewhere the standard one);
            they support reverse mode only. False: ``lax.conv_general_dilated``,
            for ``jax.jvp`` / ``jacfwd`` / ``jax.hessian``.
        dtype: computation dtype (e.g. ``jnp.bfloat16``); BN statistics are still
            reduced in float32.
        param_dtype: parameter dtype.

    Input: ``(batch, H, W, C)`` images (32x32x3 for CIFAR; any size works).
    Output: ``(batch, 8 * num_filters * block_cls.expansion)`` features in
    ``dtype``: 512 for ResNet-18/34 and 2048 for ResNet-50 at ``num_filters=64``.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock
    num_filters: int = 64
    stem: str = "cifar"
    axis_name: str | None = None
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    norm_backward: str = "autodiff"
    torch_init: bool = False
    cpu_kernel_grad: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @property
    def feature_dim(self) -> int:
        """Width of the pooled output: ``num_filters * 2**(len(stage_sizes)-1) * expansion``."""
        return self.num_filters * 2 ** (len(self.stage_sizes) - 1) * self.block_cls.expansion

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        check_image_batch("ResNet", x)
        x = jnp.asarray(x, self.dtype)
        conv = _conv(self)
        if self.stem == "cifar":
            x = conv(self.num_filters, (3, 3), padding=((1, 1), (1, 1)), name="stem_conv")(x)
        elif self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
        else:
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {self.stem!r}")
        x = _norm(train, self)(name="stem_norm")(x)
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                x = self.block_cls(
                    features=self.num_filters * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    axis_name=self.axis_name,
                    bn_momentum=self.bn_momentum,
                    zero_init_residual=self.zero_init_residual,
                    norm_backward=self.norm_backward,
                    torch_init=self.torch_init,
                    cpu_kernel_grad=self.cpu_kernel_grad,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"stage{i + 1}_block{j + 1}",
                )(x, train=train)
        return jnp.mean(x, axis=(1, 2))


class ResNet18(ResNet):
    """CIFAR ResNet-18 backbone (BasicBlock, [2, 2, 2, 2]); 512-d output, ~11.17 M parameters.

    See ``ResNet`` for attributes and shapes.
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock


class ResNet34(ResNet):
    """CIFAR ResNet-34 backbone (BasicBlock, [3, 4, 6, 3]); 512-d output, ~21.28 M parameters.

    See ``ResNet`` for attributes and shapes.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block_cls: type[nn.Module] = BasicBlock


class ResNet50(ResNet):
    """CIFAR ResNet-50 backbone (Bottleneck, [3, 4, 6, 3]); 2048-d output, ~23.50 M parameters.

    See ``ResNet`` for attributes and shapes.
    """

    stage_sizes: Sequence[int] = (3, 4, 6, 3)
    block_cls: type[nn.Module] = Bottleneck
