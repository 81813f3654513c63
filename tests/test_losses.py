"""contrastive_jax.losses against independent float64 NumPy loops."""

import functools
import math
import zlib

import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from contrastive_jax import losses

# ----------------------------------------------------------------------------
# References: plain loops over anchors, pairs and triplets, float64.


def _dist(a, b, metric):
  if metric == "cosine":
    return 1.0 - _cos(a, b)
  sq = float(np.sum((a - b) ** 2))
  return math.sqrt(sq) if metric == "euclidean" else sq


def _cos(a, b):
  na, nb = max(np.linalg.norm(a), 1e-8), max(np.linalg.norm(b), 1e-8)
  return float(np.dot(a, b) / (na * nb))


def _pos(labels, a):
  return [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]


def _neg(labels, a):
  return [n for n in range(len(labels)) if labels[n] != labels[a]]


def _lse(values):
  m = max(values)
  return m + math.log(sum(math.exp(v - m) for v in values))


def ref_triplet_margin(a, p, n, margin, metric):
  out = []
  for i in range(len(a)):
    negs = n[i] if n.ndim == 3 else [n[i]]
    out.append(np.mean([max(_dist(a[i], p[i], metric)
                            - _dist(a[i], ng, metric) + margin, 0.0)
                        for ng in negs]))
  return np.array(out)


def ref_batch_all(x, labels, margin, metric):
  vals = []
  for a in range(len(x)):
    for p in _pos(labels, a):
      for n in _neg(labels, a):
        v = _dist(x[a], x[p], metric) - _dist(x[a], x[n], metric) + margin
        if v > 0:
          vals.append(v)
  return float(np.mean(vals)) if vals else 0.0


def ref_batch_hard(x, labels, margin, metric):
  vals = []
  for a in range(len(x)):
    ps, ns = _pos(labels, a), _neg(labels, a)
    if ps and ns:
      hp = max(_dist(x[a], x[p], metric) for p in ps)
      hn = min(_dist(x[a], x[n], metric) for n in ns)
      vals.append(max(hp - hn + margin, 0.0))
  return float(np.mean(vals)) if vals else 0.0


def ref_semi_hard(x, labels, margin, metric):
  vals = []
  for a in range(len(x)):
    ns = _neg(labels, a)
    if not ns:
      continue
    for p in _pos(labels, a):
      dap = _dist(x[a], x[p], metric)
      dns = [_dist(x[a], x[n], metric) for n in ns]
      farther = [d for d in dns if d > dap]
      dan = min(farther) if farther else max(dns)
      vals.append(max(dap - dan + margin, 0.0))
  return float(np.mean(vals)) if vals else 0.0


def ref_contrastive(x, labels, pos_margin, neg_margin, metric):
  pos_vals, neg_vals = [], []
  for a in range(len(x)):
    for b in range(len(x)):
      if a == b:
        continue
      d = _dist(x[a], x[b], metric)
      if labels[a] == labels[b]:
        pos_vals.append(max(d - pos_margin, 0.0))
      else:
        neg_vals.append(max(neg_margin - d, 0.0))
  nz = lambda v: float(np.mean([u for u in v if u > 0])) if any(
      u > 0 for u in v) else 0.0
  return nz(pos_vals) + nz(neg_vals)


def ref_nt_xent(x, labels, t):
  vals = []
  for a in range(len(x)):
    negs = [_cos(x[a], x[n]) / t for n in _neg(labels, a)]
    for p in _pos(labels, a):
      s = _cos(x[a], x[p]) / t
      vals.append(-s + _lse([s] + negs))
  return float(np.mean(vals)) if vals else 0.0


def ref_supcon(x, labels, t):
  vals = []
  for a in range(len(x)):
    ps = _pos(labels, a)
    if not ps:
      continue
    denom = _lse([_cos(x[a], x[k]) / t for k in range(len(x)) if k != a])
    vals.append(-np.mean([_cos(x[a], x[p]) / t - denom for p in ps]))
  return float(np.mean(vals)) if vals else 0.0


