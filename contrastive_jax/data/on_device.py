"""On-device input path: the whole split in accelerator memory, augmented there.

CIFAR-10's train split is 150 MB as uint8, so it fits on any accelerator. As
in airbench, load it once, keep it on device, and build every batch there:
a per-epoch permutation (``jax.random.fold_in(key, epoch)``), a gather by
index, and the augmentations of ``augment_jax`` (which match the tf.data ones
in distribution). No TensorFlow is needed: image folders are decoded with
Pillow (optionally cached as ``.npy``), digits come from scikit-learn.

Keys: ``key`` is split by purpose with ``fold_in`` (0: order, 1: augmentation,
2: class-balanced draws) and then by epoch or step, so batch ``s`` depends
only on ``(key, s)``: resuming at ``start_step`` gives the same batches an
uninterrupted run would.

Sharding: pass a ``jax.sharding.NamedSharding`` whose spec splits axis 0 over
a mesh axis (e.g. ``NamedSharding(mesh, P("data"))``). The split is then dealt
out class by class into one shard per device along that axis (the remainder
of ``N / num_shards`` examples is dropped): shard ``d`` holds examples ``d,
d + S, d + 2S, ...`` of the split stably sorted by label, so every shard has
``floor`` or ``ceil`` of ``1 / S`` of every class, whatever the order of the
split (image folders are sorted by class: contiguous shards would give each
device only a few classes). Batches are drawn under ``jax.shard_map``: every
device permutes and augments its own shard, with no cross-device traffic,
and the batch comes out sharded the same way. Class-balanced batches draw
their P classes from the run's key, the same on every shard, and shard ``d``
takes classes ``[d P / S, (d + 1) P / S)`` of that draw and K examples of
each from its own shard; so every shard must hold every class (checked
before the first batch).
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from typing import Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from contrastive_jax._checks import check_int
from contrastive_jax.data import augment_jax
from contrastive_jax.data import sources

_ORDER, _AUGMENT, _BALANCED = 0, 1, 2


class DeviceData(NamedTuple):
  """A split on device (a pytree).

  images: ``[N, H, W, C]`` uint8 (0..255) or float32 (0..1).
  labels: ``[N]`` int32.
  """
  images: jax.Array
  labels: jax.Array


def put_on_device(images: np.ndarray, labels: np.ndarray, *,
                  sharding: NamedSharding | None = None) -> DeviceData:
  """Moves a split to device, sharded over ``sharding``'s first axis if given.

  Args:
    images: ``[N, H, W, C]`` uint8 or float in [0, 1].
    labels: ``[N]`` integers.
    sharding: None (default device) or a ``NamedSharding`` splitting axis 0.
      With one, ``N`` is cut to a multiple of the shard count (the last
      ``N % shards`` examples are dropped), the examples are dealt out by
      class (shard ``d`` gets examples ``d, d + S, ...`` of the kept split
      stably sorted by label; see the module docstring), and each process
      places only the slices of its own devices. Position ``i`` of the
      returned arrays then holds example ``stratified_order(labels, S)[i]``.

  Returns:
    ``DeviceData``.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  augment_jax.check_images(images)
  if labels.shape != (images.shape[0],) or not np.issubdtype(
      labels.dtype, np.integer):
    raise ValueError(
        f"labels must be integers of shape [{images.shape[0]}], got"
        f" {labels.dtype} {labels.shape}.")
  labels = labels.astype(np.int32)
  if images.dtype != np.uint8:
    images = images.astype(np.float32)
  if sharding is None:
    return DeviceData(jnp.asarray(images), jnp.asarray(labels))
  shards = _num_shards(sharding)
  n = images.shape[0] - images.shape[0] % shards
  if n == 0:
    raise ValueError(
        f"{images.shape[0]} examples cannot be split over {shards} shards.")
  order = stratified_order(labels[:n], shards)
  lab_sharding = NamedSharding(sharding.mesh, PartitionSpec(sharding.spec[0]))

  def gather(array):  # only the rows of the requested shard are copied
    return lambda idx: array[(order[idx[0]],) + tuple(idx[1:])]

  return DeviceData(
      jax.make_array_from_callback((n,) + images.shape[1:], sharding,
                                   gather(images)),
      jax.make_array_from_callback((n,), lab_sharding, gather(labels)))


