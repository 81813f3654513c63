"""Config names -> encoders, heads and losses (small registries, as big_vision).

A config names its backbone (``config.model.backbone``) and its metric loss
(``config.loss.name``); this module turns those names into a
``ContrastiveModel`` (backbone + optional projection / classifier / hash heads
+ optional online linear probe) and a loss function. Nothing here reads
flags: everything comes in as arguments.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from contrastive_jax import losses
from contrastive_jax import models
from contrastive_jax._checks import check_bool

__all__ = [
    "BACKBONES",
    "IN_BATCH_LOSSES",
    "PAIRED_LOSSES",
    "ContrastiveModel",
    "build_model",
    "get_loss",
    "parse_dtype",
]

# Backbone name -> flax module class. Every class accepts ``dtype`` and is
# called as ``module(x, train=...)``; the autoencoder returns
# ``(embedding, reconstruction)``.
BACKBONES: dict[str, type[nn.Module]] = {
    "mlp": models.MLP,
    "small_cnn": models.SmallCNN,
    "fast_cnn": models.FastCNN,
    "resnet": models.ResNet,
    "resnet18": models.ResNet18,
    "resnet34": models.ResNet34,
    "resnet50": models.ResNet50,
    "conv_autoencoder": models.ConvAutoencoder,
}

# Losses of (embeddings [N, D], labels [N]); all take axis_name= and memory=.
IN_BATCH_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "nt_xent": losses.nt_xent_loss,
    "supervised_contrastive": losses.supervised_contrastive_loss,
    "batch_all_triplet": losses.batch_all_triplet_loss,
    "batch_hard_triplet": losses.batch_hard_triplet_loss,
    "semi_hard_triplet": losses.semi_hard_triplet_loss,
    "contrastive": losses.contrastive_loss,
    "multi_similarity": losses.multi_similarity_loss,
    "circle": losses.circle_loss,
}
# Losses of (queries [N, D], keys [N, D]): view 0 against view 1.
PAIRED_LOSSES: dict[str, Callable[..., jax.Array]] = {
    "info_nce": losses.info_nce_loss,
    "sigmoid": losses.sigmoid_contrastive_loss,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16,
           "float16": jnp.float16}


def parse_dtype(name: str):
  if name not in _DTYPES:
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}.")
  return _DTYPES[name]


def get_loss(name: str) -> tuple[Callable[..., jax.Array], bool]:
  """``(loss_fn, paired)`` for a config loss name.

  (A config's empty ``loss.name`` means "no metric loss"; the train step
  checks for it before calling this.)
  """
  # Accept the public function names too ("nt_xent_loss").
  key = name[:-len("_loss")] if name.endswith("_loss") else name
  if key in IN_BATCH_LOSSES:
    return IN_BATCH_LOSSES[key], False
  if key in PAIRED_LOSSES:
    return PAIRED_LOSSES[key], True
  raise ValueError(
      f"Unknown loss {name!r}; known: "
      f"{sorted(IN_BATCH_LOSSES) + sorted(PAIRED_LOSSES)}.")


class ContrastiveModel(nn.Module):
  """Backbone plus the heads a config asks for.

  Output of ``__call__``: a dict with
    * ``features``: backbone output (what kNN / linear probes evaluate);
    * ``embedding``: what the metric loss sees (projection of the features,
      or hash codes, or the features themselves);
    * ``logits`` (classifier head, trained with cross-entropy, on features);
    * ``probe_logits`` (online linear probe on *detached* features: its
      cross-entropy trains the probe only, never the backbone);
    * ``codes`` (hash head: tanh(scale z) when training, sign(z) otherwise);
    * ``reconstruction`` (autoencoder backbones).
  """

  backbone: nn.Module
  projection: nn.Module | None = None
  classifier: nn.Module | None = None
  hash_head: nn.Module | None = None
  probe: nn.Module | None = None

  @nn.compact
  def __call__(self, x, *, train: bool = False, hash_scale=1.0):
    out = {}
    y = self.backbone(x, train=train)
    if isinstance(y, tuple):  # autoencoder: (bottleneck, reconstruction)
      y, out["reconstruction"] = y
    out["features"] = y
    emb = y
    if self.projection is not None:
      emb = self.projection(emb, train=train)
    if self.hash_head is not None:
      emb = self.hash_head(emb, scale=hash_scale, train=train)
      out["codes"] = emb
    out["embedding"] = emb
    if self.classifier is not None:
      out["logits"] = self.classifier(y, train=train)
    if self.probe is not None:
      out["probe_logits"] = self.probe(jax.lax.stop_gradient(y), train=train)
    return out


def _plain(value: Any) -> Any:
  """ConfigDict values -> hashable Python values (lists become tuples)."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_plain(v) for v in value)
  return value