def ref_info_nce(q, k, t, negatives=None, symmetric=False):
  def one_way(q, k, negs):
    vals = []
    for i in range(len(q)):
      cands = list(k) + (list(negs) if negs is not None else [])
      logits = [_cos(q[i], c) / t for c in cands]
      vals.append(_lse(logits) - logits[i])
    return float(np.mean(vals))
  forward = one_way(q, k, negatives)
  return 0.5 * (forward + one_way(k, q, None)) if symmetric else forward


def ref_multi_similarity(x, labels, alpha, beta, base):
  vals = []
  for a in range(len(x)):
    ps = sum(math.exp(-alpha * (_cos(x[a], x[p]) - base))
             for p in _pos(labels, a))
    ns = sum(math.exp(beta * (_cos(x[a], x[n]) - base))
             for n in _neg(labels, a))
    vals.append(math.log1p(ps) / alpha + math.log1p(ns) / beta)
  return float(np.mean(vals))


def ref_circle(x, labels, m, gamma, weights_from=None):
  """``weights_from``: embeddings at which the (no-gradient) weights are taken."""
  w = x if weights_from is None else weights_from
  vals = []
  for a in range(len(x)):
    ps, ns = _pos(labels, a), _neg(labels, a)
    if not (ps and ns):
      continue
    lp = []
    for p in ps:
      s = _cos(x[a], x[p])
      lp.append(-gamma * max(1 + m - _cos(w[a], w[p]), 0.0) * (s - (1 - m)))
    ln = []
    for n in ns:
      s = _cos(x[a], x[n])
      ln.append(gamma * max(_cos(w[a], w[n]) + m, 0.0) * (s - m))
    z = _lse(lp) + _lse(ln)
    v = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
    if v > 0:
      vals.append(v)
  return float(np.mean(vals)) if vals else 0.0


def ref_sigmoid(q, k, scale, bias):
  vals = []
  for i in range(len(q)):
    total = 0.0
    for j in range(len(k)):
      z = 1.0 if i == j else -1.0
      logit = scale * _cos(q[i], k[j]) + bias
      total += math.log1p(math.exp(-z * logit))
    vals.append(total)
  return float(np.mean(vals))


# ----------------------------------------------------------------------------
# The table of in-batch losses: (function, kwargs, reference).

METRICS = ("euclidean", "squared_euclidean", "cosine")

IN_BATCH = {
    "batch_all": (losses.batch_all_triplet_loss, ref_batch_all,
                  dict(margin=0.7)),
    "batch_hard": (losses.batch_hard_triplet_loss, ref_batch_hard,
                   dict(margin=0.7)),
    "semi_hard": (losses.semi_hard_triplet_loss, ref_semi_hard,
                  dict(margin=0.7)),
    "contrastive": (losses.contrastive_loss, ref_contrastive,
                    dict(pos_margin=0.3, neg_margin=2.5)),
    "nt_xent": (losses.nt_xent_loss, ref_nt_xent, dict(temperature=0.3)),
    "supcon": (losses.supervised_contrastive_loss, ref_supcon,
               dict(temperature=0.3)),
    "multi_similarity": (losses.multi_similarity_loss, ref_multi_similarity,
                         dict(alpha=2.0, beta=10.0, base=0.3)),
    "circle": (losses.circle_loss, ref_circle, dict(m=0.25, gamma=8.0)),
}
METRIC_LOSSES = ("batch_all", "batch_hard", "semi_hard", "contrastive")


def _ref_call(name, x, labels, kw):
  _, ref, _ = IN_BATCH[name]
  if name in METRIC_LOSSES:
    if name == "contrastive":
      return ref(x, labels, kw["pos_margin"], kw["neg_margin"], kw["metric"])
    return ref(x, labels, kw["margin"], kw["metric"])
  return ref(x, labels, *[v for v in kw.values()])


