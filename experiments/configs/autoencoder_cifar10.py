"""Convolutional autoencoder on CIFAR-10; the bottleneck is the embedding.

    python -m experiments.train --config=experiments/configs/autoencoder_cifar10.py \
        --workdir=/tmp/autoencoder_cifar10
    python -m experiments.train --config=experiments/configs/autoencoder_cifar10.py:runlocal \
        --workdir=/tmp/autoencoder_cifar10_runlocal --config.data_dir=../shared/data

``ConvAutoencoder(features=(32, 64), embedding_dim=128)``: strided convolutions
to 8x8x64, a 128-d bottleneck, transposed convolutions back; mean squared
error on normalised pixels. No metric loss: kNN and linear-probe accuracy of
the bottleneck show what reconstruction alone learns. Adam 1e-3 + cosine,
batch 256, 50 epochs.

Hardware: one accelerator or a CPU. Result: not yet measured.
``runlocal``: narrower layers, 5 steps of batch 32.
"""

from experiments.configs import common


ARGS = ("runlocal",)


def get_config(arg: str | None = None):
  common.check_arg("autoencoder_cifar10", arg, ARGS)
  c = common.base_config()
  c.dataset = "cifar10"
  c.data.augment = "none"
  c.data.shard_on_device = True
  c.batch_size = 256
  c.num_epochs = 50
  c.model.backbone = "conv_autoencoder"
  c.model.backbone_kwargs = dict(features=(32, 64), embedding_dim=128)
  c.loss.name = ""
  c.loss.reconstruction_weight = 1.0
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_epochs = 1.0
  c.checkpoint.every_steps = 2000
  c.log_every = 100
  if arg == "runlocal":
    c = common.runlocal(c)
  return c
