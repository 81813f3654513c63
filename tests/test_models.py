"""Tests for contrastive_jax.models: shapes, parameter counts, BatchNorm modes, dtypes, hashing."""

import functools

import flax.linen as nn
import jax
from jax import lax
from jax import test_util as jtu
import jax.numpy as jnp
import numpy as np
import pytest

from contrastive_jax import models
from contrastive_jax.models import (
    MLP,
    BasicBlock,
    Bottleneck,
    ClassifierHead,
    ConvAutoencoder,
    FastCNN,
    HashHead,
    ProjectionHead,
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    SmallCNN,
    hash_scale,
    patch_whitening_kernel,
    reconstruction_loss,
)
from experiments.benchmarks import saved_residuals

CIFAR = (2, 32, 32, 3)
DIGITS = (2, 8, 8, 1)


def _shapes(model, shape, **kwargs):
    """(variables, output) shape trees via eval_shape: nothing is computed or compiled."""
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables, x)
    return variables, out


@functools.cache
def _resnet_shapes(cls, shape):
    # Tracing a full-size ResNet takes a second or two; share it between tests.
    return _shapes(cls(), shape)


def _init(model, x, seed=0, **kwargs):
    """Variables with the structure of ``model.init`` but filled by NumPy.

    Real initialisation compiles a truncated-normal sampler per parameter shape,
    which costs seconds each on a small CPU; ``model.init`` itself is still
    traced through ``eval_shape``. Kernels get fan-in scaled normals, BN
    scales/vars ones, biases/means small noise so train and eval modes differ.
    """
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, **kwargs), x)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        elif name in ("scale", "var"):
            value = np.ones(leaf.shape)
        else:
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _apply(model, variables, *args, **kwargs):
    """``model.apply`` compiled as one program: far fewer compilations than op-by-op dispatch."""
    return jax.jit(functools.partial(model.apply, **kwargs))(variables, *args)


def _num_params(variables):
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))


def _tiny_resnet(**kwargs):
    # Two stages, width 4: exercises stem, blocks, shortcut and pooling cheaply.
    return ResNet(stage_sizes=(1, 1), num_filters=4, **kwargs)


def _images(shape, seed=0):
    # NumPy rather than jax.random: compiling a sampler per shape is slow on CPU.
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_all_exports_resolve():
    for name in models.__all__:
        assert hasattr(models, name), name


@pytest.mark.parametrize("shape", [CIFAR, DIGITS, (2, 10)])
def test_mlp_shapes(shape):
    model = MLP.small(output_dim=16)
    assert tuple(model.hidden_dims) == (128, 64)
    variables, out = _shapes(model, shape)
    assert out.shape == (2, 16)
    assert variables["params"]["hidden_0"]["kernel"].shape[1] == 128
    assert variables["params"]["hidden_1"]["kernel"].shape[1] == 64


@pytest.mark.parametrize("shape,pooling,fan_in", [
    (CIFAR, "flatten", 8 * 8 * 128),  # the design documents' 8x8x128 map
    (DIGITS, "flatten", 2 * 2 * 128),
    (CIFAR, "global", 128),
    (DIGITS, "global", 128),
])
def test_small_cnn_shapes(shape, pooling, fan_in):
    variables, out = _shapes(SmallCNN(embedding_dim=32, pooling=pooling), shape)
    assert out.shape == (2, 32)
    assert variables["params"]["embedding"]["kernel"].shape == (fan_in, 32)


def test_small_cnn_rejects_unknown_pooling():
    with pytest.raises(ValueError, match="pooling"):
        _shapes(SmallCNN(pooling="avg"), DIGITS)


@pytest.mark.parametrize("shape,stem", [(CIFAR, 32), (CIFAR, 0), (DIGITS, 0), ((2, 7, 7, 3), 0)])
def test_fast_cnn_shapes(shape, stem):
    variables, out = _shapes(FastCNN(widths=(8, 16, 24), stem_width=stem), shape)
    assert out.shape == (2, 24)
    assert ("stem" in variables["params"]) == bool(stem)
    # conv1 c->8, conv2 8->8, 8->16, 16->16, 16->24, 24->24 (3x3, no bias) + BN.
    c = shape[-1]
    convs = 9 * (c * 8 + 8 * 8 + 8 * 16 + 16 * 16 + 16 * 24 + 24 * 24)
    bn = 2 * 2 * (8 + 16 + 24)
    if stem:
        convs += 9 * (c * stem + stem * 8 - c * 8)
        bn += 2 * stem
    assert _num_params(variables) == convs + bn


