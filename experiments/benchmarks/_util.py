"""Shared helpers of the loss benchmarks: timing, memory-capped subprocesses.

* :func:`interleaved_min_times` times several functions round-robin and keeps
  the minimum of each, so that ratios between them (ours / matmul) are taken
  under the same machine load (the benchmark machine is shared).
* :func:`run_worker` runs one configuration in a fresh Python process (the
  child's ``main`` calls :func:`run_as_worker`) whose
  address space is capped with ``RLIMIT_AS`` (the child calls
  :func:`limit_memory` first thing) and watched with psutil: it is killed when
  its resident memory passes the cap, when it runs past a timeout, or when it
  sits idle (XLA can dead-lock instead of raising after a failed allocation).
  The child reports one JSON line (:func:`emit_result`); anything else is
  classified as ``OOM`` / ``timeout`` / ``failed``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import time
from typing import Callable

RESULT_TAG = "BENCH_RESULT "
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                "MemoryError", "std::bad_alloc", "Cannot allocate memory",
                "can't allocate memory", "failed to allocate")


# ----------------------------------------------------------------------------
# Timing.


def min_time(fn: Callable[[], object], *, repeats: int, budget_s: float,
             warmup: bool = True) -> tuple[float, int]:
  """Minimum wall time of ``fn()`` (which must block until done).

  Runs at least once; stops after ``repeats`` runs or once ``budget_s`` is
  spent. The warm-up call is skipped when it would be the only timed one.
  Returns ``(seconds, number of timed runs)``.
  """
  if warmup:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if first > budget_s:
      return first, 1
  best, runs, spent = float("inf"), 0, 0.0
  while runs < repeats and (runs == 0 or spent < budget_s):
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    best, runs, spent = min(best, elapsed), runs + 1, spent + elapsed
  return best, runs


def interleaved_min_times(fns: dict[str, Callable[[], object]], *,
                          repeats: int, budget_s: float) -> dict[str, float]:
  """Round-robin timing (after one warm-up call each); min per function."""
  for fn in fns.values():
    fn()
  best = {name: float("inf") for name in fns}
  spent = 0.0
  for round_ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      elapsed = time.perf_counter() - start
      best[name] = min(best[name], elapsed)
      spent += elapsed
    if round_ >= 1 and spent > budget_s:
      break
  return best


def minor_faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_per_call(fn: Callable[[], object]) -> int:
  """Minor page faults of one call (fresh buffers are faulted page by page)."""
  before = minor_faults()
  fn()
  return minor_faults() - before


# ----------------------------------------------------------------------------
# Memory.


def limit_memory(gb: float) -> None:
  """Caps this process's address space (call before importing jax/torch)."""
  limit = int(gb * 2**30)
  resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (Linux: KiB -> MiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
  import psutil  # pylint: disable=g-import-not-at-top
  return psutil.Process().memory_info().rss / 2**20


def emit_result(result: dict) -> None:
  print(RESULT_TAG + json.dumps(result), flush=True)


def run_as_worker(argv: list[str] | None,
                  worker: Callable[[dict], None]) -> bool:
  """The child side of :func:`run_worker`, for a benchmark's ``main``.

  Runs ``worker(spec)`` and returns True when ``argv`` (default
  ``sys.argv[1:]``) is what :func:`run_worker` passes, ``--worker JSON``;
  otherwise returns False and ``main`` parses its own flags.
  """
  argv = sys.argv[1:] if argv is None else list(argv)
  if len(argv) != 2 or argv[0] != "--worker":
    return False
  worker(json.loads(argv[1]))
  return True


def run_worker(module: str, spec: dict, *, mem_gb: float, timeout_s: float,
               idle_s: float = 90.0, env: dict | None = None) -> dict:
  """Runs ``python -m module --worker JSON`` under a memory cap.

  ``env``: the child's environment (default: this process's), e.g. other
  ``XLA_FLAGS``, which XLA reads once per process.

  Returns the child's result dict with ``status="ok"``, or
  ``{"status": "OOM" | "timeout" | "failed", "detail": ...}``.
  """
  import psutil  # pylint: disable=g-import-not-at-top
  spec = dict(spec, mem_gb=mem_gb)
  cmd = [sys.executable, "-m", module, "--worker", json.dumps(spec)]
  proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
  ps = psutil.Process(proc.pid)
  start = last_busy = time.monotonic()
  last_cpu, killed, peak_watch = 0.0, None, 0.0
  # Reading pipes only at the end is fine: children print a few lines.
  while proc.poll() is None:
    time.sleep(0.5)
    now = time.monotonic()
    try:
      rss = ps.memory_info().rss / 2**30
      cpu = sum(ps.cpu_times()[:2])
    except psutil.Error:
      continue
    peak_watch = max(peak_watch, rss)
    if cpu > last_cpu + 0.05:
      last_cpu, last_busy = cpu, now
    if rss > mem_gb:
      killed = f"OOM (RSS {rss:.1f} GB > {mem_gb:g} GB cap, killed)"
    elif now - start > timeout_s:
      killed = f"timeout (> {timeout_s:.0f} s)"
    elif now - last_busy > idle_s:
      killed = f"hung (idle {idle_s:.0f} s, RSS {rss:.1f} GB)"
    if killed:
      proc.kill()
      break
  stdout, stderr = proc.communicate()
  wall = time.monotonic() - start
  for line in stdout.splitlines():
    if line.startswith(RESULT_TAG):
      result = json.loads(line[len(RESULT_TAG):])
      result.setdefault("status", "ok")
      result["wall_s"] = wall
      return result
  lines = stderr.strip().splitlines()
  oom_lines = [l.strip() for l in lines if any(m in l for m in _OOM_MARKERS)]
  tail = (oom_lines[-1] if oom_lines else " | ".join(lines[-3:]))[-300:]
  if killed:
    status = killed.split(" ")[0]
    return {"status": status, "detail": killed + ("; " + tail if tail else ""),
            "wall_s": wall}
  if any(m in stderr for m in _OOM_MARKERS) or proc.returncode in (-9, 137):
    return {"status": "OOM", "detail": tail, "wall_s": wall}
  return {"status": "failed", "detail": f"rc={proc.returncode}: {tail}",
          "wall_s": wall}


# ----------------------------------------------------------------------------
# Reporting.


def machine_description() -> str:
  """One paragraph: date, CPU, cores, RAM, load and library versions."""
  import psutil  # pylint: disable=g-import-not-at-top
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  versions = []
  from importlib import metadata  # pylint: disable=g-import-not-at-top
  for name in ("jax", "jaxlib", "optax", "numpy", "scipy", "torch",
               "pytorch-metric-learning"):
    try:
      versions.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
      pass
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  try:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
        capture_output=True, check=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "contrastive_jax/losses",
         "contrastive_jax/similarity.py"],
        cwd=REPO_ROOT, text=True, capture_output=True).stdout.strip()
    commit += " (losses/similarity modified)" if dirty else ""
  except (OSError, subprocess.CalledProcessError):
    commit = "?"
  return (f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; "
          f"git {commit}; "
          f"{cpu}, {os.cpu_count()} cores, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
          f"load average {load} (shared machine); Python "
          f"{platform.python_version()}, {'; '.join(versions)}; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}")


