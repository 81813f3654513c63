"""Optimizer and learning-rate schedule from ``config.optimizer``.

SGD (+momentum), LARS (SimCLR), Adam and AdamW, each behind an optional
global-norm gradient clip, on a linear-warmup + cosine (or constant)
schedule. Weight decay and LARS's trust ratio skip biases and normalisation
parameters (rank <= 1), as SimCLR and solo-learn do. With ``sam_rho > 0``
the whole optimizer is wrapped in sharpness-aware minimisation
(``optax.contrib.sam`` in its opaque mode, which the train step feeds with
a ``grad_fn``: see ``is_sam``).
"""

from __future__ import annotations

from typing import Callable

import jax
import optax

__all__ = ["is_sam", "make_schedule", "make_optimizer", "peak_learning_rate"]


def peak_learning_rate(opt_config, batch_size: int) -> float:
  """``learning_rate``, times ``batch_size / 256`` with ``lr_batch_scaling``."""
  lr = float(opt_config.learning_rate)
  if opt_config.get("lr_batch_scaling", False):
    lr *= batch_size / 256.0  # SimCLR's linear scaling rule.
  return lr


def make_schedule(opt_config, *, total_steps: int, batch_size: int,
                  steps_per_epoch: int = 1) -> Callable[[jax.Array], jax.Array]:
  """The learning rate as a function of the step.

  Warmup is ``warmup_steps``, or ``warmup_epochs * steps_per_epoch`` when
  ``warmup_epochs`` is set (so it follows ``--config.batch_size``).
  """
  peak = peak_learning_rate(opt_config, batch_size)
  name = opt_config.get("schedule", "warmup_cosine")
  warmup = int(opt_config.get("warmup_steps", 0))
  if opt_config.get("warmup_epochs", 0):
    warmup = int(float(opt_config.warmup_epochs) * steps_per_epoch)
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
  raise ValueError(f"schedule must be 'warmup_cosine' or 'constant', got {name!r}.")


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt_config, schedule) -> optax.GradientTransformation:
  """``optax`` transformation named by ``opt_config.name``."""
  name = opt_config.name
  wd = float(opt_config.get("weight_decay", 0.0))
  momentum = float(opt_config.get("momentum", 0.9))
  if name == "sgd":
    tx = optax.chain(
        optax.add_decayed_weights(wd, _decay_mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=momentum or None,
                  nesterov=bool(opt_config.get("nesterov", False))))
  elif name == "lars":
    tx = optax.lars(schedule, weight_decay=wd, weight_decay_mask=_decay_mask,
                    trust_ratio_mask=_decay_mask, momentum=momentum)
  elif name == "adam":
    tx = optax.chain(
        optax.add_decayed_weights(wd, _decay_mask) if wd else optax.identity(),
        optax.adam(schedule))
  elif name == "adamw":
    tx = optax.adamw(schedule, weight_decay=wd, mask=_decay_mask)
  else:
    raise ValueError(
        f"optimizer must be 'sgd', 'lars', 'adam' or 'adamw', got {name!r}.")
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
        tx, optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2, opaque_mode=True)
  return tx


def is_sam(opt_config) -> bool:
  """Whether ``make_optimizer`` wraps SAM: its ``update`` needs ``grad_fn``."""
  return float(opt_config.get("sam_rho", 0.0)) > 0
