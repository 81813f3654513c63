"""Does an XLA:CPU flag speed up airbench's network? A table of ratios.

PyTorch airbench trains the quarter-width airbench96 network about 3x faster
than this trainer on the 2-core CPU (``airbench_parity.py``, RESULTS.md). This
times the network's forward + backward with a cross-entropy head (float32,
train-mode BatchNorm) under each candidate ``XLA_FLAGS``, each in a fresh
process (XLA reads the flags once), and prints images/s against no flags.

Usage (about 2 minutes on 2 cores)::

    python -m experiments.benchmarks.xla_cpu_flags --batch=256
"""

from __future__ import annotations

import argparse
import os
import time

from experiments.benchmarks import _util

MODULE = "experiments.benchmarks.xla_cpu_flags"
FLAG_SETS = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=true",
             "--xla_cpu_enable_fast_math=true", "--xla_cpu_use_thunk_runtime=false")


def worker(spec: dict) -> None:
  _util.limit_memory(spec["mem_gb"])
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from experiments.configs import cifar10_gpu  # pylint: disable=g-import-not-at-top
  from contrastive_jax.models import FastCNN  # pylint: disable=g-import-not-at-top
  batch, widths = spec["batch"], tuple(spec["widths"])
  kwargs = dict(cifar10_gpu.get_config("airbench").model.backbone_kwargs,
                widths=widths)
  model = FastCNN(**kwargs)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.random((batch, 32, 32, 3), np.float32))
  y = jnp.asarray(np.arange(batch) % 10)
  variables = model.init(jax.random.key(0), x, train=True)
  head = jnp.asarray(rng.standard_normal((widths[-1], 10), np.float32) * 0.01)

  def loss(params, head, batch_stats, x):
    features, _ = model.apply({"params": params, "batch_stats": batch_stats},
                              x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(
        features @ head, y).mean()

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  args = (variables["params"], head, variables["batch_stats"], x)
  call = lambda: jax.block_until_ready(step(*args))
  start = time.perf_counter()
  call()
  compile_s = time.perf_counter() - start
  step_s, _ = _util.min_time(call, repeats=spec["steps"],
                             budget_s=float("inf"), warmup=False)
  _util.emit_result(dict(compile_s=compile_s, step_s=step_s,
                         images_per_sec=batch / step_s))


def main(argv=None):
  if _util.run_as_worker(argv, worker):
    return
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--widths", default="32,128,128")
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--mem_gb", type=float, default=16.0)
  p.add_argument("--timeout", type=float, default=600.0)
  args = p.parse_args(argv)
  widths = [int(w) for w in args.widths.split(",")]
  spec = dict(batch=args.batch, widths=widths, steps=args.steps)
  rows = []
  for flags in FLAG_SETS:
    r = _util.run_worker(MODULE, spec, mem_gb=args.mem_gb,
                         timeout_s=args.timeout,
                         env=dict(os.environ, XLA_FLAGS=flags))
    if r["status"] != "ok":
      raise RuntimeError(f"XLA_FLAGS={flags!r}: {r['status']}: {r.get('detail')}")
    rows.append((flags or "(none)", r))
  base = rows[0][1]["images_per_sec"]
  print(f"airbench96 network, widths {tuple(widths)}, batch {args.batch},"
        f" float32, forward + backward, best of {args.steps}")
  print("| XLA_FLAGS | compile s | ms/step | images/s | / no flags |")
  print("|---|---:|---:|---:|---:|")
  for flags, r in rows:
    print(f"| `{flags}` | {r['compile_s']:.1f} | {1e3 * r['step_s']:.0f} |"
          f" {r['images_per_sec']:.0f} | {r['images_per_sec'] / base:.2f} |")


if __name__ == "__main__":
  main()
