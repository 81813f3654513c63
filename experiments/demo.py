"""A one-minute demo of the losses: SupCon on scikit-learn's digits.

    python -m experiments.demo [--loss=supervised_contrastive_loss] [--steps=300]

Trains a small MLP encoder with a loss from ``contrastive_jax.losses`` on 70%
of the digits and reports the weighted-kNN accuracy of its embeddings on the
held-out 30%. (The full training system, ``experiments.train``, supersedes
this once it lands.)
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn import datasets
from sklearn import model_selection

from contrastive_jax import losses
from contrastive_jax import models
from contrastive_jax import similarity

_LOSS = flags.DEFINE_enum(
    "loss", "supervised_contrastive_loss",
    ["supervised_contrastive_loss", "nt_xent_loss", "batch_hard_triplet_loss",
     "multi_similarity_loss", "circle_loss", "contrastive_loss"],
    "Loss from contrastive_jax.losses.")
_STEPS = flags.DEFINE_integer("steps", 300, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Batch size.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def knn_accuracy(train_emb, train_labels, test_emb, test_labels, *, k=20,
                 temperature=0.07):
  """Weighted kNN (InstDisc protocol) top-1 accuracy."""
  sims = similarity.pairwise_cosine_similarity(test_emb, train_emb)
  top, idx = jax.lax.top_k(sims, k)
  votes = jax.nn.one_hot(train_labels[idx], 10) * jnp.exp(top / temperature)[
      ..., None]
  return float(jnp.mean(jnp.argmax(votes.sum(1), -1) == test_labels))


def main(argv):
  del argv
  digits = datasets.load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
      x, digits.target, test_size=0.3, stratify=digits.target,
      random_state=_SEED.value)
  model = models.MLP(hidden_dims=(256, 128), output_dim=64)
  key = jax.random.key(_SEED.value)
  params = model.init(key, x_tr[:1])
  tx = optax.adam(optax.cosine_decay_schedule(3e-3, _STEPS.value))
  opt_state = tx.init(params)
  loss_fn = getattr(losses, _LOSS.value)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(params, opt_state, step, x, y):
    idx = jax.random.choice(jax.random.fold_in(key, step), x.shape[0],
                            (_BATCH.value,), replace=False)
    def objective(p):
      return loss_fn(model.apply(p, x[idx]), y[idx])
    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  x_tr_d, y_tr_d = jnp.asarray(x_tr), jnp.asarray(y_tr)
  start = time.perf_counter()
  for step in range(_STEPS.value):
    params, opt_state, loss = update(params, opt_state, step, x_tr_d, y_tr_d)
    if step % 100 == 0 or step == _STEPS.value - 1:
      print(f"step {step:4d}  {_LOSS.value} {float(loss):.4f}")
  elapsed = time.perf_counter() - start
  emb_tr = model.apply(params, x_tr_d)
  emb_te = model.apply(params, jnp.asarray(x_te))
  acc = knn_accuracy(emb_tr, y_tr_d, emb_te, jnp.asarray(y_te))
  print(f"digits held-out ({len(y_te)} images) weighted-kNN top-1:"
        f" {100 * acc:.2f}%  ({_STEPS.value} steps in {elapsed:.1f}s)")


if __name__ == "__main__":
  app.run(main)
