"""Public API conventions: explicit exports, keyword-only options, docstrings."""

import inspect

import pytest

import contrastive_jax
from contrastive_jax import losses
from contrastive_jax import similarity

# Positional parameters allowed per module: the data, never hyperparameters.
DATA_PARAMS = {
    "x", "y", "embeddings", "labels", "queries", "keys", "anchors",
    "positives", "negatives", "memory", "size", "dim",
}


def _public_functions(module):
  for name in module.__all__:
    obj = getattr(module, name)
    if inspect.isfunction(obj) or hasattr(obj, "__wrapped__"):
      yield name, obj


MODULES = [similarity, losses]


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__)
def test_all_lists_exactly_the_public_names(module):
  assert len(set(module.__all__)) == len(module.__all__)
  for name in module.__all__:
    assert hasattr(module, name), name
  public = {n for n, v in vars(module).items()
            if not n.startswith("_") and callable(v)
            and getattr(v, "__module__", "").startswith(module.__name__)}
  assert public <= set(module.__all__) | {"compute_dtype", "check_floating",
                                          "check_matrix",
                                          "check_same_features", "safe_sqrt",
                                          "safe_normalize",
                                          "sq_euclidean_matrix"}


def test_top_level_exports():
  assert {"losses", "similarity"} <= set(contrastive_jax.__all__)
  assert contrastive_jax.__version__


@pytest.mark.parametrize(
    "name,fn", [(f"{m.__name__}.{n}", f) for m in MODULES
                for n, f in _public_functions(m)])
def test_signature_and_docstring_conventions(name, fn):
  sig = inspect.signature(fn)
  for param in sig.parameters.values():
    if param.kind in (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD):
      assert param.name in DATA_PARAMS, (
          f"{name}: hyperparameter {param.name!r} must be keyword-only")
    if param.kind == param.KEYWORD_ONLY:
      assert param.default is not inspect.Parameter.empty, (name, param.name)
  doc = inspect.getdoc(fn)
  assert doc, name
  summary = doc.splitlines()[0]
  assert summary.endswith(".") and len(summary) <= 80, name
  assert "Args:" in doc and "Returns:" in doc, name
  for param in sig.parameters:
    assert f"{param}:" in doc, f"{name}: {param} is not documented"
  if name.startswith("contrastive_jax.losses") and "memory" not in name:
    assert "References:" in doc, name
    assert "Examples:" in doc, name


@pytest.mark.parametrize("module_name", [
    "contrastive_jax.losses.triplet", "contrastive_jax.losses.pairs",
    "contrastive_jax.losses.softmax", "contrastive_jax.losses.sigmoid"])
def test_docstring_examples_run(module_name):
  import doctest  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(module_name)
  result = doctest.testmod(module, extraglobs={"jax": jax, "jnp": jnp},
                           optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


MODEL_MODULES = ("autoencoder", "cnn", "conv", "heads", "mlp", "norm", "resnet")


@pytest.mark.parametrize("name", MODEL_MODULES)
def test_model_modules_export_explicitly(name):
  import importlib  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from contrastive_jax import models  # pylint: disable=g-import-not-at-top
  module = importlib.import_module(f"contrastive_jax.models.{name}")
  assert len(set(module.__all__)) == len(module.__all__)
  for export in module.__all__:
    assert hasattr(module, export), export
  # Every public module or function defined here is exported.
  defined = {n for n, v in vars(module).items()
             if not n.startswith("_") and getattr(v, "__module__", "") ==
             module.__name__ and (inspect.isfunction(v) or (
                 inspect.isclass(v) and issubclass(v, nn.Module)))}
  assert defined <= set(module.__all__), defined - set(module.__all__)
  assert set(models.__all__) <= {
      n for m in MODEL_MODULES for n in importlib.import_module(
          f"contrastive_jax.models.{m}").__all__}
