"""The augmentations of ``augment_jax`` as TensorFlow ops, for tf.data.

Importing this module imports TensorFlow (with its GPUs hidden, so that it
never takes accelerator memory from JAX); ``contrastive_jax.data`` itself does
not import it.

Every function here is the TF twin of the same-named function in
``augment_jax`` and does the same arithmetic: same uniforms in, same images out
(up to float rounding; tested). Randomness is stateless: each example draws its
uniforms from its own seed (``example_uniforms``), so the pipeline is
deterministic and an example's views do not depend on its batch. Applying them
(``apply_augment``) is vectorised over a batch, which is several times faster
in tf.data than running dozens of tiny per-example ops.

The sampling conventions (policies, uniform layout, jitter strengths) are the
ones documented in ``augment_jax``.
"""

from __future__ import annotations

import math
from typing import Sequence

from contrastive_jax.data import augment_jax as _aj
from contrastive_jax.data import sources as _sources

tf = _sources.import_tf()

AUGMENTATIONS = _aj.AUGMENTATIONS
num_uniforms = _aj.num_uniforms


def example_uniforms(seed, *, augment: str, views: int = 1):
  """Uniforms ``[views, num_uniforms(augment)]`` for one example.

  Args:
    seed: int ``[2]`` stateless seed for this example (e.g. ``[seed, index]``).
    augment: one of ``AUGMENTATIONS``.
    views: number of independently augmented views.

  Returns:
    float32 ``[views, n]`` in [0, 1).
  """
  n = num_uniforms(augment)
  return tf.random.stateless_uniform([views, n], seed=seed, dtype=tf.float32)


def to_float(images):
  """uint8 images (0..255) -> float32 in [0, 1]; float images -> float32."""
  if images.dtype == tf.uint8:
    return tf.cast(images, tf.float32) * (1.0 / 255.0)
  return tf.cast(images, tf.float32)


def normalize(images, *, mean: Sequence[float], std: Sequence[float]):
  """``(images - mean) / std`` per channel; images float in [0, 1]."""
  return (images - tf.constant(mean, tf.float32)) / tf.constant(
      std, tf.float32)


def _hat_matrix(positions, size: int):
  grid = tf.range(size, dtype=tf.float32)
  return tf.maximum(0.0, 1.0 - tf.abs(positions[..., :, None] - grid))


def resample(images, ys, xs):
  """Separable bilinear resample at any positions; see ``augment_jax.resample``.

  (The policies use the faster ``crop_resize``, which handles the affine
  positions they need; this general form is kept for tests and custom use.)
  """
  x = to_float(images)
  ry = _hat_matrix(ys, x.shape[1])
  rx = _hat_matrix(xs, x.shape[2])
  out = tf.einsum("nik,nklc->nilc", ry, x)
  return tf.einsum("njl,nilc->nijc", rx, out)


