"""``train_and_evaluate(config, workdir)``: the whole run, resumable.

mesh -> data -> model/optimizer/state -> resume from the latest readable
checkpoint -> jitted data-parallel steps (progress bar, TensorBoard scalars,
NaN guard, periodic and SIGTERM checkpoints) -> final evaluation (kNN and
linear probe on the validation split, or "tune" with ``data.tune``) ->
``workdir/results.json``.
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from contrastive_jax import evaluation
from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int
from contrastive_jax.training import checkpoint as ckpt_lib
from contrastive_jax.training import distributed
from contrastive_jax.training import input as input_lib
from contrastive_jax.training import metric_writer
from contrastive_jax.training import optim
from contrastive_jax.training import registry
from contrastive_jax.training import state as state_lib
from contrastive_jax.training import step as step_lib

__all__ = ["NonFiniteLossError", "make_mesh", "total_steps",
           "train_and_evaluate", "evaluate", "eval_variables", "load_eval_data",
           "build"]


class NonFiniteLossError(FloatingPointError):
  """The loss (or gradients / parameters) became NaN or infinite."""


def make_mesh(num_devices: int = 0) -> jax.sharding.Mesh:
  """1-D ``"data"`` mesh over all devices (or the first ``num_devices``).

  Auto axis types: ``shard_map`` takes the replicated state and sharded batch
  as they come (Explicit axes would refuse unsharded inputs).
  """
  devices = jax.devices()
  if num_devices and num_devices != len(devices):
    if jax.process_count() > 1:
      raise ValueError("num_devices must be 0 (all) with several processes.")
    devices = devices[:num_devices]
  return jax.make_mesh((len(devices),), (step_lib.AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)


_WHITEN_INIT_IMAGES = 1024
# The host may dispatch this many steps ahead of the device: enough to keep
# it busy, few enough that queued input batches stay small and the time
# budget (measured on the host) overshoots by a few steps at most.
_MAX_STEPS_AHEAD = 4


# On/off settings, checked here before anything is written rather than where
# each is read: some are read only after training (eval.*), and a string such
# as "False" is truthy.
_SWITCHES = ("progress_bar", "checkpoint.async_save", "data.normalize",
             "data.tune", "data.shard_on_device", "data.cutout_inside",
             "model.classifier", "model.online_probe", "optimizer.nesterov",
             "optimizer.lr_batch_scaling", "optimizer.weight_decay_all",
             "eval.final", "eval.tta_flip", "eval.tta_translate")


def check_run_config(config) -> None:
  """Refuses run settings that would fail late (after files are written) or
  silently do something else."""

  check_int("batch_size", config.batch_size, 1)
  check_int("num_steps", config.get("num_steps", 0), 0)
  check_int("num_epochs", config.get("num_epochs", 0), 0)
  if not config.get("num_steps", 0) and not config.get("num_epochs", 0):
    raise ValueError("Set num_steps or num_epochs: both are 0.")
  check_int("eval_every", config.get("eval_every", 0), 0)
  for key in _SWITCHES:
    section = config
    *parents, leaf = key.split(".")
    for name in parents:
      section = section.get(name) or {}
    if leaf in section:
      check_bool(key, section[leaf])
  step_lib.check_loss_config(config.loss)
  optim.check_schedule_config(config.optimizer)
  cc = config.checkpoint
  check_int("checkpoint.every_steps", cc.get("every_steps", 1000), 1)
  check_int("checkpoint.keep", cc.get("keep", 3), 1)
  num_devices = config.get("num_devices", 0)
  check_int("num_devices", num_devices, 0)
  if num_devices > jax.device_count():
    raise ValueError(f"num_devices={num_devices}, but there are only"
                     f" {jax.device_count()} devices.")
  shards = num_devices or jax.device_count()
  if config.batch_size % shards:
    raise ValueError(
        f"batch_size={config.batch_size} must be divisible by the {shards}"
        " devices the batch is split over (or set num_devices).")


def total_steps(config, num_train: int) -> int:
  if config.get("num_steps", 0) > 0:
    return int(config.num_steps)
  return int(config.num_epochs) * (num_train // int(config.batch_size))


def keeps_average(config) -> bool:
  """Whether the run keeps a second copy of the weights in ``state.ema``
  (an average with ``ema_decay > 0``, lookahead's slow weights with
  ``lookahead_period > 0``), which evaluation then uses."""
  return (float(config.get("ema_decay", 0.0)) > 0
          or step_lib.lookahead_settings(config)[0] > 0)


def build(config, mesh, train_input, *, steps: int):
  """``(init_model, train_model, eval_model, tx, schedule, initial state)``."""
  kw = dict(num_classes=train_input.num_classes,
            image_shape=train_input.image_shape)
  init_model = registry.build_model(config.model, **kw)
  train_model = registry.build_model(config.model, axis_name=step_lib.AXIS,
                                     **kw)
  steps_per_epoch = max(1, train_input.num_train // int(config.batch_size))
  schedule = optim.make_schedule(
      config.optimizer, total_steps=steps, batch_size=int(config.batch_size),
      steps_per_epoch=steps_per_epoch)
  tx = optim.make_optimizer(config.optimizer, schedule,
                            steps_per_epoch=steps_per_epoch)
  key = jax.random.key(int(config.seed))
  sample = np.zeros((1,) + tuple(train_input.image_shape), np.float32)
  init_input = sample
  if (config.model.get("backbone_kwargs") or {}).get("whiten_size", 0) and hasattr(
      train_input, "init_images"):
    # The whitening layer's filters are computed from the images of the init
    # call; ~1M patches estimate its small covariance well. (A restore
    # overwrites them, so callers without data may init on zeros.)
    init_input = train_input.init_images(
        int(config.model.get("whiten_init_images", _WHITEN_INIT_IMAGES)))
  state = state_lib.create_train_state(
      init_model, tx, sample_input=init_input, key=jax.random.fold_in(key, 0),
      ema=keeps_average(config))
  memory_size = int(config.loss.get("memory_size", 0))
  if memory_size:
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = jax.eval_shape(lambda v, x: init_model.apply(v, x), variables,
                         sample)
    from contrastive_jax import losses  # pylint: disable=g-import-not-at-top
    state = state.replace(memory=losses.create_memory(
        memory_size, out["embedding"].shape[-1]))
  state = jax.tree.map(lambda a: input_lib.replicate(np.asarray(a), mesh),
                       jax.device_get(state))
  return init_model, train_model, tx, schedule, state


def _host(tree):
  # One device_get of the whole tree: it starts every leaf's copy before
  # waiting on any, where a device_get per leaf would wait on each in turn.
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _finite_metrics(m) -> bool:
  return (all(np.all(np.isfinite(v)) for v in m.values())
          and float(m.get("params_finite", 1.0)) == 1.0)


def eval_variables(state, *, online: bool = False) -> dict[str, Any]:
  """The model variables to evaluate: the weight average when the run keeps
  one (``state.ema``) unless ``online``, else the trained weights."""
  src = state.ema if (state.ema and not online) else {
      "params": state.params, "batch_stats": state.batch_stats}
  variables = {"params": src["params"]}
  if src["batch_stats"]:
    variables["batch_stats"] = src["batch_stats"]
  return variables


def load_eval_data(config, splits=None):
  """``(train_x, train_y, val_x, val_y)`` of ``splits`` (default: the run's
  ``input_lib.run_splits``), for ``evaluate``."""
  splits = splits or input_lib.run_splits(config)
  return (*input_lib.load_eval_split(config, splits[0]),
          *input_lib.load_eval_split(config, splits[1]))


def evaluate(config, model, state, mesh, *, splits=None,
             knn_only: bool = False, online: bool = False, data=None
             ) -> dict[str, float]:
  """kNN and linear-probe top-1 of the backbone features on the eval split.

  Also, when the model has them: kNN on the loss embedding, accuracy of the
  classifier head and of the online probe, and Hamming-ranking mAP of hash
  codes (validation queries against the training set); with
  ``config.eval.tta_flip``, also the classifier head's top-1 with flip
  test-time augmentation (``classifier_top1_tta_flip``), and with
  ``config.eval.tta_translate`` with translations too
  (``classifier_top1_tta_flip_translate``, or ``..._tta_translate`` without
  ``tta_flip``; see ``model_outputs``). The weights are
  those of ``eval_variables(state, online=online)``; ``data`` is
  ``load_eval_data(config, splits)`` when the caller already has it.
  """
  ec = config.eval
  train_x, train_y, val_x, val_y = data or load_eval_data(config, splits)
  num_classes = int(max(train_y.max(), val_y.max())) + 1
  variables = eval_variables(state, online=online)
  keys = ("features",) if knn_only else (
      "features", "embedding", "logits", "probe_logits", "codes")
  embed = functools.partial(model_outputs, model, variables, keys=keys,
                            batch_size=int(ec.get("batch_size", 512)),
                            mesh=mesh)
  tr, va = embed(train_x), embed(val_x)
  k = min(int(ec.get("knn_k", 20)), train_x.shape[0])
  temp = float(ec.get("knn_temperature", 0.07))
  res = {}
  knn = evaluation.knn_accuracy(va["features"], val_y, tr["features"], train_y,
                                ks=(k,), temperature=temp,
                                num_classes=num_classes)
  res["knn_top1"] = knn[f"top1_k{k}"]
  if knn_only:
    return res
  lp = evaluation.linear_probe(
      tr["features"], train_y, va["features"], val_y, num_classes=num_classes,
      steps=int(ec.get("probe_steps", 500)),
      learning_rate=float(ec.get("probe_learning_rate", 1e-3)))
  res["linear_probe_top1"] = lp["top1"]
  if "embedding" in va and va["embedding"].shape[1] != va["features"].shape[1]:
    knn = evaluation.knn_accuracy(va["embedding"], val_y, tr["embedding"],
                                  train_y, ks=(k,), temperature=temp,
                                  num_classes=num_classes)
    res["knn_embedding_top1"] = knn[f"top1_k{k}"]
  if "probe_logits" in va:
    res["online_probe_top1"] = float(
        np.mean(np.argmax(va["probe_logits"], -1) == val_y))

  def classifier_scores(logits, suffix: str = "") -> None:
    # Top-1 and the macro recall / F1 over the head's classes, the figures
    # set beside a supervised baseline's (as experiments.evaluate reports).
    pred = np.argmax(logits, -1)
    res["classifier_top1" + suffix] = float(np.mean(pred == val_y))
    cls = evaluation.classification_metrics(
        val_y, pred, class_names=[str(i) for i in range(logits.shape[-1])])
    res["classifier_macro_recall" + suffix] = cls["macro_recall"]
    res["classifier_macro_f1" + suffix] = cls["macro_f1"]

  if "logits" in va:
    classifier_scores(va["logits"])
  if "logits" in va and np.ndim(val_x) == 4:
    # airbench's headline metric: the classifier with test-time
    # augmentation. One more pass over the queries only per kind.
    flip = check_bool("eval.tta_flip", ec.get("tta_flip", False))
    translate = check_bool("eval.tta_translate", ec.get("tta_translate", False))
    ttas = [dict(tta_flip=True, tta_translate=False)] if flip else []
    if translate:
      ttas.append(dict(tta_flip=flip, tta_translate=True))
    for tta in ttas:
      classifier_scores(embed(val_x, keys=("logits",), **tta)["logits"],
                        tta_suffix(**tta))
  if "codes" in va:
    res["hash_map"] = float(evaluation.hash_retrieval_map(
        va["codes"], val_y, tr["codes"], train_y))
  return res


def tta_suffix(*, tta_flip: bool, tta_translate: bool) -> str:
  """``"_tta_flip"``, ``"_tta_translate"``, ``"_tta_flip_translate"`` or ``""``.

  Names the metrics and report files of a test-time augmentation.
  """
  if not (tta_flip or tta_translate):
    return ""
  return "_tta" + ("_flip" if tta_flip else "") + (
      "_translate" if tta_translate else "")


def translated_views(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """airbench's two translations of ``x`` ``[N, H, W, C]`` by one pixel.

  Up-left and down-right (both axes at once), the border filled by
  reflection, as ``infer_mirror_translate`` of airbench94.
  """
  h, w = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  return padded[:, :h, :w], padded[:, 2:, 2:]


def model_outputs(model, variables, images, *, keys, batch_size: int, mesh,
                  tta_flip: bool = False, tta_translate: bool = False):
  """The model's eval-mode outputs named in ``keys`` (float32) for ``images``.

  Test-time augmentation, computed on device in the same pass; every output
  but hash ``codes`` (averaged signs would be zero bits, so codes stay the
  plain image's) is averaged:

  * ``tta_flip``: the mean of the outputs for the image and its mirror image;
  * ``tta_translate``: 0.5 x the output for the image plus 0.25 x each of
    its two one-pixel translations (``translated_views``), each of the three
    flip-averaged too with ``tta_flip``. Both together are airbench94's
    ``tta_level=2``.
  """
  if (tta_flip or tta_translate) and np.ndim(images) != 4:
    raise ValueError("Test-time augmentation needs images of shape"
                     f" [N, H, W, C], got {np.shape(images)}.")

  def apply(v, x):
    out = model.apply(v, x, train=False)
    return {k: out[k].astype(jnp.float32) for k in keys if k in out}

  def mix(outs, weights):
    return {k: outs[0][k] if k == "codes" else
            sum(w * o[k] for w, o in zip(weights, outs))
            for k in outs[0]}

  def flip_averaged(v, x):
    if not tta_flip:
      return apply(v, x)
    return mix([apply(v, x), apply(v, x[:, :, ::-1])], (0.5, 0.5))

  def forward(v, x):
    if not tta_translate:
      return flip_averaged(v, x)
    return mix([flip_averaged(v, t) for t in (x, *translated_views(x))],
               (0.5, 0.25, 0.25))

  return evaluation.embed(forward, variables, images, batch_size=batch_size,
                          mesh=mesh)


def write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, path)  # atomic: a reader never sees half a file


def train_and_evaluate(config, workdir: str, *,
                       step_callback: Callable[[int], None] | None = None
                       ) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds checkpoints) and evaluates.

  Args:
    config: an ``ml_collections.ConfigDict`` (see ``experiments/configs``).
    workdir: where checkpoints, ``config.json``, TensorBoard events and
      ``results.json`` go.
    step_callback: called with the step number after every step (tests use
      it to kill the process at a known point).

  Returns:
    The results written to ``workdir/results.json``. Its ``status`` is
    ``"completed"``; ``"preempted"`` after SIGTERM (checkpoint saved, not
    evaluated: relaunch to finish); or ``"time_budget"`` when the training
    loop has run ``config.max_train_seconds`` (compilation included;
    checkpoint saved, and evaluated as it stands). ``loop_time_s`` is the
    loop's time, ``train_time_s`` the part after its first, compiling step
    (``images_per_sec`` is measured over it).

  Raises:
    IncompatibleCheckpointError: ``workdir`` holds another config's run.
    NonFiniteLossError: the loss became NaN/inf; the last good checkpoint
      is kept.
  """
  wall_start = time.time()
  distributed.maybe_initialize(config.get("distributed"))
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  config_dict = config.to_dict()
  # Refuse bad settings and an incompatible workdir before writing anything.
  check_run_config(config)
  saved_fingerprint = ckpt_lib.check_workdir_config(workdir, config_dict)
  os.makedirs(workdir, exist_ok=True)

  mesh = make_mesh(int(config.get("num_devices", 0)))
  data_key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)
  train_input = input_lib.make_train_input(config, mesh, seed_key=data_key)
  steps = total_steps(config, train_input.num_train)
  init_model, train_model, tx, schedule, state = build(
      config, mesh, train_input, steps=steps)

  cc = config.checkpoint
  checkpointer = ckpt_lib.Checkpointer(
      workdir, fingerprint=ckpt_lib.config_fingerprint(config_dict),
      keep=cc.get("keep", 3), async_save=bool(cc.get("async_save", True)),
      also_accept=(saved_fingerprint,), config=config_dict)
  restored, start = checkpointer.restore_latest(
      state_lib.abstract_state(state))
  if restored is not None:
    state = restored
  start = int(start or 0)
  if is_main:
    write_json(os.path.join(workdir, "config.json"), config_dict)
  logging.info("Devices: %d (%s), processes: %d; steps %d -> %d.",
               jax.device_count(), jax.devices()[0].device_kind,
               jax.process_count(), start, steps)

  writer = metric_writer.MetricWriter(workdir, enabled=is_main)
  preempt = ckpt_lib.PreemptionFlag().install()
  train_step = step_lib.make_train_step(train_model, tx, schedule, config,
                                        mesh, total_steps=steps)
  every = int(cc.get("every_steps", 1000))
  log_every = max(1, int(config.get("log_every", 50)))
  eval_every = int(config.get("eval_every", 0))
  batch = int(config.batch_size)
  max_train_s = float(config.get("max_train_seconds", 0.0))
  status = "completed"
  last = {}
  timing = {"t0": None, "n0": start, "loop": None}
  pbar = None
  if config.get("progress_bar", True) and is_main:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    pbar = tqdm.tqdm(total=steps, initial=start, unit="step",
                     dynamic_ncols=True, desc="train")

  acc: dict[str, list] = {}

  # Metrics stay on the device until a log, save, stop or callback step
  # fetches them all in one transfer (as flax's examples do): no
  # device-to-host copy per step. A save always follows the check of every
  # step before it, so a non-finite state is never saved.
  pending: list[tuple[int, Any]] = []

  def check_pending() -> None:
    if not pending:
      return
    fetched = _host([m for _, m in pending])
    steps_done = [s for s, _ in pending]
    pending.clear()
    for step_done, m in zip(steps_done, fetched):
      check(step_done, m)

  def check(step_done: int, m) -> None:
    if not _finite_metrics(m):
      checkpointer.wait()
      bad = {k: float(v) for k, v in m.items()
             if not np.isfinite(v) or (k == "params_finite" and v != 1.0)}
      latest = checkpointer.latest_step()
      kept = (f"the last good checkpoint is step {latest} in"
              f" {checkpointer.directory} (nothing after it was saved)"
              if latest is not None else
              f"no last good checkpoint: none was saved in {checkpointer.directory}")
      raise NonFiniteLossError(
          f"Non-finite values at step {step_done}: {bad}. Training stopped;"
          f" {kept}. Lower optimizer.learning_rate, set"
          " optimizer.grad_clip_norm, or use model.dtype='float32'.")
    last.update({k: float(v) for k, v in m.items()})
    for k, v in m.items():
      if k != "params_finite":
        acc.setdefault(k, []).append(float(v))

  try:
    train_input.start(start)
    step = start
    timing["loop"] = time.time()
    while step < steps:
      batch_data = next(train_input)
      state, metrics = train_step(state, batch_data)
      step += 1
      if timing["t0"] is None:  # throughput excludes the compiling step
        jax.block_until_ready(metrics)
        timing["t0"], timing["n0"] = time.time(), step
      pending.append((step, metrics))
      if len(pending) > _MAX_STEPS_AHEAD:
        # Wait (without a copy) for an older step; it is usually done.
        jax.block_until_ready(pending[-1 - _MAX_STEPS_AHEAD][1])
      # [SIGTERM received, training time budget spent], on this process.
      flags = np.asarray([preempt.is_set(), bool(
          max_train_s and time.time() - timing["loop"] >= max_train_s)])
      if jax.process_count() > 1:
        # Every process must stop at the same step (the checkpoint save is
        # collective), so the local flags count only at the steps where all
        # processes compare them.
        if step % log_every == 0:
          from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
          flags = np.any(multihost_utils.process_allgather(flags), axis=0)
        else:
          flags = np.zeros(2, bool)
        flags[0] = flags[0] or checkpointer.reached_preemption(step)
      stop = bool(flags.any())
      save = step % every == 0 or step == steps or stop
      if save or step % log_every == 0 or step_callback is not None:
        check_pending()
      if save:
        checkpointer.save(step, state, force=True)
      if step % log_every == 0 or step == steps:
        elapsed = time.time() - timing["t0"]
        rate = (step - timing["n0"]) * batch / elapsed if elapsed > 0 else 0.0
        scalars = {k: float(np.mean(v)) for k, v in acc.items()}
        scalars["images_per_sec"] = rate
        acc.clear()
        writer.write_scalars(step, scalars)
        if pbar is not None:
          pbar.set_postfix(loss=f"{scalars.get('loss', float('nan')):.4f}",
                           img_s=f"{rate:.0f}")
        else:  # batch jobs: the log is the progress report
          logging.info("step %d/%d: loss %.4f, %.0f images/s", step, steps,
                       scalars.get("loss", float("nan")), rate)
      if eval_every and step % eval_every == 0 and step != steps:
        ev = evaluate(config, init_model, state, mesh, knn_only=True)
        writer.write_scalars(step, {f"eval/{k}": v for k, v in ev.items()})
        logging.info("step %d: %s", step, ev)
      if pbar is not None:
        pbar.update(1)
      if step_callback is not None:
        step_callback(step)
      # SIGTERM always stops (exit promptly); a budget spent on the last step
      # leaves a complete run.
      if flags[0] or (stop and step < steps):
        status = "preempted" if flags[0] else "time_budget"
        logging.warning("Stopped at step %d (%s); checkpoint saved.", step,
                        "SIGTERM" if flags[0] else
                        f"max_train_seconds={max_train_s:g} spent")
        break
    check_pending()
  finally:
    if pbar is not None:
      pbar.close()
    preempt.uninstall()
    checkpointer.wait()
    writer.flush()

  loop_time = (time.time() - timing["loop"]) if timing["loop"] else 0.0
  train_time = (time.time() - timing["t0"]) if timing["t0"] else 0.0
  rate = ((step - timing["n0"]) * batch / train_time if train_time > 0 else
          0.0)
  results: dict[str, Any] = {
      "status": status, "step": int(step), "total_steps": int(steps),
      "final_loss": last.get("loss"),
      "images_per_sec": rate, "train_time_s": train_time,
      "loop_time_s": loop_time,
      "devices": int(mesh.size),
      "processes": jax.process_count(),
      "device_kind": jax.devices()[0].device_kind,
      "global_batch_size": batch, "dataset": config.dataset,
      "eval_split": input_lib.run_splits(config)[1],
  }
  # A run stopped by its time budget is evaluated as it stands (a preempted
  # one is not: it resumes to finish).
  if status in ("completed", "time_budget") and config.eval.get("final",
                                                                 True):
    data = load_eval_data(config)
    final = evaluate(config, init_model, state, mesh, data=data)
    if state.ema:
      # The same run's online weights: a paired measure of what the
      # average adds.
      final.update({f"online_{k}": v for k, v in evaluate(
          config, init_model, state, mesh, online=True, data=data).items()})
    results.update(final)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in final.items()
                                if isinstance(v, float)})
  results["wall_time_s"] = time.time() - wall_start
  writer.close()
  checkpointer.close()
  if is_main:
    write_json(os.path.join(workdir, "results.json"), results)
  return results