def test_fast_cnn_pool_matches_flax_max_pool():
    from contrastive_jax.models import cnn
    x = _images((2, 6, 4, 3))
    np.testing.assert_array_equal(
        cnn._max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME"))
    x = _images((2, 5, 5, 3))  # odd sizes round up, as "SAME" does
    assert cnn._max_pool_2x2(x).shape == (2, 3, 3, 3)


def test_fast_cnn_batchnorm_train_vs_eval():
    model = FastCNN(widths=(4, 4, 4), stem_width=0)
    x = _images((4, 8, 8, 3))
    variables = _init(model, x)
    train, _ = _apply(model, variables, x, train=True, mutable=["batch_stats"])
    evald = _apply(model, variables, x, train=False)
    assert train.shape == evald.shape == (4, 4)
    assert not np.allclose(train, evald)


def _patches_f64(x, k):
    """All k x k patches of NHWC ``x``, flattened in (C, kh, kw) order, float64."""
    x = np.asarray(x, np.float64)
    n, h, w, c = x.shape
    out = [x[:, i:i + k, j:j + k, :].transpose(0, 3, 1, 2).reshape(n, -1)
           for i in range(h - k + 1) for j in range(w - k + 1)]
    return np.concatenate(out, axis=0)


@pytest.mark.parametrize("k,channels", [(2, 3), (3, 1)])
def test_patch_whitening_kernel_against_numpy(k, channels):
    """W W^T = (C + eps I)^-1 for the patch covariance C (sign-free), and the
    second half of the filters is the first negated."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 7, 7, channels))
    x[..., 0] += 1.0  # uncentred, as airbench's estimate
    if channels == 3:
        x[..., 1] += 0.8 * x[..., 0]  # correlated channels
    eps = 1e-2
    kernel = np.asarray(patch_whitening_kernel(jnp.asarray(x, jnp.float32), kernel_size=k,
                                               eps=eps), np.float64)
    d = k * k * channels
    assert kernel.shape == (k, k, channels, 2 * d)
    np.testing.assert_array_equal(kernel[..., d:], -kernel[..., :d])
    w = kernel[..., :d].transpose(2, 0, 1, 3).reshape(d, d)  # rows in (C, kh, kw) order
    p = _patches_f64(x, k)
    cov = p.T @ p / len(p)
    np.testing.assert_allclose(w @ w.T, np.linalg.inv(cov + eps * np.eye(d)), rtol=2e-3, atol=1e-4)
    # Strongest direction first: the filters' norms 1/sqrt(l + eps) grow.
    norms = np.linalg.norm(w, axis=0)
    assert np.all(np.diff(norms) >= -1e-6)


def test_patch_whitening_kernel_bad_input():
    with pytest.raises(ValueError, match=r"\[N, H, W, C\]"):
        patch_whitening_kernel(jnp.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="kernel_size"):
        patch_whitening_kernel(jnp.zeros((2, 4, 4, 3)), kernel_size=5)


def test_fast_cnn_whitening_layer_is_a_fixed_statistic():
    """The whitening filters come from the init images, live in batch_stats,
    get no gradient and pass through a training step unchanged; its bias trains."""
    model = FastCNN(widths=(4, 4, 4), stem_width=0, whiten_size=2)
    x = _images((8, 8, 8, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
    kernel = variables["batch_stats"]["whiten_kernel"]
    np.testing.assert_allclose(kernel, patch_whitening_kernel(x), rtol=1e-5, atol=1e-5)
    assert "whiten_kernel" not in variables["params"]
    assert variables["params"]["group0_conv1"]["kernel"].shape == (3, 3, 24, 4)

    def loss(params):
        out, upd = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                               x, train=True, mutable=["batch_stats"])
        return jnp.sum(out ** 2), upd

    grads, upd = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    np.testing.assert_array_equal(upd["batch_stats"]["whiten_kernel"], kernel)
    assert np.any(np.asarray(grads["whiten_bias"]) != 0)
    # Degenerate init (all-zero images, as a restore target): finite.
    zeros = jax.jit(lambda x: model.init(jax.random.key(0), x))(jnp.zeros((1, 8, 8, 3)))
    assert np.all(np.isfinite(zeros["batch_stats"]["whiten_kernel"]))


AIRBENCH96 = dict(widths=(8, 16, 16), stem_width=0, whiten_size=2, whiten_padding="VALID",
                  convs_per_group=3, norm_scale=False, norm_epsilon=1e-12, torch_init=True,
                  gelu_approximate=False)


def test_fast_cnn_airbench96_layout():
    """Three convolutions per group, BatchNorm biases only, airbench's sizes."""
    model = FastCNN(**AIRBENCH96)
    x = _images((4, 32, 32, 3))
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x))(x)
    params = variables["params"]
    assert set(params["group1_norm3"]) == {"bias"}  # no trained scale
    # whitening bias; per group 3 convs (3x3, no bias) and 3 BN biases.
    widths, c_in, expected = (8, 16, 16), 24, 24
    for w in widths:
        expected += 9 * (c_in * w + 2 * w * w) + 3 * w
        c_in = w
    assert _num_params(variables) == expected
    out = model.apply(variables, x)
    assert out.shape == (4, 16)
    # "VALID" whitening then floor pooling (32 -> 31 -> 15 -> 7 -> 3): the
    # last input row and column reach only a dropped row / column.
    y = x.at[:, 31, :, :].set(5.0).at[:, :, 31, :].set(-5.0)
    np.testing.assert_allclose(model.apply(variables, y), out, rtol=1e-6)
    _, inter = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    sizes = [inter["intermediates"][f"group{i}_conv1"]["__call__"][0].shape[1:3]
             for i in range(3)]
    assert sizes == [(31, 31), (15, 15), (7, 7)]
    # The default ("SAME") layout does see the last row.
    same = FastCNN(**dict(AIRBENCH96, whiten_padding="SAME"))
    v2 = jax.jit(lambda x: same.init(jax.random.key(0), x))(x)
    assert not np.allclose(same.apply(v2, y), same.apply(v2, x))