def crop_resize(images, y_first, y_last, x_first, x_last, *,
                pad: int = 0):
  """Bilinear resample at evenly spaced positions, zero outside the image.

  Output row ``i`` of ``H`` reads input row ``y_first + i * (y_last - y_first)
  / (H - 1)`` (likewise for columns; ``x_last < x_first`` mirrors), i.e. the
  align-corners sampling of ``augment_jax.box_positions`` and
  ``crop_flip_positions``, as one batched ``tf.image.crop_and_resize``.

  crop_and_resize returns its extrapolation value (0) for a position outside
  ``[0, size - 1]``, and float rounding can push a border position just past
  it. Positions that may leave the image (a padded crop) are therefore read
  from an image zero-padded by ``pad``; those that never do (a resized crop)
  are nudged inside by 2e-5 px (a change of at most 2e-5 of the range).

  Args:
    images: ``[N, H, W, C]`` uint8 or float.
    y_first, y_last, x_first, x_last: ``[N]`` positions in pixels.
    pad: zero padding (> the farthest position outside the image), or 0.

  Returns:
    float32 ``[N, H, W, C]`` in [0, 1].
  """
  _, height, width, _ = images.shape
  scale = 1.0 / 255.0 if images.dtype == tf.uint8 else 1.0
  if pad:
    images = tf.pad(images, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
  else:
    eps = 2e-5
    y_first, y_last = (tf.clip_by_value(v, eps, height - 1 - eps)
                       for v in (y_first, y_last))
    x_first, x_last = (tf.clip_by_value(v, eps, width - 1 - eps)
                       for v in (x_first, x_last))
  hp, wp = float(height + 2 * pad - 1), float(width + 2 * pad - 1)
  boxes = tf.stack([(y_first + pad) / hp, (x_first + pad) / wp,
                    (y_last + pad) / hp, (x_last + pad) / wp], axis=1)
  n = tf.shape(images)[0]
  out = tf.image.crop_and_resize(images, boxes, tf.range(n), [height, width],
                                 method="bilinear", extrapolation_value=0.0)
  return out * scale if scale != 1.0 else out


def crop_flip_positions(u, height: int, width: int, *, padding: int,
                        padding_mode: str = "zero"):
  """See ``augment_jax.crop_flip_positions``."""
  span = float(2 * padding + 1)
  dy = tf.minimum(tf.floor(u[:, 0] * span), span - 1) - padding
  dx = tf.minimum(tf.floor(u[:, 1] * span), span - 1) - padding
  flip = u[:, 2] < 0.5
  ys = tf.range(height, dtype=tf.float32) + dy[:, None]
  cols = tf.range(width, dtype=tf.float32)
  cols = tf.where(flip[:, None], cols[::-1], cols)
  xs = cols + dx[:, None]
  if padding_mode == "reflect":
    ys, xs = reflect_index(ys, height), reflect_index(xs, width)
  return ys, xs


def reflect_index(i, size: int):
  """See ``augment_jax.reflect_index``."""
  last = float(size - 1)
  return last - tf.abs(last - tf.abs(i))


def _crop_flip(images, u, *, padding: int, padding_mode: str = "zero"):
  """The padded crop + flip of ``augment_jax.crop_flip_images``.

  Zero padding: one batched ``crop_and_resize`` of the zero-padded image at
  integer positions (exact up to float rounding). Reflect padding: the
  reflected rows and columns (``crop_flip_positions``, integers, the same
  pixels ``tf.pad(mode="REFLECT")`` then the crop would give) are gathered,
  which is exact.
  """
  _, height, width, _ = images.shape
  _aj.check_options(padding=padding, padding_mode=padding_mode,
                    height=height, width=width)
  if padding_mode == "reflect":
    ys, xs = crop_flip_positions(u, height, width, padding=padding,
                                 padding_mode="reflect")
    rows = tf.gather(images, tf.cast(ys, tf.int32), axis=1, batch_dims=1)
    return to_float(tf.gather(rows, tf.cast(xs, tf.int32), axis=2,
                              batch_dims=1))
  span = float(2 * padding + 1)
  dy = tf.minimum(tf.floor(u[:, 0] * span), span - 1) - padding
  dx = tf.minimum(tf.floor(u[:, 1] * span), span - 1) - padding
  flip = u[:, 2] < 0.5
  x_first = tf.where(flip, dx + width - 1, dx)
  x_last = tf.where(flip, dx, dx + width - 1)
  return crop_resize(images, dy, dy + height - 1, x_first, x_last,
                     pad=padding + 1)


def cutout_mask(u_y, u_x, height: int, width: int, *, size: int = 0,
                inside: bool = False):
  """See ``augment_jax.cutout_mask``."""
  if size == 0:
    size = min(height, width) // 2
  if inside:
    top = tf.cast(tf.minimum(tf.floor(u_y * (height - size + 1)),
                             height - size), tf.int32)
    left = tf.cast(tf.minimum(tf.floor(u_x * (width - size + 1)),
                              width - size), tf.int32)
  else:
    cy = tf.cast(tf.minimum(tf.floor(u_y * height), height - 1), tf.int32)
    cx = tf.cast(tf.minimum(tf.floor(u_x * width), width - 1), tf.int32)
    top, left = cy - size // 2, cx - size // 2
  rows = tf.range(height)[None, :] - top[:, None]
  cols = tf.range(width)[None, :] - left[:, None]
  in_rows = (rows >= 0) & (rows < size)
  in_cols = (cols >= 0) & (cols < size)
  return in_rows[:, :, None] & in_cols[:, None, :]


def resized_crop_boxes(u_scale, u_log_ratio, u_y, u_x, height: int,
                       width: int):
  """See ``augment_jax.resized_crop_boxes``."""
  area = float(height * width)
  lo, hi = math.log(_aj.RRC_RATIO[0]), math.log(_aj.RRC_RATIO[1])
  scale = _aj.RRC_SCALE[0] + u_scale * (_aj.RRC_SCALE[1] - _aj.RRC_SCALE[0])
  ratio = tf.exp(lo + u_log_ratio * (hi - lo))
  w = tf.round(tf.sqrt(area * scale * ratio))
  h = tf.round(tf.sqrt(area * scale / ratio))
  ok = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
  # argmax of a bool row = first True (0 when none; then any_ok is False).
  first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)
  any_ok = tf.reduce_any(ok, axis=1)
  w = tf.gather(w, first, batch_dims=1)
  h = tf.gather(h, first, batch_dims=1)
  fw, fh = _aj._fallback_box(height, width)  # pylint: disable=protected-access
  w = tf.where(any_ok, w, fw)
  h = tf.where(any_ok, h, fh)
  y0 = tf.minimum(tf.floor(u_y * (height - h + 1)), height - h)
  x0 = tf.minimum(tf.floor(u_x * (width - w + 1)), width - w)
  return y0, x0, h, w


