"""Evaluates the latest checkpoint of a training workdir.

    python -m experiments.evaluate --workdir=workdirs/digits
    python -m experiments.evaluate --workdir=/tmp/simclr --split=test \
        --data_dir=../shared/data
    python -m experiments.evaluate --workdir=/tmp/triplet_ce --tta_flip
    python -m experiments.evaluate --workdir=/tmp/triplet_ce --tta_flip \
        --tta_translate   # airbench94's test-time augmentation
    python -m experiments.evaluate --workdir=/tmp/ema_run --online_weights

Queries come from --split, references (kNN, linear-probe training, hash
database) from the training split. Reports weighted kNN (k = 20, 200) and
linear-probe top-1/top-5 of the backbone features, accuracy / macro recall /
macro F1 / per-class metrics / confusion matrix of the probe's predictions,
retrieval metrics (precision@1, R-precision, MAP@R, recall@1/2/4/8, NMI, AMI)
and, for hashing models, Hamming-ranking mAP and bit balance. A run trained
with ``ema_decay > 0`` is evaluated with its weight average unless
--online_weights. Writes
``<workdir>/eval/<split>.json`` and prints a summary. The logic is in
``contrastive_jax.evaluation.report``; this file only reads flags.
"""

import sys

from absl import app
from absl import flags

from experiments import _workdir_flags as wf  # before scikit-learn loads

_TTA_FLIP = flags.DEFINE_bool(
    "tta_flip", False,
    "Average each image's outputs with its mirror image's (test-time"
    " augmentation; for models trained with flips). Writes"
    " <split>_tta_flip.json.")
_TTA_TRANSLATE = flags.DEFINE_bool(
    "tta_translate", False,
    "Average each image's outputs (0.5) with those of its two one-pixel"
    " translations (0.25 each; with --tta_flip, airbench94's test-time"
    " augmentation). Writes <split>_tta[_flip]_translate.json.")
_ONLINE = flags.DEFINE_bool(
    "online_weights", False,
    "For a run that kept a weight average (ema_decay > 0): evaluate its"
    " trained (online) weights instead of the average. Writes"
    " <split>_online.json.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  wf.quiet_logging()
  from contrastive_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  try:
    result = report.evaluate_workdir(wf.WORKDIR.value, wf.SPLIT.value,
                                     data_dir=wf.DATA_DIR.value,
                                     tta_flip=_TTA_FLIP.value,
                                     tta_translate=_TTA_TRANSLATE.value,
                                     online=_ONLINE.value)
  except report.EvaluationError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(report.format_table(result))
  path = report.eval_path(wf.WORKDIR.value, wf.SPLIT.value,
                          tta_flip=_TTA_FLIP.value,
                          tta_translate=_TTA_TRANSLATE.value,
                          online=_ONLINE.value)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  app.run(main)
