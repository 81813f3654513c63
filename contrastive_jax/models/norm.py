"""BatchNorm fused with the residual add and ReLU, optionally recomputed in the backward pass.

A CIFAR ResNet step on a GPU spends about 40% of its time in memory-bound
BatchNorm / ReLU / residual passes (H200 profile, ``experiments/RESULTS.md``).
Under plain autodiff, ``relu(batch_norm(y) + r)`` in bfloat16 saves per
element a float32 ``y - mean``, a float32 square, a bfloat16 copy and a
boolean mask for the backward pass: about 11 bytes written in the forward
pass and read again in the backward one. With ``remat=True`` only the
bfloat16 input ``y`` (2 bytes, which the convolution's gradient reads anyway)
is kept, and the normalisation, add and mask are recomputed inside the
backward fusions. In float32 the values, gradients and ``batch_stats`` are
the same to the bit; in bfloat16 the recomputation rounds at other points,
with the same error against float32 (``tests/test_models.py``). The
variables keep ``nn.BatchNorm``'s names and layout, so checkpoints load
either way.
"""

from __future__ import annotations

import flax.linen as nn
import jax

__all__ = ["BatchNormAct", "batch_norm_act"]


class BatchNormAct(nn.BatchNorm):
  """``nn.BatchNorm``, then ``+ residual`` if one is given, then ReLU if ``relu``.

  Attributes:
    relu: apply ReLU to the output.
    (Every ``nn.BatchNorm`` attribute.)

  Input: ``x [..., C]`` and optionally ``residual`` of the same shape.
  Output: the same shape, in ``dtype``.
  """

  relu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array,
               residual: jax.Array | None = None) -> jax.Array:
    # ``use_running_average`` is an attribute only: under ``nn.remat`` a call
    # argument would be traced, and BatchNorm branches on it in Python.
    y = super().__call__(x)
    if residual is not None:
      y = y + residual
    return nn.relu(y) if self.relu else y


def batch_norm_act(*, remat: bool = False, **kwargs) -> BatchNormAct:
  """A ``BatchNormAct`` (``kwargs`` are its attributes); with ``remat``, checkpointed.

  ``remat=True`` wraps it in ``nn.remat`` with no saved intermediates: the
  backward pass recomputes the normalisation from the saved input, trading a
  few elementwise FLOPs for fewer bytes moved (see the module docstring).
  """
  cls = nn.remat(BatchNormAct) if remat else BatchNormAct
  return cls(**kwargs)
