"""The PyTorch-airbench parity script runs end to end (needs ``[bench]``).

``experiments/benchmarks/airbench_parity.py`` trains airbench96's recipe with
the ``airbench`` package and with ``cifar10_gpu.py:airbench``; its figures are
in RESULTS.md. Here both sides take 2 steps at tiny widths on a generated
10-class folder, so a change to the package, the config or the trainer that
breaks the comparison shows up before a 40-minute run does.
"""

import importlib.util
import json

import pytest

pytest.importorskip("torch")
if importlib.util.find_spec("airbench") is None:  # its import needs torchvision
  pytest.skip("needs the airbench package ([bench])", allow_module_level=True)

from experiments.benchmarks import airbench_parity  # pylint: disable=g-import-not-at-top
from test_data_sources import make_image_folder  # pylint: disable=g-import-not-at-top


def test_both_sides_train_and_report(tmp_path, capsys):
  make_image_folder(tmp_path, name="cifar10", size=32, per_class=12,
                    classes=tuple(f"c{i}" for i in range(10)))
  out = tmp_path / "parity.json"
  airbench_parity.main([
      f"--data_dir={tmp_path}", "--steps=2", "--widths=8,16,16", "--batch_size=32",
      f"--workdir={tmp_path / 'work'}", f"--out={out}", "--threads=1"])
  rows = json.loads(out.read_text())["rows"]
  assert set(rows) == {"airbench (PyTorch)", "contrastive_jax :airbench"}
  for r in rows.values():
    assert r["steps"] == 2
    for key in airbench_parity.TTA_NAMES:
      assert 0.0 <= r[key] <= 1.0
  printed = capsys.readouterr().out
  assert "| airbench (PyTorch) | 2 |" in printed
  assert "contrastive_jax - PyTorch, points" in printed
