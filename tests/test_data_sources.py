"""Data sources: image folders, digits, TFDS (offline errors), splits."""

import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from contrastive_jax import data
from contrastive_jax.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
HAS_CIFAR = (SHARED / "cifar10" / "train").is_dir()


def make_image_folder(root, *, name="tiny", classes=("cat", "dog", "owl"),
                      per_class=10, test_per_class=0, size=8, ext="png",
                      seed=0):
  """Writes ``root/name/{train,test}/<class>/<i>.<ext>``; returns the pixels.

  Returns ``{split: (images uint8 [N, size, size, 3], labels [N])}`` in the
  order the loader must produce (class folders sorted, then file names).
  """
  rng = np.random.RandomState(seed)
  out = {}
  for split, n in (("train", per_class), ("test", test_per_class)):
    if not n:
      continue
    imgs, labels = [], []
    for label, cls in enumerate(sorted(classes)):
      d = pathlib.Path(root) / name / split / cls
      d.mkdir(parents=True)
      for i in range(n):
        img = (rng.rand(size, size, 3) * 255).astype(np.uint8)
        Image.fromarray(img).save(d / f"{i:04d}.{ext}")
        imgs.append(img)
        labels.append(label)
    out[split] = (np.stack(imgs), np.asarray(labels))
  return out


@pytest.fixture
def folder(tmp_path):
  pixels = make_image_folder(tmp_path, per_class=10, test_per_class=2)
  return tmp_path, pixels


