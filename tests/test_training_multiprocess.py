"""Two processes (``jax.distributed``) train exactly as one process does.

Launches ``python -m experiments.train`` three times at once on the digits
config with a tiny model:

* two processes of two fake CPU devices each, joined by
  ``--config.distributed.coordinator_address=127.0.0.1:<free port>`` (the
  config path of ``training.maybe_initialize``; cross-process collectives go
  through gloo);
* one process of four fake CPU devices (``distributed.mode=off``),

with the same global batch, for both on-device input modes. Each process
places only the arrays of its own devices (``make_array_from_callback``):

* ``data.shard_on_device=True``: each device holds its slice of the split
  and draws its part of every batch from it, so each process feeds exactly
  its devices' shard of the global batch (the same shards as the 4-device
  process, whose batches depend on the device count only);
* ``False`` (the digits default): the split is replicated, the global batch
  is drawn on device from ``(key, step)`` and each device keeps its slice.

The loss curves, every saved array of the final checkpoint (params,
BatchNorm statistics, Adam moments, the cross-batch memory) and the final
evaluation (``evaluation.embed`` over a mesh spanning both processes, then
kNN and the linear probe on every process) must agree to float tolerance.

The classifier cross-entropy gives the backbone's output bias a real
gradient: without it that bias only feeds the BatchNorm projection head,
which cancels it, and Adam turns its roundoff-level gradient into O(lr) steps
that differ with any change of reduction order.

A second test gives one of two processes a training-time budget
(``max_train_seconds``) and the other none: both must stop at the same step.

Skipped, with the children's output, when ``jax.distributed`` cannot start
on this machine (no loopback networking, a jaxlib without CPU collectives).
"""

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
TIMEOUT_S = 300  # per process; all three run at once
STEPS = 4

_OVERRIDES = (
    f"--config.num_steps={STEPS}",
    "--config.batch_size=32",
    "--config.log_every=1",
    "--config.progress_bar=False",
    "--config.checkpoint.every_steps=2",
    "--config.model.backbone_kwargs.features=(4,8)",
    "--config.model.backbone_kwargs.embedding_dim=16",
    "--config.model.projection_dim=8",
    "--config.model.projection_hidden_dim=16",
    "--config.model.classifier=True",
    "--config.loss.ce_weight=0.5",
    "--config.loss.memory_size=64",
    "--config.eval.probe_steps=5",
)

# Environment variables that would make a child join a cluster of its own.
_CLUSTER_ENV = ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS",
                "TPU_WORKER_HOSTNAMES")


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in _CLUSTER_ENV}
  # Replaces conftest's 8 devices: set before the child imports JAX.
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  # Compilation dominates; LLVM's optimisations are most of it (all three
  # runs use the same setting).
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "1"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _launch(name, workdir, num_devices, extra, logdir):
  out = open(logdir / f"{name}.log", "w")
  cmd = [sys.executable, "-m", "experiments.train",
         "--config=experiments/configs/digits.py", f"--workdir={workdir}",
         *_OVERRIDES, *extra]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(num_devices), stdout=out,
                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
  proc.log_file, proc.log_path, proc.name = out, logdir / f"{name}.log", name
  return proc


def _tail(proc, n=4000) -> str:
  return f"--- {proc.name} (rc {proc.returncode}) ---\n" + (
      proc.log_path.read_text(errors="replace")[-n:])


def _wait_all(procs, timeout_s):
  """Waits for every child; kills them all if one fails or time runs out."""
  deadline = time.monotonic() + timeout_s
  try:
    while any(p.poll() is None for p in procs):
      if (any(p.returncode not in (None, 0) for p in procs)
          or time.monotonic() > deadline):
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
      p.log_file.close()
  return [p.returncode for p in procs]


def _distributed_did_not_start(procs) -> bool:
  logs = [p.log_path.read_text(errors="replace") for p in procs]
  if not all("jax.distributed initialised" in log for log in logs):
    return True
  return any(re.search(r"(?i)gloo.*(not (built|available|supported))|"
                       r"cpu collectives.*(unavailable|not)", log)
             for log in logs)


def _loss_curve(workdir):
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def _saved_state(workdir):
  """The final checkpoint's arrays as host numpy, whatever devices wrote it."""
  mngr = ocp.CheckpointManager(str(workdir / "checkpoints"))
  step = mngr.latest_step()
  mngr.close()
  path = workdir / "checkpoints" / str(step) / "state"
  ckptr = ocp.PyTreeCheckpointer()
  meta = ckptr.metadata(path)
  meta = getattr(meta, "item_metadata", meta)  # StepMetadata in new orbax
  meta = getattr(meta, "tree", meta)
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
  state = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))
  return step, state


def _printed_eval(proc) -> dict:
  """``knn_top1: x`` / ``linear_probe_top1: x`` lines the child printed."""
  text = proc.log_path.read_text(errors="replace")
  return {k: float(v) for k, v in
          re.findall(r"^(knn_top1|linear_probe_top1): ([0-9.]+)$", text, re.M)}


