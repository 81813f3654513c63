"""The PyTorch-airbench parity script (needs ``[bench]``).

``experiments/benchmarks/airbench_parity.py`` trains airbench96's recipe with
the ``airbench`` package and with ``cifar10_gpu.py:airbench``; its figures are
in RESULTS.md. Here its PyTorch side's hyperparameters are pinned to the
config's, and both sides run 4 short epochs (warmup, the whitening bias's
freeze after 3) on a generated 10-class folder, so a change to the package,
the config or the trainer that breaks the comparison shows up before a
56-minute run does.
"""

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("airbench") is None:  # its import needs torchvision
  pytest.skip("needs the airbench package ([bench])", allow_module_level=True)

from contrastive_jax.training import optim  # pylint: disable=g-import-not-at-top
from experiments.benchmarks import airbench_parity  # pylint: disable=g-import-not-at-top
from experiments.configs import cifar10_gpu  # pylint: disable=g-import-not-at-top
from test_data_sources import make_image_folder  # pylint: disable=g-import-not-at-top


def test_torch_side_matches_the_config():
  """The same step size, decay and schedule, in the summed loss's units."""
  o = cifar10_gpu.get_config("airbench").optimizer
  batch, total = 1024, 516
  lr, wd = airbench_parity.torch_hyperparameters(batch)
  # torch steps lr * (sum of grads + wd / lr * p): per mean-loss gradient
  # that is lr * batch, and wd per step on p, as coupled decay lr_c * wd_c.
  np.testing.assert_allclose(lr * batch, o.learning_rate, rtol=1e-12)
  np.testing.assert_allclose(wd, o.learning_rate * o.weight_decay, rtol=1e-12)
  sched = optim.make_schedule(o, total_steps=total, batch_size=batch)
  np.testing.assert_allclose(
      [float(sched(s)) / o.learning_rate for s in range(total + 1)],
      [airbench_parity.lr_factor(s, total) for s in range(total + 1)],
      rtol=1e-5, atol=1e-6)


def test_both_sides_train_and_report(tmp_path, capsys):
  # 110 training images: 3 steps of 32 per epoch, 12 in all.
  make_image_folder(tmp_path, name="cifar10", size=32, per_class=12,
                    classes=tuple(f"c{i}" for i in range(10)))
  out = tmp_path / "parity.json"
  airbench_parity.main([
      f"--data_dir={tmp_path}", "--epochs=4", "--widths=8,16,16",
      "--batch_size=32", f"--out={out}", "--threads=1"])
  rows = json.loads(out.read_text())["rows"]
  assert set(rows) == {"airbench (PyTorch)", "contrastive_jax :airbench"}
  for r in rows.values():
    assert r["steps"] == 12
    assert r["images_per_sec"] > 0
    for key in airbench_parity.TTA_NAMES:
      assert 0.0 <= r[key] <= 1.0
  printed = capsys.readouterr().out
  assert "| airbench (PyTorch) | 12 |" in printed
  assert "contrastive_jax - PyTorch, points" in printed


def test_a_used_workdir_is_refused(tmp_path):
  (tmp_path / "checkpoints").mkdir()
  with pytest.raises(ValueError, match="already holds a run"):
    airbench_parity.run_jax(data_dir=str(tmp_path), workdir=str(tmp_path),
                            widths=(8, 16, 16), epochs=1, steps=0,
                            batch_size=32, seed=0)