def test_fast_cnn_airbench96_residual_pair():
    """conv1 -> pool -> BN -> GELU = x0; GELU(BN(conv3(GELU(BN(conv2(x0))))) + x0)."""
    model = FastCNN(**dict(AIRBENCH96, widths=(4, 4, 4), whiten_size=0))
    x = _images((3, 8, 8, 4))
    variables = jax.jit(lambda x: model.init(jax.random.key(1), x))(x)
    p = variables["params"]

    def conv(h, name):
        return jax.lax.conv_general_dilated(h, p[name]["kernel"], (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def bn(h, name):  # train mode: batch statistics, scale 1
        m, v = h.mean((0, 1, 2)), h.var((0, 1, 2))
        return (h - m) / jnp.sqrt(v + 1e-12) + p[name]["bias"]

    gelu = functools.partial(jax.nn.gelu, approximate=False)  # PyTorch's nn.GELU()
    h = x
    for i in range(3):
        h = conv(h, f"group{i}_conv1")
        b, hh, ww, c = h.shape
        h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).max((2, 4))
        x0 = gelu(bn(h, f"group{i}_norm1"))
        h = gelu(bn(conv(x0, f"group{i}_conv2"), f"group{i}_norm2"))
        h = gelu(bn(conv(h, f"group{i}_conv3"), f"group{i}_norm3") + x0)
    want = h.max((1, 2))
    got, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_torch_dirac_init():
    from contrastive_jax.models import cnn
    w = np.asarray(cnn.torch_dirac_init(jax.random.key(0), (3, 3, 5, 12)))
    ident = np.zeros((3, 3, 5, 5))
    ident[1, 1, np.arange(5), np.arange(5)] = 1.0
    np.testing.assert_array_equal(w[..., :5], ident)  # filter i copies channel i
    rest = w[..., 5:]
    bound = 1.0 / np.sqrt(9 * 5)  # PyTorch: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.all(np.abs(rest) <= bound) and np.abs(rest).max() > 0.8 * bound
    assert abs(rest.std() - bound / np.sqrt(3)) < 0.15 * bound


def test_classifier_head_scale_and_bias_options():
    head = ClassifierHead(num_classes=3, use_bias=False, logit_scale=1 / 9, torch_init=True)
    x = _images((2, 6))
    variables = head.init(jax.random.key(0), x)
    assert set(variables["params"]["logits"]) == {"kernel"}
    kernel = variables["params"]["logits"]["kernel"]
    assert np.all(np.abs(kernel) <= 1 / np.sqrt(6))
    # With a bias, torch_init draws it as nn.Linear does, from the same range.
    bias = ClassifierHead(num_classes=500, torch_init=True).init(
        jax.random.key(0), x)["params"]["logits"]["bias"]
    assert np.all(np.abs(bias) <= 1 / np.sqrt(6)) and np.abs(bias).max() > 0.9 / np.sqrt(6)
    np.testing.assert_allclose(head.apply(variables, x), (x @ kernel) / 9, rtol=1e-6)


def test_fast_cnn_bad_options():
    with pytest.raises(ValueError, match="convs_per_group"):
        _shapes(FastCNN(widths=(4, 4, 4), convs_per_group=4), CIFAR)
    with pytest.raises(ValueError, match="whiten_padding"):
        _shapes(FastCNN(widths=(4, 4, 4), whiten_padding="FULL"), CIFAR)


@pytest.mark.parametrize("cls,dim", [(ResNet18, 512), (ResNet34, 512), (ResNet50, 2048)])
def test_resnet_output_shapes(cls, dim):
    assert cls().feature_dim == dim
    variables, out = _resnet_shapes(cls, CIFAR)
    assert out.shape == (2, dim)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 3, 64)  # CIFAR stem


