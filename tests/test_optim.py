"""airbench's optimizer features: the warmup-linear schedule, per-group SGD
(decay of every parameter, scaled BatchNorm-bias gradients), parameters
frozen after some epochs, and lookahead in the train step.

Each is checked against a NumPy transcription of the PyTorch reference
(airbench96.py and ``torch.optim.SGD``), on small float32 trees on CPU.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from contrastive_jax import training
from contrastive_jax.training import optim
from experiments.benchmarks import airbench_parity


@pytest.fixture(scope="module", autouse=True)
def cheap_compilation():
  """As tests/test_training.py: XLA:CPU without LLVM optimisations."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def _opt(**kw):
  base = dict(name="sgd", learning_rate=1.0, momentum=0.9, weight_decay=0.0,
              schedule="constant", warmup_steps=0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


# ---------------------------------------------------------------- schedule


# airbench96's ``get_lr`` (the multiplier of the learning rate), as the
# PyTorch side of the airbench parity benchmark runs it.
_airbench_get_lr = airbench_parity.lr_factor


def test_warmup_linear_is_airbench_get_lr():
  total, peak = 50, 2.5
  c = _opt(learning_rate=peak, schedule="warmup_linear",
           warmup_steps=int(0.1 * total), warmup_init_factor=0.2,
           end_lr_factor=0.0)
  sched = optim.make_schedule(c, total_steps=total, batch_size=1024)
  got = np.array([float(sched(s)) for s in range(total + 1)])
  want = np.array([_airbench_get_lr(s, total) * peak
                   for s in range(total + 1)])
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  assert float(sched(total + 7)) == 0.0  # stays at the end value
  # warmup_epochs, an end factor, and the default start at 0.
  c = _opt(learning_rate=1.0, schedule="warmup_linear", warmup_epochs=2.0,
           end_lr_factor=0.1)
  sched = optim.make_schedule(c, total_steps=20, batch_size=8,
                              steps_per_epoch=3)
  want = [s / 6 if s < 6 else 1.0 + (0.1 - 1.0) * (s - 6) / 14
          for s in range(21)]
  np.testing.assert_allclose([float(sched(s)) for s in range(21)], want,
                             rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="warmup_linear"):
    optim.make_schedule(_opt(schedule="triangle"), total_steps=5,
                        batch_size=8)


# ------------------------------------------------------ per-group SGD


def _tiny_params(rng):
  def away_from_zero(*shape):
    return (rng.uniform(0.5, 1.5, shape) * rng.choice([-1, 1], shape)
            ).astype(np.float32)
  return {"conv": {"kernel": away_from_zero(3, 3, 2, 4)},
          "group0_norm1": {"bias": away_from_zero(4)},
          "whiten_bias": away_from_zero(4)}


def _torch_sgd_step(params, grads, bufs, *, lrs, wds, momentum):
  """``torch.optim.SGD.step`` (nesterov, no dampening), one group per leaf:
  ``d = g + wd p; buf = m buf + d (buf = d at first); d += m buf;
  p -= lr d``. A leaf whose gradient is None is skipped."""
  out, new_bufs = {}, {}
  for k, p in params.items():
    g = grads[k]
    if g is None:
      out[k], new_bufs[k] = p, bufs.get(k)
      continue
    d = g + wds[k] * p
    buf = d.copy() if bufs.get(k) is None else momentum * bufs[k] + d
    d = d + momentum * buf
    out[k], new_bufs[k] = p - lrs[k] * d, buf
  return out, new_bufs


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_sgd_reproduces_torch_param_groups():
  """airbench96's SGD: param groups (BatchNorm biases at 64x the learning
  rate and 1/64 the decay), coupled decay of every parameter, Nesterov,
  the summed loss, the warmup-linear schedule and the whitening bias frozen
  after 1.5 epochs, against our mean-loss SGD with the translated keys:
  ``learning_rate = lr * B``, ``weight_decay = wd / (lr * B)``,
  ``norm_bias_grad_scale = 64``, ``weight_decay_all``."""
  batch, momentum, total, steps, spe = 1024, 0.85, 10, 6, 2
  kilostep_scale = 1024 * (1 + 1 / (1 - momentum))
  lr = 9.0 / kilostep_scale
  wd = 0.012 * batch / kilostep_scale
  lr_biases = 64 * lr
  c = _opt(learning_rate=lr * batch, momentum=momentum, nesterov=True,
           weight_decay=wd / (lr * batch), weight_decay_all=True,
           norm_bias_grad_scale=64.0, schedule="warmup_linear",
           warmup_steps=int(0.1 * total), warmup_init_factor=0.2,
           freeze_after_epochs={"whiten_bias": 1.5})
  sched = optim.make_schedule(c, total_steps=total, batch_size=batch)
  tx = optim.make_optimizer(c, sched, steps_per_epoch=spe)
  rng = np.random.default_rng(0)
  params = _tiny_params(rng)
  grads = [jax.tree.map(lambda p: (0.01 * rng.standard_normal(p.shape)
                                   ).astype(np.float32), params)
           for _ in range(steps)]

  # torch, float64, summed-loss gradients.
  ref = {k: v.astype(np.float64) for k, v in _flat(params).items()}
  group_lr = {k: lr_biases if k == "group0_norm1/bias" else lr for k in ref}
  bufs = {}
  for t in range(steps):
    m = _airbench_get_lr(t, total)  # scheduler.step() after optimizer.step()
    g = {k: batch * v.astype(np.float64) for k, v in _flat(grads[t]).items()}
    if t >= int(1.5 * spe):  # requires_grad = False: grad is None
      g["whiten_bias"] = None
    ref, bufs = _torch_sgd_step(
        ref, g, bufs, lrs={k: group_lr[k] * m for k in ref},
        wds={k: wd / group_lr[k] for k in ref}, momentum=momentum)

  p = jax.tree.map(jnp.asarray, params)
  opt_state = tx.init(p)
  update = jax.jit(tx.update)
  for t in range(steps):
    u, opt_state = update(grads[t], opt_state, p)
    p = optax.apply_updates(p, u)
  got = _flat(p)
  for k in ref:
    np.testing.assert_allclose(got[k], ref[k], rtol=1e-6, err_msg=k)
  # The test has teeth: every leaf moved by much more than the tolerance.
  for k, v in _flat(params).items():
    assert np.max(np.abs(ref[k] - v) / np.abs(v)) > 1e-3, k


def test_defaults_keep_the_optimizer_state_structure():
  """Without the new keys: the chain (and the checkpointed state) of before."""
  c = _opt(weight_decay=1e-4, nesterov=True)
  params = _tiny_params(np.random.default_rng(0))
  old = optax.chain(optax.add_decayed_weights(1e-4, optim._decay_mask),  # pylint: disable=protected-access
                    optax.sgd(0.1, momentum=0.9, nesterov=True))
  new = optim.make_optimizer(c, 0.1)
  assert (jax.tree.structure(new.init(params))
          == jax.tree.structure(old.init(params)))
  g = jax.tree.map(np.ones_like, params)
  a = new.update(g, new.init(params), params)[0]
  b = old.update(g, old.init(params), params)[0]
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_norm_bias_detection():
  params = {"BatchNorm_0": {"bias": 0, "scale": 0},
            "group0_norm1": {"bias": 0}, "stem_NORM": {"bias": 0},
            "Dense_0": {"bias": 0, "kernel": 0}, "whiten_bias": 0,
            "backbone": {"whiten_bias": 0, "norm": {"kernel": 0}}}
  flagged = sorted(
      optim._path_str(path)  # pylint: disable=protected-access
      for path, _ in jax.tree_util.tree_leaves_with_path(params)
      if optim.is_norm_bias(path))
  assert flagged == ["BatchNorm_0/bias", "group0_norm1/bias", "stem_NORM/bias"]


# ------------------------------------------------------------ freezing


@pytest.mark.parametrize("name", ["sgd", "adam", "sgd_sam"])
def test_freeze_after_epochs(name):
  """``whiten_bias`` moves at updates 0..5 (2 epochs of 3 steps), then never;
  the other leaves keep moving. Also under SAM."""
  sam = name == "sgd_sam"
  c = _opt(name="sgd" if sam else name, learning_rate=0.1,
           freeze_after_epochs={"whiten_bias": 2}, sam_rho=0.05 if sam else 0.0)
  tx = optim.make_optimizer(c, 0.1, steps_per_epoch=3)
  rng = np.random.default_rng(1)
  p = jax.tree.map(jnp.asarray, _tiny_params(rng))
  target = jax.tree.map(lambda x: x + 1.0, p)
  grad_fn = jax.grad(lambda q: sum(jnp.sum(jnp.square(a - b)) for a, b in zip(
      jax.tree.leaves(q), jax.tree.leaves(target))))
  opt_state = tx.init(p)

  @jax.jit
  def step(p, opt_state):
    kw = {"grad_fn": lambda q, _: grad_fn(q)} if sam else {}
    u, opt_state = tx.update(grad_fn(p), opt_state, p, **kw)
    return optax.apply_updates(p, u), opt_state

  for t in range(10):
    new, opt_state = step(p, opt_state)
    moved = {k: not np.array_equal(a, b) for (k, a), b in zip(
        _flat(new).items(), _flat(p).values())}
    assert moved["whiten_bias"] == (t < 6), t
    assert moved["conv/kernel"] and moved["group0_norm1/bias"], t
    p = new


@pytest.mark.parametrize("bad, match", [
    (dict(freeze_after_epochs={"whiten_bias": -1}), "number of epochs >= 0"),
    (dict(freeze_after_epochs={"whiten_bias": "3"}), "number of epochs >= 0"),
    (dict(freeze_after_epochs=3), "must map parameter names"),
    (dict(norm_bias_grad_scale=0.0), "norm_bias_grad_scale must be"),
    (dict(norm_bias_grad_scale=float("nan")), "norm_bias_grad_scale must be"),
])
def test_bad_optimizer_values_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_opt(**bad), 0.1)


