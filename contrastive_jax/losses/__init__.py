"""Contrastive and metric-learning losses: pure functions of JAX arrays.

In-batch losses take ``embeddings [N, D]`` and integer ``labels [N]``; samples
sharing a label are positives of each other (never of themselves). All take
``axis_name`` to contrast each device's anchors against every device's
candidates inside ``jax.shard_map``/``jax.pmap``.
"""

from contrastive_jax.losses.memory import CrossBatchMemory
from contrastive_jax.losses.memory import create_memory
from contrastive_jax.losses.memory import enqueue_memory
from contrastive_jax.losses.pairs import circle_loss
from contrastive_jax.losses.pairs import contrastive_loss
from contrastive_jax.losses.pairs import multi_similarity_loss
from contrastive_jax.losses.sigmoid import sigmoid_contrastive_loss
from contrastive_jax.losses.softmax import info_nce_loss
from contrastive_jax.losses.softmax import nt_xent_loss
from contrastive_jax.losses.softmax import supervised_contrastive_loss
from contrastive_jax.losses.triplet import batch_all_triplet_loss
from contrastive_jax.losses.triplet import batch_hard_triplet_loss
from contrastive_jax.losses.triplet import semi_hard_triplet_loss
from contrastive_jax.losses.triplet import triplet_margin_loss

__all__ = [
    "triplet_margin_loss",
    "batch_all_triplet_loss",
    "batch_hard_triplet_loss",
    "semi_hard_triplet_loss",
    "contrastive_loss",
    "multi_similarity_loss",
    "circle_loss",
    "nt_xent_loss",
    "supervised_contrastive_loss",
    "info_nce_loss",
    "sigmoid_contrastive_loss",
    "CrossBatchMemory",
    "create_memory",
    "enqueue_memory",
]