def stratified_order(labels: np.ndarray, shards: int) -> np.ndarray:
  """The layout of a sharded split: ``[N]`` indices into ``labels``.

  Shard ``d`` (positions ``[d N / S, (d + 1) N / S)``) holds examples ``d, d +
  S, d + 2S, ...`` of the split stably sorted by label, so each shard gets
  ``floor`` or ``ceil`` of ``1 / S`` of every class. ``N`` must be a multiple
  of ``shards``.
  """
  labels = np.asarray(labels)
  n = labels.shape[0]
  if n % shards:
    raise ValueError(f"{n} examples are not a multiple of {shards} shards.")
  by_class = np.argsort(labels, kind="stable")
  return by_class.reshape(n // shards, shards).T.reshape(-1)


def load_device_data(name: str, split: str, *,
                     data_dir: str | os.PathLike | None = None,
                     cache_dir: str | os.PathLike | None = None,
                     sharding: NamedSharding | None = None,
                     validation_fraction: float | None = None,
                     download: bool = True) -> DeviceData:
  """Loads a split (``sources.load_split_arrays``, Pillow) onto device.

  Args:
    name, split, data_dir, validation_fraction, download: see
      ``sources.load_split_arrays``.
    cache_dir: optional folder for the decoded ``.npy`` (outside the repo,
      e.g. ``~/.cache/contrastive_jax``); later loads skip JPEG decoding.
    sharding: see ``put_on_device``.

  Returns:
    ``DeviceData`` with uint8 images (float32 for digits).
  """
  arrays = sources.load_split_arrays(
      name, split, data_dir=data_dir, cache_dir=cache_dir,
      validation_fraction=validation_fraction, download=download,
      decoder="pillow")
  return put_on_device(arrays.images, arrays.labels, sharding=sharding)


def _num_shards(sharding: NamedSharding) -> int:
  if not isinstance(sharding, NamedSharding):
    raise TypeError(
        f"sharding must be a jax.sharding.NamedSharding, got {type(sharding)}.")
  axes = _data_axes(sharding)
  if not axes:
    raise ValueError(
        "sharding must split axis 0 (the examples) over a mesh axis, e.g."
        f" NamedSharding(mesh, PartitionSpec('data')); got {sharding.spec}.")
  return math.prod(sharding.mesh.shape[a] for a in axes)


def _data_axes(sharding) -> tuple[str, ...]:
  if not isinstance(sharding, NamedSharding) or not len(sharding.spec):
    return ()
  first = sharding.spec[0]
  if first is None:
    return ()
  return tuple(first) if isinstance(first, (tuple, list)) else (first,)


# ----------------------------------------------------------------------------
# Indices.


def epoch_permutation(key, epoch, num_examples: int) -> jax.Array:
  """The order of epoch ``epoch``: ``[num_examples]`` int32."""
  return jax.random.permutation(jax.random.fold_in(key, epoch), num_examples)


def batch_indices(key, step, *, num_examples: int, batch_size: int
                  ) -> jax.Array:
  """Indices ``[batch_size]`` of training batch ``step``.

  Epochs have ``num_examples // batch_size`` full batches; batch ``i`` of
  epoch ``e`` is slice ``i`` of ``epoch_permutation(order_key, e, N)``.
  """
  spe = _steps_per_epoch(num_examples, batch_size)
  epoch, i = jnp.divmod(step, spe)
  perm = epoch_permutation(jax.random.fold_in(key, _ORDER), epoch,
                           num_examples)
  return jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)


def _steps_per_epoch(num_examples: int, batch_size: int) -> int:
  check_int("batch_size", batch_size, 1)
  spe = num_examples // batch_size
  if spe < 1:
    raise ValueError(
        f"batch size {batch_size} is larger than the split ({num_examples}"
        " examples per shard).")
  return spe


def balanced_batch_indices(key, step, labels, *, num_classes: int,
                           classes_per_batch: int, examples_per_class: int
                           ) -> jax.Array:
  """``[P * K]`` indices: P classes without replacement, K examples of each.

  Examples are drawn without replacement when the class has K, else cycling
  through a random order of the class (as the tf.data sampler).

  Args:
    key: PRNG key (the batch's draw is ``fold_in(fold_in(key, 2), step)``).
    step: batch number.
    labels: ``[N]`` int labels in ``0..num_classes - 1`` (static N).
    num_classes, classes_per_batch, examples_per_class: C, P, K (static).
  """
  k_cls, k_ex = _balanced_keys(key, step)
  counts = _class_counts(labels, num_classes)
  return _balanced_indices(k_cls, k_ex, labels, counts, counts,
                           classes_per_batch=classes_per_batch,
                           examples_per_class=examples_per_class)


