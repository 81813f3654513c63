"""The design documents' experiment, fixed: triplet loss + cross-entropy.

    python -m experiments.train --config=experiments/configs/triplet_ce_cifar10.py \
        --workdir=/tmp/triplet_ce_cifar10
    python -m experiments.train --config=experiments/configs/triplet_ce_cifar10.py:runlocal \
        --workdir=/tmp/triplet_ce_cifar10_runlocal --config.data_dir=../shared/data

The documents' small CNN (two 3x3 convolutions, 64 and 128 channels, with the
missing 2x2 pooling added) gives a 128-d embedding. The loss is the batch-hard
triplet loss (cosine distance, margin 0.2) on the embedding, mined inside the
batch from the integer labels, plus cross-entropy on the logits of a
classifier head. The documents' two bugs are fixed: they applied
cross-entropy to the raw embedding (now a ``ClassifierHead`` produces the
logits), and called a triplet loss that expects (anchor, positive, negative)
triplets with labels (now a mining loss takes ``(embeddings, labels)``).
Adam 1e-3, batch 128, 50 epochs, crop + flip.

Hardware: one accelerator or a CPU. Result of this recipe: not yet measured.
``runlocal``: a narrower CNN, 5 steps of batch 32.

``cpu``: the 2-core CPU recipe (``common.cpu_cifar``): the same losses on
``FastCNN(widths=(32, 128, 128), stem_width=0)``, batch 256, AdamW 3e-3 with
warmup + cosine, 20 epochs, on-device crop + flip::

    python -m experiments.train --config=experiments/configs/triplet_ce_cifar10.py:cpu \
        --config.data_dir=../shared/data --workdir=/tmp/triplet_ce_cpu

Result (2026-11-29, 2 shared CPU cores, seed 0): with 10 epochs, 83.1%
validation accuracy (classifier head; macro recall 83.1%, macro F1 83.1%),
37.5 minutes of training; 20 epochs: 86.26% (macro recall 86.26%, macro
F1 86.26%; kNN 85.96%, linear probe 85.38%), 74 minutes at 209 images/s;
evaluated with flip test-time augmentation (``experiments.evaluate
--tta_flip``): 87.14% accuracy, macro recall 87.14%, macro F1 87.15%.
``--config.num_epochs=30`` (95 minutes on an idle machine, 241 images/s):
86.18% plain (no gain over 20 epochs), 87.58% / 87.58% / 87.56% with flip
test-time augmentation.

``cpu_wide``: ``cpu`` with a wider ``FastCNN(widths=(40, 160, 160))``
(0.77 M parameters, ~1.4x the training time) and label smoothing 0.2 on the
classifier's cross-entropy (as airbench)::

    python -m experiments.train --config=experiments/configs/triplet_ce_cifar10.py:cpu_wide \
        --config.data_dir=../shared/data --workdir=/tmp/triplet_ce_cpu_wide

Result (2026-11-29, idle 2-core CPU, seed 0): 20 epochs in 89.3 minutes at
173 images/s: 86.78% accuracy, macro recall 86.78%, macro F1 86.78% (kNN
86.64%, linear probe 86.54%); with flip test-time augmentation 87.86% /
87.86% / 87.89% (kNN 88.14%). The best CPU recipe before ``cpu_whiten``, inside the
2-hour budget. With a weight average (``--config.ema_decay=0.998``, same
time; its online weights are bit-identical to the run above): 86.86% /
86.86% / 86.85% evaluated with the average, 87.88% / 87.88% / 87.90% with
flip test-time augmentation, i.e. no measurable gain (+0.08).

``cpu_whiten``: ``cpu_wide`` behind airbench's 2x2 patch-whitening layer
(``common.cpu_whiten``; 24 fixed filters from a random 1,024 training
images; the measured run below took the first 1,024, all airplanes)::

    python -m experiments.train --config=experiments/configs/triplet_ce_cifar10.py:cpu_whiten \
        --config.data_dir=../shared/data --workdir=/tmp/triplet_ce_cpu_whiten

Result (2026-11-29, idle 2-core CPU, seed 0): 20 epochs in 87.8 minutes at
175 images/s: 87.82% accuracy, macro recall 87.82%, macro F1 87.81% (kNN
87.74%, linear probe 87.62%), +1.0 over ``cpu_wide``, beating the design
documents' 85.5 / 87 / 86 without test-time augmentation; with flip
test-time augmentation 88.88% / 88.88% / 88.88%.

``cpu_airbench``: airbench96's whole recipe at a quarter of its width, 24
epochs (``cifar10_gpu.cpu_airbench``, as ``supcon_cifar10.py:cpu_airbench``)
with this experiment's loss in SupCon's place: batch-hard triplet (cosine,
margin 0.2) on the backbone's 128-d features (no projection head, as
``cpu``) at weight 0.1 beside the cross-entropy. airbench's logits are
scaled by 1/9, which scales the cross-entropy's gradient into the network
by 1/9 too; 0.1 keeps ``cpu``'s 1 : 1 balance (as SupCon's 0.5 became 0.05).
On SupCon's projection head instead, the triplet term collapsed within 300
steps (its loss exactly the margin, 0.2000: every embedding alike), leaving
the cross-entropy to train alone::

    python -m experiments.train --config=experiments/configs/triplet_ce_cifar10.py:cpu_airbench \
        --config.data_dir=../shared/data --workdir=/tmp/triplet_ce_cpu_airbench

Result (2026-11-30, 2 CPU cores, seed 0): 24 epochs in 73.3 minutes at 240
images/s: 89.06% accuracy, macro recall 89.06%, macro F1 89.06% (kNN
88.90%, linear probe 88.80%); with flip + translation test-time
augmentation 89.62%. With ``--config.num_epochs=32`` (98.1 minutes, 239
images/s): 89.50% / 89.50% / 89.49% (kNN 89.42%, probe 89.36%), 90.66% with
both TTAs: the best CPU result, 4.0 / 2.5 / 3.5 points past the design
documents' 85.5 / 87 / 86 without TTA (experiments/RESULTS.md, footnote 22).
"""