def rotation_transforms(angles, height: int, width: int):
  """See ``augment_jax.rotation_transforms``; ``[N, 6]``."""
  c, s = tf.cos(angles), tf.sin(angles)
  w1, h1 = width - 1.0, height - 1.0
  x_off = (w1 - (c * w1 - s * h1)) / 2.0
  y_off = (h1 - (s * w1 + c * h1)) / 2.0
  return tf.stack([c, -s, x_off, s, c, y_off], axis=1)


def affine_resample(images, transforms):
  """Bilinear affine warp, zero fill (TF's ImageProjectiveTransformV3)."""
  n = tf.shape(images)[0]
  t8 = tf.concat([transforms, tf.zeros([n, 2], tf.float32)], axis=1)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=images, transforms=t8,
      output_shape=tf.shape(images)[1:3], fill_value=0.0,
      interpolation="BILINEAR", fill_mode="CONSTANT")


# ----------------------------------------------------------------------------
# Colour, on planar [N, C, P] data (as augment_jax; contiguous channel slices).
# TF runs op by op, so unlike XLA it gains nothing from computing every jitter
# op for every image: each stage partitions the batch by op instead
# (tf.dynamic_partition / dynamic_stitch) and runs each op on its own images.


def _planar(images):
  n = tf.shape(images)[0]
  _, h, w, c = images.shape
  return tf.reshape(tf.transpose(images, [0, 3, 1, 2]), [n, c, h * w])


def _unplanar(x, shape):
  _, h, w, c = shape
  n = tf.shape(x)[0]
  return tf.transpose(tf.reshape(x, [n, c, h, w]), [0, 2, 3, 1])


