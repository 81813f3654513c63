"""Trains and evaluates a contrastive model; resumes from its workdir.

    python -m experiments.train                       # digits, ~1 min on CPU
    python -m experiments.train --config=experiments/configs/simclr_cifar10.py \
        --workdir=/tmp/simclr --config.batch_size=512
    python -m experiments.train --config=experiments/configs/simclr_cifar10.py:runlocal

Several processes (one per host; SLURM, Open MPI and TPU pods are detected):

    python -m experiments.train --coordinator_address=10.0.0.1:1234 \
        --num_processes=2 --process_id=0    # and --process_id=1 on the other

Run the same command again to resume from the latest checkpoint. The logic is
in ``contrastive_jax.training.train_and_evaluate``; this file only reads flags.
"""

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                               "configs", "digits.py")

_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Training config file (get_config()).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None,
    "Checkpoints, TensorBoard events and results.json; default"
    " ./workdirs/<config name>.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "host:port of process 0, to initialise jax.distributed explicitly.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Process count.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _default_workdir() -> str:
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  name = os.path.splitext(os.path.basename(path))[0]
  arg = flags.FLAGS["config"].config_filename  # may carry ":runlocal"
  if ":" in arg:
    name += "_" + arg.split(":", 1)[1].replace(",", "_")
  return os.path.join("workdirs", name)


class _QuietOrbax:
  """Drops orbax's per-save INFO lines; its warnings and errors still show."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.get_absl_handler().addFilter(_QuietOrbax())
  config = _CONFIG.value
  if _COORDINATOR.value:
    with config.unlocked():
      config.distributed.mode = "on"
      config.distributed.coordinator_address = _COORDINATOR.value
      config.distributed.num_processes = _NUM_PROCESSES.value
      config.distributed.process_id = _PROCESS_ID.value
  # Must run before anything else touches JAX's backend.
  from contrastive_jax import training  # pylint: disable=g-import-not-at-top
  training.maybe_initialize(config.distributed)
  workdir = _WORKDIR.value or _default_workdir()
  logging.info("workdir: %s", os.path.abspath(workdir))
  results = training.train_and_evaluate(config, workdir)
  print(json.dumps({k: v for k, v in results.items()
                    if isinstance(v, (int, float, str))}, indent=2))
  for key in ("knn_top1", "linear_probe_top1"):
    if key in results:
      print(f"{key}: {results[key]:.4f}")


if __name__ == "__main__":
  app.run(main)
