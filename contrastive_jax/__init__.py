"""contrastive_jax: contrastive and deep-metric-learning for JAX.

Submodules: ``similarity`` (measures and pairwise kernels), ``losses``
(contrastive losses), ``models`` (Flax encoders and heads), ``data`` (input
pipelines).
"""

from contrastive_jax import losses
from contrastive_jax import similarity

__version__ = "0.1.0"

__all__ = ["losses", "similarity", "__version__"]
