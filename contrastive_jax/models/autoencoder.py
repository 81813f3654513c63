"""Convolutional autoencoder whose bottleneck vector is the embedding, plus its MSE loss."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax._checks import check_module_bools

__all__ = ["ConvAutoencoder", "reconstruction_loss"]

Dtype = Any


class ConvAutoencoder(nn.Module):
    """Strided-conv encoder to a ``embedding_dim`` bottleneck and a transposed-conv decoder.

    Encoder: per entry of ``features`` a 3x3 stride-2 convolution with ReLU,
    then flatten and ``Dense(embedding_dim)``. Decoder mirrors it: ``Dense`` back
    to the smallest feature map, then 4x4 stride-2 transposed convolutions with
    ReLU, the last one producing ``image_shape[-1]`` channels. The 4x4 kernel
    is a multiple of the stride, which avoids the checkerboard artefacts of
    3x3/stride-2 transposed convolutions (Odena et al., 2016).

    The decoder has to know the output size before it sees an image, so the
    image shape is an attribute; ``height`` and ``width`` must be divisible by
    ``2 ** len(features)`` (32x32 -> 8x8, 8x8 -> 2x2 with the defaults).

    Use ``model.apply(variables, x, method="encode")`` for embeddings only and
    ``method="decode"`` to map embeddings back to images.

    Attributes:
        image_shape: ``(height, width, channels)`` of inputs and reconstructions.
        embedding_dim: bottleneck (embedding) width.
        features: encoder channels per downsampling stage (reversed in the decoder).
        output_activation: applied to the reconstruction, e.g. ``nn.sigmoid``
            for images in [0, 1]; ``None`` (identity) suits standardised images.
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, *image_shape)``.
    Output of ``__call__``: ``(embedding, reconstruction)`` with shapes
    ``(batch, embedding_dim)`` and ``(batch, *image_shape)``, in ``dtype``.
    """

    image_shape: Sequence[int] = (32, 32, 3)
    embedding_dim: int = 128
    features: Sequence[int] = (32, 64)
    output_activation: Callable[[jax.Array], jax.Array] | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self) -> None:
        if not self.features:
            raise ValueError("features must name at least one encoder stage, got ().")
        height, width, _ = self.image_shape
        factor = 2 ** len(self.features)
        if height % factor or width % factor:
            raise ValueError(f"image height/width {height}x{width} must be divisible by {factor}")
        self._bottleneck_hw = (height // factor, width // factor)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.enc_convs = [nn.Conv(f, (3, 3), (2, 2), padding="SAME", **kw) for f in self.features]
        self.enc_dense = nn.Dense(self.embedding_dim, **kw)
        h, w = self._bottleneck_hw
        self.dec_dense = nn.Dense(h * w * self.features[-1], **kw)
        # Each transposed conv doubles the size and outputs the channels of the
        # encoder stage before it; the last one restores the image channels.
        out_channels = list(self.features[-2::-1]) + [self.image_shape[-1]]
        self.dec_convs = [nn.ConvTranspose(f, (4, 4), (2, 2), padding="SAME", **kw)
                          for f in out_channels]

    def encode(self, x: jax.Array) -> jax.Array:
        """Images ``(batch, *image_shape)`` -> embeddings ``(batch, embedding_dim)``."""
        # Fail loudly: other sizes would still encode, but the decoder could not
        # reproduce them, and the loss would then compare mismatched shapes.
        if tuple(x.shape[1:]) != tuple(self.image_shape):
            raise ValueError(f"input shape {x.shape[1:]} does not match image_shape "
                             f"{tuple(self.image_shape)}")
        x = jnp.asarray(x, self.dtype)
        for conv in self.enc_convs:
            x = nn.relu(conv(x))
        return self.enc_dense(x.reshape((x.shape[0], -1)))

    def decode(self, z: jax.Array) -> jax.Array:
        """Embeddings ``(batch, embedding_dim)`` -> reconstructions ``(batch, *image_shape)``."""
        h, w = self._bottleneck_hw
        x = nn.relu(self.dec_dense(jnp.asarray(z, self.dtype)))
        x = x.reshape((z.shape[0], h, w, self.features[-1]))
        for i, conv in enumerate(self.dec_convs):
            x = conv(x)
            if i < len(self.dec_convs) - 1:
                x = nn.relu(x)
        if self.output_activation is not None:
            x = self.output_activation(x)
        return x

    def __call__(self, x: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        check_module_bools(self, train=train)
        # No BatchNorm or dropout; `train` only keeps the call signature uniform.
        del train
        z = self.encode(x)
        return z, self.decode(z)


def reconstruction_loss(reconstruction: jax.Array, images: jax.Array) -> jax.Array:
    """Mean squared error over all pixels, channels and examples.

    Computed in float32 so a bfloat16 reconstruction does not lose precision in
    the reduction.

    Args:
        reconstruction: ``(batch, H, W, C)`` decoder output.
        images: ``(batch, H, W, C)`` targets, same shape.

    Returns:
        Scalar float32 loss.
    """
    if reconstruction.shape != images.shape:
        raise ValueError(f"shape mismatch: {reconstruction.shape} vs {images.shape}")
    diff = jnp.asarray(reconstruction, jnp.float32) - jnp.asarray(images, jnp.float32)
    return jnp.mean(jnp.square(diff))
