"""Figures of a training workdir, written to ``<workdir>/plots/``.

    python -m experiments.visualize --workdir=workdirs/digits

* ``tsne_<split>.png``: t-SNE of the --split backbone features coloured by
  class (``tsne_<split>_embedding.png``: of the loss embedding, if any);
* ``curves.png``: loss, accuracy and learning rate from ``metrics.jsonl``;
* ``confusion_<split>.png``: confusion matrix of the linear probe;
* ``neighbors_<split>.png``: queries with their 8 nearest training images
  (wrong ones framed in red).

Uses the latest checkpoint; the confusion matrix is taken from
``eval/<split>.json`` when ``experiments.evaluate`` wrote it for the same
checkpoint. The logic is in ``contrastive_jax.evaluation.report``.
"""

import sys

from absl import app
from absl import flags

from experiments import _workdir_flags as wf  # before scikit-learn loads

_NUM_QUERIES = flags.DEFINE_integer("num_queries", 10,
                                    "Rows of the nearest-neighbour grid.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  wf.quiet_logging()
  from contrastive_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  try:
    paths = report.plot_workdir(wf.WORKDIR.value, wf.SPLIT.value,
                                data_dir=wf.DATA_DIR.value,
                                num_queries=_NUM_QUERIES.value)
  except report.EvaluationError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for path in paths.values():
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  app.run(main)