@pytest.mark.parametrize("key", ["weight_decay_all", "nesterov"])
def test_optimizer_switches_must_be_bools(key):
  with pytest.raises(TypeError, match=f"optimizer.{key} must be a bool"):
    optim.make_optimizer(_opt(**{key: "yes"}), 0.1)
  with pytest.raises(TypeError, match="optimizer.lr_batch_scaling must be a"):
    optim.peak_learning_rate(_opt(lr_batch_scaling=1), 256)


def test_freeze_key_naming_no_parameter_is_refused():
  tx = optim.make_optimizer(_opt(freeze_after_epochs={"whiten_bais": 3}), 0.1)
  with pytest.raises(ValueError, match="'whiten_bais' names no parameter"):
    tx.init(_tiny_params(np.random.default_rng(0)))
  with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1"):
    optim.make_optimizer(_opt(), 0.1, steps_per_epoch=0)


# ------------------------------------------------ masks, SAM, warmup, state


def test_weight_decay_mask_skips_biases_and_norms_unless_all():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2)}}
  zero = jax.tree.map(jnp.zeros_like, params)
  for decay_all, bias_step in ((False, 0.0), (True, -0.1)):
    tx = optim.make_optimizer(_opt(momentum=0.0, weight_decay=0.1,
                                   weight_decay_all=decay_all), 1.0)
    u = tx.update(zero, tx.init(params), params)[0]
    np.testing.assert_allclose(u["dense"]["kernel"], -0.1)
    np.testing.assert_allclose(u["dense"]["bias"], bias_step)
    np.testing.assert_allclose(u["norm"]["scale"], bias_step)


