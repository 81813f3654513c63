"""Defaults shared by every config; each config overrides what it needs."""

import ml_collections


def check_arg(config_name: str, arg: str | None, allowed) -> None:
  """A misspelt config argument would silently launch the full-size run."""
  if arg and arg not in allowed:
    raise ValueError(f"{config_name} takes no argument or one of"
                     f" {tuple(allowed)}, got {arg!r}.")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.dataset = "digits"
  c.data_dir = ""          # image folders / TFDS data; "" = TFDS default
  c.input = "device"       # "device" (no TensorFlow) or "tf" (tf.data)
  c.data = ml_collections.ConfigDict(dict(
      augment="none",      # contrastive_jax.data.AUGMENTATIONS
      views=0,             # 0: [B, H, W, C]; V: [B, V, H, W, C]
      normalize=True,      # per-channel dataset mean/std
      shard_on_device=False,
      classes_per_batch=0,  # P x K class-balanced batches when both set
      examples_per_class=0,
      strength=0.5, padding=4, max_degrees=10.0,
      # The crop's border ("zero", or "reflect" as airbench), and Cutout's
      # square ("crop_flip_cutout"): side cutout_size (0: min(H, W) // 2),
      # centred anywhere and clipped (False) or wholly inside (True,
      # airbench). See contrastive_jax.data.augment_jax.
      padding_mode="zero", cutout_size=0, cutout_inside=False,
      # True: train on "tune_train" and evaluate on "tune", a model-selection
      # pair carved from "train" that never touches "validation"
      # (contrastive_jax.data.sources); for choosing a recipe or kNN k.
      tune=False))
  c.batch_size = 256
  c.num_steps = 0          # > 0 overrides num_epochs
  c.num_epochs = 10
  c.model = ml_collections.ConfigDict(dict(
      backbone="small_cnn",
      backbone_kwargs=ml_collections.ConfigDict(),
      projection_dim=0,    # 0: no projection head
      projection_hidden_dim=2048,
      projection_layers=2,
      classifier=False,    # classifier head trained with cross-entropy
      classifier_kwargs=ml_collections.ConfigDict(),  # ClassifierHead options (use_bias, logit_scale, ...)
      hash_bits=0,         # > 0: hash head of that many bits
      hash_scale=ml_collections.ConfigDict(dict(growth=0.005, power=0.5)),
      online_probe=True,   # linear probe on detached features
      # FastCNN(whiten_size>0): how many training images (a seeded random
      # subset) its whitening filters are computed from.
      whiten_init_images=1024,
      dtype="float32"))    # "bfloat16" for bf16 compute
  c.loss = ml_collections.ConfigDict(dict(
      name="supervised_contrastive",
      kwargs=ml_collections.ConfigDict(dict(temperature=0.1)),
      labels="class",      # "class" or "instance" (SimCLR: views of an image)
      weight=1.0,
      ce_weight=0.0,
      label_smoothing=0.0,  # of the classifier's cross-entropy targets
      reconstruction_weight=0.0,
      quantization_weight=0.0,
      memory_size=0))      # > 0: cross-batch memory of that many embeddings
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adam", learning_rate=1e-3, lr_batch_scaling=False,
      weight_decay=0.0, momentum=0.9, nesterov=False,
      schedule="warmup_cosine", warmup_steps=0, warmup_epochs=0.0, end_lr_factor=0.0,
      grad_clip_norm=0.0,
      # > 0: sharpness-aware minimisation (Foret et al., 2021) with this
      # radius: each step takes the gradient again at the weights moved
      # sam_rho along the normalised gradient (twice the compute per step).
      sam_rho=0.0,
      # airbench's SGD (see training/optim.py): decay every parameter, not
      # only the matrices and kernels; scale BatchNorm biases' gradients;
      # warmup from warmup_init_factor x the peak over warmup_fraction of
      # the run ("warmup_linear"). freeze_after_epochs, a dict of parameter
      # name -> epochs, is set in code (cifar10_gpu.airbench96).
      weight_decay_all=False, norm_bias_grad_scale=1.0,
      warmup_init_factor=0.0, warmup_fraction=0.0))
  # > 0: keep an exponential moving average of the weights (and BatchNorm
  # statistics) with this decay per step, and evaluate it; the final
  # results also report the online weights, as ``online_*``.
  c.ema_decay = 0.0
  # > 0: airbench's lookahead every this many steps, its slow weights kept
  # where the average would be (not with ema_decay > 0); see
  # training/step.py:lookahead_update.
  c.lookahead_period = 0
  c.lookahead_decay = 0.95 ** 5
  c.lookahead_power = 3.0
  # > 0: stop training once the loop has run this many seconds (its first,
  # compiling step included), save, and evaluate the weights as they are
  # (results.json status "time_budget"). For time-boxed runs and sweeps; a
  # relaunch in the same workdir resumes and trains on.
  c.max_train_seconds = 0.0
  c.checkpoint = ml_collections.ConfigDict(dict(
      every_steps=1000, keep=3, async_save=True))
  c.log_every = 50
  c.eval_every = 0
  c.eval = ml_collections.ConfigDict(dict(
      final=True, knn_k=20, knn_temperature=0.07, probe_steps=500,
      probe_learning_rate=1e-3, batch_size=512,
      # Also report the classifier head's top-1 with flip test-time
      # augmentation (classifier_top1_tta_flip; one more validation pass),
      # and with one-pixel translations as well (tta_translate:
      # classifier_top1_tta_flip_translate, airbench94's tta_level=2).
      tta_flip=False, tta_translate=False))
  c.num_devices = 0        # 0: all devices
  c.progress_bar = True
  c.distributed = ml_collections.ConfigDict(dict(
      mode="auto", coordinator_address="", num_processes=1, process_id=0,
      local_device_ids=""))
  return c


