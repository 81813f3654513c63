"""Evaluation of learned representations.

* ``embed``: batched, jitted, data-parallel feature extraction.
* ``knn_accuracy`` / ``knn_classify`` / ``knn_class_scores``: weighted kNN
  classification (InstDisc / solo-learn protocol), chunked.
* ``linear_probe`` / ``fit_linear_classifier`` / ``linear_classifier_logits``:
  linear classifier trained with optax on frozen, standardised features.
* ``classification_metrics``: accuracy, macro and per-class
  precision/recall/F1 and the confusion matrix (scikit-learn).
* ``retrieval_metrics``: precision@1, R-precision, MAP@R, Recall@K, NMI, AMI
  (pytorch-metric-learning ``AccuracyCalculator`` semantics).
* ``hash_retrieval_map`` / ``bit_balance``: Hamming-ranking mAP and bit
  balance of ±1 hash codes.
* ``plots``: PNG figures (t-SNE, curves, confusion matrix, retrieved
  neighbours); matplotlib is imported only when a plot is drawn.
"""

from contrastive_jax.evaluation import plots
from contrastive_jax.evaluation.embed import embed
from contrastive_jax.evaluation.knn import knn_accuracy
from contrastive_jax.evaluation.knn import knn_class_scores
from contrastive_jax.evaluation.knn import knn_classify
from contrastive_jax.evaluation.linear_probe import fit_linear_classifier
from contrastive_jax.evaluation.linear_probe import linear_classifier_logits
from contrastive_jax.evaluation.linear_probe import linear_probe
from contrastive_jax.evaluation.metrics import classification_metrics
from contrastive_jax.evaluation.plots import plot_confusion_matrix
from contrastive_jax.evaluation.plots import plot_curves
from contrastive_jax.evaluation.plots import plot_neighbors
from contrastive_jax.evaluation.plots import plot_tsne
from contrastive_jax.evaluation.retrieval import bit_balance
from contrastive_jax.evaluation.retrieval import hash_retrieval_map
from contrastive_jax.evaluation.retrieval import retrieval_metrics

__all__ = [
    "embed",
    "knn_accuracy",
    "knn_class_scores",
    "knn_classify",
    "fit_linear_classifier",
    "linear_classifier_logits",
    "linear_probe",
    "classification_metrics",
    "retrieval_metrics",
    "hash_retrieval_map",
    "bit_balance",
    "plots",
    "plot_tsne",
    "plot_curves",
    "plot_confusion_matrix",
    "plot_neighbors",
]
