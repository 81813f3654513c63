"""What a ResNet's backward pass keeps, per BatchNorm backward variant.

    python -m experiments.benchmarks.saved_residuals [--batch=8] [--dtype=bfloat16]

Prints, for ``ResNet18(norm_backward=...)`` in train mode (autodiff, remat,
custom side by side), the activation-sized residuals that
``jax.ad_checkpoint.print_saved_residuals`` reports for the gradient of a
sum of the features, in MB per image by dtype, and each variant's total as a
ratio to autodiff's. Nothing is run: the residuals come from tracing.

``print_saved_residuals`` lists a value once per use it is saved for (a
block's input feeds its first convolution and its shortcut), so the
bfloat16 totals count some buffers more than once; the float32 and boolean
intermediates that autodiff keeps are each their own buffer.
"""

from __future__ import annotations

import collections
import contextlib
import io

from absl import app
from absl import flags
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

from contrastive_jax.models import ResNet18
from contrastive_jax.models import norm

_BATCH = flags.DEFINE_integer("batch", 8, "Images traced.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Model compute dtype.")


def saved_residual_bytes(fn, *args, min_elements: int = 1024) -> dict[str, int]:
  """Bytes by dtype (``"f32"``, ``"bf16"``, ``"bool"``...) of what ``fn``'s VJP saves.

  Only values computed inside ``fn`` (not its arguments) with at least
  ``min_elements`` elements: the activations, not the parameters.
  """
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    ad_checkpoint.print_saved_residuals(fn, *args)
  sizes = collections.Counter()
  for line in out.getvalue().splitlines():
    kind, _, dims = line.split(" ", 1)[0].partition("[")
    dims = dims.rstrip("]")
    if "from the argument" in line or not dims:
      continue
    count = int(np.prod([int(d) for d in dims.split(",")]))
    if count >= min_elements:
      itemsize = 1 if kind == "bool" else int(kind.lstrip("bfuic")) // 8
      sizes[kind] += count * itemsize
  return dict(sizes)


def variant_bytes(backward: str, batch: int, dtype) -> dict[str, int]:
  model = ResNet18(dtype=dtype, norm_backward=backward)
  x = jnp.zeros((batch, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables["params"])
  stats = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["batch_stats"])

  def loss(params, x):
    out, _ = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                         mutable=["batch_stats"])
    return jnp.sum(out.astype(jnp.float32))

  return saved_residual_bytes(loss, params, x)


def main(argv):
  del argv
  batch, dtype = _BATCH.value, jnp.dtype(_DTYPE.value)
  rows = {b: variant_bytes(b, batch, dtype) for b in norm.BACKWARDS}
  kinds = sorted({k for r in rows.values() for k in r})
  base = sum(rows["autodiff"].values())
  print(f"ResNet-18 (CIFAR stem), {dtype.name}, train mode: saved activations,"
        f" MB per image ({batch} images traced)\n")
  print("| backward | " + " | ".join(kinds) + " | total | / autodiff |")
  print("|---|" + "---:|" * (len(kinds) + 2))
  for name, r in rows.items():
    total = sum(r.values())
    cells = [f"{r.get(k, 0) / batch / 1e6:.2f}" for k in kinds]
    print(f"| {name} | " + " | ".join(cells)
          + f" | {total / batch / 1e6:.2f} | {total / base:.2f} |")


if __name__ == "__main__":
  app.run(main)
