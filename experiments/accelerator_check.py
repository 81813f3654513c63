"""Accelerator check of issue 7: train-step speed, tiled NT-Xent, CIFAR-10 run.

    bash experiments/accelerator_check.sh            # on the GPU machine
    python -m experiments.accelerator_check --out_dir=/tmp/acc
    # a CPU smoke run (tiny sizes, a few minutes):
    JAX_PLATFORMS=cpu python -m experiments.accelerator_check --batches=16 \
        --steps=2 --tiled_batches=512 --block_size=128 \
        --config_arg=sgd,resnet18,smooth,cutout,runlocal --data_dir=../shared/data \
        --train_minutes=1 --out_dir=/tmp/acc_out

Three parts (``--parts``), each reported in one markdown table, written with
a JSON of every number to ``--out_dir`` (default ``$OUT``, else
``./accelerator_check_out``):

* ``train_step``: images/s and model FLOP utilisation of the library's real
  training step (``loop.build`` + ``make_train_step`` with the SimCLR config:
  ResNet-18 with a CIFAR stem, BN projection 2048 -> 128, NT-Xent, LARS) in
  bfloat16, two views, at each of ``--batches``, on synthetic data already on
  the device. FLOPs per step are XLA's ``cost_analysis()`` of the compiled
  step, or the analytic 3 x forward count where XLA's covers under half of
  it (on GPUs the cuDNN convolutions are custom calls it does not count:
  ``step_flops``); MFU = FLOPs/step x steps/s / ``--peak_tflops``.
  ``--train_step_optimizer=sgd`` / ``--notrain_step_probe`` time the step
  without LARS / the online probe; ``--train_step_norm=autodiff,remat,custom``
  times each batch with each backward pass of the backbone's BatchNorm +
  ReLU (``ResNet(norm_backward=...)``, ``contrastive_jax.models.norm``: the
  same function, fewer bytes moved); ``--profile_steps=N`` traces N more
  steps per batch (and variant) into ``profile_b<batch>[_<variant>].xplane.pb``, which
  ``experiments/profile_summary.py`` breaks down by kernel.
* ``tiled``: value + gradient of ``losses.nt_xent_loss(block_size=...)`` at
  each of ``--tiled_batches`` (D = ``--dim``): minimum of 2 timed calls after
  one warm-up, peak device memory (``memory_stats()["peak_bytes_in_use"]``)
  and XLA's own buffer sizes. Out of memory at a block size, it retries once
  at half that block size.
* ``cifar``: ``training.train_and_evaluate`` with ``--config`` (default
  ``experiments/configs/cifar10_gpu.py:sgd,resnet18,smooth,cutout``, the best recipe
  measured on an H200) on CIFAR-10 under ``--data_dir``,
  stopped (checkpoint, then evaluated) if its training loop passes
  ``--train_minutes``, for as many epochs as the budget fits
  (``--cifar_epochs=auto``: a short calibration run of the same config
  measures its images/s first); classifier (also with flip, and flip +
  translate, test-time augmentation, airbench's metric, when the config sets
  ``eval.tta_flip`` / ``eval.tta_translate``) / kNN /
  linear-probe top-1 on the validation split, wall time and images/s.

By default (``--isolate``) each part runs in a subprocess of its own: a
crash, a hang or an out-of-memory in one part leaves the others' results,
peak memory is per part, and the parts share ``--time_limit_s`` (each gets
what the later ones do not need; see ``RESERVE_S``). Results are written
after every part, so a run killed from outside still leaves the finished
ones. Subprocess logs go to ``<out_dir>/<part>.log``.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging as absl_logging

from experiments.benchmarks._util import min_time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ("train_step", "tiled", "cifar")
# Seconds a part is sure to get: an earlier part's time limit leaves these
# to the parts after it (the rest of --time_limit_s goes to the earlier one).
RESERVE_S = {"train_step": 90, "tiled": 90, "cifar": 240}
# Seconds of the cifar part's time limit kept for loading data, the final
# evaluation and stopping: the training loop gets the rest, at most
# --train_minutes.
CIFAR_OVERHEAD_S = 120
# ResNet-18 with the CIFAR stem: 0.556 GMAC forward per 32x32 image.
RESNET18_CIFAR_FWD_FLOPS = 2 * 0.556e9
TABLE_FILE = "accelerator_check.md"
JSON_FILE = "accelerator_check.json"

_PARTS = flags.DEFINE_list("parts", list(PARTS), f"Parts to run, among {PARTS}.")
_OUT_DIR = flags.DEFINE_string(
    "out_dir", None, "Where the table and JSON go; default $OUT, else"
    " ./accelerator_check_out.")
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops", 989.0, "Peak dense TFLOP/s for MFU (H200 bf16: 989).")
_BATCHES = flags.DEFINE_list("batches", ["512", "1024"],
                             "train_step: images per step (two views each).")
_STEPS = flags.DEFINE_integer("steps", 20, "train_step: timed steps.")
_DTYPE = flags.DEFINE_string("train_step_dtype", "bfloat16",
                             "train_step: model compute dtype.")
_STEP_OPTIMIZER = flags.DEFINE_string(
    "train_step_optimizer", "", "train_step: optimizer in place of the"
    " config's LARS (e.g. sgd), to time what the optimizer costs.")
_STEP_PROBE = flags.DEFINE_bool(
    "train_step_probe", True, "train_step: keep the config's online probe.")
_STEP_NORM = flags.DEFINE_list(
    "train_step_norm", ["autodiff"], "train_step: backward passes of the"
    " ResNet's BatchNorm + ReLU to time at each batch, among 'autodiff',"
    " 'remat' and 'custom' (ResNet norm_backward, contrastive_jax.models.norm).")
_PROFILE_STEPS = flags.DEFINE_integer(
    "profile_steps", 0, "train_step: after timing, trace this many steps with"
    " jax.profiler into <out_dir>/profile_b<batch>.xplane.pb (read it with"
    " experiments/profile_summary.py).")
_TILED_BATCHES = flags.DEFINE_list("tiled_batches", ["262144", "1048576"],
                                   "tiled: batch sizes N.")
_DIM = flags.DEFINE_integer("dim", 128, "tiled: embedding dimension D.")
_BLOCK = flags.DEFINE_integer(
    "block_size", 0, "tiled: block size; 0: the largest power of two up to"
    " 8192 whose tiles fit 3/4 of the device memory (auto_block_size).")
_TILED_DTYPE = flags.DEFINE_string("tiled_dtype", "float32",
                                   "tiled: embedding dtype.")
_TILED_BUDGET = flags.DEFINE_float(
    "tiled_budget_s", 30.0, "tiled: when the warm-up call takes longer, it is"
    " the only timed call.")
_CONFIG = flags.DEFINE_string(
    "config", os.path.join(REPO_ROOT, "experiments", "configs",
                           "cifar10_gpu.py"), "cifar: config file.")
_CONFIG_ARG = flags.DEFINE_string(
    "config_arg", "sgd,resnet18,smooth,cutout",
    "cifar: argument of get_config; the default is the best recipe of the"
    " H200 runs of 2026-11-29/30 (experiments/RESULTS.md).")
_DATA_DIR = flags.DEFINE_string("data_dir", "./.data",
                                "cifar: folder holding cifar10/train/.")
_TRAIN_MINUTES = flags.DEFINE_float(
    "train_minutes", 5.0, "cifar: time budget of the training loop.")
_CIFAR_EPOCHS = flags.DEFINE_string(
    "cifar_epochs", "auto",
    "cifar: training epochs, or 'auto': as many as the training budget fits"
    " (a short calibration run of the same config measures its images/s),"
    " at most --max_cifar_epochs. A config that sets num_steps (runlocal) is"
    " left as it is.")
_MAX_CIFAR_EPOCHS = flags.DEFINE_integer(
    "max_cifar_epochs", 400,
    "cifar: the most epochs --cifar_epochs=auto picks. 400 ResNet-18 epochs"
    " would take about 256 s alone on an H200 (70,370 images/s), so the"
    " budget decides, not this cap: by that rate, after the calibration run,"
    " about 25 s of compilation and EPOCH_FIT_MARGIN, about 290 epochs with"
    " --parts=cifar and about 200 in the full check, whose earlier parts use"
    " part of --time_limit_s.")
_CALIBRATION_STEPS = flags.DEFINE_integer(
    "calibration_steps", 150, "cifar: steps of the calibration run.")
_WORKDIR = flags.DEFINE_string(
    "workdir", "", "cifar: run directory; default a fresh temporary one.")
_ISOLATE = flags.DEFINE_bool("isolate", True,
                             "Run each part in its own subprocess.")
_TIME_LIMIT = flags.DEFINE_float(
    "time_limit_s", 540.0, "Seconds for all parts together (isolated runs).")
_WORKER = flags.DEFINE_string("worker", "", "Internal: run this part here.")
_WORKER_OUT = flags.DEFINE_string("worker_out", "",
                                  "Internal: the worker's result file.")


# ----------------------------------------------------------------------------
# Helpers.


def flops_from_cost_analysis(cost: Any) -> float | None:
  """The ``flops`` of ``Compiled.cost_analysis()``: a dict, a list of dicts
  (older JAX: one per program) or None."""
  if cost is None:
    return None
  if isinstance(cost, (list, tuple)):
    values = [flops_from_cost_analysis(c) for c in cost]
    values = [v for v in values if v is not None]
    return float(sum(values)) if values else None
  if isinstance(cost, dict) or hasattr(cost, "get"):
    value = cost.get("flops")
    if value is None:
      return None
    value = float(value)
    return value if value > 0 and math.isfinite(value) else None
  return None


# XLA's count below this share of the analytic count is taken to leave out
# work it cannot see: on GPU the convolutions run as cuDNN custom calls, which
# cost_analysis() does not count (H200, jax 0.11.2: 0.028 of 3.42 TFLOP for
# the batch-512 ResNet-18 step; on CPU the two agree within 10%).
XLA_FLOPS_TRUSTED_SHARE = 0.5


def step_flops(xla_flops: float | None,
               analytic_flops: float) -> tuple[float, str]:
  """The FLOPs per step that MFU is computed from, and where they come from.

  XLA's ``cost_analysis()`` count when it covers at least
  ``XLA_FLOPS_TRUSTED_SHARE`` of the analytic ``3 x forward`` count, else the
  analytic count.
  """
  if xla_flops and xla_flops >= XLA_FLOPS_TRUSTED_SHARE * analytic_flops:
    return float(xla_flops), "xla"
  return float(analytic_flops), "analytic"


def _cost_flops(stage) -> float | None:
  try:
    return flops_from_cost_analysis(stage.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    return None


def _memory_analysis(compiled) -> dict[str, int]:
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {}
  for name in ("temp_size_in_bytes", "argument_size_in_bytes",
               "output_size_in_bytes", "alias_size_in_bytes",
               "generated_code_size_in_bytes"):
    v = getattr(m, name, None)
    if v is not None:
      out[name] = int(v)
  return out


def peak_memory_bytes() -> int | None:
  """``peak_bytes_in_use`` of device 0 since the process started, or None."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except
    return None
  if not stats:
    return None
  v = stats.get("peak_bytes_in_use")
  return None if v is None else int(v)


