#!/usr/bin/env bash
# Several CIFAR-10 training runs side by side on one GPU, as the GPU machine
# runs them, from the repository root. Each argument is one run: a name, then
# the flags of `python -m experiments.train` (its --config first):
#
#   run(command="bash experiments/accelerator_sweep.sh \
#       'sgd_ls --config=experiments/configs/cifar10_gpu.py:sgd --config.loss.label_smoothing=0.2' \
#       'r18 --config=experiments/configs/cifar10_gpu.py:resnet18 --config.num_epochs=60'",
#       carry=[".whl", ".datatar"], timeout_s=450)
#
# Prepare .whl and .datatar as the header of accelerator_check.sh says. The
# runs share the GPU (each may take SWEEP_MEM_FRACTION of its memory, default
# 0.9 / runs) and the CPU cores, so their images/s are not each one's speed
# alone; their accuracies are what they would be alone. Each run's training
# loop, compilation included, stops after SWEEP_TRAIN_S seconds and the run
# is then evaluated as it stands, with status "time_budget"
# (config.max_train_seconds). The default, SWEEP_TIMEOUT_S - 120, leaves
# room for start-up and the final evaluation: with compilation, these took
# about 110 s of a ResNet-18 run sharing the H200 three ways. A run still
# going after SWEEP_TIMEOUT_S seconds (default 380) is killed. Printed at the
# end (in sequential mode, as each run ends): one line per run from its
# results.json; $OUT/sweep_<name>.tgz holds the run's results.json,
# metrics.jsonl and log (no checkpoints).
#
# The data: SWEEP_DATA_DIR (default ./.data, where device_env.sh unpacks
# .datatar), passed after each run's flags, so it is the one used.
#
# SWEEP_SEQUENTIAL=1 runs them one after another instead, each alone on the
# GPU (with all of its memory): each run's images/s and training time are
# then its own, and SWEEP_TIMEOUT_S applies to each run.
#
# CPU smoke test (two tiny runs, about a minute):
#
#   PATH=$PWD/.venv/bin:$PATH OUT=/tmp/sweep_out JAX_PLATFORMS=cpu SWEEP_DATA_DIR=../shared/data \
#       bash experiments/accelerator_sweep.sh \
#       'a --config=experiments/configs/cifar10_gpu.py:runlocal' \
#       'b --config=experiments/configs/cifar10_gpu.py:resnet18,runlocal'
#
# tests/test_device_scripts.py runs it so, on generated images, with
# TensorFlow made unimportable, as on the GPU image.

cd "$(dirname "$0")/.." || exit 1
source experiments/device_env.sh

out=${OUT:-./accelerator_sweep_out}
root=$(mktemp -d /tmp/sweep.XXXXXX)
mkdir -p "$out"
timeout_s=${SWEEP_TIMEOUT_S:-380}
train_s=${SWEEP_TRAIN_S:-$((timeout_s - 120))}
sequential=${SWEEP_SEQUENTIAL:-0}
data_dir=${SWEEP_DATA_DIR:-./.data}
sharing=$#
[ "$sequential" = 1 ] && sharing=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${SWEEP_MEM_FRACTION:-$(python3 -c "print(round(0.9 / max(1, $sharing), 3))")}

# One line from a finished run's results.json, and its files into
# $OUT/sweep_<name>.tgz, as soon as it ends: a sequential sweep cut short by
# the device call's time limit still returns the runs that finished.
report() {
  local name=$1 w="$root/$1/workdir" f
  for f in results.json metrics.jsonl; do
    [ -f "$w/$f" ] && cp "$w/$f" "$root/$name/$f"
  done
  rm -rf "$w"
  python3 - "$name" "$root/$name" "$sharing" <<'PY'
import json, os, sys
name, d, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
  r = json.load(open(os.path.join(d, "results.json")))
except OSError:
  tail = open(os.path.join(d, "log"), errors="replace").read().strip().splitlines()[-3:]
  print(f"{name}: NO RESULT; log tail: {' / '.join(tail)}")
  sys.exit()
keys = ("classifier_top1", "classifier_top1_tta_flip",
        "classifier_top1_tta_flip_translate", "knn_top1", "linear_probe_top1")
figs = ", ".join(f"{k} {100 * r[k]:.2f}" for k in keys if r.get(k) is not None)
print(f"{name}: {figs}; step {r.get('step')}/{r.get('total_steps')},"
      f" {r.get('images_per_sec', 0):,.0f} img/s"
      f" ({'alone' if runs == 1 else f'shared {runs} ways'}),"
      f" training {r.get('train_time_s') or 0:.0f} s"
      f" (loop with compilation {r.get('loop_time_s') or 0:.0f} s),"
      f" wall {r.get('wall_time_s', 0):.0f} s, {r.get('status')}", flush=True)
PY
  tar czf "$out/sweep_$name.tgz" -C "$root" "$name"
}

echo "running $# runs $([ "$sequential" = 1 ] && echo "one after another" || echo "side by side"):" \
     "memory fraction $XLA_PYTHON_CLIENT_MEM_FRACTION each;" \
     "training stops after $train_s s, each run is killed after $timeout_s s"
names=()
for spec in "$@"; do
  read -r name flags <<< "$spec"
  names+=("$name")
  mkdir -p "$root/$name"
  # shellcheck disable=SC2086  # the flags are meant to split into words
  timeout -k 10 "$timeout_s" python3 -m experiments.train \
      $flags --config.data_dir="$data_dir" --config.max_train_seconds="$train_s" \
      --workdir="$root/$name/workdir" \
      > "$root/$name/log" 2>&1 &
  if [ "$sequential" = 1 ]; then
    wait
    report "$name"
  fi
done
if [ "$sequential" != 1 ]; then
  wait
  for name in "${names[@]}"; do
    report "$name"
  done
fi
