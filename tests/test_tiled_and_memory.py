"""Tiled (block_size) losses and the cross-batch memory."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from contrastive_jax import losses

TILED = {
    "nt_xent": losses.nt_xent_loss,
    "supcon": losses.supervised_contrastive_loss,
}


def _batch(seed, n=37, d=6, classes=5):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(n, d)), jnp.float32),
          jnp.asarray(rng.integers(0, classes, size=n)))


@pytest.mark.parametrize("block_size", [1, 8, 64])
@pytest.mark.parametrize("name", sorted(TILED))
def test_tiled_equals_untiled(name, block_size):
  fn = TILED[name]
  x, labels = _batch(0)
  # Include a zero vector, a duplicate, and an anchor with no positive.
  x = x.at[0].set(0.0).at[1].set(x[2])
  labels = labels.at[3].set(99)
  value, grad = jax.value_and_grad(fn)(x, labels, temperature=0.2)
  t_value, t_grad = jax.value_and_grad(
      functools.partial(fn, block_size=block_size))(x, labels,
                                                    temperature=0.2)
  np.testing.assert_allclose(t_value, value, rtol=1e-5)
  np.testing.assert_allclose(t_grad, grad, rtol=1e-5, atol=1e-6)


def test_tiled_temperature_gradient_and_degenerate_rows():
  x, _ = _batch(1, n=12)
  no_pos = jnp.arange(12)
  for fn in TILED.values():
    value, grad = jax.value_and_grad(
        lambda x: fn(x, no_pos, block_size=5))(x)
    assert value == 0.0 and np.all(np.isfinite(grad))
    one_class = jnp.zeros(12, jnp.int32)
    value, grad = jax.value_and_grad(
        lambda x: fn(x, one_class, block_size=5))(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
  # A learnable temperature gets the same gradient tiled and untiled.
  labels = jnp.arange(12) % 3
  g = [jax.grad(lambda t: losses.nt_xent_loss(x, labels, temperature=t,
                                              block_size=b))(0.3)
       for b in (None, 5)]
  np.testing.assert_allclose(g[1], g[0], rtol=1e-5)
  # ... and keeps its dtype: a bf16 parameter, a weak float64 under x64.
  for fn in TILED.values():
    for b in (None, 5):
      gb = jax.grad(lambda t: fn(x, labels, temperature=t, block_size=b))(
          jnp.asarray(0.3, jnp.bfloat16))
      assert gb.dtype == jnp.bfloat16 and np.isfinite(float(gb))
      with jax.enable_x64(True):
        g64 = jax.grad(lambda t: fn(x, labels, temperature=t,
                                    block_size=b))(0.3)
      assert np.isfinite(g64)


@pytest.mark.parametrize("symmetric", [False, True])
def test_tiled_info_nce_equals_untiled(symmetric):
  q, _ = _batch(2, n=21)
  k, _ = _batch(3, n=21)
  negs, _ = _batch(4, n=9)
  fn = functools.partial(losses.info_nce_loss, temperature=0.2,
                         negatives=negs, symmetric=symmetric)
  v, g = jax.value_and_grad(fn, argnums=(0, 1))(q, k)
  tv, tg = jax.value_and_grad(functools.partial(fn, block_size=4),
                              argnums=(0, 1))(q, k)
  np.testing.assert_allclose(tv, v, rtol=1e-5)
  for a, b in zip(tg, g):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [1, 4, 64])
def test_tiled_sigmoid_equals_untiled(block_size):
  q, _ = _batch(5, n=21)
  k, _ = _batch(6, n=21)
  q = q.at[0].set(0.0)      # a zero vector
  k = k.at[1].set(k[2])     # a duplicate key
  fn = lambda q, k, s, b, **kw: losses.sigmoid_contrastive_loss(
      q, k, scale=s, bias=b, **kw)
  # Scale and bias are learnable in SigLIP: their gradients too.
  args = (q, k, 5.0, -2.0)
  v, g = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args)
  tv, tg = jax.value_and_grad(functools.partial(fn, block_size=block_size),
                              argnums=(0, 1, 2, 3))(*args)
  np.testing.assert_allclose(tv, v, rtol=1e-5)
  for a, b in zip(tg, g):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tiled_sigmoid_gradients_are_numerically_right():
  q, _ = _batch(7, n=9, d=4)
  k, _ = _batch(8, n=9, d=4)
  with jax.enable_x64(True):
    jtu.check_grads(
        lambda q, k, s, b: losses.sigmoid_contrastive_loss(
            q, k, scale=s, bias=b, block_size=4),
        (np.asarray(q, np.float64), np.asarray(k, np.float64), 3.0, -1.0),
        order=1, modes=["rev"])


def test_forward_streams_the_blocks_once_where_phi_allows():
  """SupCon and InfoNCE need one pass over the candidate blocks forward
  (``_Spec.row_sums``), NT-Xent and the sigmoid loss two; the backward pass
  adds one."""
  x = jnp.ones((16, 4))
  labels = jnp.arange(16) % 3
  passes = {
      "supcon": (1, lambda x: losses.supervised_contrastive_loss(
          x, labels, block_size=8)),
      "info_nce": (1, lambda x: losses.info_nce_loss(x, x, block_size=8)),
      "nt_xent": (2, lambda x: losses.nt_xent_loss(x, labels, block_size=8)),
      "sigmoid": (2, lambda x: losses.sigmoid_contrastive_loss(
          x, x, block_size=8)),
  }
  for name, (forward, fn) in passes.items():
    assert str(jax.make_jaxpr(fn)(x)).count("scan[") == forward, name
    assert str(jax.make_jaxpr(jax.grad(fn))(x)).count("scan[") == forward + 1, name


def test_tiled_never_builds_the_square_matrix():
  x = jnp.ones((512, 16))
  labels = jnp.arange(512) % 7
  for fn in TILED.values():
    f = jax.jit(jax.value_and_grad(functools.partial(fn, block_size=64)))
    hlo = f.lower(x, labels).compile().as_text()
    assert "512,512]" not in hlo
    assert "[512,512" not in hlo
    untiled = jax.jit(jax.value_and_grad(fn)).lower(x, labels).as_text()
    assert "512x512" in untiled  # the check above can detect it
  sigmoid = jax.jit(jax.value_and_grad(functools.partial(
      losses.sigmoid_contrastive_loss, block_size=64)))
  hlo = sigmoid.lower(x, x).compile().as_text()
  assert "512,512]" not in hlo and "[512,512" not in hlo
  assert "512x512" in jax.jit(jax.value_and_grad(
      losses.sigmoid_contrastive_loss)).lower(x, x).as_text()


def test_bad_block_size():
  x, labels = _batch(0)
  for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError),
                     (True, TypeError)):
    with pytest.raises(error, match=r"block_size must be an int >= 1 \(or None\)"):
      losses.nt_xent_loss(x, labels, block_size=bad)


# ----------------------------------------------------------------------------
# Cross-batch memory.


def _ref_supcon_anchors(x, labels, valid, n_anchors, t):
  """SupCon over anchors 0..n_anchors-1 against every valid row."""
  cos = lambda a, b: float(np.dot(a, b) / (np.linalg.norm(a)
                                           * np.linalg.norm(b)))
  vals = []
  for a in range(n_anchors):
    others = [k for k in range(len(x)) if k != a and valid[k]]
    pos = [p for p in others if labels[p] == labels[a]]
    if not pos:
      continue
    logits = [cos(x[a], x[k]) / t for k in others]
    m = max(logits)
    lse = m + math.log(sum(math.exp(v - m) for v in logits))
    vals.append(-np.mean([cos(x[a], x[p]) / t - lse for p in pos]))
  return float(np.mean(vals)) if vals else 0.0


def test_memory_ring_buffer_wraps_around():
  mem = losses.create_memory(5, 2)
  assert not np.any(mem.valid)
  for step in range(3):
    emb = jnp.full((2, 2), float(step))
    mem = losses.enqueue_memory(mem, emb, jnp.full((2,), step))
  # Steps 0, 1, 2 wrote slots 0-1, 2-3, 4-0: slot 0 now holds step 2.
  np.testing.assert_array_equal(mem.labels, [2, 0, 1, 1, 2])
  np.testing.assert_array_equal(mem.embeddings[:, 0], [2, 0, 1, 1, 2])
  assert np.all(mem.valid) and int(mem.index) == 1
  # A batch larger than the memory keeps its newest entries.
  big = losses.enqueue_memory(mem, jnp.arange(14.).reshape(7, 2),
                              jnp.arange(7))
  np.testing.assert_array_equal(np.sort(big.labels), [2, 3, 4, 5, 6])


@pytest.mark.parametrize("block_size", [None, 4])
def test_loss_with_memory_equals_reference_on_concatenated_arrays(block_size):
  rng = np.random.default_rng(5)
  with jax.enable_x64(True):
    mem = losses.create_memory(8, 3, dtype=jnp.float64)
    old = rng.normal(size=(6, 3))
    old_labels = rng.integers(0, 3, size=6)
    mem = losses.enqueue_memory(mem, jnp.asarray(old), jnp.asarray(old_labels))
    x = rng.normal(size=(5, 3))
    labels = rng.integers(0, 3, size=5)
    got, grad = jax.value_and_grad(
        lambda x: losses.supervised_contrastive_loss(
            x, jnp.asarray(labels), temperature=0.5, memory=mem,
            block_size=block_size))(jnp.asarray(x))
    # Memory rows 6-7 are empty and must be ignored.
    cat = np.concatenate([x, np.asarray(mem.embeddings)])
    cat_labels = np.concatenate([labels, np.asarray(mem.labels)])
    valid = np.concatenate([np.ones(5, bool), np.asarray(mem.valid)])
    np.testing.assert_allclose(
        got, _ref_supcon_anchors(cat, cat_labels, valid, 5, 0.5), rtol=1e-6)
    assert np.all(np.isfinite(grad))
    # No gradient flows into the memory.
    g_mem = jax.grad(lambda e: losses.supervised_contrastive_loss(
        jnp.asarray(x), jnp.asarray(labels),
        memory=mem._replace(embeddings=e)))(mem.embeddings)
    np.testing.assert_array_equal(g_mem, 0.0)


def test_memory_feature_size_mismatch():
  mem = losses.create_memory(4, 3)
  with pytest.raises(ValueError, match=r"feature size 3.*\(2, 5\)"):
    losses.nt_xent_loss(jnp.ones((2, 5)), jnp.arange(2), memory=mem)
  with pytest.raises(ValueError, match="feature size"):
    losses.enqueue_memory(mem, jnp.ones((2, 5)), jnp.arange(2))


@pytest.mark.parametrize("block_size", [None, 2])
def test_memory_labels_are_never_narrowed(block_size):
  x, _ = _batch(9, n=6, d=4, classes=3)
  old, _ = _batch(10, n=2, d=4, classes=3)
  # Class 300 lives only in the memory; int8 batch labels must not wrap it
  # onto class 44 (300 mod 256).
  mem = losses.enqueue_memory(losses.create_memory(4, 4), old,
                              jnp.array([300, 300]))
  batch = np.array([44, 44, 1, 1, 2, 2])
  for fn in (losses.batch_hard_triplet_loss,
             functools.partial(losses.supervised_contrastive_loss,
                               block_size=block_size)):
    if fn is losses.batch_hard_triplet_loss and block_size:
      continue
    want = fn(x, jnp.asarray(batch, jnp.int32), memory=mem)
    got = fn(x, jnp.asarray(batch, jnp.int8), memory=mem)
    np.testing.assert_allclose(got, want, rtol=1e-6)
  with jax.enable_x64(True):
    big = 2**32 + 1
    mem64 = losses.create_memory(4, 4)
    assert mem64.labels.dtype == jnp.int64
    mem64 = losses.enqueue_memory(mem64, jnp.asarray(old), jnp.array([big, big]))
    np.testing.assert_array_equal(mem64.labels[:2], [big, big])
    # An int32 memory refuses int64 labels instead of truncating them.
    with pytest.raises(TypeError, match="int64.*int32.*label_dtype"):
      losses.enqueue_memory(losses.create_memory(4, 4, label_dtype=jnp.int32),
                            jnp.asarray(old), jnp.array([big, big]))
  with pytest.raises(TypeError, match="integer"):
    losses.create_memory(4, 4, label_dtype=jnp.float32)
  with pytest.raises(TypeError, match="dtype must be a floating dtype"):
    losses.create_memory(4, 4, dtype=jnp.int32)
  # NumPy's default int64 labels, eagerly, without x64: what jit accepts.
  eager = losses.enqueue_memory(losses.create_memory(4, 4), np.asarray(old),
                                np.array([3, 4]))
  np.testing.assert_array_equal(eager.labels[:2], [3, 4])


def test_memory_training_loop_compiles_once():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(mem, x, labels):
    loss = losses.batch_hard_triplet_loss(x, labels, memory=mem)
    return losses.enqueue_memory(mem, x, labels), loss  # after the loss

  mem = losses.create_memory(16, 4)
  for i in range(5):
    x, labels = _batch(i, n=6, d=4, classes=3)
    mem, loss = step(mem, x, labels)
    assert np.isfinite(loss)
  assert int(mem.index) == (5 * 6) % 16


def test_memory_under_shard_map_stays_identical_on_every_device():
  from jax.sharding import AxisType  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  x, labels = _batch(6, n=16, d=4, classes=3)
  mem = losses.create_memory(20, 4)
  mem = losses.enqueue_memory(mem, x + 1.0, labels)

  def local(mem, x, labels):
    loss = losses.nt_xent_loss(x, labels, memory=mem, axis_name="data")
    return loss, losses.enqueue_memory(mem, x, labels, axis_name="data")

  f = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                    out_specs=(P(), P()))
  loss, new_mem = f(mem, x, labels)
  np.testing.assert_allclose(loss, losses.nt_xent_loss(x, labels, memory=mem),
                             rtol=1e-5)
  expected = losses.enqueue_memory(mem, x, labels)
  for a, b in zip(jax.tree.leaves(new_mem), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