from experiments.configs import cifar10_gpu
from experiments.configs import common


CPU_EPOCHS = 20


ARGS = ("cpu", "cpu_wide", "cpu_whiten", "cpu_airbench", "runlocal")


def get_config(arg: str | None = None):
  common.check_arg("triplet_ce_cifar10", arg, ARGS)
  c = common.base_config()
  c.dataset = "cifar10"
  c.data.augment = "crop_flip"
  c.data.views = 0
  c.batch_size = 128
  c.num_epochs = 50
  c.model.backbone = "small_cnn"
  c.model.backbone_kwargs = dict(features=(64, 128), embedding_dim=128)
  c.model.classifier = True
  c.model.online_probe = False  # the classifier head already reports accuracy
  c.loss.name = "batch_hard_triplet"
  c.loss.kwargs = dict(margin=0.2, metric="cosine")
  c.loss.labels = "class"
  c.loss.ce_weight = 1.0
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "constant"
  c.checkpoint.every_steps = 1000
  c.log_every = 100
  if arg in ("cpu", "cpu_wide", "cpu_whiten"):
    c = common.cpu_cifar(c, epochs=CPU_EPOCHS)
  if arg == "cpu_wide":
    c = common.cpu_wide(c)
  if arg == "cpu_whiten":
    c = common.cpu_whiten(c)
  if arg == "runlocal":
    c = common.runlocal(c)
  if arg == "cpu_airbench":
    # airbench's recipe with this experiment's loss (above) in SupCon's place.
    airbench = cifar10_gpu.cpu_airbench()
    airbench.loss.name = c.loss.name
    airbench.loss.kwargs = c.loss.kwargs
    airbench.loss.weight = 0.1
    # On the backbone's features, as this experiment defines it: on
    # cifar10_gpu's projection head the triplet term collapsed (RESULTS.md).
    airbench.model.projection_dim = 0
    return airbench
  return c
