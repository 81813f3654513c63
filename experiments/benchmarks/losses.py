"""Speed benchmark: softmax losses and pairwise distances against their peers.

Value + gradient (w.r.t. the embeddings), float32, SimCLR labels
``concat(arange(B/2), arange(B/2))``, temperature 0.1, D = 128, at each batch:

* ``nt_xent_loss`` vs ``optax.losses.ntxent`` and pytorch-metric-learning's
  ``NTXentLoss`` (torch CPU, ``loss.backward()``);
* ``supervised_contrastive_loss`` vs PML ``SupConLoss``;
* ``pairwise_euclidean_distance(x)`` (value, and value + gradient of its sum)
  vs ``scipy.spatial.distance.cdist`` and ``torch.cdist``;
* the yardstick: one ``B x B x D`` matmul, ``jax.jit(lambda x: x @ x.T)``.

Ours, the matmul, ``torch.cdist`` and a hand-written minimal jnp NT-Xent
(autodiff; a reference for profiling) are timed in this process, round-robin,
minimum of ``--repeats`` runs, after compilation (AOT ``lower().compile()``,
compile time excluded) and one warm-up call. optax and PML run in a fresh
subprocess per configuration, capped at ``--mem-gb`` (``RLIMIT_AS`` plus a
psutil watchdog) and reported as ``OOM`` / ``timeout`` instead of taking the
machine down; slow peers are timed once (``--peer-budget``).

Before timing, values (relative tolerance 1e-4) and gradients are checked
against optax, PML, scipy and torch at ``--check-batch`` (default 512: PML's
``NTXentLoss`` builds a [positive pairs, B * (B - 2)] matrix, O(B^3) memory,
and runs out of a 16 GB cap already at batch 1024).

For JAX rows the table also gives XLA's temporary allocation of the compiled
function and the minor page faults of one call (each fresh [B, B] float32
buffer costs B*B/1024 faults, a large part of the run time on this machine).

Run from the repository root:

  python -m experiments.benchmarks.losses
  python -m experiments.benchmarks.losses --batches 1024 --repeats 3
  python -m experiments.benchmarks.losses --peers '' --profile   # + HLO notes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from experiments.benchmarks import _util

MODULE = "experiments.benchmarks.losses"


def make_inputs(batch: int, dim: int, seed: int = 0):
  """float32 [B, D] Gaussian embeddings and SimCLR labels [B] (int32)."""
  if batch % 2:
    raise ValueError(f"batch must be even (two views), got {batch}.")
  x = np.random.default_rng(seed).standard_normal((batch, dim),
                                                  dtype=np.float32)
  labels = np.concatenate([np.arange(batch // 2)] * 2).astype(np.int32)
  return x, labels


# ----------------------------------------------------------------------------
# JAX functions (ours, the yardstick, optax, a minimal reference).


def _minimal_nt_xent(e, labels, temperature):
  """Hand-written NT-Xent in plain jnp (masked logsumexp + softplus)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n = e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, -1, keepdims=True), 1e-16))
  s = (n @ n.T) / temperature
  same = labels[:, None] == labels[None, :]
  pos = same & ~jnp.eye(labels.shape[0], dtype=bool)
  lse = jax.nn.logsumexp(jnp.where(same, -jnp.inf, s), axis=1)
  return jnp.sum(jnp.where(pos, jax.nn.softplus(lse[:, None] - s),
                           0.0)) / jnp.sum(pos)


