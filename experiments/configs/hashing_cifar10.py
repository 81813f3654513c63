"""Deep supervised hashing on CIFAR-10: 64-bit codes, Hamming retrieval.

    python -m experiments.train --config=experiments/configs/hashing_cifar10.py \
        --workdir=/tmp/hashing_cifar10
    python -m experiments.train --config=experiments/configs/hashing_cifar10.py:runlocal \
        --workdir=/tmp/hashing_cifar10_runlocal --config.data_dir=../shared/data

ResNet-18 features -> ``HashHead(64)``: ``tanh(scale z)`` during training with
HashNet's continuation ``scale = (1 + 0.005 step)^0.5``, ``sign(z)`` at test.
Loss: supervised contrastive on the relaxed codes (cosine similarity of +-1
codes is ``1 - 2 Hamming / bits``) plus 0.1 x quantisation
``mean((|b| - 1)^2)``. Adam 1e-3 + cosine, batch 256, 100 epochs, crop + flip.
results.json reports ``hash_map``: Hamming-ranking mAP of validation queries
against the training set.

Hardware: one accelerator. Result: not yet measured.
``runlocal``: a tiny ResNet, 5 steps of batch 32.
"""

from experiments.configs import common


ARGS = ("runlocal",)


def get_config(arg: str | None = None):
  common.check_arg("hashing_cifar10", arg, ARGS)
  c = common.base_config()
  c.dataset = "cifar10"
  c.data.augment = "crop_flip"
  c.data.shard_on_device = True
  c.batch_size = 256
  c.num_epochs = 100
  c.model.backbone = "resnet18"
  c.model.backbone_kwargs = {}
  c.model.hash_bits = 64
  c.loss.name = "supervised_contrastive"
  c.loss.kwargs = dict(temperature=0.3)
  c.loss.quantization_weight = 0.1
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_epochs = 2.0
  c.checkpoint.every_steps = 2000
  c.log_every = 100
  if arg == "runlocal":
    c = common.runlocal(c)
  return c