def test_resnet_on_digits():
    variables, out = _resnet_shapes(ResNet18, DIGITS)
    assert out.shape == (2, 512)
    assert variables["params"]["stem_conv"]["kernel"].shape == (3, 3, 1, 64)


@pytest.mark.parametrize("cls,count", [
    # torchvision's 11,689,512 / 21,797,672 / 25,557,032 less the ImageNet
    # stem's 7x7 conv (+ the CIFAR 3x3) and the 1000-way FC: exact, so a
    # missing BatchNorm (ResNet-18 has 9,600 BN parameters) cannot pass.
    (ResNet18, 11_168_832),
    (ResNet34, 21_276_992),
    (ResNet50, 23_500_352),
])
def test_resnet_param_counts(cls, count):
    variables, _ = _resnet_shapes(cls, CIFAR)
    assert _num_params(variables) == count


@pytest.mark.parametrize("model", [ResNet18(), FastCNN(widths=(4, 4, 4)), SmallCNN(),
                                   MLP.small(output_dim=4)])
def test_unbatched_input_is_refused(model):
    shape = (64,) if isinstance(model, MLP) else (32, 32, 3)
    with pytest.raises(ValueError, match=r"expects \(batch.*\(" + str(shape[0])):
        _shapes(model, shape)


@pytest.mark.parametrize("head", [ProjectionHead(hidden_dim=8, output_dim=4),
                                  ClassifierHead(num_classes=3), HashHead(num_bits=8)])
def test_heads_refuse_a_lone_vector(head):
    # (A ProjectionHead would batch-normalise it over nothing: all zeros.)
    with pytest.raises(ValueError, match=r"shape \(batch, features\), got shape \(20,\)"):
        _shapes(head, (20,))


@pytest.mark.parametrize("make", [
    lambda fast: SmallCNN(features=(4, 8), embedding_dim=4, cpu_kernel_grad=fast),
    lambda fast: FastCNN(widths=(4, 4, 4), cpu_kernel_grad=fast),
    lambda fast: ResNet(stage_sizes=(1, 1), num_filters=4, cpu_kernel_grad=fast)])
def test_cpu_kernel_grad_false_allows_forward_mode(make):
    x = _images((2, 8, 8, 3))
    variables = _init(make(True), x)
    fast = lambda x: _apply(make(True), variables, x)
    plain = lambda x: _apply(make(False), variables, x)
    np.testing.assert_allclose(fast(x), plain(x), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(fast, (x,), (x,))
    _, tangent = jax.jvp(plain, (x,), (x,))
    eps = 1e-2
    finite = (plain(x * (1 + eps)) - plain(x * (1 - eps))) / (2 * eps)
    np.testing.assert_allclose(tangent, finite, rtol=0.05, atol=0.05 * np.abs(finite).max())


def test_resnet_imagenet_stem_shapes():
    variables, out = _shapes(ResNet18(stem="imagenet"), (1, 64, 64, 3))
    assert out.shape == (1, 512)
    assert variables["params"]["stem_conv"]["kernel"].shape == (7, 7, 3, 64)


def test_resnet_block_types():
    variables, _ = _resnet_shapes(ResNet50, CIFAR)
    block = variables["params"]["stage1_block1"]
    assert block["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert Bottleneck.expansion == 4 and BasicBlock.expansion == 1


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck])
def test_batchnorm_train_vs_eval(block_cls):
    model = _tiny_resnet(block_cls=block_cls)
    x = _images((4, 8, 8, 3))
    variables = _init(model, x)
    eval_out = _apply(model, variables, x, train=False)
    train_out, updates = _apply(model, variables, x, train=True, mutable=["batch_stats"])
    assert train_out.shape == eval_out.shape == (4, model.feature_dim)
    # Training normalises with this batch's statistics, eval with the running ones.
    assert not np.allclose(train_out, eval_out, atol=1e-4)
    old = jax.tree.leaves(variables["batch_stats"])
    new = jax.tree.leaves(updates["batch_stats"])
    assert len(old) == len(new) > 0
    assert any(not np.allclose(a, b) for a, b in zip(old, new))


