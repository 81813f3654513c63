"""The CPU-fast convolution gradient equals lax's, including inside shard_map."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P

from contrastive_jax.models.conv import conv_general_dilated

_NHWC = ("NHWC", "HWIO", "NHWC")


def _data(x_shape, w_shape, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=x_shape), dtype)
  w = jnp.asarray(rng.normal(size=w_shape) / np.sqrt(np.prod(w_shape[:3])), dtype)
  return x, w


def _value_and_grads(conv, x, w, **kw):
  def loss(x, w):
    y = conv(x, w, dimension_numbers=_NHWC, **kw)
    # A non-uniform cotangent: sum(y * y) weighs every output differently.
    return jnp.sum(jnp.square(y.astype(jnp.float32))), y
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, w)


@pytest.mark.parametrize("x_shape,w_shape,kw", [
    ((3, 8, 8, 4), (3, 3, 4, 5), dict(window_strides=(1, 1), padding="SAME")),
    ((2, 7, 6, 1), (3, 3, 1, 3), dict(window_strides=(1, 1), padding="VALID")),
    ((2, 5, 5, 3), (1, 1, 3, 2), dict(window_strides=(1, 1), padding=((0, 0), (0, 0)))),
    ((2, 6, 6, 2), (3, 3, 2, 2), dict(window_strides=(1, 1), padding=((2, 0), (1, 1)))),
    # Not the custom path (stride 2): must still be exactly lax's.
    ((2, 8, 8, 3), (3, 3, 3, 4), dict(window_strides=(2, 2), padding="SAME")),
])
def test_matches_lax(x_shape, w_shape, kw):
  x, w = _data(x_shape, w_shape)
  (_, y), g = _value_and_grads(conv_general_dilated, x, w, **kw)
  (_, y_ref), g_ref = _value_and_grads(lax.conv_general_dilated, x, w, **kw)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-5)


def test_float64_kernel_gradient_is_float64_exact():
  # The matmul accumulates in the inputs' precision: float32 accumulation
  # left float64 gradients 5e-8 off.
  kw = dict(window_strides=(1, 1), padding="SAME")
  with jax.enable_x64(True):
    x, w = _data((2, 6, 5, 3), (3, 3, 3, 4), jnp.float64)
    _, g = _value_and_grads(conv_general_dilated, x, w, **kw)
    _, g_ref = _value_and_grads(lax.conv_general_dilated, x, w, **kw)
    assert g[1].dtype == jnp.float64
    np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-12, atol=1e-13)


def test_bfloat16_kernel_gradient_dtype_and_value():
  x, w = _data((2, 6, 6, 4), (3, 3, 4, 4), jnp.bfloat16)
  kw = dict(window_strides=(1, 1), padding="SAME")
  _, g = _value_and_grads(conv_general_dilated, x, w, **kw)
  _, g_ref = _value_and_grads(lax.conv_general_dilated, x.astype(jnp.float32),
                              w.astype(jnp.float32), **kw)
  assert g[1].dtype == jnp.bfloat16
  rel = jnp.linalg.norm(g[1].astype(jnp.float32) - g_ref[1]) / jnp.linalg.norm(g_ref[1])
  assert rel < 2e-2, rel


def test_shard_map_kernel_gradient_is_the_global_one():
  # Images sharded over 4 devices, kernel replicated: the gradient w.r.t. the
  # kernel must be the sum over devices (autodiff's psum), as for lax's conv.
  mesh = jax.make_mesh((4,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  x, w = _data((8, 6, 6, 3), (3, 3, 3, 4))

  def grads(conv):
    def per_device(x, w):
      y = conv(x, w, (1, 1), "SAME", dimension_numbers=_NHWC)
      return lax.psum(jnp.sum(y * y), "data")
    f = jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P()), out_specs=P())
    return jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)

  g, g_ref = grads(conv_general_dilated), grads(lax.conv_general_dilated)
  np.testing.assert_allclose(g[0], g_ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g[1], g_ref[1], rtol=1e-4, atol=1e-5)


def test_vmap_over_a_batch_of_kernels():
  x, _ = _data((2, 5, 5, 3), (3, 3, 3, 2))
  ws = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3, 3, 3, 2)), jnp.float32)

  def kernel_grad(conv, w):
    f = lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=_NHWC) ** 2)
    return jax.grad(f)(w)

  got = jax.jit(jax.vmap(functools.partial(kernel_grad, conv_general_dilated)))(ws)
  want = jax.jit(jax.vmap(functools.partial(kernel_grad, lax.conv_general_dilated)))(ws)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
