"""The default run: SupCon on scikit-learn's digits with a small CNN.

    python -m experiments.train                     # this config, ./workdirs/digits
    python -m experiments.train --config=experiments/configs/digits.py \
        --workdir=/tmp/digits --config.num_steps=600

Hardware: 2 shared CPU cores (x86-64, loaded by other jobs), 1 JAX CPU device.
Result (2026-11-28, seed 0, 400 steps, batch 256, 1,258 train / 539 held-out
validation images): weighted kNN (k=20) top-1 0.959 on the backbone features,
0.976 on the projection; linear-probe top-1 0.961; online probe 0.961;
46-52 s wall time including compilation and evaluation.

The encoder is ``SmallCNN(features=(32, 64), embedding_dim=128)`` (8x8x1 ->
2x2x64 -> 128 features), a 2-layer BatchNorm projection head to 64-d, and the
supervised contrastive loss (temperature 0.1) on one un-augmented view: the
digits are too small for crops, and flips would turn a 2 into a 5. Adam 3e-3,
warmup 40 steps then cosine.
"""

from experiments.configs import common


def get_config(arg: str | None = None):
  del arg
  c = common.base_config()
  c.dataset = "digits"
  c.batch_size = 256
  c.num_steps = 400
  c.model.backbone = "small_cnn"
  c.model.backbone_kwargs = dict(features=(32, 64), embedding_dim=128)
  c.model.projection_dim = 64
  c.model.projection_hidden_dim = 128
  c.loss.name = "supervised_contrastive"
  c.loss.kwargs = dict(temperature=0.1)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 40
  c.checkpoint.every_steps = 200
  c.log_every = 20
  c.eval.probe_steps = 500
  return c