def _run_pair(name, workdir, extras, logdir):
  """Two ``jax.distributed`` processes of two devices each, to the end.

  ``extras[i]`` are process ``i``'s own flags. Retries once on another port
  if the first was taken meanwhile; skips the test when ``jax.distributed``
  cannot start here. Returns the two finished processes.
  """
  for attempt in range(2):
    dist = [f"--config.distributed.coordinator_address=127.0.0.1:"
            f"{_free_port()}", "--config.distributed.num_processes=2"]
    pair = [_launch(f"{name}{i}_try{attempt}", workdir, 2,
                    extras[i] + dist + [f"--config.distributed.process_id={i}"],
                    logdir) for i in range(2)]
    codes = _wait_all(pair, TIMEOUT_S)
    logs = "\n".join(_tail(p) for p in pair)
    if codes != [0, 0] and attempt == 0 and re.search(
        r"(?i)address already in use|failed to add port", logs):
      shutil.rmtree(workdir, ignore_errors=True)
      continue
    break
  if codes != [0, 0] and _distributed_did_not_start(pair):
    pytest.skip("jax.distributed could not start two local CPU processes"
                " here:\n" + logs)
  assert codes == [0, 0], logs
  return pair


@pytest.mark.parametrize("shard_on_device", [False, True])
def test_two_processes_equal_one_process(shard_on_device, tmp_path):
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  data = [f"--config.data.shard_on_device={shard_on_device}"]
  reference = _launch("single", single, 4,
                      data + ["--config.distributed.mode=off"], tmp_path)
  try:
    pair = _run_pair("process", multi, [data, data], tmp_path)
    assert _wait_all([reference], TIMEOUT_S) == [0], _tail(reference)
  finally:
    _wait_all([reference], 0)  # kills it if it is still running
  procs = pair + [reference]

  # results.json (process 0 only) describes the two-process run.
  res = json.loads((multi / "results.json").read_text())
  assert res["status"] == "completed" and res["step"] == STEPS
  assert res["processes"] == 2 and res["devices"] == 4
  ref = json.loads((single / "results.json").read_text())
  assert ref["processes"] == 1 and ref["devices"] == 4

  # Same loss curve, step by step.
  curve, ref_curve = _loss_curve(multi), _loss_curve(single)
  assert [s for s, _ in curve] == list(range(1, STEPS + 1))
  assert [s for s, _ in curve] == [s for s, _ in ref_curve]
  np.testing.assert_allclose([v for _, v in curve], [v for _, v in ref_curve],
                             rtol=1e-5)

  # The same final state, array by array.
  step, state = _saved_state(multi)
  ref_step, ref_state = _saved_state(single)
  assert step == ref_step == STEPS
  paths = [jax.tree_util.keystr(p) for p, _ in
           jax.tree_util.tree_leaves_with_path(state)]
  assert paths == [jax.tree_util.keystr(p) for p, _ in
                   jax.tree_util.tree_leaves_with_path(ref_state)]
  assert any("params" in p for p in paths) and any("memory" in p for p in paths)
  for path, a, b in zip(paths, jax.tree.leaves(state),
                        jax.tree.leaves(ref_state)):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, path
    if np.issubdtype(a.dtype, np.inexact):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=path)
    else:
      np.testing.assert_array_equal(a, b, err_msg=path)

  # The final evaluation ran on both processes, on all the features.
  evals = [_printed_eval(p) for p in procs]
  assert set(evals[0]) == {"knn_top1", "linear_probe_top1"}
  assert evals[0] == evals[1]
  for k in ("knn_top1", "linear_probe_top1"):
    assert res[k] == pytest.approx(ref[k], abs=2.5e-3), k  # <= 1 of 540


def test_processes_stop_together_when_one_runs_out_of_time(tmp_path):
  """Process 0's training budget runs out; process 1 has none.

  The stop is decided at the steps where the processes compare their flags
  (every ``log_every``): both stop there, save together, evaluate and exit.
  A process that stopped alone would leave the other waiting in a
  collective until the timeout.
  """
  workdir = tmp_path / "run"
  common = ["--config.num_steps=100000", "--config.log_every=3",
            "--config.checkpoint.every_steps=100000"]
  pair = _run_pair("budget", workdir,
                   [common + ["--config.max_train_seconds=2"],
                    common + ["--config.max_train_seconds=0"]], tmp_path)
  res = json.loads((workdir / "results.json").read_text())
  assert res["status"] == "time_budget" and res["processes"] == 2, res
  assert res["step"] % 3 == 0 and 0 < res["step"] < 100000
  assert _saved_state(workdir)[0] == res["step"]
  evals = [_printed_eval(p) for p in pair]
  assert set(evals[0]) == {"knn_top1", "linear_probe_top1"}
  assert evals[0] == evals[1]
