"""Flags and process settings shared by the workdir tools (evaluate, visualize).

Import it before anything that loads scikit-learn: it sets OpenMP's wait
policy, because spinning OpenMP workers make t-SNE and k-means 5-10x slower
on a CPU shared with other jobs (a performance setting only).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging  # pylint: disable=g-import-not-at-top,wrong-import-position

WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir.",
                              required=True)
SPLIT = flags.DEFINE_string("split", "validation",
                            "Query split: 'validation', 'test' or 'tune' (the"
                            " model-selection split; references 'tune_train').")
DATA_DIR = flags.DEFINE_string(
    "data_dir", None, "Where the images are; default: the run's data_dir.")


def quiet_logging() -> None:
  """WARNING level unless --verbosity was given: orbax logs every restore."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
