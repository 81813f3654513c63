"""The GPU machine's scripts, run as the device tool runs them, on the CPU.

A GPU session is 15 minutes, and its image has no TensorFlow, no
tensorflow-datasets and no ml_collections (experiments/accelerator_check.sh's
header). An import of TensorFlow that creeps into the on-device training path,
or a shell mistake in a script, would cost that session; these tests find it
here. TensorFlow is hidden by a ``sitecustomize`` module on PYTHONPATH,
which every ``python3`` the scripts start imports first.
"""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest
from test_data_sources import make_image_folder

REPO = pathlib.Path(__file__).resolve().parents[1]

_BLOCK_TENSORFLOW = '''
import sys

_ABSENT = ("tensorflow", "tensorflow_datasets")


class _WithoutTensorFlow:
  """An import finder that finds neither package, as on the GPU image:
  ``import tensorflow`` raises ModuleNotFoundError and
  ``importlib.util.find_spec("tensorflow")`` is None (etils asks that)."""

  def __init__(self, finder):
    self._finder = finder

  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in _ABSENT:
      return None
    return self._finder.find_spec(name, path, target)

  def __getattr__(self, attr):
    return getattr(self._finder, attr)


sys.meta_path[:] = [_WithoutTensorFlow(f) for f in sys.meta_path]
'''


@pytest.fixture
def gpu_image_env(tmp_path):
  """The environment of the device tool's command: ``python3`` on PATH (this
  interpreter), TensorFlow unimportable, $OUT an empty folder, CPU only."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  # A wrapper, not a symlink: a symlinked venv python may not find its venv.
  (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (bin_dir / "python3").chmod(0o755)
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(_BLOCK_TENSORFLOW)
  out = tmp_path / "out"
  out.mkdir()
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}",
             PYTHONPATH=str(site), OUT=str(out), JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one device, as the H200
  blocked = subprocess.run(["python3", "-c", "import tensorflow"], env=env,
                           capture_output=True, text=True, timeout=60)
  assert "No module named 'tensorflow'" in blocked.stderr, blocked.stderr[-1000:]
  return env


def test_sweep_script_trains_airbench_without_tensorflow(gpu_image_env, tmp_path):
  """The first call of RESULTS' GPU plan, shrunk: ``accelerator_sweep.sh`` in
  sequential mode on ``cifar10_gpu.py:airbench`` (its whitening, lookahead,
  bias freeze and TTA evaluation), with ``runlocal``'s narrow network."""
  data = tmp_path / "data"  # cifar10/train/<class>/<i>.jpg, 32 x 32, as ../shared/data
  make_image_folder(data, name="cifar10", classes=("c0", "c1", "c2", "c3"),
                    per_class=12, size=32, ext="jpg")
  env = dict(gpu_image_env, SWEEP_SEQUENTIAL="1", SWEEP_TIMEOUT_S="280",
             SWEEP_DATA_DIR=str(data))
  flags = ("--config=experiments/configs/cifar10_gpu.py:airbench,runlocal"
           " --config.num_steps=2 --config.eval.probe_steps=2")
  res = subprocess.run(["bash", "experiments/accelerator_sweep.sh", f"ab {flags}"],
                       cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  line = [l for l in res.stdout.splitlines() if l.startswith("ab:")]
  assert line and "NO RESULT" not in line[0], res.stdout[-3000:]
  assert "classifier_top1_tta_flip_translate" in line[0], line[0]
  assert "step 2/2" in line[0] and line[0].endswith("completed"), line[0]
  with tarfile.open(pathlib.Path(env["OUT"]) / "sweep_ab.tgz") as tgz:
    names = set(tgz.getnames())
    assert {"ab/log", "ab/results.json", "ab/metrics.jsonl"} <= names, names
    results = json.load(tgz.extractfile("ab/results.json"))
  # The log must not hide a TensorFlow fallback: the data went on device.
  assert results["status"] == "completed"
  assert 0.0 <= results["classifier_top1_tta_flip_translate"] <= 1.0
