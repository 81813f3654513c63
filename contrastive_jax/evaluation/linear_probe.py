"""Linear probe: a softmax classifier trained with optax on frozen features.

Features are standardised with the mean and standard deviation of the
training features (the same statistics are applied to the evaluation
features), then a linear layer ``W x + b`` (zero-initialised, so the problem
and the result are deterministic up to minibatch sampling) is trained on the
softmax cross-entropy with AdamW (or SGD with momentum) under a cosine-decayed
learning rate and decoupled weight decay on ``W``. The whole training loop is
one jitted ``lax.fori_loop``.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from contrastive_jax._checks import check_int
from contrastive_jax.evaluation.metrics import check_class_range
from contrastive_jax.evaluation.metrics import check_embeddings
from contrastive_jax.evaluation.metrics import check_labels

__all__ = ["fit_linear_classifier", "linear_classifier_logits", "linear_probe"]

_OPTIMIZERS = ("adamw", "sgd")


def _make_optimizer(name, learning_rate, weight_decay, steps):
  schedule = optax.cosine_decay_schedule(learning_rate, decay_steps=steps)
  mask = {"kernel": True, "bias": False}
  if name == "adamw":
    return optax.adamw(schedule, weight_decay=weight_decay, mask=mask)
  return optax.chain(optax.add_decayed_weights(weight_decay, mask=mask),
                     optax.sgd(schedule, momentum=0.9))


def _loss(weights, x, y):
  logits = x @ weights["kernel"] + weights["bias"]
  return jnp.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, y))


@functools.partial(jax.jit,
                   static_argnames=("optimizer", "steps", "batch_size"))
def _train(x, y, key, learning_rate, weight_decay, *, optimizer, steps,
           batch_size, init):
  tx = _make_optimizer(optimizer, learning_rate, weight_decay, steps)
  grad_fn = jax.value_and_grad(_loss)

  def step(i, carry):
    weights, opt_state, _ = carry
    if batch_size is None:
      xb, yb = x, y
    else:
      idx = jax.random.randint(jax.random.fold_in(key, i), (batch_size,), 0,
                               x.shape[0])
      xb, yb = x[idx], y[idx]
    loss, grads = grad_fn(weights, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, weights)
    return optax.apply_updates(weights, updates), opt_state, loss

  carry = (init, tx.init(init), jnp.zeros((), x.dtype))
  weights, _, last_loss = jax.lax.fori_loop(0, steps, step, carry)
  return weights, last_loss, _loss(weights, x, y)


def fit_linear_classifier(
    features: Any,
    labels: Any,
    *,
    num_classes: int,
    steps: int = 500,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = 1024,
    optimizer: str = "adamw",
    seed: int = 0,
) -> dict[str, Any]:
  """Trains a linear softmax classifier on standardised frozen features.

  Args:
    features: ``[N, D]`` floating training features.
    labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    num_classes: number of classes ``C``.
    steps: optimisation steps.
    learning_rate: peak learning rate, decayed to 0 on a cosine schedule.
    weight_decay: decoupled weight decay on the kernel (not the bias).
    batch_size: minibatch size (sampled with replacement each step), or
      ``None`` for full-batch steps. Minibatches larger than ``N`` fall back
      to full batches.
    optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).
    seed: seed of the minibatch sampling.

  Returns:
    ``{"kernel": [D, C], "bias": [C], "mean": [D], "std": [D]}`` (NumPy
    float32) plus ``"final_loss"`` (full-data training loss, float) and
    ``"last_batch_loss"`` (float). ``std`` entries of constant features are
    1.

  References:
    Chen et al., A Simple Framework for Contrastive Learning of Visual
    Representations (SimCLR), ICML 2020, linear evaluation protocol.
  """
  x = check_embeddings("train_features", features).astype(np.float32)
  y = check_labels("train_labels", labels, x.shape[0])
  num_classes = check_int("num_classes", num_classes)
  check_class_range("train_labels", y, num_classes)
  steps = check_int("steps", steps)
  if optimizer not in _OPTIMIZERS:
    raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got"
                     f" {optimizer!r}.")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}.")
  if weight_decay < 0:
    raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
  if batch_size is not None:
    batch_size = check_int("batch_size", batch_size)
    if batch_size >= x.shape[0]:
      batch_size = None

  mean = x.mean(axis=0, dtype=np.float64)
  std = x.std(axis=0, dtype=np.float64)
  # A constant feature (float32 rounding gives it a std of ~1e-7 |mean|) is
  # centred but not scaled up; the test is relative, so the probe does not
  # depend on the features' scale.
  std = np.where((std > 1e-6 * np.abs(mean)) & (std > 0), std, 1.0)
  mean, std = mean.astype(np.float32), std.astype(np.float32)
  init = {"kernel": jnp.zeros((x.shape[1], num_classes), jnp.float32),
          "bias": jnp.zeros((num_classes,), jnp.float32)}
  weights, last_loss, final_loss = _train(
      (x - mean) / std, y.astype(np.int32), jax.random.key(seed),
      float(learning_rate), float(weight_decay), optimizer=optimizer,
      steps=steps, batch_size=batch_size, init=init)
  return {"kernel": np.asarray(weights["kernel"]),
          "bias": np.asarray(weights["bias"]),
          "mean": mean, "std": std,
          "final_loss": float(final_loss),
          "last_batch_loss": float(last_loss)}


@jax.jit
def _logits(params, x):
  return ((x - params["mean"]) / params["std"]) @ params["kernel"] + params[
      "bias"]


def linear_classifier_logits(params: dict[str, Any], features: Any) -> np.ndarray:
  """Logits ``[N, C]`` of a classifier from :func:`fit_linear_classifier`.

  Args:
    params: the dict returned by :func:`fit_linear_classifier`.
    features: ``[N, D]`` features (raw: standardised here with the stored
      training statistics).

  Returns:
    ``[N, C]`` float32 NumPy logits.
  """
  x = check_embeddings("features", features).astype(np.float32)
  if x.shape[1] != np.shape(params["kernel"])[0]:
    raise ValueError(
        f"features have {x.shape[1]} dimensions but the classifier was"
        f" trained on {np.shape(params['kernel'])[0]}.")
  arrays = {key: params[key] for key in ("kernel", "bias", "mean", "std")}
  return np.asarray(_logits(arrays, x))


def topk_accuracy(logits, labels, k):
  """Fraction of rows whose label is among the ``k`` largest logits (stable ties)."""
  k = min(k, logits.shape[1])
  top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return float(np.mean(np.any(top == labels[:, None], axis=1)))


def linear_probe(
    train_feats: Any,
    train_labels: Any,
    eval_feats: Any,
    eval_labels: Any,
    *,
    num_classes: int,
    steps: int = 500,
    learning_rate: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int | None = 1024,
    optimizer: str = "adamw",
    seed: int = 0,
) -> dict[str, float]:
  """Linear-probe accuracy of frozen features.

  Trains :func:`fit_linear_classifier` on ``train_feats`` and evaluates on
  ``eval_feats`` (standardised with the training statistics).

  Args:
    train_feats: ``[N, D]`` training features.
    train_labels: ``[N]`` integer class ids in ``[0, num_classes)``.
    eval_feats: ``[E, D]`` evaluation features.
    eval_labels: ``[E]`` integer class ids.
    num_classes: number of classes ``C``.
    steps, learning_rate, weight_decay, batch_size, optimizer, seed: see
      :func:`fit_linear_classifier`.

  Returns:
    ``{"top1", "top5", "train_top1", "train_loss"}`` as Python floats;
    top-5 is top-``min(5, C)``.

  References:
    Chen et al., SimCLR, ICML 2020; Kolesnikov, Zhai and Beyer, Revisiting
    Self-Supervised Visual Representation Learning, CVPR 2019.
  """
  num_classes = check_int("num_classes", num_classes)
  train_x = check_embeddings("train_features", train_feats)
  train_y = check_labels("train_labels", train_labels, train_x.shape[0])
  eval_x = check_embeddings("eval_features", eval_feats)
  eval_y = check_labels("eval_labels", eval_labels, eval_x.shape[0])
  check_class_range("eval_labels", eval_y, num_classes)
  if eval_x.shape[1] != train_x.shape[1]:
    raise ValueError(
        f"train and eval features must have the same dimension, got"
        f" {train_x.shape[1]} and {eval_x.shape[1]}.")
  params = fit_linear_classifier(
      train_x, train_y, num_classes=num_classes, steps=steps,
      learning_rate=learning_rate, weight_decay=weight_decay,
      batch_size=batch_size, optimizer=optimizer, seed=seed)
  eval_logits = linear_classifier_logits(params, eval_x)
  train_logits = linear_classifier_logits(params, train_x)
  return {"top1": topk_accuracy(eval_logits, eval_y, 1),
          "top5": topk_accuracy(eval_logits, eval_y, 5),
          "train_top1": topk_accuracy(train_logits, train_y, 1),
          "train_loss": params["final_loss"]}
