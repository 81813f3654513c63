"""The tf.data pipeline, and the TF twins of the JAX augmentations."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest
from PIL import Image

tf = pytest.importorskip("tensorflow")

from contrastive_jax import data  # pylint: disable=g-import-not-at-top
from contrastive_jax.data import augment_jax as aj  # pylint: disable=g-import-not-at-top
from contrastive_jax.data import augment_tf as at  # pylint: disable=g-import-not-at-top

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HAS_CIFAR = (SHARED / "cifar10" / "train").is_dir()


def _sibling(name):
  """Imports a sibling test module by path (whatever pytest's import mode)."""
  path = pathlib.Path(__file__).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


sources_tests = _sibling("test_data_sources")
device_tests = _sibling("test_data_on_device")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  root = tmp_path_factory.mktemp("folder")
  pixels = sources_tests.make_image_folder(root, per_class=12, size=8)
  return root, pixels


def _batches(n, **kwargs):
  it = data.tf_batches(**kwargs)
  return [next(it) for _ in range(n)]


# ----------------------------------------------------------------------------
# TF twins of the JAX augmentations.


@pytest.mark.parametrize("augment", aj.AUGMENTATIONS)
def test_tf_and_jax_apply_identically(augment):
  rng = np.random.RandomState(0)
  imgs = (rng.rand(32, 32, 32, 3) * 255).astype(np.uint8)
  u = rng.rand(32, 2, aj.num_uniforms(augment)).astype(np.float32)
  j = np.asarray(aj.apply_augment(imgs, u, augment=augment))
  t = at.apply_augment(tf.constant(imgs), tf.constant(u),
                       augment=augment).numpy()
  assert j.shape == t.shape == (32, 2, 32, 32, 3)
  np.testing.assert_allclose(j, t, atol=3e-4)


_U1 = float(np.nextafter(np.float32(1), np.float32(0)))


@pytest.mark.parametrize("augment, opts", [
    ("crop_flip", dict(padding_mode="reflect")),
    ("crop", dict(padding_mode="reflect", padding=6)),
    ("crop_flip_rotate", dict(padding_mode="reflect")),
    ("crop_flip_cutout", dict(padding_mode="reflect", cutout_size=5,
                              cutout_inside=True)),
    ("crop_flip_cutout", dict(cutout_size=0, cutout_inside=True)),
    ("crop_flip_cutout", dict(cutout_size=7)),
    ("crop_flip_cutout", dict(cutout_size=7, cutout_inside=True)),
], ids=["reflect", "crop-reflect-p6", "rotate-reflect",
        "cutout-reflect-5-inside", "cutout-inside", "cutout-7",
        "cutout-7-inside"])
def test_tf_and_jax_apply_identically_with_options(augment, opts):
  """Same uniforms, same images, for padding_mode / cutout_size /
  cutout_inside; 7 x 9 images, uniforms at 0 and just below 1 included."""
  rng = np.random.RandomState(7)
  imgs = (rng.rand(16, 7, 9, 3) * 255).astype(np.uint8)
  u = rng.rand(16, 1, aj.num_uniforms(augment)).astype(np.float32)
  u[0, 0, :2], u[1, 0, :2] = 0.0, _U1
  if augment == "crop_flip_cutout":
    u[2, 0, 3:], u[3, 0, 3:], u[4, 0, 3:] = 0.0, _U1, [0.0, _U1]
  j = np.asarray(aj.apply_augment(imgs, u, augment=augment, **opts))
  t = at.apply_augment(tf.constant(imgs), tf.constant(u), augment=augment,
                       **opts).numpy()
  assert j.shape == t.shape == (16, 1, 7, 9, 3)
  np.testing.assert_allclose(j, t, atol=3e-4)
  if opts.get("padding_mode") == "reflect" and augment != "crop_flip_rotate":
    np.testing.assert_array_equal(j, t)  # the reflect crop is exact in both


def test_tf_color_ops_match_tf_image():
  rng = np.random.RandomState(1)
  x = rng.rand(8, 8, 8, 3).astype(np.float32)
  f = rng.uniform(0, 2, 8).astype(np.float32)
  d = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
  for mine, ref, arg in (
      (at.adjust_saturation, tf.image.adjust_saturation, f),
      (at.adjust_hue, tf.image.adjust_hue, d),
      (at.adjust_contrast, tf.image.adjust_contrast, f)):
    expect = np.stack([np.clip(ref(x[i], arg[i]).numpy(), 0, 1)
                       for i in range(8)])
    np.testing.assert_allclose(mine(tf.constant(x), tf.constant(arg)).numpy(),
                               expect, atol=1e-5, err_msg=mine.__name__)
    np.testing.assert_allclose(
        jax.jit(getattr(aj, mine.__name__))(x, arg), expect, atol=1e-5,
        err_msg="jax " + mine.__name__)
  gray = tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(x)).numpy()
  np.testing.assert_allclose(at.rgb_to_grayscale(tf.constant(x)).numpy(),
                             gray, atol=1e-6)