def markdown_table(headers: list[str], rows: list[list[object]]) -> str:
  cells = [[str(c) for c in row] for row in rows]
  widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
            for i, h in enumerate(headers)]
  line = lambda row: "| " + " | ".join(
      c.ljust(w) for c, w in zip(row, widths)) + " |"
  return "\n".join([line(headers), line(["-" * w for w in widths])]
                   + [line(r) for r in cells])


def fmt_seconds(t: float | None) -> str:
  if t is None:
    return "-"
  if t < 1e-3:
    return f"{t * 1e6:.0f} µs"
  if t < 1.0:
    return f"{t * 1e3:.1f} ms"
  return f"{t:.2f} s"


def short_detail(detail: str, width: int = 60) -> str:
  """'can't allocate ... 4286578688 bytes' -> 'failed allocation of 4.3 GB'."""
  import re  # pylint: disable=g-import-not-at-top
  m = re.search(r"allocat\w*(?: memory)?:?(?: you tried to allocate)? (\d+) bytes",
                detail)
  if m:
    return f"failed allocation of {int(m.group(1)) / 1e9:.1f} GB"
  return detail[:width]


def fmt_ratio(r: float | None) -> str:
  return "-" if r is None else (f"{r:.2f}×" if r < 10 else f"{r:.0f}×")