def _cases():
  for name in IN_BATCH:
    for metric in (METRICS if name in METRIC_LOSSES else (None,)):
      yield name, metric


def _kwargs(name, metric):
  kw = dict(IN_BATCH[name][2])
  if metric is not None:
    kw["metric"] = metric
  return kw


def _batch(rng, n=10, d=6, classes=4):
  x = rng.normal(size=(n, d))
  labels = rng.integers(0, classes, size=n)
  return x, labels


@pytest.mark.parametrize("name,metric", list(_cases()))
def test_in_batch_loss_matches_reference_float64(name, metric):
  fn = IN_BATCH[name][0]
  kw = _kwargs(name, metric)
  # crc32, not hash(): str hashes change between processes.
  rng = np.random.default_rng(zlib.crc32(f"{name}/{metric}".encode()))
  with jax.enable_x64(True):
    for trial in range(3):
      x, labels = _batch(rng, n=9 + trial)
      got = fn(jnp.asarray(x), jnp.asarray(labels), **kw)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(got, _ref_call(name, x, labels, kw),
                                 rtol=1e-6, atol=1e-9)
      # Invariance to permuting the batch.
      perm = rng.permutation(len(x))
      np.testing.assert_allclose(
          fn(jnp.asarray(x[perm]), jnp.asarray(labels[perm]), **kw), got,
          rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
    "name,metric", [c for c in _cases() if c[0] != "circle"])
def test_in_batch_loss_check_grads_float64(name, metric):
  fn = IN_BATCH[name][0]
  kw = _kwargs(name, metric)
  rng = np.random.default_rng(7)
  with jax.enable_x64(True):
    x, labels = _batch(rng, n=8, d=4, classes=3)
    labels = jnp.asarray(labels)
    jtu.check_grads(lambda x: fn(x, labels, **kw), (jnp.asarray(x),),
                    order=1, modes=("rev",), atol=1e-5, rtol=1e-5)


def test_circle_gradient_treats_weights_as_constants():
  # check_grads cannot apply: the weights carry no gradient by definition.
  # Compare with central differences of the reference with frozen weights.
  rng = np.random.default_rng(8)
  with jax.enable_x64(True):
    x, labels = _batch(rng, n=8, d=4, classes=3)
    grad = jax.grad(losses.circle_loss)(jnp.asarray(x), jnp.asarray(labels),
                                        m=0.25, gamma=8.0)
    numeric = np.zeros_like(x)
    h = 1e-6
    for i in range(x.shape[0]):
      for j in range(x.shape[1]):
        xp, xm = x.copy(), x.copy()
        xp[i, j] += h
        xm[i, j] -= h
        numeric[i, j] = (ref_circle(xp, labels, 0.25, 8.0, weights_from=x)
                         - ref_circle(xm, labels, 0.25, 8.0, weights_from=x)
                         ) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,metric", list(_cases()))
def test_degenerate_batches_give_finite_values_and_grads(name, metric):
  fn = IN_BATCH[name][0]
  kw = _kwargs(name, metric)
  g = jax.value_and_grad(lambda x, l: fn(x, l, **kw))
  x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
  cases = {
      "duplicates": (np.repeat(x[:3], 2, axis=0), np.array([0, 0, 1, 1, 0, 1])),
      "zero_vectors": (np.where(np.arange(6)[:, None] < 2, 0.0, x),
                       np.array([0, 0, 1, 1, 2, 2])),
      "one_class": (x, np.zeros(6, np.int32)),
      "no_positives": (x, np.arange(6)),
      "large_norm": (x * 1e3, np.array([0, 0, 1, 1, 2, 2])),
  }
  for dtype in (jnp.float32, jnp.float16):
    for case, (xc, lc) in cases.items():
      value, grad = g(jnp.asarray(xc, dtype), jnp.asarray(lc))
      grad = np.asarray(grad, np.float32)
      assert np.isfinite(value), (case, dtype)
      assert np.all(np.isfinite(grad)), (case, dtype)
      if case == "zero_vectors":
        # Not 1/eps on the zero rows (a cosine's old failure mode).
        assert np.max(np.abs(grad)) < 1e3, (case, dtype)
      if case == "no_positives" and name not in ("contrastive",
                                                 "multi_similarity"):
        assert value == 0.0, (case, dtype)