def device_info() -> dict[str, Any]:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()
  return {"device_kind": d[0].device_kind, "platform": d[0].platform,
          "device_count": len(d), "jax_version": jax.__version__}


def _is_oom(err: BaseException) -> bool:
  text = f"{type(err).__name__}: {err}"
  return any(m in text for m in ("RESOURCE_EXHAUSTED", "Out of memory",
                                 "out of memory", "OOM"))


def _err(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return f"{type(err).__name__}: {text[0][:300] if text else ''}"


# ----------------------------------------------------------------------------
# Part a: the training step.


def train_step_throughput(batch_size: int, *, steps: int = 20,
                          dtype: str = "bfloat16", views: int = 2,
                          peak_tflops: float = 989.0,
                          warmup: int = 2, optimizer: str = "",
                          online_probe: bool = True,
                          profile_path: str = "",
                          profile_steps: int = 5,
                          norm_backward: str = "autodiff") -> dict[str, Any]:
  """Images/s and MFU of the real SimCLR train step (ResNet-18, NT-Xent).

  ``experiments/configs/simclr_cifar10.py`` with ``batch_size`` and
  ``model.dtype`` overridden, built by ``loop.build`` and stepped by
  ``make_train_step`` on a one-device mesh; the batch is random float32
  ``[B, views, 32, 32, 3]`` already on the device. ``optimizer`` (e.g.
  ``"sgd"``) replaces the config's LARS and ``online_probe=False`` drops the
  probe head, to time what each costs; ``norm_backward`` picks the
  backbone's BatchNorm + ReLU backward pass; with ``profile_path``,
  ``profile_steps`` more steps are traced by ``jax.profiler`` after the
  timing, into that ``.xplane.pb`` file (``experiments/profile_summary.py``
  reads it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  from experiments.configs import simclr_cifar10  # pylint: disable=g-import-not-at-top

  c = simclr_cifar10.get_config()
  c.batch_size = int(batch_size)
  c.model.dtype = dtype
  c.data.views = views
  if optimizer:
    c.optimizer.name = optimizer
  c.model.online_probe = bool(online_probe)
  c.model.backbone_kwargs = dict(c.model.backbone_kwargs,
                                 norm_backward=norm_backward)
  mesh = loop.make_mesh(1)
  info = types.SimpleNamespace(num_classes=10, image_shape=(32, 32, 3),
                               num_train=50_000)
  _, train_model, tx, schedule, state = loop.build(c, mesh, info, steps=10_000)
  train_step = step_lib.make_train_step(train_model, tx, schedule, c, mesh)
  shard = NamedSharding(mesh, P(step_lib.AXIS))
  images = jax.device_put(
      jax.random.normal(jax.random.key(0), (batch_size, views, 32, 32, 3),
                        jnp.float32), shard)
  batch = {"image": images,
           "label": jax.device_put(jnp.arange(batch_size, dtype=jnp.int32),
                                   shard)}
  t = time.perf_counter()
  lowered = train_step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t
  flops = _cost_flops(compiled)
  flops_lowered = _cost_flops(lowered)
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready((state, metrics))
  elapsed = time.perf_counter() - t
  if profile_path:
    _trace_steps(lambda s: compiled(s, batch), state, profile_steps,
                 profile_path)
  loss = float(np.asarray(metrics["loss"]))
  steps_per_s = steps / elapsed
  n_views = batch_size * views
  analytic = 3 * RESNET18_CIFAR_FWD_FLOPS * n_views
  mfu_flops, mfu_source = step_flops(flops, analytic)
  res = {
      "batch_size": int(batch_size), "views": views, "dtype": dtype,
      "steps": steps, "step_time_s": elapsed / steps,
      "images_per_s": batch_size * steps_per_s,
      "views_per_s": n_views * steps_per_s,
      "compile_s": compile_s,
      "flops_per_step": flops, "flops_per_step_lowered": flops_lowered,
      "analytic_flops_per_step": analytic,
      "peak_tflops": peak_tflops,
      "mfu": mfu_flops * steps_per_s / (peak_tflops * 1e12),
      "mfu_flops_source": mfu_source,
      "mfu_xla": (flops * steps_per_s / (peak_tflops * 1e12)
                  if flops else None),
      "mfu_analytic": analytic * steps_per_s / (peak_tflops * 1e12),
      "loss": loss, "loss_finite": math.isfinite(loss),
      "xla_memory": _memory_analysis(compiled),
      "peak_bytes_in_use": peak_memory_bytes(),
      "optimizer": c.optimizer.name, "online_probe": bool(online_probe),
      "norm_backward": norm_backward,
      "profile": os.path.basename(profile_path) or None,
      "model": "ResNet-18 (CIFAR stem) + BN projection 2048->128, NT-Xent"
               f" T=0.2, {c.optimizer.name.upper()}"
               + (", online probe" if online_probe else ", no probe")
               + _norm_label(norm_backward) + " (simclr_cifar10.py)",
      "data": "synthetic, on device",
  }
  return res


def _norm_label(norm_backward: str) -> str:
  """The train step's description suffix for a BatchNorm backward variant."""
  return ("" if norm_backward == "autodiff"
          else f", BN+ReLU backward: {norm_backward}")


def _trace_steps(step: Callable[[Any], tuple[Any, Any]], state, steps: int,
                 path: str) -> None:
  """Traces ``steps`` calls of ``step`` into the one file ``path``.

  Without the Python tracer the trace holds little but the device's kernels;
  the profiler's folder tree is flattened to one file because the GPU
  machine returns files at most two folders below ``$OUT``.
  """
  import jax  # pylint: disable=g-import-not-at-top
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  options.host_tracer_level = 1
  tmp = tempfile.mkdtemp(prefix="trace_")
  with jax.profiler.trace(tmp, profiler_options=options):
    for _ in range(steps):
      state, metrics = step(state)
    jax.block_until_ready((state, metrics))
  found = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
  if found:
    shutil.copyfile(found[0], path)
  shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------
# Part b: tiled NT-Xent.


def auto_block_size(batch: int, *, itemsize: int = 4,
                    max_block: int = 8192, default: int = 4096) -> int:
  """A block size whose tiles fit 3/4 of device 0's allocator limit.

  XLA keeps about 8 ``[batch, block]`` float32 arrays live in the tiled
  value + gradient (``memory_analysis().temp_size_in_bytes`` on CPU: 7.5-8.0x
  ``batch * block * 4`` bytes). On an H200 with 92% of its ~140 GB given to
  JAX (the tiled worker's ``XLA_PYTHON_CLIENT_MEM_FRACTION``) that gives 8192
  at N = 262,144 and 2048 at N = 1,048,576. ``default`` when the device does
  not tell its memory (CPU).
  """
  import jax  # pylint: disable=g-import-not-at-top
  try:
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except
    limit = None
  block = min(default, max_block) if not limit else max_block
  while block > 128 and block >= 2 * batch:  # no block mostly padding
    block //= 2
  if not limit:
    return block
  while block > 128 and 8 * batch * block * itemsize > 0.75 * limit:
    block //= 2
  return block


def tiled_value_and_grad(batch: int, *, dim: int = 128,
                         block_size: int = 0, dtype: str = "float32",
                         temperature: float = 0.1, repeats: int = 2,
                         budget_s: float = 30.0,
                         oom_retry: bool = True) -> dict[str, Any]:
  """Time and memory of ``nt_xent_loss(block_size=...)`` value + gradient.

  Random ``[batch, dim]`` embeddings made on the device, SimCLR labels
  ``[0..N/2-1, 0..N/2-1]``; ``block_size=0`` picks :func:`auto_block_size`.
  On out-of-memory the measurement is repeated once at half the block size
  (``oom_at_block_size`` records it).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from contrastive_jax import losses  # pylint: disable=g-import-not-at-top

  jdtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
  if not block_size:
    block_size = auto_block_size(batch, itemsize=4)
  x = jax.random.normal(jax.random.key(0), (batch, dim), jdtype)
  labels = jnp.tile(jnp.arange(batch // 2, dtype=jnp.int32), 2)
  fn = jax.jit(jax.value_and_grad(lambda e, l: losses.nt_xent_loss(
      e, l, temperature=temperature, block_size=block_size)))
  try:
    t = time.perf_counter()
    compiled = fn.lower(x, labels).compile()
    compile_s = time.perf_counter() - t
    out = []

    def call():
      out[:] = [jax.block_until_ready(compiled(x, labels))]

    seconds, runs = min_time(call, repeats=repeats, budget_s=budget_s)
  except Exception as e:  # pylint: disable=broad-except
    if oom_retry and _is_oom(e) and block_size >= 256:
      del x, labels
      res = tiled_value_and_grad(
          batch, dim=dim, block_size=block_size // 2, dtype=dtype,
          temperature=temperature, repeats=repeats, budget_s=budget_s,
          oom_retry=False)
      res["oom_at_block_size"] = block_size
      res["oom_error"] = _err(e)
      return res
    raise
  loss, grad = out[0]
  loss = float(np.asarray(loss))
  grad_finite = bool(jnp.all(jnp.isfinite(grad)))
  # Matmul work of the tiled schedule: two forward passes (log-sum-exp,
  # then the loss terms), one recomputation and two products backward.
  model_flops = 5 * 2 * float(batch) ** 2 * dim
  return {
      "batch": int(batch), "dim": dim, "block_size": block_size,
      "dtype": dtype, "temperature": temperature,
      "time_s": seconds, "timed_runs": runs, "compile_s": compile_s,
      "loss": loss, "finite": math.isfinite(loss) and grad_finite,
      "matmul_flops": model_flops, "matmul_tflops_per_s":
          model_flops / seconds / 1e12,
      "peak_bytes_in_use": peak_memory_bytes(),
      "xla_memory": _memory_analysis(compiled),
  }


# ----------------------------------------------------------------------------
# Part c: CIFAR-10 run.


def load_config(path: str, arg: str = ""):
  """``get_config(arg)`` of a config file (no ml_collections flags needed)."""
  spec = importlib.util.spec_from_file_location("_accelerator_check_config",
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


# The CIFAR runs' training split: 45,000 of the 50,000 train images.
CIFAR_NUM_TRAIN = 45_000
# Share of the loop's budget (after compilation) that the fitted epochs
# may fill: the rest absorbs a slower step than the calibration's, the
# final checkpoint and the step rate's noise.
EPOCH_FIT_MARGIN = 0.8


def measure_step_rate(config, *, steps: int) -> dict[str, float]:
  """Images/s of ``config``'s own training loop, from a short run of it.

  ``train_and_evaluate`` with ``num_steps=steps``, no evaluation, in a
  temporary workdir: the same data, on-device augmentation and step as the
  run it calibrates. Logged in three windows; the last one's rate is the
  steady rate. The compilation's time is the loop's first step less one
  steady step (``loop_time_s - train_time_s`` of the run's results: its
  images/s leave the compiling step out).
  """
  from contrastive_jax import training  # pylint: disable=g-import-not-at-top

  c = config.copy_and_resolve_references()
  c.num_steps = int(steps)
  c.log_every = max(1, int(steps) // 3)
  c.eval.final = False
  c.checkpoint.every_steps = 10 * int(steps)
  c.checkpoint.async_save = False
  start = time.time()
  with tempfile.TemporaryDirectory(prefix="acc_calibrate_") as workdir:
    results = training.train_and_evaluate(c, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      windows = [m for m in map(json.loads, f) if "images_per_sec" in m]
  if len(windows) < 2:
    raise RuntimeError(f"calibration logged {len(windows)} rate windows;"
                       " need 2 (more --calibration_steps)")
  rate = float(windows[-1]["images_per_sec"])
  compile_s = max(0.0, results["loop_time_s"] - results["train_time_s"]
                  - int(c.batch_size) / rate)
  return {"steps": int(steps), "images_per_s": rate,
          "compile_s": compile_s, "wall_s": time.time() - start}


def fit_epochs(images_per_s: float, loop_seconds: float, *, compile_s: float,
               num_train: int, max_epochs: int) -> int:
  """The most whole epochs that a training loop of ``loop_seconds`` (which
  includes ``compile_s`` of compilation) fits, with ``EPOCH_FIT_MARGIN``
  to spare; at least 1, at most ``max_epochs``."""
  usable = max(0.0, loop_seconds - compile_s) * EPOCH_FIT_MARGIN
  return int(max(1, min(max_epochs, math.floor(
      usable * images_per_s / num_train))))


def cifar_run(config, workdir: str, *, train_seconds: float,
              out_dir: str | None = None) -> dict[str, Any]:
  """``train_and_evaluate(config, workdir)`` with its loop capped in time.

  The cap is the loop's own ``config.max_train_seconds`` (compilation
  included): when it stops the loop, the run saves and is evaluated as it
  stands, as the finished run would have been. ``workdir``'s
  ``results.json`` and ``metrics.jsonl`` are copied to ``out_dir``.
  """
  from contrastive_jax import training  # pylint: disable=g-import-not-at-top

  start = time.time()
  config.max_train_seconds = max(float(train_seconds), 1e-9)
  results = training.train_and_evaluate(config, workdir)
  res = {k: v for k, v in results.items()
         if isinstance(v, (int, float, str, bool)) or v is None}
  res["stopped_by_budget"] = res.get("status") == "time_budget"
  res["train_budget_s"] = train_seconds
  res["loop_s"] = res.get("loop_time_s")
  res["call_wall_s"] = time.time() - start
  steps_per_epoch = max(1, 45_000 // int(config.batch_size))
  res["epochs"] = res.get("step", 0) / steps_per_epoch
  res["config_summary"] = config_summary(config)
  if out_dir:
    for name, dest in (("results.json", "cifar_results.json"),
                       ("metrics.jsonl", "cifar_metrics.jsonl")):
      src = os.path.join(workdir, name)
      if os.path.exists(src):
        shutil.copyfile(src, os.path.join(out_dir, dest))
  return res


def config_summary(config) -> str:
  m, o, l = config.model, config.optimizer, config.loss
  kw = dict(m.get("backbone_kwargs", {}) or {})
  loss = []
  if l.get("name"):
    loss.append(f"{l.weight:g}x{l.name}")
  if l.get("ce_weight"):
    loss.append(f"{l.ce_weight:g}xCE" + (
        f" (smoothing {l.label_smoothing:g})" if l.get("label_smoothing")
        else ""))
  epochs = (f"{config.num_steps} steps" if config.get("num_steps", 0)
            else f"{config.num_epochs} epochs")
  sam = (f" + SAM rho {o.sam_rho:g}" if o.get("sam_rho", 0.0) else "")
  return (f"{m.backbone}{tuple(kw.get('widths', ())) or ''}, "
          f"{'+'.join(loss)}, {m.dtype}, batch {config.batch_size}, "
          f"{o.name} lr {o.learning_rate:g}{sam}, {epochs}, "
          f"{config.input} input, {config.data.augment}")


# ----------------------------------------------------------------------------
# The table.


def _gib(b) -> str:
  if b is None:
    return "n/a"
  return f"{b / 2**30:.1f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _secs(t) -> str:
  return "n/a" if t is None else (f"{t:.3f} s" if t >= 1 else
                                  f"{t * 1e3:.2f} ms")


def _num(x, fmt="{:,.0f}") -> str:
  return "n/a" if x is None else fmt.format(x)


def _pct(x) -> str:
  if x is None:
    return "n/a"
  return f"{100 * x:.1f}%" if x >= 0.001 else f"{100 * x:.2g}%"


def _rows_train_step(part: dict) -> list[list[str]]:
  rows = []
  for r in part.get("runs", []):
    if "error" in r:
      rows.append(["train step", f"batch {r.get('batch_size')}"
                   + _norm_label(r.get("norm_backward", "autodiff")),
                   f"FAILED: {r['error']}", ""])
      continue
    tf = r.get("flops_per_step")
    analytic = r.get("analytic_flops_per_step")
    mfu, source = r.get("mfu"), None
    if analytic:  # recomputed, so that older records get the same choice
      flops, source = step_flops(tf, analytic)
      mfu = flops / r["step_time_s"] / (r["peak_tflops"] * 1e12)
    rows.append([
        "train step",
        f"ResNet-18 + proj, NT-Xent, {r['dtype']}, batch {r['batch_size']}"
        f" x {r['views']} views, synthetic on-device data"
        + (f", {r['optimizer']}" if r.get("optimizer", "lars") != "lars"
           else "")
        + ("" if r.get("online_probe", True) else ", no probe")
        + _norm_label(r.get("norm_backward", "autodiff")),
        f"{_num(r['images_per_s'])} img/s ({_num(r['views_per_s'])} views/s);"
        f" MFU {_pct(mfu)}" + (f" ({source} FLOPs)" if source else ""),
        f"{_num(tf and tf / 1e12, '{:.2f}')} TFLOP/step (XLA; analytic 3 x"
        f" forward: {_num(analytic and analytic / 1e12, '{:.2f}')}),"
        " peak"
        f" {r['peak_tflops']:g} TFLOP/s; {r['step_time_s'] * 1e3:.1f} ms/step;"
        f" compile {r['compile_s']:.0f} s; peak mem"
        f" {_gib(r.get('peak_bytes_in_use'))}"])
  return rows


def _rows_tiled(part: dict) -> list[list[str]]:
  rows = []
  for r in part.get("runs", []):
    if "error" in r:
      rows.append(["tiled NT-Xent", f"N={_num(r.get('batch'))}",
                   f"FAILED: {r['error']}", ""])
      continue
    xla = r.get("xla_memory", {})
    note = (f" (OOM at block {r['oom_at_block_size']})"
            if "oom_at_block_size" in r else "")
    timing = ("min of 2 after warm-up" if r["timed_runs"] > 1
              else "one call")
    rows.append([
        "tiled NT-Xent",
        f"value+grad, N={r['batch']:,}, D={r['dim']}, {r['dtype']},"
        f" block {r['block_size']}{note}",
        f"{_secs(r['time_s'])} ({timing}); peak mem"
        f" {_gib(r.get('peak_bytes_in_use'))}",
        f"XLA temp {_gib(xla.get('temp_size_in_bytes'))}; "
        f"{r['matmul_tflops_per_s']:.3g} TFLOP/s of matmul (10 N^2 D);"
        f" compile {r['compile_s']:.0f} s; finite: {r['finite']}"])
  return rows


def _tta_note(result: dict) -> str:
  """`` (94.6% with flip TTA, 94.7% with flip + translate)`` or ``""``."""
  notes = [f"{_pct(result[key])} with {what}" for key, what in (
      ("classifier_top1_tta_flip", "flip TTA"),
      ("classifier_top1_tta_flip_translate", "flip + translate"))
           if result.get(key) is not None]
  return f" ({', '.join(notes)})" if notes else ""


def _rows_cifar(part: dict) -> list[list[str]]:
  r = part.get("result")
  if not r:
    return [["CIFAR-10", part.get("config", ""),
             f"FAILED: {part.get('error', 'no result')}", ""]]
  notes = (f"stopped by the {r['train_budget_s']:.0f} s budget at step"
           f" {r.get('step')}/{r.get('total_steps')}; "
           if r.get("stopped_by_budget") else "")
  cal = part.get("calibration") or {}
  if "fitted_epochs" in cal:
    notes += (f"{cal['fitted_epochs']} epochs fitted to the budget (config:"
              f" {cal['config_epochs']}) from a {cal['steps']}-step"
              f" calibration run at {_num(cal['images_per_s'])} img/s; ")
  elif "error" in cal:
    notes += f"calibration FAILED ({cal['error']}), config's epochs; "
  macro = (f", macro recall / F1 {_pct(r['classifier_macro_recall'])} /"
           f" {_pct(r.get('classifier_macro_f1'))}"
           if r.get("classifier_macro_recall") is not None else "")
  return [[
      "CIFAR-10",
      f"{r.get('config_summary', '')}; validation = 5,000 held-out train"
      " images",
      f"classifier {_pct(r.get('classifier_top1'))}{_tta_note(r)}{macro},"
      f" kNN {_pct(r.get('knn_top1'))}, linear probe"
      f" {_pct(r.get('linear_probe_top1'))}",
      f"{notes}{r.get('epochs', 0):.1f} epochs, training loop"
      f" {_num(r.get('loop_s'), '{:.0f}')} s (incl. compile),"
      f" {_num(r.get('images_per_sec'))} img/s; wall"
      f" {_num(r.get('call_wall_s'), '{:.0f}')} s"]]


def format_table(results: dict) -> str:
  """The markdown report: a header line and one table of every part."""
  meta = results.get("meta", {})
  parts = results.get("parts", {})
  rows = []
  for name, fn in (("train_step", _rows_train_step), ("tiled", _rows_tiled),
                   ("cifar", _rows_cifar)):
    if name not in parts:
      continue
    part = parts[name]
    if "error" in part and name != "cifar":
      rows.append([name, "", f"FAILED: {part['error']}", ""])
    rows.extend(fn(part))
  header = ["part", "setting", "result", "details"]
  cells = [[str(c).replace("|", "/") for c in row] for row in rows]
  lines = ["| " + " | ".join(header) + " |",
           "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(row) + " |" for row in cells]
  kinds = sorted({v for v in meta.get("device_kinds", {}).values() if v})
  head = (f"Accelerator check (issue 7), {meta.get('date', '')}: device"
          f" {', '.join(kinds) or 'n/a'}; jax {meta.get('jax_version', 'n/a')};"
          f" MFU peak {meta.get('peak_tflops', 'n/a')} TFLOP/s.")
  return head + "\n\n" + "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Running the parts.


def _batch_list(values) -> list[int]:
  return [int(str(v).replace("_", "")) for v in values]


def _norm_variants(values) -> list[str]:
  from contrastive_jax.models import norm  # pylint: disable=g-import-not-at-top
  if not values or set(values) - set(norm.BACKWARDS):
    raise ValueError(f"--train_step_norm takes some of {norm.BACKWARDS}, got"
                     f" {list(values)}.")
  return list(values)


def _sweep(res: dict, part: str, sizes, size_key, measure, save) -> None:
  """``measure(size)`` for each size into ``res["runs"]``; a failure is a row.

  ``size_key`` names the size in a failure's row; a tuple of names, one per
  element, when each size is a tuple.
  """
  res["runs"] = []
  for size in sizes:
    try:
      r = measure(size)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      r = (dict(zip(size_key, size)) if isinstance(size_key, tuple)
           else {size_key: size})
      r["error"] = _err(e)
    res["runs"].append(r)
    print(f"[{part}] {json.dumps(r, default=str)}", flush=True)
    save(res)


def _fit_epochs_by_calibration(config, train_s: float) -> tuple[float, dict]:
  """Sets ``config.num_epochs`` to what the rest of ``train_s`` fits.

  Returns the loop budget left after the calibration run (it comes out of
  the part's time, failed or not) and the calibration's record; when it
  fails, the config keeps its own epochs.
  """
  start = time.time()
  try:
    cal = measure_step_rate(config, steps=_CALIBRATION_STEPS.value)
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    cal = {"error": _err(e)}
  train_s = max(30.0, train_s - (time.time() - start))
  if "error" not in cal:
    cal["config_epochs"] = int(config.num_epochs)
    config.num_epochs = fit_epochs(
        cal["images_per_s"], train_s, compile_s=cal["compile_s"],
        num_train=CIFAR_NUM_TRAIN, max_epochs=_MAX_CIFAR_EPOCHS.value)
    cal["fitted_epochs"] = int(config.num_epochs)
  return train_s, cal


def run_part(part: str, *, out_dir: str, cifar_train_s: float,
             save: Callable[[dict], None] = lambda r: None) -> dict:
  """Runs one part here; ``save`` gets the partial result after each item."""
  res: dict[str, Any] = {}
  try:
    res.update(device_info())
  except Exception as e:  # pylint: disable=broad-except
    res["error"] = _err(e)
    save(res)
    return res
  save(res)
  if part == "train_step":
    norms = _norm_variants(_STEP_NORM.value)
    _sweep(res, part, [(b, n) for b in _batch_list(_BATCHES.value)
                       for n in norms], ("batch_size", "norm_backward"),
           lambda bn: train_step_throughput(
               bn[0], steps=_STEPS.value, dtype=_DTYPE.value,
               peak_tflops=_PEAK_TFLOPS.value,
               optimizer=_STEP_OPTIMIZER.value,
               online_probe=_STEP_PROBE.value,
               profile_path=(os.path.join(
                   out_dir, f"profile_b{bn[0]}"
                   + ("" if bn[1] == "autodiff" else f"_{bn[1]}")
                   + ".xplane.pb") if _PROFILE_STEPS.value else ""),
               profile_steps=_PROFILE_STEPS.value,
               norm_backward=bn[1]),
           save)
  elif part == "tiled":
    _sweep(res, part, _batch_list(_TILED_BATCHES.value), "batch",
           lambda n: tiled_value_and_grad(n, dim=_DIM.value,
                                          block_size=_BLOCK.value,
                                          dtype=_TILED_DTYPE.value,
                                          budget_s=_TILED_BUDGET.value),
           save)
  elif part == "cifar":
    res["config"] = f"{os.path.relpath(_CONFIG.value, REPO_ROOT)}" + (
        f":{_CONFIG_ARG.value}" if _CONFIG_ARG.value else "")
    try:
      config = load_config(_CONFIG.value, _CONFIG_ARG.value)
      config.data_dir = _DATA_DIR.value
      config.progress_bar = False
      config.distributed.mode = "off"  # one process, whatever the env says
      workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="acc_cifar_")
      res["workdir"] = workdir
      train_s = cifar_train_s
      if _CIFAR_EPOCHS.value == "auto" and not config.get("num_steps", 0):
        train_s, res["calibration"] = _fit_epochs_by_calibration(
            config, cifar_train_s)
        print(f"[cifar] calibration: {res['calibration']}", flush=True)
        save(res)
      elif _CIFAR_EPOCHS.value not in ("", "auto"):
        config.num_epochs = int(_CIFAR_EPOCHS.value)
      res["result"] = cifar_run(config, workdir, train_seconds=train_s,
                                out_dir=out_dir)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      res["error"] = _err(e)
    save(res)
  else:
    raise ValueError(f"unknown part {part!r}; parts: {PARTS}")
  return res


def _cifar_train_seconds(part_timeout_s: float | None) -> float:
  s = _TRAIN_MINUTES.value * 60.0
  if part_timeout_s is not None:
    s = min(s, max(30.0, part_timeout_s - CIFAR_OVERHEAD_S))
  return s


class _Terminated(Exception):
  pass


def _raise_terminated(signum, frame):
  del frame
  raise _Terminated(f"signal {signum}")


def _run_isolated(part: str, timeout_s: float, out_dir: str,
                  tmp: str) -> dict:
  result_file = os.path.join(tmp, f"{part}.json")
  log_file = os.path.join(out_dir, f"{part}.log")
  cmd = [sys.executable, "-m", "experiments.accelerator_check",
         *sys.argv[1:], f"--worker={part}", f"--worker_out={result_file}",
         f"--out_dir={out_dir}",
         f"--train_minutes={_cifar_train_seconds(timeout_s) / 60.0}"]
  env = dict(os.environ)
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  if part == "tiled":  # the N x block tiles need most of the GPU's memory
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  start = time.time()
  status = "ok"
  with open(log_file, "w") as log:
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    try:
      rc = proc.wait(timeout=timeout_s)
      if rc != 0:
        status = f"exit code {rc}"
    except subprocess.TimeoutExpired:
      status = f"killed after its {timeout_s:.0f} s time limit"
      proc.kill()
      proc.wait()
    except _Terminated:
      status = "stopped: the check was terminated"
      proc.kill()
      proc.wait()
      raise
    finally:
      res: dict[str, Any] = {}
      if os.path.exists(result_file):
        with open(result_file) as f:
          res = json.load(f)
      res["wall_s"] = time.time() - start
      res["timeout_s"] = timeout_s
      res["status"] = status
      if status != "ok":
        tail = _tail(log_file, 6)
        res.setdefault("error", status + (f"; log tail: {tail}" if tail
                                          else ""))
      _run_isolated.last = res
  return res


def _tail(path: str, n: int) -> str:
  try:
    with open(path, errors="replace") as f:
      lines = [l.rstrip() for l in f.readlines() if l.strip()]
  except OSError:
    return ""
  return " / ".join(lines[-n:])[-600:]


def _write(results: dict, out_dir: str) -> str:
  table = format_table(results)
  with open(os.path.join(out_dir, TABLE_FILE), "w") as f:
    f.write(table)
  tmp = os.path.join(out_dir, JSON_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2, sort_keys=True, default=str)
  os.replace(tmp, os.path.join(out_dir, JSON_FILE))
  return table


class _QuietOrbax:
  """Drops orbax's per-save INFO lines from the log (as experiments.train)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def _worker(part: str) -> None:
  out_file = _WORKER_OUT.value
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())

  def save(res):
    if out_file:
      tmp = out_file + ".tmp"
      with open(tmp, "w") as f:
        json.dump(res, f, default=str)
      os.replace(tmp, out_file)

  run_part(part, out_dir=_OUT_DIR.value, cifar_train_s=_cifar_train_seconds(
      None), save=save)