def _balanced_keys(key, step):
  """``(class key, example key)`` of class-balanced batch ``step``."""
  return jax.random.split(
      jax.random.fold_in(jax.random.fold_in(key, _BALANCED), step))


def _class_counts(labels, num_classes: int) -> jax.Array:
  return jnp.zeros([num_classes], jnp.int32).at[labels].add(1)


def _balanced_indices(k_cls, k_ex, labels, counts, present_counts, *,
                      classes_per_batch: int, examples_per_class: int,
                      offset=0) -> jax.Array:
  """``[P * K]`` indices into ``labels`` (see ``balanced_batch_indices``).

  The classes are ``argsort(u)[offset:offset + P]`` of uniforms ``u`` drawn
  from ``k_cls``, with the classes whose ``present_counts`` is 0 sorted last:
  shards that share ``k_cls`` and ``present_counts`` but take different
  ``offset`` slices get disjoint classes. The examples come from ``k_ex`` and
  this shard's ``labels`` (``counts`` = their class counts).
  """
  p, k = classes_per_batch, examples_per_class
  n = labels.shape[0]
  num_classes = counts.shape[0]
  u = jnp.where(present_counts > 0,
                jax.random.uniform(k_cls, [num_classes]), 2.0)
  classes = jax.lax.dynamic_slice_in_dim(jnp.argsort(u), offset, p)
  # A random order of all examples, grouped by class: sort by
  # (label, uniform); class c then occupies [start[c], start[c] + count[c]).
  order = jnp.lexsort((jax.random.uniform(k_ex, [n]), labels))
  starts = jnp.cumsum(counts) - counts
  slots = jnp.arange(k)[None, :] % counts[classes][:, None]
  return order[starts[classes][:, None] + slots].reshape(-1)


# ----------------------------------------------------------------------------
# Batches.


def make_batch(key, data: DeviceData, indices, step, *, augment: str = "none",
               views: int | None = None, mean: Sequence[float] | None = None,
               std: Sequence[float] | None = None, strength: float = 0.5,
               padding: int = 4, max_degrees: float = 10.0,
               padding_mode: str = "zero", cutout_size: int = 0,
               cutout_inside: bool = False) -> dict:
  """Gathers ``indices`` and augments them (jit-able; options static).

  Args:
    key: PRNG key; the augmentation uses ``fold_in(fold_in(key, 1), step)``.
    data: ``DeviceData``.
    indices: ``[B]`` int indices into ``data``.
    step: batch number (for the augmentation key).
    augment: one of ``augment_jax.AUGMENTATIONS``.
    views: None for ``[B, H, W, C]``; an int V for ``[B, V, H, W, C]``.
    mean, std: per-channel normalisation (both or neither; None: [0, 1]).
    strength, padding, max_degrees, padding_mode, cutout_size,
      cutout_inside: see ``augment_jax.apply_augment``.

  Returns:
    ``{"image": float32 [B, (V,) H, W, C], "label": int32 [B]}``.
  """
  augment_jax.check_options(
      augment, padding=padding, padding_mode=padding_mode,
      cutout_size=cutout_size, cutout_inside=cutout_inside,
      height=data.images.shape[1], width=data.images.shape[2])
  images = jnp.take(data.images, indices, axis=0)
  labels = jnp.take(data.labels, indices, axis=0)
  k = jax.random.fold_in(jax.random.fold_in(key, _AUGMENT), step)
  if augment == "none":
    x = augment_jax.to_float(images)
    if views is not None:
      x = jnp.repeat(x[:, None], augment_jax._check_views(views), axis=1)  # pylint: disable=protected-access
  else:
    x = augment_jax.augment_views(k, images, augment=augment, views=views,
                                  strength=strength, padding=padding,
                                  max_degrees=max_degrees,
                                  padding_mode=padding_mode,
                                  cutout_size=cutout_size,
                                  cutout_inside=cutout_inside)
  if (mean is None) != (std is None):
    raise ValueError("pass both mean and std, or neither.")
  if mean is not None:
    x = augment_jax.normalize(x, mean=mean, std=std)
  return {"image": x, "label": labels}


