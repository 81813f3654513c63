"""experiments.accelerator_check at tiny sizes: helpers, tiled part, table."""

import json
import pathlib

import pytest

from experiments import accelerator_check as ac

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_flops_from_cost_analysis_shapes():
  assert ac.flops_from_cost_analysis(None) is None
  assert ac.flops_from_cost_analysis({"flops": 12.0}) == 12.0
  assert ac.flops_from_cost_analysis([{"flops": 2.0}, {"flops": 3.0}]) == 5.0
  assert ac.flops_from_cost_analysis([{}]) is None
  assert ac.flops_from_cost_analysis({"flops": -1.0}) is None
  assert ac.flops_from_cost_analysis([]) is None


def test_tiled_part_tiny():
  r = ac.tiled_value_and_grad(256, dim=8, block_size=64, budget_s=10.0)
  assert r["finite"] and r["time_s"] > 0 and r["timed_runs"] == 2
  assert r["block_size"] == 64 and r["batch"] == 256
  # CPU devices keep no allocator statistics: reported as None ("n/a").
  assert r["peak_bytes_in_use"] is None or r["peak_bytes_in_use"] > 0
  json.dumps(r)  # everything is JSON-serialisable


def test_step_flops_falls_back_to_analytic_when_xla_misses_convolutions():
  assert ac.step_flops(0.9e12, 1.0e12) == (0.9e12, "xla")
  # the H200 record: XLA counted 0.028 of 3.42 TFLOP (no cuDNN convolutions)
  assert ac.step_flops(0.028e12, 3.42e12) == (3.42e12, "analytic")
  assert ac.step_flops(None, 3.42e12) == (3.42e12, "analytic")
  step = {"batch_size": 512, "views": 2, "dtype": "bfloat16", "steps": 20,
          "step_time_s": 0.0115, "images_per_s": 44_339.0,
          "views_per_s": 88_678.0, "compile_s": 28.0,
          "flops_per_step": 0.028e12, "analytic_flops_per_step": 3.42e12,
          "peak_tflops": 989.0, "mfu": 0.002, "peak_bytes_in_use": None}
  table = ac.format_table({"meta": {}, "parts": {
      "train_step": {"runs": [step]}}})
  # 3.42 TFLOP / 11.5 ms / 989 TFLOP/s = 30.1%
  assert "MFU 30.1% (analytic FLOPs)" in table


def test_min_time_single_call_when_slow():
  calls = []
  t, runs = ac.min_time(lambda: calls.append(1), repeats=2, budget_s=-1.0)
  assert runs == 1 and len(calls) == 1 and t >= 0


def test_table_formats_results_and_failures():
  tiled = ac.tiled_value_and_grad(128, dim=4, block_size=64)
  step = {"batch_size": 512, "views": 2, "dtype": "bfloat16", "steps": 20,
          "step_time_s": 0.05, "images_per_s": 10240.0,
          "views_per_s": 20480.0, "compile_s": 30.0, "flops_per_step": None,
          "peak_tflops": 989.0, "mfu": None, "peak_bytes_in_use": None}
  results = {
      "meta": {"date": "today", "peak_tflops": 989.0, "jax_version": "0.x",
               "device_kinds": {"tiled": "cpu"}},
      "parts": {
          "train_step": {"runs": [step, {"batch_size": 1024,
                                         "error": "RuntimeError: OOM"}]},
          "tiled": {"runs": [tiled, {"batch": 1 << 20, "error": "boom"}],
                    "error": "killed after its 100 s time limit"},
          "cifar": {"config": "experiments/configs/cifar10_gpu.py",
                    "error": "DatasetUnavailableError: no data"},
      }}
  table = ac.format_table(results)
  lines = table.strip().splitlines()
  assert lines[0].startswith("Accelerator check") and "cpu" in lines[0]
  rows = [l for l in lines if l.startswith("| ")]
  assert rows[0] == "| part | setting | result | details |"
  assert len(rows) == 1 + 2 + 3 + 1
  assert all(r.count(" | ") == 3 for r in rows)  # 4 cells, no stray "|"
  assert "MFU n/a" in table and "10,240 img/s" in table
  assert "FAILED: RuntimeError: OOM" in table
  assert "N=1,048,576" in table and "FAILED: boom" in table
  assert "FAILED: DatasetUnavailableError" in table
  cifar = {"result": {"config_summary": "fast_cnn", "classifier_top1": 0.9412,
                      "knn_top1": 0.93, "linear_probe_top1": None,
                      "epochs": 20.0, "loop_s": 61.0, "images_per_sec": 2e4,
                      "call_wall_s": 100.0, "stopped_by_budget": True,
                      "train_budget_s": 60.0, "step": 900,
                      "total_steps": 1740}}
  table = ac.format_table({"meta": {}, "parts": {"cifar": cifar}})
  assert "classifier 94.1%, kNN" in table and "linear probe n/a" in table
  cifar["result"]["classifier_top1_tta_flip"] = 0.9456
  table = ac.format_table({"meta": {}, "parts": {"cifar": cifar}})
  assert "classifier 94.1% (94.6% with flip TTA), kNN 93.0%" in table
  cifar["result"]["classifier_top1_tta_flip_translate"] = 0.9471
  table = ac.format_table({"meta": {}, "parts": {"cifar": cifar}})
  assert ("classifier 94.1% (94.6% with flip TTA, 94.7% with flip +"
          " translate), kNN 93.0%") in table
  assert "stopped by the 60 s budget at step 900/1740" in table
  cifar["result"].update(classifier_macro_recall=0.9412,
                         classifier_macro_f1=0.9409)
  table = ac.format_table({"meta": {}, "parts": {"cifar": cifar}})
  assert ("flip + translate), macro recall / F1 94.1% / 94.1%, kNN 93.0%"
          in table)
  cifar["calibration"] = {"steps": 150, "images_per_s": 31234.5,
                          "compile_s": 20.0, "config_epochs": 20,
                          "fitted_epochs": 42}
  table = ac.format_table({"meta": {}, "parts": {"cifar": cifar}})
  assert ("42 epochs fitted to the budget (config: 20) from a 150-step"
          " calibration run at 31,234 img/s") in table
  cifar["calibration"] = {"error": "RuntimeError: no"}
  table = ac.format_table({"meta": {}, "parts": {"cifar": cifar}})
  assert "calibration FAILED (RuntimeError: no), config's epochs" in table


