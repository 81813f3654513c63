"""The tf.data input pipeline: sharded, seeded, augmented numpy batches.

``build_tf_dataset`` returns a ``tf.data.Dataset`` of dicts::

  {"image": float32 [local_batch, H, W, C] or [local_batch, V, H, W, C],
   "label": int32 [local_batch],
   "mask":  bool [local_batch]}            # only when train=False

and ``tf_batches`` the same as numpy dicts. TensorFlow is imported only when
these functions run (with its GPUs hidden), never by importing
``contrastive_jax.data``.

How it works, and why:

* The split is listed (files for an image folder, arrays for digits / TFDS) and
  every process keeps only its shard, ``examples[process_index::
  process_count]``, so each host reads 1/process_count of the files and yields
  ``local_batch = global_batch_size / process_count`` examples a step.
* With ``cache=True`` (default) the shard is decoded once, in parallel, into
  host memory; batches gather from it by index. With ``cache=False`` every
  example is read and decoded from its file again each epoch.
* Training order is an index stream: epoch ``e`` is a stateless permutation
  seeded by ``(seed, process_index, e)`` cut to ``steps_per_epoch * local_batch``
  examples (every epoch has the same number of full batches). Skipping to a
  step (``start_step``) is therefore arithmetic, not replaying the stream, and
  a resumed run sees exactly the batches an uninterrupted one would.
* Augmentations are stateless: the example at stream position ``p`` draws its
  uniforms from the seed ``(seed, process_index, p)`` (``augment_tf``), and
  the batched augmentation turns them into views. Same seed, same batches.
* Class-balanced batches (``classes_per_batch=P, examples_per_class=K``): each
  step draws P classes without replacement and K examples of each (without
  replacement when the class has K, else cycling through a shuffled class),
  as PML's ``MPerClassSampler`` / TF-Similarity's sampler. With several
  processes the step's class order is drawn from a seed shared by all of
  them, process ``i`` takes classes ``[i P / pc, (i + 1) P / pc)`` of it (so
  the global batch has P distinct classes) and draws their K examples from
  its own shard with its own seed. Every shard must therefore hold every
  class of the split (a ValueError otherwise); the interleaved shards do
  unless a class has fewer examples than there are processes.
* Evaluation (``train=False``): one ordered pass; the last batch is padded and
  ``mask`` marks the real examples. All processes yield the same number of
  batches so that multi-host evaluation stays in lockstep.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int
from contrastive_jax.data import augment_jax
from contrastive_jax.data import on_device
from contrastive_jax.data import sources

_MAX_INT64 = 2**62


def steps_per_epoch(num_examples: int, global_batch_size: int, *,
                    process_count: int = 1) -> int:
  """Full batches per epoch for a split of ``num_examples`` (all processes)."""
  return (num_examples // process_count) // (global_batch_size // process_count)


def check_batch_size(global_batch_size: int, *, num_devices: int,
                     process_count: int) -> int:
  """Validates ``global_batch_size``; returns the per-process batch size."""
  check_int("global_batch_size", global_batch_size, 1)
  if global_batch_size % num_devices:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be divisible by the"
        f" number of devices ({num_devices}) so that every device gets the"
        " same share of the batch.")
  if global_batch_size % process_count:
    raise ValueError(
        f"global_batch_size={global_batch_size} must be divisible by the"
        f" number of processes ({process_count}).")
  return int(global_batch_size) // process_count


def _resolve_stats(name: str, channels: int, normalize: bool, mean, std):
  if not normalize:
    return None, None
  if mean is None or std is None:
    mean, std = sources.dataset_stats(name)
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if len(mean) != channels or len(std) != channels:
    raise ValueError(
        f"mean and std need {channels} values (one per channel), got"
        f" {mean} and {std}.")
  return mean, std


def _local_examples(name, split, *, data_dir, cache, cache_dir,
                    validation_fraction, download, process_index,
                    process_count):
  """``(images or None, files or None, labels, all_labels)``.

  The first three are this process's shard; ``all_labels`` are the labels of
  the whole split (shard ``i`` is ``all_labels[i::process_count]``).
  """
  source = sources.resolve_source(name, data_dir=data_dir)
  if source.kind == "image_folder" and cache_dir is None:
    files, labels = sources.image_folder_files(
        name, split, data_dir=data_dir,
        validation_fraction=validation_fraction)
    all_labels = labels
    files = files[process_index::process_count]
    labels = labels[process_index::process_count]
    if not cache:
      return None, files, labels, all_labels
    return sources.decode_images(files, decoder="tf"), None, labels, all_labels
  arrays = sources.load_split_arrays(
      name, split, data_dir=data_dir, validation_fraction=validation_fraction,
      cache_dir=cache_dir, download=download, decoder="tf")
  return (arrays.images[process_index::process_count], None,
          arrays.labels[process_index::process_count], arrays.labels)


def build_tf_dataset(
    name: str,
    split: str,
    *,
    global_batch_size: int,
    data_dir: str | os.PathLike | None = None,
    train: bool | None = None,
    augment: str = "none",
    views: int | None = None,
    seed: int = 0,
    strength: float = 0.5,
    padding: int = 4,
    max_degrees: float = 10.0,
    padding_mode: str = "zero",
    cutout_size: int = 0,
    cutout_inside: bool = False,
    classes_per_batch: int | None = None,
    examples_per_class: int | None = None,
    start_step: int = 0,
    normalize: bool = True,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    validation_fraction: float | None = None,
    download: bool = True,
    process_index: int | None = None,
    process_count: int | None = None,
    num_devices: int | None = None,
):
  """A deterministic tf.data pipeline of augmented batches.

  Args:
    name, split, data_dir, validation_fraction, download: the data; see
      ``sources.load_split_arrays``.
    global_batch_size: examples per step over all processes; must divide by
      the number of devices and processes.
    train: infinite shuffled stream (True) or one ordered, padded pass with a
      "mask" (False). Default: True for the training splits ("train",
      "train_full", "tune_train").
    augment: one of ``augment_jax.AUGMENTATIONS``.
    views: None for ``image [B, H, W, C]``; an int V for ``[B, V, H, W, C]``,
      V independently augmented views of each image (2 for SimCLR/SupCon).
    seed: seeds the order and the augmentations.
    strength, padding, max_degrees, padding_mode, cutout_size,
      cutout_inside: augmentation options; see
      ``augment_jax.apply_augment``.
    classes_per_batch, examples_per_class: P and K of class-balanced batches
      (training only; ``P * K == global_batch_size``).
    start_step: batches already consumed (resume: the stream continues at the
      same data position). Epoch ``e`` starts at ``e * steps_per_epoch``.
    normalize: subtract ``mean`` and divide by ``std`` per channel (default:
      the dataset's, ``sources.DATASET_STATS``); else images are in [0, 1].
    cache: decode once into memory (True) or per epoch from the files.
    cache_dir: optional on-disk ``.npy`` cache of decoded image folders.
    process_index, process_count, num_devices: default to JAX's.

  Returns:
    A ``tf.data.Dataset`` of dicts (see the module docstring).
  """
  tf = sources.import_tf()
  from contrastive_jax.data import augment_tf  # pylint: disable=g-import-not-at-top

  sources.check_split(split)
  augment_jax.check_augment(augment)
  n_views = augment_jax._check_views(views)  # pylint: disable=protected-access
  aug_opts = dict(padding=padding, padding_mode=padding_mode,
                  cutout_size=cutout_size, cutout_inside=cutout_inside)
  augment_jax.check_options(augment, **aug_opts)  # the values, before reading
  train = (split in ("train", "train_full", "tune_train") if train is None
           else check_bool("train", train))
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  num_devices = jax.device_count() if num_devices is None else num_devices
  if not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index} must be in [0, {process_count}).")
  local_batch = check_batch_size(global_batch_size, num_devices=num_devices,
                                 process_count=process_count)
  check_int("start_step", start_step, 0)
  for flag, value in (("normalize", normalize), ("cache", cache),
                      ("download", download)):
    check_bool(flag, value)
  if normalize and (mean is None or std is None):
    mean, std = sources.dataset_stats(name)  # fail before reading any data
  balanced = classes_per_batch is not None or examples_per_class is not None
  if balanced:
    if not train:
      raise ValueError("classes_per_batch/examples_per_class are for"
                       " training (train=True) only.")
    local_p = _check_pk(classes_per_batch, examples_per_class,
                        global_batch_size, process_count)

  images, files, labels, all_labels = _local_examples(
      name, split, data_dir=data_dir, cache=cache, cache_dir=cache_dir,
      validation_fraction=validation_fraction, download=download,
      process_index=process_index, process_count=process_count)
  n_total, n_local = len(all_labels), len(labels)
  if files is not None:
    channels = sources.image_channels(files[0])
    shape = sources.image_shape(files[0], channels)
  else:
    shape = images.shape[1:]
    channels = shape[-1]
  mean, std = _resolve_stats(name, channels, normalize, mean, std)
  augment_jax.check_options(augment, height=shape[0], width=shape[1],
                            **aug_opts)

  base = tf.constant([seed, process_index], tf.int64)
  fold_in = tf.random.experimental.stateless_fold_in
  perm_base, aug_base, pk_base = (fold_in(base, i) for i in range(3))
  # The class draws of class-balanced batches: the same on every process
  # (process 0's pk_base, so one process draws as it always did).
  shared_pk_base = fold_in(tf.constant([seed, 0], tf.int64), 2)
  labels_t = tf.constant(labels, tf.int32)
  # The map functions branch only on Python values: skip AutoGraph, whose
  # source conversion costs seconds per function.
  plain = tf.autograph.experimental.do_not_convert

  # 1. The index stream: (stream position, example index[, is real]).
  if not train:
    n_batches = math.ceil(math.ceil(n_total / process_count) / local_batch)
    start = start_step * local_batch
    pos = tf.data.Dataset.range(start, max(n_batches * local_batch, start))
    stream = pos.map(plain(lambda p: (p, tf.minimum(p, n_local - 1),
                                          p < n_local)))
  elif balanced:
    all_counts = _check_process_classes(all_labels, classes_per_batch,
                                        process_count)
    table, counts = _class_table(labels, num_classes=len(all_counts))
    table_t, counts_t = tf.constant(table), tf.constant(counts)
    all_counts_t = tf.constant(all_counts)

    def balanced_indices(step):
      return _tf_balanced_indices(
          tf, fold_in(shared_pk_base, step), fold_in(pk_base, step), table_t,
          counts_t, all_counts_t, local_p, examples_per_class,
          offset=process_index * local_p)

    idx = tf.data.Dataset.range(start_step, _MAX_INT64).map(
        plain(balanced_indices)).unbatch()
    pos = tf.data.Dataset.range(start_step * local_batch, _MAX_INT64)
    stream = tf.data.Dataset.zip(pos, idx).map(plain(lambda p, i: (p, i, True)))
  else:
    spe = steps_per_epoch(n_total, global_batch_size,
                          process_count=process_count)
    if spe < 1:
      raise ValueError(
          f"global_batch_size={global_batch_size} is larger than the split"
          f" ({n_total} examples over {process_count} processes).")
    take = spe * local_batch
    start_epoch, offset = divmod(start_step, spe)

    def epoch_indices(epoch):
      u = tf.random.stateless_uniform([n_local], seed=fold_in(perm_base, epoch))
      return tf.data.Dataset.from_tensor_slices(
          tf.argsort(u, stable=True)[:take])

    idx = tf.data.Dataset.range(start_epoch, _MAX_INT64).flat_map(
        plain(epoch_indices)).skip(offset * local_batch)
    pos = tf.data.Dataset.range(start_step * local_batch, _MAX_INT64)
    stream = tf.data.Dataset.zip(pos, idx).map(plain(lambda p, i: (p, i, True)))

  # 2. Per example: its own stateless uniforms (and its file, if uncached).
  needs_uniforms = augment != "none"

  def per_example(p, i, real):
    ex = {"index": tf.cast(i, tf.int32), "mask": real}
    if needs_uniforms:
      ex["uniforms"] = augment_tf.example_uniforms(
          fold_in(aug_base, p), augment=augment, views=n_views)
    if files is not None:
      ex["image"] = tf.ensure_shape(decode(tf.gather(files_t, i)), shape)
    return ex

  if files is not None:
    decode = sources.tf_decode_fn(files, channels)
    files_t = tf.constant(files)
  else:
    # A variable, not a constant: the decoded split is captured by reference
    # instead of being copied into the dataset's graph.
    images_v = tf.Variable(images, trainable=False, name="decoded_images")
  ds = stream.map(plain(per_example), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local_batch, drop_remainder=True)

  # 3. Per batch: gather, augment (vectorised), normalise.
  def per_batch(ex):
    img = ex["image"] if files is not None else tf.gather(images_v, ex["index"])
    if needs_uniforms:
      x = augment_tf.apply_augment(img, ex["uniforms"], augment=augment,
                                   strength=strength, max_degrees=max_degrees,
                                   **aug_opts)
    else:
      x = augment_tf.to_float(img)[:, None]
      if n_views > 1:
        x = tf.repeat(x, n_views, axis=1)
    if mean is not None:
      x = augment_tf.normalize(x, mean=mean, std=std)
    if views is None:
      x = x[:, 0]
    out = {"image": x, "label": tf.gather(labels_t, ex["index"])}
    if not train:
      out["mask"] = ex["mask"]
    return out

  ds = ds.map(plain(per_batch), num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  options = tf.data.Options()
  options.deterministic = True
  ds = ds.with_options(options)
  return ds


def tf_batches(name: str, split: str, **kwargs: Any
               ) -> Iterator[dict[str, np.ndarray]]:
  """``build_tf_dataset(name, split, **kwargs)`` as numpy dicts."""
  return build_tf_dataset(name, split, **kwargs).as_numpy_iterator()


def _check_pk(p, k, global_batch_size, process_count) -> int:
  for arg, v in (("classes_per_batch", p), ("examples_per_class", k)):
    check_int(arg, v, 1,
              hint=" (set both classes_per_batch and examples_per_class)")
  if p * k != global_batch_size:
    raise ValueError(
        f"classes_per_batch * examples_per_class = {p} * {k} = {p * k} must"
        f" equal global_batch_size={global_batch_size}.")
  if p % process_count:
    raise ValueError(
        f"classes_per_batch={p} must be divisible by the number of processes"
        f" ({process_count}): each process draws its share of the classes.")
  return p // process_count


def _check_process_classes(all_labels: np.ndarray, classes_per_batch: int,
                           process_count: int) -> np.ndarray:
  """Class counts of the split; raises unless P x K batches can be drawn.

  Each process takes its share of every step's P classes from a draw shared
  by all processes, so any class may be asked of any process: the split
  needs P classes and every shard ``all_labels[i::process_count]`` every
  class (``on_device.check_class_shards``). Checked on the whole split, so
  every process fails alike.
  """
  all_labels = np.asarray(all_labels)
  num_classes = int(all_labels.max()) + 1
  shards = np.stack([np.bincount(all_labels[i::process_count],
                                 minlength=num_classes)
                     for i in range(process_count)])
  on_device.check_class_shards(shards, classes_per_batch, unit="process")
  return shards.sum(0).astype(np.int32)


def _class_table(labels: np.ndarray, num_classes: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """``table [C, max_count]`` of example indices per class, ``counts [C]``."""
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if len(labels) else 0
  counts = np.bincount(labels, minlength=num_classes).astype(np.int32)
  table = np.zeros([num_classes, max(int(counts.max()), 1)], np.int32)
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    table[c, :len(members)] = members
  return table, counts


def _tf_balanced_indices(tf, class_seed, example_seed, table, counts,
                         all_counts, p: int, k: int, offset: int = 0):
  """``[p * k]`` indices: ``p`` present classes, ``k`` examples each.

  The classes are ``[offset, offset + p)`` of a class order drawn from
  ``class_seed`` (shared by the processes, whose offsets tile the P classes
  of the step), with the classes absent from the split (``all_counts`` 0)
  last. The examples of this shard (``table``, ``counts``) are drawn from
  ``example_seed``.
  """
  fold_in = tf.random.experimental.stateless_fold_in
  s_cls, s_ex = fold_in(class_seed, 0), fold_in(example_seed, 1)
  num_classes, width = table.shape
  # Absent classes (count 0 in the split) sort last.
  u = tf.random.stateless_uniform([num_classes], seed=s_cls)
  u = tf.where(all_counts > 0, u, 2.0)
  classes = tf.argsort(u, stable=True)[offset:offset + p]
  cls_counts = tf.gather(counts, classes)
  v = tf.random.stateless_uniform([p, width], seed=s_ex)
  v = tf.where(tf.range(width)[None, :] < cls_counts[:, None], v, 2.0)
  order = tf.argsort(v, axis=1, stable=True)  # a random order of each class
  # k draws: without replacement when the class has k examples, else cycle.
  slots = tf.range(k)[None, :] % cls_counts[:, None]
  positions = tf.gather(order, slots, batch_dims=1)
  idx = tf.gather(tf.gather(table, classes), positions, batch_dims=1)
  return tf.reshape(idx, [-1])