@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck])
def test_resnet_torch_init_reaches_every_convolution(block_cls):
    """``torch_init``: every conv kernel (stem, blocks, projection shortcuts)
    is PyTorch's uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)); the default stays
    He normal with fan-out (std sqrt(2 / fan_out))."""
    x = jnp.ones((1, 8, 8, 3))
    key = jax.random.key(0, impl="rbg")
    kernels = {}
    for torch_init in (False, True):
        model = ResNet(stage_sizes=(1, 1), num_filters=16, block_cls=block_cls,
                       torch_init=torch_init)
        params = jax.jit(model.init)(key, x)["params"]
        kernels[torch_init] = {
            "/".join(k.key for k in path): np.asarray(w)
            for path, w in jax.tree_util.tree_leaves_with_path(params)
            if path[-1].key == "kernel"}
    assert kernels[True].keys() == kernels[False].keys()
    assert any("shortcut_conv" in k for k in kernels[True])
    for name, w in kernels[True].items():
        *window, cin, cout = w.shape
        bound = 1.0 / np.sqrt(np.prod(window) * cin)
        assert np.abs(w).max() <= bound, name
        if w.size >= 500:  # enough draws for the spread to say which init
            assert abs(w.std() - bound / np.sqrt(3)) < 0.15 * bound, name
            he = np.sqrt(2.0 / (np.prod(window) * cout))
            assert abs(kernels[False][name].std() - he) < 0.15 * he, name


def test_zero_init_residual():
    # One real (tiny) initialisation: identity shortcut, a single kernel shape.
    block = BasicBlock(features=2, zero_init_residual=True)
    key = jax.random.key(0, impl="rbg")  # RBG samplers compile faster than threefry.
    params = jax.jit(block.init)(key, jnp.ones((1, 4, 4, 2)))["params"]
    np.testing.assert_array_equal(params["norm2"]["scale"], 0.0)
    np.testing.assert_array_equal(params["norm1"]["scale"], 1.0)
    # Bottleneck: its last BN (norm3) starts at 0; the projection shortcut's does not.
    block = Bottleneck(features=2, strides=2, zero_init_residual=True)
    params = jax.jit(block.init)(key, jnp.ones((1, 4, 4, 3)))["params"]
    np.testing.assert_array_equal(params["norm3"]["scale"], 0.0)
    np.testing.assert_array_equal(params["norm2"]["scale"], 1.0)
    shortcut_norms = [k for k in params if "norm" in k and k not in ("norm1", "norm2", "norm3")]
    assert shortcut_norms
    for k in shortcut_norms:
        np.testing.assert_array_equal(params[k]["scale"], 1.0)


@pytest.mark.parametrize("make,shape", [
    (lambda dt: _tiny_resnet(block_cls=Bottleneck, dtype=dt), (2, 8, 8, 3)),
    (lambda dt: ProjectionHead(hidden_dim=16, output_dim=8, dtype=dt), (4, 12)),
])
def test_bfloat16_matches_float32(make, shape):
    x = _images(shape)
    f32, bf16 = make(jnp.float32), make(jnp.bfloat16)
    variables = _init(bf16, x)
    for leaf in jax.tree.leaves(variables):
        assert leaf.dtype == jnp.float32
    ref = _apply(f32, variables, x, train=False)
    out = _apply(bf16, variables, x, train=False)
    assert out.dtype == jnp.bfloat16 and ref.dtype == jnp.float32
    rel = jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
    assert rel < 3e-2, rel


def _saved_residual_kinds(fn, *args):
    """``{"f32", "bf16", "bool", ...}`` of the activation-sized residuals ``fn``'s VJP saves."""
    return set(saved_residuals.saved_residual_bytes(fn, *args, min_elements=1024))


