"""The training system: families, 8-vs-1 devices, resume, corruption, NaN.

Runs on the 8 fake CPU devices of tests/conftest.py. Tiny models and data,
few compilations, compiled without LLVM optimisations (see the
``compilation_cache`` fixture): the whole file takes about 2 minutes of CPU.
The multi-process runs are in tests/test_training_multiprocess.py.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from contrastive_jax import data as cdata
from contrastive_jax import training
from contrastive_jax.evaluation import report
from contrastive_jax.training import input as input_lib
from contrastive_jax.training import state as state_lib
from contrastive_jax.training import step as step_lib
from experiments.configs import autoencoder_cifar10
from experiments.configs import digits
from experiments.configs import hashing_cifar10
from experiments.configs import simclr_cifar10
from experiments.configs import supcon_cifar10
from experiments.configs import triplet_ce_cifar10

REPO = pathlib.Path(__file__).resolve().parents[1]


# What the module fixture sets, as environment variables for the children.
_CHILD_ENV = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
              "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """Cheap XLA:CPU compilation for this module and its subprocesses.

  Compilation, not execution, dominates these few-step runs. LLVM's
  optimisation of the programs is most of it: e.g. initialising one 4-D conv
  kernel (partitionable threefry) takes 2-20 s to compile on XLA:CPU, 0.2 s
  with ``jax_disable_most_optimizations``. Every run of a comparison uses the
  same setting (the children get it through the environment). A persistent
  cache lets the restarted runs (in process or in a child) reuse the
  programs the first run compiled.
  """
  from jax._src import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp("jax_cache"))
  settings = {"jax_compilation_cache_dir": path,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0,
              "jax_disable_most_optimizations": True}
  old = {k: getattr(jax.config, k) if hasattr(jax.config, k) else
         jax.config.read(k) for k in settings}  # the last is a plain flag
  for k, v in settings.items():
    jax.config.update(k, v)
  cc.reset_cache()
  yield path
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()


def _final_state(workdir, step=None):
  """The saved state of ``step`` (default: latest) as nested numpy dicts."""
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               item_names=("state", "meta"))
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"]
  mngr.close()
  return step, out


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
  """A generated image folder ``cifar10/train/<class>/<i>.png``: 4 x 10 8x8 RGB."""
  root = tmp_path_factory.mktemp("data")
  rng = np.random.default_rng(0)
  for c in range(4):
    d = root / "cifar10" / "train" / f"class{c}"
    d.mkdir(parents=True)
    base = rng.integers(0, 256, (8, 8, 3))
    for i in range(10):
      img = np.clip(base + rng.integers(-40, 40, (8, 8, 3)), 0, 255)
      Image.fromarray(img.astype(np.uint8)).save(d / f"{i}.png")
  return str(root)


def _quick(c, *, steps=1):
  c.num_steps = steps
  c.progress_bar = False
  c.log_every = 1
  c.eval.probe_steps = 5
  c.checkpoint.async_save = False
  return c


FAMILIES = {
    "simclr": simclr_cifar10,
    "supcon": supcon_cifar10,
    "triplet_ce": triplet_ce_cifar10,
    "hashing": hashing_cifar10,
    "autoencoder": autoencoder_cifar10,
}


def _documented_config_flags():
  root = pathlib.Path(__file__).resolve().parents[1]
  files = [root / "README.md", *sorted((root / "experiments").rglob("*.md")),
           *sorted((root / "experiments").rglob("*.py")),
           *sorted((root / "experiments").glob("*.sh"))]
  flags = set()
  for f in files:
    flags.update(re.findall(r"--config\.([A-Za-z_][A-Za-z_0-9.]*[A-Za-z_0-9])",
                            f.read_text()))
  return sorted(flags)


def test_every_documented_config_flag_is_a_key_of_every_config():
  """config_flags refuses a key the config lacks (``--config.lookahead_period``
  did, on every config but airbench's), so each ``--config.X`` the docs and
  scripts name must be a key of every config; inside a ``*kwargs`` dict the
  keys are the config's own."""
  from experiments.configs import cifar10_gpu  # pylint: disable=g-import-not-at-top
  flags = _documented_config_flags()
  assert {"lookahead_period", "optimizer.sam_rho", "data_dir"} <= set(flags)
  configs = {"digits": digits.get_config(), "cifar10_gpu": cifar10_gpu.get_config(),
             **{k: m.get_config() for k, m in FAMILIES.items()}}
  for flag in flags:
    for name, c in configs.items():
      node = c
      for part in flag.split("."):
        assert part in node, f"--config.{flag}: {name} has no {part!r}"
        if part.endswith("kwargs"):
          break
        node = node[part]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_arguments_are_checked(family):
  module = FAMILIES[family]
  for arg in (None, *module.ARGS):
    module.get_config(arg)
  with pytest.raises(ValueError, match="takes no argument or one of"):
    module.get_config("run_local")  # would otherwise be the full-size run


def test_base_config_keys_hold_the_library_defaults():
  """The base config spells out keys the library also reads with defaults
  (for configs saved before a key existed); the two must not drift apart."""
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
  from experiments.configs import common  # pylint: disable=g-import-not-at-top
  base = common.base_config()
  assert step_lib.lookahead_settings(base) == step_lib.lookahead_settings(
      ml_collections.ConfigDict())
  assert base.model.whiten_init_images == loop._WHITEN_INIT_IMAGES  # pylint: disable=protected-access


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_step_per_config_family(family, tiny_cifar, tmp_path):
  c = _quick(FAMILIES[family].get_config("runlocal"))
  c.data_dir = tiny_cifar
  c.batch_size = 16
  c.num_devices = 2
  if family == "triplet_ce":
    c.ema_decay = 0.5
    c.eval.tta_flip = True
    c.eval.tta_translate = True
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["status"] == "completed" and res["step"] == 1
  assert np.isfinite(res["final_loss"])
  for key in ("knn_top1", "linear_probe_top1"):
    assert 0.0 <= res[key] <= 1.0
  if family == "hashing":
    assert 0.0 <= res["hash_map"] <= 1.0
  if family == "triplet_ce":
    assert "classifier_top1" in res
    # The weight average is evaluated; the online weights beside it.
    assert 0.0 <= res["online_classifier_top1"] <= 1.0
    assert 0.0 <= res["online_knn_top1"] <= 1.0
    # eval.tta_flip / tta_translate: the classifier with flip (+ translate)
    # TTA, as experiments.evaluate --tta_flip [--tta_translate] computes it
    # from the checkpoint.
    from contrastive_jax.evaluation import report  # pylint: disable=g-import-not-at-top
    for translate in (False, True):
      tta = report.evaluate_workdir(str(tmp_path), "validation",
                                    tta_flip=True, tta_translate=translate)
      name = "classifier_top1_tta_flip" + ("_translate" if translate else "")
      assert res[name] == pytest.approx(tta["heads"]["classifier_top1"],
                                        abs=1.5 / tta["num_queries"])
      suffix = name[len("classifier_top1"):]
      for metric in ("macro_recall", "macro_f1"):
        assert res[f"classifier_{metric}{suffix}"] == pytest.approx(
            tta["classifier_classification"][metric], abs=0.05)
    plain = report.evaluate_workdir(str(tmp_path), "validation")
    for metric in ("macro_recall", "macro_f1"):
      assert res[f"classifier_{metric}"] == pytest.approx(
          plain["classifier_classification"][metric], abs=0.05)
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["step"] == 1 and saved["devices"] == 2
  assert json.loads((tmp_path / "config.json").read_text())["dataset"] == (
      "cifar10")
  assert list(tmp_path.glob("events.out.tfevents.*"))


def _small_digits(**overrides):
  """Digits with a small MLP: fast to compile; exercises BN and the weight
  average (so every resume test also checks that it is restored)."""
  c = digits.get_config()
  c.model.backbone = "mlp"
  c.model.backbone_kwargs = dict(hidden_dims=(32,), output_dim=16)
  c.model.projection_dim = 8
  c.model.projection_hidden_dim = 16
  c.batch_size = 64
  c.num_steps = 30
  c.checkpoint.every_steps = 10
  c.checkpoint.keep = 3
  c.eval.final = False
  c.progress_bar = False
  c.log_every = 1
  c.optimizer.warmup_steps = 3
  c.ema_decay = 0.9
  for k, v in overrides.items():
    c.update_from_flattened_dict({k: v})
  return c


@pytest.mark.parametrize("overrides,match", [
    ({"batch_size": 0}, "batch_size must be an int >= 1"),
    ({"checkpoint.every_steps": 0}, "checkpoint.every_steps must be"),
    ({"checkpoint.keep": 0}, "checkpoint.keep must be an int >= 1"),
    ({"num_steps": 0, "num_epochs": 0}, "both are 0"),
    ({"num_devices": 99}, "only 8 devices"),
    ({"num_devices": 3}, "batch_size=64 must be divisible by the 3"),
    ({"batch_size": 60}, "batch_size=60 must be divisible by the 8"),
    ({"eval_every": -1}, "eval_every must be an int >= 0"),
    ({"loss.labels": "instances"}, "loss.labels must be 'class' or"),
    ({"optimizer.learning_rate": -1.0}, "learning_rate must be >= 0"),
    ({"optimizer.warmup_steps": -10}, "warmup_steps must be >= 0"),
])
def test_bad_run_settings_are_refused_before_anything_is_written(
    tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    training.train_and_evaluate(_small_digits(**overrides), str(tmp_path / "wd"))
  assert not [f for f in (tmp_path / "wd").rglob("*") if f.is_file()]


@pytest.mark.parametrize("key,value", [
    ("eval.tta_flip", "yes"),  # read only after training: checked up front
    ("eval.tta_translate", 1),
    ("eval.final", "no"),
    ("optimizer.nesterov", "False"),  # truthy: would have meant True
    ("model.classifier", 0),
    ("data.normalize", None),
    ("data.tune", 1),
    ("progress_bar", "off"),
])
def test_on_off_settings_must_be_bools_before_anything_is_written(
    tmp_path, key, value):
  """ConfigDict keeps a default's type, but a config built by hand may not."""
  c = _small_digits()
  *parents, leaf = key.split(".")
  section = c
  for name in parents:
    section = section[name]
  with c.unlocked():
    if leaf in section:
      del section[leaf]
    section[leaf] = value
  with pytest.raises(TypeError, match=f"^{key} must be a bool, got "):
    training.train_and_evaluate(c, str(tmp_path / "wd"))
  assert not [f for f in (tmp_path / "wd").rglob("*") if f.is_file()]


def test_tune_run_never_loads_the_validation_split(tmp_path, monkeypatch):
  """``data.tune``: train on "tune_train", evaluate on "tune" against it."""
  loaded = []
  real = cdata.load_split_arrays

  def spy(name, split, **kw):
    loaded.append(split)
    return real(name, split, **kw)

  monkeypatch.setattr(cdata, "load_split_arrays", spy)
  c = _small_digits(num_steps=2, **{"data.tune": True, "eval.final": True,
                                    "eval.probe_steps": 2})
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["eval_split"] == "tune" and 0 <= res["knn_top1"] <= 1
  assert set(loaded) == {"tune_train", "tune"}, loaded
  # The report of the workdir queries "tune" against "tune_train" too.
  prepared = report.prepare(str(tmp_path), "tune")
  assert set(loaded) == {"tune_train", "tune"}, loaded
  assert prepared.query_labels.shape == (378,)
  assert prepared.train_labels.shape == (879,)
  assert prepared.train["features"].shape[0] == 879
  assert input_lib.run_splits(_small_digits()) == ("train", "validation")
  # ConfigDict keeps the type of a default; a config built by hand may not.
  with pytest.raises(TypeError, match="data.tune must be a bool, got 1"):
    input_lib.run_splits(ml_collections.ConfigDict({"data": {"tune": 1}}))


def test_default_digits_config_is_a_short_cpu_run():
  c = digits.get_config()
  assert c.dataset == "digits" and c.input == "device"
  # About a minute on 2 CPU cores: 1000 steps of 256 8x8 images.
  assert c.num_steps * c.batch_size <= 300_000


@pytest.mark.parametrize("labels", ["class", "instance"])
def test_8_devices_equal_1_device(tmp_path, labels):
  """Same global batch: same loss curve and parameters on 8 devices as on 1.

  Exercises synchronised BatchNorm (projection head), global negatives, the
  cross-batch memory, the classifier cross-entropy and the online probe;
  with instance labels, the ids numbered over the global batch (the memory
  keeps them, so they are compared too).
  """
  runs = {}
  for n in (1, 8):
    c = _small_digits(num_steps=4, num_devices=n)
    c.loss.labels = labels
    if labels == "instance":
      c.data.views = 2
    c.checkpoint.every_steps = 4
    c.loss.memory_size = 128
    c.loss.ce_weight = 0.5
    c.model.classifier = True
    c.optimizer.grad_clip_norm = 1.0
    wd = tmp_path / f"d{n}"
    res = training.train_and_evaluate(c, str(wd))
    assert res["devices"] == n
    curve = [json.loads(l)["loss"] for l in
             (wd / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    runs[n] = (curve, _final_state(str(wd))[1])
  np.testing.assert_allclose(runs[8][0], runs[1][0], rtol=1e-5)
  assert len(runs[1][0]) == 4
  for a, b in zip(_leaves(runs[1][1]["params"]), _leaves(runs[8][1]["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(_leaves(runs[1][1]["batch_stats"]),
                  _leaves(runs[8][1]["batch_stats"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  memories = [runs[n][1]["memory"] for n in (1, 8)]
  if labels == "instance":
    # Each device enqueues its [view 0; view 1] rows, so with two views the
    # slots hold the same rows in another order: compare them sorted.
    for m in memories:
      order = np.lexsort((m["embeddings"][:, 0], m["labels"]))
      for k in ("embeddings", "labels", "valid"):
        m[k] = np.asarray(m[k])[order]
    # 4 steps of 64 images x 2 views into 128 slots: the last step's ids.
    np.testing.assert_array_equal(memories[1]["labels"],
                                  np.repeat(np.arange(192, 256), 2))
  for a, b in zip(_leaves(memories[0]), _leaves(memories[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(_leaves(runs[1][1]["ema"]), _leaves(runs[8][1]["ema"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["info_nce", "sigmoid"])
def test_query_key_losses_train_on_8_devices(name, tmp_path):
  """The paired losses take view 0 as queries and view 1 as keys."""
  c = _small_digits(num_steps=2, num_devices=8)
  c.loss.name = name
  c.loss.kwargs = {}
  c.data.views = 2
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["step"] == 2
  losses_seen = [json.loads(l)["metric_loss"] for l in
                 (tmp_path / "metrics.jsonl").read_text().splitlines()
                 if '"metric_loss"' in l]
  assert len(losses_seen) == 2 and all(np.isfinite(losses_seen))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted 30-step run; checkpoints at 10, 20, 30."""
  wd = tmp_path_factory.mktemp("reference")
  res = training.train_and_evaluate(_small_digits(), str(wd))
  assert res["step"] == 30
  step, state = _final_state(str(wd))
  assert step == 30
  return str(wd), _leaves(state)


_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    import test_training
    from contrastive_jax import training
    workdir, kill_at = sys.argv[1], int(sys.argv[2])
    seen = []
    def callback(step):
      seen.append(step)
      if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    training.train_and_evaluate(test_training._small_digits(), workdir,
                                step_callback=callback)
    print("FIRST_STEP", seen[0])
""")


def test_kill_9_and_restart_ends_bit_identical(reference_run, tmp_path,
                                                compilation_cache):
  ref_dir, ref_leaves = reference_run
  script = tmp_path / "child.py"
  script.write_text(_CHILD.format(repo=str(REPO),
                                  tests=str(REPO / "tests")))
  wd = tmp_path / "run"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compilation_cache,
             **_CHILD_ENV)
  first = subprocess.run([sys.executable, str(script), str(wd), "25"],
                         env=env, capture_output=True, text=True, timeout=300)
  assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
  assert not (wd / "results.json").exists()
  second = subprocess.run([sys.executable, str(script), str(wd), "0"],
                          env=env, capture_output=True, text=True, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  # Resumed from checkpoint 20 (or 10, had the kill caught 20 mid-save).
  assert "FIRST_STEP 21" in second.stdout or "FIRST_STEP 11" in second.stdout
  step, state = _final_state(str(wd))
  assert step == 30
  for a, b in zip(ref_leaves, _leaves(state)):
    np.testing.assert_array_equal(a, b)


def test_sigterm_saves_and_resumes_identically(reference_run, tmp_path):
  _, ref_leaves = reference_run

  def callback(step):
    if step == 15:
      os.kill(os.getpid(), signal.SIGTERM)

  res = training.train_and_evaluate(_small_digits(), str(tmp_path),
                                    step_callback=callback)
  # The flag is read at the next step boundary: stops at 15 or 16.
  assert res["status"] == "preempted" and res["step"] in (15, 16)
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  assert res["step"] in mngr.all_steps()
  mngr.close()
  res = training.train_and_evaluate(_small_digits(), str(tmp_path))
  assert res["status"] == "completed" and res["step"] == 30
  for a, b in zip(ref_leaves, _leaves(_final_state(str(tmp_path))[1])):
    np.testing.assert_array_equal(a, b)


def test_corrupt_latest_checkpoint_falls_back(reference_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  ref_dir, ref_leaves = reference_run
  wd = tmp_path / "run"
  shutil.copytree(ref_dir, wd)
  for f in (wd / "checkpoints" / "30" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  (wd / "results.json").unlink()
  res = training.train_and_evaluate(_small_digits(), str(wd))
  assert res["step"] == 30
  assert list((wd / "checkpoints_corrupt").iterdir())
  for a, b in zip(ref_leaves, _leaves(_final_state(str(wd))[1])):
    np.testing.assert_array_equal(a, b)


def test_evaluation_restores_the_weight_average(reference_run):
  from contrastive_jax.evaluation import report  # pylint: disable=g-import-not-at-top
  ref_dir, _ = reference_run
  _, saved = _final_state(ref_dir)
  for online, src in ((False, saved["ema"]), (True, saved)):
    run = report.load_run(ref_dir, online=online)
    assert run.online == online
    for key in ("params", "batch_stats"):
      for a, b in zip(_leaves(src[key]), _leaves(run.variables[key])):
        np.testing.assert_array_equal(a, b)


def test_state_saved_before_a_field_existed_restores(tmp_path):
  """A checkpoint without ``ema`` (older code) restores with ``ema={}``; one
  whose fields differ otherwise is refused and left where it is."""
  import flax  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top

  @flax.struct.dataclass
  class Old:  # TrainState before the weight average
    step: jax.Array
    params: dict
    batch_stats: dict
    opt_state: dict
    rng: jax.Array
    memory: dict

  old = Old(step=np.int32(7), params={"w": np.arange(3.0)}, batch_stats={},
            opt_state={"mu": np.ones(3)}, rng=np.zeros(2, np.uint32),
            memory={})
  ck = ckpt_lib.Checkpointer(str(tmp_path), fingerprint="f", async_save=False)
  ck.save(7, old)
  ck.wait()
  target = training.TrainState(**{k: getattr(old, k) for k in (
      "step", "params", "batch_stats", "opt_state", "rng", "memory")})
  assert target.ema == {}
  restored, step = ck.restore_latest(state_lib.abstract_state(target))
  assert step == 7 and restored.ema == {}
  np.testing.assert_array_equal(restored.params["w"], np.arange(3.0))
  np.testing.assert_array_equal(restored.opt_state["mu"], np.ones(3))
  with_ema = target.replace(ema={"params": target.params})
  with pytest.raises(training.IncompatibleCheckpointError,
                     match=r"holds the state fields.*left\s+untouched"):
    ck.restore_latest(state_lib.abstract_state(with_ema))
  assert ck.all_steps() == [7] and not (tmp_path / "checkpoints_corrupt").exists()
  ck.close()


def test_checkpointer_refuses_intact_mismatches_and_reads_only(tmp_path):
  """A readable checkpoint whose arrays do not fit the state (another
  optimizer chain) is refused, untouched; read-only use never moves one."""
  from contrastive_jax.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  state = {"params": {"w": np.arange(3.0)}, "opt_state": [np.ones(3)]}
  ck = ckpt_lib.Checkpointer(str(tmp_path), fingerprint="f", async_save=False)
  ck.save(5, state)
  ck.wait()
  other = {"params": {"w": np.arange(3.0)},
           "opt_state": [{"count": np.int32(0)}, np.ones(3)]}
  with pytest.raises(training.IncompatibleCheckpointError,
                     match=r"readable but its arrays\s+do not fit"):
    ck.restore_latest(jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype),
        other))
  assert ck.all_steps() == [5] and not (tmp_path / "checkpoints_corrupt").exists()
  ck.close()
  # A corrupt one: a reader skips it and moves nothing; a trainer sets it aside.
  for f in (tmp_path / "checkpoints" / "5" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  reader = ckpt_lib.Checkpointer(str(tmp_path), fingerprint="f",
                                 async_save=False, read_only=True)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype), state)
  assert reader.restore_latest(abstract) == (None, None)
  reader.close()
  assert (tmp_path / "checkpoints" / "5").is_dir()
  assert not (tmp_path / "checkpoints_corrupt").exists()
  writer = ckpt_lib.Checkpointer(str(tmp_path), fingerprint="f",
                                 async_save=False)
  assert writer.restore_latest(abstract) == (None, None)
  writer.close()
  assert list((tmp_path / "checkpoints_corrupt").iterdir())
  for keep, error in ((0, ValueError), (-1, ValueError), (2.0, TypeError)):
    with pytest.raises(error, match="checkpoint.keep must be an int >= 1"):
      ckpt_lib.Checkpointer(str(tmp_path / "k"), fingerprint="f", keep=keep)


def test_checkpoints_carry_their_config(tmp_path):
  """Saved before an option existed, a checkpoint stays accepted once the
  option is at its neutral default, whatever config.json says by then; a
  real difference is refused."""
  from contrastive_jax.training import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  state = {"w": np.arange(3.0)}
  abstract = {"w": jax.ShapeDtypeStruct((3,), np.float64)}
  old_cfg = {"seed": 0, "model": {"width": (4, 8)}}
  ck = ckpt_lib.Checkpointer(str(tmp_path), fingerprint="old", config=old_cfg,
                             async_save=False)
  ck.save(3, state)
  ck.close()
  new_cfg = dict(old_cfg, lookahead_period=0)  # added later, neutral
  ck = ckpt_lib.Checkpointer(
      str(tmp_path), config=new_cfg, async_save=False,
      fingerprint=ckpt_lib.config_fingerprint(new_cfg))
  restored, step = ck.restore_latest(abstract)
  assert step == 3
  np.testing.assert_array_equal(restored["w"], state["w"])
  ck.close()
  ck = ckpt_lib.Checkpointer(
      str(tmp_path), config=dict(new_cfg, lookahead_period=5),
      fingerprint="other", async_save=False)
  with pytest.raises(training.IncompatibleCheckpointError,
                     match=r"lookahead_period: \(absent\) -> 5"):
    ck.restore_latest(abstract)
  ck.close()


def test_incompatible_config_is_refused_untouched(reference_run, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  ref_dir, _ = reference_run
  wd = tmp_path / "run"
  shutil.copytree(ref_dir, wd)
  before = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
  c = _small_digits()
  c.model.backbone_kwargs = dict(hidden_dims=(48,), output_dim=16)
  with pytest.raises(training.IncompatibleCheckpointError, match="hidden_dims"):
    training.train_and_evaluate(c, str(wd))
  after = {p: p.read_bytes() for p in wd.rglob("*") if p.is_file()}
  assert before == after


@pytest.mark.parametrize("every", [1, 10])
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, every):
  """Saving (and logging) every step, or every 10: the metrics are checked
  only at log and save steps, yet the diverging step is named and nothing
  after it is saved (with 10, no checkpoint at all)."""
  c = _small_digits(num_steps=20)
  c.model.projection_dim = 0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e30
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.checkpoint.every_steps = every
  c.log_every = every
  kept = ("last good checkpoint is step" if every == 1
          else "no last good checkpoint: none was saved")
  with pytest.raises(training.NonFiniteLossError,
                     match=rf"at step [1-9]\b.*{kept}"):
    training.train_and_evaluate(c, str(tmp_path))
  assert not (tmp_path / "results.json").exists()
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
  steps = mngr.all_steps()
  mngr.close()
  if every == 10:
    assert not steps
  for s in steps:
    _, state = _final_state(str(tmp_path), s)
    assert all(np.all(np.isfinite(x)) for x in _leaves(state["params"]))
  assert not (tmp_path / "results.json").exists()


def test_metrics_are_fetched_once_per_log_interval(tmp_path, monkeypatch):
  """No device-to-host copy per step: the loop fetches the metrics of a
  whole log interval at once, yet logs every step's values (the logged loss
  is the mean over the interval)."""
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
  fetches = []
  real = loop._host  # pylint: disable=protected-access

  def counting(tree):
    fetches.append(len(tree))
    return real(tree)

  monkeypatch.setattr(loop, "_host", counting)
  c = _small_digits(num_steps=12, ema_decay=0.0)
  c.log_every = 4
  c.checkpoint.every_steps = 12
  c.eval.final = False
  training.train_and_evaluate(c, str(tmp_path))
  assert fetches == [4, 4, 4]
  logged = [json.loads(l) for l in
            (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in logged if "loss" in r] == [4, 8, 12]


def test_tf_input_path_one_step(tmp_path):
  c = _quick(digits.get_config())
  c.input = "tf"
  c.model.backbone = "mlp"
  c.model.backbone_kwargs = dict(hidden_dims=(16,), output_dim=8)
  c.model.projection_dim = 0
  c.batch_size = 32
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["step"] == 1 and 0.0 <= res["knn_top1"] <= 1.0


def test_guard_traces_counts_per_function():
  make = lambda: jax.jit(step_lib.guard_traces(
      lambda state, x: (state, x * 2), max_traces=1, name="the step"))
  f, g = make(), make()
  for _ in range(3):  # same shapes: one trace
    f(0, np.ones(3, np.float32))
  g(0, np.ones(3, np.float32))  # another object: its own count
  with pytest.raises(training.RetraceError,
                     match=r"traced 2 times.*float32\[4\]"):
    f(0, np.ones(4, np.float32))
  # Every train_and_evaluate above also ran the real step under this guard
  # (max_traces=1), so none of them recompiled it.


def test_label_smoothed_cross_entropy_matches_numpy():
  from contrastive_jax.training import step as step_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 5)) * 3
  labels = np.array([0, 4, 2, 2, 1, 3])
  alpha = 0.2
  # Reference: targets (1 - alpha) * one_hot + alpha / K, float64.
  targets = np.full((6, 5), alpha / 5) + (1 - alpha) * np.eye(5)[labels]
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  expected = np.mean(-(targets * log_p).sum(-1))
  got = jax.jit(step_lib._ce, static_argnums=2)(  # pylint: disable=protected-access
      logits.astype(np.float32), labels, alpha)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # alpha = 0 is the plain integer-label cross-entropy.
  plain = np.mean(-log_p[np.arange(6), labels])
  np.testing.assert_allclose(step_lib._ce(logits, labels, 0.0), plain,  # pylint: disable=protected-access
                             rtol=1e-5)
  # d/dz of the mean soft-target cross-entropy: (softmax(z) - targets) / N.
  # (_ce computes in float32, too coarse for check_grads' finite differences.)
  grad = jax.grad(step_lib._ce)(logits.astype(np.float32), labels, alpha)  # pylint: disable=protected-access
  np.testing.assert_allclose(grad, (np.exp(log_p) - targets) / 6, atol=1e-6)


def test_build_whitens_on_a_random_subset_of_the_training_images():
  """``FastCNN(whiten_size=2)`` built by the loop: its filters whiten 1,024
  normalised training images drawn from the whole split (not the zeros of a
  shape-only init, nor the first classes of a class-sorted folder)."""
  from contrastive_jax import models  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import input as input_lib  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
  c = _small_digits(num_steps=3)
  c.model.backbone = "fast_cnn"
  c.model.backbone_kwargs = dict(widths=(4, 4, 4), stem_width=0, whiten_size=2)
  mesh = training.make_mesh(1)
  data = input_lib.make_train_input(c, mesh, seed_key=jax.random.key(1))
  images = data.init_images(1024)
  assert images.shape == (1024, 8, 8, 1) and images.dtype == np.float32
  # A random subset of the whole split, every class in it, not the first
  # 1,024 (class-sorted image folders would give one or two classes).
  index = data.init_index(1024)
  assert len(set(index)) == 1024 and index.max() >= 1100
  labels = data._arrays.labels  # pylint: disable=protected-access
  assert np.bincount(labels[index], minlength=10).min() >= 80
  np.testing.assert_array_equal(index, data.init_index(1024))  # fixed
  np.testing.assert_array_equal(data.init_index(300), np.sort(
      np.random.default_rng(0).permutation(data.num_train)[:300]))
  assert abs(images.mean()) < 0.1 and abs(images.std() - 1) < 0.1  # normalised
  _, _, _, _, state = loop.build(c, mesh, data, steps=3)
  kernel = state.batch_stats["backbone"]["whiten_kernel"]
  np.testing.assert_allclose(kernel, models.patch_whitening_kernel(jnp.asarray(images)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(state.ema["batch_stats"]["backbone"]["whiten_kernel"],
                             kernel)
  # config.model.whiten_init_images picks how many (airbench: 5,000).
  c.model.whiten_init_images = 300
  _, _, _, _, state = loop.build(c, mesh, data, steps=3)
  np.testing.assert_allclose(
      state.batch_stats["backbone"]["whiten_kernel"],
      models.patch_whitening_kernel(jnp.asarray(data.init_images(300))),
      rtol=1e-4, atol=1e-4)


def test_weight_average_follows_its_recurrence():
  """``ema`` after each step against a float64 NumPy recurrence of the params.

  e_0 = p_0; e_{t+1} = r_t e_t + (1 - r_t) p_{t+1} with
  r_t = min(d, (1 + t) / (10 + t)); BatchNorm statistics likewise.
  """
  from contrastive_jax.training import input as input_lib  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
  c = _small_digits(num_steps=3, ema_decay=0.6)
  mesh = training.make_mesh(1)
  data = input_lib.make_train_input(c, mesh, seed_key=jax.random.key(1))
  _, train_model, tx, schedule, state = loop.build(c, mesh, data, steps=3)
  step = training.make_train_step(train_model, tx, schedule, c, mesh)

  def host(s):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(
        {"params": s.params, "batch_stats": s.batch_stats})]

  assert state.batch_stats  # the projection head's BatchNorm is averaged too
  expected = host(state)
  data.start(0)
  for t in range(3):
    state, _ = step(state, next(data))
    r = min(0.6, (1 + t) / (10 + t))
    expected = [r * e + (1 - r) * p for e, p in zip(expected, host(state))]
    got = [np.asarray(x) for x in jax.tree.leaves(state.ema)]
    for e, g in zip(expected, got):
      np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
  # After a few steps the average differs from the online weights.
  assert not np.allclose(got[0], host(state)[0])
  assert loop.eval_variables(state)["params"] is state.ema["params"]
  assert loop.eval_variables(state, online=True)["params"] is state.params


def test_ema_decay_out_of_range_is_refused():
  with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
    training.make_train_step(None, None, None, _small_digits(ema_decay=1.0),
                             None)


def test_run_saved_before_an_option_existed_resumes(tmp_path):
  """Its checkpoints carry the older config's fingerprint; they still load."""
  old = _small_digits(num_steps=10)
  del old.loss["label_smoothing"]  # as saved before the option was added
  training.train_and_evaluate(old, str(tmp_path))
  seen = []
  res = training.train_and_evaluate(_small_digits(num_steps=20),
                                    str(tmp_path), step_callback=seen.append)
  assert res["status"] == "completed" and res["step"] == 20
  assert seen[0] == 11  # resumed, not restarted


def test_label_smoothing_out_of_range_is_refused():
  c = _small_digits()
  c.loss.ce_weight = 1.0
  c.loss.label_smoothing = 1.0
  with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\)"):
    training.make_train_step(None, None, None, c, None)
  c.loss.label_smoothing = 0.1
  c.loss.ce_weight = 0.0
  with pytest.raises(ValueError, match="set loss.ce_weight > 0"):
    training.make_train_step(None, None, None, c, None)


def test_option_added_after_a_run_does_not_block_its_resume(tmp_path):
  """A run saved before a config key existed resumes when the key is off."""
  from contrastive_jax.training import checkpoint  # pylint: disable=g-import-not-at-top
  (tmp_path / "checkpoints" / "10").mkdir(parents=True)
  saved = {"seed": 0, "loss": {"name": "nt_xent", "ce_weight": 0.0}}
  (tmp_path / "config.json").write_text(json.dumps(saved))
  now = {"seed": 0, "loss": {"name": "nt_xent", "ce_weight": 0.0,
                             "label_smoothing": 0.0}}
  checkpoint.check_workdir_config(str(tmp_path), now)
  now["loss"]["label_smoothing"] = 0.1
  with pytest.raises(training.IncompatibleCheckpointError,
                     match=r"loss.label_smoothing: \(absent\) -> 0.1"):
    checkpoint.check_workdir_config(str(tmp_path), now)


@pytest.mark.parametrize("config", [triplet_ce_cifar10, supcon_cifar10])
def test_cpu_wide_is_cpu_with_a_wider_cnn_and_label_smoothing(config):
  cpu = config.get_config("cpu").to_dict()
  wide = config.get_config("cpu_wide").to_dict()
  assert wide["model"].pop("backbone_kwargs") == dict(
      widths=(40, 160, 160), stem_width=0)
  cpu["model"].pop("backbone_kwargs")
  assert (wide["loss"].pop("label_smoothing"),
          cpu["loss"].pop("label_smoothing")) == (0.2, 0.0)
  assert wide == cpu


@pytest.mark.parametrize("config", [triplet_ce_cifar10, supcon_cifar10])
def test_cpu_whiten_is_cpu_wide_behind_a_whitening_layer(config):
  wide = config.get_config("cpu_wide").to_dict()
  whiten = config.get_config("cpu_whiten").to_dict()
  assert whiten["model"]["backbone_kwargs"].pop("whiten_size") == 2
  assert whiten == wide


def test_cpu_airbench_is_the_recorded_airbench_command_and_its_triplet_twin():
  """``supcon_cifar10.py:cpu_airbench`` is the command of RESULTS' best CPU
  row (``cifar10_gpu.py:airbench`` with widths 32-128-128 and 24 epochs on
  the command line) apart from checkpointing and logging; the triplet one
  differs from it only in the loss and where it applies."""
  from experiments.configs import cifar10_gpu  # pylint: disable=g-import-not-at-top
  recorded = cifar10_gpu.get_config("airbench").to_dict()
  recorded["num_epochs"] = 24
  recorded["model"]["backbone_kwargs"]["widths"] = (32, 128, 128)
  supcon = supcon_cifar10.get_config("cpu_airbench").to_dict()
  assert supcon.pop("log_every") == 50
  assert supcon["checkpoint"].pop("every_steps") == 250
  recorded.pop("log_every")
  recorded["checkpoint"].pop("every_steps")
  assert supcon == recorded
  triplet = triplet_ce_cifar10.get_config("cpu_airbench").to_dict()
  triplet.pop("log_every")
  triplet["checkpoint"].pop("every_steps")
  # The triplet loss on the backbone's features, not on a projection.
  assert (triplet["model"].pop("projection_dim"),
          supcon["model"].pop("projection_dim")) == (0, 128)
  assert triplet.pop("loss") == dict(
      supcon.pop("loss"), name="batch_hard_triplet",
      kwargs=dict(margin=0.2, metric="cosine"), weight=0.1)
  assert triplet == supcon


def test_gpu_config_and_its_smoke_run_keep_the_whitening_layer():
  from experiments.configs import cifar10_gpu  # pylint: disable=g-import-not-at-top
  for arg in (None, "runlocal"):
    kw = cifar10_gpu.get_config(arg).model.backbone_kwargs
    assert (kw.whiten_size, kw.stem_width) == (2, 0)


def test_sam_step_is_the_plain_step_from_the_perturbed_weights():
  """SAM on 8 devices against its definition, built from two plain steps.

  With SGD (first step: update = -lr * g), no weight decay and a constant
  learning rate, one plain step from p gives g(p) = (p - step(p)) / lr. SAM
  moves p by -lr * g(p + rho * g(p) / |g(p)|): the plain step from the
  perturbed weights, shifted back by the perturbation. A SAM whose second
  gradient were a device's own (not the global batch's) fails this.
  """
  from contrastive_jax.training import input as input_lib  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
  lr, rho = 0.1, 0.05

  def config(sam_rho):
    c = _small_digits(num_steps=1, ema_decay=0.0)
    c.optimizer.update(dict(name="sgd", learning_rate=lr, momentum=0.9,
                            weight_decay=0.0, schedule="constant",
                            warmup_steps=0, sam_rho=sam_rho))
    return c

  mesh = training.make_mesh(8)
  data = input_lib.make_train_input(config(0.0), mesh,
                                    seed_key=jax.random.key(1))
  data.start(0)
  batch = next(data)

  def one_step(sam_rho, params=None):
    c = config(sam_rho)
    _, model, tx, schedule, state = loop.build(c, mesh, data, steps=1)
    if params is not None:
      state = state.replace(params=jax.device_put(
          params, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())))
    step = training.make_train_step(model, tx, schedule, c, mesh)
    p0 = jax.tree.map(np.asarray, state.params)
    new, metrics = step(state, batch)
    return p0, jax.tree.map(np.asarray, new.params), metrics

  p0, p_plain, _ = one_step(0.0)
  g0 = jax.tree.map(lambda a, b: (a - b) / lr, p0, p_plain)
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(g0)))
  eps = jax.tree.map(lambda g: rho * g / norm, g0)
  p_adv = jax.tree.map(lambda p, e: p + e, p0, eps)
  _, p_adv_step, _ = one_step(0.0, params=p_adv)
  expected = jax.tree.map(lambda q, e: q - e, p_adv_step, eps)
  p0_sam, p_sam, metrics = one_step(rho)
  for a, b in zip(jax.tree.leaves(p0_sam), jax.tree.leaves(p0)):
    np.testing.assert_array_equal(a, b)
  for got, want, plain in zip(jax.tree.leaves(p_sam), jax.tree.leaves(expected),
                              jax.tree.leaves(p_plain)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=2e-6)
  # SAM moved the weights somewhere else than the plain step did.
  assert max(np.max(np.abs(a - b)) for a, b in zip(
      jax.tree.leaves(p_sam), jax.tree.leaves(p_plain))) > 1e-4
  assert np.isfinite(float(metrics["loss"]))


def test_sam_rho_below_zero_is_refused():
  from contrastive_jax.training import optim  # pylint: disable=g-import-not-at-top
  c = _small_digits()
  c.optimizer.sam_rho = -0.1
  with pytest.raises(ValueError, match="sam_rho must be >= 0"):
    optim.make_optimizer(c.optimizer, 1e-3)


def test_time_budget_stops_saves_evaluates_and_resumes(tmp_path):
  c = _small_digits(num_steps=1_000_000, max_train_seconds=1.0)
  c.checkpoint.every_steps = 1_000_000
  c.eval.final = True
  c.eval.probe_steps = 5
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["status"] == "time_budget"
  stopped = res["step"]
  assert 1 <= stopped < 1_000_000  # compilation counts: maybe one step
  assert res["loop_time_s"] >= 1.0 and res["train_time_s"] <= res[
      "loop_time_s"]
  assert 0.0 <= res["knn_top1"] <= 1.0  # evaluated as it stands
  assert _final_state(str(tmp_path))[0] == stopped  # saved at the stop
  # A relaunch resumes there, whatever its own budget.
  seen = []
  res = training.train_and_evaluate(
      _small_digits(num_steps=stopped + 3, max_train_seconds=0.0),
      str(tmp_path), step_callback=seen.append)
  assert seen[0] == stopped + 1 and res["status"] == "completed"


def test_batchnorm_backward_variants_train_identically_on_8_devices():
  """The train step (shard_map, synchronised BN, SupCon + CE, SGD) with a
  ResNet whose BatchNorm + ReLU backward pass is autodiff, remat or custom:
  the same losses, parameters and BatchNorm statistics after 2 steps."""
  from contrastive_jax.training import input as input_lib  # pylint: disable=g-import-not-at-top
  from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top

  def config(backward):
    c = _small_digits(num_steps=2, ema_decay=0.0)
    c.model.backbone = "resnet"
    c.model.backbone_kwargs = dict(stage_sizes=(1, 1), num_filters=4,
                                   norm_backward=backward)
    c.model.classifier = True
    c.loss.ce_weight = 0.5
    c.optimizer.update(dict(name="sgd", learning_rate=0.1, momentum=0.9))
    return c

  mesh = training.make_mesh(8)
  data = input_lib.make_train_input(config("autodiff"), mesh,
                                    seed_key=jax.random.key(1))
  data.start(0)
  batches = [next(data) for _ in range(2)]
  runs = {}
  for backward in ("autodiff", "remat", "custom"):
    c = config(backward)
    _, model, tx, schedule, state = loop.build(c, mesh, data, steps=2)
    step = training.make_train_step(model, tx, schedule, c, mesh)
    losses = []
    for batch in batches:
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    runs[backward] = (losses, jax.tree.map(np.asarray, (state.params,
                                                        state.batch_stats)))
  for backward in ("remat", "custom"):
    np.testing.assert_allclose(runs[backward][0], runs["autodiff"][0], rtol=1e-5)
    for got, want in zip(_leaves(runs[backward][1]), _leaves(runs["autodiff"][1])):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  # The steps did move the weights.
  assert runs["autodiff"][0][0] != runs["autodiff"][0][1]


def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(tree)}


# ----------------------------------------------------------- lookahead


class _AirbenchLookahead:
  """airbench96's ``LookaheadState`` and its calls, in NumPy."""

  def __init__(self, net, total):
    self.ema = {k: v.copy() for k, v in net.items()}
    self.alpha = 0.95 ** 5 * (np.arange(total + 1) / total) ** 3
    self.total = total

  def update(self, net, decay):
    for k, v in net.items():
      if v.dtype.kind == "f":
        self.ema[k] += (1 - decay) * (v - self.ema[k])  # lerp_(net, 1-decay)
        net[k] = self.ema[k].copy()

  def after_step(self, net, current_steps):
    if current_steps % 5 == 0:
      self.update(net, self.alpha[current_steps])
    if current_steps >= self.total:
      self.update(net, 1.0)


@pytest.mark.parametrize("total", [12, 10])
def test_lookahead_update_is_airbench(total):
  """12: the last step is no sync step; 10: the periodic update, then the
  final one, on the same step."""
  rng = np.random.default_rng(2)
  fast = {"params": {"w": rng.standard_normal((3, 2)).astype(np.float32)},
          "batch_stats": {"mean": rng.standard_normal(2).astype(np.float32),
                          "count": np.arange(2, dtype=np.int32)}}
  slow = jax.tree.map(np.copy, fast)
  ref_net = {k: v.astype(np.float64) if v.dtype.kind == "f" else v.copy()
             for k, v in _flat(fast).items()}
  ref = _AirbenchLookahead(ref_net, total)
  update = jax.jit(lambda f, s, t: step_lib.lookahead_update(
      f, s, t, total_steps=total, period=5, decay=0.95 ** 5, power=3.0))
  synced = []
  for t in range(1, total + 1):
    delta = jax.tree.map(
        lambda x: (rng.standard_normal(x.shape) if x.dtype.kind == "f" else
                   np.ones(x.shape)).astype(x.dtype), fast)
    fast = jax.tree.map(lambda x, d: np.asarray(x) + d, fast, delta)  # "SGD"
    for k, d in _flat(delta).items():
      ref_net[k] = ref_net[k] + d
    ref.after_step(ref_net, t)
    fast, slow = update(fast, slow, jnp.int32(t))
    for k, v in _flat(fast).items():
      np.testing.assert_allclose(v, ref_net[k], rtol=1e-5, atol=1e-6,
                                 err_msg=f"fast {k} at step {t}")
    for k, v in _flat(slow).items():
      if k != "batch_stats/count":  # not float: airbench keeps no copy
        np.testing.assert_allclose(v, ref.ema[k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"slow {k} at step {t}")
    synced.append(all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(fast["params"]), jax.tree.leaves(slow["params"]))))
  assert synced == [t % 5 == 0 or t == total for t in range(1, total + 1)]
  # The integer leaf is the fast one's, untouched.
  np.testing.assert_array_equal(fast["batch_stats"]["count"],
                                np.arange(2) + total)


def _lookahead_digits(**kw):
  """``_small_digits``: 5 steps, lookahead every 2, no EMA."""
  return _small_digits(**{"num_steps": 5, "ema_decay": 0.0,
                          "lookahead_period": 2, **kw})


def test_lookahead_train_step_ends_on_the_slow_weights(tmp_path):
  """A 5-step digits run on 8 devices (lookahead every 2 steps, airbench's
  SGD options): synced at steps 2, 4, 5 only, the last sync (decay 1) keeps
  the slow weights, one compilation (the step is guarded), and the run
  trains. ``backbone/output`` is frozen after 0.15 epochs of 19 steps:
  updated at steps 1 and 2 only (the loop passes ``steps_per_epoch``)."""
  c = _lookahead_digits()
  c.optimizer.update(dict(
      name="sgd", learning_rate=0.1, momentum=0.85, nesterov=True,
      weight_decay=1e-3, weight_decay_all=True, norm_bias_grad_scale=64.0,
      schedule="warmup_linear", warmup_steps=1, warmup_init_factor=0.2,
      freeze_after_epochs={"backbone/output": 0.15}))
  c.checkpoint.every_steps = 1
  c.checkpoint.keep = 10
  c.checkpoint.async_save = False
  res = training.train_and_evaluate(c, str(tmp_path))
  assert res["status"] == "completed" and res["step"] == 5
  assert np.isfinite(res["final_loss"])
  mngr = ocp.CheckpointManager(str(tmp_path / "checkpoints"),
                               item_names=("state", "meta"))
  states = {s: mngr.restore(s, args=ocp.args.Composite(
      state=ocp.args.StandardRestore()))["state"] for s in range(1, 6)}
  mngr.close()

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                    jax.tree.leaves(b)))

  for s, st in states.items():
    assert st["ema"]["batch_stats"], "BatchNorm statistics are in the copy"
    synced = same(st["params"], st["ema"]["params"]) and same(
        st["batch_stats"], st["ema"]["batch_stats"])
    assert synced == (s in (2, 4, 5)), s
  # The slow weights move at the sync steps only.
  assert not same(states[1]["ema"]["params"], states[2]["ema"]["params"])
  assert same(states[2]["ema"], states[3]["ema"])
  assert not same(states[3]["ema"]["params"], states[4]["ema"]["params"])
  # The final update (decay 1.0) keeps the slow weights and resets the fast.
  assert same(states[5]["ema"], states[4]["ema"])
  assert not same(states[5]["ema"]["params"], states[1]["ema"]["params"])
  frozen = [st["params"]["backbone"]["output"] for s, st in
            sorted(states.items())]
  assert not same(frozen[0], frozen[1])
  assert all(same(frozen[1], f) for f in frozen[2:])
  assert not same(states[2]["params"]["backbone"]["hidden_0"],
                  states[3]["params"]["backbone"]["hidden_0"])


def test_lookahead_config_errors():
  with pytest.raises(ValueError, match="ema_decay > 0 and lookahead_period"):
    training.make_train_step(None, None, None,
                             _lookahead_digits(ema_decay=0.9), None,
                             total_steps=5)
  with pytest.raises(ValueError, match="needs the run's total_steps"):
    training.make_train_step(None, None, None, _lookahead_digits(), None)
  with pytest.raises(ValueError, match="lookahead_period must be an int >= 0"):
    step_lib.lookahead_settings(_lookahead_digits(lookahead_period=-1))
  with pytest.raises(ValueError, match=r"lookahead_decay must be in \[0, 1\]"):
    step_lib.lookahead_settings(_lookahead_digits(lookahead_decay=1.5))
  assert step_lib.lookahead_settings(_lookahead_digits()) == (
      2, 0.95 ** 5, 3.0)
  # Off by default; then ema_decay is free.
  assert step_lib.lookahead_settings(ml_collections.ConfigDict(
      dict(ema_decay=0.9)))[0] == 0