def test_tf_rotation_matches_jax():
  rng = np.random.RandomState(2)
  x = rng.rand(8, 16, 16, 3).astype(np.float32)
  ang = rng.uniform(-0.5, 0.5, 8).astype(np.float32)
  t = at.affine_resample(tf.constant(x), at.rotation_transforms(
      tf.constant(ang), 16, 16)).numpy()
  j = jax.jit(lambda x, a: aj.affine_resample(
      x, aj.rotation_transforms(a, 16, 16)))(x, ang)
  np.testing.assert_allclose(t, j, atol=1e-5)


@pytest.fixture(scope="module")
def stats_folder(tmp_path_factory):
  """A folder of 20 coordinate images (class 0) and 20 gray ones (class 1)."""
  root = tmp_path_factory.mktemp("stats")
  coord = device_tests.coordinate_image()
  for cls, img in (("a_coord", coord),
                   ("b_gray", np.full([32, 32, 3], 128, np.uint8))):
    d = root / "stats" / "train" / cls
    d.mkdir(parents=True)
    for i in range(20):
      Image.fromarray(img).save(d / f"{i:02d}.png")
  return root


def _views_by_class(root, augment, strength, n_batches=2):
  opts = dict(name="stats", split="train_full", data_dir=root,
              global_batch_size=40, augment=augment, views=10,
              strength=strength, normalize=False, seed=11, num_devices=1)
  out = {0: [], 1: []}
  for b in _batches(n_batches, **opts):
    for c in (0, 1):
      out[c].append(b["image"][b["label"] == c].reshape(-1, 32, 32, 3))
  return {c: np.concatenate(v) for c, v in out.items()}


def test_tf_pipeline_distribution_crop_flip(stats_folder):
  views = _views_by_class(stats_folder, "crop_flip", 0.5)
  device_tests.check_crop_flip_distribution(
      *device_tests.crop_flip_stats(views[0]))


def test_tf_pipeline_distribution_simclr(stats_folder):
  coord = _views_by_class(stats_folder, "simclr", 0.0)[0]
  gray = _views_by_class(stats_folder, "simclr", 0.5)[1]
  # The gray PNG is 128/255, not 0.5: rescale so the ratio is the factor.
  gray = gray * (0.5 / (128 / 255))
  device_tests.check_simclr_distribution(
      *device_tests.simclr_stats(coord, gray))


# ----------------------------------------------------------------------------
# The pipeline.


@pytest.fixture(scope="module")
def no_zero_folder(tmp_path_factory):
  """2 classes x 8 images of 8 x 8 pixels in 1..254 (never 0, never 0.5)."""
  root = tmp_path_factory.mktemp("nozero")
  rng = np.random.RandomState(1)
  for cls in ("a", "b"):
    d = root / "tiny" / "train" / cls
    d.mkdir(parents=True)
    for i in range(8):
      img = (rng.rand(8, 8, 3) * 253 + 1).astype(np.uint8)
      Image.fromarray(img).save(d / f"{i:04d}.png")
  return root


def test_augment_options_reach_tf_batches(no_zero_folder):
  """padding_mode / cutout_size / cutout_inside reach build_tf_dataset's
  batches: a reflected border holds no 0, and a 3 x 3 square inside every
  image cuts exactly 9 pixels per channel; bad values raise up front."""
  opts = dict(name="tiny", split="train", data_dir=no_zero_folder,
              global_batch_size=8, augment="crop_flip_cutout", padding=4,
              normalize=False, num_devices=1)
  new = dict(padding_mode="reflect", cutout_size=3, cutout_inside=True)
  for b in _batches(2, **opts, **new):
    assert np.all(b["image"] > 0)
    np.testing.assert_array_equal(
        (b["image"] == aj.CUTOUT_FILL).sum(axis=(1, 2)), 9)
  # The defaults: zero padding shows, Cutout's 4 x 4 square is clipped.
  x = np.concatenate([b["image"] for b in _batches(2, **opts)])
  assert np.any(x == 0)
  assert np.any((x == aj.CUTOUT_FILL).sum(axis=(1, 2)) != 9)
  for bad, match in ((dict(padding_mode="symmetric"), "padding_mode"),
                     (dict(cutout_size=-2), "cutout_size"),
                     (dict(padding_mode="reflect", padding=8), "reflect"),
                     (dict(cutout_size=9), "cutout_size must be at most")):
    with pytest.raises(ValueError, match=match):
      data.build_tf_dataset(**{**opts, **bad})


