"""Optimizer and learning-rate schedule from ``config.optimizer``.

SGD (+momentum), LARS (SimCLR), Adam and AdamW, each behind an optional
global-norm gradient clip, on a linear-warmup + cosine, linear-warmup +
linear-decay (``warmup_linear``, airbench's triangle) or constant schedule.
Weight decay and LARS's trust ratio skip biases and normalisation
parameters (rank <= 1), as SimCLR and solo-learn do, unless
``weight_decay_all`` asks to decay every parameter. Two options reproduce
airbench's per-parameter-group SGD: ``norm_bias_grad_scale`` multiplies the
gradient of the BatchNorm biases (before the decay is added), and
``freeze_after_epochs`` stops updating named parameters after some epochs
(airbench's whitening bias). With ``sam_rho > 0`` the whole optimizer is
wrapped in sharpness-aware minimisation (``optax.contrib.sam`` in its
opaque mode, which the train step feeds with a ``grad_fn``: see ``is_sam``).

airbench's torch SGD with a summed loss over a batch of ``B``, param groups
``lr_g = s * lr`` (``s`` = 64 for the BatchNorm biases, 1 otherwise) and
coupled decay ``wd / lr_g`` is this module's SGD on the mean loss with
``learning_rate = lr * B``, ``weight_decay = wd / (lr * B)``,
``weight_decay_all=True``, ``norm_bias_grad_scale = 64`` and
``nesterov=True``: torch steps by ``lr_g * (B g + wd / lr_g * p) =
lr B (s g + wd / (lr B) p)`` through the same (linear) momentum buffer.
"""

from __future__ import annotations

import logging
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int

__all__ = ["check_schedule_config", "is_sam", "is_norm_bias", "make_schedule",
           "make_optimizer",
           "peak_learning_rate"]


def peak_learning_rate(opt_config, batch_size: int) -> float:
  """``learning_rate``, times ``batch_size / 256`` with ``lr_batch_scaling``."""
  lr = float(opt_config.learning_rate)
  if check_bool("optimizer.lr_batch_scaling",
                opt_config.get("lr_batch_scaling", False)):
    lr *= batch_size / 256.0  # SimCLR's linear scaling rule.
  return lr


def check_schedule_config(opt_config) -> None:
  """Raises a ValueError for learning-rate settings no schedule can mean."""
  if not float(opt_config.learning_rate) >= 0:
    raise ValueError(
        f"optimizer.learning_rate must be >= 0, got {opt_config.learning_rate}.")
  for key in ("warmup_steps", "warmup_epochs"):
    if not float(opt_config.get(key, 0)) >= 0:
      raise ValueError(f"optimizer.{key} must be >= 0, got {opt_config.get(key)}.")
  fraction = float(opt_config.get("warmup_fraction", 0.0))
  if fraction and not 0.0 < fraction < 1.0:
    raise ValueError(f"optimizer.warmup_fraction must be in (0, 1), got {fraction}.")


