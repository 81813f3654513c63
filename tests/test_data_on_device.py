"""On-device input path and JAX augmentations (no TensorFlow needed)."""

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import data
from contrastive_jax.data import augment_jax as aj

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HAS_CIFAR = (SHARED / "cifar10" / "train").is_dir()


def _images(n=16, size=32, seed=0):
  rng = np.random.RandomState(seed)
  return (rng.rand(n, size, size, 3) * 255).astype(np.uint8)


def coordinate_image(size=32):
  """R = 8 * row, G = 8 * col, B = 255: every pixel tells where it came from."""
  i, j = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
  return np.stack([8 * i, 8 * j, np.full_like(i, 255)], -1).astype(np.uint8)


def crop_flip_stats(views):
  """``(dy, flip)`` per view of ``coordinate_image`` under crop_flip [0, 1]."""
  v = np.asarray(views).reshape(-1, 32, 32, 3) * 255.0
  rows = np.round(v[:, 16, 16, 0] / 8).astype(int)
  dy = rows - 16 + 4
  flip = v[:, 16, 17, 1] < v[:, 16, 16, 1]
  return dy, flip


def simclr_stats(views, gray_views):
  """Stats of SimCLR views of ``coordinate_image`` (strength 0) and of gray.

  Returns ``(area, flip, is_gray, brightness_ratio)``.
  """
  v = np.asarray(views).reshape(-1, 32, 32, 3) * 255.0
  is_gray = np.all(np.abs(v[..., 0] - v[..., 1]) < 1e-3, axis=(1, 2))
  y0, y1 = v[:, 0, 0, 0] / 8, v[:, -1, 0, 0] / 8
  xa, xb = v[:, 0, 0, 1] / 8, v[:, 0, -1, 1] / 8
  area = (np.round(y1 - y0) + 1) * (np.round(np.abs(xb - xa)) + 1) / 1024.0
  flip = xb < xa
  g = np.asarray(gray_views).reshape(-1, 32, 32, 3)
  ratio = g[:, 16, 16, 0] / 0.5
  return area[~is_gray], flip[~is_gray], is_gray, ratio


def check_crop_flip_distribution(dy, flip):
  n = len(dy)
  assert n >= 300
  assert dy.min() >= 0 and dy.max() <= 8
  freq = np.bincount(dy, minlength=9) / n
  # Each of the 9 offsets has probability 1/9; +-4 sigma at n = 400.
  assert np.all(np.abs(freq - 1 / 9) < 0.07), freq
  assert 0.38 < flip.mean() < 0.62


def check_simclr_distribution(area, flip, is_gray, ratio):
  assert area.min() >= 0.06 and area.max() <= 1.0
  # E[area] of the random resized crop is about 0.55 (scale ~ U(0.08, 1)).
  assert 0.45 < area.mean() < 0.65, area.mean()
  assert 0.35 < flip.mean() < 0.65
  assert 0.12 < is_gray.mean() < 0.28  # p = 0.2
  jittered = np.abs(ratio - 1.0) > 1e-4
  assert 0.7 < jittered.mean() < 0.9  # p = 0.8
  # Brightness 0.4 (strength 0.5): factor in [0.6, 1.4], mean 1.
  assert ratio.min() >= 0.6 - 1e-3 and ratio.max() <= 1.4 + 1e-3
  assert 0.95 < ratio[jittered].mean() < 1.05


# ----------------------------------------------------------------------------
# Augmentations.


