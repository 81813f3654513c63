"""Where images come from: a local image folder, scikit-learn's digits, or TFDS.

One entry point, ``load_split_arrays(name, split, *, data_dir=None)``, chooses
the source from the dataset name and ``data_dir`` (``resolve_source`` says
which it picked):

1. ``name="digits"``: scikit-learn's 8x8 digits (1,797 images, shipped inside
   scikit-learn, so it always works offline), scaled from 0..16 to float32 in
   [0, 1], shape ``[N, 8, 8, 1]``. The small default for quick runs.
2. An image folder ``<root>/<split>/<class>/<image>`` with ``root`` either
   ``data_dir/name`` or ``data_dir`` itself (e.g. ``data_dir=../shared/data``
   or ``data_dir=../shared/data/cifar10`` for ``name="cifar10"``). Read with a
   plain directory walk (sorted class folders = labels 0..C-1, sorted file
   names) rather than ``tfds.ImageFolder``: the walk needs no TensorFlow (the
   on-device path decodes with Pillow), and it gives the exact file list that
   the stratified validation split and the per-process sharding index into.
3. Otherwise TFDS (``tfds.builder(name, data_dir=data_dir)``). Prepared data is
   used as is; if it is missing and ``download=True``, a quick connectivity
   check runs first so that an offline machine fails in seconds with a message
   saying how to point at local files, instead of ``tfds.load`` retrying for
   minutes.

Splits: ``"train"`` and ``"validation"`` are a deterministic, stratified
partition of the official train split (per class, the *last*
``validation_fraction * count`` examples in file/dataset order, rounded so
that at least that fraction of the whole is held out, are validation; default
fraction 0.1, i.e. 5,000 CIFAR-10 images, 500 per class, and 0.3 for digits,
540 of 1,797). ``"train_full"`` is the whole official train split (for a
final run after model selection) and ``"test"`` the official test split where
one exists. If the source has its own ``validation`` split it is used instead
of carving one.

``"tune"`` and ``"tune_train"`` split ``"train"`` once more by the same rule
(digits: 378 and 879 of its 1,257): a model-selection pair that never touches
``"validation"``, for choosing recipes and evaluation settings (kNN k) before
a figure is reported on validation (``REFERENCE_SPLIT`` pairs each query
split with the split its model trains on).

This module imports neither TensorFlow nor TFDS unless the TFDS source or the
TF decoder is used.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import socket
import threading
from concurrent import futures
from typing import NamedTuple, Sequence

import numpy as np

from contrastive_jax._checks import check_bool

SPLITS = ("train", "validation", "test", "train_full", "tune", "tune_train")
# The split a model evaluated on each query split trains on (and kNN searches).
REFERENCE_SPLIT = {"validation": "train", "test": "train", "tune": "tune_train"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
_JPEG_EXTENSIONS = (".jpg", ".jpeg")

# Per-channel mean and std of the training images in [0, 1] (digits: of all
# 1,797 images; its 70% train split's differ by under 0.002).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "digits": ((0.3053,), (0.3760,)),
    "mnist": ((0.1307,), (0.3081,)),
}
_DEFAULT_VALIDATION_FRACTION = {"digits": 0.3}
DEFAULT_VALIDATION_FRACTION = 0.1

# Host probed before a TFDS download; it serves TFDS metadata and many
# datasets, and answers fast when the network is up.
_PROBE_HOST = ("storage.googleapis.com", 443)
_PROBE_TIMEOUT_S = 3.0


class DatasetUnavailableError(RuntimeError):
  """The dataset is neither on disk nor downloadable (e.g. offline)."""


class SplitArrays(NamedTuple):
  """A split in host memory.

  images: ``[N, H, W, C]``, uint8 (0..255) for image files and TFDS, float32
    (0..1) for digits.
  labels: ``[N]`` int32 in ``0..num_classes - 1``.
  """
  images: np.ndarray
  labels: np.ndarray


@dataclasses.dataclass(frozen=True)
class Source:
  """What ``resolve_source`` found: ``kind`` is "digits", "image_folder" or "tfds".

  For an image folder, ``root`` holds the split folders.
  """
  kind: str
  name: str
  root: pathlib.Path | None = None
  data_dir: str | None = None


_TF_CONFIGURED = False


def import_tf():
  """Imports TensorFlow with its GPUs hidden, so it never takes their memory."""
  global _TF_CONFIGURED
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  if not _TF_CONFIGURED:
    try:
      tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
      pass  # TF's devices were already initialised by someone else.
    _TF_CONFIGURED = True
  return tf


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel ``(mean, std)`` of a known dataset's training images in [0, 1]."""
  if name not in DATASET_STATS:
    raise ValueError(
        f"No per-channel mean/std known for dataset {name!r} (known:"
        f" {sorted(DATASET_STATS)}); pass mean= and std= explicitly, or"
        " normalize=False.")
  return DATASET_STATS[name]


