"""SimCLR on CIFAR-10: two SimCLR views, NT-Xent, projection head, LARS.

    python -m experiments.train --config=experiments/configs/simclr_cifar10.py \
        --workdir=/tmp/simclr_cifar10 [--config.data_dir=DIR] [--config.model.dtype=bfloat16]
    python -m experiments.train --config=experiments/configs/simclr_cifar10.py:runlocal \
        --workdir=/tmp/simclr_cifar10_runlocal --config.data_dir=../shared/data

ResNet-18 (CIFAR stem), 2-layer BatchNorm projection 2048 -> 128, NT-Xent at
temperature 0.2 with global (all-device) negatives and synchronised BN, LARS
with lr 0.4 x batch/256, weight decay 1e-5, 10 warmup epochs then cosine
(solo-learn's CIFAR recipe), batch 256, 1000 epochs.

Hardware: one accelerator (or a pod: the batch is split over every device).
Result: not yet measured (solo-learn reports ~90% linear / ~88% kNN top-1).
``runlocal``: a tiny ResNet, 5 steps of batch 32 (a smoke test, seconds).
"""

from experiments.configs import common


ARGS = ("runlocal",)


def get_config(arg: str | None = None):
  common.check_arg("simclr_cifar10", arg, ARGS)
  c = common.base_config()
  c.dataset = "cifar10"
  c.data.augment = "simclr"
  c.data.views = 2
  c.data.shard_on_device = True
  c.batch_size = 256
  c.num_epochs = 1000
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = {}
  c.model.projection_dim = 128
  c.model.projection_hidden_dim = 2048
  c.loss.name = "nt_xent"
  c.loss.kwargs = dict(temperature=0.2)
  c.loss.labels = "instance"
  c.optimizer.name = "lars"
  c.optimizer.learning_rate = 0.4
  c.optimizer.lr_batch_scaling = True
  c.optimizer.weight_decay = 1e-5
  c.optimizer.warmup_epochs = 10.0
  c.checkpoint.every_steps = 2000
  c.log_every = 100
  c.eval_every = 0
  if arg == "runlocal":
    c = common.runlocal(c)
  return c