def jax_functions(temperature: float) -> dict:
  """name -> (function of (x, labels), takes_labels)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  from contrastive_jax import losses, similarity  # pylint: disable=g-import-not-at-top
  t = temperature
  vg = jax.value_and_grad
  return {
      "matmul": lambda x, l: x @ x.T,
      "nt_xent": vg(lambda x, l: losses.nt_xent_loss(x, l, temperature=t)),
      "supcon": vg(lambda x, l: losses.supervised_contrastive_loss(
          x, l, temperature=t)),
      "pdist": lambda x, l: similarity.pairwise_euclidean_distance(x),
      "pdist_vg": vg(lambda x, l: jnp.sum(
          similarity.pairwise_euclidean_distance(x))),
      "minimal_nt_xent": vg(lambda x, l: _minimal_nt_xent(x, l, t)),
      "optax_ntxent": vg(lambda x, l: optax.losses.ntxent(x, l, t)),
  }


def compile_jax(fn, x, labels):
  """AOT-compiles ``fn(x, labels)``; returns (call, compile_s, temp_bytes)."""
  import jax  # pylint: disable=g-import-not-at-top
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(x, labels).compile()
  compile_s = time.perf_counter() - start
  try:
    temp = compiled.memory_analysis().temp_size_in_bytes
  except Exception:  # pylint: disable=broad-except
    temp = None
  call = lambda: jax.block_until_ready(compiled(x, labels))
  return call, compile_s, temp


def torch_functions(temperature: float) -> dict:
  """name -> function of (x tensor requiring grad, labels tensor)."""
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import losses as pml  # pylint: disable=g-import-not-at-top
  ntxent, supcon = pml.NTXentLoss(temperature), pml.SupConLoss(temperature)

  def with_grad(loss_fn):
    def run(x, labels):
      x.grad = None
      loss = loss_fn(x, labels)
      loss.backward()
      return loss.detach()
    return run

  def cdist(x, labels):
    del labels
    with torch.no_grad():
      return torch.cdist(x, x)

  return {
      "pml_ntxent": with_grad(ntxent),
      "pml_supcon": with_grad(supcon),
      "torch_cdist": cdist,
      "torch_cdist_vg": with_grad(lambda x, l: torch.cdist(x, x).sum()),
  }


# ----------------------------------------------------------------------------
# Subprocess workers for the peers that may run out of memory.


def worker(spec: dict) -> None:
  """Times one peer at one batch; prints one result line."""
  _util.limit_memory(spec["mem_gb"])
  x_np, labels_np = make_inputs(spec["batch"], spec["dim"])
  name, t = spec["name"], spec["temperature"]
  result = {"name": name, "batch": spec["batch"]}
  if name.startswith("optax"):
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
    call, result["compile_s"], result["temp_bytes"] = compile_jax(
        jax_functions(t)[name], x, labels)
    def value_and_grad():
      value, grad = call()
      return float(value), np.asarray(grad)
  else:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count())
    x = torch.from_numpy(x_np).requires_grad_(True)
    labels = torch.from_numpy(labels_np).long()
    fn = torch_functions(t)[name]
    call = lambda: fn(x, labels)
    def value_and_grad():
      value = float(fn(x, labels))
      return value, x.grad.numpy().copy()
  if spec.get("grad_path"):
    start = time.perf_counter()
    result["value"], grad = value_and_grad()
    np.save(spec["grad_path"], grad)
    result["check_s"] = time.perf_counter() - start
  if spec.get("grad_path") and result["check_s"] > spec["budget_s"]:
    # Slow peer: its check run (the same value + gradient) is the timing.
    result["time_s"], result["runs"] = result["check_s"], 1
  elif spec["repeats"] > 0:
    # A check run serves as the warm-up.
    result["time_s"], result["runs"] = _util.min_time(
        call, repeats=spec["repeats"], budget_s=spec["budget_s"],
        warmup=not spec.get("grad_path"))
  result["peak_rss_mb"] = _util.peak_rss_mb()
  _util.emit_result(result)


def run_peer(name: str, batch: int, args, grad_path: str | None = None,
             repeats: int | None = None) -> dict:
  spec = {"name": name, "batch": batch, "dim": args.dim,
          "temperature": args.temperature,
          "repeats": args.repeats if repeats is None else repeats,
          "budget_s": args.peer_budget, "grad_path": grad_path}
  return _util.run_worker(MODULE, spec, mem_gb=args.mem_gb,
                          timeout_s=args.timeout)


# ----------------------------------------------------------------------------
# Correctness check at the smallest batch.


def check_values(batch: int, args) -> tuple[list[str], dict]:
  """Asserts ours == optax == PML (values rel. 1e-4, gradients) and cdist.

  The peers run in capped subprocesses (PML's NTXentLoss builds a
  [pairs, B * (B - 2)] matrix: O(B^3) memory); their check run also times
  them, and those results are returned for reuse: (notes, {key: result}).
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import scipy.spatial.distance  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  x_np, labels_np = make_inputs(batch, args.dim)
  x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
  jf, tf = jax_functions(args.temperature), torch_functions(args.temperature)
  ours = {k: jf[k](x, labels) for k in ("nt_xent", "supcon")}
  notes, peer_results = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for key, our_key, peer in (("optax_ntxent", "nt_xent", "optax.ntxent"),
                               ("pml_ntxent", "nt_xent", "PML NTXentLoss"),
                               ("pml_supcon", "supcon", "PML SupConLoss")):
      if key.split("_")[0] not in args.peers:
        continue
      print(f"  check: {key} at batch {batch} in a subprocess ...",
            file=sys.stderr, flush=True)
      path = os.path.join(tmp, key + ".npy")
      result = peer_results[key] = run_peer(key, batch, args, grad_path=path)
      if "value" not in result:
        raise SystemExit(f"check: {peer} at batch {batch} did not complete:"
                         f" {result}")
      value, grad = result["value"], np.load(path)
      our_value, our_grad = ours[our_key]
      rel = abs(float(our_value) - value) / abs(value)
      grad_err = float(np.max(np.abs(np.asarray(our_grad) - grad))
                       / np.max(np.abs(grad)))
      notes.append(f"{our_key} vs {peer} at batch {batch}: value"
                   f" {float(our_value):.6f} vs {value:.6f} (rel. diff"
                   f" {rel:.1e}), gradient max |diff| / max |grad| ="
                   f" {grad_err:.1e}")
      assert rel < 1e-4, notes[-1]
      assert grad_err < 1e-3, notes[-1]
  ours_d = np.asarray(jf["pdist"](x, labels), np.float64)
  ref = scipy.spatial.distance.cdist(x_np.astype(np.float64),
                                     x_np.astype(np.float64))
  torch_d = tf["torch_cdist"](torch.from_numpy(x_np), None).numpy()
  for name, d, tol in (("pairwise_euclidean_distance", ours_d, 1e-4),
                       ("torch.cdist (float32, for information)", torch_d,
                        1e-2)):
    err = float(np.max(np.abs(d - ref)) / np.max(ref))
    notes.append(f"{name} vs scipy cdist (float64) at batch {batch}:"
                 f" max |diff| / max d = {err:.1e}")
    assert err < tol, notes[-1]
  return notes, peer_results