def test_fit_epochs():
  # (300 s - 30 s of compilation) x 0.8 x 10,000 img/s = 48 epochs of 45,000.
  kw = dict(compile_s=30.0, num_train=45_000)
  assert ac.fit_epochs(10_000.0, 300.0, max_epochs=100, **kw) == 48
  assert ac.fit_epochs(10_000.0, 300.0, max_epochs=20, **kw) == 20
  assert ac.fit_epochs(10.0, 300.0, max_epochs=20, **kw) == 1
  assert ac.fit_epochs(10_000.0, 10.0, max_epochs=20, **kw) == 1


def test_cifar_config_variants():
  c = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"))
  assert c.input == "device" and c.model.dtype == "bfloat16"
  assert c.batch_size == 512 and c.model.backbone == "fast_cnn"
  # airbench's 94% is measured with flips and translations
  assert c.eval.tta_flip and c.eval.tta_translate
  s = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                     "sgd,runlocal")
  assert s.optimizer.name == "sgd" and s.optimizer.nesterov
  assert s.num_steps == 5 and s.batch_size == 32
  r = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                     "sgd,resnet18")
  assert r.model.backbone == "resnet18" and not r.model.backbone_kwargs
  assert r.optimizer.name == "sgd" and r.loss.ce_weight == c.loss.ce_weight
  assert not c.loss.get("label_smoothing", 0.0)
  assert ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                        "smooth").loss.label_smoothing == 0.2
  # the accelerator check's default: the best recipe measured on the H200
  assert ac._CONFIG_ARG.default == "sgd,resnet18,smooth,cutout"
  best = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                        ac._CONFIG_ARG.default)
  assert best.model.backbone == "resnet18" and best.loss.label_smoothing == 0.2
  assert best.data.augment == "crop_flip_cutout"
  assert c.data.augment == "crop_flip"
  assert not best.optimizer.sam_rho
  assert ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                        "sgd,sam").optimizer.sam_rho == 0.05
  fused = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                         "sgd,resnet18,norm_custom,runlocal")
  assert fused.model.backbone_kwargs["norm_backward"] == "custom"
  assert fused.model.backbone.startswith("resnet")
  assert ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                        "resnet18,norm_remat").model.backbone_kwargs[
                            "norm_backward"] == "remat"
  with pytest.raises(ValueError, match="norm_remat needs a ResNet"):
    ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"), "norm_remat")
  torch = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                         "sgd,resnet18,smooth,cutout,torch_init,runlocal")
  assert torch.model.backbone_kwargs["torch_init"]
  assert torch.model.classifier_kwargs["torch_init"]
  assert not best.model.backbone_kwargs.get("torch_init", False)
  with pytest.raises(ValueError, match="torch_init needs a ResNet"):
    ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"), "torch_init")
  with pytest.raises(ValueError):
    ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"), "bogus")


