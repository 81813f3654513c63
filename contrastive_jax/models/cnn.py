"""Small convolutional encoder from the design documents, with the missing pooling added."""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax._checks import check_module_bools
from contrastive_jax.models.conv import select_conv

__all__ = ["FastCNN", "SmallCNN", "check_image_batch", "patch_whitening_kernel",
           "torch_dirac_init", "torch_uniform_init"]

Dtype = Any


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (64, 128 channels) with ReLU and 2x2 max-pooling, then a dense embedding.

    The design documents' version fed the second convolution straight into a
    dense layer sized for an 8x8x128 map, which a 32x32 input only reaches if
    its spatial size is halved twice. A 2x2 max-pool after each convolution does
    that: 32x32 -> 16x16 -> 8x8x128 (8192 features) -> ``Dense(embedding_dim)``.

    With the default ``pooling="flatten"`` other input sizes still work, because
    the dense layer infers its fan-in at initialisation: an 8x8 digits image
    becomes 2x2x128 = 512 features. ``pooling="global"`` averages the final map
    over space instead (128 features for any input size), so one set of
    parameters serves several resolutions, at the cost of discarding layout.
    Pooling pads with ``"SAME"`` so odd sizes (e.g. 7x7) round up rather than
    silently drop a border row.

    Attributes:
        embedding_dim: output width.
        features: channels of the convolutions, one pooled stage each.
        pooling: ``"flatten"`` (design documents) or ``"global"`` (spatial mean).
        cpu_kernel_grad: see ``ResNet`` (False for forward-mode autodiff).
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, height, width, channels)`` images, e.g. 32x32x3 or 8x8x1.
    Output: ``(batch, embedding_dim)`` in ``dtype``.
    """

    embedding_dim: int = 128
    features: Sequence[int] = (64, 128)
    pooling: str = "flatten"
    cpu_kernel_grad: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        # No BatchNorm here; `train` only keeps the call signature uniform.
        del train
        check_image_batch("SmallCNN", x)
        if self.pooling not in ("flatten", "global"):
            raise ValueError(f"pooling must be 'flatten' or 'global', got {self.pooling!r}")
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype,
                        conv_general_dilated=select_conv(self.cpu_kernel_grad),
                        param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            x = _max_pool_2x2(nn.relu(x))
        if self.pooling == "global":
            x = jnp.mean(x, axis=(1, 2))
        else:
            x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="embedding")(x)


def check_image_batch(model: str, x) -> None:
    """Refuses anything but ``(batch, H, W, C)``: flax would read one unbatched
    image as a batch of rows, and the model would return a wrong shape."""
    if jnp.ndim(x) != 4:
        raise ValueError(f"{model} expects (batch, height, width, channels) images,"
                         f" got shape {jnp.shape(x)}.")


def torch_uniform_init(key, shape, dtype=jnp.float32):
    """PyTorch's default ``Conv2d`` / ``Linear`` weight init, for HWIO / IO kernels.

    ``kaiming_uniform_(a=sqrt(5))`` is uniform on ``[-b, b]`` with
    ``b = 1 / sqrt(fan_in)``.
    """
    return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")(key, shape, dtype)


def torch_dirac_init(key, shape, dtype=jnp.float32):
    """:func:`torch_uniform_init`, then the first ``C_in`` filters set to the identity.

    airbench's ``dirac_(w[:C_in])``: output channel ``i < C_in`` of a fresh
    convolution copies input channel ``i`` (centre tap 1, all else 0), so
    each block starts close to passing its input through.
    """
    w = torch_uniform_init(key, shape, dtype)
    kh, kw, cin, cout = shape
    n = min(cin, cout)
    idx = jnp.arange(n)
    w = w.at[..., :n].set(0)
    return w.at[kh // 2, kw // 2, idx, idx].set(1)


def _max_pool_2x2(x: jax.Array, padding: str = "SAME") -> jax.Array:
    """2x2/2 max-pool; a reshape-max where the size is even.

    ``"SAME"`` rounds odd sizes up (pads); ``"VALID"`` rounds them down (drops
    the last row / column), as PyTorch's ``MaxPool2d(2)``. The reshape form's
    gradient is an elementwise select, about 2.5x faster on XLA:CPU than the
    select-and-scatter of ``nn.max_pool``'s gradient.
    """
    if padding == "VALID":
        x = x[:, :x.shape[1] // 2 * 2, :x.shape[2] // 2 * 2]
    b, h, w, c = x.shape
    if h % 2 or w % 2:
        return nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def patch_whitening_kernel(images: jax.Array, *, kernel_size: int = 2,
                           eps: float = 5e-4) -> jax.Array:
    """A convolution kernel that whitens ``kernel_size``-square patches of ``images``.

    airbench's first layer: the eigendecomposition ``V diag(l) V^T`` of the
    (uncentred) covariance of all ``k x k x C`` patches gives the filters
    ``V / sqrt(l + eps)`` and their negatives, so that after a GELU both signs
    of each whitened direction survive. The filters are a statistic of the
    data, not trained (``FastCNN(whiten_size=...)`` keeps them with the
    BatchNorm statistics).

    Examples:
        >>> x = jax.random.normal(jax.random.key(0), (16, 8, 8, 3))
        >>> patch_whitening_kernel(x, kernel_size=2).shape
        (2, 2, 3, 24)

    Args:
        images: ``[N, H, W, C]`` images, normalised as the network sees them.
        kernel_size: patch side ``k``.
        eps: added to the eigenvalues; keeps near-constant directions bounded.

    Returns:
        ``[k, k, C, 2 k^2 C]`` float32 kernel (HWIO), strongest direction first.

    References:
        Jordan, `94% on CIFAR-10 in 3.29 Seconds on a Single GPU
        <https://arxiv.org/abs/2404.00498>`_, 2024 (section 3.2).
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
    k = int(kernel_size)
    if k < 1 or k > min(images.shape[1:3]):
        raise ValueError(f"kernel_size must be in [1, {min(images.shape[1:3])}] for images"
                         f" of shape {images.shape}, got {kernel_size}.")
    c = images.shape[-1]
    hi = jax.lax.Precision.HIGHEST
    # Feature order of the patches is (C, kh, kw).
    patches = jax.lax.conv_general_dilated_patches(
        jnp.asarray(images, jnp.float32), (k, k), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=hi)
    p = patches.reshape(-1, c * k * k)
    cov = jnp.matmul(p.T, p, precision=hi) / p.shape[0]
    eigval, eigvec = jnp.linalg.eigh(cov)
    eigval, eigvec = eigval[::-1], eigvec[:, ::-1]
    w = eigvec / jnp.sqrt(jnp.maximum(eigval, 0.0) + eps)
    w = w.reshape(c, k, k, c * k * k).transpose(1, 2, 0, 3)
    return jnp.concatenate([w, -w], axis=-1)