# ----------------------------------------------------------------------------
# Timing.

# (table label, our key, function, [(peer label, key, where)])
ROWS = [
    ("nt_xent_loss (value+grad)", "nt_xent",
     [("optax.losses.ntxent", "optax_ntxent", "worker"),
      ("PML NTXentLoss (torch)", "pml_ntxent", "worker"),
      ("minimal jnp NT-Xent (autodiff)", "minimal_nt_xent", "jax")]),
    ("supervised_contrastive_loss (value+grad)", "supcon",
     [("PML SupConLoss (torch)", "pml_supcon", "worker")]),
    ("pairwise_euclidean_distance (value)", "pdist",
     [("scipy cdist", "scipy_cdist", "scipy"),
      ("torch.cdist", "torch_cdist", "torch")]),
    ("pairwise_euclidean_distance (value+grad of sum)", "pdist_vg",
     [("torch.cdist + backward", "torch_cdist_vg", "torch")]),
]


def time_batch(batch: int, args, cached: dict) -> dict:
  """Times everything at one batch; returns {key: result dict}."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  x_np, labels_np = make_inputs(batch, args.dim)
  x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
  jf, tf = jax_functions(args.temperature), torch_functions(args.temperature)
  peers = {p[1]: p[2] for row in ROWS for p in row[2]}
  results, calls = {}, {}
  jax_keys = ["matmul"] + [row[1] for row in ROWS] + [
      k for k, where in peers.items() if where == "jax"]
  for key in jax_keys:
    call, compile_s, temp = compile_jax(jf[key], x, labels)
    calls[key] = call
    call()
    results[key] = {"compile_s": compile_s, "temp_bytes": temp,
                    "faults": _util.faults_per_call(call)}
  xt = torch.from_numpy(x_np.copy()).requires_grad_(True)
  lt = torch.from_numpy(labels_np).long()
  for key, where in peers.items():
    if where == "torch":
      calls[key] = (lambda f: lambda: f(xt, lt))(tf[key])
      results[key] = {}
  times = _util.interleaved_min_times(calls, repeats=args.repeats,
                                      budget_s=args.budget)
  for key, t in times.items():
    results[key]["time_s"] = t
  if "scipy_cdist" in peers and not args.no_scipy:
    import scipy.spatial.distance  # pylint: disable=g-import-not-at-top
    t, runs = _util.min_time(
        lambda: scipy.spatial.distance.cdist(x_np, x_np),
        repeats=args.repeats, budget_s=args.peer_budget)
    results["scipy_cdist"] = {"time_s": t, "runs": runs}
  for key, where in peers.items():
    if key in cached:
      results[key] = cached[key]
    elif where == "worker" and key.split("_")[0] in args.peers:
      print(f"  batch {batch}: {key} in a subprocess ...", file=sys.stderr,
            flush=True)
      results[key] = run_peer(key, batch, args)
  return results


def build_table(all_results: dict) -> tuple[str, list[str]]:
  rows, targets = [], []
  for batch, res in all_results.items():
    mm = res["matmul"]["time_s"]
    rows.append([batch, "one B×B×D matmul (yardstick)", "jnp x @ x.T",
                 _util.fmt_seconds(mm), "1.00×", "-",
                 _mib(res["matmul"].get("temp_bytes")),
                 res["matmul"].get("faults", "-")])
    for label, key, peers in ROWS:
      ours = res[key]["time_s"]
      rows.append([batch, label, "**contrastive_jax**",
                   _util.fmt_seconds(ours), _util.fmt_ratio(ours / mm), "-",
                   _mib(res[key].get("temp_bytes")),
                   res[key].get("faults", "-")])
      for peer_label, peer_key, _ in peers:
        r = res.get(peer_key)
        if r is None:
          continue
        if "time_s" not in r:
          status = r.get("status", "skipped")
          rows.append([batch, label, peer_label, status, "-", "-", "-",
                       _util.short_detail(r.get("detail", ""))])
          continue
        t = r["time_s"]
        runs = r.get("runs")
        note = r.get("faults", "-")
        if runs == 1:
          note = "1 run"
        if r.get("peak_rss_mb"):
          note = f"{note}; peak RSS {r['peak_rss_mb'] / 1024:.1f} GiB"
        rows.append([batch, label, peer_label, _util.fmt_seconds(t),
                     _util.fmt_ratio(t / mm), _util.fmt_ratio(t / ours),
                     _mib(r.get("temp_bytes")), note])
    ntx, pdist = res["nt_xent"]["time_s"] / mm, res["pdist"]["time_s"] / mm
    line = (f"batch {batch}: nt_xent value+grad = {ntx:.2f}× matmul (target"
            f" ≤ 3×: {'MET' if ntx <= 3 else 'MISSED'}); pairwise_euclidean"
            f"_distance = {pdist:.2f}× matmul (target ≤ 1.3×:"
            f" {'MET' if pdist <= 1.3 else 'MISSED'})")
    opt = res.get("optax_ntxent", {})
    if "time_s" in opt:
      speedup = opt["time_s"] / res["nt_xent"]["time_s"]
      line += (f"; optax / ours = {speedup:.0f}× (target ≥ 40×:"
               f" {'MET' if speedup >= 40 else 'MISSED'})")
    elif opt:
      line += f"; optax: {opt.get('status')} (ours completes)"
    targets.append(line)
  headers = ["batch", "function", "implementation", "time (min)", "× matmul",
             "peer / ours", "XLA temp", "faults/call or note"]
  return _util.markdown_table(headers, rows), targets


def _mib(b):
  return "-" if b is None else f"{b / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------
# Profiling notes (--profile): where the [B, B] passes are.


def _computations(hlo: str) -> dict[str, list[str]]:
  comps, current = {}, None
  for line in hlo.splitlines():
    if line.rstrip().endswith("{") and line.lstrip("ENTRY ").startswith("%"):
      current = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
      comps[current] = []
    elif current is not None:
      comps[current].append(line)
  return comps


def _ops(body: list[str]) -> list[str]:
  """Non-trivial op names of a fused computation."""
  skip = {"parameter", "constant", "broadcast", "bitcast", "reshape", "tuple",
          "get-tuple-element", "iota"}
  ops = []
  for line in body:
    if " = " not in line:
      continue
    op = line.split(" = ", 1)[1].split("(", 1)[0].split()[-1]
    if op not in skip and op not in ops:
      ops.append(op)
  return ops


def profile(batch: int, args) -> str:
  """Lists the [B, B] buffers that each compiled function writes."""
  import re  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x_np, labels_np = make_inputs(batch, args.dim)
  x, labels = jnp.asarray(x_np), jnp.asarray(labels_np)
  jf = jax_functions(args.temperature)
  out = []
  square = re.compile(rf" = (\w+)\[{batch},{batch}\]")
  for key in ("matmul", "nt_xent", "supcon", "minimal_nt_xent", "pdist",
              "pdist_vg"):
    comps = _computations(
        jax.jit(jf[key]).lower(x, labels).compile().as_text())
    entry = next(v for k, v in comps.items() if k.startswith("main"))
    buffers = []
    for line in entry:
      m = square.search(line)
      if not m or " parameter(" in line:
        continue
      op = line.split(" = ", 1)[1].split("(", 1)[0].split()[-1]
      called = re.search(r"calls=%([\w.-]+)", line)
      if called:
        kind = "ynn" if "ynn_fusion" in line else "loop"
        op = f"{kind}[{'+'.join(_ops(comps.get(called.group(1), [])))}]"
      buffers.append(f"{m.group(1)} {op}")
    out.append(f"- `{key}`: {len(buffers)} [B,B] buffers: "
               + "; ".join(buffers))
  return "\n".join(out)


def main(argv=None) -> None:
  if _util.run_as_worker(argv, worker):
    return
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", default="1024,4096,8192")
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--budget", type=float, default=60.0,
                      help="seconds of in-process timing per batch")
  parser.add_argument("--peer-budget", type=float, default=20.0,
                      help="stop repeating a peer once this much is spent")
  parser.add_argument("--peers", default="optax,pml",
                      help="comma list of subprocess peers: optax, pml")
  parser.add_argument("--no-scipy", action="store_true")
  parser.add_argument(
      "--check-batch", type=int, default=512,
      help="batch of the value/gradient check against optax, PML, scipy and"
      " torch (0: the smallest timed batch). PML's NTXentLoss needs O(B^3)"
      " memory (a [pairs, B*(B-2)] matrix) and does not fit 16 GB at 1024")
  parser.add_argument("--mem-gb", type=float, default=16.0)
  parser.add_argument("--timeout", type=float, default=300.0)
  parser.add_argument("--max-in-process-batch", type=int, default=16384)
  parser.add_argument("--profile", action="store_true",
                      help="also list the [B,B] buffers of each compiled fn")
  args = parser.parse_args(argv)
  args.peers = [p for p in args.peers.split(",") if p]
  batches = [int(b) for b in args.batches.split(",")]
  big = [b for b in batches if b > args.max_in_process_batch]
  if big:
    parser.error(f"batches {big} exceed --max-in-process-batch (untiled "
                 "losses need O(B^2) memory; see experiments/benchmarks/"
                 "tiled.py)")
  torch = __import__("torch")
  torch.set_num_threads(os.cpu_count())
  start = time.time()
  check_batch = args.check_batch or min(batches)
  notes, cached = check_values(check_batch, args)
  print("\n".join("check: " + n for n in notes), flush=True)
  all_results = {}
  for batch in batches:
    print(f"timing batch {batch} ...", file=sys.stderr, flush=True)
    all_results[batch] = time_batch(
        batch, args, cached if batch == check_batch else {})
  table, targets = build_table(all_results)
  print()
  print(_util.machine_description())
  print()
  print(table)
  print()
  print("\n".join("target: " + t for t in targets))
  if args.profile:
    prof_batch = 4096 if 4096 in batches else max(batches)
    print(f"\n[B,B] buffers written by each compiled function at batch"
          f" {prof_batch}:")
    print(profile(prof_batch, args))
  print(f"\ntotal wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
  main()