def sample_batch(key, data: DeviceData, step, *, batch_size: int,
                 augment: str = "none", views: int | None = None,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None,
                 classes_per_batch: int | None = None,
                 examples_per_class: int | None = None,
                 num_classes: int | None = None,
                 strength: float = 0.5, padding: int = 4,
                 max_degrees: float = 10.0, padding_mode: str = "zero",
                 cutout_size: int = 0, cutout_inside: bool = False) -> dict:
  """Training batch ``step``, as a pure function of ``(key, data, step)``.

  Jit it with the options static (``device_batches`` does), or call it inside
  a jitted train step to fuse input and training. Unsharded ``data`` only;
  for sharded data use ``device_batches``.

  Args:
    key: PRNG key of the run.
    data: ``DeviceData`` (N examples).
    step: batch number; epoch ``step // (N // batch_size)``.
    batch_size: examples per batch.
    augment, views, mean, std, strength, padding, max_degrees, padding_mode,
      cutout_size, cutout_inside: see ``make_batch``.
    classes_per_batch, examples_per_class, num_classes: P, K and C for
      class-balanced batches (``P * K == batch_size``); default: uniform.

  Returns:
    ``{"image": float32 [batch_size, (V,) H, W, C], "label": int32 [batch]}``.
  """
  n = data.labels.shape[0]
  if classes_per_batch is None and examples_per_class is None:
    idx = batch_indices(key, step, num_examples=n, batch_size=batch_size)
  else:
    _check_pk(classes_per_batch, examples_per_class, batch_size, num_classes)
    _check_concrete_labels(data.labels, num_classes, classes_per_batch)
    idx = balanced_batch_indices(
        key, step, data.labels, num_classes=num_classes,
        classes_per_batch=classes_per_batch,
        examples_per_class=examples_per_class)
  return make_batch(key, data, idx, step, augment=augment, views=views,
                    mean=mean, std=std, strength=strength, padding=padding,
                    max_degrees=max_degrees, padding_mode=padding_mode,
                    cutout_size=cutout_size, cutout_inside=cutout_inside)


def _check_concrete_labels(labels, num_classes: int,
                           classes_per_batch: int) -> None:
  """The class-balanced draw's preconditions, when the labels are not traced.

  A label outside ``0..num_classes - 1`` would never be drawn, and fewer
  present classes than P would repeat others' examples in the absent ones'
  places (``device_batches`` checks the same).
  """
  try:
    labels = np.asarray(labels)
  except jax.errors.TracerArrayConversionError:
    return  # under jit: the caller's to check (device_batches does)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
        f"labels must be in 0..{num_classes - 1} (num_classes={num_classes}),"
        f" got {labels.min()}..{labels.max()}.")
  check_class_shards(np.bincount(labels, minlength=num_classes)[None],
                     classes_per_batch, unit="split")


def _check_pk(p, k, batch_size, num_classes):
  for arg, v in (("classes_per_batch", p), ("examples_per_class", k),
                 ("num_classes", num_classes)):
    check_int(arg, v, 1, hint=" for class-balanced batches")
  if p * k != batch_size:
    raise ValueError(
        f"classes_per_batch * examples_per_class = {p * k} must equal"
        f" batch_size={batch_size}.")
  if p > num_classes:
    raise ValueError(
        f"classes_per_batch={p} exceeds num_classes={num_classes}.")