def test_sam_with_a_zero_gradient_stays_finite():
  tx = optim.make_optimizer(_opt(learning_rate=0.1, sam_rho=0.05), 0.1)
  params = {"w": jnp.zeros(3)}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
  u = tx.update(grad_fn(params), tx.init(params), params,
                grad_fn=lambda p, _: grad_fn(p))[0]
  np.testing.assert_array_equal(u["w"], 0.0)  # was NaN: g / ||g|| at g = 0


def test_warmup_fraction_follows_the_run_length():
  for total in (50, 80):
    sched = optim.make_schedule(
        _opt(schedule="warmup_linear", warmup_fraction=0.1,
             warmup_init_factor=0.2, learning_rate=1.0),
        total_steps=total, batch_size=1)
    np.testing.assert_allclose([float(sched(s)) for s in range(total)],
                               [_airbench_get_lr(s, total) for s in range(total)],
                               rtol=1e-6, atol=1e-7)
  with pytest.raises(ValueError, match="warmup_fraction"):
    optim.make_schedule(_opt(warmup_fraction=1.5), total_steps=10, batch_size=1)


def test_a_state_with_an_average_can_be_donated():
  from contrastive_jax import models  # pylint: disable=g-import-not-at-top
  model = models.MLP(hidden_dims=(3,), output_dim=2)
  tx = optax.sgd(0.1)
  state = training.create_train_state(model, tx, sample_input=np.zeros((1, 4)),
                                      key=jax.random.key(0), ema=True)
  # One buffer donated twice was an error when the average aliased params.
  out = jax.jit(lambda s: s.replace(step=s.step + 1), donate_argnums=0)(state)
  assert int(out.step) == 1
