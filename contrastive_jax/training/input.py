"""Training and evaluation inputs chosen by ``config.input``.

* ``"device"`` (default; no TensorFlow): the split lives on the accelerator
  and batch ``s`` is drawn there as a pure function of ``(key, s)``
  (``contrastive_jax.data.on_device``). With ``data.shard_on_device`` every
  device keeps and samples its own slice of the split (scales to big
  datasets, but batch composition then depends on the device count);
  without, the split is replicated and the *global* batch is drawn once and
  split, so any device count sees the same batches (the 8-vs-1 device test).
* ``"tf"``: the tf.data pipeline (``contrastive_jax.data.pipeline``), each
  process reading its own shard. TensorFlow is imported only here.

Both resume at a data position by arithmetic (``start_step``), never by
replaying the stream.
"""

from __future__ import annotations

from typing import Iterator

import jax
import numpy as np
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax import data as cdata
from contrastive_jax._checks import check_bool

__all__ = ["TrainInput", "make_train_input", "load_eval_split",
           "normalization", "replicate", "run_splits"]


def normalization(config, channels: int):
  """``(mean, std)`` of ``config.dataset`` or ``(None, None)``."""
  if not check_bool("data.normalize", config.data.get("normalize", True)):
    return None, None
  stats = cdata.DATASET_STATS.get(config.dataset)
  if stats is None or len(stats[0]) != channels:
    return None, None
  return stats


def _views(config):
  v = int(config.data.get("views", 0))
  return v if v > 0 else None


def _pk(config):
  p = int(config.data.get("classes_per_batch", 0))
  k = int(config.data.get("examples_per_class", 0))
  return (p, k) if p and k else (None, None)


def run_splits(config) -> tuple[str, str]:
  """``(train split, evaluation split)``: ``("train", "validation")``, or
  with ``data.tune`` the model-selection pair ``("tune_train", "tune")``."""
  tune = check_bool("data.tune", config.data.get("tune", False))
  query = "tune" if tune else "validation"
  return cdata.REFERENCE_SPLIT[query], query


def _data_dir(config):
  return config.get("data_dir", "") or None


class TrainInput:
  """An iterator of global batches sharded over ``mesh``'s ``"data"`` axis.

  Attributes:
    split: the training split (``run_splits``).
    image_shape: ``(H, W, C)``.
    num_classes: classes in the training split.
    num_train: examples in the training split.
  """

  def __init__(self, config, mesh: Mesh, *, seed_key):
    self._config = config
    self._mesh = mesh
    self._key = seed_key
    self._sharding = NamedSharding(mesh, P("data"))
    if config.input not in ("device", "tf"):
      raise ValueError(f"config.input must be 'device' or 'tf', got"
                       f" {config.input!r}.")
    self.split = run_splits(config)[0]
    self._arrays = cdata.load_split_arrays(config.dataset, self.split,
                                           data_dir=_data_dir(config))
    self.image_shape = tuple(self._arrays.images.shape[1:])
    self.num_classes = int(self._arrays.labels.max()) + 1
    self.num_train = int(self._arrays.labels.shape[0])
    self._it = None

  def init_index(self, n: int) -> np.ndarray:
    """Which ``min(n, num_train)`` training images ``init_images`` takes: a
    fixed random subset (seeded by ``config.seed``), in split order.

    Not the first ``n``: image folders load class by class, so the first
    5,000 CIFAR-10 images are 4,500 airplanes and 500 cars (airbench takes
    the first 5,000 of CIFAR's own file, which is shuffled).
    """
    rng = np.random.default_rng(int(self._config.seed))
    return np.sort(rng.permutation(self.num_train)[:n])

  def init_images(self, n: int) -> np.ndarray:
    """``n`` training images (``init_index``), float32 and normalised as the
    batches are (unaugmented), for a data-dependent initialisation (call
    before ``start``)."""
    if self._arrays is None:
      raise RuntimeError("init_images must be called before start().")
    return _normalised_float(self._config,
                             self._arrays.images[self.init_index(n)])

  def start(self, start_step: int) -> "TrainInput":
    """Positions the stream at batch ``start_step`` (the resumed step)."""
    config, dc = self._config, self._config.data
    views = _views(config)
    p, k = _pk(config)
    mean, std = normalization(config, self.image_shape[-1])
    aug = dict(strength=dc.get("strength", 0.5), padding=dc.get("padding", 4),
               max_degrees=dc.get("max_degrees", 10.0),
               padding_mode=dc.get("padding_mode", "zero"),
               cutout_size=dc.get("cutout_size", 0),
               cutout_inside=dc.get("cutout_inside", False))
    if config.input == "device":
      arrays = self._arrays
      if check_bool("data.shard_on_device", dc.get("shard_on_device", False)):
        device_data = cdata.put_on_device(arrays.images, arrays.labels,
                                          sharding=self._sharding)
      else:
        device_data = cdata.DeviceData(*(
            replicate(a, self._mesh) for a in _host_device_data(arrays)))
      self._it = cdata.device_batches(
          device_data, key=self._key, batch_size=int(config.batch_size),
          augment=dc.augment, views=views, mean=mean, std=std,
          classes_per_batch=p, examples_per_class=k,
          num_classes=self.num_classes if p else None,
          start_step=int(start_step), **aug)
      self._put = jax.jit(lambda b: b, out_shardings=self._sharding)
    else:
      seed = int(jax.random.randint(self._key, (), 0, 2**31 - 1))
      self._it = cdata.tf_batches(
          config.dataset, self.split, global_batch_size=int(config.batch_size),
          data_dir=_data_dir(config), augment=dc.augment, views=views,
          seed=seed, classes_per_batch=p, examples_per_class=k,
          start_step=int(start_step), normalize=mean is not None, **aug)
      self._put = lambda b: jax.tree.map(
          lambda a: jax.make_array_from_process_local_data(self._sharding, a),
          {"image": b["image"], "label": b["label"]})
    self._arrays = None  # the device / tf.data copy is the one used now
    return self

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self._it is None:
      raise RuntimeError("call start(start_step) first.")
    return self._put(next(self._it))


def _host_device_data(arrays):
  images = arrays.images
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  return images, arrays.labels.astype(np.int32)


def replicate(a, mesh):
  """A host array replicated on every device of ``mesh`` (multi-process safe)."""
  a = np.asarray(a)
  return jax.make_array_from_callback(a.shape, NamedSharding(mesh, P()),
                                      lambda idx: a[idx])


def make_train_input(config, mesh: Mesh, *, seed_key) -> TrainInput:
  return TrainInput(config, mesh, seed_key=seed_key)


def load_eval_split(config, split: str):
  """``(images float32 [N, H, W, C] normalised, labels [N])`` in host memory."""
  arrays = cdata.load_split_arrays(config.dataset, split,
                                   data_dir=_data_dir(config))
  return _normalised_float(config, arrays.images), arrays.labels.astype(np.int32)


def _normalised_float(config, images: np.ndarray) -> np.ndarray:
  """float32 images normalised as the training batches are (host NumPy):
  uint8 scaled by 1/255 (``augment_jax.to_float``), then ``normalization``."""
  images = (images.astype(np.float32) * np.float32(1.0 / 255.0) if images.dtype == np.uint8
            else images.astype(np.float32))
  mean, std = normalization(config, images.shape[-1])
  if mean is not None:
    images = (images - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
  return images
