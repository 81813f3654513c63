"""Classification metrics (scikit-learn) and input validation shared by evaluation.

``classification_metrics`` reports what the design documents tabulate:
accuracy, macro precision/recall/F1, per-class precision/recall/F1/support
and the confusion matrix, as plain Python types (JSON-serialisable). The
numbers themselves come from :mod:`sklearn.metrics`; nothing is
re-implemented here.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["classification_metrics"]


# ----------------------------------------------------------------------------
# Validation helpers (private; used by every module of the package).


def check_embeddings(name: str, x: Any, *, allow_int: bool = False) -> np.ndarray:
  """Returns ``x`` as a finite 2-D floating NumPy array or raises.

  Raises:
    TypeError: ``x`` is not floating (unless ``allow_int``).
    ValueError: ``x`` is not ``[N, D]`` with ``N, D >= 1``, or has rows with
      NaN/inf (the message names how many rows and the first few).
  """
  x = np.asarray(x)
  if x.ndim != 2:
    raise ValueError(
        f"{name} must be a matrix [N, D], got shape {x.shape} (rank {x.ndim}).")
  if x.shape[0] == 0 or x.shape[1] == 0:
    raise ValueError(f"{name} must be non-empty, got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    if allow_int and (np.issubdtype(x.dtype, np.integer)
                      or x.dtype == np.bool_):
      return x.astype(np.float32)
    raise TypeError(
        f"{name} must have a floating dtype, got {x.dtype} with shape"
        f" {x.shape}.")
  if x.dtype.itemsize < 4:  # float16 / bfloat16: evaluate in float32.
    x = x.astype(np.float32)
  bad = ~np.isfinite(x).all(axis=1)
  num_bad = int(bad.sum())
  if num_bad:
    rows = np.flatnonzero(bad)[:5].tolist()
    raise ValueError(
        f"{name} has {num_bad} of {x.shape[0]} rows with NaN or inf values"
        f" (first rows: {rows}).")
  return x


def check_labels(name: str, labels: Any, n: int | None = None, *,
                 integer: bool = True) -> np.ndarray:
  """Returns ``labels`` as a 1-D NumPy array of length ``n`` or raises."""
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(
        f"{name} must be a vector [N], got shape {labels.shape}.")
  if n is not None and labels.shape[0] != n:
    raise ValueError(
        f"{name} has {labels.shape[0]} entries but the embeddings have {n}"
        " rows; they must match.")
  if integer and not (np.issubdtype(labels.dtype, np.integer)
                      or labels.dtype == np.bool_):
    if np.issubdtype(labels.dtype, np.floating) and labels.size and np.all(
        np.isfinite(labels)) and np.all(labels == np.round(labels)):
      return labels.astype(np.int64)
    raise TypeError(
        f"{name} must hold integer class ids, got dtype {labels.dtype}.")
  return labels.astype(np.int64) if integer else labels


def check_class_range(name: str, labels: np.ndarray, num_classes: int) -> None:
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"{name} must lie in [0, num_classes={num_classes}), got values in"
        f" [{labels.min()}, {labels.max()}].")


# ----------------------------------------------------------------------------
# Classification metrics.


def classification_metrics(
    y_true: Any,
    y_pred: Any,
    *,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Accuracy, macro and per-class precision/recall/F1, confusion matrix.

  Every number is computed by :mod:`sklearn.metrics` (``accuracy_score``,
  ``precision_recall_fscore_support``, ``confusion_matrix``) with
  ``zero_division=0``: a class that is never predicted has precision 0, one
  that never occurs has recall 0. Macro averages run over all classes listed
  (``class_names``), including classes absent from both vectors.

  Args:
    y_true: ``[N]`` integer ground-truth class ids.
    y_pred: ``[N]`` integer predicted class ids.
    class_names: names of classes ``0 .. C-1``; every id must lie in
      ``[0, C)``. Without it the classes are the sorted union of the ids
      present in ``y_true`` and ``y_pred``, named ``str(id)``.

  Returns:
    A JSON-serialisable dict (Python floats, ints, lists and strings):
    ``accuracy``, ``macro_precision``, ``macro_recall`` (balanced accuracy
    when every class occurs), ``macro_f1``, ``num_samples``, ``class_names``
    ``[C]``, ``labels`` ``[C]`` (the class ids, in confusion-matrix order),
    ``per_class`` (``{name: {precision, recall, f1, support}}``) and
    ``confusion_matrix`` (``[C][C]`` counts, rows = true class, columns =
    predicted class).

  Raises:
    ValueError: empty or mismatched inputs, or ids outside ``class_names``.

  References:
    scikit-learn, ``sklearn.metrics.precision_recall_fscore_support`` and
    ``sklearn.metrics.confusion_matrix``.
  """
  from sklearn import metrics as skm  # pylint: disable=g-import-not-at-top

  y_true = check_labels("y_true", y_true)
  y_pred = check_labels("y_pred", y_pred, y_true.shape[0])
  if y_true.shape[0] == 0:
    raise ValueError("y_true and y_pred are empty.")
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if not class_names:
      raise ValueError("class_names is empty.")
    if len(set(class_names)) != len(class_names):
      raise ValueError(f"class_names has duplicates: {class_names}.")
    labels = np.arange(len(class_names))
    check_class_range("y_true", y_true, len(class_names))
    check_class_range("y_pred", y_pred, len(class_names))
  else:
    labels = np.union1d(y_true, y_pred)
    class_names = [str(int(c)) for c in labels]

  precision, recall, f1, support = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=labels, average=None, zero_division=0)
  macro_p, macro_r, macro_f1, _ = skm.precision_recall_fscore_support(
      y_true, y_pred, labels=labels, average="macro", zero_division=0)
  cm = skm.confusion_matrix(y_true, y_pred, labels=labels)
  return {
      "accuracy": float(skm.accuracy_score(y_true, y_pred)),
      "macro_precision": float(macro_p),
      "macro_recall": float(macro_r),
      "macro_f1": float(macro_f1),
      "num_samples": int(y_true.shape[0]),
      "class_names": list(class_names),
      "labels": [int(c) for c in labels],
      "per_class": {
          name: {
              "precision": float(p),
              "recall": float(r),
              "f1": float(f),
              "support": int(s),
          } for name, p, r, f, s in zip(class_names, precision, recall, f1,
                                        support)
      },
      "confusion_matrix": cm.astype(int).tolist(),
  }
