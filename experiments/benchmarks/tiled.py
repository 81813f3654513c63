"""Memory and time of a loss's value + gradient: untiled vs tiled.

``--loss=nt_xent`` (the default): float32, D = 128, SimCLR labels,
temperature 0.1. ``--loss=supcon``: ``supervised_contrastive_loss`` with
``--classes`` classes (default 100, so each anchor has about ``batch / 100``
positives), temperature 0.1. ``--loss=info_nce``: ``info_nce_loss`` of
``batch`` queries against ``batch`` keys, symmetric (CLIP), gradients to both.
``--loss=sigmoid``: SigLIP's loss (scale 10, bias -10) of ``batch`` queries
against ``batch`` keys, gradients to both.

Every configuration (batch, ``block_size`` or untiled) runs in a fresh
subprocess whose address space is capped at ``--mem-gb`` (``RLIMIT_AS`` + a
psutil watchdog, see ``_util``); the child compiles ahead of time (compile
time reported apart), times the compiled value-and-grad (minimum of
``--repeats`` runs within ``--budget`` seconds after one warm-up; a
configuration slower than the budget runs exactly once, warm-up included), and
reports its peak resident memory (``ru_maxrss``, whole process, i.e. including
the ~0.5 GiB that importing jax costs) and XLA's temporary allocation. An
untiled configuration that needs more than the cap fails its allocation and is
reported as ``OOM``.

The block sizes of ``--block-sizes`` are all measured up to
``--sweep-max-batch``; larger batches use the fastest one at the largest swept
batch (``--all-blocks`` measures every one everywhere).

Run from the repository root:

  python -m experiments.benchmarks.tiled                       # ~25 minutes
  python -m experiments.benchmarks.tiled --batches 4096,16384  # ~3 minutes
  python -m experiments.benchmarks.tiled --loss=sigmoid --batches 4096,16384
  python -m experiments.benchmarks.tiled --loss=supcon --batches 4096,16384
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from experiments.benchmarks import _util

MODULE = "experiments.benchmarks.tiled"


def worker(spec: dict) -> None:
  _util.limit_memory(spec["mem_gb"])
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from contrastive_jax import losses  # pylint: disable=g-import-not-at-top
  batch, block = spec["batch"], spec["block_size"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, spec["dim"]), dtype=np.float32))
  t = spec["temperature"]
  loss = spec.get("loss", "nt_xent")
  if loss in ("sigmoid", "info_nce"):
    second = jnp.asarray(  # the keys
        rng.standard_normal((batch, spec["dim"]), dtype=np.float32))
    if loss == "sigmoid":
      pair_loss = lambda q, k: losses.sigmoid_contrastive_loss(
          q, k, block_size=block)
    else:
      pair_loss = lambda q, k: losses.info_nce_loss(
          q, k, temperature=t, symmetric=True, block_size=block)
    fn = jax.value_and_grad(pair_loss, argnums=(0, 1))
  elif loss == "supcon":
    second = jnp.asarray(  # a shuffled, balanced labelling
        rng.permutation(np.arange(batch) % spec["classes"]), jnp.int32)
    fn = jax.value_and_grad(lambda e, l: losses.supervised_contrastive_loss(
        e, l, temperature=t, block_size=block))
  else:
    second = jnp.asarray(  # SimCLR's labels
        np.concatenate([np.arange(batch // 2)] * 2), jnp.int32)
    fn = jax.value_and_grad(lambda e, l: losses.nt_xent_loss(
        e, l, temperature=t, block_size=block))
  result = {"baseline_rss_mb": _util.current_rss_mb()}
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(x, second).compile()
  result["compile_s"] = time.perf_counter() - start
  result["temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
  out = []
  def call():
    out[:] = [jax.block_until_ready(compiled(x, second))]
  result["time_s"], result["runs"] = _util.min_time(
      call, repeats=spec["repeats"], budget_s=spec["budget_s"])
  value, grad = out[0]
  result["value"] = float(value)
  grad = jnp.concatenate([g.ravel() for g in jax.tree.leaves(grad)])
  result["grad_norm"] = float(jnp.linalg.norm(grad))
  result["finite"] = bool(jnp.all(jnp.isfinite(grad)))
  result["peak_rss_mb"] = _util.peak_rss_mb()
  _util.emit_result(result)


def run(batch: int, block: int | None, args) -> dict:
  label = "untiled" if block is None else f"block_size={block}"
  print(f"  batch {batch}, {label} ...", file=sys.stderr, flush=True)
  spec = {"loss": args.loss, "batch": batch, "block_size": block,
          "classes": args.classes, "dim": args.dim, "temperature": args.temperature,
          "repeats": args.repeats, "budget_s": args.budget}
  result = _util.run_worker(MODULE, spec, mem_gb=args.mem_gb,
                            timeout_s=args.timeout, idle_s=args.idle)
  print(f"    -> {result.get('status')}"
        f" {_util.fmt_seconds(result.get('time_s'))}"
        f" peak {result.get('peak_rss_mb', 0) / 1024:.2f} GiB",
        file=sys.stderr, flush=True)
  return result


def main(argv=None) -> None:
  if _util.run_as_worker(argv, worker):
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--loss", choices=("nt_xent", "supcon", "info_nce",
                                         "sigmoid"), default="nt_xent")
  parser.add_argument("--classes", type=int, default=100,
                      help="--loss=supcon: number of classes")
  parser.add_argument("--batches", default="4096,16384,65536,131072")
  parser.add_argument("--block-sizes", default="512,1024")
  parser.add_argument("--sweep-max-batch", type=int, default=16384)
  parser.add_argument("--all-blocks", action="store_true")
  parser.add_argument("--no-untiled", action="store_true")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.1)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--budget", type=float, default=30.0,
                      help="stop repeating a configuration after this long")
  parser.add_argument("--mem-gb", type=float, default=16.0)
  parser.add_argument("--timeout", type=float, default=1800.0)
  parser.add_argument("--idle", type=float, default=60.0,
                      help="kill a child idle this long (hung after OOM)")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  blocks = [int(b) for b in args.block_sizes.split(",")]
  start = time.time()
  results = {}
  best = None
  for batch in batches:
    configs = [] if args.no_untiled else [None]
    if args.all_blocks or batch <= args.sweep_max_batch or best is None:
      configs += blocks
    else:
      configs.append(best)
    for block in configs:
      results[batch, block] = run(batch, block, args)
    if batch <= args.sweep_max_batch:
      timed = [(results[batch, b]["time_s"], b) for b in blocks
               if "time_s" in results.get((batch, b), {})]
      if timed:
        best = min(timed)[1]

  rows, targets = [], []
  for batch in batches:
    untiled = results.get((batch, None), {})
    for (b, block), r in results.items():
      if b != batch:
        continue
      name = "untiled" if block is None else f"tiled, block_size={block}"
      if "time_s" not in r:
        rows.append([batch, name, r.get("status", "?"), "-", "-", "-", "-",
                     "-", _util.short_detail(r.get("detail", ""))])
        continue
      ratio = (r["time_s"] / untiled["time_s"] if "time_s" in untiled
               and block is not None else None)
      rows.append([
          batch, name, _util.fmt_seconds(r["time_s"]),
          "-" if block is None else _util.fmt_ratio(ratio),
          f"{r['peak_rss_mb'] / 1024:.2f} GiB",
          f"{(r['peak_rss_mb'] - r['baseline_rss_mb']) / 1024:.2f} GiB",
          f"{r['temp_bytes'] / 2**30:.2f} GiB",
          f"{r['compile_s']:.1f} s",
          f"loss {r['value']:.5f}, {r['runs']} run(s)"
          + ("" if r["finite"] else ", NON-FINITE grad")])
  headers = ["batch", "variant", "time (value+grad)", "× untiled",
             "peak RSS", "peak − baseline", "XLA temp", "compile", "note"]
  # Targets: the issue's, set for NT-Xent.
  nt_xent = args.loss == "nt_xent"
  big = [(b, blk) for (b, blk) in results
         if nt_xent and b == 131072 and blk is not None]
  for key in big:
    r = results[key]
    ok = "time_s" in r and r["peak_rss_mb"] < 4096
    targets.append(
        f"batch 131072 tiled (block_size={key[1]}): "
        + (f"completes in {_util.fmt_seconds(r['time_s'])}, peak RSS"
           f" {r['peak_rss_mb'] / 1024:.2f} GiB (target < 4 GB:"
           f" {'MET' if ok else 'MISSED'})" if "time_s" in r
           else f"{r.get('status')} (target MISSED)"))
  mid = results.get((16384, None), {})
  for (b, blk), r in results.items():
    if nt_xent and b == 16384 and blk is not None and "time_s" in r:
      if "time_s" in mid:
        ratio = r["time_s"] / mid["time_s"]
        targets.append(f"batch 16384 tiled (block_size={blk}) / untiled ="
                       f" {ratio:.2f} (target ≤ 1.5: "
                       f"{'MET' if ratio <= 1.5 else 'MISSED'})")
      else:
        targets.append(f"batch 16384 untiled: {mid.get('status')}")
  # Consistency: every variant of a batch gives the same loss.
  for batch in batches:
    values = [r["value"] for (b, _), r in results.items()
              if b == batch and "value" in r]
    if len(values) > 1:
      spread = (max(values) - min(values)) / abs(np.mean(values))
      targets.append(f"batch {batch}: loss agrees across variants to"
                     f" {spread:.1e} (relative)")
  print()
  print(_util.machine_description())
  print(f"loss: {args.loss}"
        + (f", {args.classes} classes" if args.loss == "supcon" else ""))
  print()
  print(_util.markdown_table(headers, rows))
  print()
  print("\n".join("target: " + t for t in targets))
  print(f"\ntotal wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
