"""CIFAR-10 on one GPU in minutes: FastCNN, SupCon + cross-entropy, bf16.

    python -m experiments.train --config=experiments/configs/cifar10_gpu.py \
        --workdir=/tmp/cifar10_gpu --config.data_dir=./.data
    python -m experiments.train --config=experiments/configs/cifar10_gpu.py:runlocal \
        --workdir=/tmp/cifar10_gpu_runlocal --config.data_dir=../shared/data
    # the accelerator check (issue 7), part c, runs :sgd,resnet18,smooth,cutout
    python -m experiments.accelerator_check --parts=cifar --data_dir=./.data

The aim is airbench's (Jordan, 2024): 94% top-1 within a few minutes of one
GPU. The network is airbench94's shape, ``FastCNN(widths=(64, 256, 256),
stem_width=0, whiten_size=2)`` (airbench's fixed 2x2 patch-whitening layer,
24 channels, computed from a random 1,024 training images; three
conv-pool-BN-GELU groups; global max-pool: ~0.3 GFLOP per image forward),
computed in bfloat16 with float32 parameters. The whitening layer gave +1.0
point on the 2-core CPU recipe (triplet + CE, 87.8% against 86.8%,
experiments/RESULTS.md).
The data stays on the device (``input="device"``: no TensorFlow, batches drawn
and augmented by jitted JAX, random 4-pixel-padded crop + horizontal flip),
one view per image, batch 512, 20 epochs (1,740 steps on the 45,000 training
images: the last 500 images of each class of the train folder, 5,000 in
all, are the validation split that the results report). The accelerator check replaces
the 20 epochs by as many as its 5-minute training budget fits, up to 400,
measured by a short calibration run first (``--cifar_epochs=auto``).

Loss: cross-entropy of a classifier head on the 256-d features, plus 0.5 x
the supervised contrastive loss (T = 0.1) on a BN projection 512 -> 128 of
the same features. AdamW (lr 3e-3, decoupled weight decay 5e-2 on weights
only), one warmup epoch then cosine to 0: the AdamW recipe of
``common.cpu_cifar``, which trains stably here on CPU; ``:sgd`` swaps in
SGD-Nesterov (lr 0.4, momentum 0.9, weight decay 5e-4), the fast-CIFAR
ResNet-9 recipe, for comparison. airbench's label smoothing is
``:smooth``; its lookahead is left out of these recipes (``:airbench``, below,
has it); its test-time augmentation is
reported beside the plain ``classifier_top1`` in ``results.json``, as
airbench's 94% is measured with it: flips as ``classifier_top1_tta_flip``
(``eval.tta_flip``), flips and one-pixel translations (airbench94's
``tta_level=2``) as
``classifier_top1_tta_flip_translate`` (``eval.tta_translate``). The JPEG
re-encoding of the training images may cost about a point.

Hardware: one GPU (written for an H200). Measured on one H200, 2026-11-29
(experiments/RESULTS.md, "Accelerator"; top-1 on the 5,000 validation
images: plain / flip TTA / flip + translate TTA):

* this config, 50 epochs (the accelerator check's fit): 88.58 / 89.92 /
  89.98, in a 27 s training loop at 93,558 images/s;
* ``--config.loss.label_smoothing=0.2`` (now ``:smooth``), 50 epochs:
  89.68 / 90.18 / 90.22; ``:sgd,smooth``: 89.38 / 90.26 / 90.70, and
  89.56 / 90.48 / 90.92 at 100 epochs;
* ``:sgd,resnet18,smooth``, 100 epochs: 91.08 / 92.02 / 92.04 in 156 s
  wall (a 63 s training loop at 70,370 images/s); 200 epochs (2026-11-30):
  91.42 / 92.26 / 92.34.

Without Cutout every run ends at 99.7-99.99% training accuracy. Cutout
(``:cutout``, a 16 x 16 square) cuts that to 98.8% and is the best recipe,
measured on one H200 on 2026-11-30:

* ``:sgd,resnet18,smooth,cutout``, 200 epochs: **92.66 / 93.46 / 93.64**
  (macro F1 92.66 plain), kNN 92.52, probe 92.44. Its training takes about
  128 s alone at the measured images/s; it ran sharing the GPU with two
  others. The 94% target is missed by 0.36. The accelerator check runs this
  recipe, for as many epochs (up to 400) as its budget fits. Without the
  SupCon term (``--config.loss.name=``, CE only): 92.60 / 93.04 / 93.42.

On the underfitting 20-epoch CPU recipe Cutout cost 1.8 points (RESULTS
footnote 17). On the 2-core CPU, 4 epochs only
("The GPU config on the CPU"): 81.28% (81.88% with flip TTA), against 80.28%
for ``:sgd`` with the same warmup; both train stably in bfloat16.
``smooth``: label smoothing 0.2 on the classifier's cross-entropy (+1.1
plain at 50 epochs on the H200).
``resnet18``: the ResNet-18 (CIFAR stem, 512-d features) of the SimCLR and
SupCon configs in place of the FastCNN, same head and loss.
``cutout``: ``data.augment = "crop_flip_cutout"``: the crop and flip, then a
16 x 16 square (half the image side) set to 0.5 (DeVries & Taylor, 2017).
``sam``: sharpness-aware minimisation, radius 0.05 (Foret et al., 2021, on
CIFAR-10), around the SGD: twice the compute per step, so the check's
calibration fits half the epochs. Not yet run on a GPU.
``norm_remat`` / ``norm_custom`` (with ``resnet18``): the ResNet's
BatchNorm + ReLU backward pass recomputed (``nn.remat``) or written out
(``jax.custom_vjp``) instead of autodiff's, which saves float32
intermediates (``contrastive_jax.models.norm``): the same model, fewer
bytes moved per step. Not yet run on a GPU; ``accelerator_check
--parts=train_step --train_step_norm=autodiff,remat,custom`` times them.
``airbench``: airbench96's whole recipe (``airbench96`` below: its network
``FastCNN(128, 512, 512)`` with three convolutions per group, per-group SGD,
triangular schedule, lookahead, 4-pixel reflect translations, Cutout 12,
logits x 1/9), 35 epochs at batch 1024, the SupCon term kept at weight
0.05 (``--config.loss.name=`` for airbench's cross-entropy alone). airbench96
reports 96.0% on the CIFAR-10 test set in 46 s of an A100 (31 epochs of
50,000 PNG images); this data's JPEG re-encoding and 45,000 training images
cost perhaps a point. Not yet run on a GPU; on the 2-core CPU at widths
(32, 128, 128), 4 epochs: 77.7% (78.5% with flip TTA), the same run as
cross-entropy alone 77.0%; 24 epochs (78 min): 88.46%, 89.54% with flip +
translation TTA, the best SupCon CPU result (experiments/RESULTS.md;
triplet + CE on the same recipe, ``triplet_ce_cifar10.py:cpu_airbench``:
89.06%, 89.62% with TTA). Alone; it
sets its own network, optimizer and augmentation.
``torch_init`` (with ``resnet18``): PyTorch's default initialisation of the
convolutions and the classifier (uniform, bound ``1 / sqrt(fan_in)``) in
place of He normal with fan-out, as kuangliu's pytorch-cifar trains its
ResNet-18 to 95.3% (a candidate of the ResNet-18 review, RESULTS.md). Not
yet run on a GPU.
``runlocal``: a narrow FastCNN, 5 steps of batch 32 (a smoke test, seconds on
a CPU). Arguments combine with commas: ``:sgd,resnet18,smooth,cutout``.
"""

