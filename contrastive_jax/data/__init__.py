"""Input pipelines: data sources, tf.data batches, and an on-device path.

* ``sources``: ``load_split_arrays(name, split, *, data_dir=None)`` from a local
  image folder, scikit-learn's digits, or TFDS; deterministic validation split.
* ``pipeline``: ``build_tf_dataset`` / ``tf_batches``, the tf.data pipeline
  (sharded per process, seeded, cached, multi-view, class-balanced batches).
* ``on_device``: the split in accelerator memory, batches drawn and augmented
  there in JAX (``device_batches``, ``sample_batch``).
* ``augment_jax`` (and ``augment_tf``, its TensorFlow twin): crop + flip,
  + rotation, and SimCLR's augmentations.

Importing this package does not import TensorFlow: the tf.data functions
import it when called, and ``augment_tf`` is not imported here (import it
explicitly). The on-device path needs only numpy, JAX and Pillow.
"""

from contrastive_jax.data import augment_jax
from contrastive_jax.data import on_device
from contrastive_jax.data import pipeline
from contrastive_jax.data import sources
from contrastive_jax.data.augment_jax import AUGMENTATIONS
from contrastive_jax.data.augment_jax import apply_augment
from contrastive_jax.data.augment_jax import augment_views
from contrastive_jax.data.augment_jax import crop_flip
from contrastive_jax.data.augment_jax import crop_flip_cutout
from contrastive_jax.data.augment_jax import crop_flip_rotate
from contrastive_jax.data.augment_jax import normalize
from contrastive_jax.data.augment_jax import sample_uniforms
from contrastive_jax.data.augment_jax import simclr_augment
from contrastive_jax.data.augment_jax import to_float
from contrastive_jax.data.on_device import DeviceData
from contrastive_jax.data.on_device import balanced_batch_indices
from contrastive_jax.data.on_device import batch_indices
from contrastive_jax.data.on_device import device_batches
from contrastive_jax.data.on_device import device_eval_batches
from contrastive_jax.data.on_device import epoch_permutation
from contrastive_jax.data.on_device import load_device_data
from contrastive_jax.data.on_device import make_batch
from contrastive_jax.data.on_device import put_on_device
from contrastive_jax.data.on_device import sample_batch
from contrastive_jax.data.pipeline import build_tf_dataset
from contrastive_jax.data.pipeline import steps_per_epoch
from contrastive_jax.data.pipeline import tf_batches
from contrastive_jax.data.sources import DATASET_STATS
from contrastive_jax.data.sources import DatasetUnavailableError
from contrastive_jax.data.sources import REFERENCE_SPLIT
from contrastive_jax.data.sources import SPLITS
from contrastive_jax.data.sources import Source
from contrastive_jax.data.sources import SplitArrays
from contrastive_jax.data.sources import dataset_stats
from contrastive_jax.data.sources import image_folder_files
from contrastive_jax.data.sources import load_split_arrays
from contrastive_jax.data.sources import resolve_source

__all__ = [
    "AUGMENTATIONS",
    "DATASET_STATS",
    "DatasetUnavailableError",
    "DeviceData",
    "REFERENCE_SPLIT",
    "SPLITS",
    "Source",
    "SplitArrays",
    "apply_augment",
    "augment_jax",
    "augment_views",
    "balanced_batch_indices",
    "batch_indices",
    "build_tf_dataset",
    "crop_flip",
    "crop_flip_cutout",
    "crop_flip_rotate",
    "dataset_stats",
    "device_batches",
    "device_eval_batches",
    "epoch_permutation",
    "image_folder_files",
    "load_device_data",
    "load_split_arrays",
    "make_batch",
    "normalize",
    "on_device",
    "pipeline",
    "put_on_device",
    "resolve_source",
    "sample_batch",
    "sample_uniforms",
    "simclr_augment",
    "sources",
    "steps_per_epoch",
    "tf_batches",
    "to_float",
]