@pytest.mark.parametrize("backward", ["remat", "custom"])
@pytest.mark.parametrize("block_cls", [BasicBlock, Bottleneck])
def test_norm_backward_is_the_same_function_with_fewer_saved_bytes(block_cls, backward):
    x = _images((4, 8, 8, 3))
    make = functools.partial(_tiny_resnet, block_cls=block_cls)
    variables = _init(make(), x)
    # Same variables, same names: checkpoints load in either mode.
    assert (jax.tree.structure(variables)
            == jax.tree.structure(_init(make(norm_backward=backward), x)))

    def loss(model, params, x):
        out, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                   x, train=True, mutable=["batch_stats"])
        return jnp.sum(jnp.square(out.astype(jnp.float32))), updates

    def value_and_grad(model):
        fn = jax.value_and_grad(functools.partial(loss, model), argnums=(0, 1), has_aux=True)
        return jax.tree.map(lambda a: np.asarray(a, np.float64),
                            jax.jit(fn)(variables["params"], x))

    f32 = value_and_grad(make())
    # float32: "remat" repeats the forward pass's operations exactly; "custom"
    # is the same gradient written out, equal up to rounding.
    for got, want in zip(jax.tree.leaves(value_and_grad(make(norm_backward=backward))),
                         jax.tree.leaves(f32)):
        if backward == "remat":
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
    # bfloat16: they round at other points; neither is further from float32.
    plain = make(dtype=jnp.bfloat16)
    other = make(dtype=jnp.bfloat16, norm_backward=backward)
    want = np.concatenate([a.ravel() for a in jax.tree.leaves(f32)])
    err = {}
    for name, m in (("autodiff", plain), (backward, other)):
        got = np.concatenate([a.ravel() for a in jax.tree.leaves(value_and_grad(m))])
        err[name] = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err[backward] <= 1.25 * err["autodiff"], err
    # Autodiff keeps float32 normalisation intermediates and ReLU masks; the
    # other two keep only bfloat16 activations (and per-channel statistics).
    kinds = [_saved_residual_kinds(lambda p, x: loss(m, p, x)[0], variables["params"], x)
             for m in (plain, other)]
    assert {"f32", "bool"} <= kinds[0], kinds[0]
    assert kinds[1] == {"bf16"}, kinds[1]


@pytest.mark.parametrize("backward", models.norm.BACKWARDS)
def test_batch_norm_act_matches_batchnorm_add_relu(backward):
    x, r = _images((6, 5)), _images((6, 5), seed=1)
    ref = nn.BatchNorm(use_running_average=False)
    fused = models.batch_norm_act(backward=backward, use_running_average=False)
    variables = _init(ref, x)
    want, want_stats = _apply(ref, variables, x, mutable=["batch_stats"])
    got, got_stats = _apply(fused, variables, x, r, mutable=["batch_stats"])
    np.testing.assert_allclose(got, np.maximum(np.asarray(want) + np.asarray(r), 0.0),
                               rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree.leaves(got_stats), jax.tree.leaves(want_stats)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    evaluate = models.batch_norm_act(backward=backward, relu=False, use_running_average=True)
    np.testing.assert_allclose(_apply(evaluate, variables, x),
                               _apply(nn.BatchNorm(use_running_average=True), variables, x),
                               rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="residual shape"):
        _apply(fused, variables, x, r[:3], mutable=["batch_stats"])


def test_batch_norm_act_rejects_bad_options():
    with pytest.raises(ValueError, match="backward must be one of"):
        models.batch_norm_act(backward="fast")
    odd = models.batch_norm_act(backward="custom", use_running_average=False, use_bias=False)
    x = _images((6, 5))
    with pytest.raises(ValueError, match="custom_vjp=True"):
        _apply(odd, _init(odd, x), x, mutable=["batch_stats"])


def test_custom_backward_check_grads_float64():
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(7, 3)))
        r = jnp.asarray(rng.normal(size=(7, 3)))
        w = jnp.asarray(rng.normal(size=(7, 3)))
        module = models.batch_norm_act(backward="custom", relu=False,
                                       use_running_average=False, dtype=jnp.float64,
                                       param_dtype=jnp.float64)
        variables = module.init(jax.random.key(0), x, r)

        def f(x, scale, bias, r):
            params = {"scale": scale, "bias": bias}
            out, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                  x, r, mutable=["batch_stats"])
            return jnp.sum(w * out + jnp.square(out))

        scale = jnp.asarray(rng.normal(size=3))
        bias = jnp.asarray(rng.normal(size=3))
        jtu.check_grads(f, (x, scale, bias, r), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_custom_backward_under_axis_name_matches_the_full_batch():
    # Two shards under vmap(axis_name) against one batch of 8 under autodiff:
    # the input gradient needs the global sums, the parameters the local ones.
    x, r, w = (_images((8, 5), seed=s) for s in range(3))
    ref = models.batch_norm_act(use_running_average=False)
    synced = models.batch_norm_act(backward="custom", use_running_average=False,
                                   axis_name="shards")
    variables = _init(ref, x)

    def loss(module, params, x, r, w):
        out, _ = module.apply({"params": params, "batch_stats": variables["batch_stats"]},
                              x, r, mutable=["batch_stats"])
        return jnp.sum(w * out)

    def sharded(params, x, r, w):
        split = lambda a: a.reshape(2, 4, 5)
        per_shard = jax.vmap(functools.partial(loss, synced), in_axes=(None, 0, 0, 0),
                             axis_name="shards")(params, split(x), split(r), split(w))
        return jnp.sum(per_shard)

    want = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2)))(
        variables["params"], x, r, w)
    got = jax.jit(jax.grad(sharded, argnums=(0, 1, 2)))(variables["params"], x, r, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_custom_backward_under_shard_map_matches_autodiff():
    # The train step's pattern: replicated parameters, a sharded batch, a
    # pmean'd loss; autodiff sums the replicated parameters' gradients over
    # the shards, and the custom backward pass must do the same.
    from contrastive_jax.training import loop  # pylint: disable=g-import-not-at-top
    from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
    mesh = loop.make_mesh(2)
    x, r, w = (_images((8, 5), seed=s) for s in range(3))
    grads = []
    for backward in ("autodiff", "custom"):
        module = models.batch_norm_act(backward=backward, use_running_average=False,
                                       axis_name="data")
        variables = _init(module, x)

        def per_device(params, x, r, w, module=module, variables=variables):
            def loss(params, x, r):
                out, _ = module.apply({"params": params,
                                       "batch_stats": variables["batch_stats"]},
                                      x, r, mutable=["batch_stats"])
                return lax.pmean(jnp.sum(w * out), "data")
            return jax.grad(loss, argnums=(0, 1, 2))(params, x, r)

        fn = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data"), P("data")),
                           out_specs=(P(), P("data"), P("data")))
        grads.append(jax.jit(fn)(variables["params"], x, r, w))
    for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["projection_head", "resnet", "resnet_remat",
                                  "resnet_custom"])
