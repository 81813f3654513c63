"""Training: data-parallel optax step, orbax checkpoints, the main loop.

* ``train_and_evaluate(config, workdir)``: the whole resumable run (``loop``).
* ``make_train_step``: the jitted ``shard_map`` update (``step``).
* ``TrainState`` / ``create_train_state`` (``state``).
* ``Checkpointer`` and its guards (``checkpoint``).
* ``build_model`` / ``get_loss``: config names -> modules and losses
  (``registry``); ``make_optimizer`` / ``make_schedule`` (``optim``).

Library code takes everything as arguments; ``experiments/train.py`` is the
absl main that reads the flags.
"""

from contrastive_jax.training.checkpoint import Checkpointer
from contrastive_jax.training.checkpoint import IncompatibleCheckpointError
from contrastive_jax.training.distributed import maybe_initialize
from contrastive_jax.training.loop import NonFiniteLossError
from contrastive_jax.training.loop import evaluate
from contrastive_jax.training.loop import make_mesh
from contrastive_jax.training.loop import train_and_evaluate
from contrastive_jax.training.optim import make_optimizer
from contrastive_jax.training.optim import make_schedule
from contrastive_jax.training.registry import ContrastiveModel
from contrastive_jax.training.registry import build_model
from contrastive_jax.training.registry import get_loss
from contrastive_jax.training.state import TrainState
from contrastive_jax.training.state import create_train_state
from contrastive_jax.training.step import RetraceError
from contrastive_jax.training.step import make_train_step

__all__ = [
    "Checkpointer",
    "ContrastiveModel",
    "IncompatibleCheckpointError",
    "NonFiniteLossError",
    "RetraceError",
    "TrainState",
    "build_model",
    "create_train_state",
    "evaluate",
    "get_loss",
    "make_mesh",
    "make_optimizer",
    "make_schedule",
    "make_train_step",
    "maybe_initialize",
    "train_and_evaluate",
]