def make_schedule(opt_config, *, total_steps: int, batch_size: int,
                  steps_per_epoch: int = 1) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the step.

  Warmup is ``warmup_steps``, or ``warmup_epochs * steps_per_epoch`` when
  ``warmup_epochs`` is set (so it follows ``--config.batch_size``), or
  ``int(warmup_fraction * total_steps)`` when that is set (so it follows
  ``--config.num_epochs``).

  ``schedule``:

  * ``"warmup_cosine"`` (default): linear from 0 to the peak over the
    warmup, then cosine to ``end_lr_factor * peak`` at ``total_steps``;
  * ``"warmup_linear"``: linear from ``warmup_init_factor * peak`` to the
    peak over the warmup, then linear to ``end_lr_factor * peak`` at
    ``total_steps``. With ``warmup_init_factor=0.2``, ``end_lr_factor=0``
    and ``warmup_steps = int(0.1 * total_steps)`` it is airbench96's
    ``get_lr(step) * peak``;
  * ``"constant"``: the peak, after the linear warmup from 0.
  """
  check_schedule_config(opt_config)
  peak = peak_learning_rate(opt_config, batch_size)
  name = opt_config.get("schedule", "warmup_cosine")
  warmup = int(opt_config.get("warmup_steps", 0))
  if opt_config.get("warmup_epochs", 0):
    warmup = int(float(opt_config.warmup_epochs) * steps_per_epoch)
  fraction = float(opt_config.get("warmup_fraction", 0.0))
  if fraction:
    warmup = int(fraction * total_steps)
  if warmup >= total_steps > 1:
    # Smoke runs of a few steps do this on purpose; a real run should not.
    # (Evaluation builds the model with a 1-step schedule: no warning.)
    logging.warning("The %d warmup steps cover the whole run of %d steps: the"
                    " learning rate never decays.", warmup, total_steps)
  if name == "constant":
    if warmup:
      return optax.join_schedules(
          [optax.linear_schedule(0.0, peak, warmup), optax.constant_schedule(peak)],
          [warmup])
    return optax.constant_schedule(peak)
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=min(warmup, total_steps),
        decay_steps=max(total_steps, warmup + 1),
        end_value=peak * float(opt_config.get("end_lr_factor", 0.0)))
  if name == "warmup_linear":
    init = peak * float(opt_config.get("warmup_init_factor", 0.0))
    end = peak * float(opt_config.get("end_lr_factor", 0.0))
    warmup = min(warmup, total_steps)
    decay = optax.linear_schedule(peak, end, max(total_steps - warmup, 1))
    if not warmup:
      return decay
    return optax.join_schedules(
        [optax.linear_schedule(init, peak, warmup), decay], [warmup])
  raise ValueError("schedule must be 'warmup_cosine', 'warmup_linear' or"
                   f" 'constant', got {name!r}.")


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _decay_all(params):
  return jax.tree.map(lambda _: True, params)


def _path_str(path) -> str:
  """A ``tree_map_with_path`` path as ``"backbone/group0_norm1/bias"``."""
  return jax.tree_util.keystr(path, simple=True, separator="/")


def is_norm_bias(path) -> bool:
  """Whether a parameter path is a normalisation layer's bias: a leaf named
  ``bias`` whose module's name contains ``norm`` (any case), e.g.
  ``group0_norm1/bias`` or ``BatchNorm_0/bias``."""
  names = _path_str(path).split("/")
  return (len(names) >= 2 and names[-1] == "bias"
          and "norm" in names[-2].lower())


def _scale_norm_bias_grads(scale: float) -> optax.GradientTransformation:
  """Multiplies the normalisation biases' gradients (``is_norm_bias``)."""

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(scale, u.dtype) if is_norm_bias(path)
        else u, updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


class FreezeState(NamedTuple):
  """The number of updates done (``freeze_after_steps``)."""
  count: jax.Array