@pytest.mark.parametrize("augment", aj.AUGMENTATIONS)
def test_augment_shapes_ranges(augment):
  x = _images(8)
  out = aj.augment_views(jax.random.key(0), x, augment=augment, views=2)
  assert out.shape == (8, 2, 32, 32, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  if augment != "none":
    assert not np.allclose(out[:, 0], out[:, 1])  # views differ


def test_crop_flip_cutout_against_numpy():
  """Cutout after the same crop + flip: a 16 x 16 square of CUTOUT_FILL
  centred at (floor(32 u3), floor(32 u4)), clipped at the borders."""
  rng = np.random.RandomState(4)
  imgs = (rng.rand(6, 32, 32, 3) * 255).astype(np.uint8)
  u = rng.rand(6, 1, 5).astype(np.float32)
  u[0, 0, 3:] = 0.0     # centre (0, 0): rows and columns 0..7 only
  u[1, 0, 3:] = 0.9999  # centre (31, 31): rows and columns 23..31
  u[2, 0, 3:] = 0.5     # centre (16, 16): the whole square, 8..23
  out = np.asarray(aj.apply_augment(imgs, u, augment="crop_flip_cutout"))
  base = np.asarray(aj.apply_augment(imgs, u[..., :3], augment="crop_flip"))
  cut_pixels = []
  for i in range(6):
    cy, cx = int(np.floor(u[i, 0, 3] * 32)), int(np.floor(u[i, 0, 4] * 32))
    ref = base[i, 0].astype(np.float64)
    inside = np.zeros((32, 32), bool)
    for y in range(32):
      for x in range(32):
        inside[y, x] = cy - 8 <= y < cy + 8 and cx - 8 <= x < cx + 8
    ref[inside] = 0.5
    np.testing.assert_array_equal(out[i, 0], ref.astype(np.float32))
    cut_pixels.append(int(inside.sum()))
  assert cut_pixels[:3] == [8 * 8, 9 * 9, 16 * 16]
  assert aj.CUTOUT_FILL == 0.5


def test_augment_grayscale_channel_and_float_input():
  x = np.random.RandomState(0).rand(4, 8, 8, 1).astype(np.float32)
  out = aj.augment_views(jax.random.key(1), x, augment="simclr", views=3)
  assert out.shape == (4, 3, 8, 8, 1)
  np.testing.assert_allclose(
      aj.augment_views(jax.random.key(1), x, augment="none"), x)


def test_public_single_view_functions():
  x = _images(8)
  out = aj.crop_flip(jax.random.key(3), x)
  assert out.shape == (8, 32, 32, 3)
  # Same key, same per-example draws as view 0 of augment_views(views=1).
  np.testing.assert_array_equal(
      out, aj.augment_views(jax.random.key(3), x, augment="crop_flip",
                            views=1)[:, 0])
  cut = aj.crop_flip_cutout(jax.random.key(3), x)
  np.testing.assert_array_equal(
      cut, aj.augment_views(jax.random.key(3), x, augment="crop_flip_cutout"))
  # about 19% of each image on average (a 16 x 16 square clipped at edges)
  assert 0 < float(jnp.mean(jnp.all(cut == 0.5, axis=-1))) < 0.4


@functools.partial(jax.jit, static_argnames="padding_mode")
def _both_crops(x, u, padding_mode="zero"):
  fast = aj.crop_flip_images(x, u, padding=4, padding_mode=padding_mode)
  return fast, aj.resample(x, *aj.crop_flip_positions(
      u, 32, 32, padding=4, padding_mode=padding_mode))


@pytest.mark.parametrize("padding_mode", aj.PADDING_MODES)
def test_crop_flip_slice_matches_resample(padding_mode):
  u = jax.random.uniform(jax.random.key(0), (64, 3))
  fast, slow = _both_crops(jnp.asarray(_images(64)), u, padding_mode)
  np.testing.assert_allclose(fast, slow, atol=1e-6)


# Uniforms at the extremes: 0 and the largest float32 below 1.
_U0, _U1 = np.float32(0.0), np.nextafter(np.float32(1), np.float32(0))


def _crop_reference(imgs, u, padding, mode, flip=True):
  """NumPy padded crop + flip: ``np.pad`` then the slice at the offsets the
  uniforms imply, then the mirror; float32 in [0, 1]."""
  _, h, w, _ = imgs.shape
  span = 2 * padding + 1
  out = []
  for img, (uy, ux, uf) in zip(imgs, u[:, :3]):
    dy = min(int(np.floor(uy * np.float32(span))), span - 1)
    dx = min(int(np.floor(ux * np.float32(span))), span - 1)
    padded = np.pad(img, ((padding, padding), (padding, padding), (0, 0)),
                    mode="reflect" if mode == "reflect" else "constant")
    crop = padded[dy:dy + h, dx:dx + w]
    if flip and uf < 0.5:
      crop = crop[:, ::-1]
    out.append(crop.astype(np.float32) * np.float32(1.0 / 255.0))
  return np.stack(out)


@pytest.mark.parametrize("augment", ["crop_flip", "crop", "crop_flip_rotate"])
@pytest.mark.parametrize("padding_mode", aj.PADDING_MODES)
@pytest.mark.parametrize("padding", [2, 6])
def test_crop_padding_modes_against_numpy(augment, padding_mode, padding):
  """Reflect (and zero) padding, every crop policy, extreme offsets; 7 x 9
  images, so padding 6 is the largest reflect allows."""
  rng = np.random.RandomState(3)
  imgs = (rng.rand(9, 7, 9, 3) * 255).astype(np.uint8)
  u = rng.rand(9, 1, 4).astype(np.float32)
  u[:5, 0, :3] = [[_U0, _U0, 0.2],   # offsets (0, 0): the top-left corner
                  [_U1, _U1, 0.7],   # (2p, 2p): the bottom-right corner
                  [_U0, _U1, 0.4],
                  [_U1, _U0, 0.9],
                  [0.5, 0.5, 0.1]]   # (p, p): the image itself
  u[..., 3] = 0.5  # no rotation (angle 0 is an exact identity)
  n = aj.num_uniforms(augment)
  out = np.asarray(aj.apply_augment(imgs, u[..., :n], augment=augment,
                                    padding=padding, padding_mode=padding_mode,
                                    max_degrees=0.0))[:, 0]
  ref = _crop_reference(imgs, u[:, 0], padding, padding_mode,
                        flip=augment != "crop")
  np.testing.assert_array_equal(out, ref)
  if padding_mode == "zero":
    # the corner crops read the zero border; the reflected ones never do
    assert np.all(out[0, :padding, :padding] == 0)
  # offsets (p, p): the image itself (mirrored unless "crop")
  centre = imgs[4] if augment == "crop" else imgs[4][:, ::-1]
  np.testing.assert_array_equal(
      out[4], centre.astype(np.float32) * np.float32(1.0 / 255.0))


def _cutout_reference(u_y, u_x, height, width, size, inside):
  """``[H, W]`` bool mask of the Cutout square, in NumPy."""
  if inside:
    top = min(int(np.floor(u_y * np.float32(height - size + 1))),
              height - size)
    left = min(int(np.floor(u_x * np.float32(width - size + 1))),
               width - size)
  else:
    top = min(int(np.floor(u_y * np.float32(height))), height - 1) - size // 2
    left = min(int(np.floor(u_x * np.float32(width))), width - 1) - size // 2
  rows, cols = np.arange(height), np.arange(width)
  in_rows = (rows >= top) & (rows < top + size)
  in_cols = (cols >= left) & (cols < left + size)
  return in_rows[:, None] & in_cols[None, :]


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize("cutout_size", [0, 4, 7])
def test_cutout_size_and_inside_against_numpy(cutout_size, inside):
  """Cutout of side cutout_size (0: min(H, W) // 2 = 3) on 9 x 7 images,
  clipped or wholly inside, after a reflect-padded crop + flip."""
  height, width = 9, 7
  side = cutout_size or min(height, width) // 2
  rng = np.random.RandomState(6)
  imgs = (rng.rand(16, height, width, 3) * 255).astype(np.uint8)
  u = rng.rand(16, 1, 5).astype(np.float32)
  u[:5, 0, 3:] = [[_U0, _U0], [_U1, _U1], [_U0, _U1], [1e-7, 0.999],
                  [0.5, 0.5]]
  opts = dict(padding=2, padding_mode="reflect")
  out = np.asarray(aj.apply_augment(
      imgs, u, augment="crop_flip_cutout", cutout_size=cutout_size,
      cutout_inside=inside, **opts))[:, 0]
  base = np.asarray(aj.apply_augment(imgs, u[..., :3], augment="crop_flip",
                                     **opts))[:, 0]
  masks = np.stack([_cutout_reference(u[i, 0, 3], u[i, 0, 4], height, width,
                                      side, inside) for i in range(16)])
  ref = np.where(masks[..., None], np.float32(aj.CUTOUT_FILL), base)
  np.testing.assert_array_equal(out, ref)
  # The reference's corners: u = 0 and u -> 1 reach the first and last rows
  # and columns (wholly inside: the square's own first and last positions).
  assert masks[0, 0, 0] and masks[1, -1, -1]
  assert masks[2, 0, -1]
  # uint8 pixels are never 0.5 after the crop: count what was cut.
  cut = (out == aj.CUTOUT_FILL).sum(axis=(1, 2))  # [N, C]
  if inside:
    assert np.all(masks.sum(axis=(1, 2)) == side * side)
    assert np.all(cut == side * side)  # every example, every channel
    np.testing.assert_array_equal(np.argwhere(masks[1])[0],
                                  [height - side, width - side])
    np.testing.assert_array_equal(np.argwhere(masks[0])[0], [0, 0])
  else:
    # clipped at the corner: rows/columns 0 .. side - side // 2 - 1 only
    assert masks[0].sum() == (side - side // 2) ** 2
    assert cut[0, 0] == (side - side // 2) ** 2


def test_augment_option_errors():
  key, x = jax.random.key(0), _images(2, size=8)
  V, T = ValueError, TypeError
  for opts, error, match in (
      (dict(padding_mode="edge"), V, "padding_mode must be one of"),
      (dict(padding_mode="reflect", padding=8), V, "padding_mode='reflect' needs"),
      (dict(padding_mode="reflect", padding=-1), V, "padding must be an int >= 0"),
      (dict(padding=-1), V, "padding must be an int >= 0"),
      (dict(padding=2.5), T, "padding must be an int >= 0"),
      (dict(cutout_size=-1), V, "cutout_size must be an int >= 0"),
      (dict(cutout_size=2.5), T, "cutout_size must be an int >= 0"),
      (dict(cutout_size=9), V, "cutout_size must be at most min"),
      (dict(cutout_inside="yes"), T, "cutout_inside must be a bool")):
    with pytest.raises(error, match=match):
      aj.augment_views(key, x, augment="crop_flip_cutout", **opts)
  with pytest.raises(ValueError, match="reflect"):
    aj.crop_flip(key, x, padding=8, padding_mode="reflect")
  # The limits themselves are fine: padding H - 1, a square as big as the image.
  out = aj.crop_flip_cutout(key, x, padding=7, padding_mode="reflect",
                            cutout_size=8, cutout_inside=True)
  np.testing.assert_array_equal(out, aj.CUTOUT_FILL)


@jax.jit
def _color_ops(x):
  ones = jnp.ones([x.shape[0]])
  return dict(bright=aj.adjust_brightness(x, ones),
              contrast=aj.adjust_contrast(x, ones),
              sat=aj.adjust_saturation(x, ones),
              hue0=aj.adjust_hue(x, 0 * ones), hue1=aj.adjust_hue(x, ones),
              gray=aj.rgb_to_grayscale(x), sat0=aj.adjust_saturation(x, 0 * ones))


def test_color_ops_identities():
  x = np.random.RandomState(0).rand(4, 8, 8, 3).astype(np.float32)
  out = _color_ops(x)
  for k in ("bright", "contrast", "sat", "hue0", "hue1"):  # hue1: 1 turn
    np.testing.assert_allclose(out[k], x, atol=1e-5, err_msg=k)
  np.testing.assert_allclose(out["gray"][..., 0], out["gray"][..., 2])
  # Saturation 0: every channel becomes the max channel (HSV value).
  np.testing.assert_allclose(out["sat0"][..., 0], x.max(-1), atol=1e-6)


def test_jitter_factor_ranges():
  u = jnp.asarray([[0.0] * 4, [1.0] * 4])
  b, c, s, h = aj.jitter_factors(u, 0.5)
  np.testing.assert_allclose(b, [0.6, 1.4], atol=1e-6)
  np.testing.assert_allclose(c, [0.6, 1.4], atol=1e-6)
  np.testing.assert_allclose(s, [0.6, 1.4], atol=1e-6)
  np.testing.assert_allclose(h, [-0.1, 0.1], atol=1e-6)
  assert aj.jitter_strengths(1.0) == pytest.approx((0.8, 0.8, 0.8, 0.2))


def test_resized_crop_boxes_valid():
  u = jax.random.uniform(jax.random.key(0), (500, 22))
  boxes = jax.jit(aj.resized_crop_boxes, static_argnums=(4, 5))
  y0, x0, h, w = map(np.asarray, boxes(u[:, :10], u[:, 10:20], u[:, 20],
                                       u[:, 21], 32, 32))
  assert np.all(y0 >= 0) and np.all(x0 >= 0)
  assert np.all(y0 + h <= 32) and np.all(x0 + w <= 32)
  ratio = np.asarray(w / h)
  assert ratio.min() > 0.6 and ratio.max() < 1.6
  assert np.all(h * w >= 0.06 * 1024)


def test_augment_distribution_crop_flip():
  img = np.repeat(coordinate_image()[None], 400, axis=0)
  out = aj.augment_views(jax.random.key(5), img, augment="crop_flip")
  check_crop_flip_distribution(*crop_flip_stats(out))


def test_augment_crop_never_flips():
  img = np.repeat(coordinate_image()[None], 400, axis=0)
  u = np.random.RandomState(0).rand(400, 1, aj.num_uniforms("crop")).astype(np.float32)
  out = aj.apply_augment(img, u, augment="crop")
  dy, flip = crop_flip_stats(out)
  assert not flip.any()
  flipped = aj.apply_augment(img, u, augment="crop_flip")
  # Same crop offsets as crop_flip from the same uniforms, only the flip is gone.
  np.testing.assert_array_equal(dy, crop_flip_stats(flipped)[0])
  assert 0.38 < crop_flip_stats(flipped)[1].mean() < 0.62


def test_augment_distribution_simclr():
  coord = np.repeat(coordinate_image()[None], 400, axis=0)
  gray = np.full([400, 32, 32, 3], 0.5, np.float32)
  v = aj.augment_views(jax.random.key(6), coord, augment="simclr", strength=0.0)
  g = aj.augment_views(jax.random.key(7), gray, augment="simclr")
  check_simclr_distribution(*simclr_stats(v, g))


def test_simclr_in_chunks_matches_one_batch(monkeypatch):
  # 11 images x 2 views = 22 rows: five chunks of 4 and a remainder of 2.
  monkeypatch.setattr(aj, "_CPU_CHUNK", 4)
  imgs = _images(22)
  u = np.random.RandomState(3).rand(22, aj.num_uniforms("simclr")).astype(
      np.float32)
  fn = lambda x, u: aj._simclr_views(x, u, strength=0.5)
  whole = jax.jit(fn)(imgs, u)
  chunked = jax.jit(lambda x, u: aj._in_chunks(fn, x, u))(imgs, u)
  np.testing.assert_allclose(chunked, whole, atol=1e-6)
  if jax.default_backend() == "cpu":
    lowered = jax.jit(lambda x, u: aj._in_chunks(fn, x, u)).lower(imgs, u)
    assert "while" in lowered.as_text()  # the chunked path really ran


def test_augment_bad_inputs():
  with pytest.raises(ValueError, match="augment must be one of"):
    aj.augment_views(jax.random.key(0), _images(2), augment="blur")
  with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
    aj.augment_views(jax.random.key(0), _images(2)[0], augment="none")
  with pytest.raises(TypeError, match="uint8"):
    aj.augment_views(jax.random.key(0), _images(2).astype(np.int32),
                     augment="none")
  with pytest.raises(ValueError, match="views"):
    aj.augment_views(jax.random.key(0), _images(2), augment="none", views=0)


# ----------------------------------------------------------------------------
# Batches on device.


def _indexed(n=40):
  """Images plus labels = example index, so a batch's labels are its indices."""
  return data.put_on_device(_images(n, size=8), np.arange(n))


def test_put_on_device_and_digits():
  d = data.load_device_data("digits", "validation")
  assert d.images.dtype == jnp.float32 and d.images.shape[1:] == (8, 8, 1)
  assert d.labels.dtype == jnp.int32 and d.labels.shape == d.images.shape[:1]
  with pytest.raises(ValueError, match="labels"):
    data.put_on_device(_images(4), np.arange(3))


def test_device_batches_shapes_and_normalisation():
  d = data.put_on_device(_images(32), np.arange(32) % 4)
  mean, std = data.dataset_stats("cifar10")
  it = data.device_batches(d, key=jax.random.key(0), batch_size=8,
                           augment="crop_flip", views=2, mean=mean, std=std)
  b = next(it)
  assert b["image"].shape == (8, 2, 32, 32, 3)
  assert b["image"].dtype == jnp.float32 and b["label"].dtype == jnp.int32
  lo = (0 - np.asarray(mean)) / np.asarray(std)
  hi = (1 - np.asarray(mean)) / np.asarray(std)
  assert np.all(np.asarray(b["image"]).min((0, 1, 2, 3)) >= lo - 1e-5)
  assert np.all(np.asarray(b["image"]).max((0, 1, 2, 3)) <= hi + 1e-5)
  b1 = next(data.device_batches(d, key=jax.random.key(0), batch_size=8))
  assert b1["image"].shape == (8, 32, 32, 3)


def test_epochs_are_permutations_and_deterministic():
  d = _indexed(40)
  key = jax.random.key(3)
  batches = list(data.device_batches(d, key=key, batch_size=8, num_steps=10))
  idx = np.stack([np.asarray(b["label"]) for b in batches])  # [10, 8]
  epoch0, epoch1 = idx[:5].ravel(), idx[5:].ravel()
  assert sorted(epoch0) == list(range(40)) == sorted(epoch1)
  assert not np.array_equal(epoch0, epoch1)
  again = list(data.device_batches(d, key=key, batch_size=8, num_steps=10))
  for a, b in zip(batches, again):
    np.testing.assert_array_equal(a["image"], b["image"])
  other = next(data.device_batches(d, key=jax.random.key(4), batch_size=8))
  assert not np.array_equal(other["label"], batches[0]["label"])


def test_batches_need_no_host_to_device_copy():
  """After the first (compiling) batch the step stays on the device, across
  an epoch boundary (40 examples, batches of 8: 5 per epoch)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  labels = np.arange(40) % 4
  sharded = NamedSharding(jax.make_mesh((4,), ("data",), devices=jax.devices()[:4]),
                          P("data"))
  for sharding in (None, sharded):
    d = data.put_on_device(_images(40, size=8), labels, sharding=sharding)
    for balanced in ({}, dict(classes_per_batch=4, examples_per_class=2,
                             num_classes=4)):
      it = data.device_batches(d, key=jax.random.key(0), batch_size=8,
                               num_steps=7, **balanced)
      jax.block_until_ready(next(it))
      with jax.transfer_guard_host_to_device("disallow"):
        for b in it:
          jax.block_until_ready(b)


def test_resume_and_pure_sample_batch_agree():
  d = _indexed(40)
  key = jax.random.key(7)
  opts = dict(batch_size=8, augment="crop_flip", views=2)
  full = list(data.device_batches(d, key=key, num_steps=9, **opts))
  resumed = list(data.device_batches(d, key=key, start_step=4, num_steps=5,
                                     **opts))
  for a, b in zip(full[4:], resumed):
    np.testing.assert_array_equal(a["label"], b["label"])
    np.testing.assert_allclose(a["image"], b["image"], atol=1e-6)
  pure = jax.jit(lambda s: data.sample_batch(key, d, s, **opts))
  for s in (0, 6):
    b = pure(s)
    np.testing.assert_array_equal(b["label"], full[s]["label"])
    np.testing.assert_allclose(b["image"], full[s]["image"], atol=1e-6)


def test_balanced_batches():
  labels = np.repeat(np.arange(6), [10, 10, 10, 10, 10, 3])
  d = data.put_on_device(_images(len(labels), size=8), labels)
  it = data.device_batches(d, key=jax.random.key(0), batch_size=12,
                           classes_per_batch=3, examples_per_class=4,
                           num_classes=6, num_steps=12)
  seen = set()
  for b in it:
    lab = np.asarray(b["label"]).reshape(3, 4)
    assert len(set(lab[:, 0])) == 3  # P distinct classes
    assert np.all(lab == lab[:, :1])  # K of each
    seen.update(lab[:, 0].tolist())
  assert seen == set(range(6))
  indices = jax.jit(data.balanced_batch_indices,
                    static_argnames=("num_classes", "classes_per_batch",
                                     "examples_per_class"))
  idx = indices(jax.random.key(1), 0, jnp.asarray(labels), num_classes=6,
                classes_per_batch=6, examples_per_class=4)
  for c, block in enumerate(np.asarray(idx).reshape(6, 4)):
    cls = labels[block]
    assert len(set(cls)) == 1
    if (labels == cls[0]).sum() >= 4:
      assert len(set(block)) == 4  # without replacement when possible
  with pytest.raises(ValueError, match="must equal batch_size"):
    next(data.device_batches(d, key=jax.random.key(0), batch_size=12,
                             classes_per_batch=5, examples_per_class=2,
                             num_classes=6))
  # 7 classes asked of a split that has 6 (of num_classes=8): refused.
  with pytest.raises(ValueError, match="exceeds the 6 classes present"):
    next(data.device_batches(d, key=jax.random.key(0), batch_size=14,
                             classes_per_batch=7, examples_per_class=2,
                             num_classes=8))
  # sample_batch, called eagerly, checks the same and the label range.
  balanced = dict(batch_size=14, classes_per_batch=7, examples_per_class=2)
  with pytest.raises(ValueError, match="exceeds the 6 classes present"):
    data.sample_batch(jax.random.key(0), d, 0, num_classes=8, **balanced)
  with pytest.raises(ValueError, match=r"labels must be in 0\.\.4 \(num_cl"):
    data.sample_batch(jax.random.key(0), d, 0, num_classes=5,
                      **dict(balanced, classes_per_batch=5, batch_size=10))


def test_eval_batches_cover_split_once():
  d = _indexed(21)
  out = list(data.device_eval_batches(d, batch_size=8))
  assert len(out) == 3
  labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"])]
                           for b in out])
  np.testing.assert_array_equal(labels, np.arange(21))
  assert np.asarray(out[-1]["mask"]).sum() == 5
  for bad, error in ((0, ValueError), (-4, ValueError), (2.0, TypeError)):
    with pytest.raises(error, match="batch_size must be an int >= 1"):
      next(data.device_eval_batches(d, batch_size=bad))
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    data.sample_batch(jax.random.key(0), d, 0, batch_size=0)


def test_augment_options_reach_batches():
  """padding_mode / cutout_size / cutout_inside through sample_batch and
  device_batches: with pixels in 1..254 a reflected border holds no 0, and a
  3 x 3 square inside every image cuts exactly 9 pixels per channel."""
  images = (np.random.RandomState(2).rand(16, 8, 8, 3) * 253 + 1).astype(
      np.uint8)
  d = data.put_on_device(images, np.arange(16))
  key = jax.random.key(5)
  opts = dict(batch_size=8, augment="crop_flip_cutout", padding=4)
  new = dict(padding_mode="reflect", cutout_size=3, cutout_inside=True)
  for b in (data.sample_batch(key, d, 1, **opts, **new),
            next(data.device_batches(d, key=key, **opts, **new))):
    x = np.asarray(b["image"])
    assert np.all(x > 0)
    np.testing.assert_array_equal((x == aj.CUTOUT_FILL).sum(axis=(1, 2)), 9)
  # The defaults: zero padding shows, Cutout's 4 x 4 square is clipped.
  x = np.asarray(data.sample_batch(key, d, 1, **opts)["image"])
  assert np.any(x == 0)
  assert np.any((x == aj.CUTOUT_FILL).sum(axis=(1, 2)) != 9)
  for bad, match in ((dict(padding_mode="wrap"), "padding_mode"),
                     (dict(padding_mode="reflect", padding=8), "reflect"),
                     (dict(cutout_size=9), "cutout_size")):
    with pytest.raises(ValueError, match=match):
      data.sample_batch(key, d, 0, **{**opts, **bad})
    with pytest.raises(ValueError, match=match):
      next(data.device_batches(d, key=key, **{**opts, **bad}))


def test_batch_size_errors():
  d = _indexed(10)
  with pytest.raises(ValueError, match="larger than the split"):
    next(data.device_batches(d, key=jax.random.key(0), batch_size=16))
  with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
    next(data.device_batches(d, key=jax.random.key(0), batch_size=0))


def test_sharded_batches_in_subprocess():
  """Two host CPU devices: data and batches sharded over a "data" axis."""
  code = textwrap.dedent("""
      import jax, numpy as np, pytest
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from contrastive_jax import data
      mesh = Mesh(np.array(jax.devices()), ("data",))
      sh = NamedSharding(mesh, P("data"))
      n = 41
      imgs = np.zeros([n, 8, 8, 3], np.uint8)
      d = data.put_on_device(imgs, np.arange(n), sharding=sh)
      assert d.images.shape[0] == 40, d.images.shape  # 41 -> 2 * 20
      it = data.device_batches(d, key=jax.random.key(0), batch_size=8,
                               augment="crop_flip", views=2, num_steps=5)
      lab = []
      for b in it:
        assert b["image"].shape == (8, 2, 8, 8, 3), b["image"].shape
        assert b["image"].sharding.spec[0] == "data"
        l = np.asarray(b["label"])
        # Shard d holds examples d, d + 2, ... (dealt out in label order).
        assert np.all(l[:4] % 2 == 0) and np.all(l[4:] % 2 == 1), l
        lab.append(l)
      epoch = np.concatenate(lab)  # 5 steps * 8 = one epoch of 40
      assert sorted(epoch) == list(range(40)), sorted(epoch)

      # Class-sorted labels (as an image folder lists them), 8 examples of
      # each of 5 classes; every image holds its example index.
      labels = np.repeat(np.arange(5), 8)
      ids = np.arange(40, dtype=np.uint8)[:, None, None, None]
      d = data.put_on_device(np.broadcast_to(ids, (40, 2, 2, 1)), labels,
                             sharding=sh)
      ex = lambda b: np.round(np.asarray(b["image"])[:, 0, 0, 0] * 255
                              ).astype(int)
      # Uniform batches: each device sees every class within an epoch.
      seen = [set(), set()]
      for b in data.device_batches(d, key=jax.random.key(1), batch_size=8,
                                   num_steps=5):
        i = ex(b)
        np.testing.assert_array_equal(np.asarray(b["label"]), labels[i])
        for dev in range(2):
          seen[dev].update(labels[i[4 * dev:4 * dev + 4]].tolist())
      assert seen == [set(range(5))] * 2, seen

      # P x K over the shards: P distinct classes, K of each, no repeats.
      pk = dict(key=jax.random.key(0), batch_size=8, classes_per_batch=4,
                examples_per_class=2, num_classes=5)
      batches = list(data.device_batches(d, num_steps=8, **pk))
      for b in batches:
        i, l = ex(b), np.asarray(b["label"])
        np.testing.assert_array_equal(l, labels[i])
        assert len(set(l)) == 4 and set(np.bincount(l)) <= {0, 2}, l
        assert len(set(i)) == 8, i
      resumed = next(data.device_batches(d, start_step=5, **pk))
      np.testing.assert_array_equal(resumed["image"], batches[5]["image"])

      # A class on one shard only: refused, instead of repeating examples.
      one = np.repeat(np.arange(5), [8, 8, 1, 8, 9])  # 34 -> 2 * 17
      d = data.put_on_device(np.zeros([34, 2, 2, 1], np.uint8), one,
                             sharding=sh)
      with pytest.raises(ValueError, match="every shard must hold") as e:
        next(data.device_batches(d, **pk))
      assert "shard 1 of 2 holds no example of classes [2]" in str(e.value)
      print("OK")
      """)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not HAS_CIFAR, reason="../shared/data/cifar10 is absent")
def test_cifar10_validation_on_device(tmp_path):
  d = data.load_device_data("cifar10", "validation", data_dir=SHARED)
  assert d.images.shape == (5000, 32, 32, 3) and d.images.dtype == jnp.uint8
  np.testing.assert_array_equal(np.bincount(np.asarray(d.labels)), [500] * 10)
  b = next(data.device_batches(d, key=jax.random.key(0), batch_size=64,
                               views=2))
  assert b["image"].shape == (64, 2, 32, 32, 3)