def device_batches(data: DeviceData, *, key, batch_size: int,
                   augment: str = "none", views: int | None = None,
                   mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None,
                   classes_per_batch: int | None = None,
                   examples_per_class: int | None = None,
                   num_classes: int | None = None,
                   start_step: int = 0, num_steps: int | None = None,
                   strength: float = 0.5, padding: int = 4,
                   max_degrees: float = 10.0, padding_mode: str = "zero",
                   cutout_size: int = 0,
                   cutout_inside: bool = False) -> Iterator[dict]:
  """Iterates training batches on device, from ``start_step`` on.

  Batch ``s`` equals ``sample_batch(key, data, s, ...)`` for unsharded data.
  For data placed with a sharding (``put_on_device``), each of the S shards
  yields ``batch_size / S`` examples of its own shard (keys folded with the
  shard index) and the batch is sharded like the data. Class-balanced
  batches then draw the P classes from ``key`` itself, the same on every
  shard, and shard ``d`` takes classes ``[d P / S, (d + 1) P / S)`` of that
  draw, so the global batch has P distinct classes; every shard must hold
  every class present in the data (a ValueError before the first batch
  otherwise).

  Args:
    data: ``DeviceData``.
    key: PRNG key of the run.
    batch_size: global examples per batch (divisible by the shard count).
    start_step: first batch (resume at the same data position).
    num_steps: stop after this many batches (default: never).
    Others: see ``sample_batch``.

  Yields:
    ``{"image": float32 [batch_size, (V,) H, W, C], "label": int32 [B]}``.
  """
  augment_jax.check_augment(augment)
  augment_jax._check_views(views)  # pylint: disable=protected-access
  augment_jax.check_options(
      augment, padding=padding, padding_mode=padding_mode,
      cutout_size=cutout_size, cutout_inside=cutout_inside,
      height=data.images.shape[1], width=data.images.shape[2])
  check_int("batch_size", batch_size, 1)
  balanced = classes_per_batch is not None or examples_per_class is not None
  opts = dict(augment=augment, views=views,
              mean=None if mean is None else tuple(mean),
              std=None if std is None else tuple(std), strength=strength,
              padding=padding, max_degrees=max_degrees,
              padding_mode=padding_mode, cutout_size=int(cutout_size),
              cutout_inside=bool(cutout_inside))
  sharding = getattr(data.images, "sharding", None)
  axes = _data_axes(sharding)
  shards = _num_shards(sharding) if axes else 1
  if batch_size % shards:
    raise ValueError(
        f"batch_size={batch_size} must be divisible by the {shards} shards of"
        " the data.")
  local_batch = batch_size // shards
  if balanced:
    _check_pk(classes_per_batch, examples_per_class, batch_size, num_classes)
    if classes_per_batch % shards:
      raise ValueError(
          f"classes_per_batch={classes_per_batch} must be divisible by the"
          f" {shards} shards of the data.")
  n_local = data.labels.shape[0] // shards
  spe = _steps_per_epoch(n_local, local_batch)
  class_counts = None
  if balanced:
    class_counts = _shard_class_counts(data, sharding, axes, shards,
                                       num_classes)
    check_class_shards(class_counts, classes_per_batch)

  # Each branch's ``advance(carry) -> (batch, carry)`` keeps the step (and
  # the epoch's order) on the device: no host-to-device copy per batch.
  if not axes:
    if balanced:
      sample = functools.partial(
          sample_batch, batch_size=batch_size,
          classes_per_batch=classes_per_batch,
          examples_per_class=examples_per_class, num_classes=num_classes,
          **opts)
      advance = jax.jit(lambda d, s: (sample(key, d, s), s + 1))
      carry = jnp.int32(start_step)
    else:
      order_key = jax.random.fold_in(key, _ORDER)

      def next_batch(d, perm, s):
        # The epoch's permutation is drawn once, at its first batch.
        epoch, i = jnp.divmod(s, spe)
        perm = jax.lax.cond(
            i == 0, lambda: epoch_permutation(order_key, epoch, n_local),
            lambda: perm)
        idx = jax.lax.dynamic_slice_in_dim(perm, i * local_batch, local_batch)
        return make_batch(key, d, idx, s, **opts), (perm, s + 1)

      advance = jax.jit(lambda d, c: next_batch(d, *c))
      carry = (epoch_permutation(order_key, start_step // spe, n_local),
               jnp.int32(start_step))
    step_fn = lambda c: advance(data, c)
  else:
    step_fn = _sharded_step_fn(
        data, key, sharding, axes, local_batch, balanced, classes_per_batch,
        examples_per_class, num_classes, shards, opts,
        None if class_counts is None else class_counts.sum(0))
    carry = jnp.int32(start_step)

  for _ in (itertools.count() if num_steps is None else range(num_steps)):
    batch, carry = step_fn(carry)
    yield batch


def _sharded_step_fn(data, key, sharding, axes, local_batch, balanced, p, k,
                     num_classes, shards, opts, all_counts):
  mesh = sharding.mesh
  spec = PartitionSpec(axes if len(axes) > 1 else axes[0])

  def local(key, images, labels, step):
    shard = _shard_index(mesh, axes)
    shard_key = jax.random.fold_in(key, shard)
    if balanced:
      # The classes come from the run's key and the class counts of the whole
      # split (a constant), the same on every shard, so the shards' slices
      # are disjoint; the examples come from this shard's key.
      local_p = p // shards
      idx = _balanced_indices(
          _balanced_keys(key, step)[0], _balanced_keys(shard_key, step)[1],
          labels, _class_counts(labels, num_classes), jnp.asarray(all_counts),
          classes_per_batch=local_p, examples_per_class=k,
          offset=shard * local_p)
    else:
      idx = batch_indices(shard_key, step, num_examples=labels.shape[0],
                          batch_size=local_batch)
    return make_batch(shard_key, DeviceData(images, labels), idx, step, **opts)

  fn = jax.shard_map(
      local, mesh=mesh, in_specs=(PartitionSpec(), spec, spec, PartitionSpec()),
      out_specs=spec, check_vma=False)
  advance = jax.jit(lambda k, images, labels, s: (fn(k, images, labels, s),
                                                  s + 1))
  return lambda s: advance(key, data.images, data.labels, s)


def _shard_index(mesh, axes):
  """This shard's row-major index over the data ``axes`` (in shard_map)."""
  shard = jnp.int32(0)
  for a in axes:
    shard = shard * mesh.shape[a] + jax.lax.axis_index(a)
  return shard


def _shard_class_counts(data: DeviceData, sharding, axes, shards: int,
                        num_classes: int) -> np.ndarray:
  """``[shards, num_classes]`` class counts of each shard, on the host.

  Computed on device and replicated, so that every process of a multi-process
  mesh gets all of them (the labels are not all addressable there).
  """
  if not axes:
    fn = jax.jit(lambda labels: _class_counts(labels, num_classes)[None])
    return np.asarray(fn(data.labels))
  mesh = sharding.mesh
  spec = PartitionSpec(axes if len(axes) > 1 else axes[0])

  def local(labels):
    table = jnp.zeros([shards, num_classes], jnp.int32)
    table = table.at[_shard_index(mesh, axes)].set(
        _class_counts(labels, num_classes))
    return jax.lax.psum(table, axes)

  fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(spec,),
                             out_specs=PartitionSpec(), check_vma=False))
  return np.asarray(fn(data.labels))


