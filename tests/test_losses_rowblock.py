"""The row-blocked NT-Xent path (contrastive_jax/losses/_rowblock.py).

The library takes it only from batch 1024 up; here its threshold and block
are lowered so that a batch of 32 runs in blocks of 8, and it is compared
with the dense path (``softmax._symmetric_sum``), which it replaces, and
with a float64 NumPy reference. Each path is compiled once for all cases.
"""

import functools

import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from contrastive_jax import losses
from contrastive_jax.losses import _rowblock
from contrastive_jax.losses import softmax

B, D, BLOCK = 32, 16, 8


def ref_nt_xent(x, labels, t):
  """float64, vectorised: mean over positive pairs of softplus(lse_neg - s)."""
  x = np.asarray(x, np.float64)
  n = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
  s = n @ n.T / t
  same = labels[:, None] == labels[None, :]
  pos = same & ~np.eye(len(x), dtype=bool)
  masked = np.where(same, -np.inf, s)
  m = np.max(masked, axis=1, keepdims=True)
  with np.errstate(divide="ignore", invalid="ignore"):
    lse = np.where(np.isfinite(m), np.log(np.sum(np.exp(
        masked - np.where(np.isfinite(m), m, 0.0)), axis=1, keepdims=True))
                   + m, -np.inf)
    pair = np.logaddexp(0.0, lse - s)
  return float(np.sum(pair[pos]) / max(np.sum(pos), 1))


def _loss(x, labels, temperature):
  # The body of nt_xent_loss, unjitted, so that each trace below sees the
  # module constants of its own path.
  return softmax._in_batch("nt_xent", x, labels, temperature, None, None,
                           None)


@pytest.fixture
def rowblock_on(monkeypatch):
  monkeypatch.setattr(_rowblock, "_MIN_BATCH", B)
  monkeypatch.setattr(_rowblock, "_BLOCK_SIZE", BLOCK)


def _compile(rowblock, dtype=jnp.float32):
  fn = jax.jit(jax.value_and_grad(_loss, argnums=(0, 2)))
  args = (jax.ShapeDtypeStruct((B, D), dtype),
          jax.ShapeDtypeStruct((B,), jnp.int32),
          jax.ShapeDtypeStruct((), dtype))
  with pytest.MonkeyPatch.context() as mp:
    if rowblock:
      mp.setattr(_rowblock, "_MIN_BATCH", B)
      mp.setattr(_rowblock, "_BLOCK_SIZE", BLOCK)
    lowered = fn.lower(*args)
  # The row-blocked path is the one with a loop (its lax.scan).
  assert ("stablehlo.while" in lowered.as_text()) == rowblock
  return lowered.compile()


@functools.cache
def _compiled():
  return _compile(rowblock=False), _compile(rowblock=True)


def _cases():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(B, D)).astype(np.float32)
  dup_zero = np.repeat(x[:B // 2], 2, axis=0)
  dup_zero[:3] = 0.0
  half = np.arange(B // 2)
  return {
      "random_labels": (x, rng.integers(0, 6, size=B), 0.3),
      "simclr": (x, np.concatenate([half, half]), 0.1),
      "singletons": (x, np.concatenate([np.arange(12), np.arange(12),
                                        100 + np.arange(8)]), 0.3),
      "no_positives": (x, np.arange(B), 0.3),
      "one_class": (x, np.zeros(B, np.int64), 0.3),
      "duplicates_and_zeros": (dup_zero, rng.integers(0, 4, size=B), 0.3),
      "low_temperature_large_norm": (1e4 * x, rng.integers(0, 6, size=B),
                                     0.01),
  }


@pytest.mark.parametrize("case", list(_cases()))
def test_rowblock_matches_dense_path_and_reference(case):
  x, labels, t = _cases()[case]
  args = (jnp.asarray(x), jnp.asarray(labels, jnp.int32), jnp.float32(t))
  dense, rowblock = (f(*args) for f in _compiled())
  (value, (dx, dt)), (r_value, (r_dx, r_dt)) = dense, rowblock
  expected = ref_nt_xent(x, labels, t)
  np.testing.assert_allclose(r_value, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(r_value, value, rtol=1e-6, atol=1e-7)
  scale = max(float(jnp.max(jnp.abs(dx))), 1e-30)
  np.testing.assert_allclose(r_dx / scale, dx / scale, atol=1e-5)
  np.testing.assert_allclose(r_dt, dt, rtol=1e-5, atol=1e-7)
  assert np.all(np.isfinite(r_dx)) and np.isfinite(r_dt)
  if case in ("no_positives", "one_class"):
    assert r_value == 0.0 and not np.any(r_dx) and r_dt == 0.0


def test_rowblock_check_grads_float64(rowblock_on):
  rng = np.random.default_rng(1)
  labels = jnp.asarray(np.concatenate([rng.integers(0, 5, size=B - 4),
                                       [10, 11, 12, 13]]), jnp.int32)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(B, 4)))
    t = jnp.float64(0.3)
    fn = jax.jit(lambda x, t: _loss(x, labels, t))
    assert "stablehlo.while" in fn.lower(x, t).as_text()
    np.testing.assert_allclose(fn(x, t), ref_nt_xent(x, labels, 0.3),
                               rtol=1e-12)
    jtu.check_grads(fn, (x, t), order=1, modes=("rev",), atol=1e-6,
                    rtol=1e-6)


def test_public_loss_takes_rowblock_path_from_batch_1024():
  def lowered(batch):
    return losses.nt_xent_loss.lower(
        jax.ShapeDtypeStruct((batch, 8), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.int32)).as_text()
  assert "stablehlo.while" in lowered(1024)
  assert "stablehlo.while" not in lowered(1000)
  assert _rowblock.block_size(1024) == _rowblock._BLOCK_SIZE
  assert _rowblock.block_size(1000) is None
