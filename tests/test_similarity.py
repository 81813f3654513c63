"""contrastive_jax.similarity against float64 NumPy loops."""

import jax
import jax.numpy as jnp
import jax.test_util as jtu
import numpy as np
import pytest

from contrastive_jax import similarity as sim



def _ref_euclidean(x, y):
  return np.sqrt(sum((a - b) ** 2 for a, b in zip(x, y)))


def _ref_cosine(x, y, eps=1e-8):
  nx, ny = np.sqrt(np.sum(x * x)), np.sqrt(np.sum(y * y))
  if nx <= eps or ny <= eps:
    return 0.0
  return float(np.dot(x, y) / (nx * ny))


def _ref_pearson(x, y, eps=1e-8):
  return _ref_cosine(x - x.mean(), y - y.mean(), eps)


def _ref_hamming(x, y):
  return sum((a >= 0) != (b >= 0) for a, b in zip(x, y))


REFERENCES = {
    "euclidean": (sim.euclidean_distance, sim.pairwise_euclidean_distance,
                  _ref_euclidean),
    "squared_euclidean": (
        lambda x, y: sim.euclidean_distance(x, y, squared=True),
        lambda x, y=None: sim.pairwise_euclidean_distance(x, y, squared=True),
        lambda x, y: _ref_euclidean(x, y) ** 2),
    "cosine": (sim.cosine_similarity, sim.pairwise_cosine_similarity,
               _ref_cosine),
    "pearson": (sim.pearson_correlation, sim.pairwise_pearson_correlation,
                _ref_pearson),
    "dot": (sim.dot_product, sim.pairwise_dot_product,
            lambda x, y: float(sum(a * b for a, b in zip(x, y)))),
    "hamming": (sim.hamming_distance, sim.pairwise_hamming_distance,
                _ref_hamming),
}


def _loop_matrix(ref, x, y):
  return np.array([[ref(a, b) for b in y] for a in x])


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_pairwise_and_elementwise_match_reference_float64(name):
  elementwise, pairwise, ref = REFERENCES[name]
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = rng.normal(size=(7, 5))
    y = rng.normal(size=(4, 5))
    expected = _loop_matrix(ref, x, y)
    np.testing.assert_allclose(pairwise(jnp.asarray(x), jnp.asarray(y)),
                               expected, rtol=1e-6, atol=1e-9)
    # y=None means y = x.
    np.testing.assert_allclose(pairwise(jnp.asarray(x)),
                               _loop_matrix(ref, x, x), rtol=1e-6, atol=1e-7)
    # Element-wise broadcasting agrees with the pairwise kernel.
    np.testing.assert_allclose(
        elementwise(jnp.asarray(x)[:, None, :], jnp.asarray(y)[None, :, :]),
        expected, rtol=1e-6, atol=1e-9)
    # vmap of the element-wise measure agrees too.
    vm = jax.vmap(jax.vmap(elementwise, (None, 0)), (0, None))
    np.testing.assert_allclose(vm(jnp.asarray(x), jnp.asarray(y)), expected,
                               rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_float32_and_bfloat16_compute_in_float32(name):
  _, pairwise, ref = REFERENCES[name]
  x = np.random.default_rng(1).normal(size=(6, 8)).astype(np.float32)
  out = pairwise(jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.float32
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(out, _loop_matrix(ref, xb, xb), rtol=1e-4,
                             atol=1e-4)
  assert pairwise(jnp.asarray(x)).dtype == jnp.float32


def test_euclidean_gradient_is_zero_where_points_coincide():
  x = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0]])
  g = jax.grad(lambda x: jnp.sum(sim.pairwise_euclidean_distance(x)))(x)
  assert np.all(np.isfinite(g))
  g = jax.grad(lambda x: sim.euclidean_distance(x, x)[0])(x)
  np.testing.assert_array_equal(g, 0.0)
  # Distinct points still get the true gradient: d|a-b|/da = (a-b)/|a-b|.
  a, b = jnp.array([[3.0, 4.0]]), jnp.array([[0.0, 0.0]])
  ga = jax.grad(lambda a: sim.pairwise_euclidean_distance(a, b)[0, 0])(a)
  np.testing.assert_allclose(ga, [[0.6, 0.8]], rtol=1e-6)


@pytest.mark.parametrize("fn", [sim.pairwise_cosine_similarity,
                                sim.pairwise_pearson_correlation])
def test_zero_and_constant_vectors_give_zero_similarity_and_finite_grads(fn):
  x = jnp.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [2.0, 2.0, 2.0]])
  s = fn(x)
  assert s[0, 1] == 0.0 and s[0, 0] == 0.0
  if fn is sim.pairwise_pearson_correlation:
    assert s[2, 1] == 0.0
  g = jax.grad(lambda x: jnp.sum(fn(x)))(x)
  assert np.all(np.isfinite(g))
  # Exactly zero, not 1/eps: a zero row must not swamp the others' gradients.
  np.testing.assert_array_equal(g[0], 0.0)
  if fn is sim.pairwise_pearson_correlation:
    np.testing.assert_array_equal(g[2], 0.0)
  g16 = jax.grad(lambda x: jnp.sum(fn(x)))(x.astype(jnp.float16))
  assert np.all(np.isfinite(np.asarray(g16, np.float32)))


def test_hamming_counts_sign_disagreements():
  codes = jnp.array([[1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, 1.0, -1.0]])
  np.testing.assert_array_equal(sim.pairwise_hamming_distance(codes),
                                [[0, 2], [2, 0]])
  assert sim.hamming_distance(codes[0], codes[1]) == 2


def test_check_grads_float64():
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    x = jnp.asarray(rng.normal(size=(4, 3)))
    y = jnp.asarray(rng.normal(size=(5, 3)))
    for fn in (sim.pairwise_euclidean_distance, sim.pairwise_cosine_similarity,
               sim.pairwise_pearson_correlation, sim.pairwise_dot_product):
      jtu.check_grads(fn, (x, y), order=2, modes=("rev",))


def test_pairwise_kernels_never_build_n_m_d():
  x = jnp.ones((64, 32))
  for fn in (sim.pairwise_euclidean_distance, sim.pairwise_cosine_similarity,
             sim.pairwise_pearson_correlation, sim.pairwise_hamming_distance):
    hlo = jax.jit(fn).lower(x, x).as_text()
    assert "64x64x32" not in hlo, fn.__name__


@pytest.mark.parametrize("x,y,err", [
    (np.ones((3, 4)), np.ones((3, 5)), ValueError),
    (np.ones((3,)), np.ones((3, 3)), ValueError),
    (np.ones((2, 3, 4)), None, ValueError),
    (np.ones((3, 4), np.int32), None, TypeError),
])
def test_bad_input_is_refused(x, y, err):
  with pytest.raises(err, match=r"shape|dtype"):
    sim.pairwise_euclidean_distance(jnp.asarray(x),
                                    None if y is None else jnp.asarray(y))


def test_elementwise_bad_input():
  with pytest.raises(ValueError, match="feature size"):
    sim.cosine_similarity(jnp.ones((3, 4)), jnp.ones((3, 5)))
  with pytest.raises(TypeError, match="dtype"):
    sim.dot_product(jnp.ones(3, jnp.int32), jnp.ones(3))
