r"""Which validation images a run's weighted kNN gets wrong, for several k.

For each workdir: the validation (or ``--split=tune``) errors and their
indices at each k, and the leave-one-out top-1 of the training split at
each k (each training image classified by the others). RESULTS.md's digits
error analysis (2026-11-30, twentieth session) comes from

    python -m experiments.knn_errors --workdirs=/tmp/seeds/supcon_s5,/tmp/seeds/supcon_s9

with the workdirs of ``python -m experiments.train --config.seed=S
--workdir=DIR``, and the tune-split choice of k (twenty-first session) from
``--split=tune`` on runs trained with ``--config.data.tune=True``. The last
two lines sum the errors over the runs at each k, and count how many runs
got each index wrong at ``--k_wrong``.
"""

from __future__ import annotations

import collections
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Training workdirs.",
                              required=True)
_KS = flags.DEFINE_list("ks", ["1", "5", "10", "20"], "Neighbour counts.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.07, "Vote temperature (the configs' eval.knn_temperature).")
_SPLIT = flags.DEFINE_string(
    "split", "validation", "Query split: 'validation', or 'tune' (the"
    " model-selection split of runs trained with --config.data.tune).")
_K_WRONG = flags.DEFINE_integer(
    "k_wrong", 10, "The k whose wrong indices are listed and counted.")


def knn_errors(prepared, *, ks: Sequence[int], temperature: float) -> dict:
  """``{"wrong": {k: [indices]}, "num_queries": int, "loo_train_top1": {k:
  float}}`` of a run.

  ``prepared``: :func:`contrastive_jax.evaluation.report.prepare`'s result;
  kNN on its ``features``, its reference split (the run's training split)
  as references.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from contrastive_jax import evaluation  # pylint: disable=g-import-not-at-top
  train, labels = prepared.train["features"], prepared.train_labels
  kw = dict(temperature=temperature, num_classes=prepared.num_classes)
  wrong = {}
  for k in ks:
    pred = evaluation.knn_classify(prepared.query["features"], train, labels,
                                   k=k, **kw)
    wrong[k] = np.nonzero(pred != prepared.query_labels)[0].tolist()
  loo = evaluation.knn_accuracy(train, labels, train, labels, ks=ks,
                                exclude_self=True, **kw)
  return {"wrong": wrong, "num_queries": int(prepared.query_labels.shape[0]),
          "loo_train_top1": {k: loo[f"top1_k{k}"] for k in ks}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore
  from contrastive_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  ks = [int(k) for k in _KS.value]
  k_wrong = _K_WRONG.value
  if k_wrong not in ks:
    ks.append(k_wrong)
  counts = collections.Counter()
  totals = collections.Counter()
  queries = 0
  for workdir in _WORKDIRS.value:
    try:
      out = knn_errors(report.prepare(workdir, _SPLIT.value), ks=ks,
                       temperature=_TEMPERATURE.value)
    except report.EvaluationError as e:
      print(f"error: {e}", file=sys.stderr)
      return 1
    counts.update(out["wrong"][k_wrong])
    totals.update({k: len(out["wrong"][k]) for k in ks})
    queries += out["num_queries"]
    print(f"{workdir}: errors at k = {ks}:"
          f" {[len(out['wrong'][k]) for k in ks]}; wrong at k = {k_wrong}:"
          f" {out['wrong'][k_wrong]}; leave-one-out training top-1:"
          f" {[round(100 * out['loo_train_top1'][k], 2) for k in ks]}")
  print(f"errors summed over the runs at k = {ks}: {[totals[k] for k in ks]}"
        f" of {queries} queries, i.e. top-1"
        f" {[round(100 * (1 - totals[k] / queries), 2) for k in ks]}")
  print(f"runs wrong per index at k = {k_wrong}:", counts.most_common())
  return 0


if __name__ == "__main__":
  app.run(main)