@pytest.mark.parametrize("name", ["nt_xent", "supcon"])
def test_low_temperature_large_norm_is_finite(name):
  fn = IN_BATCH[name][0]
  x = 1e4 * np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  labels = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
  value, grad = jax.value_and_grad(
      lambda x: fn(x, labels, temperature=0.01))(jnp.asarray(x))
  assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize("name,metric", list(_cases()))
def test_bfloat16_inputs_compute_in_float32(name, metric):
  fn = IN_BATCH[name][0]
  kw = _kwargs(name, metric)
  x, labels = _batch(np.random.default_rng(3))
  xb = jnp.asarray(x, jnp.bfloat16)
  out = fn(xb, jnp.asarray(labels), **kw)
  assert out.dtype == jnp.float32
  expected = _ref_call(name, np.asarray(xb.astype(jnp.float32), np.float64),
                       labels, kw)
  np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-4)


def test_semi_hard_picks_the_farthest_negative_when_none_is_farther():
  x = jnp.array([[0.0, 0.0], [5.0, 0.0], [2.0, 0.0]])
  labels = jnp.array([0, 0, 1])
  # Anchor 0: d_ap = 5, its only negative is at 2 (not farther): 5 - 2 + 0.5.
  # Anchor 1: d_ap = 5, its negative is at 3: 5 - 3 + 0.5.
  got = losses.semi_hard_triplet_loss(x, labels, margin=0.5)
  np.testing.assert_allclose(got, np.mean([3.5, 2.5]), rtol=1e-6)


def test_semi_hard_ties_and_memory():
  # Distances equal to d(a, p) are not "farther"; grid points give exact ties.
  x = np.array([[0, 0], [1, 0], [-1, 0], [1, 0], [0, 1], [0, 2]], np.float32)
  labels = np.array([0, 0, 1, 1, 0, 1])
  for margin in (0.5, 2.0):
    got = losses.semi_hard_triplet_loss(x, labels, margin=margin)
    np.testing.assert_allclose(
        got, ref_semi_hard(x.astype(np.float64), labels, margin, "euclidean"),
        rtol=1e-6)
  # O(N^2) memory: no [N, N, N] buffer, which batch-all (O(N^3)) does build.
  x, labels = jnp.ones((64, 8)), jnp.arange(64) % 4
  def hlo(fn):
    return jax.jit(jax.value_and_grad(fn)).lower(x, labels).compile().as_text()
  assert "64,64,64]" not in hlo(losses.semi_hard_triplet_loss)
  assert "64,64,64]" in hlo(losses.batch_all_triplet_loss)


# ----------------------------------------------------------------------------
# Query/key losses and explicit triplets.


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("k", [None, 3])
def test_triplet_margin_loss_matches_reference(metric, k):
  rng = np.random.default_rng(1)
  with jax.enable_x64(True):
    a, p = rng.normal(size=(5, 4)), rng.normal(size=(5, 4))
    n = rng.normal(size=(5, 4) if k is None else (5, k, 4))
    got = losses.triplet_margin_loss(jnp.asarray(a), jnp.asarray(p),
                                     jnp.asarray(n), margin=1.5, metric=metric)
    assert got.shape == (5,)
    np.testing.assert_allclose(got, ref_triplet_margin(a, p, n, 1.5, metric),
                               rtol=1e-6, atol=1e-9)
    jtu.check_grads(
        lambda a: jnp.sum(losses.triplet_margin_loss(
            a, jnp.asarray(p), jnp.asarray(n), margin=1.5, metric=metric)),
        (jnp.asarray(a),), order=1, modes=("rev",))


