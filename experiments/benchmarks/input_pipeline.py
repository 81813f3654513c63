"""Input-pipeline throughput: tf.data vs the on-device (JAX) path.

Measures images/second for the CIFAR-10 image folder with two augmented views
per image (SimCLR's augmentation by default):

* tf.data, uncached: every epoch reads and decodes the JPEGs again;
* tf.data, cached: the first epoch (decoding the shard into memory, then
  augmenting) and a later epoch from memory;
* on-device: JAX (here on the CPU) gathers and augments batches from a device
  array; the decode (Pillow) and the first, compiling batch are reported
  separately from the steady-state epoch.

An "image" is one source image; each yields ``--views`` augmented views, so
views/s = views x images/s.

Usage (writes the table into INPUT_PIPELINE.md next to this file):

  python experiments/benchmarks/input_pipeline.py --num-images 10000 \
      --write-md

The subset (``--num-images``, split evenly over the 10 classes) is a folder of
symbolic links in a temporary directory, so nothing is copied.
"""

from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import platform
import shlex
import sys
import tempfile
import time

import jax

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from contrastive_jax import data  # pylint: disable=g-import-not-at-top
from contrastive_jax.data import sources  # pylint: disable=g-import-not-at-top

MD_PATH = pathlib.Path(__file__).with_name("INPUT_PIPELINE.md")


def subset_folder(data_dir: pathlib.Path, num_images: int,
                  tmp: pathlib.Path) -> pathlib.Path:
  """``tmp/cifar10/train/<class>/`` with links to ``num_images`` images."""
  train = data_dir / "cifar10" / "train"
  classes = sorted(d.name for d in train.iterdir() if d.is_dir())
  per_class = num_images // len(classes)
  for cls in classes:
    dst = tmp / "cifar10" / "train" / cls
    dst.mkdir(parents=True)
    for name in sorted(os.listdir(train / cls))[:per_class]:
      (dst / name).symlink_to(train / cls / name)
  return tmp


def time_epochs(it, steps: int, epochs: int) -> list[float]:
  """Seconds per epoch of ``steps`` batches from ``it``."""
  out = []
  for _ in range(epochs):
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(it)
    jax.block_until_ready(batch["image"])
    out.append(time.perf_counter() - start)
  return out


def bench_tf(data_dir, n, args, rows):
  tf = sources.import_tf()
  del tf
  opts = dict(name="cifar10", split="train_full", data_dir=data_dir,
              global_batch_size=args.batch_size, augment=args.augment,
              views=args.views, seed=0, num_devices=1)
  steps = n // args.batch_size
  imgs = steps * args.batch_size

  start = time.perf_counter()
  it = data.tf_batches(cache=False, **opts)
  first = next(it)  # pipeline start-up, not counted below
  del first
  setup = time.perf_counter() - start
  (uncached,) = time_epochs(it, steps, 1)
  rows.append(("tf.data, uncached (decode every epoch)", imgs / uncached,
               f"start-up {setup:.1f} s"))

  start = time.perf_counter()
  it = data.tf_batches(cache=True, **opts)
  build = time.perf_counter() - start  # includes decoding the shard
  (first_epoch,) = time_epochs(it, steps, 1)
  cached = time_epochs(it, steps, args.epochs)
  rows.append(("tf.data, cached: first epoch (decode + augment)",
               imgs / (build + first_epoch),
               f"decode/build {build:.1f} s"))
  rows.append(("tf.data, cached: later epochs", imgs / min(cached),
               f"best of {len(cached)}"))


def bench_jax(data_dir, n, args, rows):
  start = time.perf_counter()
  d = data.load_device_data("cifar10", "train_full", data_dir=data_dir)
  jax.block_until_ready(d.images)
  load = time.perf_counter() - start
  mean, std = data.dataset_stats("cifar10")
  it = data.device_batches(d, key=jax.random.key(0),
                           batch_size=args.batch_size, augment=args.augment,
                           views=args.views, mean=mean, std=std)
  start = time.perf_counter()
  jax.block_until_ready(next(it)["image"])
  compile_s = time.perf_counter() - start
  steps = n // args.batch_size
  imgs = steps * args.batch_size
  epochs = time_epochs(it, steps, args.epochs)
  rows.append(("on-device (JAX on CPU), steady state", imgs / min(epochs),
               f"Pillow decode {load:.1f} s, first batch {compile_s:.1f} s"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
  p.add_argument("--num-images", type=int, default=10000,
                 help="subset size (0: the whole 50,000-image folder)")
  p.add_argument("--batch-size", type=int, default=500)
  p.add_argument("--views", type=int, default=2)
  p.add_argument("--augment", default="simclr",
                 choices=data.AUGMENTATIONS)
  p.add_argument("--epochs", type=int, default=2,
                 help="timed epochs after the first (best one reported)")
  p.add_argument("--skip-tf", action="store_true")
  p.add_argument("--skip-jax", action="store_true")
  p.add_argument("--write-md", action="store_true",
                 help=f"append the table to {MD_PATH.name}")
  args = p.parse_args(argv)

  data_dir = pathlib.Path(args.data_dir)
  if not (data_dir / "cifar10" / "train").is_dir():
    sys.exit(f"No CIFAR-10 image folder at {data_dir}/cifar10/train.")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    if args.num_images:
      data_dir = subset_folder(data_dir, args.num_images, pathlib.Path(tmp))
    n = len(data.image_folder_files("cifar10", "train_full",
                                    data_dir=data_dir)[0])
    if not args.skip_tf:
      bench_tf(data_dir, n, args, rows)
    if not args.skip_jax:
      bench_jax(data_dir, n, args, rows)

  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  title = (f"{n:,} CIFAR-10 JPEGs, augment={args.augment}, views={args.views},"
           f" batch {args.batch_size}, {os.cpu_count()} CPU cores, load"
           f" average at the end {load}")
  lines = [f"{title}", "",
           "| path | images/s | views/s | notes |",
           "| --- | ---: | ---: | --- |"]
  for name, ips, note in rows:
    lines.append(f"| {name} | {ips:,.0f} | {ips * args.views:,.0f} | {note} |")
  table = "\n".join(lines)
  print(table)

  if args.write_md:
    cmd = "python experiments/benchmarks/input_pipeline.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"\n## {stamp}\n\n`{cmd}`\n\njax {jax.__version__},"
               f" Python {platform.python_version()}\n\n{table}\n")
    if not MD_PATH.exists():
      MD_PATH.write_text("# Input pipeline throughput\n")
    with open(MD_PATH, "a") as f:
      f.write(section)
    print(f"appended to {MD_PATH}")


if __name__ == "__main__":
  main()