def check_class_shards(counts: np.ndarray, classes_per_batch: int, *,
                       unit: str = "shard") -> None:
  """Refuses a P x K draw that would repeat or substitute examples.

  ``counts [S, C]``: each shard's class counts (the shards of one split:
  devices here, processes in ``pipeline``, which calls this with
  ``unit="process"``). Every step draws ``classes_per_batch`` classes among
  those present in the split, and each shard must then give K examples of
  its share of them; a class absent from a shard (or fewer present classes
  than P) would silently yield other examples.
  """
  present = counts.sum(0) > 0
  if int(present.sum()) < classes_per_batch:
    raise ValueError(
        f"classes_per_batch={classes_per_batch} exceeds the"
        f" {int(present.sum())} classes present in the data.")
  for s, row in enumerate(counts):
    missing = np.flatnonzero(present & (row == 0))
    if missing.size:
      raise ValueError(
          f"classes_per_batch: {unit} {s} of {counts.shape[0]} holds no example"
          f" of classes {missing.tolist()[:10]} (and has"
          f" {int(np.sum(row > 0))} of the split's {int(present.sum())}"
          f" classes). Every {unit} draws its share of each step's classes from"
          f" its own examples, so every {unit} must hold every class: each"
          f" class needs at least {counts.shape[0]} examples.")


def device_eval_batches(data: DeviceData, *, batch_size: int,
                        mean: Sequence[float] | None = None,
                        std: Sequence[float] | None = None) -> Iterator[dict]:
  """One ordered pass, no augmentation; the last batch padded.

  Yields:
    ``{"image": float32 [B, H, W, C], "label": int32 [B], "mask": bool [B]}``
    with ``mask`` False on padding.
  """
  check_int("batch_size", batch_size, 1)
  n = data.labels.shape[0]
  opts = dict(mean=None if mean is None else tuple(mean),
              std=None if std is None else tuple(std))

  @jax.jit
  def fn(d, start):
    pos = start + jnp.arange(batch_size)
    out = make_batch(jax.random.key(0), d, jnp.minimum(pos, n - 1), 0, **opts)
    out["mask"] = pos < n
    return out

  for start in range(0, n, batch_size):
    yield fn(data, start)
