"""Losses across 8 devices equal the single-device loss of the global batch.

Runs on 8 fake CPU devices (tests/conftest.py sets XLA_FLAGS before JAX is
imported).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses

N_DEV = 8
PER_DEV = 3
D = 5

IN_BATCH = {
    "batch_all": functools.partial(losses.batch_all_triplet_loss, margin=0.7),
    "batch_hard": functools.partial(losses.batch_hard_triplet_loss,
                                    margin=0.7, metric="squared_euclidean"),
    "semi_hard": functools.partial(losses.semi_hard_triplet_loss, margin=0.7,
                                   metric="cosine"),
    "contrastive": functools.partial(losses.contrastive_loss, neg_margin=2.0),
    "nt_xent": functools.partial(losses.nt_xent_loss, temperature=0.3),
    "nt_xent_tiled": functools.partial(losses.nt_xent_loss, temperature=0.3,
                                       block_size=5),
    "supcon": functools.partial(losses.supervised_contrastive_loss,
                                temperature=0.3),
    "supcon_tiled": functools.partial(losses.supervised_contrastive_loss,
                                      temperature=0.3, block_size=7),
    "multi_similarity": functools.partial(losses.multi_similarity_loss,
                                          beta=10.0),
    "circle": functools.partial(losses.circle_loss, gamma=8.0),
}
PAIRED = {
    "info_nce": functools.partial(losses.info_nce_loss, temperature=0.3),
    "info_nce_symmetric": functools.partial(losses.info_nce_loss,
                                            temperature=0.3, symmetric=True),
    "info_nce_tiled": functools.partial(losses.info_nce_loss, temperature=0.3,
                                        block_size=5),
    "sigmoid": functools.partial(losses.sigmoid_contrastive_loss, scale=5.0,
                                 bias=-2.0),
    "sigmoid_tiled": functools.partial(losses.sigmoid_contrastive_loss,
                                       scale=5.0, bias=-2.0, block_size=2),
}

# Devices 0-2 hold only labels found nowhere else (their anchors have no
# positive, so devices hold different numbers of valid anchors); the others
# hold random labels, shared across devices.
LAYOUTS = {
    "mixed": np.concatenate([
        100 + np.arange(3 * PER_DEV),
        np.random.default_rng(0).integers(0, 4, size=5 * PER_DEV)]),
}


def _mesh():
  # shard_map needs Auto axes: jax.make_mesh defaults to Explicit axes, with
  # which unsharded inputs are refused rather than resharded.
  return jax.make_mesh((N_DEV,), ("data",), axis_types=(AxisType.Auto,))


def _data(seed=0):
  x = np.random.default_rng(seed).normal(size=(N_DEV * PER_DEV, D))
  return jnp.asarray(x, jnp.float32)


def _assert_close(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("name", sorted(IN_BATCH))
def test_in_batch_loss_across_devices(name, layout):
  fn = IN_BATCH[name]
  x, labels = _data(), jnp.asarray(LAYOUTS[layout])
  value, grad = jax.value_and_grad(fn)(x, labels)

  # shard_map: the value is replicated (out_specs=P()), gradient exact.
  sharded = jax.shard_map(functools.partial(fn, axis_name="data"),
                          mesh=_mesh(), in_specs=(P("data"), P("data")),
                          out_specs=P())
  s_value, s_grad = jax.value_and_grad(sharded)(x, labels)
  _assert_close(s_value, value)
  _assert_close(s_grad, grad)

  # pmap: every device returns the global loss.
  pmapped = jax.pmap(functools.partial(fn, axis_name="data"), axis_name="data")
  split = lambda a: a.reshape((N_DEV, PER_DEV) + a.shape[1:])
  p_values = pmapped(split(x), split(labels))
  _assert_close(p_values, jnp.full((N_DEV,), value))
  p_grad = jax.grad(lambda x: jnp.mean(pmapped(split(x), split(labels))))(x)
  _assert_close(p_grad, grad)


@pytest.mark.parametrize("name", sorted(PAIRED))
def test_query_key_loss_across_devices(name):
  fn = PAIRED[name]
  q, k = _data(1), _data(2)
  value, grads = jax.value_and_grad(fn, argnums=(0, 1))(q, k)
  sharded = jax.shard_map(functools.partial(fn, axis_name="data"),
                          mesh=_mesh(), in_specs=(P("data"), P("data")),
                          out_specs=P())
  s_value, s_grads = jax.value_and_grad(sharded, argnums=(0, 1))(q, k)
  _assert_close(s_value, value)
  for a, b in zip(s_grads, grads):
    _assert_close(a, b)
  pmapped = jax.pmap(functools.partial(fn, axis_name="data"), axis_name="data")
  split = lambda a: a.reshape(N_DEV, PER_DEV, D)
  _assert_close(pmapped(split(q), split(k)), jnp.full((N_DEV,), value))
  p_grads = jax.grad(lambda q, k: jnp.mean(pmapped(split(q), split(k))),
                     argnums=(0, 1))(q, k)
  for a, b in zip(p_grads, grads):
    _assert_close(a, b)


@pytest.mark.parametrize("block_size", [None, 2])
def test_sigmoid_scale_and_bias_gradients_across_devices(block_size):
  """SigLIP learns its scale and bias: replicated, their gradient is global."""
  def fn(q, k, scale, bias, axis_name=None):
    return losses.sigmoid_contrastive_loss(q, k, scale=scale, bias=bias,
                                           block_size=block_size,
                                           axis_name=axis_name)
  args = (_data(1), _data(2), jnp.float32(5.0), jnp.float32(-2.0))
  value, grads = jax.value_and_grad(fn, argnums=(0, 1, 2, 3))(*args)
  sharded = jax.shard_map(functools.partial(fn, axis_name="data"),
                          mesh=_mesh(), in_specs=(P("data"), P("data"), P(),
                                                  P()), out_specs=P())
  s_value, s_grads = jax.value_and_grad(sharded, argnums=(0, 1, 2, 3))(*args)
  _assert_close(s_value, value)
  for a, b in zip(s_grads, grads):
    _assert_close(a, b)


def test_data_parallel_parameter_gradients_with_the_usual_recipes():
  # A linear encoder: the parameter gradient computed per device, then
  # averaged the way training steps do, equals the global-batch gradient.
  x, labels = _data(), jnp.asarray(LAYOUTS["mixed"])
  w = jnp.asarray(np.random.default_rng(3).normal(size=(D, 4)), jnp.float32)

  def loss(w, x, labels, axis_name=None):
    return losses.supervised_contrastive_loss(x @ w, labels,
                                              axis_name=axis_name)

  expected = jax.grad(loss)(w, x, labels)
  # shard_map: replicated w; JAX inserts the psum of its cotangent.
  in_shard = jax.shard_map(
      jax.grad(functools.partial(loss, axis_name="data")), mesh=_mesh(),
      in_specs=(P(), P("data"), P("data")), out_specs=P())
  _assert_close(in_shard(w, x, labels), expected)
  # pmap: per-device gradient, then pmean.
  def pmap_step(w, x, labels):
    g = jax.grad(functools.partial(loss, axis_name="data"))(w, x, labels)
    return jax.lax.pmean(g, "data")
  split = lambda a: a.reshape((N_DEV, PER_DEV) + a.shape[1:])
  g = jax.pmap(pmap_step, axis_name="data", in_axes=(None, 0, 0))(
      w, split(x), split(labels))
  _assert_close(g[0], expected)


def test_axis_name_outside_a_mapped_context_is_refused():
  x, labels = _data(), jnp.asarray(LAYOUTS["mixed"])
  with pytest.raises(ValueError, match="axis_name='data' is not bound"):
    losses.nt_xent_loss(x, labels, axis_name="data")
  with pytest.raises(ValueError, match="not bound"):
    losses.info_nce_loss(x, x, axis_name="data")


def test_tiled_losses_across_devices_use_a_ring_not_a_gather():
  x, labels = _data(), jnp.asarray(LAYOUTS["mixed"])

  def hlo(fn, *args):
    sharded = jax.shard_map(functools.partial(fn, axis_name="data"),
                            mesh=_mesh(), in_specs=(P("data"), P("data")),
                            out_specs=P())
    return jax.jit(jax.value_and_grad(sharded)).lower(*args).as_text()

  for name in ("nt_xent_tiled", "supcon_tiled"):
    text = hlo(IN_BATCH[name], x, labels)
    assert "collective_permute" in text, name
    assert "all_gather" not in text, name
  for name in ("info_nce_tiled", "sigmoid_tiled"):
    text = hlo(PAIRED[name], x, x)
    assert "collective_permute" in text and "all_gather" not in text, name
  # The untiled loss gathers (so the assertion above can fail).
  assert "all_gather" in hlo(IN_BATCH["nt_xent"], x, labels)