def test_cifar_config_airbench():
  path = str(REPO / "experiments/configs/cifar10_gpu.py")
  a = ac.load_config(path, "airbench")
  momentum = 0.85
  kilo = 1024 * (1 + 1 / (1 - momentum))  # airbench96's kilostep_scale
  # torch's lr 9 / kilo on the summed loss of 1024 is lr * 1024 on the mean;
  # its coupled decay (0.012 * 1024 / kilo) / lr is then 0.012 / 9.
  assert a.batch_size == 1024 and a.optimizer.momentum == momentum
  assert a.optimizer.learning_rate == pytest.approx(9.0 / kilo * 1024)
  assert a.optimizer.weight_decay == pytest.approx(
      (0.012 * 1024 / kilo) / (9.0 / kilo) / 1024)
  assert a.optimizer.norm_bias_grad_scale == 64 and a.optimizer.weight_decay_all
  assert a.optimizer.schedule == "warmup_linear" and a.lookahead_period == 5
  assert a.model.backbone_kwargs.convs_per_group == 3
  assert a.model.classifier_kwargs.logit_scale == pytest.approx(1 / 9)
  assert a.data.padding_mode == "reflect" and a.data.cutout_size == 12
  assert a.loss.name == "supervised_contrastive" and a.loss.label_smoothing == 0.2
  assert a.model.whiten_init_images == 5000
  assert a.loss.weight == 0.05  # a 1/9 of the ResNet recipe's 0.5 (logit scale)
  # The smoke size keeps airbench's layout, narrower.
  small = ac.load_config(path, "airbench,runlocal")
  assert small.model.backbone_kwargs.convs_per_group == 3
  assert not small.model.backbone_kwargs.norm_scale
  assert small.model.backbone_kwargs.widths == (8, 16, 16)
  with pytest.raises(ValueError, match="airbench sets its own"):
    ac.load_config(path, "airbench,resnet18")


def test_auto_block_size_on_cpu():
  assert ac.auto_block_size(1 << 20) == 4096  # CPU: no memory limit known


def test_training_budget_stops_and_evaluates(tmp_path):
  """A zero budget stops the loop after a step or two; the checkpoint is
  evaluated as the finished run would be (digits: no data files needed)."""
  c = ac.load_config(str(REPO / "experiments/configs/digits.py"))
  c.num_steps = 200
  c.batch_size = 64
  c.model.backbone_kwargs = dict(features=(8, 16), embedding_dim=16)
  c.model.projection_hidden_dim = 16
  c.model.projection_dim = 8
  c.checkpoint.every_steps = 1000
  c.eval.probe_steps = 2
  c.progress_bar = False
  c.distributed.mode = "off"
  c.num_devices = 1
  r = ac.cifar_run(c, str(tmp_path / "run"), train_seconds=0.0,
                   out_dir=str(tmp_path))
  assert r["stopped_by_budget"] and r["step"] < 200
  assert r["status"] == "time_budget"
  assert 0.0 <= r["knn_top1"] <= 1.0 and "linear_probe_top1" in r
  assert r["loop_s"] is not None and r["loop_s"] <= r["call_wall_s"]
  assert (tmp_path / "cifar_results.json").exists()


def test_measure_step_rate_runs_the_config_briefly():
  c = ac.load_config(str(REPO / "experiments/configs/digits.py"))
  c.batch_size = 64
  c.model.backbone_kwargs = dict(features=(8, 16), embedding_dim=16)
  c.model.projection_hidden_dim = 16
  c.model.projection_dim = 8
  c.progress_bar = False
  c.distributed.mode = "off"
  c.num_devices = 1
  r = ac.measure_step_rate(c, steps=9)
  # compiling the step takes well over a second on the CPU (it was
  # reported as 0 before the loop's own times were used)
  assert r["steps"] == 9 and r["images_per_s"] > 0 and r["compile_s"] > 0.5
  assert r["wall_s"] > 0
  assert c.num_steps == 1000  # the caller's config is untouched
  with pytest.raises(RuntimeError, match="rate windows"):
    ac.measure_step_rate(c, steps=1)