from experiments.configs import common

EPOCHS = 20
ARGS = ("sgd", "resnet18", "smooth", "cutout", "sam", "norm_remat", "norm_custom",
        "airbench", "torch_init", "runlocal")
AIRBENCH_EPOCHS = 35


def airbench96(c):
  """airbench96's recipe (Jordan, 2024, its 06/13/24 version) on this trainer.

  PyTorch's ``SGD(lr=9 / kilo, momentum=0.85, nesterov, weight_decay=wd / lr)``
  on a *summed* cross-entropy over batches of 1024, with ``kilo = 1024 (1 + 1 /
  (1 - 0.85))``, ``wd = 0.012 * 1024 / kilo`` and 64x the learning rate on
  BatchNorm biases, is, for the mean loss used here: SGD-Nesterov at
  ``lr = 9 * 1024 / kilo = 1.1739``, coupled weight decay ``0.012 / 9`` on every
  parameter, and BatchNorm-bias gradients scaled by 64 before the decay is
  added (which reproduces the per-group rates exactly). The rest: the schedule
  (10% warmup from 0.2x, then linear to 0), lookahead every 5 steps with decay
  ``0.95^5 (t / T)^3`` and the final weights taken from it, the whitening bias
  frozen after 3 epochs, label smoothing 0.2, logits scaled by 1/9, the
  network (``FastCNN``'s airbench96 options), 4-pixel reflect-padded
  translations, flips and a 12-pixel Cutout square inside the image, and
  test-time flips and translations. Left out: alternating flips (airbench96's
  notes: 96.05% with them, 96.01% without).
  """
  momentum = 0.85
  c.batch_size = 1024
  c.num_epochs = AIRBENCH_EPOCHS
  c.model.backbone = "fast_cnn"
  c.model.backbone_kwargs = dict(
      widths=(128, 512, 512), stem_width=0, whiten_size=2, whiten_padding="VALID",
      convs_per_group=3, norm_scale=False, norm_epsilon=1e-12, torch_init=True,
      gelu_approximate=False)
  c.model.classifier_kwargs = dict(use_bias=False, logit_scale=1 / 9, torch_init=True)
  c.model.whiten_init_images = 5000  # airbench's whitening statistics
  c.loss.label_smoothing = 0.2
  # The logits' 1/9 scales the cross-entropy's gradient into the network by
  # 1/9 too, which airbench's large learning rate makes up for; the SupCon
  # term at this recipe's 0.5 would then outweigh it 9 times over. 0.05
  # keeps the ResNet recipe's balance. On the CPU (RESULTS.md, 4 epochs at
  # widths 32-128-128): 77.7% with 0.05, 77.0% CE alone, 75.7% with 0.5.
  c.loss.weight = 0.05
  o = c.optimizer
  o.name = "sgd"
  o.momentum = momentum
  o.nesterov = True
  o.learning_rate = 9.0 / (1.0 + 1.0 / (1.0 - momentum))
  o.weight_decay = 0.012 / 9.0
  o.weight_decay_all = True
  o.norm_bias_grad_scale = 64.0
  o.freeze_after_epochs = {"whiten_bias": 3.0}
  o.schedule = "warmup_linear"
  o.warmup_init_factor = 0.2
  o.warmup_fraction = 0.1  # of the run, so --config.num_epochs keeps the shape
  o.end_lr_factor = 0.0
  c.lookahead_period = 5
  c.data.augment = "crop_flip_cutout"
  c.data.padding = 4
  c.data.padding_mode = "reflect"
  c.data.cutout_size = 12
  c.data.cutout_inside = True
  return c


