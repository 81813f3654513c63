"""Images/s of one training step: SmallCNN + NT-Xent, batch 256, JAX vs PyTorch.

    python -m experiments.benchmarks.train_step [--steps=10] [--variants=flatten,global]
    python -m experiments.benchmarks.train_step --variants=fastcnn,fastcnn_whiten --notorch

Both sides: the design documents' small CNN (two 3x3 convs, 64 and 128
channels, ReLU, 2x2 max-pool each, Dense to 128) on 32x32x3 inputs, two views
of 128 images (batch 256), NT-Xent at temperature 0.5, SGD with momentum.
JAX runs ``contrastive_jax.training.make_train_step`` (the real step:
shard_map over a 1-device mesh, optax, donated state); PyTorch runs the same
model with pytorch-metric-learning's ``NTXentLoss``. Results: TRAIN_STEP.md.

``fastcnn`` / ``fastcnn_whiten``: the CIFAR CPU recipes' encoder
(``FastCNN(widths=(40, 160, 160), stem_width=0)``, ``common.cpu_wide``) in
the same step, without and with airbench's 2x2 patch-whitening first layer
(``whiten_size=2``, filters from the 1,024 random init images), to measure
what the layer costs side by side.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from contrastive_jax import training

_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per variant.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["flatten", "global"],
    "JAX models to time: SmallCNN pooling 'flatten' or 'global', or "
    "'fastcnn' / 'fastcnn_whiten'.")
_TORCH = flags.DEFINE_bool("torch", True, "Also time PyTorch.")

BATCH = 256


def _backbone(variant: str) -> tuple[str, dict]:
  if variant.startswith("fastcnn"):
    kw = dict(widths=(40, 160, 160), stem_width=0)
    if variant == "fastcnn_whiten":
      kw["whiten_size"] = 2
    return "fast_cnn", kw
  return "small_cnn", dict(features=(64, 128), embedding_dim=128,
                           pooling=variant)


def _config(variant: str, dtype: str = "float32"):
  backbone, kwargs = _backbone(variant)
  return ml_collections.ConfigDict(dict(
      batch_size=BATCH,
      model=dict(backbone=backbone, backbone_kwargs=kwargs,
                 projection_dim=0, projection_hidden_dim=0, projection_layers=2,
                 classifier=False, hash_bits=0, online_probe=False,
                 dtype=dtype),
      loss=dict(name="nt_xent", kwargs=dict(temperature=0.5),
                labels="instance"),
      optimizer=dict(name="sgd", learning_rate=0.01, momentum=0.9,
                     schedule="constant")))


def time_jax(variant: str, steps: int, dtype: str = "float32") -> float:
  c = _config(variant, dtype)
  mesh = training.make_mesh(1)
  kw = dict(num_classes=10, image_shape=(32, 32, 3))
  init_model = training.build_model(c.model, **kw)
  model = training.build_model(c.model, axis_name="data", **kw)
  schedule = training.make_schedule(c.optimizer, total_steps=100,
                                    batch_size=BATCH)
  tx = training.make_optimizer(c.optimizer, schedule)
  rng = np.random.default_rng(0)
  # 1,024 images: the whitening variant computes its filters from them.
  state = training.create_train_state(
      init_model, tx, sample_input=rng.normal(size=(1024, 32, 32, 3)).astype(
          np.float32), key=jax.random.key(0))
  step = training.make_train_step(model, tx, schedule, c, mesh)
  batch = {"image": jnp.asarray(rng.normal(size=(BATCH // 2, 2, 32, 32, 3)),
                                jnp.float32),
           "label": jnp.arange(BATCH // 2, dtype=jnp.int32)}
  batch = jax.device_put(batch, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec("data")))
  state = jax.device_put(state, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  for _ in range(2):  # compile + warm-up
    state, m = step(state, batch)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(steps):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return steps * BATCH / (time.perf_counter() - t)


def time_torch(steps: int) -> float:
  import torch  # pylint: disable=g-import-not-at-top
  from pytorch_metric_learning import losses as pml  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      torch.nn.Conv2d(3, 64, 3, padding=1), torch.nn.ReLU(),
      torch.nn.MaxPool2d(2),
      torch.nn.Conv2d(64, 128, 3, padding=1), torch.nn.ReLU(),
      torch.nn.MaxPool2d(2), torch.nn.Flatten(),
      torch.nn.Linear(8 * 8 * 128, 128))
  loss_fn = pml.NTXentLoss(temperature=0.5)
  opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
  x = torch.randn(BATCH, 3, 32, 32)
  labels = torch.arange(BATCH // 2).repeat(2)

  def one():
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(net(x), labels)
    loss.backward()
    opt.step()

  for _ in range(2):
    one()
  t = time.perf_counter()
  for _ in range(steps):
    one()
  return steps * BATCH / (time.perf_counter() - t)


def main(argv):
  del argv
  rows = []
  for v in _VARIANTS.value:
    name = (f"jax FastCNN(40, 160, 160){' + whitening' * ('whiten' in v)}"
            if v.startswith("fastcnn") else f"jax SmallCNN pooling={v}")
    rows.append((name, time_jax(v, _STEPS.value)))
    print(rows[-1], flush=True)
  if _TORCH.value:
    import torch  # pylint: disable=g-import-not-at-top
    rows.append((f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
                 " + PML NTXentLoss", time_torch(_STEPS.value)))
    print(rows[-1], flush=True)
  print(f"\n| variant | images/s (batch {BATCH}) |\n|---|---|")
  for name, rate in rows:
    print(f"| {name} | {rate:.0f} |")


if __name__ == "__main__":
  app.run(main)