@pytest.mark.parametrize("use_negatives", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_info_nce_matches_reference(use_negatives, symmetric):
  rng = np.random.default_rng(2)
  with jax.enable_x64(True):
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    negs = rng.normal(size=(4, 5)) if use_negatives else None
    fn = functools.partial(
        losses.info_nce_loss, temperature=0.2, symmetric=symmetric,
        negatives=None if negs is None else jnp.asarray(negs))
    got = fn(jnp.asarray(q), jnp.asarray(k))
    np.testing.assert_allclose(got, ref_info_nce(q, k, 0.2, negs, symmetric),
                               rtol=1e-6)
    jtu.check_grads(lambda q, k: fn(q, k), (jnp.asarray(q), jnp.asarray(k)),
                    order=1, modes=("rev",))


def test_sigmoid_contrastive_matches_reference():
  rng = np.random.default_rng(3)
  with jax.enable_x64(True):
    q, k = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    got = losses.sigmoid_contrastive_loss(jnp.asarray(q), jnp.asarray(k),
                                          scale=5.0, bias=-2.0)
    np.testing.assert_allclose(got, ref_sigmoid(q, k, 5.0, -2.0), rtol=1e-6)
    jtu.check_grads(
        lambda q, k, s, b: losses.sigmoid_contrastive_loss(q, k, scale=s,
                                                           bias=b),
        (jnp.asarray(q), jnp.asarray(k), 5.0, -2.0), order=1, modes=("rev",))


def test_simclr_nt_xent_equals_optax_ntxent():
  import optax  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(4).normal(size=(8, 6)).astype(np.float32)
  labels = jnp.array([0, 1, 2, 3, 0, 1, 2, 3])
  np.testing.assert_allclose(
      losses.nt_xent_loss(jnp.asarray(x), labels, temperature=0.1),
      optax.losses.ntxent(jnp.asarray(x), labels, temperature=0.1),
      rtol=1e-5)


def test_vmap_over_a_batch_of_batches():
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 8, 4)).astype(np.float32)
  labels = rng.integers(0, 3, size=(3, 8))
  for fn in (losses.supervised_contrastive_loss, losses.batch_hard_triplet_loss,
             losses.circle_loss):
    batched = jax.vmap(fn)(jnp.asarray(x), jnp.asarray(labels))
    single = [fn(jnp.asarray(x[i]), jnp.asarray(labels[i])) for i in range(3)]
    np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)


