"""Tests for contrastive_jax.evaluation against NumPy loops, scikit-learn and PML."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import evaluation as ev


def _data(n=240, d=12, classes=6, seed=0):
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((classes, d)) * 1.5
  y = rng.integers(0, classes, n)
  x = (centers[y] + rng.standard_normal((n, d))).astype(np.float32)
  return x, y


# ----------------------------------------------------------------------------
# Independent references (float64 loops).


def _np_cos(a, b):
  a = a.astype(np.float64) / np.linalg.norm(a, axis=1, keepdims=True)
  b = b.astype(np.float64) / np.linalg.norm(b, axis=1, keepdims=True)
  return a @ b.T


def _np_knn_scores(q, r, ry, k, t, c):
  sims = _np_cos(q, r)
  out = np.zeros((len(q), c))
  for i in range(len(q)):
    order = np.argsort(-sims[i], kind="stable")[:k]
    for j in order:
      out[i, ry[j]] += np.exp(sims[i, j] / t)
  return out


def _np_retrieval(q, qy, r, ry, exclude_self, metric):
  if metric == "cosine":
    score = _np_cos(q, r)
  else:
    diff = q[:, None, :].astype(np.float64) - r[None, :, :].astype(np.float64)
    score = -np.sum(diff * diff, axis=-1)
  p1, rp, mapr, rec = [], [], [], {k: [] for k in (1, 2, 4, 8)}
  for i in range(len(q)):
    cand = [j for j in range(len(r)) if not (exclude_self and j == i)]
    order = sorted(cand, key=lambda j: -score[i, j])
    rel = np.array([ry[j] == qy[i] for j in order], dtype=np.float64)
    big_r = int(rel.sum())
    if big_r == 0:
      continue  # lone query
    p1.append(rel[0])
    rp.append(rel[:big_r].sum() / big_r)
    ap = 0.0
    hits = 0
    for pos in range(big_r):
      if rel[pos]:
        hits += 1
        ap += hits / (pos + 1)
    mapr.append(ap / big_r)
    for k in rec:
      rec[k].append(float(rel[:k].any()))
  out = {"precision_at_1": np.mean(p1), "r_precision": np.mean(rp),
         "mean_average_precision_at_r": np.mean(mapr)}
  out.update({f"recall_at_{k}": np.mean(v) for k, v in rec.items()})
  return out


# ----------------------------------------------------------------------------
# kNN classification.


def test_knn_scores_match_numpy_and_chunking():
  x, y = _data()
  q, r, ry = x[:50], x[50:], y[50:]
  want = _np_knn_scores(q, r, ry, 20, 0.07, 6)
  for chunk in (7, 1024):  # padded last chunk and a single chunk
    got = ev.knn_class_scores(q, r, ry, k=20, num_classes=6, chunk_size=chunk)
    np.testing.assert_allclose(got, want, rtol=2e-5)
  pred = ev.knn_classify(q, r, ry, k=20, chunk_size=16)
  np.testing.assert_array_equal(pred, np.argmax(want, axis=1))


def test_knn_accuracy_several_k_and_sklearn_agreement():
  from sklearn.neighbors import KNeighborsClassifier

  x, y = _data(seed=1)
  q, qy, r, ry = x[:60], y[:60], x[60:], y[60:]
  got = ev.knn_accuracy(q, qy, r, ry, ks=(3, 20, 100), chunk_size=16)
  assert set(got) == {f"top{t}_k{k}" for t in (1, 5) for k in (3, 20, 100)}
  for k in (3, 20, 100):
    scores = _np_knn_scores(q, r, ry, k, 0.07, 6)
    top1 = np.mean(np.argmax(scores, 1) == qy)
    ranked = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, k)]
    top5 = np.mean(np.any(ranked == qy[:, None], axis=1))
    assert got[f"top1_k{k}"] == pytest.approx(top1)
    assert got[f"top5_k{k}"] == pytest.approx(top5)
  # scikit-learn's brute cosine kNN with the same weights predicts the same.
  clf = KNeighborsClassifier(
      n_neighbors=20, algorithm="brute", metric="cosine",
      weights=lambda d: np.exp((1.0 - d) / 0.07)).fit(r, ry)
  np.testing.assert_array_equal(ev.knn_classify(q, r, ry, k=20),
                                clf.predict(q))


def test_knn_leave_one_out_excludes_the_query_itself():
  x, y = _data(n=45, seed=2)
  # Without exclusion a query is its own nearest neighbour: k=1 is 100%.
  assert ev.knn_accuracy(x, y, x, y, ks=(1,))["top1_k1"] == 1.0
  keep = lambda i: np.arange(len(x)) != i
  want = np.stack([_np_knn_scores(x[i:i + 1], x[keep(i)], y[keep(i)], 5, 0.07, 6)[0]
                   for i in range(len(x))])
  for chunk in (8, 1024):  # offsets across chunks, and a padded last chunk
    got = ev.knn_class_scores(x, x, y, k=5, num_classes=6, chunk_size=chunk,
                              exclude_self=True)
    np.testing.assert_allclose(got, want, rtol=2e-5)
  acc = ev.knn_accuracy(x, y, x, y, ks=(5,), num_classes=6, chunk_size=8,
                        exclude_self=True)
  assert acc["top1_k5"] == pytest.approx(np.mean(np.argmax(want, 1) == y))
  np.testing.assert_array_equal(
      ev.knn_classify(x, x, y, k=5, num_classes=6, exclude_self=True),
      np.argmax(want, 1))
  with pytest.raises(ValueError, match="queries to be the references"):
    ev.knn_classify(x[:10], x, y, exclude_self=True)
  with pytest.raises(ValueError, match="k=45 exceeds.*less the query itself"):
    ev.knn_classify(x, x, y, k=45, exclude_self=True)


def test_knn_bad_input():
  x, y = _data(n=40)
  bad = x.copy()
  bad[[3, 7, 9]] = np.nan
  with pytest.raises(ValueError, match="3 of 40 rows"):
    ev.knn_classify(bad, x, y)
  with pytest.raises(ValueError, match="feature size"):
    ev.knn_classify(x[:, :5], x, y)
  with pytest.raises(ValueError, match="entries"):
    ev.knn_classify(x, x, y[:10])
  with pytest.raises(ValueError, match="exceeds"):
    ev.knn_classify(x, x, y, k=41)
  with pytest.raises(ValueError, match="num_classes"):
    ev.knn_classify(x, x, y, num_classes=2)
  with pytest.raises(TypeError, match="floating"):
    ev.knn_classify(x.astype(np.int32), x, y)
  with pytest.raises(ValueError, match="temperature"):
    ev.knn_accuracy(x, y, x, y, ks=(5,), temperature=0.0)


# ----------------------------------------------------------------------------
# Retrieval metrics.


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_retrieval_matches_numpy_loops(metric):
  x, y = _data(n=120, seed=2)
  y[0] = 17  # a lone query: excluded from the neighbour-based metrics
  got = ev.retrieval_metrics(x, y, metric=metric, chunk_size=32)
  want = _np_retrieval(x, y, x, y, True, metric)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key
  assert got["recall_at_1"] == pytest.approx(got["precision_at_1"])
  # Separate references, no exclusion.
  r, ry = _data(n=90, seed=3)
  got = ev.retrieval_metrics(x, y, reference_embeddings=r, reference_labels=ry,
                             metric=metric, cluster=False)
  want = _np_retrieval(x, y, r, ry, False, metric)
  for key, value in want.items():
    assert got[key] == pytest.approx(value, abs=1e-6), key
  assert np.isnan(got["nmi"]) and np.isnan(got["ami"])


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_retrieval_matches_pml_accuracy_calculator(metric):
  pytest.importorskip("pytorch_metric_learning")
  import torch
  from pytorch_metric_learning.distances import CosineSimilarity
  from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
  from pytorch_metric_learning.utils.inference import CustomKNN

  include = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
  # Cosine: exact top-k of PML's cosine similarity; euclidean: PML's default
  # FaissKNN (squared L2, faiss ships with the PML extras).
  if metric == "cosine":
    knn = CustomKNN(CosineSimilarity())
  else:
    pytest.importorskip("faiss")
    knn = None
  calc = AccuracyCalculator(include=include, knn_func=knn,
                            device=torch.device("cpu"))
  rng = np.random.default_rng(4)
  x = rng.standard_normal((150, 10)).astype(np.float32)
  y = rng.integers(0, 5, 150)
  y[3] = 9  # lone
  r = rng.standard_normal((200, 10)).astype(np.float32)
  ry = rng.integers(0, 5, 200)
  both = np.concatenate([x, r]), np.concatenate([y, ry])
  cases = [
      (calc.get_accuracy(x, y), {}),
      (calc.get_accuracy(x, y, r, ry),
       dict(reference_embeddings=r, reference_labels=ry)),
      (calc.get_accuracy(x, y, *both, ref_includes_query=True),
       dict(reference_embeddings=both[0], reference_labels=both[1],
            ref_includes_query=True)),
  ]
  for want, kwargs in cases:
    got = ev.retrieval_metrics(x, y, metric=metric, cluster=False, **kwargs)
    for key in include:
      assert got[key] == pytest.approx(want[key], abs=1e-6), (key, kwargs)


def test_retrieval_clustering_and_validation():
  x, y = _data(n=150, d=8, classes=3, seed=5)
  x[:, :] += 20.0 * np.eye(8)[y].astype(np.float32)  # well separated
  got = ev.retrieval_metrics(x, y)
  assert got["nmi"] == pytest.approx(1.0) and got["ami"] == pytest.approx(1.0)
  assert got["precision_at_1"] == 1.0 and got["mean_average_precision_at_r"] == 1.0
  assert set(got) == {"precision_at_1", "r_precision",
                      "mean_average_precision_at_r", "recall_at_1",
                      "recall_at_2", "recall_at_4", "recall_at_8", "nmi",
                      "ami"}
  json.dumps(got)
  bad = x.copy()
  bad[5, 0] = np.inf
  with pytest.raises(ValueError, match="1 of 150 rows"):
    ev.retrieval_metrics(bad, y)
  with pytest.raises(ValueError, match="metric"):
    ev.retrieval_metrics(x, y, metric="manhattan")
  with pytest.raises(ValueError, match="both or"):
    ev.retrieval_metrics(x, y, reference_embeddings=x)
  with pytest.raises(ValueError, match="ref_includes_query"):
    ev.retrieval_metrics(x, y, reference_embeddings=x[::-1].copy(),
                         reference_labels=y[::-1].copy(),
                         ref_includes_query=True)
  with pytest.raises(ValueError, match="entries"):
    ev.retrieval_metrics(x, y[:-1])


# ----------------------------------------------------------------------------
# Hash retrieval.


def _np_hash_map(q, qy, r, ry, top_k):
  aps = []
  for i in range(len(q)):
    dist = np.sum(np.sign(q[i]) != np.sign(r), axis=1)
    order = np.argsort(dist, kind="stable")[:top_k]
    if qy.ndim == 2:
      rel = (ry[order] @ qy[i]) > 0
    else:
      rel = ry[order] == qy[i]
    if rel.sum() == 0:
      aps.append(0.0)
      continue
    prec = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    aps.append(np.sum(prec * rel) / rel.sum())
  return np.mean(aps)


def test_hash_map_matches_numpy_with_ties():
  rng = np.random.default_rng(6)
  # 6 bits: many Hamming ties, resolved by database order.
  q = np.where(rng.random((40, 6)) < 0.5, -1.0, 1.0).astype(np.float32)
  r = np.where(rng.random((300, 6)) < 0.5, -1.0, 1.0).astype(np.float32)
  qy, ry = rng.integers(0, 4, 40), rng.integers(0, 4, 300)
  for top_k in (None, 10, 100):
    got = ev.hash_retrieval_map(q, qy, r, ry, top_k=top_k, chunk_size=16)
    assert got == pytest.approx(_np_hash_map(q, qy, r, ry, top_k), abs=1e-6)
  # Multi-hot labels; boolean codes mean the same as ±1.
  qm = (rng.random((40, 5)) < 0.3).astype(np.float32)
  rm = (rng.random((300, 5)) < 0.3).astype(np.float32)
  got = ev.hash_retrieval_map(q > 0, qm, r > 0, rm, top_k=50)
  assert got == pytest.approx(_np_hash_map(q, qm, r, rm, 50), abs=1e-6)
  for dtype in (np.int32, np.float32):
    with pytest.raises(ValueError, match="0/1"):
      ev.hash_retrieval_map((q > 0).astype(dtype), qy, r, ry)
  with pytest.raises(ValueError, match="bits"):
    ev.hash_retrieval_map(q[:, :4], qy, r, ry)


def test_bit_balance():
  codes = np.array([[1, 1, -1], [1, -1, -1], [-1, 1, -1], [-1, -1, -1]],
                   dtype=np.float32)
  np.testing.assert_allclose(ev.bit_balance(codes, per_bit=True),
                             [0.5, 0.5, 0.0])
  assert ev.bit_balance(codes) == pytest.approx((0 + 0 + 0.5) / 3)


# ----------------------------------------------------------------------------
# Linear probe and classification metrics.


def test_linear_probe_digits():
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = x.astype(np.float32)
  out = ev.linear_probe(x[:1200], y[:1200], x[1200:], y[1200:],
                        num_classes=10, steps=300, learning_rate=1e-2,
                        batch_size=256)
  assert set(out) == {"top1", "top5", "train_top1", "train_loss"}
  assert out["top1"] > 0.88 and out["train_top1"] > 0.95
  # Top-1 and top-5 recounted from the same (deterministic) fit's logits.
  logits = ev.linear_classifier_logits(
      ev.fit_linear_classifier(x[:1200], y[:1200], num_classes=10, steps=300,
                               learning_rate=1e-2, batch_size=256), x[1200:])
  ranked = np.argsort(-np.asarray(logits), axis=1, kind="stable")
  assert out["top1"] == pytest.approx(np.mean(ranked[:, 0] == y[1200:]))
  assert out["top5"] == pytest.approx(
      np.mean(np.any(ranked[:, :5] == y[1200:, None], axis=1)))
  assert out["top5"] > out["top1"]
  json.dumps(out)
  # Full-batch SGD also learns; fit/logits round trip.
  params = ev.fit_linear_classifier(x[:1200], y[:1200], num_classes=10,
                                    steps=200, learning_rate=0.1,
                                    optimizer="sgd", batch_size=None)
  logits = ev.linear_classifier_logits(params, x[1200:])
  assert logits.shape == (len(x) - 1200, 10)
  assert np.mean(np.argmax(logits, 1) == y[1200:]) > 0.85
  # Constant features standardise without NaN.
  assert np.all(np.isfinite(params["std"])) and np.all(params["std"] > 0)
  # The standardisation does not depend on the features' scale.
  tiny = ev.fit_linear_classifier(x[:1200] * 1e-7, y[:1200], num_classes=10,
                                  steps=200, learning_rate=0.1,
                                  optimizer="sgd", batch_size=None)
  np.testing.assert_allclose(tiny["std"], np.where(
      params["std"] == 1.0, 1.0, params["std"] * 1e-7), rtol=1e-4)
  np.testing.assert_allclose(
      ev.linear_classifier_logits(tiny, x[1200:] * 1e-7), logits, atol=1e-3)
  with pytest.raises(ValueError, match="num_classes"):
    ev.linear_probe(x, y, x, y, num_classes=5)
  with pytest.raises(ValueError, match="dimension"):
    ev.linear_probe(x, y, x[:, :10], y, num_classes=10, steps=2)


def test_classification_metrics_sklearn_and_json():
  from sklearn import metrics as skm

  rng = np.random.default_rng(7)
  y_true = rng.integers(0, 4, 100)
  y_pred = np.where(rng.random(100) < 0.7, y_true, rng.integers(0, 4, 100))
  names = ["cat", "dog", "car", "ship", "never"]
  out = ev.classification_metrics(y_true, y_pred, class_names=names)
  json.dumps(out)
  assert out["accuracy"] == pytest.approx(skm.accuracy_score(y_true, y_pred))
  labels = np.arange(5)
  assert out["macro_recall"] == pytest.approx(skm.recall_score(
      y_true, y_pred, labels=labels, average="macro", zero_division=0))
  assert out["macro_f1"] == pytest.approx(skm.f1_score(
      y_true, y_pred, labels=labels, average="macro", zero_division=0))
  cm = np.asarray(out["confusion_matrix"])
  np.testing.assert_array_equal(cm, skm.confusion_matrix(y_true, y_pred,
                                                         labels=labels))
  assert out["per_class"]["never"] == {"precision": 0.0, "recall": 0.0,
                                       "f1": 0.0, "support": 0}
  assert out["per_class"]["dog"]["support"] == int(np.sum(y_true == 1))
  auto = ev.classification_metrics(y_true, y_pred)
  assert auto["class_names"] == ["0", "1", "2", "3"]
  with pytest.raises(ValueError, match="num_classes=2"):
    ev.classification_metrics(y_true, y_pred, class_names=["a", "b"])
  with pytest.raises(ValueError, match="entries"):
    ev.classification_metrics(y_true, y_pred[:5])


# ----------------------------------------------------------------------------
# embed.


def test_embed_sharded_padded_and_dict_outputs():
  devices = jax.local_devices()
  w = jnp.arange(12.0).reshape(4, 3) / 10.0

  def apply_fn(variables, images):
    flat = images.reshape(images.shape[0], -1)
    return {"features": flat, "embedding": flat @ variables["w"]}

  images = np.random.default_rng(8).random((21, 2, 2), dtype=np.float32)
  out = ev.embed(apply_fn, {"w": w}, images, batch_size=5)
  assert out["features"].shape == (21, 4) and out["embedding"].shape == (21, 3)
  np.testing.assert_allclose(out["embedding"],
                             images.reshape(21, 4) @ np.asarray(w), rtol=1e-6)
  # An explicit mesh over part of the devices, plain array outputs.
  mesh = jax.sharding.Mesh(np.asarray(devices[:2]), ("data",))
  out = ev.embed(lambda v, x: x.reshape(x.shape[0], -1) * v, 2.0, images,
                 batch_size=4, mesh=mesh)
  np.testing.assert_allclose(out, images.reshape(21, 4) * 2.0)
  with pytest.raises(ValueError, match="data axis"):
    ev.embed(apply_fn, {"w": w}, images,
             mesh=jax.sharding.Mesh(np.asarray(devices[:1]), ("batch",)))
  with pytest.raises(ValueError, match="leading batch axis"):
    ev.embed(lambda v, x: jnp.sum(x), None, images, batch_size=8)


# ----------------------------------------------------------------------------
# Plots.


def _png(path):
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
  return data


def test_plots_write_pngs(tmp_path):
  pytest.importorskip("matplotlib")
  x, y = _data(n=60, d=6, classes=3, seed=9)
  names = ["airplane", "bird", "cat"]
  assert ev.plot_tsne(x, y, tmp_path / "t.png", class_names=names,
                     max_iter=250) == str(
      tmp_path / "t.png")
  _png(tmp_path / "t.png")
  ev.plot_curves({"train/loss": [(0, 2.0), (10, 1.0), (20, 0.5)],
                  "eval/loss": [(0, 2.2), (20, 0.9)],
                  "knn_top1": [(0, 0.1), (20, 0.6)]},
                 tmp_path / "c.png")
  _png(tmp_path / "c.png")
  cm = ev.classification_metrics(y, np.roll(y, 1),
                                 class_names=names)["confusion_matrix"]
  ev.plot_confusion_matrix(cm, tmp_path / "cm.png", class_names=names)
  _png(tmp_path / "cm.png")
  rng = np.random.default_rng(10)
  queries = rng.random((3, 8, 8, 3)).astype(np.float32)
  neighbors = rng.random((3, 8, 8, 8, 3)).astype(np.float32)
  ev.plot_neighbors(queries, neighbors, np.array([0, 1, 2]),
                    rng.integers(0, 3, (3, 8)), tmp_path / "n.png",
                    class_names=names)
  _png(tmp_path / "n.png")
  with pytest.raises(ValueError, match="neighbor_labels"):
    ev.plot_neighbors(queries, neighbors, np.array([0, 1, 2]),
                      np.zeros((3, 7), int), tmp_path / "x.png")