def test_batchnorm_axis_name_synchronises_stats(name):
    if name == "projection_head":
        make, shape = lambda axis: ProjectionHead(8, 4, final_bn=True, axis_name=axis), (12,)
    else:
        backward = name.split("_")[1] if "_" in name else "autodiff"
        make, shape = (lambda axis: _tiny_resnet(axis_name=axis, norm_backward=backward),
                       (6, 6, 3))
    num_shards, per_shard = 2, 3
    x = _images((num_shards * per_shard, *shape)) + 1.0
    model, synced = make(None), make("batch")
    variables = _init(model, x)

    def step(m, xs):
        return m.apply(variables, xs, train=True, mutable=["batch_stats"])

    full_out, full_stats = jax.jit(functools.partial(step, model))(x)
    shards = x.reshape((num_shards, per_shard, *shape))
    out, stats = jax.jit(jax.vmap(functools.partial(step, synced), axis_name="batch"))(shards)
    np.testing.assert_allclose(out.reshape(full_out.shape), full_out, rtol=1e-4, atol=1e-5)
    for got, want in zip(jax.tree.leaves(stats), jax.tree.leaves(full_stats)):
        # Every shard ends up with the global-batch statistics.
        np.testing.assert_allclose(got, jnp.broadcast_to(want, got.shape), rtol=1e-4, atol=1e-5)

    if name == "projection_head":
        # Sanity check of the test: without the axis a shard sees only its own examples.
        _, local = jax.jit(jax.vmap(functools.partial(step, model)))(shards)
        assert any(not np.allclose(a[0], b, atol=1e-5)
                   for a, b in zip(jax.tree.leaves(local), jax.tree.leaves(full_stats)))


@pytest.mark.parametrize("num_layers,final_bn", [(1, False), (2, False), (3, True)])
def test_projection_head(num_layers, final_bn):
    head = ProjectionHead(hidden_dim=32, output_dim=8, num_layers=num_layers, final_bn=final_bn)
    variables, out = _shapes(head, (2, 16))
    assert out.shape == (2, 8)
    dense = [k for k in variables["params"] if "kernel" in variables["params"][k]]
    assert len(dense) == num_layers
    assert ("batch_stats" in variables) == (num_layers > 1 or final_bn)


def test_classifier_head():
    variables, out = _shapes(ClassifierHead(num_classes=10), (2, 512))
    assert out.shape == (2, 10)
    assert variables["params"]["logits"]["kernel"].shape == (512, 10)


def test_hash_head_train_and_eval():
    head = HashHead(num_bits=16)
    # Moderate pre-activations: in float32 tanh rounds to exactly +-1 beyond ~9.
    x = 0.1 * _images((5, 12))
    variables = _init(head, x)
    scale = hash_scale(1000)
    relaxed = _apply(head, variables, x, scale=scale, train=True)
    assert relaxed.shape == (5, 16)
    assert jnp.all(jnp.abs(relaxed) < 1.0)
    codes = _apply(head, variables, x, train=False)
    assert set(np.unique(np.asarray(codes)).tolist()) <= {-1.0, 1.0}
    # A large scale makes the relaxation agree with the binary codes.
    np.testing.assert_array_equal(jnp.sign(_apply(head, variables, x, scale=1e4, train=True)),
                                  codes)
    # +-1 codes give Hamming distance (K - <b1, b2>) / 2.
    hamming = (16 - codes @ codes.T) / 2
    bits = np.asarray(codes) > 0
    expected = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    np.testing.assert_array_equal(hamming, expected)


