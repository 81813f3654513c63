"""scikit-learn's digits (8x8, embedded): the default run, and one run per config family.

    python -m experiments.train                     # SupCon, ./workdirs/digits
    python -m experiments.train --config=experiments/configs/digits.py:simclr \
        --workdir=/tmp/digits_simclr
    # families: supcon (default), simclr, triplet_ce, hashing, autoencoder

1,257 training / 540 held-out validation images (30%, stratified). Every
family uses ``SmallCNN(features=(32, 64), embedding_dim=128)`` (8x8x1 ->
2x2x64 -> 128 features), SupCon the wider ``features=(128, 256)``, and is
evaluated by weighted kNN and a linear probe on those features. Results:
``experiments/RESULTS.md`` (commands and figures per family). kNN uses
k = 10, except where a k was chosen on the "tune" split
(``--config.data.tune=True``, which never loads validation): 1 for supcon,
5 for simclr. With ~125 references per class, CIFAR's k = 20 (5,000 per
class) averages over too wide a neighbourhood.

* ``supcon``: supervised contrastive loss (T=0.1) on a 2-layer BN projection
  to 64-d, plus the cross-entropy of a linear classifier head on the
  features (weight 1, as the CIFAR-10 SupCon configs); one view with a
  1-pixel crop and +-10 degree rotation (no flips: a mirrored 2 reads as a
  5).
* ``simclr``: no labels: NT-Xent (T=0.2, batch 512, 2,000 steps) between
  two views of each image (3-pixel crop, +-15 degrees).
* ``triplet_ce``: batch-hard triplet loss (cosine, margin 0.2) on the
  features + cross-entropy of a classifier head (the design documents'
  experiment).
* ``hashing``: a 32-bit hash head trained with SupCon + quantisation loss;
  Hamming-ranking mAP of sign codes.
* ``autoencoder``: convolutional autoencoder, reconstruction loss only.
"""

from experiments.configs import common

FAMILIES = ("supcon", "simclr", "triplet_ce", "hashing", "autoencoder")


def get_config(arg: str | None = None):
  family = arg or "supcon"
  if family not in FAMILIES:
    raise ValueError(f"digits config family must be one of {FAMILIES}, got {arg!r}.")
  c = common.base_config()
  c.dataset = "digits"
  c.batch_size = 256
  c.num_steps = 1000
  c.data.augment = "crop_rotate"
  c.data.padding = 1
  c.data.max_degrees = 10.0
  c.model.backbone = "small_cnn"
  # SupCon (the default) gets a wider CNN: kNN 99.00% over seeds 0-4,
  # against 98.78% with (64, 128); 98.91% over seeds 0-9 (RESULTS.md,
  # 540-image validation split).
  c.model.backbone_kwargs = dict(
      features=(128, 256) if family == "supcon" else (32, 64), embedding_dim=128)
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
  # ~125 references per class (CIFAR-10 has 5,000): k = 10, not CIFAR's 20.
  c.eval.knn_k = 10
  if family == "supcon":
    # Chosen on the "tune" split (--config.data.tune=True, seeds 0-4; the
    # rules in results/cpu_2026-11-30/digits_tune/selection_rules.txt):
    # adding a classifier head's cross-entropy gave 5 tune errors in all at
    # k = 1, against 11 for SupCon alone at its best k (5).
    c.model.classifier = True
    c.loss.ce_weight = 1.0
    c.eval.knn_k = 1
  elif family == "simclr":
    # Tuned on seeds 2 and 3, then run for seeds 0-4 (RESULTS.md): shifts of
    # up to 3 pixels (2: kNN 95.96% over seeds 0-4), T = 0.2 and 2,000 steps.
    c.num_steps = 2000
    c.batch_size = 512
    c.data.views = 2
    c.data.padding = 3
    c.data.max_degrees = 15.0
    c.loss.name = "nt_xent"
    c.loss.kwargs = dict(temperature=0.2)
    c.loss.labels = "instance"
    c.model.online_probe = True
    # Chosen on the "tune" split like supcon's: 81 tune errors in all at
    # k = 5, 82 at 1, 84 at 10, 83 at 20 (seeds 0-4).
    c.eval.knn_k = 5
  elif family == "triplet_ce":
    c.model.projection_dim = 0
    c.model.classifier = True
    c.model.online_probe = False
    c.loss.name = "batch_hard_triplet"
    c.loss.kwargs = dict(margin=0.2, metric="cosine")
    c.loss.ce_weight = 1.0
  elif family == "hashing":
    c.model.hash_bits = 32
    c.loss.kwargs = dict(temperature=0.3)
    c.loss.quantization_weight = 0.1
  elif family == "autoencoder":
    c.data.augment = "none"
    c.model.backbone = "conv_autoencoder"
    c.model.backbone_kwargs = dict(features=(32, 64), embedding_dim=128)
    c.model.projection_dim = 0
    c.loss.name = ""
    c.loss.reconstruction_weight = 1.0
  return c
