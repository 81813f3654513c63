"""The data-parallel training step: ``(state, batch) -> (state, metrics)``.

The per-device program is written with ``jax.shard_map`` over the mesh axis
``"data"``: the state is replicated (``P()``), the batch split (``P("data")``).
Inside it:

* the model runs with BatchNorm synchronised over ``"data"`` (the model is
  built with ``axis_name="data"``), so statistics are those of the global
  batch, as SimCLR's global BN;
* the metric loss gets ``axis_name="data"``: each device contrasts its anchors
  with the candidates of every device and returns the loss of the *global*
  batch. Per-device means (cross-entropy, reconstruction) are ``pmean``-ed, so
  the objective is the global-batch objective on every device;
* the parameters are replicated (*invariant* over ``"data"``), so JAX's
  varying-axes typing makes ``jax.grad`` of that global objective the exact
  global gradient (the transpose of the implicit broadcast of the params is a
  ``psum``). The gradient is therefore *not* averaged again: an extra
  ``pmean`` would be a no-op on an invariant value, and a ``psum`` would
  multiply it by the device count. ``tests/test_training.py`` checks that 8
  devices give the parameters of 1 device on the same global batch.

Randomness is ``fold_in(fold_in(key, step), device)``: nothing random is
carried in the state, so a resumed step draws what the uninterrupted one did.

After the optimizer update the step keeps one of two weight copies in
``state.ema`` (``{"params", "batch_stats"}``), which evaluation uses:

* ``ema_decay > 0``: an exponential moving average of the weights
  (``ema_rate``);
* ``lookahead_period > 0``: airbench's lookahead (``lookahead_update``):
  every ``lookahead_period`` steps the slow copy moves towards the trained
  weights and the trained weights are reset to it; after the last step the
  trained weights are the slow ones.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from contrastive_jax import losses
from contrastive_jax import models
from contrastive_jax._checks import check_int
from contrastive_jax.training import optim
from contrastive_jax.training import registry
from contrastive_jax.training.state import TrainState

__all__ = ["AXIS", "RetraceError", "ema_rate", "flatten_views",
           "guard_traces", "lookahead_settings", "lookahead_update",
           "make_train_step"]

AXIS = "data"


def flatten_views(images: jax.Array, labels: jax.Array):
  """``[B, V, H, W, C]`` -> view-major ``[V * B, H, W, C]`` and tiled labels.

  View-major order keeps ``x[:B]`` = view 0, ``x[B:2B]`` = view 1, which the
  paired losses (InfoNCE, sigmoid) read as queries and keys.
  """
  if images.ndim != 5:
    return images, labels, 1
  b, v = images.shape[:2]
  x = jnp.swapaxes(images, 0, 1).reshape((v * b,) + images.shape[2:])
  return x, jnp.tile(labels, v), v


def _ce(logits, labels, label_smoothing: float = 0.0):
  logits = logits.astype(jnp.float32)
  if not label_smoothing:
    # The integer-label form, as before the option existed: runs without
    # smoothing stay bit-identical, so their checkpoints resume exactly.
    return jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, labels))
  targets = optax.smooth_labels(
      jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
  return jnp.mean(optax.losses.softmax_cross_entropy(logits, targets))


def _accuracy(logits, labels):
  return jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))


def ema_rate(step: jax.Array, decay: float) -> jax.Array:
  """The weight-average decay at ``step``: ``min(decay, (1 + t) / (10 + t))``.

  The warm-up (``tf.train.ExponentialMovingAverage``'s ``num_updates``)
  makes the early average span about the last tenth of the steps so far,
  so it does not carry the random initial weights for ``1 / (1 - decay)``
  steps.
  """
  t = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def lookahead_settings(config) -> tuple[int, float, float]:
  """``(lookahead_period, lookahead_decay, lookahead_power)`` of ``config``.

  ``lookahead_period`` 0 (the default) turns lookahead off. Defaults:
  airbench96's ``0.95 ** 5`` and 3. Raises ``ValueError`` for bad values,
  or with ``ema_decay > 0`` too (both keep their weights in ``state.ema``).
  """
  period = config.get("lookahead_period", 0) or 0
  period = check_int("lookahead_period", period, 0)
  decay = float(config.get("lookahead_decay", 0.95 ** 5))
  power = float(config.get("lookahead_power", 3.0))
  if period:
    if not 0.0 <= decay <= 1.0:
      raise ValueError(f"lookahead_decay must be in [0, 1], got {decay}.")
    if not power >= 0.0:
      raise ValueError(f"lookahead_power must be >= 0, got {power}.")
    if float(config.get("ema_decay", 0.0)) > 0:
      raise ValueError(
          "ema_decay > 0 and lookahead_period > 0 both keep their weights in"
          " state.ema: set one of them to 0.")
  return period, decay, power


def lookahead_update(fast, slow, step, *, total_steps: int, period: int,
                     decay: float, power: float):
  """airbench's lookahead after optimizer step number ``step`` (from 1).

  ``fast``: the trained weights after that step; ``slow``: the slow copy
  (same tree). Every ``period`` steps, with ``d = decay * (step /
  total_steps) ** power``: ``slow += (1 - d) * (fast - slow)`` and ``fast =
  slow``. At ``step == total_steps`` also ``fast = slow`` (airbench's final
  ``update(decay=1.0)``, after the periodic one when both fall on that
  step), so training ends on the slow weights. Other steps change nothing.
  Only floating-point leaves are mixed, as airbench's; others keep ``fast``.
  Traceable (``step`` may be a traced scalar): returns ``(fast, slow)``.
  """
  t = jnp.asarray(step, jnp.int32)
  periodic = t % period == 0
  sync = periodic | (t == total_steps)
  frac = jnp.minimum(t.astype(jnp.float32) / float(total_steps), 1.0)
  d = jnp.where(periodic, decay * frac ** power, 1.0)

  def is_float(x):
    return jnp.issubdtype(x.dtype, jnp.floating)

  def mixed():
    new_slow = jax.tree.map(
        lambda f, s: s + (1.0 - d).astype(s.dtype) * (f - s) if is_float(f)
        else s, fast, slow)
    new_fast = jax.tree.map(lambda f, s: s if is_float(f) else f, fast,
                            new_slow)
    return new_fast, new_slow

  return lax.cond(sync, mixed, lambda: (fast, slow))


class RetraceError(RuntimeError):
  """A guarded jitted function was traced (and compiled) more often than allowed."""


def guard_traces(fn: Callable, *, max_traces: int, name: str) -> Callable:
  """``fn`` that raises ``RetraceError`` when traced more than ``max_traces`` times.

  Wrap the Python function before ``jax.jit``: jit calls it only to trace,
  so the count is the number of compilations. Same purpose as
  ``chex.assert_max_traces``, but counted per wrapped object: chex keys its
  counter by where the function is defined, so a second training run in the
  same process (a sweep, a notebook, the tests) would trip it. The error
  names the shapes of the arguments after the first (the state).
  """
  count = 0

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    nonlocal count
    count += 1
    if count > max_traces:
      shapes = jax.tree.map(lambda a: f"{a.dtype}{list(a.shape)}", args[1:])
      raise RetraceError(
          f"{name} was traced {count} times (at most {max_traces} allowed):"
          " each trace recompiles it. Its inputs changed shape, dtype or"
          f" structure between calls; this call got {shapes}.")
    return fn(*args, **kwargs)

  return wrapped


def check_loss_config(lc) -> None:
  """Raises a ValueError for ``config.loss`` settings the step would misread."""
  if lc.get("labels", "class") not in ("class", "instance"):
    raise ValueError("loss.labels must be 'class' or 'instance', got"
                     f" {lc.get('labels')!r}.")
  label_smoothing = float(lc.get("label_smoothing", 0.0))
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(
        f"loss.label_smoothing must be in [0, 1), got {label_smoothing}.")
  if label_smoothing and not float(lc.get("ce_weight", 0.0)):
    raise ValueError("loss.label_smoothing smooths the classifier's"
                     " cross-entropy: set loss.ce_weight > 0 as well.")


def make_train_step(model, tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], config,
                    mesh: Mesh, *, max_traces: int = 1,
                    total_steps: int | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """Jitted ``(state, batch) -> (state, metrics)``; ``state`` is donated.

  Args:
    model: ``ContrastiveModel`` built with ``axis_name="data"``.
    tx: the optax optimizer. When ``config.optimizer`` asks for SAM
      (``optim.is_sam``), its ``update`` also gets a ``grad_fn``: the
      gradient of the same batch's objective at the weights it is given.
    schedule: learning rate by step (reported in the metrics).
    config: the run's config (``loss``, ``model``, ``batch_size``).
    mesh: a mesh with a ``"data"`` axis.
    max_traces: compilations allowed before ``RetraceError`` (every batch
      has the same shapes, so one).
    total_steps: the run's number of steps; needed by lookahead
      (``config.lookahead_period > 0``, see ``lookahead_update``), whose
      state must keep ``ema`` (``create_train_state(..., ema=True)``).

  Returns:
    The step. ``batch`` is ``{"image": [B, (V,) H, W, C], "label": [B]}``
    sharded over ``"data"``; ``metrics`` are replicated scalars: ``loss`` (the
    training objective, without the probe), its terms, ``learning_rate``,
    ``grad_norm`` and, with an online probe, ``probe_loss`` and
    ``probe_accuracy``.
  """
  lc = config.loss
  check_loss_config(lc)
  loss_fn, paired = (registry.get_loss(lc.name) if lc.name else (None, False))
  loss_kwargs = registry._plain(lc.get("kwargs", {}) or {})  # pylint: disable=protected-access
  instance_labels = lc.get("labels", "class") == "instance"
  ce_weight = float(lc.get("ce_weight", 0.0))
  label_smoothing = float(lc.get("label_smoothing", 0.0))
  rec_weight = float(lc.get("reconstruction_weight", 0.0))
  quant_weight = float(lc.get("quantization_weight", 0.0))
  metric_weight = float(lc.get("weight", 1.0))
  use_memory = int(lc.get("memory_size", 0)) > 0
  ema_decay = float(config.get("ema_decay", 0.0))
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}.")
  la_period, la_decay, la_power = lookahead_settings(config)
  if la_period and not (total_steps and int(total_steps) > 0):
    raise ValueError("lookahead_period > 0 needs the run's total_steps:"
                     " make_train_step(..., total_steps=steps).")
  hash_kwargs = registry._plain(config.model.get("hash_scale", {}) or {})  # pylint: disable=protected-access
  sam = optim.is_sam(config.optimizer)
  if loss_fn is None and not (ce_weight or rec_weight):
    raise ValueError("The config trains nothing: set loss.name, "
                     "loss.ce_weight or loss.reconstruction_weight.")
  if use_memory and paired:
    raise ValueError(f"loss {lc.name!r} takes no cross-batch memory.")

  def per_device(state: TrainState, batch: dict):
    x, labels, views = flatten_views(batch["image"], batch["label"])
    b = batch["label"].shape[0]
    key = jax.random.wrap_key_data(state.rng)
    key = jax.random.fold_in(jax.random.fold_in(key, state.step),
                             lax.axis_index(AXIS))
    scale = models.hash_scale(state.step, **hash_kwargs)
    if instance_labels:
      # The two views of an image are each other's only positive.
      metric_labels = jnp.tile(batch["instance_id"], views)
    else:
      metric_labels = labels

    def objective(params):
      variables = {"params": params}
      if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
      out, new_vars = model.apply(variables, x, train=True, hash_scale=scale,
                                  mutable=["batch_stats"],
                                  rngs={"dropout": key})
      terms = {}
      total = jnp.zeros((), jnp.float32)
      emb = out["embedding"].astype(jnp.float32)
      if loss_fn is not None:
        if paired:
          if views < 2:
            raise ValueError(f"loss {lc.name!r} needs data.views >= 2.")
          value = loss_fn(emb[:b], emb[b:2 * b], axis_name=AXIS, **loss_kwargs)
        else:
          memory = state.memory if use_memory else None
          value = loss_fn(emb, metric_labels, axis_name=AXIS, memory=memory,
                          **loss_kwargs)
        terms["metric_loss"] = value
        total += metric_weight * value
      if ce_weight:
        terms["ce_loss"] = lax.pmean(
            _ce(out["logits"], labels, label_smoothing), AXIS)
        terms["train_accuracy"] = lax.pmean(_accuracy(out["logits"], labels),
                                            AXIS)
        total += ce_weight * terms["ce_loss"]
      if rec_weight:
        terms["reconstruction_loss"] = lax.pmean(
            models.reconstruction_loss(out["reconstruction"], x), AXIS)
        total += rec_weight * terms["reconstruction_loss"]
      if quant_weight:
        codes = out["codes"].astype(jnp.float32)
        terms["quantization_loss"] = lax.pmean(
            jnp.mean(jnp.square(jnp.abs(codes) - 1.0)), AXIS)
        total += quant_weight * terms["quantization_loss"]
      objective_value = total
      if "probe_logits" in out:
        # Detached features: this term trains the probe only.
        terms["probe_loss"] = lax.pmean(_ce(out["probe_logits"], labels), AXIS)
        terms["probe_accuracy"] = lax.pmean(
            _accuracy(out["probe_logits"], labels), AXIS)
        objective_value = total + terms["probe_loss"]
      return objective_value, (total, terms, new_vars, emb)

    grads, (loss, terms, new_vars, emb) = jax.grad(
        objective, has_aux=True)(state.params)
    if sam:
      # The same batch at the perturbed weights; its BatchNorm statistics,
      # loss and metrics are dropped: the step reports the real weights'.
      grad_fn = lambda p, _: jax.grad(objective, has_aux=True)(p)[0]
      updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                     grad_fn=grad_fn)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    memory = state.memory
    if use_memory:  # after the loss: a batch never meets its own copy.
      memory = losses.enqueue_memory(memory, emb, metric_labels,
                                     axis_name=AXIS)
    batch_stats = new_vars.get("batch_stats", state.batch_stats)
    ema = state.ema
    if ema_decay:
      if not ema:
        raise ValueError("ema_decay > 0 needs a state with a weight average:"
                         " create_train_state(..., ema=True).")
      ema = optax.incremental_update(
          {"params": params, "batch_stats": batch_stats}, ema,
          step_size=1.0 - ema_rate(state.step, ema_decay))
    if la_period:
      if not ema:
        raise ValueError("lookahead_period > 0 needs a state with a slow"
                         " weight copy: create_train_state(..., ema=True).")
      fast, ema = lookahead_update(
          {"params": params, "batch_stats": batch_stats}, ema, state.step + 1,
          total_steps=int(total_steps), period=la_period, decay=la_decay,
          power=la_power)
      params, batch_stats = fast["params"], fast["batch_stats"]
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats,
        opt_state=opt_state, memory=memory, ema=ema)
    metrics = {"loss": loss, **terms,
               "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
               "grad_norm": optax.tree.norm(grads),
               # 1.0 while every parameter is finite: the loop never saves a
               # state that went bad even when the loss still looked fine.
               "params_finite": jnp.all(jnp.stack([
                   jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)
               ])).astype(jnp.float32)}
    return new_state, metrics

  sharded = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(AXIS)),
                          out_specs=(P(), P()))

  def step(state: TrainState, batch: dict):
    if instance_labels:
      # Numbered over the global batch, and across steps for the memory
      # bank; each device gets its slice. int32 wraps after 2**31 ids, which
      # keeps them distinct within any memory of fewer.
      n = batch["label"].shape[0]
      ids = state.step * n + jnp.arange(n, dtype=jnp.int32)
      batch = {**batch, "instance_id": lax.with_sharding_constraint(
          ids, NamedSharding(mesh, P(AXIS)))}
    return sharded(state, batch)

  return jax.jit(guard_traces(step, max_traces=max_traces,
                              name="the train step"), donate_argnums=0)
