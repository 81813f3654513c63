"""Encoders and heads (flax.linen) for contrastive and metric learning.

Every module takes ``dtype`` (computation) and ``param_dtype`` (kept float32),
and is called as ``module.apply(variables, x, train=...)``, except
``BatchNormAct``, which, as flax's ``BatchNorm``, takes
``use_running_average`` instead; modules with BatchNorm take ``axis_name`` so
statistics can be synchronised across devices.
"""

from contrastive_jax.models.autoencoder import ConvAutoencoder, reconstruction_loss
from contrastive_jax.models.cnn import FastCNN, SmallCNN, patch_whitening_kernel
from contrastive_jax.models.heads import ClassifierHead, HashHead, ProjectionHead, hash_scale
from contrastive_jax.models.mlp import MLP
from contrastive_jax.models.norm import BatchNormAct, batch_norm_act
from contrastive_jax.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
)

__all__ = [
    "MLP",
    "SmallCNN",
    "FastCNN",
    "patch_whitening_kernel",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "BasicBlock",
    "Bottleneck",
    "BatchNormAct",
    "batch_norm_act",
    "ConvAutoencoder",
    "reconstruction_loss",
    "ProjectionHead",
    "ClassifierHead",
    "HashHead",
    "hash_scale",
]
