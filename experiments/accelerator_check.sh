#!/usr/bin/env bash
# The accelerator check of issue 7 (experiments/accelerator_check.py), as the
# GPU machine runs it, from the repository root. Extra arguments go to the
# Python module (e.g. --parts=tiled --tiled_batches=262144).
#
# Prepare once, here (no GPU needed), in the repository root:
#
#   echo /.whl/ >> .git/info/exclude; echo /.datatar/ >> .git/info/exclude  # (.gitignore has them too)
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --implementation cp --platform manylinux2014_x86_64 -d .whl \
#       ml_collections==1.1.0 PyYAML==6.0.4
#   mkdir -p .datatar && tar czf .datatar/cifar10.tar.gz -C ../shared/data cifar10
#
# ml_collections 1.1.0 (76 KB, pure Python; the version of our venv) is the
# only package the GPU image lacks. Its wheel requires absl-py and PyYAML
# (`unzip -p .whl/ml_collections-*.whl '*/METADATA' | grep ^Requires-Dist`),
# and `ml_collections.config_dict` imports yaml at import time. The image
# has both (absl-py, pyyaml); the PyYAML 6.0.4 cp312 manylinux wheel (849 KB)
# travels anyway, as insurance. The image's python3 is 3.12 with jax 0.11.2,
# flax, optax, orbax-checkpoint, chex, Pillow, scikit-learn, and no
# TensorFlow (none is needed: the CIFAR part uses input="device").
#
# The CIFAR-10 JPEGs travel packed: the device tool counted the 50,000 files
# of ../shared/data/cifar10 (46 MB of data) over its 64 MiB limit on
# 2026-11-29, and the tarball is 16 MB. experiments/device_env.sh, sourced
# below, installs the wheels and unpacks the tarball into .data/ there.
#
# Then one call of the device tool (the parts share a 540 s limit inside the
# module; see RESERVE_S there; on 2026-11-29 the whole call took 355 s of
# device time, 322 s of it the command):
#
#   run(command="bash experiments/accelerator_check.sh", carry=[".whl", ".datatar"], timeout_s=590)
#
# The table is printed at the end and written with a JSON of every number and
# each part's log to $OUT (here: ./accelerator_check_out).
#
# CPU smoke test (tiny sizes, a few minutes):
#
#   JAX_PLATFORMS=cpu PATH=$PWD/.venv/bin:$PATH bash experiments/accelerator_check.sh \
#       --batches=16 --steps=2 --tiled_batches=512 --block_size=128 \
#       --config_arg=sgd,resnet18,smooth,cutout,runlocal --data_dir=../shared/data --train_minutes=1

cd "$(dirname "$0")/.." || exit 1

source experiments/device_env.sh

timeout -k 20 570 python3 -m experiments.accelerator_check \
    --out_dir="${OUT:-./accelerator_check_out}" "$@"
