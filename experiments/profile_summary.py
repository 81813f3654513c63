r"""Where a traced step's device time goes: a table from a jax.profiler trace.

``accelerator_check --profile_steps=N`` traces N train steps with
``jax.profiler.trace``; the GPU machine has no TensorFlow, so the trace is
read back here, with the ``xplane`` protobuf that TensorFlow ships:

    python -m experiments.profile_summary \
        experiments/results/<run>/profile_b1024.xplane.pb --trace_steps=5

It prints, per step: the wall span of the device's kernels, the time some
kernel was running (busy) and the idle rest, and the kernel time by kind
(convolutions, matmuls, other fusions, copies and the rest) with the top
kernels by time. Only the device's ``Stream`` lines are counted (derived
lines such as "XLA Ops" repeat the same time). Without a GPU plane (a CPU
trace, for a smoke test) it reads the busiest host plane.
"""

from __future__ import annotations

import collections
import glob
import os
import re

from absl import app
from absl import flags

_STEPS = flags.DEFINE_integer("trace_steps", 5, "Steps in the trace.")
_TOP = flags.DEFINE_integer("top_kernels", 20, "Kernels listed.")

# Kernel names as cuDNN / cuBLAS / CUTLASS / XLA name them on NVIDIA GPUs.
KINDS = (
    ("convolution", re.compile(r"conv|xmma|implicit|cudnn|dgrad|wgrad|fprop",
                               re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|matmul|dot", re.I)),
    ("copy / transpose", re.compile(r"memcpy|memset|copy|transpose", re.I)),
    ("reduction", re.compile(r"reduce|reduction", re.I)),
    ("elementwise fusion", re.compile(r"fusion|loop_|input_", re.I)),
)


def kind_of(name: str) -> str:
  for kind, pattern in KINDS:
    if pattern.search(name):
      return kind
  return "other"


def find_xplane(path: str) -> str:
  if os.path.isfile(path):
    return path
  found = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"),
                           recursive=True))
  if not found:
    raise FileNotFoundError(f"no *.xplane.pb under {path}")
  return found[-1]


def load_events(xplane_path: str):
  """``(plane_name, [(name, start_ps, duration_ps)])`` of the device streams."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  space = xplane_pb2.XSpace()
  with open(xplane_path, "rb") as f:
    space.ParseFromString(f.read())
  gpus = [p for p in space.planes if p.name.startswith("/device:GPU")]
  planes = gpus[:1] or sorted(
      space.planes, key=lambda p: -sum(len(l.events) for l in p.lines))[:1]
  if not planes:
    raise ValueError(f"{xplane_path} holds no planes")
  plane = planes[0]
  names = {k: m.name for k, m in plane.event_metadata.items()}
  lines = [l for l in plane.lines if l.name.startswith("Stream")] or list(
      plane.lines)
  events = []
  for line in lines:
    base = line.timestamp_ns * 1000
    for e in line.events:
      events.append((names.get(e.metadata_id, "?"), base + e.offset_ps,
                     e.duration_ps))
  return plane.name, events


def busy_ps(events) -> int:
  """Time covered by at least one event (the union of the intervals)."""
  total, end = 0, None
  for _, start, dur in sorted(events, key=lambda e: e[1]):
    stop = start + dur
    if end is None or start > end:
      total += dur
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def summarize(events, *, steps: int, top: int) -> str:
  if not events:
    return "no events"
  span = max(s + d for _, s, d in events) - min(s for _, s, _ in events)
  busy = busy_ps(events)
  by_name = collections.defaultdict(lambda: [0, 0])
  by_kind = collections.defaultdict(int)
  for name, _, dur in events:
    by_name[name][0] += dur
    by_name[name][1] += 1
    by_kind[kind_of(name)] += dur
  kernel_total = sum(by_kind.values())
  ms = lambda ps: ps / 1e9 / steps  # per step, in ms
  out = [f"per step ({steps} traced): span {ms(span):.2f} ms, busy"
         f" {ms(busy):.2f} ms ({100 * busy / span:.1f}%), idle"
         f" {ms(span - busy):.2f} ms; kernel time {ms(kernel_total):.2f} ms"
         f" in {len(events) / steps:.0f} kernels", "",
         "| kind | ms / step | share of kernel time |", "|---|---:|---:|"]
  for kind, ps in sorted(by_kind.items(), key=lambda kv: -kv[1]):
    out.append(f"| {kind} | {ms(ps):.2f} | {100 * ps / kernel_total:.1f}% |")
  out += ["", "| kernel | kind | calls / step | ms / step | share |",
          "|---|---|---:|---:|---:|"]
  for name, (ps, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
    short = name if len(name) <= 90 else name[:87] + "..."
    out.append(f"| `{short}` | {kind_of(name)} | {n / steps:g} |"
               f" {ms(ps):.3f} | {100 * ps / kernel_total:.1f}% |")
  return "\n".join(out)


def main(argv):
  if len(argv) != 2:
    raise app.UsageError("usage: profile_summary <trace dir or .xplane.pb>")
  path = find_xplane(argv[1])
  plane, events = load_events(path)
  print(f"{path}: plane {plane}")
  print(summarize(events, steps=_STEPS.value, top=_TOP.value))


if __name__ == "__main__":
  app.run(main)