def runlocal(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A tiny smoke run of a CIFAR config: seconds on a laptop CPU."""
  c.batch_size = 32
  c.num_steps = 5
  c.checkpoint.every_steps = 5
  c.log_every = 1
  c.eval.probe_steps = 20
  c.eval.batch_size = 256
  c.data.shard_on_device = False
  # A small model of the same family, so the smoke run takes seconds.
  if c.model.backbone.startswith("resnet"):
    c.model.backbone = "resnet"
    c.model.backbone_kwargs = dict(stage_sizes=(1, 1), num_filters=8)
  elif c.model.backbone == "fast_cnn":
    # The same layout (whitening, airbench's options), narrower.
    c.model.backbone_kwargs = dict(c.model.backbone_kwargs, widths=(8, 16, 16),
                                   stem_width=0)
  elif c.model.backbone == "small_cnn":
    c.model.backbone_kwargs = dict(features=(8, 16), embedding_dim=32)
  elif c.model.backbone == "conv_autoencoder":
    c.model.backbone_kwargs = dict(features=(8, 16), embedding_dim=32)
  if c.model.projection_dim:
    c.model.projection_hidden_dim = 64
    c.model.projection_dim = 32
  return c


def cpu_cifar(c: ml_collections.ConfigDict, *, epochs: int) -> ml_collections.ConfigDict:
  """The 2-CPU-core CIFAR-10 recipe: a small airbench-style CNN, one view.

  ``FastCNN(widths=(32, 128, 128), stem_width=0)`` (0.49 M parameters)
  trains at ~240 images/s on 2 cores (experiments/RESULTS.md), random crop +
  flip, AdamW with warmup + cosine, no online probe (a classifier head
  reports).
  """
  c.input = "device"
  c.data.augment = "crop_flip"
  c.data.views = 0
  c.data.shard_on_device = False
  c.batch_size = 256
  c.num_epochs = epochs
  c.model.backbone = "fast_cnn"
  c.model.backbone_kwargs = dict(widths=(32, 128, 128), stem_width=0)
  c.model.classifier = True
  c.model.online_probe = False
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.lr_batch_scaling = False
  c.optimizer.weight_decay = 5e-2
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_epochs = 1.0
  c.optimizer.warmup_steps = 0
  c.checkpoint.every_steps = 500
  c.log_every = 50
  c.progress_bar = False
  return c


def cpu_wide(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``cpu_cifar`` widened: ``FastCNN(widths=(40, 160, 160))`` + smoothing.

  0.77 M parameters at ~1.4x the training time of ``cpu_cifar``, still
  inside the 2-hour CPU budget at 20 epochs, and label smoothing 0.2 on the
  classifier's cross-entropy (as airbench). Measured (one seed each,
  experiments/RESULTS.md): +0.5 for triplet + CE, none for SupCon + CE; the
  smoothing alone gave no gain, so the triplet gain is the width's.
  """
  c.model.backbone_kwargs = dict(widths=(40, 160, 160), stem_width=0)
  c.loss.label_smoothing = 0.2
  return c


def cpu_whiten(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``cpu_wide`` behind airbench's 2x2 patch-whitening layer (24 channels).

  ``FastCNN(whiten_size=2)``: filters from a random 1,024 training images,
  not trained (``models.patch_whitening_kernel``). Measured (one seed each,
  experiments/RESULTS.md, with the filters then taken from the first 1,024
  images of the class-sorted folder, all airplanes): +1.0 point for
  triplet + CE (87.8% against 86.8%) and +1.2 for SupCon + CE (87.3%
  against 86.1%), at 0.83x the training step's speed (its 24-channel output
  feeds the first 3x3 conv).
  """
  c = cpu_wide(c)
  c.model.backbone_kwargs = dict(c.model.backbone_kwargs, whiten_size=2)
  return c
