"""Multi-layer perceptron encoder for vector (or flattened image) inputs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax._checks import check_module_bools

__all__ = ["MLP"]

Dtype = Any


class MLP(nn.Module):
    """Fully connected encoder: ``Dense -> activation`` per hidden width, then a linear output.

    Attributes:
        hidden_dims: widths of the hidden layers, in order.
        output_dim: width of the final (embedding) layer.
        activation: elementwise non-linearity applied after each hidden layer.
        activate_final: also apply ``activation`` to the output. Off by default
            because embeddings fed to a contrastive loss should be free to take
            negative values.
        flatten_input: reshape inputs to ``(batch, -1)`` first, so images such
            as the 8x8 digits can be fed directly.
        dtype: computation dtype (e.g. ``jnp.bfloat16``).
        param_dtype: parameter dtype; kept at float32 for stable optimisation.

    Input: ``(batch, features)``, or ``(batch, ...)`` when ``flatten_input``.
    Output: ``(batch, output_dim)`` in ``dtype``.
    """

    hidden_dims: Sequence[int] = (128, 64)
    output_dim: int = 32
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    activate_final: bool = False
    flatten_input: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def small(cls, output_dim: int = 32, **kwargs: Any) -> MLP:
        """The design documents' example encoder: ``128 -> 64 -> output_dim`` with ReLU."""
        return cls(hidden_dims=(128, 64), output_dim=output_dim, **kwargs)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        check_module_bools(self, train=train)
        # `train` is accepted (and unused) so the training loop can call every
        # encoder in this package the same way.
        del train
        if jnp.ndim(x) < 2:
            raise ValueError(f"MLP expects (batch, features...) inputs, got shape {jnp.shape(x)}.")
        if self.flatten_input:
            x = x.reshape((x.shape[0], -1))
        x = jnp.asarray(x, self.dtype)
        for i, width in enumerate(self.hidden_dims):
            x = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype, name=f"hidden_{i}")(x)
            x = self.activation(x)
        x = nn.Dense(self.output_dim, dtype=self.dtype, param_dtype=self.param_dtype, name="output")(x)
        if self.activate_final:
            x = self.activation(x)
        return x