def default_validation_fraction(name: str) -> float:
  return _DEFAULT_VALIDATION_FRACTION.get(name, DEFAULT_VALIDATION_FRACTION)


def check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")


def _is_image_folder_root(path: pathlib.Path) -> bool:
  for split in ("train", "test", "validation"):
    d = path / split
    if d.is_dir() and any(c.is_dir() for c in d.iterdir()):
      return True
  return False


def resolve_source(name: str, *, data_dir: str | os.PathLike | None = None
                   ) -> Source:
  """Chooses the source of dataset ``name`` (see the module docstring)."""
  if not isinstance(name, str) or not name:
    raise TypeError(f"name must be a non-empty str, got {name!r}.")
  if name == "digits":
    return Source("digits", name)
  if data_dir is not None:
    base = pathlib.Path(data_dir).expanduser()
    for root in (base / name, base):
      if root.is_dir() and _is_image_folder_root(root):
        other = root.resolve().name
        if root == base and other != name and other in DATASET_STATS:
          # Would be read, and normalised, as ``name``.
          raise ValueError(
              f"data_dir={str(data_dir)!r} is the image folder of dataset"
              f" {other!r}, not {name!r}; pass its parent, or name={other!r}.")
        return Source("image_folder", name, root.resolve(), str(data_dir))
  return Source("tfds", name, None,
                None if data_dir is None else str(data_dir))


# ----------------------------------------------------------------------------
# Splits.


def validation_indices(labels: np.ndarray, *,
                       validation_fraction: float) -> np.ndarray:
  """Sorted indices of the stratified validation carve-out.

  Per class, the last ``n_c`` examples, where the ``n_c`` are
  ``validation_fraction * count`` rounded down and then raised by one, largest
  remainders first (ties: lower class), until they sum to
  ``ceil(validation_fraction * N)``; so the held-out share is never below the
  fraction asked for (digits at 0.3: 540 of 1,797). At least 1 for classes
  with 2+ examples, never all of a class.
  """
  if not 0.0 < validation_fraction < 1.0:
    raise ValueError(
        f"validation_fraction must be in (0, 1), got {validation_fraction!r}.")
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  # The 1e-9 keeps exact products (0.1 * 5,000) from rounding the wrong way.
  exact = validation_fraction * counts
  n = np.floor(exact + 1e-9).astype(np.int64)
  short = int(np.ceil(validation_fraction * len(labels) - 1e-9)) - int(n.sum())
  if short > 0:
    n[np.argsort(-(exact - n), kind="stable")[:short]] += 1
  n = np.where(counts >= 2, np.clip(n, 1, counts - 1), 0)
  out = [np.flatnonzero(labels == c)[count - k:]
         for c, count, k in zip(classes, counts, n)]
  return np.sort(np.concatenate(out)) if out else np.zeros([0], np.int64)