class FastCNN(nn.Module):
    """A VGG-like CIFAR network after airbench (Jordan, 2024): fast to train to ~90%+.

    A 3x3 stem convolution, then three groups of ``conv -> max-pool -> BN ->
    GELU -> conv -> BN -> GELU`` (32 -> 16 -> 8 -> 4 pixels for a 32x32
    input), a final spatial max-pool and flatten. Pooling right after the
    first convolution of each group keeps most FLOPs at low resolution, which
    is what makes the network fast on CPUs as well as GPUs.

    ``whiten_size=k`` puts airbench's patch-whitening layer first: a ``k x k``
    convolution (``"SAME"`` padding, so sizes stay even) with
    ``patch_whitening_kernel`` filters computed from the images of the
    ``init`` call, then a trained bias and GELU. So initialise it on a batch
    of real, normalised training images (``training.loop.build`` passes a
    seeded random 1,024 of the split, ``config.model.whiten_init_images``).
    The kernel is kept in the ``batch_stats`` collection: it is a statistic
    of the data, checkpointed and averaged with the BatchNorm statistics and
    never touched by the optimizer.

    airbench96's network is ``FastCNN(widths=(128, 512, 512), stem_width=0,
    whiten_size=2, whiten_padding="VALID", convs_per_group=3,
    norm_scale=False, norm_epsilon=1e-12, torch_init=True,
    gelu_approximate=False)``: a third
    convolution per group, with a residual around the last two (``conv1 ->
    pool -> BN -> GELU`` gives ``x0``; then ``conv2 -> BN -> GELU -> conv3 ->
    BN``, plus ``x0``, then GELU), BatchNorm with its scale fixed at 1, and
    PyTorch's initialisation (below). With ``"VALID"`` whitening a 32x32 image
    goes 31 -> 15 -> 7 -> 3 (``"VALID"`` also makes the 2x2 pools round down,
    as PyTorch's), so the final global max-pool is airbench's
    ``MaxPool2d(3)``. Its lookahead and per-group learning rates live in the
    optimizer and train step (``experiments/configs/cifar10_gpu.py:airbench``).

    Attributes:
        widths: channels of the three groups (airbench94: 64, 256, 256).
        stem_width: channels of the stem convolution (0: no stem).
        whiten_size: patch side of the whitening layer (0: none); it has
            ``2 k^2 C`` output channels (24 for 2x2 RGB patches, as airbench).
        whiten_eps: ``eps`` of ``patch_whitening_kernel``.
        whiten_padding: ``"SAME"`` (sizes stay even) or ``"VALID"`` (airbench;
            the pools then round odd sizes down).
        convs_per_group: 2, or 3 for airbench96's residual pair.
        norm_scale: train the BatchNorm scales (airbench fixes them at 1).
        norm_epsilon: BatchNorm ``epsilon``.
        torch_init: PyTorch's default convolution init (uniform with bound
            ``1 / sqrt(fan_in)``, a third of flax's variance), with the first
            ``C_in`` filters of each convolution set to the identity (Dirac),
            as airbench does; otherwise flax's LeCun normal.
        gelu_approximate: flax's tanh approximation of GELU (default), or
            the exact erf form (PyTorch's ``nn.GELU()``, airbench's).
        bn_momentum: BatchNorm running-average momentum (flax convention).
        axis_name: mapped axis over which BatchNorm statistics are averaged.
        cpu_kernel_grad: see ``ResNet`` (False for forward-mode autodiff).
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, H, W, C)`` images. Output: ``(batch, widths[-1])`` features.

    References:
        Jordan, `94% on CIFAR-10 in 3.29 Seconds on a Single GPU
        <https://arxiv.org/abs/2404.00498>`_, 2024.
    """

    widths: Sequence[int] = (64, 256, 256)
    stem_width: int = 32
    whiten_size: int = 0
    whiten_eps: float = 5e-4
    whiten_padding: str = "SAME"
    convs_per_group: int = 2
    norm_scale: bool = True
    norm_epsilon: float = 1e-5
    torch_init: bool = False
    gelu_approximate: bool = True
    bn_momentum: float = 0.9
    axis_name: str | None = None
    cpu_kernel_grad: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        check_image_batch("FastCNN", x)
        if self.convs_per_group not in (2, 3):
            raise ValueError(f"convs_per_group must be 2 or 3, got {self.convs_per_group}.")
        if self.whiten_padding not in ("SAME", "VALID"):
            raise ValueError(
                f"whiten_padding must be 'SAME' or 'VALID', got {self.whiten_padding!r}.")
        init = {"kernel_init": torch_dirac_init} if self.torch_init else {}
        gelu = functools.partial(nn.gelu, approximate=self.gelu_approximate)
        conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding="SAME", use_bias=False,
                                 conv_general_dilated=select_conv(self.cpu_kernel_grad),
                                 dtype=self.dtype, param_dtype=self.param_dtype, **init)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                                 momentum=self.bn_momentum, epsilon=self.norm_epsilon,
                                 use_scale=self.norm_scale,
                                 axis_name=self.axis_name, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        if self.whiten_size:
            images = x
            kernel = self.variable(
                "batch_stats", "whiten_kernel",
                lambda: patch_whitening_kernel(images, kernel_size=self.whiten_size,
                                               eps=self.whiten_eps)).value
            bias = self.param("whiten_bias", nn.initializers.zeros, (kernel.shape[-1],),
                              self.param_dtype)
            # No gradient reaches the kernel or the images: the plain convolution.
            x = jax.lax.conv_general_dilated(
                jnp.asarray(x, self.dtype), jnp.asarray(kernel, self.dtype), (1, 1),
                self.whiten_padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
            x = gelu(x + jnp.asarray(bias, self.dtype))
        x = jnp.asarray(x, self.dtype)
        if self.stem_width:
            x = gelu(norm(name="stem_norm")(conv(self.stem_width, name="stem")(x)))
        for i, width in enumerate(self.widths):
            x = _max_pool_2x2(conv(width, name=f"group{i}_conv1")(x), self.whiten_padding)
            x = gelu(norm(name=f"group{i}_norm1")(x))
            x0 = x
            x = conv(width, name=f"group{i}_conv2")(x)
            x = norm(name=f"group{i}_norm2")(x)
            if self.convs_per_group == 3:
                x = gelu(x)
                x = conv(width, name=f"group{i}_conv3")(x)
                x = norm(name=f"group{i}_norm3")(x) + x0
            x = gelu(x)
        return jnp.max(x, axis=(1, 2))