def test_import_does_not_import_tensorflow():
  code = ("import sys, contrastive_jax.data as d; "
          "assert 'tensorflow' not in sys.modules, 'tf imported'; "
          "assert 'tensorflow_datasets' not in sys.modules; print('OK')")
  res = subprocess.run([sys.executable, "-c", code], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert res.returncode == 0 and "OK" in res.stdout, res.stderr[-2000:]


def test_resolve_source(folder):
  root, _ = folder
  assert data.resolve_source("digits").kind == "digits"
  src = data.resolve_source("tiny", data_dir=root)
  assert src.kind == "image_folder" and src.root == (root / "tiny").resolve()
  # data_dir may also be the dataset folder itself.
  src = data.resolve_source("tiny", data_dir=root / "tiny")
  assert src.kind == "image_folder" and src.root == (root / "tiny").resolve()
  assert data.resolve_source("cifar10", data_dir=root).kind == "tfds"
  assert data.resolve_source("cifar10").kind == "tfds"


def test_image_folder_arrays_exact(folder):
  root, pixels = folder
  full = data.load_split_arrays("tiny", "train_full", data_dir=root)
  assert full.images.dtype == np.uint8 and full.images.shape == (30, 8, 8, 3)
  assert full.labels.dtype == np.int32
  np.testing.assert_array_equal(full.images, pixels["train"][0])
  np.testing.assert_array_equal(full.labels, pixels["train"][1])
  test = data.load_split_arrays("tiny", "test", data_dir=root)
  np.testing.assert_array_equal(test.images, pixels["test"][0])


def test_validation_split_is_stratified_and_disjoint(folder):
  root, pixels = folder
  tr = data.load_split_arrays("tiny", "train", data_dir=root,
                              validation_fraction=0.3)
  va = data.load_split_arrays("tiny", "validation", data_dir=root,
                              validation_fraction=0.3)
  np.testing.assert_array_equal(np.bincount(va.labels), [3, 3, 3])
  np.testing.assert_array_equal(np.bincount(tr.labels), [7, 7, 7])
  key = lambda a: {x.tobytes() for x in a.images}
  assert not key(tr) & key(va)
  assert key(tr) | key(va) == {x.tobytes() for x in pixels["train"][0]}
  # Deterministic: the last 3 files of each class.
  paths, _ = data.image_folder_files("tiny", "validation", data_dir=root,
                                     validation_fraction=0.3)
  assert [pathlib.Path(p).name for p in paths[:3]] == [
      "0007.png", "0008.png", "0009.png"]
  # 0 is refused, not read as "the default".
  for fn in (data.load_split_arrays, data.image_folder_files):
    with pytest.raises(ValueError, match=r"validation_fraction must be in \(0, 1\), got 0.0"):
      fn("tiny", "validation", data_dir=root, validation_fraction=0.0)


def test_validation_indices_edge_cases():
  labels = np.array([0] * 10 + [1] * 2 + [2])
  idx = sources.validation_indices(labels, validation_fraction=0.1)
  # >= 1 per class with 2+ examples, never a whole class.
  np.testing.assert_array_equal(idx, [9, 11])
  with pytest.raises(ValueError, match="validation_fraction"):
    sources.validation_indices(labels, validation_fraction=1.0)
  # Per-class rounding never holds out less than the fraction asked for:
  # 3 classes of 7 at 0.3 are 2.1 each (6.3 in all), so one class gives 3.
  labels = np.repeat(np.arange(3), 7)
  idx = sources.validation_indices(labels, validation_fraction=0.3)
  np.testing.assert_array_equal(np.bincount(labels[idx]), [3, 2, 2])
  np.testing.assert_array_equal(idx, [4, 5, 6, 12, 13, 19, 20])


def test_tune_pair_is_carved_from_train_only(folder, tmp_path):
  root, pixels = folder
  load = lambda split, **kw: data.load_split_arrays(
      "tiny", split, data_dir=root, validation_fraction=0.3, **kw)
  key = lambda a: {x.tobytes() for x in a.images}
  tr, va, tu, tt = (load(s) for s in ("train", "validation", "tune",
                                      "tune_train"))
  # train's 7 per class split again at 0.3 (6.3 of 21, so 7): the last 3 or
  # 2 of each class are "tune".
  np.testing.assert_array_equal(np.bincount(tu.labels), [3, 2, 2])
  np.testing.assert_array_equal(np.bincount(tt.labels), [4, 5, 5])
  assert not key(tu) & key(tt) and not (key(tu) | key(tt)) & key(va)
  assert key(tu) | key(tt) == key(tr)
  paths, _ = data.image_folder_files("tiny", "tune", data_dir=root,
                                     validation_fraction=0.3)
  assert [pathlib.Path(p).name for p in paths[:3]] == [
      "0004.png", "0005.png", "0006.png"]
  # The .npy cache path carves the same images.
  cached = load("tune", cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(cached.images, tu.images)
  # A folder with its own validation split: "train" is all of train/, and
  # the tune pair is carved from it.
  (root / "tiny" / "test").rename(root / "tiny" / "validation")
  tr = load("train")
  assert len(tr.labels) == 30
  tu, tt = load("tune"), load("tune_train")
  np.testing.assert_array_equal(np.bincount(tu.labels), [3, 3, 3])
  assert not key(tu) & key(tt) and key(tu) | key(tt) == key(tr)
  assert data.REFERENCE_SPLIT == {"validation": "train", "test": "train",
                                  "tune": "tune_train"}


def test_digits_tune_pair():
  idx = {s: sources.carve_split(sources._digits().labels, s,
                                validation_fraction=0.3)
         for s in ("train", "validation", "tune", "tune_train")}
  assert [len(idx[s]) for s in idx] == [1257, 540, 378, 879]
  assert set(idx["tune"]) | set(idx["tune_train"]) == set(idx["train"])
  assert not set(idx["tune"]) & set(idx["tune_train"])
  with pytest.raises(ValueError, match="cannot carve split 'test'"):
    sources.carve_split(np.zeros(4), "test", validation_fraction=0.3)


def test_test_split_takes_the_train_splits_labels(tmp_path):
  make_image_folder(tmp_path, classes=("bird", "cat", "dog"), per_class=2)
  make_image_folder(tmp_path / "t", classes=("cat", "dog"), per_class=2)
  (tmp_path / "t" / "tiny" / "train").rename(tmp_path / "tiny" / "test")
  (tmp_path / "tiny" / "train" / ".ipynb_checkpoints").mkdir()
  _, labels = data.image_folder_files("tiny", "test", data_dir=tmp_path)
  np.testing.assert_array_equal(labels, [1, 1, 2, 2])  # cat, dog, not 0, 1
  arrays = data.load_split_arrays("tiny", "test", data_dir=tmp_path,
                                  cache_dir=tmp_path / "cache")
  np.testing.assert_array_equal(arrays.labels, [1, 1, 2, 2])
  _, labels = data.image_folder_files("tiny", "train_full", data_dir=tmp_path)
  np.testing.assert_array_equal(labels, [0, 0, 1, 1, 2, 2])
  (tmp_path / "tiny" / "test" / "emu").mkdir()
  with pytest.raises(ValueError, match=r"class folders \['emu'\] that the"):
    data.image_folder_files("tiny", "test", data_dir=tmp_path)


def test_data_dir_of_another_known_dataset_is_refused(tmp_path):
  make_image_folder(tmp_path, name="cifar10", per_class=2)
  with pytest.raises(ValueError, match="image folder of dataset 'cifar10', not"
                     " 'cifar100'"):
    data.resolve_source("cifar100", data_dir=tmp_path / "cifar10")
  src = data.resolve_source("cifar10", data_dir=tmp_path / "cifar10")
  assert src.kind == "image_folder"


def test_digits():
  tr = data.load_split_arrays("digits", "train")
  va = data.load_split_arrays("digits", "validation")
  assert tr.images.shape[1:] == (8, 8, 1) and tr.images.dtype == np.float32
  assert 0.0 <= tr.images.min() and tr.images.max() <= 1.0
  assert len(tr.labels) + len(va.labels) == 1797
  assert len(va.labels) == 540  # held out: 30% (539.1) rounded up, stratified
  counts = np.bincount(va.labels)
  assert counts.min() >= 50 and len(counts) == 10
  with pytest.raises(ValueError, match="no 'test' split"):
    data.load_split_arrays("digits", "test")


def test_bad_split_and_missing_test(tmp_path):
  make_image_folder(tmp_path, per_class=3)
  with pytest.raises(ValueError, match="split must be one of"):
    data.load_split_arrays("tiny", "val", data_dir=tmp_path)
  with pytest.raises(ValueError, match="no 'test' split"):
    data.load_split_arrays("tiny", "test", data_dir=tmp_path)


def test_mixed_sizes_rejected(tmp_path):
  make_image_folder(tmp_path, per_class=2)
  Image.fromarray(np.zeros([9, 9, 3], np.uint8)).save(
      tmp_path / "tiny" / "train" / "cat" / "zz.png")
  with pytest.raises(ValueError, match="same size"):
    data.load_split_arrays("tiny", "train_full", data_dir=tmp_path)


def test_npy_cache(folder, tmp_path, monkeypatch):
  root, pixels = folder
  cache = tmp_path / "cache"
  a = data.load_split_arrays("tiny", "train", data_dir=root, cache_dir=cache)
  assert len(list(cache.glob("*.npy"))) == 2

  def no_decode(*args, **kwargs):
    raise AssertionError("decoded although cached")

  monkeypatch.setattr(sources, "decode_images", no_decode)
  b = data.load_split_arrays("tiny", "train", data_dir=root, cache_dir=cache)
  np.testing.assert_array_equal(a.images, b.images)
  v = data.load_split_arrays("tiny", "validation", data_dir=root,
                             cache_dir=cache)
  assert len(v.labels) + len(b.labels) == 30


def test_tf_and_pillow_decoders_agree_on_jpeg(tmp_path):
  pytest.importorskip("tensorflow")
  make_image_folder(tmp_path, per_class=3, size=16, ext="jpg")
  paths, _ = data.image_folder_files("tiny", "train_full", data_dir=tmp_path)
  a = sources.decode_images(paths, decoder="pillow")
  b = sources.decode_images(paths, decoder="tf")
  np.testing.assert_array_equal(a, b)


def test_offline_fails_fast_with_download_disabled(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError) as e:
    data.load_split_arrays("cifar10", "train", data_dir=tmp_path,
                           download=False)
  assert time.perf_counter() - start < 60  # (mostly importing TFDS)
  msg = str(e.value)
  assert "data_dir" in msg and "image folder" in msg and "digits" in msg


def test_offline_fails_fast_without_network(tmp_path, monkeypatch):
  pytest.importorskip("tensorflow_datasets")
  # Simulate no network without touching it: the connectivity check fails.
  monkeypatch.setattr(sources, "_network_reachable", lambda *a, **k: False)
  sources.import_tf()  # (import time is not what this measures)
  start = time.perf_counter()
  with pytest.raises(data.DatasetUnavailableError, match="no network"):
    data.load_split_arrays("cifar10", "train", data_dir=tmp_path)
  assert time.perf_counter() - start < 20


def test_unknown_dataset(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(ValueError, match="Unknown dataset"):
    data.load_split_arrays("no_such_dataset_xyz", "train", data_dir=tmp_path,
                           download=False)


def test_dataset_stats():
  mean, std = data.dataset_stats("cifar10")
  assert mean == (0.4914, 0.4822, 0.4465) and std == (0.2470, 0.2435, 0.2616)
  with pytest.raises(ValueError, match="mean= and std="):
    data.dataset_stats("tiny")


@pytest.mark.skipif(not HAS_CIFAR, reason="../shared/data/cifar10 is absent")
def test_cifar10_folder_splits():
  src = data.resolve_source("cifar10", data_dir=SHARED)
  assert src.kind == "image_folder"
  tr, tr_labels = data.image_folder_files("cifar10", "train", data_dir=SHARED)
  va, va_labels = data.image_folder_files("cifar10", "validation",
                                          data_dir=SHARED)
  assert len(tr) == 45000 and len(va) == 5000
  np.testing.assert_array_equal(np.bincount(va_labels), [500] * 10)
  np.testing.assert_array_equal(np.bincount(tr_labels), [4500] * 10)
  assert not set(tr) & set(va)
  assert pathlib.Path(va[0]).parent.name == "airplane"
  with pytest.raises(ValueError, match="no 'test' split"):
    data.image_folder_files("cifar10", "test", data_dir=SHARED)
  imgs = sources.decode_images(va[:8])
  assert imgs.shape == (8, 32, 32, 3) and imgs.dtype == np.uint8