def test_cross_device_mean_counts_do_not_wrap():
  # batch_all counts O(N^3) triplets: four devices with 6e8 each must not
  # wrap an int32 psum (a negative count once turned the mean into a sum).
  from contrastive_jax.losses import _collective  # pylint: disable=g-import-not-at-top
  totals = jnp.full((4,), 6e8, jnp.float32)
  counts = jnp.full((4,), 600_000_000, jnp.int32)
  mean = jax.vmap(lambda t, c: _collective.global_mean(t, c, "i"),
                  axis_name="i")(totals, counts)
  np.testing.assert_allclose(mean, 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------
# Bad input: refused at trace time with the shapes or dtypes named.


@pytest.mark.parametrize("name", list(IN_BATCH))
def test_in_batch_bad_input(name):
  fn = IN_BATCH[name][0]
  x, labels = jnp.ones((4, 3)), jnp.arange(4)
  with pytest.raises(ValueError, match=r"shape \[N\] = \[4\].*\(3,\)"):
    fn(x, jnp.arange(3))
  with pytest.raises(ValueError, match=r"\[N, D\].*\(4,\)"):
    fn(jnp.ones(4), labels)
  with pytest.raises(ValueError, match=r"\[N, D\].*\(2, 2, 3\)"):
    fn(jnp.ones((2, 2, 3)), labels)
  with pytest.raises(TypeError, match="floating dtype.*int32"):
    fn(jnp.ones((4, 3), jnp.int32), labels)
  with pytest.raises(TypeError, match="integer.*float32"):
    fn(x, jnp.ones(4))
  if name in METRIC_LOSSES:
    with pytest.raises(ValueError, match="metric"):
      fn(x, labels, metric="manhattan")
  with pytest.raises(ValueError, match=r"at least one row.*\(0, 3\)"):
    fn(jnp.ones((0, 3)), jnp.arange(0))
  with pytest.raises(TypeError, match="integer array.*list"):
    fn(x, [0, 0, 1, 1])
  # A per-column hyperparameter would broadcast silently.
  for key in IN_BATCH[name][2]:
    with pytest.raises(ValueError, match=rf"{key} must be a scalar.*\(4,\)"):
      fn(x, labels, **{key: jnp.ones(4)})


POSITIVE = {"nt_xent": "temperature", "supcon": "temperature",
            "multi_similarity": ("alpha", "beta"), "circle": "gamma"}


@pytest.mark.parametrize("name", list(POSITIVE))
def test_in_batch_nonpositive_scale(name):
  fn = IN_BATCH[name][0]
  x, labels = jax.random.normal(jax.random.key(0), (6, 3)), jnp.arange(6) % 3
  keys = POSITIVE[name]
  for key in (keys,) if isinstance(keys, str) else keys:
    for bad in (0, 0.0, -0.1, float("nan"), np.float32(0.0), np.array(-1.0)):
      with pytest.raises(ValueError, match=rf"{key} must be > 0, got"):
        fn(x, labels, **{key: bad})
    # A JAX array is not read (that would wait on the device), nor a traced
    # value; a learnable temperature still gets its gradient.
    fn(x, labels, **{key: jnp.float32(0.0)})
    loss, g = jax.jit(jax.value_and_grad(
        lambda t: fn(x, labels, **{key: t})))(jnp.float32(0.5))
    assert np.isfinite(loss) and np.isfinite(g) and g != 0


def test_query_key_nonpositive_scale():
  q = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="temperature must be > 0, got 0.0"):
    losses.info_nce_loss(q, q, temperature=0)
  with pytest.raises(ValueError, match="scale must be > 0, got -1.0"):
    losses.sigmoid_contrastive_loss(q, q, scale=-1.0)


def test_query_key_bad_input():
  with pytest.raises(ValueError, match=r"\(4, 3\) and \(4, 5\)"):
    losses.info_nce_loss(jnp.ones((4, 3)), jnp.ones((4, 5)))
  with pytest.raises(ValueError, match=r"feature size.*\(2, 5\)"):
    losses.info_nce_loss(jnp.ones((4, 3)), jnp.ones((4, 3)),
                         negatives=jnp.ones((2, 5)))
  with pytest.raises(TypeError, match="int32"):
    losses.sigmoid_contrastive_loss(jnp.ones((4, 3), jnp.int32),
                                    jnp.ones((4, 3)))
  with pytest.raises(ValueError, match=r"negatives.*\(3, 2, 3\)"):
    losses.triplet_margin_loss(jnp.ones((4, 3)), jnp.ones((4, 3)),
                               jnp.ones((3, 2, 3)))
  with pytest.raises(ValueError, match=r"K >= 1.*\(4, 0, 3\)"):
    losses.triplet_margin_loss(jnp.ones((4, 3)), jnp.ones((4, 3)),
                               jnp.ones((4, 0, 3)))
  with pytest.raises(ValueError, match=r"at least one row.*\(0, 3\)"):
    losses.info_nce_loss(jnp.ones((0, 3)), jnp.ones((0, 3)))
  for kw in (dict(scale=jnp.ones(4)), dict(bias=jnp.zeros((4, 1)))):
    with pytest.raises(ValueError, match="must be a scalar"):
      losses.sigmoid_contrastive_loss(jnp.ones((4, 3)), jnp.ones((4, 3)), **kw)
  with pytest.raises(ValueError, match="temperature must be a scalar"):
    losses.info_nce_loss(jnp.ones((4, 3)), jnp.ones((4, 3)),
                         temperature=jnp.ones(4))