def _make(cls, kwargs: Mapping[str, Any], **common):
  names = {f.name for f in dataclasses.fields(cls)}
  # Only pass what the class has (e.g. axis_name only to BatchNorm modules).
  extra = {k: v for k, v in common.items() if k in names}
  return cls(**{**extra, **kwargs})


def build_model(model_config, *, num_classes: int,
                image_shape: tuple[int, ...],
                axis_name: str | None = None) -> ContrastiveModel:
  """The ``ContrastiveModel`` described by ``config.model``.

  Args:
    model_config: ``config.model`` (backbone, backbone_kwargs, projection_*,
      classifier, hash_bits, online_probe, dtype).
    num_classes: classes of the dataset (classifier and probe heads).
    image_shape: ``(H, W, C)`` of the inputs (the autoencoder needs it).
    axis_name: mapped axis for synchronised BatchNorm (``"data"`` inside
      ``shard_map``; None outside it, e.g. for init and evaluation).
  """
  mc = model_config
  dtype = parse_dtype(mc.dtype)
  if mc.backbone not in BACKBONES:
    raise ValueError(
        f"Unknown backbone {mc.backbone!r}; known: {sorted(BACKBONES)}.")
  kwargs = _plain(mc.get("backbone_kwargs", {}) or {})
  common = dict(dtype=dtype, axis_name=axis_name)
  if mc.backbone == "conv_autoencoder":
    common["image_shape"] = tuple(image_shape)
  if mc.backbone == "resnet" and "stage_sizes" in kwargs:
    kwargs["stage_sizes"] = tuple(kwargs["stage_sizes"])
  if isinstance(kwargs.get("block_cls"), str):  # what a config override gives
    blocks = {"basic": models.BasicBlock, "bottleneck": models.Bottleneck}
    if kwargs["block_cls"] not in blocks:
      raise ValueError(f"backbone_kwargs.block_cls must be one of {sorted(blocks)},"
                       f" got {kwargs['block_cls']!r}.")
    kwargs["block_cls"] = blocks[kwargs["block_cls"]]
  backbone = _make(BACKBONES[mc.backbone], kwargs, **common)
  projection = None
  if mc.get("projection_dim", 0):
    projection = models.ProjectionHead(
        hidden_dim=mc.projection_hidden_dim, output_dim=mc.projection_dim,
        num_layers=mc.projection_layers, axis_name=axis_name, dtype=dtype)
  classifier = (models.ClassifierHead(
      num_classes, dtype=dtype, **_plain(mc.get("classifier_kwargs", {}) or {}))
                if check_bool("model.classifier", mc.get("classifier", False))
                else None)
  hash_head = (models.HashHead(mc.hash_bits, dtype=dtype)
               if mc.get("hash_bits", 0) else None)
  # The probe stays float32: it is a small linear layer read for accuracy.
  probe = (models.ClassifierHead(num_classes)
           if check_bool("model.online_probe", mc.get("online_probe", False))
           else None)
  return ContrastiveModel(backbone=backbone, projection=projection,
                          classifier=classifier, hash_head=hash_head,
                          probe=probe)
