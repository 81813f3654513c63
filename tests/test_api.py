"""Public API conventions: explicit exports, keyword-only options, docstrings."""

import inspect

import jax
import numpy as np
import pytest

import contrastive_jax
from contrastive_jax import data
from contrastive_jax import evaluation
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


_IMAGES = np.zeros((2, 8, 8, 3), np.uint8)
_EMB = np.random.RandomState(0).randn(6, 4).astype(np.float32)
_LAB = np.array([0, 0, 1, 1, 2, 2])


def _device_data():
  return data.put_on_device(_IMAGES, np.array([0, 1]))


# Every on/off option of the public functions, called with a string: each must
# be a TypeError naming it ("False" is truthy, so it cannot be coerced).
_BOOL_CALLS = {
    ("similarity", "euclidean_distance", "squared"):
        lambda v: similarity.euclidean_distance(_EMB, _EMB, squared=v),
    ("similarity", "pairwise_euclidean_distance", "squared"):
        lambda v: similarity.pairwise_euclidean_distance(_EMB, squared=v),
    ("losses", "info_nce_loss", "symmetric"):
        lambda v: losses.info_nce_loss(_EMB, _EMB, symmetric=v),
    ("evaluation", "knn_class_scores", "exclude_self"):
        lambda v: evaluation.knn_class_scores(_EMB, _EMB, _LAB, k=1,
                                              exclude_self=v),
    ("evaluation", "knn_classify", "exclude_self"):
        lambda v: evaluation.knn_classify(_EMB, _EMB, _LAB, k=1,
                                          exclude_self=v),
    ("evaluation", "knn_accuracy", "exclude_self"):
        lambda v: evaluation.knn_accuracy(_EMB, _LAB, _EMB, _LAB, ks=(1,),
                                          exclude_self=v),
    ("evaluation", "retrieval_metrics", "ref_includes_query"):
        lambda v: evaluation.retrieval_metrics(_EMB, _LAB, ref_includes_query=v),
    ("evaluation", "retrieval_metrics", "cluster"):
        lambda v: evaluation.retrieval_metrics(_EMB, _LAB, cluster=v),
    ("evaluation", "bit_balance", "per_bit"):
        lambda v: evaluation.bit_balance(np.sign(_EMB), per_bit=v),
    ("evaluation", "plot_confusion_matrix", "normalize"):
        lambda v: evaluation.plot_confusion_matrix(
            np.eye(2), "unused.png", class_names=["a", "b"], normalize=v),
    ("data", "apply_augment", "cutout_inside"):
        lambda v: data.apply_augment(
            _IMAGES, np.zeros((2, 1, 5)),
            augment="crop_flip_cutout", cutout_inside=v),
    ("data", "augment_views", "cutout_inside"):
        lambda v: data.augment_views(jax.random.key(0), _IMAGES,
                                     augment="crop_flip_cutout", cutout_inside=v),
    ("data", "crop_flip_cutout", "cutout_inside"):
        lambda v: data.crop_flip_cutout(jax.random.key(0), _IMAGES,
                                        cutout_inside=v),
    ("data", "device_batches", "cutout_inside"):
        lambda v: next(data.device_batches(
            _device_data(), key=jax.random.key(0), batch_size=2,
            augment="crop_flip_cutout", cutout_inside=v)),
    ("data", "make_batch", "cutout_inside"):
        lambda v: data.make_batch(jax.random.key(0), _device_data(),
                                  np.array([0, 1]), 0,
                                  augment="crop_flip_cutout", cutout_inside=v),
    ("data", "sample_batch", "cutout_inside"):
        lambda v: data.sample_batch(jax.random.key(0), _device_data(), 0,
                                    batch_size=2, augment="crop_flip_cutout",
                                    cutout_inside=v),
    ("data", "load_split_arrays", "download"):
        lambda v: data.load_split_arrays("digits", "train", download=v),
    ("data", "load_device_data", "download"):
        lambda v: data.load_device_data("digits", "train", download=v),
}
for _flag in ("train", "cutout_inside", "normalize", "cache", "download"):
  _BOOL_CALLS[("data", "build_tf_dataset", _flag)] = (
      lambda v, f=_flag: data.build_tf_dataset(
          "digits", "train", global_batch_size=8, **{f: v}))


def test_every_on_off_option_is_in_the_bool_table():
  """A new bool option must join ``_BOOL_CALLS`` (and so be checked)."""
  found = set()
  for module in (similarity, losses, evaluation, data):
    short = module.__name__.rsplit(".", 1)[-1]
    for name, fn in _public_functions(module):
      for p in inspect.signature(fn).parameters.values():
        if "bool" in str(p.annotation) or isinstance(p.default, bool):
          found.add((short, name, p.name))
  assert found == set(_BOOL_CALLS), found ^ set(_BOOL_CALLS)


@pytest.mark.parametrize("entry", sorted(_BOOL_CALLS), ids="-".join)
def test_on_off_options_refuse_non_bools(entry):
  call = _BOOL_CALLS[entry]
  with pytest.raises(TypeError, match=rf"^{entry[2]} must be a bool, got 'no'"):
    call("no")


# Constructor arguments and a sample input for each public flax module.
_MODULE_CALLS = {
    "MLP": ({}, (2, 6)), "SmallCNN": ({}, (2, 8, 8, 3)),
    "FastCNN": ({}, (2, 8, 8, 3)), "ResNet": ({}, (2, 8, 8, 3)),
    "ResNet18": ({}, (2, 8, 8, 3)), "ResNet34": ({}, (2, 8, 8, 3)),
    "ResNet50": ({}, (2, 8, 8, 3)), "BasicBlock": ({"features": 4}, (2, 4, 4, 4)),
    "Bottleneck": ({"features": 4}, (2, 4, 4, 16)), "BatchNormAct": ({}, (2, 4)),
    "ConvAutoencoder": ({}, (2, 8, 8, 1)), "ProjectionHead": ({}, (2, 6)),
    "ClassifierHead": ({"num_classes": 3}, (2, 6)), "HashHead": ({}, (2, 6)),
}


def _module_bools():
  import dataclasses  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from contrastive_jax import models  # pylint: disable=g-import-not-at-top
  out = []
  for name in models.__all__:
    cls = getattr(models, name)
    if inspect.isclass(cls) and issubclass(cls, nn.Module):
      out += [(name, f.name) for f in dataclasses.fields(cls)
              if f.type in (bool, "bool")]
      if "train" in inspect.signature(cls.__call__).parameters:
        out.append((name, "train"))
  return out


def test_every_module_is_in_the_module_table():
  """Each public module has a bool field or ``train``, so each is covered."""
  assert {name for name, _ in _module_bools()} == set(_MODULE_CALLS)


@pytest.mark.parametrize("entry", _module_bools(), ids="-".join)
def test_module_on_off_fields_and_train_refuse_non_bools(entry):
  from contrastive_jax import models  # pylint: disable=g-import-not-at-top
  name, option = entry
  kwargs, shape = _MODULE_CALLS[name]
  x = np.zeros(shape, np.float32)
  if option == "train":
    module, call, match = getattr(models, name)(**kwargs), {"train": "no"}, "train"
  else:
    module = getattr(models, name)(**kwargs, **{option: "no"})
    call, match = {}, f"{name}.{option}"
  with pytest.raises(TypeError, match=rf"^{match} must be a bool, got 'no'"):
    module.init(jax.random.key(0), x, **call)


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
