"""The training state: everything a resumed run needs to continue exactly.

``TrainState`` is a pytree of arrays only (no functions), so orbax can save
and restore it as is, and the jitted step can donate it. The model and the
optimizer live outside it, in the step closure.
"""

from __future__ import annotations

from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax import losses

__all__ = ["TrainState", "create_train_state", "abstract_state"]


@flax.struct.dataclass
class TrainState:
  """Params, BatchNorm statistics, optimizer state, memory, RNG and step.

  Attributes:
    step: int32 scalar; also the data position (batch ``step`` is next).
    params: model parameters (float32).
    batch_stats: BatchNorm running statistics (``{}`` without BatchNorm).
    opt_state: optax state.
    rng: uint32 key data (``jax.random.key_data``) of the run's base key;
      step ``s`` uses ``fold_in(key, s)``, so no key is carried forward.
    memory: cross-batch memory (``losses.CrossBatchMemory``), or ``{}``.
    ema: ``{"params", "batch_stats"}``, the exponential moving average of
      the weights when ``config.ema_decay > 0``, or lookahead's slow
      weights when ``config.lookahead_period > 0`` (either is evaluated
      instead of the online weights), or ``{}``.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  memory: Any
  ema: Any = flax.struct.field(default_factory=dict)


def create_train_state(model, tx: optax.GradientTransformation, *,
                       sample_input: np.ndarray, key: jax.Array,
                       memory_size: int = 0, memory_dim: int | None = None,
                       ema: bool = False) -> TrainState:
  """Initialises parameters on ``sample_input`` (a batch of one is enough).

  ``ema``: also keep an average of the weights, starting from the initial
  ones (``TrainState.ema``).
  """
  init_key, run_key = jax.random.split(key)
  variables = jax.jit(lambda k, x: model.init(k, x, train=False))(
      init_key, jnp.asarray(sample_input))
  params = variables["params"]
  batch_stats = variables.get("batch_stats", {})
  memory = {}
  if memory_size:
    memory = losses.create_memory(memory_size, memory_dim)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=batch_stats, opt_state=tx.init(params),
                    rng=jax.random.key_data(run_key), memory=memory,
                    # A copy: the step donates the state, and one buffer
                    # cannot be donated twice.
                    ema=(jax.tree.map(jnp.copy, {"params": params,
                                                 "batch_stats": batch_stats})
                         if ema else {}))


def abstract_state(state: TrainState) -> TrainState:
  """Shape/dtype/sharding skeleton of ``state`` (the restore target)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                     sharding=getattr(x, "sharding", None)),
      state)