def freeze_after_steps(thresholds: dict[str, int]) -> optax.GradientTransformation:
  """Zeroes the updates of the leaves whose ``/``-joined path contains a key
  of ``thresholds``, from that key's update number on (counted from 0).

  The leaves then stay as they are, as a torch parameter with
  ``requires_grad = False`` (no decay, no momentum). A key that names no
  parameter is an error (caught at ``init``).
  """

  def threshold(path):
    joined = _path_str(path)
    hits = [t for k, t in thresholds.items() if k in joined]
    return min(hits) if hits else None

  def init(params):
    paths = [_path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    for key in thresholds:
      if not any(key in p for p in paths):
        raise ValueError(
            f"optimizer.freeze_after_epochs: {key!r} names no parameter"
            " (keys are matched against the '/'-joined parameter paths).")
    return FreezeState(count=jnp.zeros((), jnp.int32))

  def update(updates, state, params=None):
    del params

    def freeze(path, u):
      t = threshold(path)
      if t is None:
        return u
      return jnp.where(state.count >= t, jnp.zeros_like(u), u)

    updates = jax.tree_util.tree_map_with_path(freeze, updates)
    return updates, FreezeState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def _freeze_thresholds(opt_config, steps_per_epoch: int) -> dict[str, int]:
  spec = opt_config.get("freeze_after_epochs", None)
  if not spec:
    return {}
  if not hasattr(spec, "items"):
    raise ValueError("optimizer.freeze_after_epochs must map parameter names"
                     f" to epochs, e.g. {{'whiten_bias': 3}}; got {spec!r}.")
  out = {}
  for key, epochs in spec.items():
    if not isinstance(key, str) or not key:
      raise ValueError("optimizer.freeze_after_epochs: keys must be non-empty"
                       f" parameter names, got {key!r}.")
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or (
        not math.isfinite(epochs) or epochs < 0):
      raise ValueError(f"optimizer.freeze_after_epochs[{key!r}] must be a"
                       f" number of epochs >= 0, got {epochs!r}.")
    out[key] = int(epochs * steps_per_epoch)
  return out


def make_optimizer(opt_config, schedule, *, steps_per_epoch: int = 1
                   ) -> optax.GradientTransformation:
  """``optax`` transformation named by ``opt_config.name``.

  Besides ``name``, ``learning_rate`` (through ``schedule``),
  ``weight_decay``, ``momentum``, ``nesterov``, ``grad_clip_norm`` and
  ``sam_rho``, for every optimizer:

  * ``weight_decay_all`` (default False): decay every parameter, not only
    the rank > 1 ones (the LARS trust ratio still skips them);
  * ``norm_bias_grad_scale`` (default 1): multiply the normalisation biases'
    gradients (``is_norm_bias``) before the decay is added: with SGD, the
    same as their own learning rate ``scale`` times larger and their decay
    ``scale`` times smaller, airbench's bias param group;
  * ``freeze_after_epochs`` (default none): ``{name: epochs}``; the
    parameters whose path contains ``name`` are not updated from step
    ``int(epochs * steps_per_epoch)`` on.

  The gradient clip acts on the raw gradients, before the scale.
  """
  name = opt_config.name
  wd = float(opt_config.get("weight_decay", 0.0))
  momentum = float(opt_config.get("momentum", 0.9))
  decay_all = check_bool("optimizer.weight_decay_all",
                         opt_config.get("weight_decay_all", False))
  mask = _decay_all if decay_all else _decay_mask
  bias_scale = opt_config.get("norm_bias_grad_scale", 1.0)
  if isinstance(bias_scale, bool) or not isinstance(bias_scale, (int, float)) or (
      not math.isfinite(bias_scale) or bias_scale <= 0):
    raise ValueError("optimizer.norm_bias_grad_scale must be a finite number"
                     f" > 0, got {bias_scale!r}.")
  steps_per_epoch = check_int("steps_per_epoch", steps_per_epoch, 1)
  frozen = _freeze_thresholds(opt_config, steps_per_epoch)
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=momentum or None,
                  nesterov=check_bool(
                      "optimizer.nesterov", opt_config.get("nesterov", False))))
  elif name == "lars":
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=mask,
                    trust_ratio_mask=_decay_mask, momentum=momentum)
  elif name == "adam":
    tx = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.adam(schedule))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd, mask=mask)
  else:
    raise ValueError(
        f"optimizer must be 'sgd', 'lars', 'adam' or 'adamw', got {name!r}.")
  # Only when asked: without the new keys the chain (and so the optimizer
  # state that checkpoints hold) is what it was before they existed.
  if bias_scale != 1.0:
    tx = optax.chain(_scale_norm_bias_grads(float(bias_scale)), tx)
  if frozen:
    tx = optax.chain(tx, freeze_after_steps(frozen))
  clip = float(opt_config.get("grad_clip_norm", 0.0))
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  rho = float(opt_config.get("sam_rho", 0.0))
  if rho < 0:
    raise ValueError(f"optimizer.sam_rho must be >= 0, got {rho}.")
  if rho > 0:
    # The ascent step: rho along the gradient divided by its global norm.
    # Opaque mode keeps the perturbed weights inside one update, so the
    # BatchNorm statistics are only ever those of the real weights. The
    # clip and the decay act on the gradient at the perturbed weights, the
    # one that moves the real ones.
    tx = optax.contrib.sam(
        tx, optax.chain(_normalize_by_global_norm(), optax.sgd(rho)),
        sync_period=2, opaque_mode=True)
  return tx


def _normalize_by_global_norm(eps: float = 1e-12) -> optax.GradientTransformation:
  """``g / (||g|| + eps)``: SAM's ascent direction. ``optax.contrib.normalize``
  has no ``eps``, so a zero gradient made every weight NaN."""

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    return jax.tree.map(lambda g: g / (norm + eps).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


def is_sam(opt_config) -> bool:
  """Whether ``make_optimizer`` wraps SAM: its ``update`` needs ``grad_fn``."""
  return float(opt_config.get("sam_rho", 0.0)) > 0
