"""Equality with pytorch-metric-learning (optional: skipped without torch).

Install the oracle with ``pip install -e .[bench]`` (torch CPU).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import losses

torch = pytest.importorskip("torch")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
pml_distances = pytest.importorskip("pytorch_metric_learning.distances")
pml_miners = pytest.importorskip("pytorch_metric_learning.miners")
pml_reducers = pytest.importorskip("pytorch_metric_learning.reducers")


def _lp():
  return pml_distances.LpDistance(normalize_embeddings=False, p=2, power=1)


def _pml_batch_hard(margin, distance):
  """PML's batch-hard recipe: BatchHardMiner triplets, averaged with zeros."""
  loss = pml_losses.TripletMarginLoss(margin=margin, distance=distance,
                                      reducer=pml_reducers.MeanReducer())
  miner = pml_miners.BatchHardMiner(distance=distance)
  return lambda x, y: loss(x, y, miner(x, y))


CASES = {
    "batch_hard": (lambda: _pml_batch_hard(0.7, _lp()),
                   lambda x, y: losses.batch_hard_triplet_loss(x, y,
                                                               margin=0.7)),
    "batch_hard_cosine": (
        lambda: _pml_batch_hard(0.2, pml_distances.CosineSimilarity()),
        lambda x, y: losses.batch_hard_triplet_loss(x, y, margin=0.2,
                                                    metric="cosine")),
    "batch_all": (lambda: pml_losses.TripletMarginLoss(margin=0.7,
                                                        distance=_lp()),
                  lambda x, y: losses.batch_all_triplet_loss(x, y,
                                                             margin=0.7)),
    "contrastive": (
        lambda: pml_losses.ContrastiveLoss(pos_margin=0.3, neg_margin=2.5,
                                           distance=_lp()),
        lambda x, y: losses.contrastive_loss(x, y, pos_margin=0.3,
                                             neg_margin=2.5)),
    "nt_xent": (lambda: pml_losses.NTXentLoss(temperature=0.2),
                lambda x, y: losses.nt_xent_loss(x, y, temperature=0.2)),
    "supcon": (lambda: pml_losses.SupConLoss(temperature=0.2),
               lambda x, y: losses.supervised_contrastive_loss(
                   x, y, temperature=0.2)),
    "multi_similarity": (
        lambda: pml_losses.MultiSimilarityLoss(alpha=2.0, beta=10.0, base=0.3),
        lambda x, y: losses.multi_similarity_loss(x, y, alpha=2.0, beta=10.0,
                                                  base=0.3)),
    "circle": (lambda: pml_losses.CircleLoss(m=0.25, gamma=8.0),
               lambda x, y: losses.circle_loss(x, y, m=0.25, gamma=8.0)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_value_and_gradient_equal_pml(name):
  make_pml, ours = CASES[name]
  rng = np.random.default_rng(0)
  # 10 classes in 16 draws: some anchors have no positive.
  for num_classes in (4, 4, 4, 10):
    x = rng.normal(size=(16, 8))
    labels = rng.integers(0, num_classes, size=16)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    expected = make_pml()(xt, torch.tensor(labels))
    expected.backward()
    with jax.enable_x64(True):
      value, grad = jax.value_and_grad(ours)(jnp.asarray(x),
                                             jnp.asarray(labels))
    np.testing.assert_allclose(value, expected.item(), rtol=1e-6)
    np.testing.assert_allclose(grad, xt.grad.numpy(), rtol=1e-5, atol=1e-8)


def test_info_nce_equals_pml_ntxent_with_reference_embeddings():
  """InfoNCE with a queue is PML's NTXentLoss of the queries against
  ``ref_emb = [keys; negatives]``, key i being query i's only positive."""
  rng = np.random.default_rng(1)
  q, k, neg = (rng.normal(size=s) for s in ((12, 8), (12, 8), (20, 8)))
  qt, kt, nt = (torch.tensor(a, dtype=torch.float64, requires_grad=True)
                for a in (q, k, neg))
  expected = pml_losses.NTXentLoss(temperature=0.2)(
      qt, torch.arange(12), ref_emb=torch.cat([kt, nt]),
      ref_labels=torch.arange(32))
  expected.backward()
  with jax.enable_x64(True):
    value, grads = jax.value_and_grad(
        lambda *a: losses.info_nce_loss(a[0], a[1], negatives=a[2],
                                        temperature=0.2),
        argnums=(0, 1, 2))(jnp.asarray(q), jnp.asarray(k), jnp.asarray(neg))
  np.testing.assert_allclose(value, expected.item(), rtol=1e-6)
  for g, t in zip(grads, (qt, kt, nt)):
    np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-5, atol=1e-8)
