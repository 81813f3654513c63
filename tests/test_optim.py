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
from contrastive_jax.training import step as step_lib


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


def _airbench_get_lr(step, total):
  """airbench96's ``get_lr`` (the multiplier of the learning rate)."""
  warmup_steps = int(0.1 * total)
  if step < warmup_steps:
    frac = step / warmup_steps
    return 0.2 * (1 - frac) + 1.0 * frac
  return (total - step) / (total - warmup_steps)


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
      "/".join(optim._names(path))  # pylint: disable=protected-access
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
    (dict(weight_decay_all="yes"), "weight_decay_all must be a bool"),
])
def test_bad_optimizer_values_are_refused(bad, match):
  with pytest.raises(ValueError, match=match):
    optim.make_optimizer(_opt(**bad), 0.1)


def test_freeze_key_naming_no_parameter_is_refused():
  tx = optim.make_optimizer(_opt(freeze_after_epochs={"whiten_bais": 3}), 0.1)
  with pytest.raises(ValueError, match="'whiten_bais' names no parameter"):
    tx.init(_tiny_params(np.random.default_rng(0)))
  with pytest.raises(ValueError, match="steps_per_epoch must be >= 1"):
    optim.make_optimizer(_opt(), 0.1, steps_per_epoch=0)


# ----------------------------------------------------------- lookahead


class _AirbenchLookahead:
  """airbench96's ``LookaheadState`` and its calls, in NumPy."""

  def __init__(self, net, total):
    self.ema = {k: v.copy() for k, v in net.items()}
    self.alpha = 0.95 ** 5 * (np.arange(total + 1) / total) ** 3
    self.total = total

  def update(self, net, decay):
    for k, v in net.items():
      if v.dtype.kind == "f":
        self.ema[k] += (1 - decay) * (v - self.ema[k])  # lerp_(net, 1-decay)
        net[k] = self.ema[k].copy()

  def after_step(self, net, current_steps):
    if current_steps % 5 == 0:
      self.update(net, self.alpha[current_steps])
    if current_steps >= self.total:
      self.update(net, 1.0)


@pytest.mark.parametrize("total", [12, 10])
def test_lookahead_update_is_airbench(total):
  """12: the last step is no sync step; 10: the periodic update, then the
  final one, on the same step."""
  rng = np.random.default_rng(2)
  fast = {"params": {"w": rng.standard_normal((3, 2)).astype(np.float32)},
          "batch_stats": {"mean": rng.standard_normal(2).astype(np.float32),
                          "count": np.arange(2, dtype=np.int32)}}
  slow = jax.tree.map(np.copy, fast)
  ref_net = {k: v.astype(np.float64) if v.dtype.kind == "f" else v.copy()
             for k, v in _flat(fast).items()}
  ref = _AirbenchLookahead(ref_net, total)
  update = jax.jit(lambda f, s, t: step_lib.lookahead_update(
      f, s, t, total_steps=total, period=5, decay=0.95 ** 5, power=3.0))
  synced = []
  for t in range(1, total + 1):
    delta = jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) if x.dtype.kind == "f" else
                   np.ones(x.shape)).astype(x.dtype), fast)
    fast = jax.tree.map(lambda x, d: np.asarray(x) + d, fast, delta)  # "SGD"
    for k, d in _flat(delta).items():
      ref_net[k] = ref_net[k] + d
    ref.after_step(ref_net, t)
    fast, slow = update(fast, slow, jnp.int32(t))
    for k, v in _flat(fast).items():
      np.testing.assert_allclose(v, ref_net[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"fast {k} at step {t}")
    for k, v in _flat(slow).items():
      if k != "batch_stats/count":  # not float: airbench keeps no copy
        np.testing.assert_allclose(v, ref.ema[k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"slow {k} at step {t}")
    synced.append(all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(fast["params"]), jax.tree.leaves(slow["params"]))))
  assert synced == [t % 5 == 0 or t == total for t in range(1, total + 1)]
  # The integer leaf is the fast one's, untouched.
  np.testing.assert_array_equal(fast["batch_stats"]["count"],
                                np.arange(2) + total)