def test_shapes_dtypes_ranges_and_views_differ(folder):
  root, _ = folder
  b = _batches(1, name="tiny", split="train", data_dir=root,
               global_batch_size=8, augment="simclr", views=2, seed=0,
               mean=(0.5,) * 3, std=(0.25,) * 3, num_devices=1)[0]
  assert set(b) == {"image", "label"}
  assert b["image"].shape == (8, 2, 8, 8, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  assert b["image"].min() >= -2 - 1e-5 and b["image"].max() <= 2 + 1e-5
  assert not np.allclose(b["image"][:, 0], b["image"][:, 1])
  plain = _batches(1, name="tiny", split="train", data_dir=root,
                   global_batch_size=8, normalize=False, num_devices=1)[0]
  assert plain["image"].shape == (8, 8, 8, 3)
  assert 0 <= plain["image"].min() and plain["image"].max() <= 1


def test_digits_default_source():
  b = _batches(1, name="digits", split="train", global_batch_size=16,
               augment="crop_flip", views=2, num_devices=1)[0]
  assert b["image"].shape == (16, 2, 8, 8, 1)
  mean, std = data.dataset_stats("digits")
  lo, hi = (0 - mean[0]) / std[0], (1 - mean[0]) / std[0]
  assert lo - 1e-5 <= b["image"].min() and b["image"].max() <= hi + 1e-5


def test_epochs_cover_train_once_and_skip_validation(folder):
  root, pixels = folder
  # 36 examples, 27 train / 9 validation; batch 9: 3 batches per epoch.
  opts = dict(name="tiny", data_dir=root, global_batch_size=9,
              normalize=False, num_devices=1, validation_fraction=0.25)
  epoch = np.concatenate([b["image"] for b in _batches(3, split="train",
                                                       **opts)])
  key = lambda imgs: sorted((np.round(i * 255).astype(np.uint8)).tobytes()
                            for i in imgs)
  train = data.load_split_arrays("tiny", "train", data_dir=root,
                                 validation_fraction=0.25)
  assert key(epoch) == sorted(i.tobytes() for i in train.images)
  val = [b for b in data.tf_batches(split="validation", **opts)]
  assert len(val) == 1 and val[0]["mask"].all()
  assert not set(key(val[0]["image"])) & set(key(epoch))


def test_deterministic_and_seeded(folder):
  root, _ = folder
  opts = dict(name="tiny", split="train", data_dir=root, global_batch_size=6,
              augment="crop_flip_rotate", views=2, num_devices=1,
              normalize=False)
  a = _batches(3, seed=1, **opts)
  b = _batches(3, seed=1, **opts)
  c = _batches(3, seed=2, **opts)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_resume_and_uncached_give_same_batches(folder):
  root, _ = folder
  opts = dict(name="tiny", split="train", data_dir=root, global_batch_size=6,
              augment="simclr", views=2, seed=3, num_devices=1,
              normalize=False)
  full = _batches(8, **opts)  # 33 train examples: 5 batches per epoch
  resumed = _batches(5, start_step=3, **opts)  # across the epoch boundary
  for x, y in zip(full[3:], resumed):
    np.testing.assert_array_equal(x["label"], y["label"])
    np.testing.assert_allclose(x["image"], y["image"], atol=1e-6)
  uncached = _batches(3, cache=False, **opts)
  for x, y in zip(full, uncached):
    np.testing.assert_allclose(x["image"], y["image"], atol=1e-6)


def test_class_balanced_batches(folder):
  root, _ = folder
  for b in _batches(4, name="tiny", split="train", data_dir=root,
                    global_batch_size=8, classes_per_batch=2,
                    examples_per_class=4, num_devices=1, seed=5,
                    normalize=False):
    lab = b["label"].reshape(2, 4)
    assert lab[0, 0] != lab[1, 0]
    assert np.all(lab == lab[:, :1])
    # Without replacement within a class when it has K examples.
    for block in b["image"].reshape(2, 4, -1):
      assert len({x.tobytes() for x in block}) == 4


@pytest.fixture(scope="module")
def eight_classes(tmp_path_factory):
  """8 classes of 6 random images; ``uneven`` has a class of 1 image."""
  root = tmp_path_factory.mktemp("eight")
  classes = tuple(f"c{i}" for i in range(8))
  sources_tests.make_image_folder(root, name="eight", classes=classes,
                                  per_class=6, size=4)
  sources_tests.make_image_folder(root, name="uneven", classes=classes[:4],
                                  per_class=4, size=4)
  for f in sorted((root / "uneven" / "train" / "c1").iterdir())[1:]:
    f.unlink()  # class 1: one image, on process 0's shard only
  return root


def test_class_balanced_batches_over_processes(eight_classes):
  """The processes' P / 2 classes together are P distinct classes x K."""
  opts = dict(name="eight", split="train_full", data_dir=eight_classes,
              global_batch_size=12, classes_per_batch=6, examples_per_class=2,
              num_devices=2, seed=5, normalize=False)
  per_process = [_batches(8, process_index=i, process_count=2, **opts)
                 for i in range(2)]
  for step, (b0, b1) in enumerate(zip(*per_process)):
    lab = np.concatenate([b0["label"], b1["label"]])
    assert len(set(lab)) == 6, (step, lab)  # P distinct classes
    assert np.all(lab.reshape(6, 2) == lab.reshape(6, 2)[:, :1]), lab  # K each
    images = [x.tobytes() for x in np.concatenate([b0["image"],
                                                   b1["image"]])]
    assert len(set(images)) == 12, step  # no example twice
  with pytest.raises(ValueError, match=r"process 1 of 2 holds no example of"
                     r" classes \[1\]"):
    data.build_tf_dataset(**dict(opts, name="uneven", global_batch_size=4,
                                 classes_per_batch=2),
                          process_index=0, process_count=2)


def test_multi_process_shards_and_padded_eval(folder):
  root, _ = folder
  opts = dict(name="tiny", split="train_full", data_dir=root, train=False,
              global_batch_size=8, normalize=False, num_devices=2)
  per_process = [list(data.tf_batches(process_index=i, process_count=2,
                                      **opts)) for i in range(2)]
  assert len(per_process[0]) == len(per_process[1]) == 5  # 18 each, batch 4
  seen = []
  for batches in per_process:
    for b in batches:
      assert b["image"].shape == (4, 8, 8, 3)
      seen += [x.tobytes() for x in b["image"][b["mask"]]]
  assert len(seen) == 36 == len(set(seen))
  # Training streams of the two processes read disjoint shards.
  tr = [np.concatenate([b["image"] for b in _batches(
      4, name="tiny", split="train_full", data_dir=root, global_batch_size=8,
      normalize=False, num_devices=2, process_index=i, process_count=2)])
        for i in range(2)]
  assert not {x.tobytes() for x in tr[0]} & {x.tobytes() for x in tr[1]}


def test_bad_arguments(folder):
  root, _ = folder
  opts = dict(name="tiny", split="train", data_dir=root, normalize=False)
  with pytest.raises(ValueError, match="divisible by the number of devices"):
    data.build_tf_dataset(global_batch_size=6, num_devices=4, **opts)
  with pytest.raises(ValueError, match="must\\s+equal global_batch_size"):
    data.build_tf_dataset(global_batch_size=8, classes_per_batch=3,
                          examples_per_class=2, num_devices=1, **opts)
  with pytest.raises(ValueError, match="larger than the split"):
    data.build_tf_dataset(global_batch_size=64, num_devices=1, **opts)
  with pytest.raises(ValueError, match="augment must be one of"):
    data.build_tf_dataset(global_batch_size=8, augment="blur", num_devices=1,
                          **opts)
  with pytest.raises(ValueError, match="split must be one of"):
    data.build_tf_dataset("tiny", "dev", data_dir=root, global_batch_size=8)
  with pytest.raises(ValueError, match="mean= and std="):
    data.build_tf_dataset("tiny", "train", data_dir=root, global_batch_size=8,
                          num_devices=1)


def test_tf_hides_gpus():
  assert tf.config.get_visible_devices("GPU") == []


@pytest.mark.skipif(not HAS_CIFAR, reason="../shared/data/cifar10 is absent")
def test_cifar10_folder_pipeline():
  it = data.tf_batches("cifar10", "train", data_dir=SHARED,
                       global_batch_size=64, augment="simclr", views=2,
                       cache=False, num_devices=1)
  b = next(it)
  assert b["image"].shape == (64, 2, 32, 32, 3)
  assert b["label"].min() >= 0 and b["label"].max() <= 9
  # Normalised with CIFAR-10's statistics: roughly zero-mean.
  assert abs(float(b["image"].mean())) < 0.5
