"""Reports of a training workdir (``experiments.evaluate`` / ``.visualize``).

* ``load_run(workdir)``: the run's config (``config.json``) and model, and the
  latest readable checkpoint's variables.
* ``prepare(workdir, split)``: ``load_run`` plus the outputs of the model
  (backbone features, loss embedding, hash codes, heads) on the training split
  (the references) and on ``split`` (the queries).
* ``compute_metrics(...)``: weighted kNN (k = 20, 200), the linear probe and
  the classification metrics of its predictions, retrieval metrics, hash mAP
  and bit balance, as one JSON-serialisable dict.
* ``evaluate_workdir(workdir, split)``: all of it, written to
  ``workdir/eval/<split>.json``; ``format_table`` prints its summary.
* ``plot_workdir(workdir, split)``: PNG figures in ``workdir/plots/``.

Everything comes in as arguments (nothing reads flags). Bad input (no
checkpoint, a split the dataset lacks, NaN outputs) raises
``EvaluationError`` with a message meant for the user; the absl mains print
it and exit non-zero. This module imports ``contrastive_jax.training``, so
``contrastive_jax.evaluation`` does not import it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from contrastive_jax import data as cdata
from contrastive_jax import evaluation
from contrastive_jax import similarity
from contrastive_jax.evaluation.linear_probe import topk_accuracy
from contrastive_jax.evaluation.metrics import check_embeddings
from contrastive_jax.training import checkpoint as ckpt_lib
from contrastive_jax.training import input as input_lib
from contrastive_jax.training import loop
from contrastive_jax.training import state as state_lib

__all__ = [
    "EVAL_SPLITS",
    "EvaluationError",
    "Prepared",
    "Run",
    "compute_metrics",
    "evaluate_workdir",
    "format_table",
    "load_history",
    "load_run",
    "plot_workdir",
    "prepare",
    "probe_classification",
]

EVAL_SPLITS = ("validation", "test", "tune")
KNN_KS = (20, 200)
# Outputs of ``ContrastiveModel`` that are evaluated (all but reconstruction).
_OUTPUT_KEYS = ("features", "embedding", "codes", "logits", "probe_logits")
_KNOWN_CLASS_NAMES = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                "horse", "ship", "truck"),
}


class EvaluationError(ValueError):
  """Bad input to an evaluation: the message says what and how to fix it."""


@dataclasses.dataclass
class Run:
  """A trained run restored from its workdir.

  Attributes:
    workdir: absolute path.
    config: the run's ``ml_collections.ConfigDict`` (from ``config.json``).
    model: the inference-mode ``ContrastiveModel``.
    variables: ``{"params", ("batch_stats")}`` replicated over ``mesh``: the
      weight average of a run that kept one (``ema_decay > 0``), unless
      restored with ``online=True``.
    mesh: the 1-D ``"data"`` mesh over all devices.
    step: the checkpoint's step.
    num_classes: classes of the model's heads (from the training split).
  """
  workdir: str
  config: Any
  model: Any
  variables: Any
  mesh: Any
  step: int
  num_classes: int
  online: bool = False


@dataclasses.dataclass
class Prepared:
  """A restored run plus its outputs on the training split and ``split``.

  ``train`` / ``query`` map output names (``features``, ``embedding``, and
  ``codes`` / ``logits`` / ``probe_logits`` when the model has them) to
  ``[N, D]`` float32 arrays; the images are the normalised model inputs.
  """
  run: Run
  split: str
  train: dict[str, np.ndarray]
  train_labels: np.ndarray
  train_images: np.ndarray
  query: dict[str, np.ndarray]
  query_labels: np.ndarray
  query_images: np.ndarray
  num_classes: int
  class_names: list[str]
  tta_flip: bool = False
  tta_translate: bool = False


# ----------------------------------------------------------------------------
# Loading a run.


def _fail(message: str, cause: Exception | None = None):
  raise EvaluationError(message) from cause


def _saved_steps(ckpt_dir: str) -> list[int]:
  if not os.path.isdir(ckpt_dir):
    return []
  return sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())


def _read_config(workdir: str) -> ml_collections.ConfigDict:
  if not os.path.isdir(workdir):
    _fail(f"Workdir {workdir} does not exist.")
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    _fail(f"{workdir} has no config.json, so it is not a training workdir:"
          f" train first with `python -m experiments.train"
          f" --workdir={workdir}`.")
  try:
    with open(path) as f:
      config_dict = json.load(f)
  except (OSError, ValueError) as e:
    _fail(f"Cannot read {path}: {e}", e)
  return ml_collections.ConfigDict(config_dict)


def _load_split(config, split: str):
  try:
    return input_lib.load_eval_split(config, split)
  except (ValueError, TypeError, FileNotFoundError,
          cdata.DatasetUnavailableError) as e:
    _fail(f"Cannot load split {split!r} of dataset {config.dataset!r}: {e}", e)


def _check_split(split: str) -> None:
  if split not in EVAL_SPLITS:
    _fail(f"split must be one of {EVAL_SPLITS} (queries, searched against"
          f" 'train', or 'tune_train' for 'tune'), got {split!r}.")


def _check_checkpoints(workdir: str, config) -> str:
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if not _saved_steps(ckpt_dir):
    _fail(f"No checkpoint in {ckpt_dir}: the run saved none yet (checkpoints"
          f" are written every checkpoint.every_steps="
          f"{config.checkpoint.get('every_steps')} steps and at the end).")
  return ckpt_dir


def load_run(workdir: str, *, data_dir: str | None = None,
             num_classes: int | None = None,
             image_shape: Sequence[int] | None = None,
             online: bool = False) -> Run:
  """Restores the latest readable checkpoint of a ``train_and_evaluate`` run.

  Args:
    workdir: the training workdir (``config.json`` + ``checkpoints/``).
    data_dir: overrides ``config.data_dir`` (where the images are).
    num_classes, image_shape: of the training split; read from it when None.
    online: restore the trained (online) weights of a run that kept a
      weight average, instead of the average.

  Raises:
    EvaluationError: no workdir, ``config.json`` or readable checkpoint, a
      checkpoint of another config, or training data that cannot be loaded.
  """
  workdir = os.path.abspath(workdir)
  config = _read_config(workdir)
  if data_dir:
    config.data_dir = data_dir
  ckpt_dir = _check_checkpoints(workdir, config)
  if num_classes is None or image_shape is None:
    images, labels = _load_split(config, "train")
    num_classes, image_shape = int(labels.max()) + 1, images.shape[1:]
  mesh = loop.make_mesh()
  # ``build`` only reads these three attributes of a TrainInput.
  train_input = types.SimpleNamespace(
      num_classes=int(num_classes), image_shape=tuple(image_shape),
      num_train=max(int(config.batch_size), 1))
  model, _, _, _, state = loop.build(config, mesh, train_input, steps=1)
  config_dict = config.to_dict()
  checkpointer = ckpt_lib.Checkpointer(
      workdir, fingerprint=ckpt_lib.config_fingerprint(config_dict),
      config=config_dict, keep=max(len(_saved_steps(ckpt_dir)), 1),
      async_save=False, read_only=True)
  try:
    restored, step = checkpointer.restore_latest(
        state_lib.abstract_state(state))
  except ckpt_lib.IncompatibleCheckpointError as e:
    _fail(str(e), e)
  finally:
    checkpointer.close()
  if restored is None:
    _fail(f"No readable checkpoint in {ckpt_dir}.")
  if online and not restored.ema:
    _fail(f"{workdir} kept no weight average (its ema_decay is"
          f" {config.get('ema_decay', 0.0)}, its lookahead_period"
          f" {config.get('lookahead_period', 0)}): its weights are the online"
          " ones already; evaluate it without online=True.")
  return Run(workdir=workdir, config=config, model=model,
             variables=loop.eval_variables(restored, online=online),
             mesh=mesh, step=int(step), num_classes=int(num_classes),
             online=online)


def embed_outputs(run: Run, images: np.ndarray, *, tta_flip: bool = False,
                  tta_translate: bool = False) -> dict[str, np.ndarray]:
  """The model's evaluated outputs (float32) for ``images``, in eval mode.

  ``tta_flip``: test-time augmentation by horizontal flip, as airbench
  evaluates: features, embeddings and logits are the mean of the outputs for
  each image and its mirror image (hash ``codes`` stay those of the image:
  averaging signs would give zero bits). ``tta_translate``: also averaged
  over one-pixel translations (airbench's ``tta_level=2`` with
  ``tta_flip``; see ``loop.model_outputs``). Only meaningful for models
  trained with flips / crops.
  """
  return loop.model_outputs(
      run.model, run.variables, images, keys=_OUTPUT_KEYS,
      batch_size=int(run.config.eval.get("batch_size", 512)), mesh=run.mesh,
      tta_flip=tta_flip, tta_translate=tta_translate)


def check_finite(outputs: Mapping[str, np.ndarray], what: str) -> None:
  """Raises ``EvaluationError`` naming how many rows have NaN or inf."""
  for key, value in outputs.items():
    try:
      check_embeddings(f"The {what} {key}", value)
    except ValueError as e:
      _fail(f"{e} The model (or its input) produced non-finite values, so"
            " nothing was evaluated; use an earlier checkpoint or check the"
            " data.", e)


def class_names_for(config, num_classes: int) -> list[str]:
  """Class names where known (image folders, CIFAR-10), else the ids."""
  names = None
  try:
    source = cdata.resolve_source(config.dataset,
                                  data_dir=config.get("data_dir") or None)
    if source.kind == "image_folder" and source.root is not None:
      train_dir = source.root / "train"
      if train_dir.is_dir():
        names = cdata.sources.class_folders(train_dir)
  except Exception:  # pylint: disable=broad-except
    names = None  # names are cosmetic: never fail because of them.
  if not names or len(names) != num_classes:
    names = _KNOWN_CLASS_NAMES.get(config.dataset)
  if not names or len(names) != num_classes:
    names = [str(i) for i in range(num_classes)]
  return list(names)


def prepare(workdir: str, split: str = "validation", *,
            data_dir: str | None = None, tta_flip: bool = False,
            tta_translate: bool = False, online: bool = False) -> Prepared:
  """Restores ``workdir``'s run and embeds ``split`` and its reference split
  (``cdata.REFERENCE_SPLIT``: "train", or "tune_train" for "tune").

  ``tta_flip`` / ``tta_translate``: both splits are embedded with flip /
  translation test-time augmentation (see ``embed_outputs``). ``online``:
  see ``load_run``.

  Raises:
    EvaluationError: see ``load_run``; ``split`` not in ``EVAL_SPLITS`` or
      missing from the dataset; "tune" for a run not trained on
      "tune_train"; non-finite model outputs.
  """
  _check_split(split)
  workdir = os.path.abspath(workdir)
  config = _read_config(workdir)
  if data_dir:
    config.data_dir = data_dir
  _check_checkpoints(workdir, config)
  if split == "tune" and input_lib.run_splits(config)[0] != "tune_train":
    # "tune" is carved from "train": such a run has trained on its queries.
    _fail(f"split='tune' needs a run trained with data.tune=True; {workdir}"
          " trained on 'train', which contains the 'tune' images.")
  # The query split first: a missing split fails before anything is built.
  query_images, query_labels = _load_split(config, split)
  train_images, train_labels = _load_split(config, cdata.REFERENCE_SPLIT[split])
  run = load_run(workdir, data_dir=data_dir,
                 num_classes=int(train_labels.max()) + 1,
                 image_shape=train_images.shape[1:], online=online)
  tta = dict(tta_flip=tta_flip, tta_translate=tta_translate)
  train = embed_outputs(run, train_images, **tta)
  check_finite(train, f"training-split outputs of checkpoint {run.step}:")
  query = embed_outputs(run, query_images, **tta)
  check_finite(query, f"{split}-split outputs of checkpoint {run.step}:")
  num_classes = max(run.num_classes, int(query_labels.max()) + 1)
  return Prepared(run=run, split=split, train=train, train_labels=train_labels,
                  train_images=train_images, query=query,
                  query_labels=query_labels, query_images=query_images,
                  num_classes=num_classes,
                  class_names=class_names_for(run.config, num_classes),
                  **tta)


# ----------------------------------------------------------------------------
# Metrics.


def _differs(a: np.ndarray, b: np.ndarray) -> bool:
  return a.shape != b.shape or not np.array_equal(a, b)


def probe_classification(train_features, train_labels, query_features,
                         query_labels, *, num_classes: int,
                         class_names: Sequence[str] | None = None,
                         steps: int = 500, learning_rate: float = 1e-3
                         ) -> tuple[dict[str, float], dict[str, Any]]:
  """``evaluation.linear_probe`` plus the metrics of its predictions.

  Returns:
    ``({"top1", "top5", "train_top1", "train_loss"}, classification_metrics
    of the probe's predictions on the queries)``.
  """
  params = evaluation.fit_linear_classifier(
      train_features, train_labels, num_classes=num_classes, steps=steps,
      learning_rate=learning_rate)
  logits = evaluation.linear_classifier_logits(params, query_features)
  train_logits = evaluation.linear_classifier_logits(params, train_features)

  topk = topk_accuracy
  query_labels, train_labels = np.asarray(query_labels), np.asarray(
      train_labels)
  probe = {"top1": topk(logits, query_labels, 1),
           "top5": topk(logits, query_labels, 5),
           "train_top1": topk(train_logits, train_labels, 1),
           "train_loss": params["final_loss"]}
  cls = evaluation.classification_metrics(
      query_labels, np.argmax(logits, axis=1), class_names=class_names)
  return probe, cls


def compute_metrics(train: Mapping[str, np.ndarray], train_labels,
                    query: Mapping[str, np.ndarray], query_labels, *,
                    num_classes: int, class_names: Sequence[str] | None = None,
                    knn_ks: Sequence[int] = KNN_KS,
                    knn_temperature: float = 0.07, probe_steps: int = 500,
                    probe_learning_rate: float = 1e-3) -> dict[str, Any]:
  """Every metric of the report, from the outputs on both splits.

  Args:
    train: reference outputs: ``features`` (required), and ``embedding``,
      ``codes``, ``logits``, ``probe_logits`` when the model has them.
    train_labels: ``[M]`` class ids.
    query: the same outputs on the evaluated split.
    query_labels: ``[Q]`` class ids.
    num_classes: ``C``; every label lies in ``[0, C)``.
    class_names: ``C`` names for the per-class metrics.
    knn_ks: kNN neighbour counts (clipped to ``M``).
    knn_temperature, probe_steps, probe_learning_rate: as ``config.eval``.

  Returns:
    ``{"knn", "linear_probe", "classification", "retrieval"}`` and, where the
    model has them, ``knn_embedding`` and ``retrieval_embedding`` (on the
    loss embedding when it is not the features), ``hash`` (``map``,
    ``bit_balance`` of the database codes, ``bit_balance_queries``,
    ``num_bits``), ``heads`` (``classifier_top1``, ``online_probe_top1``) and
    ``classifier_classification`` (metrics of the classifier head's
    predictions).

  Raises:
    EvaluationError: non-finite rows (the message says how many).
  """
  check_finite(train, "reference (training-split)")
  check_finite(query, "query")
  train_labels = np.asarray(train_labels)
  query_labels = np.asarray(query_labels)
  num_refs = train_labels.shape[0]
  ks = tuple(sorted({min(int(k), num_refs) for k in knn_ks}))
  knn_kw = dict(ks=ks, temperature=knn_temperature, num_classes=num_classes)
  res: dict[str, Any] = {}
  res["knn"] = evaluation.knn_accuracy(query["features"], query_labels,
                                       train["features"], train_labels,
                                       **knn_kw)
  res["linear_probe"], res["classification"] = probe_classification(
      train["features"], train_labels, query["features"], query_labels,
      num_classes=num_classes, class_names=class_names, steps=probe_steps,
      learning_rate=probe_learning_rate)
  res["retrieval"] = evaluation.retrieval_metrics(query["features"],
                                                  query_labels)
  emb = query.get("embedding")
  has_emb = emb is not None and _differs(emb, query["features"])
  if has_emb and "codes" not in query:
    res["knn_embedding"] = evaluation.knn_accuracy(
        emb, query_labels, train["embedding"], train_labels, **knn_kw)
    res["retrieval_embedding"] = evaluation.retrieval_metrics(emb,
                                                              query_labels)
  if "codes" in query:
    res["hash"] = {
        "map": evaluation.hash_retrieval_map(query["codes"], query_labels,
                                             train["codes"], train_labels),
        "bit_balance": evaluation.bit_balance(train["codes"]),
        "bit_balance_queries": evaluation.bit_balance(query["codes"]),
        "num_bits": int(query["codes"].shape[1]),
    }
  heads = {}
  for name, key in (("classifier_top1", "logits"),
                    ("online_probe_top1", "probe_logits")):
    if key in query:
      heads[name] = float(np.mean(np.argmax(query[key], -1) == query_labels))
  if heads:
    res["heads"] = heads
  if "logits" in query:
    # The classifier head is the model's own prediction (triplet + CE): its
    # macro recall / F1 are the figures to set beside a supervised baseline.
    res["classifier_classification"] = evaluation.classification_metrics(
        query_labels, np.argmax(query["logits"], axis=1),
        class_names=class_names)
  return res


def _json_safe(obj):
  """NaN/inf -> None (strict JSON), NumPy scalars -> Python."""
  if isinstance(obj, Mapping):
    return {str(k): _json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_json_safe(v) for v in obj]
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  return obj


def eval_path(workdir: str, split: str, *, tta_flip: bool = False,
              tta_translate: bool = False, online: bool = False) -> str:
  name = split + ("_online" if online else "") + loop.tta_suffix(
      tta_flip=tta_flip, tta_translate=tta_translate)
  return os.path.join(os.path.abspath(workdir), "eval", name + ".json")


def evaluate_workdir(workdir: str, split: str = "validation", *,
                     data_dir: str | None = None,
                     prepared: Prepared | None = None,
                     tta_flip: bool = False,
                     tta_translate: bool = False,
                     online: bool = False) -> dict[str, Any]:
  """Computes every metric of ``workdir``'s latest checkpoint on ``split``.

  Writes ``workdir/eval/<split>.json`` (``<split>_online`` with ``online``,
  then ``_tta_flip`` / ``_tta_translate`` / ``_tta_flip_translate`` with
  test-time augmentation; NaN written as null) and returns the same dict:
  ``workdir``, ``split``, ``step``, ``dataset``, ``tta_flip``,
  ``tta_translate``, ``weights`` (``"average"`` or ``"online"``),
  ``num_train``, ``num_queries``, ``num_classes`` and the entries of
  ``compute_metrics``.

  Raises:
    EvaluationError: see ``prepare``.
    ValueError: ``prepared`` was made with another ``tta_flip``,
      ``tta_translate`` or ``online``.
  """
  tta = dict(tta_flip=tta_flip, tta_translate=tta_translate)
  p = prepared or prepare(workdir, split, data_dir=data_dir, online=online,
                          **tta)
  if (p.tta_flip, p.tta_translate, p.run.online) != (
      tta_flip, tta_translate, online):
    raise ValueError(
        f"prepared has tta_flip={p.tta_flip},"
        f" tta_translate={p.tta_translate}, online={p.run.online}; asked for"
        f" tta_flip={tta_flip}, tta_translate={tta_translate},"
        f" online={online}.")
  ec = p.run.config.eval
  metrics = compute_metrics(
      p.train, p.train_labels, p.query, p.query_labels,
      num_classes=p.num_classes, class_names=p.class_names,
      # The run's own k too, so its results.json figure is reproduced.
      knn_ks=tuple(sorted({*KNN_KS, int(ec.get("knn_k", 20))})),
      knn_temperature=float(ec.get("knn_temperature", 0.07)),
      probe_steps=int(ec.get("probe_steps", 500)),
      probe_learning_rate=float(ec.get("probe_learning_rate", 1e-3)))
  result = _json_safe({
      "workdir": p.run.workdir, "split": p.split, "step": p.run.step,
      "dataset": p.run.config.dataset, "tta_flip": bool(tta_flip),
      "tta_translate": bool(tta_translate),
      "weights": "average" if (loop.keeps_average(p.run.config)
                               and not online) else "online",
      "num_train": int(p.train_labels.shape[0]),
      "num_queries": int(p.query_labels.shape[0]),
      "num_classes": p.num_classes, **metrics})
  path = eval_path(p.run.workdir, p.split, online=online, **tta)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  loop.write_json(path, result)
  return result


def format_table(result: Mapping[str, Any]) -> str:
  """A short plain-text summary of ``evaluate_workdir``'s result."""

  def f(v):
    return "  n/a" if v is None else f"{v:.4f}"

  def row(name, *values):
    return f"  {name:<44} " + " / ".join(f(v) for v in values)

  lines = [f"{result['dataset']} {result['split']}: {result['num_queries']}"
           f" queries, {result['num_train']} training references,"
           f" checkpoint step {result['step']}"
           + (", flip test-time augmentation" if result.get("tta_flip")
              else "")
           + (", translation test-time augmentation"
              if result.get("tta_translate") else "")
           + (", weight average (EMA or lookahead)" if result.get("weights") == "average"
              else "")]
  for prefix, key in (("kNN", "knn"), ("kNN (loss embedding)",
                                       "knn_embedding")):
    for name, value in result.get(key, {}).items():
      if name.startswith("top1_k"):
        k = name[len("top1_k"):]
        lines.append(row(f"{prefix} k={k} top-1 / top-5", value,
                         result[key][f"top5_k{k}"]))
  lp = result["linear_probe"]
  lines.append(row("linear probe top-1 / top-5", lp["top1"], lp["top5"]))
  c = result["classification"]
  lines.append(row("probe accuracy / macro recall / F1", c["accuracy"],
                   c["macro_recall"], c["macro_f1"]))
  for prefix, key in (("", "retrieval"), (" (emb.)", "retrieval_embedding")):
    r = result.get(key)
    if r:
      lines.append(row(f"P@1 / R-precision / MAP@R{prefix}",
                       r["precision_at_1"], r["r_precision"],
                       r["mean_average_precision_at_r"]))
      lines.append(row(f"recall@1/2/4/8{prefix}", r["recall_at_1"],
                       r["recall_at_2"], r["recall_at_4"], r["recall_at_8"]))
      lines.append(row(f"NMI / AMI{prefix}", r["nmi"], r["ami"]))
  if "hash" in result:
    h = result["hash"]
    lines.append(row(f"hash mAP / bit balance ({h['num_bits']} bits)",
                     h["map"], h["bit_balance"]))
  names = {"classifier_top1": "classifier head top-1",
           "online_probe_top1": "online probe top-1"}
  for name, value in result.get("heads", {}).items():
    lines.append(row(names.get(name, name), value))
  c = result.get("classifier_classification")
  if c:
    lines.append(row("classifier accuracy / macro recall / F1", c["accuracy"],
                     c["macro_recall"], c["macro_f1"]))
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Plots.


def load_history(path: str) -> dict[str, list[tuple[int, float]]]:
  """``{name: [(step, value), ...]}`` from a ``metrics.jsonl``.

  A step logged twice (a run resumed from an earlier checkpoint) keeps its
  last value. Unreadable lines (a run killed mid-write) are skipped.
  """
  series: dict[str, dict[int, float]] = {}
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
        step = int(record.pop("step"))
      except (ValueError, KeyError, TypeError):
        continue
      for name, value in record.items():
        if isinstance(value, (int, float)):
          series.setdefault(name, {})[step] = float(value)
  return {name: sorted(points.items()) for name, points in series.items()}


# metrics.jsonl name -> plot_curves name ("<legend>/<panel>").
_LOSSES = {"loss": "training (total)", "metric_loss": "metric",
           "ce_loss": "cross-entropy", "reconstruction_loss": "reconstruction",
           "quantization_loss": "quantization", "probe_loss": "online probe"}
_ACCURACIES = {
    "probe_accuracy": "online probe (train batches)",
    "train_accuracy": "classifier (train batches)",
    "eval/knn_top1": "kNN top-1 (validation)",
    "eval/knn_embedding_top1": "kNN top-1, embedding (validation)",
    "eval/linear_probe_top1": "linear probe (validation)",
    "eval/online_probe_top1": "online probe (validation)",
    "eval/classifier_top1": "classifier (validation)",
    "eval/hash_map": "hash mAP (validation)",
}


def curves_history(history: Mapping[str, Sequence[tuple[int, float]]]
                   ) -> dict[str, Sequence[tuple[int, float]]]:
  """Selects and names the loss, accuracy and learning-rate series."""
  out = {}
  for key, label in _LOSSES.items():
    if key in history and not (key == "metric_loss" and "loss" in history
                               and history["loss"] == history[key]):
      out[f"{label}/loss"] = history[key]
  for key, label in _ACCURACIES.items():
    if key in history:
      out[f"{label}/accuracy"] = history[key]
  if "learning_rate" in history:
    out["learning_rate"] = history["learning_rate"]
  return out


def _display_images(config, images: np.ndarray) -> np.ndarray:
  """Undoes ``load_eval_split``'s normalisation: floats in [0, 1]."""
  mean, std = input_lib.normalization(config, images.shape[-1])
  if mean is not None:
    images = images * np.asarray(std, np.float32) + np.asarray(mean,
                                                               np.float32)
  return np.clip(images, 0.0, 1.0)


def nearest_neighbors(query: np.ndarray, reference: np.ndarray, k: int
                      ) -> np.ndarray:
  """Indices ``[Q, k]`` of the ``k`` most cosine-similar references."""
  sims = similarity.pairwise_cosine_similarity(jnp.asarray(query),
                                               jnp.asarray(reference))
  return np.asarray(jax.lax.top_k(sims, min(k, reference.shape[0]))[1])


def pick_queries(labels: np.ndarray, num: int, *, seed: int = 0) -> np.ndarray:
  """One random example per class for ``num`` classes (sorted by class)."""
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  if classes.size > num:
    classes = np.sort(rng.choice(classes, num, replace=False))
  picks = [rng.choice(np.flatnonzero(labels == c)) for c in classes]
  if len(picks) < num:  # fewer classes than rows: fill with other examples
    rest = np.setdiff1d(np.arange(labels.shape[0]), picks)
    extra = rng.choice(rest, min(num - len(picks), rest.size), replace=False)
    picks = sorted(picks + extra.tolist(), key=lambda i: (labels[i], i))
  return np.asarray(picks, np.int64)


def plot_workdir(workdir: str, split: str = "validation", *,
                 data_dir: str | None = None, num_queries: int = 10,
                 num_neighbors: int = 8, tsne_max_points: int = 2000,
                 prepared: Prepared | None = None) -> dict[str, str]:
  """Writes the report's figures to ``workdir/plots/``.

  * ``tsne_<split>.png``: t-SNE of the backbone features of ``split``,
    coloured by class (and ``tsne_<split>_embedding.png`` of the loss
    embedding when it is not the features);
  * ``curves.png``: loss, accuracy and learning rate against the step, from
    ``metrics.jsonl`` (skipped with a warning when the run has none);
  * ``confusion_<split>.png``: the linear probe's confusion matrix (from
    ``eval/<split>.json`` when it is of the same checkpoint, else the probe
    is fitted here);
  * ``neighbors_<split>.png``: ``num_queries`` queries of ``split`` (one per
    class) with their ``num_neighbors`` nearest training images by cosine
    similarity of the backbone features; wrong ones are framed in red.

  Returns:
    ``{"tsne", ("tsne_embedding"), ("curves"), "confusion", "neighbors"}`` ->
    path.

  Raises:
    EvaluationError: see ``prepare``.
  """
  p = prepared or prepare(workdir, split, data_dir=data_dir)
  run, config = p.run, p.run.config
  out_dir = os.path.join(run.workdir, "plots")
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  tag = f"{config.dataset} {split}, step {run.step}"

  paths["tsne"] = evaluation.plot_tsne(
      p.query["features"], p.query_labels,
      os.path.join(out_dir, f"tsne_{split}.png"), class_names=p.class_names,
      max_points=tsne_max_points,
      title=f"t-SNE of backbone features ({tag})")
  emb = p.query.get("embedding")
  if emb is not None and _differs(emb, p.query["features"]):
    paths["tsne_embedding"] = evaluation.plot_tsne(
        emb, p.query_labels,
        os.path.join(out_dir, f"tsne_{split}_embedding.png"),
        class_names=p.class_names, max_points=tsne_max_points,
        title=(f"t-SNE of the {emb.shape[1]}-bit hash codes ({tag})"
               if "codes" in p.query else
               f"t-SNE of the projection-head embedding ({tag})"))

  metrics_path = os.path.join(run.workdir, "metrics.jsonl")
  history = curves_history(load_history(metrics_path)) if os.path.exists(
      metrics_path) else {}
  if history:
    paths["curves"] = evaluation.plot_curves(
        history, os.path.join(out_dir, "curves.png"),
        title=f"{os.path.basename(run.workdir)}: {config.dataset},"
              f" {config.loss.name}",
        log_scale=("loss",))
  else:
    logging.warning("No metrics.jsonl with scalars in %s: no curves.png.",
                    run.workdir)

  cls = None
  saved = eval_path(run.workdir, split)
  if os.path.exists(saved):
    with open(saved) as f:
      previous = json.load(f)
    if previous.get("step") == run.step and "classification" in previous:
      cls = previous["classification"]
  if cls is None:
    ec = config.eval
    _, cls = probe_classification(
        p.train["features"], p.train_labels, p.query["features"],
        p.query_labels, num_classes=p.num_classes, class_names=p.class_names,
        steps=int(ec.get("probe_steps", 500)),
        learning_rate=float(ec.get("probe_learning_rate", 1e-3)))
  paths["confusion"] = evaluation.plot_confusion_matrix(
      cls["confusion_matrix"], os.path.join(out_dir, f"confusion_{split}.png"),
      class_names=cls["class_names"],
      title=f"Linear probe on {split} (accuracy {cls['accuracy']:.1%},"
            f" step {run.step})")

  rows = pick_queries(p.query_labels, num_queries)
  nn = nearest_neighbors(p.query["features"][rows], p.train["features"],
                         num_neighbors)
  paths["neighbors"] = evaluation.plot_neighbors(
      _display_images(config, p.query_images[rows]),
      _display_images(config, p.train_images[nn]),
      p.query_labels[rows], p.train_labels[nn],
      os.path.join(out_dir, f"neighbors_{split}.png"),
      class_names=p.class_names, max_neighbors=num_neighbors,
      title=f"{split} queries and their {num_neighbors} nearest training"
            f" images (cosine, backbone features; red = other class)")
  return paths