def test_cifar_part_fits_epochs_after_calibrating(tmp_path):
  """run_part("cifar") with --cifar_epochs=auto: a calibration run, then
  the run itself for the fitted epochs (a tiny digits config stands in)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  config_file = tmp_path / "tiny_config.py"
  config_file.write_text(
      "from experiments.configs import digits\n"
      "def get_config(arg=None):\n"
      "  c = digits.get_config()\n"
      "  c.num_steps = 0\n"
      "  c.num_epochs = 7\n"
      "  c.batch_size = 64\n"
      "  c.model.backbone_kwargs = dict(features=(8, 16), embedding_dim=16)\n"
      "  c.model.projection_hidden_dim = 16\n"
      "  c.model.projection_dim = 8\n"
      "  c.eval.probe_steps = 2\n"
      "  c.num_devices = 1\n"
      "  return c\n")
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  with flagsaver.flagsaver(config=str(config_file), cifar_epochs="auto",
                           calibration_steps=6, max_cifar_epochs=2,
                           workdir=str(tmp_path / "run")):
    res = ac.run_part("cifar", out_dir=str(tmp_path), cifar_train_s=600.0)
  cal = res["calibration"]
  assert cal["steps"] == 6 and cal["config_epochs"] == 7
  assert 1 <= cal["fitted_epochs"] <= 2
  assert "error" not in res, res.get("error")
  r = res["result"]
  assert r["status"] == "completed" and not r["stopped_by_budget"]
  assert r["total_steps"] == cal["fitted_epochs"] * (1257 // 64)
  assert f"{cal['fitted_epochs']} epochs fitted" in ac.format_table(
      {"meta": {}, "parts": {"cifar": res}})


def test_train_step_variant_and_its_trace_summary(tmp_path):
  pytest.importorskip("tensorflow")  # profile_summary reads xplane with it
  from experiments import profile_summary  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "profile_b4.xplane.pb")
  r = ac.train_step_throughput(4, steps=1, warmup=1, dtype="float32",
                               optimizer="sgd", online_probe=False,
                               profile_path=path, profile_steps=1,
                               norm_backward="custom")
  assert r["optimizer"] == "sgd" and not r["online_probe"]
  assert r["norm_backward"] == "custom"
  assert "SGD, no probe, BN+ReLU backward: custom" in r["model"] and r["loss_finite"]
  row = ac.format_table({"meta": {}, "parts": {"train_step": {"runs": [r]}}})
  assert "sgd, no probe, BN+ReLU backward: custom" in row
  with pytest.raises(ValueError, match="train_step_norm takes some of"):
    ac._norm_variants(["plain"])
  assert r["profile"] == "profile_b4.xplane.pb"
  plane, events = profile_summary.load_events(path)
  assert plane and events  # a CPU trace: the busiest host plane
  text = profile_summary.summarize(events, steps=1, top=3)
  assert text.startswith("per step (1 traced)")


def test_profile_summary_busy_time_and_kinds():
  from experiments import profile_summary  # pylint: disable=g-import-not-at-top
  # Two streams: [0, 10) and [5, 20) overlap, [30, 35) is apart.
  events = [("a", 0, 10), ("b", 5, 15), ("c", 30, 5)]
  assert profile_summary.busy_ps(events) == 25
  assert profile_summary.busy_ps([("a", 0, 10), ("b", 2, 3)]) == 10
  kind = profile_summary.kind_of
  assert kind("sm90_xmma_dgrad_implicit_gemm_bf16") == "convolution"
  assert kind("cutlass_80_tensorop_gemm") == "matmul"
  assert kind("input_reduce_select_fusion_5") == "reduction"
  assert kind("loop_add_fusion_4") == "elementwise fusion"
  assert kind("Memcpy DtoD") == "copy / transpose"
  text = profile_summary.summarize(
      [("loop_add_fusion", 0, 2_000_000_000), ("conv_fprop", 3_000_000_000,
                                               1_000_000_000)],
      steps=1, top=5)
  # span 4 ms, busy 3 ms; convolution a third of the kernel time
  assert "span 4.00 ms, busy 3.00 ms (75.0%)" in text
  assert "| convolution | 1.00 | 33.3% |" in text


def test_config_summary_names_smoothing_and_sam():
  c = ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py"),
                     "sgd,resnet18,smooth,cutout,sam")
  text = ac.config_summary(c)
  assert "1xCE (smoothing 0.2)" in text and "sgd lr 0.4 + SAM rho 0.05" in text
  assert "crop_flip_cutout" in text
  plain = ac.config_summary(
      ac.load_config(str(REPO / "experiments/configs/cifar10_gpu.py")))
  assert "SAM" not in plain and "smoothing" not in plain


def test_a_failed_train_step_variant_names_batch_and_variant():
  res = {}

  def measure(size):
    raise RuntimeError(f"no {size[1]}")

  ac._sweep(res, "train_step", [(1024, "custom")], ("batch_size", "norm_backward"),
            measure, lambda r: None)
  assert res["runs"] == [{"batch_size": 1024, "norm_backward": "custom",
                          "error": "RuntimeError: no custom"}]
  table = ac.format_table({"meta": {}, "parts": {"train_step": res}})
  assert "| batch 1024, BN+ReLU backward: custom | FAILED: RuntimeError: no custom |" in table