def carve_split(labels: np.ndarray, split: str, *,
                validation_fraction: float,
                own_validation: bool = False) -> np.ndarray:
  """Sorted indices of ``split`` in the official train split.

  ``split`` is "train", "validation", "train_full", "tune" or "tune_train";
  ``own_validation``: the source has its own validation split, so "train" is
  the whole of ``labels`` and "validation" is not carved.
  """
  n = len(labels)
  if split == "train_full" or (split == "train" and own_validation):
    return np.arange(n)
  if split in ("tune", "tune_train"):
    train = carve_split(labels, "train", validation_fraction=validation_fraction,
                        own_validation=own_validation)
    tune = train[validation_indices(labels[train],
                                    validation_fraction=validation_fraction)]
    return tune if split == "tune" else np.setdiff1d(train, tune)
  if split in ("validation", "train") and not own_validation:
    val = validation_indices(labels, validation_fraction=validation_fraction)
    if split == "validation":
      return val
    keep = np.ones(n, bool)
    keep[val] = False
    return np.flatnonzero(keep)
  raise ValueError(f"cannot carve split {split!r} out of train.")


# ----------------------------------------------------------------------------
# Image folders.


def class_folders(split_dir: str | os.PathLike) -> tuple[str, ...]:
  """Sorted names of the class folders in ``split_dir`` (hidden ones skipped)."""
  return tuple(sorted(d.name for d in pathlib.Path(split_dir).iterdir()
                      if d.is_dir() and not d.name.startswith(".")))