def test_hash_head_zero_maps_to_plus_one():
    head = HashHead(num_bits=4)
    variables = jax.tree.map(jnp.zeros_like, _init(head, jnp.ones((1, 3))))
    np.testing.assert_array_equal(head.apply(variables, jnp.ones((1, 3))), 1.0)


def test_hash_scale_schedule():
    assert float(hash_scale(0)) == 1.0
    np.testing.assert_allclose(hash_scale(200, initial=2.0, growth=0.005), 2.0 * 2.0**0.5)
    assert float(hash_scale(1000)) > float(hash_scale(100)) > 1.0
    # Staircase: constant within a window of `every` steps.
    assert float(hash_scale(199, every=200)) == 1.0
    np.testing.assert_allclose(jax.jit(hash_scale)(jnp.asarray(200)), 2.0**0.5, rtol=1e-6)


@pytest.mark.parametrize("shape", [CIFAR, DIGITS])
def test_autoencoder(shape):
    model = ConvAutoencoder(image_shape=shape[1:], embedding_dim=16, features=(4, 8))
    x = _images(shape)
    variables = _init(model, x)
    z, recon = _apply(model, variables, x)
    assert z.shape == (2, 16) and recon.shape == shape
    np.testing.assert_allclose(_apply(model, variables, x, method="encode"), z,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_apply(model, variables, z, method=ConvAutoencoder.decode), recon,
                               rtol=1e-5, atol=1e-6)
    loss = reconstruction_loss(recon, x)
    assert loss.shape == () and loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, jnp.mean((recon - x) ** 2), rtol=1e-6)
    assert float(reconstruction_loss(x, x)) == 0.0


def test_autoencoder_rejects_indivisible_shape():
    with pytest.raises(ValueError, match="at least one encoder stage"):
        _shapes(ConvAutoencoder(features=()), (2, 32, 32, 3))
    with pytest.raises(ValueError, match="divisible"):
        _shapes(ConvAutoencoder(image_shape=(6, 6, 1)), (2, 6, 6, 1))
    with pytest.raises(ValueError, match="image_shape"):
        _shapes(ConvAutoencoder(image_shape=(8, 8, 1)), (2, 16, 16, 1))
    with pytest.raises(ValueError, match="shape mismatch"):
        reconstruction_loss(jnp.zeros((2, 4)), jnp.zeros((2, 5)))


def test_varying_axes_reads_every_known_form(monkeypatch):
    from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
    from contrastive_jax.models import _varying  # pylint: disable=g-import-not-at-top

    class Printed:  # a type known only by its printed form
        def __str__(self):
            return "float32[8,5]{V:data,model}"

    parts = SimpleNamespace(varying=frozenset({"data"}))
    monkeypatch.setattr(_varying.jax, "typeof", lambda x: x)
    assert _varying.varying_axes(Printed()) == {"data", "model"}
    assert _varying.varying_axes(SimpleNamespace(vma=frozenset({"data"}))) == {"data"}
    assert _varying.varying_axes(SimpleNamespace(mat=parts)) == {"data"}
    assert _varying.varying_axes(SimpleNamespace(manual_axis_type=parts)) == {"data"}
    assert _varying.varying_axes("float32[8,5]") == frozenset()


def test_registry_reads_block_cls_by_name():
    import ml_collections  # pylint: disable=g-import-not-at-top
    from contrastive_jax.training import registry  # pylint: disable=g-import-not-at-top
    mc = ml_collections.ConfigDict(dict(
        backbone="resnet", backbone_kwargs=dict(stage_sizes=[1, 1], num_filters=4,
                                                block_cls="bottleneck"),
        projection_dim=0, classifier=False, hash_bits=0, online_probe=False,
        dtype="float32"))
    model = registry.build_model(mc, num_classes=10, image_shape=(8, 8, 3))
    assert model.backbone.block_cls is Bottleneck
    mc.backbone_kwargs.block_cls = "wide"
    with pytest.raises(ValueError, match="block_cls must be one of.*'wide'"):
        registry.build_model(mc, num_classes=10, image_shape=(8, 8, 3))