def _lookahead_digits(**kw):
  """tests/test_training.py's ``_small_digits``, 5 steps, lookahead every 2."""
  from experiments.configs import digits  # pylint: disable=g-import-not-at-top
  c = digits.get_config()
  c.model.backbone = "mlp"
  c.model.backbone_kwargs = dict(hidden_dims=(32,), output_dim=16)
  c.model.projection_dim = 8
  c.model.projection_hidden_dim = 16
  c.batch_size = 64
  c.num_steps = 5
  c.eval.final = False
  c.progress_bar = False
  c.log_every = 1
  c.optimizer.warmup_steps = 3
  c.ema_decay = 0.0
  c.lookahead_period = 2
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_lookahead_train_step_ends_on_the_slow_weights(tmp_path):
  """A 5-step digits run on 8 devices (lookahead every 2 steps, airbench's
  SGD options): synced at steps 2, 4, 5 only, the last sync (decay 1) keeps
  the slow weights, one compilation (the step is guarded), and the run
  trains. ``backbone/output`` is frozen after 0.15 epochs of 19 steps:
  updated at steps 1 and 2 only (the loop passes ``steps_per_epoch``)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  c = _lookahead_digits()
  c.optimizer.update(dict(
      name="sgd", learning_rate=0.1, momentum=0.85, nesterov=True,
      weight_decay=1e-3, weight_decay_all=True, norm_bias_grad_scale=64.0,
      schedule="warmup_linear", warmup_steps=1, warmup_init_factor=0.2,
      freeze_after_epochs={"backbone/output": 0.15}))
  c.checkpoint.every_steps = 1
  c.checkpoint.keep = 10
  c.checkpoint.async_save = False
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["status"] == "completed" and res["step"] == 5
  assert np.isfinite(res["final_loss"])
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                               item_names=("state", "meta"))
  states = {s: mngr.restore(s, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"] for s in range(1, 6)}
  mngr.close()

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                    jax.tree.leaves(b)))

  for s, st in states.items():
    assert st["ema"]["batch_stats"], "BatchNorm statistics are in the copy"
    synced = same(st["params"], st["ema"]["params"]) and same(
        st["batch_stats"], st["ema"]["batch_stats"])
    assert synced == (s in (2, 4, 5)), s
  # The slow weights move at the sync steps only.
  assert not same(states[1]["ema"]["params"], states[2]["ema"]["params"])
  assert same(states[2]["ema"], states[3]["ema"])
  assert not same(states[3]["ema"]["params"], states[4]["ema"]["params"])
  # The final update (decay 1.0) keeps the slow weights and resets the fast.
  assert same(states[5]["ema"], states[4]["ema"])
  assert not same(states[5]["ema"]["params"], states[1]["ema"]["params"])
  frozen = [st["params"]["backbone"]["output"] for s, st in
            sorted(states.items())]
  assert not same(frozen[0], frozen[1])
  assert all(same(frozen[1], f) for f in frozen[2:])
  assert not same(states[2]["params"]["backbone"]["hidden_0"],
                  states[3]["params"]["backbone"]["hidden_0"])


def test_lookahead_config_errors():
  with pytest.raises(ValueError, match="ema_decay > 0 and lookahead_period"):
    training.make_train_step(None, None, None,
                             _lookahead_digits(ema_decay=0.9), None,
                             total_steps=5)
  with pytest.raises(ValueError, match="needs the run's total_steps"):
    training.make_train_step(None, None, None, _lookahead_digits(), None)
  with pytest.raises(ValueError, match="lookahead_period must be an integer"):
    step_lib.lookahead_settings(_lookahead_digits(lookahead_period=-1))
  with pytest.raises(ValueError, match=r"lookahead_decay must be in \[0, 1\]"):
    step_lib.lookahead_settings(_lookahead_digits(lookahead_decay=1.5))
  assert step_lib.lookahead_settings(_lookahead_digits()) == (
      2, 0.95 ** 5, 3.0)
  # Off by default; then ema_decay is free.
  assert step_lib.lookahead_settings(ml_collections.ConfigDict(
      dict(ema_decay=0.9)))[0] == 0


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
