"""Batched image augmentations in JAX (no TensorFlow), for the on-device path.

Every augmentation is split in two, and ``augment_tf`` mirrors both halves op
for op:

* a *sampling* step that draws a fixed number of uniforms per example and view
  (``sample_uniforms``; one key per example, so an example's augmentation does
  not depend on the rest of its batch), and
* a deterministic *application* step, ``apply_augment(images, uniforms, ...)``,
  which turns those uniforms into parameters (crop boxes, flips, jitter factors,
  op orders) and applies them.

Because the application step is the same arithmetic in both backends, feeding
the same uniforms to ``augment_jax.apply_augment`` and
``augment_tf.apply_augment`` gives the same images (tested), and the two paths
match in distribution whatever random-number generators draw the uniforms.

Policies (``augment=``):

* ``"none"``: only the conversion to float32 in [0, 1].
* ``"crop_flip"``: random crop of the image padded by ``padding`` pixels on
  each side, and a horizontal flip with probability 1/2 (the standard CIFAR
  augmentation). ``padding_mode`` picks the border: ``"zero"`` (default)
  or ``"reflect"`` (the image mirrored without repeating its edge pixel, as
  ``np.pad(mode="reflect")`` and torch's ``F.pad(mode="reflect")``, which
  airbench uses; needs ``padding`` < H and W). Every ``"crop*"`` policy crops
  this way.
* ``"crop_flip_rotate"``: the above, then a rotation by an angle uniform in
  ``[-max_degrees, max_degrees]`` (bilinear, zero fill).
* ``"crop_flip_cutout"``: ``"crop_flip"``, then Cutout: a square of side
  ``cutout_size`` (default 0: ``min(H, W) // 2``, 16 at 32x32) filled with
  ``CUTOUT_FILL`` (0.5: near CIFAR-10's channel means, so about zero after
  normalisation, as a cutout of normalised images). Placement
  (``cutout_mask``): by default (``cutout_inside=False``, DeVries & Taylor,
  2017, their CIFAR-10 setting) its centre is uniform anywhere in the image
  and it is clipped at the borders; with ``cutout_inside=True`` (airbench)
  it lies entirely inside the image, its top-left corner uniform over the
  ``(H - size + 1) x (W - size + 1)`` valid positions, so every view loses
  exactly ``size * size`` pixels.
* ``"crop"``, ``"crop_rotate"``: the two above without the flip (digits).
* ``"simclr"``: SimCLR's CIFAR set: random resized crop (scale 0.08-1, aspect
  ratio 3/4-4/3, resized back to the input size), horizontal flip, colour
  jitter with probability 0.8 (brightness, contrast and saturation
  ``0.8 * strength``, hue ``0.2 * strength``, applied in a random order and
  clipped to [0, 1] after each op, as in SimCLR), random grayscale with
  probability 0.2, and no blur (SimCLR drops it at 32x32).

Speed notes (CPU, where XLA is least forgiving): the padded crop is a
per-example ``dynamic_slice``; the resized crop gathers whole rows and
multiplies by a small per-example column-interpolation matrix; colour ops run
on planar ``[N, C, H * W]`` data so that per-pixel channel max/min vectorise;
and each colour-jitter stage is materialised before the next (see
``_materialize``) because XLA would otherwise fuse -- and recompute -- every
stage into each consumer of the next; and the SimCLR set runs in chunks of
256 views (``_in_chunks``) that stay in cache through all its passes.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int

AUGMENTATIONS = ("none", "crop_flip", "crop_flip_rotate", "crop_flip_cutout",
                 "crop", "crop_rotate", "simclr")
# Borders of the padded random crop of the "crop*" policies.
PADDING_MODES = ("zero", "reflect")
_CROP_POLICIES = ("crop_flip", "crop_flip_rotate", "crop_flip_cutout", "crop",
                  "crop_rotate")
# Crops that never flip: for images whose mirror image is another class
# (digits: a mirrored 2 reads as a 5). They draw the same uniforms.
NO_FLIP = {"crop": "crop_flip", "crop_rotate": "crop_flip_rotate"}

# SimCLR's random resized crop: like torchvision, up to 10 draws of (scale,
# log aspect ratio); the first box that fits the image wins, else the whole
# image (clamped to the ratio range).
RRC_ATTEMPTS = 10
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
JITTER_PROB = 0.8
CUTOUT_FILL = 0.5
GRAYSCALE_PROB = 0.2
# ITU-R 601 luma weights, as tf.image.rgb_to_grayscale uses.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

# Layout of the uniforms of one view of one example.
_SIMCLR_SLOTS = {
    "scale": slice(0, RRC_ATTEMPTS),
    "log_ratio": slice(RRC_ATTEMPTS, 2 * RRC_ATTEMPTS),
    "y": 2 * RRC_ATTEMPTS,
    "x": 2 * RRC_ATTEMPTS + 1,
    "flip": 2 * RRC_ATTEMPTS + 2,
    "jitter": 2 * RRC_ATTEMPTS + 3,
    "factors": slice(2 * RRC_ATTEMPTS + 4, 2 * RRC_ATTEMPTS + 8),
    "order": slice(2 * RRC_ATTEMPTS + 8, 2 * RRC_ATTEMPTS + 12),
    "gray": 2 * RRC_ATTEMPTS + 12,
}
_NUM_UNIFORMS = {
    "none": 1,
    "crop_flip": 3,  # dy, dx, flip
    "crop_flip_rotate": 4,  # dy, dx, flip, angle
    "crop_flip_cutout": 5,  # dy, dx, flip, centre row, centre column
    "crop": 3,
    "crop_rotate": 4,
    "simclr": 2 * RRC_ATTEMPTS + 13,
}


def check_augment(augment: str) -> None:
  if augment not in AUGMENTATIONS:
    raise ValueError(
        f"augment must be one of {AUGMENTATIONS}, got {augment!r}.")


def check_options(augment: str | None = None, *, padding: int = 4,
                  padding_mode: str = "zero", cutout_size: int = 0,
                  cutout_inside: bool = False, height: int | None = None,
                  width: int | None = None) -> None:
  """Raises a ValueError for bad crop / Cutout options.

  The values are always checked (``padding`` and ``cutout_size`` ints >= 0,
  ``padding_mode`` in ``PADDING_MODES``, ``cutout_inside`` a bool). Given the image
  ``height`` and ``width``, so are the limits of the options ``augment``
  uses (all of them when ``augment`` is None): ``"reflect"`` needs
  ``0 <= padding < min(H, W)`` (a reflection cannot reach further than the
  image), and ``cutout_size`` may not exceed ``min(H, W)``.
  """
  if padding_mode not in PADDING_MODES:
    raise ValueError(
        f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}.")
  check_int("padding", padding, 0)
  check_int("cutout_size", cutout_size, 0, hint=" (0: min(H, W) // 2)")
  check_bool("cutout_inside", cutout_inside)
  if height is None or width is None:
    return
  side = min(height, width)
  crops = augment is None or augment in _CROP_POLICIES
  if crops and padding_mode == "reflect" and not 0 <= padding < side:
    raise ValueError(
        f"padding_mode='reflect' needs 0 <= padding < min(H, W) = {side} (the"
        f" mirrored border comes from inside the image), got padding="
        f"{padding!r} for {height}x{width} images.")
  cuts = augment is None or augment == "crop_flip_cutout"
  if cuts and cutout_size > side:
    raise ValueError(
        f"cutout_size must be at most min(H, W) = {side} for {height}x{width}"
        f" images, got {cutout_size!r}.")


def num_uniforms(augment: str) -> int:
  """Number of uniforms one view of one example consumes under ``augment``."""
  check_augment(augment)
  return _NUM_UNIFORMS[augment]


def jitter_strengths(strength: float) -> tuple[float, float, float, float]:
  """SimCLR's ``(brightness, contrast, saturation, hue)`` for a strength.

  ``strength=0.5`` (SimCLR's CIFAR-10 value) gives ``(0.4, 0.4, 0.4, 0.1)``.
  """
  if not strength >= 0:
    raise ValueError(f"strength must be >= 0, got {strength!r}.")
  s = float(strength)
  return 0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s


def check_images(images, name: str = "images") -> None:
  shape = getattr(images, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(
        f"{name} must be a batch [B, H, W, C], got shape {shape}.")
  if shape[-1] not in (1, 3):
    raise ValueError(
        f"{name} must have 1 or 3 channels (last axis), got shape {shape}.")
  dtype = np.dtype(images.dtype)
  if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
    raise TypeError(
        f"{name} must be uint8 (0..255) or float (0..1), got dtype {dtype}.")


def to_float(images) -> jax.Array:
  """uint8 images (0..255) -> float32 in [0, 1]; float images -> float32."""
  images = jnp.asarray(images)
  if images.dtype == jnp.uint8:
    return images.astype(jnp.float32) * (1.0 / 255.0)
  return images.astype(jnp.float32)


def normalize(images, *, mean: Sequence[float], std: Sequence[float]):
  """``(images - mean) / std`` per channel; images float in [0, 1]."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images - mean) / std


# ----------------------------------------------------------------------------
# Sampling.


def sample_uniforms(key, batch_size: int, *, augment: str,
                    views: int = 1) -> jax.Array:
  """Per-example uniforms ``[batch_size, views, num_uniforms(augment)]``.

  Example ``i`` draws from ``jax.random.split(key, batch_size)[i]``: its
  views do not depend on the content of the rest of the batch.
  """
  n = num_uniforms(augment)
  keys = jax.random.split(key, batch_size)
  return jax.vmap(lambda k: jax.random.uniform(k, (views, n)))(keys)


# ----------------------------------------------------------------------------
# Geometry: separable resampling.


def _hat_matrix(positions, size: int):
  """Bilinear interpolation matrix ``[N, P, size]`` for sample ``positions``.

  Row ``p`` weights input pixel ``k`` by ``max(0, 1 - |positions[p] - k|)``:
  exact one-hots for integer positions (pixels beyond the border get weight 0,
  i.e. zero padding) and linear interpolation in between.
  """
  grid = jnp.arange(size, dtype=jnp.float32)
  return jnp.maximum(0.0, 1.0 - jnp.abs(positions[..., :, None] - grid))


def _taps(positions, size: int):
  """Two bilinear taps per position: indices (clamped) and weights (0 outside)."""
  lo = jnp.floor(positions)
  frac = positions - lo
  i0 = lo.astype(jnp.int32)
  i1 = i0 + 1
  w0 = jnp.where((i0 >= 0) & (i0 < size), 1.0 - frac, 0.0)
  w1 = jnp.where((i1 >= 0) & (i1 < size), frac, 0.0)
  return jnp.clip(i0, 0, size - 1), jnp.clip(i1, 0, size - 1), w0, w1


def resample(images, ys, xs):
  """Samples ``images [N, H, W, C]`` at rows ``ys [N, H']``, cols ``xs [N, W']``.

  Bilinear and separable, zero outside the image; returns float32
  ``[N, H', W', C]`` (uint8 input is scaled to [0, 1]). The row pass gathers
  two whole rows per output row (contiguous ``W * C`` values); the column
  pass multiplies by a ``[W', W]`` interpolation matrix, which on CPU beats a
  gather of single pixels.
  """
  scale = 1.0 / 255.0 if images.dtype == jnp.uint8 else 1.0
  i0, i1, w0, w1 = _taps(ys, images.shape[1])
  row = lambda i: jnp.take_along_axis(images, i[:, :, None, None], axis=1)
  rows = (row(i0).astype(jnp.float32) * (w0 * scale)[:, :, None, None] +
          row(i1).astype(jnp.float32) * (w1 * scale)[:, :, None, None])
  rx = _hat_matrix(xs, images.shape[2])
  return jnp.einsum("njl,nilc->nijc", rx, rows,
                    precision=jax.lax.Precision.HIGHEST)


def crop_flip_images(images, u, *, padding: int, padding_mode: str = "zero"):
  """Padded random crop + flip by integer slicing (no interpolation needed).

  Same result as ``resample`` at ``crop_flip_positions`` (tested), an order
  of magnitude faster: a per-example ``dynamic_slice`` of the padded batch.

  Args:
    images: ``[N, H, W, C]`` uint8 or float.
    u: ``[N, >=3]`` uniforms (see ``crop_flip_positions``).
    padding: pixels of padding on each side.
    padding_mode: ``"zero"`` or ``"reflect"`` (``jnp.pad(mode="reflect")``:
      mirrored without repeating the edge; needs ``padding`` < H and W).

  Returns:
    float32 ``[N, H, W, C]`` in [0, 1].
  """
  check_options(padding=padding, padding_mode=padding_mode,
                height=images.shape[1], width=images.shape[2])
  n, height, width, c = images.shape
  span = 2 * padding + 1
  dy = jnp.minimum(jnp.floor(u[:, 0] * span), span - 1).astype(jnp.int32)
  dx = jnp.minimum(jnp.floor(u[:, 1] * span), span - 1).astype(jnp.int32)
  pad_width = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  if padding_mode == "reflect":
    padded = jnp.pad(images, pad_width, mode="reflect")
  else:
    padded = jnp.pad(images, pad_width)
  out = jax.vmap(lambda im, a, b: jax.lax.dynamic_slice(
      im, (a, b, 0), (height, width, c)))(padded, dy, dx)
  out = jnp.where((u[:, 2] < 0.5)[:, None, None, None], out[:, :, ::-1], out)
  return to_float(out)


def crop_flip_positions(u, height: int, width: int, *, padding: int,
                        padding_mode: str = "zero"):
  """Rows/cols ``[N, H], [N, W]`` of a padded random crop and flip.

  ``u [N, >=3]``: offsets ``dy, dx`` uniform in ``{0, ..., 2 * padding}`` of
  the padded image, and a flip when ``u[:, 2] < 0.5``. With ``"zero"``
  padding the positions run past the image (``resample`` reads 0 there);
  with ``"reflect"`` they are folded back inside (``reflect_index``).
  """
  span = 2 * padding + 1
  dy = jnp.minimum(jnp.floor(u[:, 0] * span), span - 1) - padding
  dx = jnp.minimum(jnp.floor(u[:, 1] * span), span - 1) - padding
  flip = u[:, 2] < 0.5
  ys = jnp.arange(height, dtype=jnp.float32) + dy[:, None]
  cols = jnp.arange(width, dtype=jnp.float32)
  cols = jnp.where(flip[:, None], cols[::-1], cols)
  xs = cols + dx[:, None]
  if padding_mode == "reflect":
    ys, xs = reflect_index(ys, height), reflect_index(xs, width)
  return ys, xs


def reflect_index(i, size: int):
  """Folds positions ``i`` in ``[-(size - 1), 2 (size - 1)]`` into the image.

  ``-k -> k`` and ``size - 1 + k -> size - 1 - k``: the mirror without
  repeating the edge pixel (``np.pad(mode="reflect")``).
  """
  last = size - 1
  return last - jnp.abs(last - jnp.abs(i))


def cutout_mask(u_y, u_x, height: int, width: int, *, size: int = 0,
                inside: bool = False) -> jax.Array:
  """``[N, H, W]`` bool, True inside each example's Cutout square.

  The square has side ``size`` (0: ``min(H, W) // 2``). With ``inside``
  False (DeVries & Taylor) its centre row and column are uniform over the
  image (``cy = min(floor(u_y H), H - 1)``, likewise ``cx``; ``u_y, u_x
  [N]`` in [0, 1)), it spans rows ``[cy - size // 2, cy - size // 2 +
  size)``, and it is clipped at the borders, so near an edge less than the
  full square is cut. With ``inside`` True (airbench) it lies wholly inside
  the image: its top row is ``min(floor(u_y (H - size + 1)), H - size)``
  (likewise its left column), so exactly ``size * size`` pixels are cut.
  """
  if size == 0:
    size = min(height, width) // 2
  if inside:
    top = jnp.minimum(jnp.floor(u_y * (height - size + 1)),
                      height - size).astype(jnp.int32)
    left = jnp.minimum(jnp.floor(u_x * (width - size + 1)),
                       width - size).astype(jnp.int32)
  else:
    cy = jnp.minimum(jnp.floor(u_y * height), height - 1).astype(jnp.int32)
    cx = jnp.minimum(jnp.floor(u_x * width), width - 1).astype(jnp.int32)
    top, left = cy - size // 2, cx - size // 2
  rows = jnp.arange(height)[None, :] - top[:, None]
  cols = jnp.arange(width)[None, :] - left[:, None]
  in_rows = (rows >= 0) & (rows < size)
  in_cols = (cols >= 0) & (cols < size)
  return in_rows[:, :, None] & in_cols[:, None, :]


def resized_crop_boxes(u_scale, u_log_ratio, u_y, u_x, height: int,
                       width: int):
  """Integer crop boxes ``(y0, x0, h, w)``, each ``[N]``, SimCLR/torchvision style.

  ``u_scale, u_log_ratio [N, RRC_ATTEMPTS]`` are the attempts' uniforms,
  ``u_y, u_x [N]`` place the box uniformly among the valid integer offsets.
  """
  area = float(height * width)
  lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
  scale = RRC_SCALE[0] + u_scale * (RRC_SCALE[1] - RRC_SCALE[0])
  ratio = jnp.exp(lo + u_log_ratio * (hi - lo))
  w = jnp.round(jnp.sqrt(area * scale * ratio))
  h = jnp.round(jnp.sqrt(area * scale / ratio))
  ok = (w >= 1) & (w <= width) & (h >= 1) & (h <= height)
  first = jnp.argmax(ok, axis=1)
  any_ok = jnp.any(ok, axis=1)
  w = jnp.take_along_axis(w, first[:, None], axis=1)[:, 0]
  h = jnp.take_along_axis(h, first[:, None], axis=1)[:, 0]
  fw, fh = _fallback_box(height, width)
  w = jnp.where(any_ok, w, fw)
  h = jnp.where(any_ok, h, fh)
  y0 = jnp.minimum(jnp.floor(u_y * (height - h + 1)), height - h)
  x0 = jnp.minimum(jnp.floor(u_x * (width - w + 1)), width - w)
  return y0, x0, h, w


def _fallback_box(height: int, width: int) -> tuple[float, float]:
  """torchvision's fallback: the whole image, clamped to the ratio range."""
  in_ratio = width / height
  if in_ratio < RRC_RATIO[0]:
    return float(width), float(round(width / RRC_RATIO[0]))
  if in_ratio > RRC_RATIO[1]:
    return float(round(height * RRC_RATIO[1])), float(height)
  return float(width), float(height)


def box_positions(y0, x0, h, w, flip, height: int, width: int):
  """Rows/cols ``[N, H], [N, W]`` that resize box ``(y0, x0, h, w)`` to H x W.

  Align-corners sampling, as ``tf.image.crop_and_resize``: output row ``i``
  reads input row ``y0 + i * (h - 1) / (H - 1)``. ``flip [N]`` mirrors the
  columns.
  """
  i = jnp.arange(height, dtype=jnp.float32) / max(height - 1, 1)
  j = jnp.arange(width, dtype=jnp.float32) / max(width - 1, 1)
  j = jnp.where(flip[:, None], j[::-1], j)
  ys = y0[:, None] + i * (h[:, None] - 1.0)
  xs = x0[:, None] + j * (w[:, None] - 1.0)
  return ys, xs


def rotation_transforms(angles, height: int, width: int):
  """Output->input affine maps ``[N, 6]`` rotating about the image centre.

  Same convention as Keras' ``RandomRotation`` and TF's
  ``ImageProjectiveTransformV3`` (pixel-index coordinates):
  ``x_in = a0 x + a1 y + a2``, ``y_in = b0 x + b1 y + b2``.
  """
  c, s = jnp.cos(angles), jnp.sin(angles)
  w1, h1 = width - 1.0, height - 1.0
  x_off = (w1 - (c * w1 - s * h1)) / 2.0
  y_off = (h1 - (s * w1 + c * h1)) / 2.0
  return jnp.stack([c, -s, x_off, s, c, y_off], axis=1)


def affine_resample(images, transforms):
  """Bilinear affine warp of ``images [N, H, W, C]``, zero outside.

  ``transforms [N, 6]`` map output pixel ``(x, y)`` to input
  ``(a0 x + a1 y + a2, b0 x + b1 y + b2)``; each of the four bilinear taps
  that falls outside the image reads 0 (TF's CONSTANT fill).
  """
  n, height, width, c = images.shape
  yy, xx = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  t = transforms[:, :, None, None]
  x_in = t[:, 0] * xx + t[:, 1] * yy + t[:, 2]
  y_in = t[:, 3] * xx + t[:, 4] * yy + t[:, 5]
  y0, x0 = jnp.floor(y_in), jnp.floor(x_in)
  flat = images.reshape(n, height * width, c)
  out = jnp.zeros((n, height, width, c), jnp.float32)
  for dy in (0.0, 1.0):
    for dx in (0.0, 1.0):
      yi, xi = y0 + dy, x0 + dx
      weight = (1.0 - jnp.abs(y_in - yi)) * (1.0 - jnp.abs(x_in - xi))
      inside = (yi >= 0) & (yi <= height - 1) & (xi >= 0) & (xi <= width - 1)
      idx = (jnp.clip(yi, 0, height - 1) * width +
             jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
      tap = jnp.take_along_axis(flat, idx.reshape(n, -1, 1), axis=1)
      out = out + jnp.where(inside, weight, 0.0)[..., None] * tap.reshape(
          n, height, width, c)
  return out


# ----------------------------------------------------------------------------
# Colour. The public ops take NHWC float images in [0, 1] and per-image
# factors [N]; each clips to [0, 1], as SimCLR does after every jitter op.


def _planar(images):
  """``[N, H, W, C]`` -> ``[N, C, H * W]``."""
  n, h, w, c = images.shape
  return jnp.moveaxis(images, -1, 1).reshape(n, c, h * w)


def _unplanar(x, shape):
  n, h, w, c = shape
  return jnp.moveaxis(x.reshape(n, c, h, w), 1, -1)


def _hsv_parts(x):
  """Max ``v``, chroma and its safe inverse, and the hue sextant in [-1, 5)."""
  r, g, b = x[:, 0], x[:, 1], x[:, 2]
  v = jnp.maximum(jnp.maximum(r, g), b)
  chroma = v - jnp.minimum(jnp.minimum(r, g), b)
  inv = 1.0 / jnp.where(chroma > 0, chroma, 1.0)
  # tf.image.rgb_to_hsv's case split; (mod 6 is applied after the shift).
  h = jnp.where(v == r, (g - b) * inv,
                jnp.where(v == g, (b - r) * inv + 2.0, (r - g) * inv + 4.0))
  return v, chroma, inv, h


def _wrap6(h):
  # Cheaper than jnp.mod for h in [-6, 12).
  h = jnp.where(h < 0.0, h + 6.0, h)
  return jnp.where(h >= 6.0, h - 6.0, h)


def _hue_planar(v, chroma, h, delta):
  """hsv -> rgb with the hue shifted by ``delta [N]`` turns; ``[N, 3, P]``.

  Channel n (5, 3, 1 for r, g, b) is ``v - chroma * clip(min(k, 4 - k), 0, 1)``
  with ``k = (n + h) mod 6``.
  """
  h = _wrap6(h + 6.0 * delta[:, None])
  out = []
  for n in (5.0, 3.0, 1.0):
    k = h + n
    k = jnp.where(k >= 6.0, k - 6.0, k)
    out.append(v - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
  return jnp.stack(out, axis=1)


def _saturation_planar(x, v, chroma, inv, factor):
  # With hue and value fixed, scaling HSV saturation (clipped at 1) moves each
  # channel along v - (v - x) * min(factor, v / chroma): no HSV round trip.
  scale = jnp.where(chroma > 0, jnp.minimum(factor[:, None], v * inv), 1.0)
  return v[:, None] - (v[:, None] - x) * scale[:, None]


def _jitter_stage(x, op, fb, fc, fs, dh):
  """One stage of the random-order jitter on planar ``x [N, C, P]``.

  Every op is computed and ``op [N]`` (0 brightness, 1 contrast, 2 saturation,
  3 hue, anything else: none) picks per image: vectorised, and all four are
  cheap elementwise.
  """
  mean = jnp.mean(x, axis=2, keepdims=True)
  out = jnp.where(
      (op == 0)[:, None, None], x * fb[:, None, None],
      jnp.where((op == 1)[:, None, None],
                (x - mean) * fc[:, None, None] + mean, x))
  if x.shape[1] == 3:
    v, chroma, inv, h = _hsv_parts(x)
    out = jnp.where((op == 2)[:, None, None],
                    _saturation_planar(x, v, chroma, inv, fs), out)
    out = jnp.where((op == 3)[:, None, None], _hue_planar(v, chroma, h, dh),
                    out)
  return jnp.clip(out, 0.0, 1.0)


def _materialize(fn, x, *args, always):
  """``fn(x, *args)``, computed as one unit before its consumers run.

  XLA:CPU fuses cheap elementwise producers into each of their consumers; for
  chained jitter stages, each of which reads its input several times, that
  recomputes earlier stages again and again (10x slower at 4 stages). A
  conditional is a fusion boundary there (``optimization_barrier`` is dropped
  on CPU). ``always`` is a traced True, so the branch is always taken but
  cannot be folded away. Elsewhere an ``optimization_barrier`` suffices.
  """
  if jax.default_backend() == "cpu":
    return jax.lax.cond(always, lambda y: fn(y, *args), lambda y: y, x)
  return jax.lax.optimization_barrier(fn(x, *args))


def adjust_brightness(images, factor):
  """Multiplies by ``factor [N]`` (SimCLR v2 / torchvision brightness)."""
  return jnp.clip(images * factor[:, None, None, None], 0.0, 1.0)


def adjust_contrast(images, factor):
  """``(x - mean) * factor + mean``, per-channel mean (``tf.image.adjust_contrast``)."""
  mean = jnp.mean(images, axis=(1, 2), keepdims=True)
  return jnp.clip((images - mean) * factor[:, None, None, None] + mean, 0.0,
                  1.0)


def adjust_saturation(images, factor):
  """Scales HSV saturation by ``factor [N]`` (``tf.image.adjust_saturation``)."""
  if images.shape[-1] == 1:
    return images
  x = _planar(images)
  v, chroma, inv, _ = _hsv_parts(x)
  out = _saturation_planar(x, v, chroma, inv, factor)
  return _unplanar(jnp.clip(out, 0.0, 1.0), images.shape)


def adjust_hue(images, delta):
  """Rotates the HSV hue by ``delta [N]`` turns (``tf.image.adjust_hue``)."""
  if images.shape[-1] == 1:
    return images
  v, chroma, _, h = _hsv_parts(_planar(images))
  return _unplanar(jnp.clip(_hue_planar(v, chroma, h, delta), 0.0, 1.0),
                   images.shape)


def rgb_to_grayscale(images):
  """Luma, repeated over the 3 channels (``tf.image.rgb_to_grayscale``)."""
  if images.shape[-1] == 1:
    return images
  gray = jnp.tensordot(images, jnp.asarray(GRAY_WEIGHTS), axes=[[-1], [0]])
  return jnp.repeat(gray[..., None], 3, axis=-1)


def jitter_factors(u, strength: float):
  """Brightness, contrast, saturation factors and hue delta, each ``[N]``."""
  b, c, s, h = jitter_strengths(strength)
  def factor(ui, amount):
    lo = max(0.0, 1.0 - amount)
    return lo + ui * (1.0 + amount - lo)
  return (factor(u[:, 0], b), factor(u[:, 1], c), factor(u[:, 2], s),
          (2.0 * u[:, 3] - 1.0) * h)


def color_jitter(images, u_factors, u_order, *, strength: float):
  """SimCLR's colour jitter: the 4 ops in a random per-image order.

  Args:
    images: ``[N, H, W, C]`` float in [0, 1].
    u_factors: ``[N, 4]`` uniforms for the 4 factors.
    u_order: ``[N, 4]`` uniforms; their argsort is the op order.
    strength: SimCLR's jitter strength.

  Returns:
    ``[N, H, W, C]`` float in [0, 1].
  """
  x = _jitter_planar(_planar(images), u_factors, u_order, strength=strength)
  return _unplanar(x, images.shape)


def _jitter_planar(x, u_factors, u_order, *, strength: float, apply=None,
                   gray=None):
  """Random-order jitter of planar ``x``; ``apply``/``gray`` ``[N]`` bool masks.

  Images outside ``apply`` are left as they are, and those in ``gray`` are
  turned to grayscale afterwards, inside the materialised stages (a mask
  applied outside them would be fused into, and recompute, the stages).
  """
  fb, fc, fs, dh = jitter_factors(u_factors, strength)
  order = jnp.argsort(u_order, axis=1)
  if apply is not None:
    order = jnp.where(apply[:, None], order, 4)  # op 4: identity
  always = jnp.min(order) >= 0
  for stage in range(4):
    x = _materialize(_jitter_stage, x, order[:, stage], fb, fc, fs, dh,
                     always=always)
  if gray is not None and x.shape[1] == 3:
    x = _materialize(_gray_planar, x, gray, always=always)
  return x


def _gray_planar(x, mask):
  w = jnp.asarray(GRAY_WEIGHTS)[None, :, None]
  gray = jnp.sum(x * w, axis=1, keepdims=True)
  return jnp.where(mask[:, None, None], gray, x)


# ----------------------------------------------------------------------------
# Policies.


_STATIC = ("augment", "views", "strength", "padding", "max_degrees",
           "padding_mode", "cutout_size", "cutout_inside")


@functools.partial(jax.jit, static_argnames=_STATIC[:1] + _STATIC[2:])
def apply_augment(images, uniforms, *, augment: str, strength: float = 0.5,
                  padding: int = 4, max_degrees: float = 10.0,
                  padding_mode: str = "zero", cutout_size: int = 0,
                  cutout_inside: bool = False) -> jax.Array:
  """Deterministic half of an augmentation: images + uniforms -> views.

  Args:
    images: ``[B, H, W, C]`` uint8 (0..255) or float (0..1), C in {1, 3}.
    uniforms: ``[B, V, num_uniforms(augment)]`` in [0, 1).
    augment: one of ``AUGMENTATIONS``.
    strength: colour-jitter strength (``"simclr"``).
    padding: padding of the random crop, pixels per side (``"crop*"``).
    max_degrees: largest rotation (``"*_rotate"``).
    padding_mode: the crop's border, ``"zero"`` or ``"reflect"``
      (``"crop*"``; see ``PADDING_MODES`` and the module docstring).
    cutout_size: side of the Cutout square; 0: ``min(H, W) // 2``
      (``"crop_flip_cutout"``).
    cutout_inside: place the Cutout square wholly inside the image
      (airbench) instead of centring it anywhere and clipping it
      (``cutout_mask``).

  Returns:
    ``[B, V, H, W, C]`` float32 in [0, 1].

  Raises:
    ValueError: for bad options (``check_options``).
  """
  check_augment(augment)
  check_images(images)
  b, height, width, c = images.shape
  check_options(augment, padding=padding, padding_mode=padding_mode,
                cutout_size=cutout_size, cutout_inside=cutout_inside,
                height=height, width=width)
  if uniforms.ndim != 3 or uniforms.shape[0] != b or (
      uniforms.shape[2] != num_uniforms(augment)):
    raise ValueError(
        f"uniforms must have shape [B, V, {num_uniforms(augment)}] with B ="
        f" {b} for augment={augment!r}, got {uniforms.shape}.")
  views = uniforms.shape[1]
  x = jnp.asarray(images)
  if views > 1:
    x = jnp.broadcast_to(x[:, None], (b, views, height, width, c)).reshape(
        b * views, height, width, c)
  u = jnp.asarray(uniforms, jnp.float32).reshape(b * views, -1)
  if augment in NO_FLIP:
    augment = NO_FLIP[augment]
    u = u.at[:, 2].set(1.0)  # flips happen where u[:, 2] < 0.5
  if augment == "none":
    x = to_float(x)
  elif augment in ("crop_flip", "crop_flip_rotate", "crop_flip_cutout"):
    x = crop_flip_images(x, u, padding=padding, padding_mode=padding_mode)
    if augment == "crop_flip_rotate":
      angles = (2.0 * u[:, 3] - 1.0) * (max_degrees * math.pi / 180.0)
      x = affine_resample(x, rotation_transforms(angles, height, width))
    elif augment == "crop_flip_cutout":
      inside = cutout_mask(u[:, 3], u[:, 4], height, width,
                           size=int(cutout_size), inside=bool(cutout_inside))
      x = jnp.where(inside[..., None], jnp.float32(CUTOUT_FILL), x)
  else:  # simclr
    x = _in_chunks(functools.partial(_simclr_views, strength=strength), x, u)
  return x.reshape(b, views, height, width, c)


# Views per chunk of the SimCLR augmentation on CPU: ~3 MB of float32 32x32x3
# views, so that the crop and the five jitter passes work in cache rather than
# streaming the whole batch through memory each time (1,000 views: 22.6 ->
# 17.5 ms on an idle 2-core CPU; experiments/benchmarks/INPUT_PIPELINE.md).
_CPU_CHUNK = 256


def _in_chunks(fn, x, u):
  """``fn(x, u)`` over ``_CPU_CHUNK``-row chunks on CPU (``lax.map``).

  Elsewhere (GPU/TPU) one batched call is faster; the rows are independent, so
  the result is the same either way.
  """
  n = x.shape[0]
  k = _CPU_CHUNK
  if jax.default_backend() != "cpu" or n < 2 * k:
    return fn(x, u)
  m = n - n % k
  body = jax.lax.map(lambda a: fn(*a), (x[:m].reshape(m // k, k, *x.shape[1:]),
                                       u[:m].reshape(m // k, k, -1)))
  body = body.reshape(m, *body.shape[2:])
  return body if m == n else jnp.concatenate([body, fn(x[m:], u[m:])])


def _simclr_views(x, u, *, strength: float):
  """SimCLR's augmentation of ``x [N, H, W, C]`` with uniforms ``u [N, K]``."""
  shape = x.shape
  height, width = shape[1:3]
  slots = _SIMCLR_SLOTS
  y0, x0, h, w = resized_crop_boxes(u[:, slots["scale"]],
                                    u[:, slots["log_ratio"]], u[:, slots["y"]],
                                    u[:, slots["x"]], height, width)
  ys, xs = box_positions(y0, x0, h, w, u[:, slots["flip"]] < 0.5, height,
                         width)
  x = _planar(resample(x, ys, xs))
  x = _jitter_planar(x, u[:, slots["factors"]], u[:, slots["order"]],
                     strength=strength,
                     apply=u[:, slots["jitter"]] < JITTER_PROB,
                     gray=u[:, slots["gray"]] < GRAYSCALE_PROB)
  return _unplanar(x, shape)


@functools.partial(jax.jit, static_argnames=_STATIC)
def augment_views(key, images, *, augment: str, views: int | None = None,
                  strength: float = 0.5, padding: int = 4,
                  max_degrees: float = 10.0, padding_mode: str = "zero",
                  cutout_size: int = 0,
                  cutout_inside: bool = False) -> jax.Array:
  """Independently augmented views of a batch (jitted; options static).

  Args:
    key: PRNG key; example ``i`` uses ``jax.random.split(key, B)[i]``.
    images: ``[B, H, W, C]`` uint8 (0..255) or float (0..1).
    augment: one of ``AUGMENTATIONS``.
    views: None for ``[B, H, W, C]`` output, or an int V for ``[B, V, H, W, C]``
      (V independently augmented views of each image, e.g. 2 for SimCLR).
    strength, padding, max_degrees, padding_mode, cutout_size,
      cutout_inside: see ``apply_augment``.

  Returns:
    float32 views in [0, 1], ``[B, H, W, C]`` or ``[B, V, H, W, C]``.
  """
  check_images(images)
  n_views = _check_views(views)
  u = sample_uniforms(key, images.shape[0], augment=augment, views=n_views)
  out = apply_augment(images, u, augment=augment, strength=strength,
                      padding=padding, max_degrees=max_degrees,
                      padding_mode=padding_mode, cutout_size=cutout_size,
                      cutout_inside=cutout_inside)
  return out[:, 0] if views is None else out


def _check_views(views) -> int:
  if views is None:
    return 1
  return check_int("views", views, 1, hint=" (or None)")


def crop_flip(key, images, *, padding: int = 4,
              padding_mode: str = "zero") -> jax.Array:
  """Random crop of the padded image plus horizontal flip.

  Args:
    key: PRNG key (one per batch; split per example).
    images: ``[B, H, W, C]`` uint8 or float in [0, 1].
    padding: pixels of padding on each side (4 for CIFAR).
    padding_mode: ``"zero"`` or ``"reflect"`` (see ``apply_augment``).

  Returns:
    ``[B, H, W, C]`` float32 in [0, 1].
  """
  return augment_views(key, images, augment="crop_flip", padding=padding,
                       padding_mode=padding_mode)


def crop_flip_cutout(key, images, *, padding: int = 4,
                     padding_mode: str = "zero", cutout_size: int = 0,
                     cutout_inside: bool = False) -> jax.Array:
  """``crop_flip`` then Cutout: a square of ``CUTOUT_FILL`` of side
  ``cutout_size`` (0: ``min(H, W) // 2``), by default centred uniformly in
  the image and clipped at its borders, or with ``cutout_inside`` wholly
  inside it (airbench; ``cutout_mask``).

  Returns ``[B, H, W, C]`` float32 in [0, 1].

  References:
    DeVries & Taylor, `Improved Regularization of Convolutional Neural
    Networks with Cutout <https://arxiv.org/abs/1708.04552>`_, 2017.
  """
  return augment_views(key, images, augment="crop_flip_cutout",
                       padding=padding, padding_mode=padding_mode,
                       cutout_size=cutout_size, cutout_inside=cutout_inside)


def crop_flip_rotate(key, images, *, padding: int = 4,
                     max_degrees: float = 10.0,
                     padding_mode: str = "zero") -> jax.Array:
  """``crop_flip`` then a rotation uniform in ``[-max_degrees, max_degrees]``.

  Returns ``[B, H, W, C]`` float32 in [0, 1].
  """
  return augment_views(key, images, augment="crop_flip_rotate",
                       padding=padding, max_degrees=max_degrees,
                       padding_mode=padding_mode)


def simclr_augment(key, images, *, strength: float = 0.5) -> jax.Array:
  """SimCLR's CIFAR augmentation of one view of each image.

  Args:
    key: PRNG key (one per batch; split per example).
    images: ``[B, H, W, C]`` uint8 or float in [0, 1].
    strength: colour-jitter strength; 0.5 (SimCLR's CIFAR value) gives
      brightness/contrast/saturation 0.4 and hue 0.1.

  Returns:
    ``[B, H, W, C]`` float32 in [0, 1].
  """
  return augment_views(key, images, augment="simclr", strength=strength)