def _hsv_parts(x):
  r, g, b = x[:, 0], x[:, 1], x[:, 2]
  v = tf.maximum(tf.maximum(r, g), b)
  chroma = v - tf.minimum(tf.minimum(r, g), b)
  inv = 1.0 / tf.where(chroma > 0, chroma, 1.0)
  h = tf.where(v == r, (g - b) * inv,
               tf.where(v == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
  return v, chroma, inv, h


def _wrap6(h):
  h = tf.where(h < 0.0, h + 6.0, h)
  return tf.where(h >= 6.0, h - 6.0, h)


def _brightness_planar(x, factor):
  return x * factor[:, None, None]


def _contrast_planar(x, factor):
  mean = tf.reduce_mean(x, axis=2, keepdims=True)
  return (x - mean) * factor[:, None, None] + mean


def _saturation_planar(x, factor):
  if x.shape[1] == 1:
    return x
  v, chroma, inv, _ = _hsv_parts(x)
  scale = tf.where(chroma > 0, tf.minimum(factor[:, None], v * inv), 1.0)
  return v[:, None] - (v[:, None] - x) * scale[:, None]


def _hue_planar(x, delta):
  if x.shape[1] == 1:
    return x
  v, chroma, _, h = _hsv_parts(x)
  h = _wrap6(h + 6.0 * delta[:, None])
  out = []
  for n in (5.0, 3.0, 1.0):
    k = h + n
    k = tf.where(k >= 6.0, k - 6.0, k)
    out.append(v - chroma * tf.clip_by_value(tf.minimum(k, 4.0 - k), 0.0, 1.0))
  return tf.stack(out, axis=1)


_PLANAR_OPS = (_brightness_planar, _contrast_planar, _saturation_planar,
               _hue_planar)


def _per_image(images, fn, factor):
  """NHWC wrapper of a planar op with clipping."""
  return tf.clip_by_value(_unplanar(fn(_planar(images), factor),
                                    images.shape), 0.0, 1.0)


def adjust_brightness(images, factor):
  return _per_image(images, _brightness_planar, factor)


def adjust_contrast(images, factor):
  return _per_image(images, _contrast_planar, factor)


def adjust_saturation(images, factor):
  """Per-image factor; same result as ``tf.image.adjust_saturation``."""
  return _per_image(images, _saturation_planar, factor)


def adjust_hue(images, delta):
  """Per-image delta; same result as ``tf.image.adjust_hue``."""
  return _per_image(images, _hue_planar, delta)


def rgb_to_grayscale(images):
  if images.shape[-1] == 1:
    return images
  gray = tf.tensordot(images, tf.constant(_aj.GRAY_WEIGHTS, tf.float32),
                      axes=[[3], [0]])
  return tf.repeat(gray[..., None], 3, axis=-1)


def jitter_factors(u, strength: float):
  b, c, s, h = _aj.jitter_strengths(strength)
  def factor(ui, amount):
    lo = max(0.0, 1.0 - amount)
    return lo + ui * (1.0 + amount - lo)
  return (factor(u[:, 0], b), factor(u[:, 1], c), factor(u[:, 2], s),
          (2.0 * u[:, 3] - 1.0) * h)


def _jitter_planar(x, u_factors, u_order, *, strength: float):
  factors = tf.stack(jitter_factors(u_factors, strength), axis=1)  # [N, 4]
  order = tf.argsort(u_order, axis=1, stable=True)
  idx = tf.range(tf.shape(x)[0])
  for stage in range(4):
    op = order[:, stage]
    xs = tf.dynamic_partition(x, op, 4)
    fs = tf.dynamic_partition(factors, op, 4)
    outs = [fn(xi, fi[:, i]) for i, (fn, xi, fi) in
            enumerate(zip(_PLANAR_OPS, xs, fs))]
    x = tf.clip_by_value(
        tf.dynamic_stitch(tf.dynamic_partition(idx, op, 4), outs), 0.0, 1.0)
  return x


def color_jitter(images, u_factors, u_order, *, strength: float):
  """See ``augment_jax.color_jitter``."""
  x = _jitter_planar(_planar(images), u_factors, u_order, strength=strength)
  return _unplanar(x, images.shape)


def apply_augment(images, uniforms, *, augment: str, strength: float = 0.5,
                  padding: int = 4, max_degrees: float = 10.0,
                  padding_mode: str = "zero", cutout_size: int = 0,
                  cutout_inside: bool = False):
  """Deterministic half of an augmentation: images + uniforms -> views.

  Args:
    images: ``[B, H, W, C]`` uint8 (0..255) or float (0..1), static H, W, C.
    uniforms: ``[B, V, num_uniforms(augment)]`` in [0, 1), static V.
    augment: one of ``AUGMENTATIONS``.
    strength, padding, max_degrees, padding_mode, cutout_size,
      cutout_inside: see ``augment_jax.apply_augment``.

  Returns:
    ``[B, V, H, W, C]`` float32 in [0, 1].
  """
  _aj.check_augment(augment)
  _, height, width, c = images.shape
  if height is None or width is None or c is None:
    raise ValueError(
        f"images need static height, width and channels, got {images.shape}.")
  _aj.check_options(augment, padding=padding, padding_mode=padding_mode,
                    cutout_size=cutout_size, cutout_inside=cutout_inside,
                    height=height, width=width)
  views = uniforms.shape[1]
  b = tf.shape(images)[0]
  x = images
  if views > 1:
    x = tf.reshape(tf.repeat(x[:, None], views, axis=1),
                   [b * views, height, width, c])
  u = tf.reshape(tf.cast(uniforms, tf.float32), [b * views, -1])
  if augment in _aj.NO_FLIP:
    augment = _aj.NO_FLIP[augment]
    u = tf.concat([u[:, :2], tf.ones_like(u[:, 2:3]), u[:, 3:]], axis=1)
  if augment == "none":
    x = to_float(x)
  elif augment in ("crop_flip", "crop_flip_rotate", "crop_flip_cutout"):
    x = _crop_flip(x, u, padding=padding, padding_mode=padding_mode)
    if augment == "crop_flip_rotate":
      angles = (2.0 * u[:, 3] - 1.0) * (max_degrees * math.pi / 180.0)
      x = affine_resample(x, rotation_transforms(angles, height, width))
    elif augment == "crop_flip_cutout":
      inside = cutout_mask(u[:, 3], u[:, 4], height, width,
                           size=int(cutout_size), inside=bool(cutout_inside))
      x = tf.where(inside[..., None], tf.constant(_aj.CUTOUT_FILL, tf.float32),
                   x)
  else:  # simclr
    slots = _aj._SIMCLR_SLOTS  # pylint: disable=protected-access
    y0, x0, h, w = resized_crop_boxes(u[:, slots["scale"]],
                                      u[:, slots["log_ratio"]], u[:, slots["y"]],
                                      u[:, slots["x"]], height, width)
    flip = u[:, slots["flip"]] < 0.5
    x_first = tf.where(flip, x0 + w - 1.0, x0)
    x_last = tf.where(flip, x0, x0 + w - 1.0)
    x = _planar(crop_resize(x, y0, y0 + h - 1.0, x_first, x_last))
    # Jitter only the images drawn for it (p = 0.8): partition, not mask.
    jit = tf.cast(u[:, slots["jitter"]] < _aj.JITTER_PROB, tf.int32)
    idx = tf.range(b * views)
    keep, todo = tf.dynamic_partition(x, jit, 2)
    uf, uo = (tf.dynamic_partition(u[:, slots[k]], jit, 2)[1]
              for k in ("factors", "order"))
    x = tf.dynamic_stitch(tf.dynamic_partition(idx, jit, 2),
                          [keep, _jitter_planar(todo, uf, uo,
                                                strength=strength)])
    if c == 3:
      w_gray = tf.constant(_aj.GRAY_WEIGHTS, tf.float32)[None, :, None]
      gray = tf.reduce_sum(x * w_gray, axis=1, keepdims=True)
      x = tf.where((u[:, slots["gray"]] < _aj.GRAYSCALE_PROB)[:, None, None],
                   gray, x)
    x = _unplanar(x, (None, height, width, c))
  return tf.reshape(x, [b, views, height, width, c])
