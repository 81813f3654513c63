"""The shared "an int >= n" and "a bool" rules, and that every subpackage
applies them alike."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import data
from contrastive_jax import evaluation
from contrastive_jax import losses
from contrastive_jax import models
from contrastive_jax._checks import check_bool
from contrastive_jax._checks import check_int


@pytest.mark.parametrize("value,minimum", [
    (0, 0), (3, 1), (np.int64(7), 1), (np.int32(0), 0), (-2, -5)])
def test_accepts_ints_at_or_above_minimum(value, minimum):
  out = check_int("n", value, minimum)
  assert out == value and type(out) is int


@pytest.mark.parametrize("value", [
    True, False, np.bool_(True), 2.0, 2.5, "3", None, np.array(3),
    jnp.int32(3), [3]])
def test_refuses_non_ints_with_type_error(value):
  with pytest.raises(TypeError, match=r"^n must be an int >= 1, got "):
    check_int("n", value, 1)


def test_refuses_below_minimum_with_value_error_naming_value_and_hint():
  with pytest.raises(ValueError,
                     match=r"^size must be an int >= 1 \(or None\), got -3\.$"):
    check_int("size", -3, 1, hint=" (or None)")
  with pytest.raises(ValueError, match=r"padding must be an int >= 0, got np.int64\(-1\)"):
    check_int("padding", np.int64(-1), 0)


@pytest.mark.parametrize("value", [True, False, np.bool_(True), np.bool_(False)])
def test_check_bool_accepts_bools(value):
  out = check_bool("flag", value)
  assert out == value and type(out) is bool


@pytest.mark.parametrize("value", [
    0, 1, "False", "yes", None, 1.0, np.array(True), jnp.bool_(True), [True]])
def test_check_bool_refuses_everything_else_with_type_error(value):
  with pytest.raises(TypeError, match=r"^data.tune must be a bool, got "):
    check_bool("data.tune", value)


_X = np.random.RandomState(0).randn(6, 4).astype(np.float32)
_Y = np.array([0, 0, 1, 1, 2, 2])

# One public entry point per subpackage, each given 0 where it needs >= 1.
_ENTRY_POINTS = {
    "losses.nt_xent_loss(block_size=0)": (
        "block_size", lambda: losses.nt_xent_loss(
            jnp.asarray(_X), jnp.asarray(_Y), block_size=0)),
    "losses.create_memory(size=0)": (
        "size", lambda: losses.create_memory(0, 4)),
    "evaluation.knn_classify(k=0)": (
        "k", lambda: evaluation.knn_classify(_X, _X, _Y, k=0)),
    "data.device_eval_batches(batch_size=0)": (
        "batch_size", lambda: next(data.device_eval_batches(
            data.put_on_device(np.zeros((6, 4, 4, 1), np.uint8), _Y),
            batch_size=0))),
    "models.ProjectionHead(num_layers=0)": (
        "num_layers", lambda: models.ProjectionHead(num_layers=0).init(
            jax.random.key(0), jnp.asarray(_X))),
}


@pytest.mark.parametrize("entry", sorted(_ENTRY_POINTS))
def test_every_subpackage_words_the_rule_alike(entry):
  name, call = _ENTRY_POINTS[entry]
  with pytest.raises(ValueError, match=rf"{name} must be an int >= 1"):
    call()