CPU_AIRBENCH_EPOCHS = 24


def cpu_airbench():
  """``airbench`` at a quarter of its width, for the 2-core CPU's 2 hours.

  ``FastCNN`` widths (32, 128, 128) instead of (128, 512, 512) (about a
  fourteenth of the FLOPs, 0.93 M parameters with the heads against 13.0 M)
  and 24 epochs (1,032 steps of
  1,024), about 80 minutes at ~225 images/s; the rest is airbench96's recipe
  unchanged, SupCon 0.05 + CE. A checkpoint every 250 steps, as the CPU
  recipes, since a CPU run is long enough to be interrupted. The family
  configs take it as ``supcon_cifar10.py:cpu_airbench`` and
  ``triplet_ce_cifar10.py:cpu_airbench`` (the triplet loss in SupCon's place).
  """
  c = get_config("airbench")
  c.num_epochs = CPU_AIRBENCH_EPOCHS
  c.model.backbone_kwargs = dict(c.model.backbone_kwargs, widths=(32, 128, 128))
  c.checkpoint.every_steps = 250
  c.log_every = 50
  return c


def get_config(arg: str | None = None):
  args = [a for a in (arg or "").split(",") if a]
  unknown = sorted(set(args) - set(ARGS))
  if unknown:
    raise ValueError(f"cifar10_gpu arguments must be among {ARGS}, got {unknown}.")
  c = common.base_config()
  c.dataset = "cifar10"
  # The AdamW recipe, on-device crop + flip and classifier head of the CPU
  # runs; what differs here is the network, bf16, the batch and SupCon.
  c = common.cpu_cifar(c, epochs=EPOCHS)
  c.batch_size = 512
  c.model.backbone_kwargs = dict(widths=(64, 256, 256), stem_width=0,
                                 whiten_size=2)
  c.model.projection_dim = 128
  c.model.projection_hidden_dim = 512
  c.model.dtype = "bfloat16"
  c.loss.name = "supervised_contrastive"
  c.loss.kwargs = dict(temperature=0.1)
  c.loss.labels = "class"
  c.loss.weight = 0.5
  c.loss.ce_weight = 1.0
  c.optimizer.end_lr_factor = 0.0
  if "sgd" in args:
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.4
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.optimizer.warmup_epochs = 2.0
  if "resnet18" in args:
    c.model.backbone = "resnet18"
    c.model.backbone_kwargs = {}
  if "smooth" in args:
    c.loss.label_smoothing = 0.2
  if "cutout" in args:
    c.data.augment = "crop_flip_cutout"
  if "sam" in args:
    c.optimizer.sam_rho = 0.05
  if "airbench" in args:
    if set(args) & {"sgd", "resnet18", "smooth", "cutout"}:
      raise ValueError("cifar10_gpu: airbench sets its own network, optimizer and"
                       " augmentation; do not combine it with sgd, resnet18, smooth"
                       " or cutout.")
    c = airbench96(c)
  # One checkpoint, at the end: saving costs time the budget is about.
  c.checkpoint.every_steps = 100_000
  c.checkpoint.keep = 1
  c.log_every = 100
  c.eval_every = 0
  c.eval.batch_size = 2048
  c.eval.tta_flip = True
  c.eval.tta_translate = True
  c.progress_bar = False
  if "runlocal" in args:
    c = common.runlocal(c)
  resnet_only = [a for a in args if a in ("torch_init", "norm_remat", "norm_custom")]
  if resnet_only and not c.model.backbone.startswith("resnet"):
    raise ValueError(f"cifar10_gpu: {resnet_only[0]} needs a ResNet (add resnet18).")
  if "torch_init" in args:
    c.model.backbone_kwargs = dict(c.model.backbone_kwargs, torch_init=True)
    c.model.classifier_kwargs = dict(c.model.classifier_kwargs, torch_init=True)
  for backward in ("remat", "custom"):
    if f"norm_{backward}" in args:
      c.model.backbone_kwargs = dict(c.model.backbone_kwargs, norm_backward=backward)
  return c