def resolve_out_dir(value: str | None) -> str:
  out = value or os.environ.get("OUT") or "./accelerator_check_out"
  os.makedirs(out, exist_ok=True)
  return os.path.abspath(out)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if _WORKER.value:
    _worker(_WORKER.value)
    return
  parts = [p for p in PARTS if p in _PARTS.value]
  unknown = set(_PARTS.value) - set(PARTS)
  if unknown:
    raise app.UsageError(f"--parts: unknown {sorted(unknown)}; know {PARTS}")
  try:
    _norm_variants(_STEP_NORM.value)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  out_dir = resolve_out_dir(_OUT_DIR.value)
  results = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
                      "argv": sys.argv[1:], "parts": parts,
                      "peak_tflops": _PEAK_TFLOPS.value,
                      "isolate": _ISOLATE.value, "device_kinds": {}},
             "parts": {}}
  deadline = time.time() + _TIME_LIMIT.value
  previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    with tempfile.TemporaryDirectory(prefix="acc_check_") as tmp:
      for i, part in enumerate(parts):
        reserve = sum(RESERVE_S[p] for p in parts[i + 1:])
        timeout = max(30.0, deadline - time.time() - reserve)
        print(f"[{part}] starting (time limit {timeout:.0f} s)", flush=True)
        t = time.time()
        try:
          if _ISOLATE.value:
            res = _run_isolated(part, timeout, out_dir, tmp)
          else:
            res = run_part(part, out_dir=out_dir,
                           cifar_train_s=_cifar_train_seconds(timeout))
            res["wall_s"] = time.time() - t
        except _Terminated:
          last = getattr(_run_isolated, "last", None) or {
              "error": "terminated"}
          results["parts"][part] = last
          results["meta"]["device_kinds"][part] = last.get("device_kind")
          results["meta"]["terminated"] = True
          _write(results, out_dir)
          raise
        results["parts"][part] = res
        results["meta"]["device_kinds"][part] = res.get("device_kind")
        if res.get("jax_version"):
          results["meta"]["jax_version"] = res["jax_version"]
        print(f"[{part}] {res.get('status', 'done')} in {time.time() - t:.0f}"
              " s" + (f": {res['error']}" if res.get("error") else ""),
              flush=True)
        _write(results, out_dir)
  except _Terminated:
    print("Terminated: partial results written.", flush=True)
  finally:
    signal.signal(signal.SIGTERM, previous or signal.SIG_DFL)
  table = _write(results, out_dir)
  print("\n" + table)
  print(f"Written: {os.path.join(out_dir, TABLE_FILE)},"
        f" {os.path.join(out_dir, JSON_FILE)}", flush=True)


if __name__ == "__main__":
  app.run(main)