def list_image_folder(split_dir: str | os.PathLike, *,
                      classes: Sequence[str] | None = None
                      ) -> tuple[list[str], np.ndarray, tuple[str, ...]]:
  """Lists ``split_dir/<class>/<image>``.

  Args:
    split_dir: the split's folder.
    classes: the label order, by folder name (a test or validation folder
      takes the train folder's, so that a class missing from it shifts no
      label); a folder not in it is an error. Default: this folder's own
      class folders, sorted.

  Returns:
    ``(paths, labels, class_names)``: paths sorted by class then file name,
    labels ``[N]`` int32 (the index of the class in ``class_names``).
  """
  split_dir = pathlib.Path(split_dir)
  if not split_dir.is_dir():
    raise FileNotFoundError(f"Image folder split {split_dir} does not exist.")
  present = class_folders(split_dir)
  if not present:
    raise ValueError(
        f"{split_dir} has no class folders; expected"
        f" {split_dir}/<class>/<image>.")
  if classes is None:
    classes = present
  else:
    classes = tuple(classes)
    unknown = sorted(set(present) - set(classes))
    if unknown:
      raise ValueError(
          f"{split_dir} has class folders {unknown} that the training split"
          f" does not have (its classes: {list(classes)}).")
  paths, labels = [], []
  for label, cls in enumerate(classes):
    if cls not in present:
      continue
    with os.scandir(split_dir / cls) as it:
      names = sorted(e.name for e in it
                     if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    paths.extend(str(split_dir / cls / n) for n in names)
    labels.extend([label] * len(names))
  if not paths:
    raise ValueError(
        f"{split_dir} has class folders but no images with extensions"
        f" {IMAGE_EXTENSIONS}.")
  return paths, np.asarray(labels, np.int32), classes


def _has_own_validation(root: pathlib.Path) -> bool:
  """Whether an image folder ships a ``validation`` split (else it is carved)."""
  return (root / "validation").is_dir()


def _folder_split_dir(source: Source, split: str) -> tuple[pathlib.Path, bool]:
  """``(folder, carve)``: the folder to read and whether to carve it."""
  root = source.root
  if split == "test":
    if not (root / "test").is_dir():
      raise ValueError(
          f"Dataset {source.name!r} at {root} has no 'test' split (found"
          f" {_present_dirs(root)}). Use split='validation' (carved from"
          " train) for model selection.")
    return root / "test", False
  if split == "validation" and _has_own_validation(root):
    return root / "validation", False
  if not (root / "train").is_dir():
    raise ValueError(
        f"Dataset {source.name!r} at {root} has no 'train' split (found"
        f" {_present_dirs(root)}).")
  whole = split == "train_full" or (
      split == "train" and _has_own_validation(root))
  return root / "train", not whole


def _train_classes(source: Source) -> tuple[str, ...] | None:
  """The training split's class folders: every split's label order."""
  train = source.root / "train"
  return class_folders(train) if train.is_dir() else None


def _present_dirs(root: pathlib.Path) -> list[str]:
  return sorted(d.name for d in root.iterdir() if d.is_dir())


def image_folder_files(name: str, split: str, *,
                       data_dir: str | os.PathLike,
                       validation_fraction: float | None = None
                       ) -> tuple[list[str], np.ndarray]:
  """``(paths, labels)`` of ``split`` of an image-folder dataset.

  Raises:
    ValueError: unknown split, or one the folder does not have.
    DatasetUnavailableError: ``data_dir`` holds no image folder for ``name``.
  """
  check_split(split)
  source = resolve_source(name, data_dir=data_dir)
  if source.kind != "image_folder":
    raise DatasetUnavailableError(
        f"No image folder for {name!r} under data_dir={data_dir!r}: expected"
        f" <data_dir>/{name}/<split>/<class>/<image> or"
        " <data_dir>/<split>/<class>/<image>.")
  folder, carve = _folder_split_dir(source, split)
  paths, labels, _ = list_image_folder(folder, classes=_train_classes(source))
  if carve:
    frac = (default_validation_fraction(name) if validation_fraction is None
            else validation_fraction)
    idx = carve_split(labels, split, validation_fraction=frac,
                      own_validation=_has_own_validation(source.root))
    paths = [paths[i] for i in idx]
    labels = labels[idx]
  return paths, labels


def image_channels(path: str) -> int:
  """1 for a grayscale image file, else 3 (colour images are read as RGB)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    return 1 if im.mode in ("1", "L", "I;16", "I", "F") else 3


def decode_images(paths: Sequence[str], *, decoder: str = "pillow",
                  channels: int | None = None) -> np.ndarray:
  """Decodes image files (all of one size) into ``uint8 [N, H, W, C]``.

  Args:
    paths: image files.
    decoder: "pillow" (no TensorFlow needed) or "tf" (a parallel tf.data
      decode). JPEGs are decoded with libjpeg's accurate integer DCT either
      way, so both give identical pixels.
    channels: 1 or 3; default: from the first image.
  """
  if not paths:
    raise ValueError("no image paths to decode.")
  channels = channels or image_channels(paths[0])
  if decoder == "pillow":
    images = _decode_pillow(paths, channels)
  elif decoder == "tf":
    images = _decode_tf(paths, channels)
  else:
    raise ValueError(f"decoder must be 'pillow' or 'tf', got {decoder!r}.")
  return images


def _decode_pillow(paths: Sequence[str], channels: int) -> np.ndarray:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  mode = "L" if channels == 1 else "RGB"

  def load(path):
    with Image.open(path) as im:
      return np.asarray(im.convert(mode))

  # Pillow releases the GIL while decoding, so threads overlap file reads and
  # decodes.
  with futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as ex:
    arrays = list(ex.map(load, paths, chunksize=256))
  shape = arrays[0].shape
  for path, a in zip(paths, arrays):
    if a.shape != shape:
      raise ValueError(
          f"All images must have the same size; {paths[0]} is {shape[:2]} but"
          f" {path} is {a.shape[:2]}.")
  images = np.stack(arrays)
  return images.reshape(images.shape[:3] + (channels,))


def tf_decode_fn(paths: Sequence[str], channels: int):
  """A TF function ``path -> uint8 [H, W, C]`` for these files."""
  tf = import_tf()
  all_jpeg = all(p.lower().endswith(_JPEG_EXTENSIONS) for p in paths)

  def decode(path):
    data = tf.io.read_file(path)
    if all_jpeg:
      # INTEGER_ACCURATE matches Pillow's (libjpeg's default) decoding
      # bit for bit; TF's default fast DCT differs by up to 5 levels.
      return tf.io.decode_jpeg(data, channels=channels,
                               dct_method="INTEGER_ACCURATE")
    return tf.io.decode_image(data, channels=channels,
                              expand_animations=False)
  return decode


def image_shape(path: str, channels: int) -> tuple[int, int, int]:
  """``(H, W, C)`` of an image file, read from its header with Pillow."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as im:
    width, height = im.size
  return height, width, channels


def _decode_tf(paths: Sequence[str], channels: int) -> np.ndarray:
  tf = import_tf()
  decode = tf_decode_fn(paths, channels)
  shape = image_shape(paths[0], channels)
  ds = tf.data.Dataset.from_tensor_slices(list(paths)).map(
      tf.autograph.experimental.do_not_convert(
          lambda p: tf.ensure_shape(decode(p), shape)),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  try:
    chunks = list(ds.batch(1024).as_numpy_iterator())
  except tf.errors.InvalidArgumentError as e:
    raise ValueError(
        f"All images must have the same size as {paths[0]} {shape}: {e}"
    ) from e
  return np.concatenate(chunks)


def _cache_files(cache_dir, name: str, folder: pathlib.Path,
                 paths: Sequence[str]) -> tuple[pathlib.Path, pathlib.Path]:
  digest = hashlib.sha1(str(folder).encode())
  for p in paths:
    digest.update(p.encode())
    digest.update(str(os.path.getsize(p)).encode())
  tag = f"{name}_{folder.name}_{digest.hexdigest()[:12]}"
  cache_dir = pathlib.Path(cache_dir).expanduser()
  return cache_dir / f"{tag}_images.npy", cache_dir / f"{tag}_labels.npy"


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  with open(tmp, "wb") as f:
    np.save(f, array)
  os.replace(tmp, path)  # atomic: readers never see a half-written cache


def _load_folder_arrays(source: Source, folder: pathlib.Path, *,
                        cache_dir, decoder: str) -> SplitArrays:
  paths, labels, _ = list_image_folder(folder, classes=_train_classes(source))
  if cache_dir is not None:
    img_file, lbl_file = _cache_files(cache_dir, source.name, folder, paths)
    if img_file.exists() and lbl_file.exists():
      images = np.load(img_file)
      cached_labels = np.load(lbl_file)
      if len(images) == len(paths) and np.array_equal(cached_labels, labels):
        return SplitArrays(images, labels)
  images = decode_images(paths, decoder=decoder)
  if cache_dir is not None:
    _save_npy(img_file, images)
    _save_npy(lbl_file, labels)
  return SplitArrays(images, labels)


# ----------------------------------------------------------------------------
# Digits.


def _digits() -> SplitArrays:
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  d = datasets.load_digits()
  images = (d.images.astype(np.float32) / 16.0)[..., None]
  return SplitArrays(images, d.target.astype(np.int32))


# ----------------------------------------------------------------------------
# TFDS.


def _network_reachable(host_port=_PROBE_HOST,
                       timeout: float = _PROBE_TIMEOUT_S) -> bool:
  """True if a TCP connection to ``host_port`` opens within ``timeout`` s.

  Runs in a daemon thread with a hard deadline: a DNS lookup with no resolver
  can otherwise block far longer than the socket timeout.
  """
  result = []

  def probe():
    try:
      with socket.create_connection(host_port, timeout=timeout):
        result.append(True)
    except OSError:
      result.append(False)

  t = threading.Thread(target=probe, daemon=True)
  t.start()
  t.join(timeout + 1.0)
  return bool(result and result[0])


def _offline_message(name: str, data_dir, reason: str) -> str:
  return (
      f"Dataset {name!r} is not available: {reason}\n"
      "To use local files instead, either\n"
      f"  * point data_dir at an image folder <data_dir>/{name}/<split>/"
      "<class>/<image> (or <data_dir>/<split>/<class>/<image>), e.g."
      " data_dir='../shared/data' for CIFAR-10 JPEGs;\n"
      f"  * or prepare the TFDS copy once on a machine with internet"
      f" (tfds.builder({name!r}).download_and_prepare()) and pass its"
      " data_dir;\n"
      "  * or use name='digits' (scikit-learn's digits, always offline).\n"
      f"(data_dir={data_dir!r})")


def tfds_builder(name: str, *, data_dir=None, download: bool = True):
  """A prepared TFDS builder, or a fast, clear error when there is none."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  import_tf()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise ValueError(
        f"Unknown dataset {name!r}: not 'digits', no image folder for it under"
        f" data_dir={data_dir!r}, and not a TFDS dataset.") from e
  if builder.is_prepared():
    return builder
  if not download:
    raise DatasetUnavailableError(_offline_message(
        name, data_dir,
        f"no prepared TFDS data in {builder.data_dir!r} and download=False."))
  if not _network_reachable():
    raise DatasetUnavailableError(_offline_message(
        name, data_dir,
        f"no prepared TFDS data in {builder.data_dir!r} and no network to"
        " download it (checked in a few seconds rather than letting"
        " tfds.load retry for minutes)."))
  builder.download_and_prepare()
  return builder


def _tfds_arrays(builder, split: str) -> SplitArrays:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  images, labels = tfds.as_numpy(
      builder.as_dataset(split=split, batch_size=-1, as_supervised=True))
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  return SplitArrays(images, np.asarray(labels, np.int32))


# ----------------------------------------------------------------------------
# The entry point.


def load_split_arrays(name: str, split: str, *,
                      data_dir: str | os.PathLike | None = None,
                      validation_fraction: float | None = None,
                      cache_dir: str | os.PathLike | None = None,
                      download: bool = True,
                      decoder: str = "pillow") -> SplitArrays:
  """Loads one split into host memory as numpy.

  Args:
    name: "digits", a dataset with an image folder under ``data_dir`` (e.g.
      "cifar10"), or a TFDS name.
    split: one of ``SPLITS``.
    data_dir: where image folders or prepared TFDS data live.
    validation_fraction: per-class fraction of train held out as
      "validation" (default 0.1; 0.3 for digits).
    cache_dir: optional folder for a ``.npy`` copy of a decoded image folder,
      so later loads skip JPEG decoding (keep it outside the repository).
    download: let TFDS download a missing dataset (after a quick network
      check). With False, missing data fails at once.
    decoder: "pillow" or "tf", for image folders.

  Returns:
    ``SplitArrays(images [N, H, W, C], labels [N] int32)``; images uint8, or
    float32 in [0, 1] for digits.

  Raises:
    ValueError: unknown split or dataset, or a split the source lacks.
    DatasetUnavailableError: the data is not local and cannot be downloaded.
  """
  check_split(split)
  check_bool("download", download)
  frac = (default_validation_fraction(name) if validation_fraction is None
          else validation_fraction)
  source = resolve_source(name, data_dir=data_dir)

  if source.kind == "digits":
    if split == "test":
      raise ValueError(
          "Dataset 'digits' has no 'test' split: it is one set of 1,797 images."
          " Use split='validation' (a stratified held-out"
          f" {frac:.0%}) for evaluation.")
    full = _digits()
    idx = carve_split(full.labels, split, validation_fraction=frac)
    return SplitArrays(full.images[idx], full.labels[idx])

  if source.kind == "image_folder":
    folder, carve = _folder_split_dir(source, split)
    if cache_dir is None and carve:
      # Decode only this split's files (e.g. 5,000 instead of 50,000).
      paths, labels = image_folder_files(
          name, split, data_dir=data_dir, validation_fraction=frac)
      return SplitArrays(decode_images(paths, decoder=decoder), labels)
    # The cache holds the whole folder, so train and validation share it.
    full = _load_folder_arrays(source, folder, cache_dir=cache_dir,
                               decoder=decoder)
    if not carve:
      return full
    idx = carve_split(full.labels, split, validation_fraction=frac,
                      own_validation=_has_own_validation(source.root))
    return SplitArrays(full.images[idx], full.labels[idx])

  builder = tfds_builder(name, data_dir=data_dir, download=download)
  available = set(builder.info.splits.keys())
  if split == "test" or (split == "validation" and "validation" in available):
    if split not in available:
      raise ValueError(
          f"TFDS dataset {name!r} has no {split!r} split (has"
          f" {sorted(available)}).")
    return _tfds_arrays(builder, split)
  if "train" not in available:
    raise ValueError(
        f"TFDS dataset {name!r} has no 'train' split (has {sorted(available)}).")
  full = _tfds_arrays(builder, "train")
  if split == "train_full" or (split == "train" and "validation" in available):
    return full
  idx = carve_split(full.labels, split, validation_fraction=frac,
                    own_validation="validation" in available)
  return SplitArrays(full.images[idx], full.labels[idx])
