"""Small convolutional encoder from the design documents, with the missing pooling added."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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
        dtype: computation dtype.
        param_dtype: parameter dtype.

    Input: ``(batch, height, width, channels)`` images, e.g. 32x32x3 or 8x8x1.
    Output: ``(batch, embedding_dim)`` in ``dtype``.
    """

    embedding_dim: int = 128
    features: Sequence[int] = (64, 128)
    pooling: str = "flatten"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        # No BatchNorm here; `train` only keeps the call signature uniform.
        del train
        if self.pooling not in ("flatten", "global"):
            raise ValueError(f"pooling must be 'flatten' or 'global', got {self.pooling!r}")
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.features):
            x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"conv_{i}")(x)
            x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        if self.pooling == "global":
            x = jnp.mean(x, axis=(1, 2))
        else:
            x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.embedding_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                        name="embedding")(x)
