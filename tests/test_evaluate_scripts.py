"""experiments.evaluate / experiments.visualize (contrastive_jax.evaluation.report).

One tiny digits run (a few steps on the 8 fake CPU devices of conftest.py) is
trained once for the module; the report is computed from its checkpoint and
checked against the run's own results.json.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

# Before scikit-learn loads OpenMP (t-SNE, k-means): spinning workers are
# 5-10x slower on a shared CPU. Only a performance setting.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from contrastive_jax import training  # pylint: disable=g-import-not-at-top,wrong-import-position
from contrastive_jax.evaluation import report  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments.configs import digits  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]
RETRIEVAL_KEYS = {"precision_at_1", "r_precision", "mean_average_precision_at_r",
                  "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
                  "nmi", "ami"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """``(workdir, results.json, Prepared)`` of a 20-step digits run."""
  config = digits.get_config()
  config.num_steps = 20
  config.log_every = 5
  config.checkpoint.every_steps = 20
  config.checkpoint.async_save = False
  config.eval.probe_steps = 100
  config.progress_bar = False
  workdir = str(tmp_path_factory.mktemp("digits_run"))
  results = training.train_and_evaluate(config, workdir)
  return workdir, results, report.prepare(workdir, "validation")


@pytest.fixture(scope="module")
def evaluated(run):
  workdir, _, prepared = run
  return report.evaluate_workdir(workdir, "validation", prepared=prepared)


def _in_unit(value):
  return value is not None and 0.0 <= value <= 1.0


def test_evaluate_json(run, evaluated):
  workdir, results, _ = run
  res = evaluated
  with open(os.path.join(workdir, "eval", "validation.json")) as f:
    assert json.load(f) == res
  assert res["split"] == "validation" and res["step"] == 20
  assert res["weights"] == "online"  # the digits config keeps no average
  assert res["num_classes"] == 10 and res["num_train"] == 1257
  n = res["num_queries"]
  assert n == 540
  # k = 20 and 200 always, and the config's own k (1 for digits SupCon).
  k = digits.get_config().eval.knn_k
  assert k == 1
  assert set(res["knn"]) == {"top1_k1", "top5_k1", "top1_k20", "top5_k20",
                             "top1_k200", "top5_k200"}
  assert all(_in_unit(v) for v in res["knn"].values())
  assert res["knn"]["top1_k20"] <= res["knn"]["top5_k20"]
  # The restored checkpoint gives the numbers the training run reported.
  assert res["knn"]["top1_k1"] == pytest.approx(results["knn_top1"],
                                                 abs=1.5 / n)
  lp = res["linear_probe"]
  assert lp["top1"] == pytest.approx(results["linear_probe_top1"],
                                     abs=1.5 / n)
  assert _in_unit(lp["top1"]) and lp["top1"] <= lp["top5"]
  cls = res["classification"]
  assert cls["accuracy"] == pytest.approx(lp["top1"])
  for key in ("macro_recall", "macro_f1", "macro_precision"):
    assert _in_unit(cls[key])
  assert cls["class_names"] == [str(i) for i in range(10)]
  assert set(cls["per_class"]) == set(cls["class_names"])
  cm = np.asarray(cls["confusion_matrix"])
  assert cm.shape == (10, 10) and cm.sum() == n
  assert np.trace(cm) == round(cls["accuracy"] * n)
  for key in ("retrieval", "retrieval_embedding"):
    r = res[key]
    assert set(r) == RETRIEVAL_KEYS
    assert all(_in_unit(v) for v in r.values()), r
    assert r["recall_at_1"] <= r["recall_at_2"] <= r["recall_at_4"] <= r[
        "recall_at_8"]
  assert "hash" not in res  # the digits model has no hash head
  assert _in_unit(res["heads"]["online_probe_top1"])
  table = report.format_table(res)
  assert "kNN k=20 top-1 / top-5" in table and "MAP@R" in table


def test_tta_flip(run, evaluated):
  workdir, _, prepared = run
  images = prepared.query_images[:64]
  mirrored = images[:, :, ::-1]
  tta = report.embed_outputs(prepared.run, images, tta_flip=True)
  plain = report.embed_outputs(prepared.run, images)
  # A flip-averaged output cannot tell an image from its mirror image...
  tta_m = report.embed_outputs(prepared.run, mirrored, tta_flip=True)
  for key in tta:
    np.testing.assert_allclose(tta[key], tta_m[key], rtol=1e-4, atol=1e-5)
  # ...is the plain output for a mirror-symmetric image...
  sym = np.concatenate([images[:, :, :4], images[:, :, 3::-1]], axis=2)
  sym_tta = report.embed_outputs(prepared.run, sym, tta_flip=True)
  sym_plain = report.embed_outputs(prepared.run, sym)
  for key in sym_tta:
    np.testing.assert_allclose(sym_tta[key], sym_plain[key], rtol=1e-4,
                               atol=1e-5)
  # ...and differs from the plain output for the (asymmetric) digits.
  assert not np.allclose(tta["features"], plain["features"])
  res = report.evaluate_workdir(workdir, "validation", tta_flip=True)
  assert res["tta_flip"] is True and evaluated["tta_flip"] is False
  with open(report.eval_path(workdir, "validation", tta_flip=True)) as f:
    assert json.load(f) == res
  with open(report.eval_path(workdir, "validation")) as f:
    assert json.load(f) == evaluated  # the plain report is kept
  assert "flip test-time augmentation" in report.format_table(res)
  with pytest.raises(ValueError, match="tta_flip=False"):
    report.evaluate_workdir(workdir, "validation", prepared=prepared,
                            tta_flip=True)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    report.embed_outputs(prepared.run, images[:, 0], tta_flip=True)


def test_tta_translate(run, evaluated):
  workdir, _, prepared = run
  images = prepared.query_images[:32]
  out = functools.partial(report.embed_outputs, prepared.run)
  # Independent reference: airbench94's infer_mirror_translate, with the
  # views built by NumPy from plain (unaugmented) outputs.
  padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  h, w = images.shape[1:3]
  views = np.concatenate([images, padded[:, :h, :w], padded[:, 2:, 2:]])
  n = len(images)
  plain, mirrored = out(views), out(views[:, :, ::-1])  # one batch each

  def split_views(outputs):
    return [{k: np.float64(v[i * n:(i + 1) * n]) for k, v in outputs.items()}
            for i in range(3)]

  flip_mean = {k: (np.float64(v) + mirrored[k]) / 2 for k, v in plain.items()}
  for flip, by_view in ((False, split_views(plain)),
                        (True, split_views(flip_mean))):
    got = out(images, tta_flip=flip, tta_translate=True)
    for key in got:
      want = (0.5 * by_view[0][key] + 0.25 * by_view[1][key]
              + 0.25 * by_view[2][key])
      np.testing.assert_allclose(got[key], want, rtol=1e-4, atol=1e-5,
                                 err_msg=f"{key}, tta_flip={flip}")
    assert not np.allclose(got["features"], by_view[0]["features"])
  # A constant image is its own translation.
  const = np.broadcast_to(images[:, :1, :1], images.shape)
  const_plain = out(const)
  for key, value in out(const, tta_translate=True).items():
    np.testing.assert_allclose(value, const_plain[key], rtol=1e-4, atol=1e-5)
  res = report.evaluate_workdir(workdir, "validation", tta_flip=True,
                                tta_translate=True)
  assert res["tta_flip"] and res["tta_translate"]
  assert not evaluated["tta_translate"]
  path = report.eval_path(workdir, "validation", tta_flip=True,
                          tta_translate=True)
  assert path.endswith("eval/validation_tta_flip_translate.json")
  with open(path) as f:
    assert json.load(f) == res
  assert "translation test-time augmentation" in report.format_table(res)
  with pytest.raises(ValueError, match="tta_translate"):
    report.evaluate_workdir(workdir, "validation", prepared=prepared,
                            tta_translate=True)
  with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
    out(images[:, 0], tta_translate=True)


def test_visualize_pngs(run, evaluated):
  del evaluated  # the confusion matrix comes from eval/validation.json
  workdir, _, prepared = run
  paths = report.plot_workdir(workdir, "validation", prepared=prepared)
  assert set(paths) == {"tsne", "tsne_embedding", "curves", "confusion",
                        "neighbors"}
  for path in paths.values():
    assert os.path.dirname(path) == os.path.join(workdir, "plots")
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.getsize(path) > 5000, path


def test_knn_errors(run, evaluated):
  """experiments.knn_errors: its error counts are the report's kNN top-1, its
  wrong indices really are wrong, and leave-one-out excludes each image."""
  from experiments import knn_errors  # pylint: disable=g-import-not-at-top
  _, _, prepared = run
  out = knn_errors.knn_errors(prepared, ks=(1, 10, 20), temperature=0.07)
  n = prepared.query_labels.shape[0]
  assert out["num_queries"] == n == 540
  for k in (1, 20):
    assert 1 - len(out["wrong"][k]) / n == pytest.approx(
        evaluated["knn"][f"top1_k{k}"], abs=1e-9)
  # k = 1 against a NumPy nearest neighbour (cosine) for the listed indices.
  q = prepared.query["features"] / np.linalg.norm(
      prepared.query["features"], axis=1, keepdims=True)
  t = prepared.train["features"] / np.linalg.norm(
      prepared.train["features"], axis=1, keepdims=True)
  nearest = prepared.train_labels[np.argmax(q @ t.T, axis=1)]
  np.testing.assert_array_equal(
      out["wrong"][1], np.nonzero(nearest != prepared.query_labels)[0])
  # Leave-one-out with k = 1: each training image's nearest other image.
  sim = t @ t.T
  np.fill_diagonal(sim, -np.inf)
  loo = np.mean(prepared.train_labels[np.argmax(sim, axis=1)]
                == prepared.train_labels)
  assert out["loo_train_top1"][1] == pytest.approx(loo, abs=1e-9)


def test_knn_errors_cli(run):
  workdir, _, _ = run
  cmd = [sys.executable, "-m", "experiments.knn_errors",
         f"--workdirs={workdir}", "--ks=1,5"]
  out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                       timeout=300, check=True).stdout
  assert f"{workdir}: errors at k = [1, 5, 10]:" in out
  assert "errors summed over the runs at k = [1, 5, 10]:" in out
  assert "of 540 queries, i.e. top-1 [" in out
  assert "runs wrong per index at k = 10:" in out
  # This run trained on "train", which holds the "tune" images.
  res = subprocess.run(cmd + ["--split=tune"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert res.returncode == 1
  assert "split='tune' needs a run trained with data.tune=True" in res.stderr


def test_history_dedups_resumed_steps(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 5, "loss": 3.0}\n{"step": 10, "loss": 2.0}\n'
                  '{"step": 10, "loss": 1.5, "eval/knn_top1": 0.5}\n'
                  '{"step": 15, "lo')  # killed mid-write
  history = report.load_history(str(path))
  assert history == {"loss": [(5, 3.0), (10, 1.5)],
                     "eval/knn_top1": [(10, 0.5)]}
  curves = report.curves_history(history)
  assert set(curves) == {"training (total)/loss",
                         "kNN top-1 (validation)/accuracy"}


def test_bad_split(run):
  workdir, _, _ = run
  with pytest.raises(report.EvaluationError, match="no 'test' split"):
    report.prepare(workdir, "test")  # digits has no test split
  with pytest.raises(report.EvaluationError, match="split must be one of"):
    report.evaluate_workdir(workdir, "testing")


def test_workdir_without_checkpoint(run, tmp_path):
  workdir, _, _ = run
  (tmp_path / "config.json").write_text(
      (pathlib.Path(workdir) / "config.json").read_text())
  with pytest.raises(report.EvaluationError, match="No checkpoint in"):
    report.evaluate_workdir(str(tmp_path), "validation")
  assert not (tmp_path / "checkpoints").exists()  # nothing was created


def test_cli_empty_workdir_fails_cleanly(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.evaluate",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
      timeout=120, check=False)
  assert proc.returncode == 1
  assert "error:" in proc.stderr and "no config.json" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "eval").exists()


def _outputs(rng, n, dim=8, bits=0):
  out = {"features": rng.normal(size=(n, dim)).astype(np.float32)}
  out["embedding"] = out["features"][:, :4] * 2.0
  if bits:
    out["codes"] = np.sign(rng.normal(size=(n, bits))).astype(np.float32)
    out["embedding"] = out["codes"]
  return out


def test_nan_embeddings_are_counted():
  rng = np.random.default_rng(0)
  train, query = _outputs(rng, 60), _outputs(rng, 30)
  query["features"][[2, 5, 7]] = np.nan
  with pytest.raises(report.EvaluationError,
                     match=r"query features has 3 of 30 rows with NaN"):
    report.compute_metrics(train, rng.integers(0, 3, 60), query,
                           rng.integers(0, 3, 30), num_classes=3)


def test_hash_metrics_from_codes():
  rng = np.random.default_rng(1)
  train, query = _outputs(rng, 60, bits=12), _outputs(rng, 30, bits=12)
  res = report.compute_metrics(train, np.arange(60) % 3, query,
                               np.arange(30) % 3, num_classes=3, knn_ks=(5,),
                               probe_steps=20)
  assert set(res["knn"]) == {"top1_k5", "top5_k5"}
  h = res["hash"]
  assert h["num_bits"] == 12
  assert _in_unit(h["map"]) and 0.0 <= h["bit_balance"] <= 0.5
  assert "knn_embedding" not in res  # codes are reported as hash metrics


def test_classifier_head_gets_recall_and_f1():
  rng = np.random.default_rng(2)
  train, query = _outputs(rng, 60), _outputs(rng, 30)
  labels = np.arange(30) % 3
  # Right on classes 0 and 1, always "0" on class 2: recall 1, 1, 0.
  pred = np.where(labels == 2, 0, labels)
  query["logits"] = np.eye(3, dtype=np.float32)[pred]
  train["logits"] = np.eye(3, dtype=np.float32)[np.arange(60) % 3]
  res = report.compute_metrics(train, np.arange(60) % 3, query, labels,
                               num_classes=3, knn_ks=(5,), probe_steps=20)
  c = res["classifier_classification"]
  assert res["heads"]["classifier_top1"] == pytest.approx(2 / 3)
  assert c["accuracy"] == pytest.approx(2 / 3)
  assert c["macro_recall"] == pytest.approx(2 / 3)
  # F1: class 0 has precision 1/2, recall 1 -> 2/3; class 1: 1; class 2: 0.
  assert c["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)
  assert "classifier accuracy / macro recall / F1" in report.format_table(
      {"dataset": "x", "split": "validation", "num_queries": 30, "num_train": 60,
       "step": 1, **res})


def test_online_weights_need_a_weight_average(run):
  workdir, _, _ = run  # digits config: ema_decay = 0
  with pytest.raises(report.EvaluationError, match="kept no weight average"):
    report.load_run(workdir, online=True)
  assert report.eval_path(workdir, "validation", online=True,
                          tta_flip=True).endswith(
                              "eval/validation_online_tta_flip.json")
