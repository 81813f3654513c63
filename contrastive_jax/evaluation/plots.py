"""Figures for evaluation reports, written as PNG files.

Uses matplotlib's object API with the Agg canvas (no pyplot, no global
backend switch, no display needed). Every function returns the path it
wrote. matplotlib is imported lazily (``pip install matplotlib``, part of the
``train`` extra).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from contrastive_jax._checks import check_bool
from contrastive_jax.evaluation.metrics import check_embeddings
from contrastive_jax.evaluation.metrics import check_labels

__all__ = [
    "plot_tsne",
    "plot_curves",
    "plot_confusion_matrix",
    "plot_neighbors",
]

_DPI = 120


def _figure(width: float, height: float):
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(width, height), dpi=_DPI)
  FigureCanvasAgg(fig)
  return fig


def _save(fig, path) -> str:
  path = os.fspath(path)
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  fig.savefig(path, format="png", bbox_inches="tight")
  return path


def _names(labels: np.ndarray, class_names: Sequence[str] | None):
  if class_names is None:
    return {c: str(c) for c in np.unique(labels).tolist()}
  class_names = list(class_names)
  if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
    raise ValueError(
        f"labels must lie in [0, {len(class_names)}) to index class_names, got"
        f" values in [{labels.min()}, {labels.max()}].")
  return {c: str(class_names[c]) for c in np.unique(labels).tolist()}


def _colors(num: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps["tab10" if num <= 10 else "tab20" if num <= 20 else "turbo"]
  if num <= 20:
    return [cmap(i) for i in range(num)]
  return [cmap(i / max(num - 1, 1)) for i in range(num)]


def plot_tsne(
    embeddings: Any,
    labels: Any,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    max_points: int = 2000,
    perplexity: float = 30.0,
    max_iter: int = 1000,
    seed: int = 0,
    title: str | None = None,
) -> str:
  """2-D t-SNE scatter of embeddings, coloured by class.

  Args:
    embeddings: ``[N, D]`` embeddings.
    labels: ``[N]`` integer class ids.
    path: PNG file to write (parent folders are created).
    class_names: names indexed by class id, for the legend.
    max_points: at most this many points (a seeded random subset) are
      embedded; t-SNE is quadratic in the number of points.
    perplexity: t-SNE perplexity (clipped below ``(n - 1) / 3``).
    max_iter: t-SNE iterations (at least 250).
    seed: seed of the subsample and of t-SNE.
    title: figure title.

  Returns:
    ``path``.

  References:
    van der Maaten and Hinton, Visualizing Data using t-SNE, JMLR 2008;
    ``sklearn.manifold.TSNE``.
  """
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top

  x = check_embeddings("embeddings", embeddings)
  y = check_labels("labels", labels, x.shape[0])
  if x.shape[0] < 3:
    raise ValueError(f"t-SNE needs at least 3 points, got {x.shape[0]}.")
  names = _names(y, class_names)
  rng = np.random.default_rng(seed)
  if x.shape[0] > max_points:
    keep = np.sort(rng.choice(x.shape[0], max_points, replace=False))
    x, y = x[keep], y[keep]
  perplexity = min(perplexity, (x.shape[0] - 1) / 3.0)
  points = TSNE(n_components=2, perplexity=perplexity, init="pca",
                max_iter=max(int(max_iter), 250), random_state=seed).fit_transform(x.astype(np.float64))

  classes = sorted(names)
  colors = _colors(len(classes))
  fig = _figure(7.5, 6.0)
  ax = fig.add_subplot()
  for color, c in zip(colors, classes):
    mask = y == c
    if mask.any():
      ax.scatter(points[mask, 0], points[mask, 1], s=8, color=color,
                 label=names[c], alpha=0.8, linewidths=0)
  ax.set_xticks([])
  ax.set_yticks([])
  ax.set_xlabel("t-SNE 1")
  ax.set_ylabel("t-SNE 2")
  ax.set_title(title or f"t-SNE of {x.shape[0]} embeddings")
  if len(classes) <= 30:
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8,
              markerscale=2, frameon=False,
              ncol=1 if len(classes) <= 15 else 2)
  return _save(fig, path)


def plot_curves(
    history: Mapping[str, Sequence[tuple[float, float]]],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    log_scale: Sequence[str] = (),
) -> str:
  """Training curves: one panel per metric, value against step.

  Args:
    history: ``{name: [(step, value), ...]}``, e.g. ``{"loss": [...],
      "knn_top1": [...]}``. Names sharing a prefix before ``"/"``
      (``"train/loss"``, ``"eval/loss"``) are drawn in the same panel, named
      after the part after it.
    path: PNG file to write.
    title: figure title.
    log_scale: panel names drawn with a logarithmic y axis.

  Returns:
    ``path``.
  """
  if not history:
    raise ValueError("history is empty.")
  panels: dict[str, list[tuple[str, np.ndarray]]] = {}
  for name, points in history.items():
    points = np.asarray(list(points), dtype=np.float64)
    if points.size == 0:
      continue
    if points.ndim != 2 or points.shape[1] != 2:
      raise ValueError(
          f"history[{name!r}] must be a list of (step, value) pairs, got shape"
          f" {points.shape}.")
    panel = name.split("/", 1)[1] if "/" in name else name
    panels.setdefault(panel, []).append((name, points))
  if not panels:
    raise ValueError("history holds no points.")
  cols = min(3, len(panels))
  rows = -(-len(panels) // cols)
  fig = _figure(4.5 * cols, 3.2 * rows)
  for i, (panel, series) in enumerate(panels.items()):
    ax = fig.add_subplot(rows, cols, i + 1)
    for name, points in series:
      ax.plot(points[:, 0], points[:, 1], label=name, linewidth=1.5,
              marker="o" if len(points) <= 20 else None, markersize=3)
    ax.set_title(panel)
    ax.set_xlabel("step")
    ax.set_ylabel(panel)
    ax.grid(True, alpha=0.3)
    if panel in log_scale:
      ax.set_yscale("log")
    if len(series) > 1:
      ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  return _save(fig, path)


def plot_confusion_matrix(
    cm: Any,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str],
    normalize: bool = True,
    title: str | None = None,
) -> str:
  """Confusion-matrix heat map (rows: true class, columns: predicted).

  Args:
    cm: ``[C, C]`` counts, e.g. ``classification_metrics(...)
      ["confusion_matrix"]``.
    path: PNG file to write.
    class_names: ``C`` class names.
    normalize: colour by row-normalised rates (recall on the diagonal);
      cells are annotated with counts (and rates) when ``C <= 20``.
    title: figure title.

  Returns:
    ``path``.
  """
  check_bool("normalize", normalize)
  cm = np.asarray(cm)
  class_names = [str(c) for c in class_names]
  if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
    raise ValueError(f"cm must be square [C, C], got shape {cm.shape}.")
  if cm.shape[0] != len(class_names):
    raise ValueError(
        f"cm is {cm.shape[0]}x{cm.shape[0]} but {len(class_names)} class names"
        " were given.")
  num = cm.shape[0]
  rates = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
  values = rates if normalize else cm
  size = min(max(4.0, 0.55 * num + 2.0), 24.0)
  fig = _figure(size + 1.0, size)
  ax = fig.add_subplot()
  image = ax.imshow(values, cmap="Blues", vmin=0,
                    vmax=1 if normalize else max(values.max(), 1))
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04,
               label="fraction of true class" if normalize else "count")
  ticks = np.arange(num)
  ax.set_xticks(ticks)
  ax.set_yticks(ticks)
  fontsize = 9 if num <= 20 else max(4, 9 - num // 20)
  ax.set_xticklabels(class_names, rotation=45, ha="right", fontsize=fontsize)
  ax.set_yticklabels(class_names, fontsize=fontsize)
  ax.set_xlabel("Predicted class")
  ax.set_ylabel("True class")
  ax.set_title(title or "Confusion matrix")
  if num <= 20:
    for i in range(num):
      for j in range(num):
        text = (f"{int(cm[i, j])}\n{rates[i, j]:.0%}" if normalize
                else f"{int(cm[i, j])}")
        dark = values[i, j] > 0.6 * (1 if normalize else values.max())
        ax.text(j, i, text, ha="center", va="center", fontsize=7,
                color="white" if dark else "black")
  fig.tight_layout()
  return _save(fig, path)


def _to_displayable(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if np.issubdtype(image.dtype, np.integer):
    return np.clip(image, 0, 255).astype(np.uint8)
  image = image.astype(np.float64)
  lo, hi = float(image.min()), float(image.max())
  if lo < 0.0 or hi > 1.0:  # e.g. standardised pixels: rescale for display.
    image = (image - lo) / max(hi - lo, 1e-12)
  return image


def plot_neighbors(
    query_images: Any,
    neighbor_images: Any,
    query_labels: Any,
    neighbor_labels: Any,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    max_neighbors: int = 8,
    title: str | None = None,
) -> str:
  """Query images (left column) with their nearest retrieved images.

  Each row shows one query (framed in black) followed by its first
  ``max_neighbors`` neighbours in rank order; a neighbour whose label matches
  the query is framed in green, a wrong one in red (thicker).

  Args:
    query_images: ``[Q, H, W]`` or ``[Q, H, W, 1|3]`` images (uint8, or floats
      in ``[0, 1]``; other float ranges are min-max rescaled per image).
    neighbor_images: ``[Q, K, H, W(, 1|3)]`` retrieved images, nearest first.
    query_labels: ``[Q]`` integer class ids.
    neighbor_labels: ``[Q, K]`` integer class ids.
    path: PNG file to write.
    class_names: names indexed by class id, shown under each image.
    max_neighbors: neighbours shown per query (default 8).
    title: figure title.

  Returns:
    ``path``.
  """
  queries = np.asarray(query_images)
  neighbors = np.asarray(neighbor_images)
  q_labels = check_labels("query_labels", query_labels, queries.shape[0])
  n_labels = np.asarray(neighbor_labels)
  if queries.ndim not in (3, 4) or queries.shape[0] == 0:
    raise ValueError(f"query_images must be [Q, H, W(, C)], got shape"
                     f" {queries.shape}.")
  if (neighbors.ndim != queries.ndim + 1
      or neighbors.shape[0] != queries.shape[0]
      or neighbors.shape[2:] != queries.shape[1:]):
    raise ValueError(
        f"neighbor_images must be [Q, K] + the query image shape"
        f" {queries.shape[1:]} with Q={queries.shape[0]}, got shape"
        f" {neighbors.shape}.")
  if n_labels.shape != neighbors.shape[:2]:
    raise ValueError(f"neighbor_labels must have shape {neighbors.shape[:2]},"
                     f" got {n_labels.shape}.")
  n_labels = n_labels.astype(np.int64)
  num_k = min(max_neighbors, neighbors.shape[1])
  _names(np.concatenate([q_labels, n_labels.reshape(-1)]), class_names)

  def name(c):
    return str(class_names[c]) if class_names is not None else str(c)

  cols = num_k + 1
  rows = queries.shape[0]
  fig = _figure(1.35 * cols, 1.8 * rows + (0.4 if title else 0.0))
  axes = fig.subplots(rows, cols, squeeze=False)
  gray = queries.ndim == 3 or queries.shape[-1] == 1
  for i in range(rows):
    cells = [(queries[i], q_labels[i], "black", 2.0, "query")]
    for j in range(num_k):
      right = n_labels[i, j] == q_labels[i]
      cells.append((neighbors[i, j], n_labels[i, j],
                    "tab:green" if right else "red", 2.0 if right else 4.0,
                    f"#{j + 1}"))
    for j, (image, label, color, width, tag) in enumerate(cells):
      ax = axes[i, j]
      ax.imshow(_to_displayable(image), cmap="gray" if gray else None,
                vmin=0 if gray else None,
                vmax=(255 if np.issubdtype(np.asarray(image).dtype, np.integer)
                      else 1) if gray else None)
      ax.set_xticks([])
      ax.set_yticks([])
      for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(width)
      ax.set_title(tag, fontsize=8, color=color if j else "black")
      ax.set_xlabel(name(label), fontsize=7, color=color if j else "black")
  if title:
    fig.suptitle(title)
  fig.tight_layout(h_pad=1.2)
  return _save(fig, path)
