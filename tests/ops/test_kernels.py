"""The two op implementations (``model.kernels``): every XLA:CPU fast path of fgtbt_jax.ops.cpu
against the plain op of fgtbt_jax.ops.xla (values and VJPs on random inputs), both against
PyTorch where the op is a PyTorch layer; the decoder's fused forms (``model.decoder_form``) on
either ops against the unfused layers; and the whole network built each way."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import OP_PATHS_AND_FORMS, op_path_id

from configs import fgtbt
from fgtbt_jax.models import fused_decoder
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.ops import (
    cpu,
    kernel_ops,
    resolve_decoder_form,
    resolve_kernels,
    resolve_stem_form,
    xla,
)

OPS = pytest.mark.parametrize("ops", [cpu, xla], ids=["cpu", "xla"])


def _vjp_pair(f_cpu, f_xla, args, rng, *, atol_value=1e-5, atol_grad=1e-4):
    """Asserts f_cpu(*args) == f_xla(*args) and equal VJPs for a random cotangent."""
    got, got_vjp = jax.vjp(f_cpu, *args)
    want, want_vjp = jax.vjp(f_xla, *args)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=atol_value, atol=atol_value)
    cts = jax.tree.map(lambda w: jnp.asarray(rng.standard_normal(w.shape), w.dtype), want)
    got_cts, want_cts = jax.tree.leaves(got_vjp(cts)), jax.tree.leaves(want_vjp(cts))
    for a, b in zip(got_cts, want_cts, strict=True):
        np.testing.assert_allclose(a, b, rtol=atol_grad, atol=atol_grad)


def _normal(rng, shape, scale=1.0, shift=0.0):
    return jnp.asarray(rng.standard_normal(shape) * scale + shift, jnp.float32)


@pytest.mark.parametrize(
    "size,cin,cout,k,stride,pad,groups",
    [
        (6, 5, 7, 1, 1, 0, 1),  # 1×1: matmul
        (6, 8, 8, 3, 1, 1, 8),  # depthwise: shifted multiply-adds
        (8, 3, 5, 4, 4, 0, 1),  # kernel = stride: patchify matmul
        (7, 4, 6, 3, 1, 1, 1),  # stride-1 k×k: custom VJP
        (9, 3, 4, 2, 1, 0, 1),
        (7, 6, 4, 3, 1, 1, 1),  # more input than output channels
        (12, 3, 4, 7, 4, 3, 1),  # strided: custom VJP
        (13, 3, 4, 3, 2, 1, 1),
        (10, 2, 3, 3, 4, 0, 1),  # windows leave the last rows unread
        (6, 4, 4, 3, 2, 1, 2),  # grouped: lax in both
    ],
)
def test_conv2d_cpu_matches_xla(size, cin, cout, k, stride, pad, groups):
    rng = np.random.default_rng(0)
    x = _normal(rng, (2, size, size, cin))
    w = _normal(rng, (k, k, cin // groups, cout))
    _vjp_pair(
        lambda a, b: cpu.conv2d(a, b, stride, pad, groups),
        lambda a, b: xla.conv2d(a, b, stride, pad, groups),
        (x, w),
        rng,
    )


@pytest.mark.parametrize("groups,axis,blocks", [(1, -1, 1), (2, -1, 1), (2, 1, 1), (2, -1, 3)])
def test_batch_norm_vjp_matches_autodiff(groups, axis, blocks):
    """The hand-written BatchNorm VJP (both op paths use it) against autodiff of the plain
    formula; the statistics against NumPy (with ``blocks``: each of the C channels over its
    ``blocks`` space-to-depth positions too)."""
    rng = np.random.default_rng(4)
    x = _normal(rng, (4, 5, 6), 3.0, 1.0)
    c = x.shape[axis] // blocks
    scale, bias = _normal(rng, (c,)), _normal(rng, (c,))
    args = (x, scale, bias)
    options = (groups, 1e-5, jnp.float32, axis % 3, blocks)
    assert cpu.batch_norm_train is xla.batch_norm_train
    _vjp_pair(
        lambda *a: xla.batch_norm_train(*a, *options),
        lambda *a: xla.batch_norm_train_and_rstd(*a, *options)[0],
        args,
        rng,
    )
    _, mean, var = xla.batch_norm_train(*args, *options)
    xg = np.moveaxis(np.asarray(x), axis, -1).reshape(groups, -1, c)
    np.testing.assert_allclose(mean, xg.mean(1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, xg.var(1), rtol=1e-5, atol=1e-6)


def test_layer_norm_and_gelu_cpu_match_xla():
    rng = np.random.default_rng(5)
    x = _normal(rng, (2, 7, 12), 2.0, 0.5)
    scale, bias = _normal(rng, (12,)), _normal(rng, (12,))
    _vjp_pair(
        lambda *a: cpu.layer_norm(*a, 1e-6, jnp.float32),
        lambda *a: xla.layer_norm(*a, 1e-6, jnp.float32),
        (x, scale, bias),
        rng,
    )
    _vjp_pair(cpu.gelu, xla.gelu, (x,), rng)
    torch = pytest.importorskip("torch")
    want = torch.nn.functional.gelu(torch.from_numpy(np.array(x))).numpy()  # erf form
    np.testing.assert_allclose(xla.gelu(x), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ops", [cpu, xla], ids=["cpu", "xla"])
@pytest.mark.parametrize("src,dst", [((3, 5), (12, 10)), ((2, 2), (16, 16)), ((4, 3), (8, 7))])
def test_resize_matches_torch_interpolate(ops, src, dst):
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(3).standard_normal((2, 3, *src)).astype(np.float32)
    want = torch.nn.functional.interpolate(
        torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False
    )
    got = ops.resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), *dst)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want.numpy(), atol=1e-5)


def test_resize_vjp_cpu_matches_xla():
    rng = np.random.default_rng(6)
    x = _normal(rng, (2, 3, 4, 5))
    _vjp_pair(
        lambda a: cpu.resize_bilinear(a, 12, 16),
        lambda a: xla.resize_bilinear(a, 12, 16),
        (x,),
        rng,
    )


@pytest.mark.parametrize("padding", [((1, 0), (1, 1)), ((0, 2), (1, 0))])
def test_conv_s1_cpu_matches_xla(padding):
    """The stride-1 convolution with asymmetric padding that the fused decoder uses."""
    rng = np.random.default_rng(8)
    x, w = _normal(rng, (2, 5, 6, 3)), _normal(rng, (3, 3, 3, 4))
    _vjp_pair(
        lambda a, b: cpu.conv_s1(a, b, padding),
        lambda a, b: xla.conv_s1(a, b, padding),
        (x, w),
        rng,
    )


def _conv_transpose(x, kt, bt):
    """Flax's ``nn.ConvTranspose(k=4, s=2, padding 2, transpose_kernel)``: PyTorch's
    ConvTranspose2d(4, 2, 1), the decoder's ``upSample`` in the paper form."""
    return (
        jax.lax.conv_transpose(
            x,
            kt,
            (2, 2),
            ((2, 2), (2, 2)),
            dimension_numbers=xla.CONV_DIMENSIONS,
            transpose_kernel=True,
        )
        + bt
    )


@OPS
def test_conv_transpose_and_fused_upsample_conv_match_torch(ops):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    kt = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)  # (kh, kw, out, in)
    bt = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
    up = F.conv_transpose2d(
        torch.from_numpy(x.transpose(0, 3, 1, 2)),
        torch.from_numpy(kt.transpose(3, 2, 0, 1)),
        torch.from_numpy(bt),
        stride=2,
        padding=1,
    )
    both = F.conv2d(up, torch.from_numpy(w2.transpose(3, 2, 0, 1)), padding=1)
    up, both = up.numpy().transpose(0, 2, 3, 1), both.numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(_conv_transpose(x, kt, bt), up, rtol=1e-5, atol=1e-5)
    got = fused_decoder.conv_transpose_4x4_s2(x, kt, bt, ops=ops)
    np.testing.assert_allclose(got, up, rtol=1e-5, atol=1e-5)
    got = fused_decoder.upsample_conv3x3(x, kt, bt, w2, ops=ops)
    np.testing.assert_allclose(got, both, rtol=1e-5, atol=1e-4)


@OPS
def test_fused_upsample_conv_vjp_matches_unfused(ops):
    rng = np.random.default_rng(2)
    args = tuple(_normal(rng, s) for s in ((2, 4, 4, 3), (4, 4, 4, 3), (4,), (3, 3, 4, 2)))
    _vjp_pair(
        lambda *a: fused_decoder.upsample_conv3x3(*a, ops=ops),
        lambda x, kt, bt, w2: xla.conv2d(_conv_transpose(x, kt, bt), w2, 1, 1),
        args,
        rng,
        atol_value=1e-4,
    )


@OPS
def test_decoder_fuse_matches_unfused(ops):
    """linear_c{s} → resize → concat [c4..c1] → 1×1 fuse, against its composed form."""
    rng = np.random.default_rng(7)
    d, dims, sizes = 6, (3, 4, 5, 7), (8, 4, 2, 1)
    feats = [_normal(rng, (2, s, s, c)) for s, c in zip(sizes, dims, strict=True)]
    linear = [(_normal(rng, (c, d)), _normal(rng, (d,))) for c in dims]
    fuse = _normal(rng, (1, 1, 4 * d, d))

    def unfused(feats, linear, fuse):
        maps = [f @ k + b for f, (k, b) in zip(feats, linear, strict=True)]
        maps = [maps[0]] + [xla.resize_bilinear(m, 8, 8) for m in maps[1:]]
        return xla.conv2d(jnp.concatenate(maps[::-1], axis=-1), fuse)

    _vjp_pair(
        lambda *a: fused_decoder.fuse_stages(*a, jnp.float32, ops=ops),
        unfused,
        (feats, linear, fuse),
        rng,
        atol_value=1e-4,
    )


@OPS
def test_decoder_forms_agree_in_train_mode_with_dropout(ops):
    """The decode head in train mode with an active channel dropout, float64: the fused form
    (dropout on ``linear_pred``'s kernel, stage sums and borders as selects) against the paper
    order, same parameters and rngs: the same mask is drawn, outputs, BatchNorm updates and
    parameter gradients agree to float64 rounding (and the mask did drop channels)."""
    from fgtbt_jax.models.decoder import DecodeHead
    from fgtbt_jax.models.layers import Layers

    rng = np.random.default_rng(8)
    with jax.enable_x64(True):
        lay = Layers(ops=ops, dtype=jnp.float64)
        dims, sizes = (3, 4, 5, 6), (8, 4, 2, 1)
        feats = [
            jnp.asarray(rng.standard_normal((2, s, s, c))) for s, c in zip(sizes, dims, strict=True)
        ]
        heads = {
            form: DecodeHead(
                layers=lay, embed_dims=dims, decoder_dim=8, num_landmarks=5, dropout=0.5, form=form
            )
            for form in ("paper", "fused")
        }
        variables = heads["paper"].init(jax.random.key(0), feats, False)
        rngs = {"dropout": jax.random.key(3)}

        def run(form, params):
            return heads[form].apply(
                {**variables, "params": params}, feats, True, mutable=["batch_stats"], rngs=rngs
            )

        def loss(form, params):
            out, _ = run(form, params)
            return jnp.sum(jnp.sin(out))

        (paper, paper_stats), (fused, fused_stats) = (
            run(f, variables["params"]) for f in ("paper", "fused")
        )
        np.testing.assert_allclose(fused, paper, rtol=1e-10, atol=1e-10)
        for a, b in zip(jax.tree.leaves(fused_stats), jax.tree.leaves(paper_stats), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10)
        grads = [jax.grad(loss, argnums=1)(f, variables["params"]) for f in ("paper", "fused")]
        for a, b in zip(*(jax.tree.leaves(g) for g in grads), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
        kept = heads["paper"].clone(dropout=0.0)
        all_kept, _ = kept.apply(variables, feats, True, mutable=["batch_stats"], rngs=rngs)
        assert not np.allclose(paper, all_kept, atol=1e-3)  # the dropout dropped something


def test_resolve_kernels():
    auto = "cpu" if jax.default_backend() == "cpu" else "xla"
    assert resolve_kernels("auto") == auto
    assert resolve_kernels("xla") == "xla" and resolve_kernels("cpu") == "cpu"
    with pytest.raises(ValueError, match=r"model.kernels must be one of \('auto', 'xla', 'cpu'\)"):
        resolve_kernels("gpu")
    config = fgtbt.get_config("tiny")
    config.model.kernels = "fast"
    with pytest.raises(ValueError, match="model.kernels"):
        build_model(config.model)
    config.model.kernels = "auto"
    assert build_model(config.model).ops.NAME == auto
    with pytest.raises(ValueError, match="resolved"):
        kernel_ops("auto")


def test_resolve_decoder_form():
    """ "auto" is the fused form on both op paths; explicit forms go with either ops."""
    assert resolve_decoder_form("auto", "cpu") == "fused"
    assert resolve_decoder_form("auto", "xla") == "fused"
    for kernels in ("cpu", "xla"):
        for form in ("paper", "fused"):
            assert resolve_decoder_form(form, kernels) == form
    with pytest.raises(ValueError, match=r"model.decoder_form must be one of"):
        resolve_decoder_form("fast", "xla")
    config = fgtbt.get_config("tiny")
    config.model.kernels, config.model.decoder_form = "xla", "fused"
    model = build_model(config.model)
    assert (model.ops.NAME, model.decoder_form) == ("xla", "fused")
    config.model.decoder_form = "fusd"
    with pytest.raises(ValueError, match="model.decoder_form"):
        build_model(config.model)


def test_resolve_stem_form():
    """ "auto" is the blocks form with the xla ops and the paper form with the cpu ops."""
    assert resolve_stem_form("auto", "xla") == "blocks"
    assert resolve_stem_form("auto", "cpu") == "paper"
    for kernels in ("cpu", "xla"):
        for form in ("paper", "blocks"):
            assert resolve_stem_form(form, kernels) == form
    with pytest.raises(ValueError, match=r"model.stem_form must be one of"):
        resolve_stem_form("s2d", "xla")
    config = fgtbt.get_config("tiny")
    config.model.kernels, config.model.stem_form = "cpu", "blocks"
    assert build_model(config.model).stem_form == "blocks"
    config.model.kernels, config.model.stem_form = "xla", "auto"
    assert build_model(config.model).stem_form == "blocks"


@pytest.fixture(scope="module")
def all_models():
    """The tiny architecture at 64² without stochastic layers, built with each ``kernels`` and
    each ``decoder_form``."""
    config = fgtbt.get_config("reference_tiny")
    config.img_size = 64
    config.model.drop_path_rate = 0.0
    config.model.decoder_dropout = 0.0
    models = {}
    for pair in OP_PATHS_AND_FORMS:
        config.model.kernels, config.model.decoder_form = pair
        models[op_path_id(pair)] = build_model(config.model)
    return models


def test_models_share_parameters(all_models):
    """Same parameter tree and initial values with every op path and decoder form: a
    checkpoint moves freely between them. That they compute the same function is held against
    the reference per pair: the float32 forward of all four pairs (test_model_parity.py), the
    float32 train step's gradients and BatchNorm updates of the two ``auto`` pairs
    (test_train_step.py), the float64 forward of all four and train step of the two paper
    pairs, exactly (test_float64.py)."""
    images = jnp.zeros((1, 64, 64, 3), jnp.float32)
    trees = {k: jax.eval_shape(init_of(m), images) for k, m in all_models.items()}
    plain = op_path_id(("xla", "paper"))
    for name, tree in trees.items():
        assert tree == trees[plain], name  # structure, shapes and dtypes
    # Values: two pairs which differ in both op path and decoder form (each init is
    # a compile of ~1,400 small kernels, so not all four), compiled without backend optimization
    # (the cpu path's init options: a fraction of the compile time).
    a, b = (
        jax.jit(init_of(all_models[op_path_id(p)]), compiler_options=cpu.INIT_COMPILER_OPTIONS)(
            images
        )
        for p in (("xla", "paper"), ("cpu", "fused"))
    )
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


def init_of(model):
    return lambda x: model.init({"params": jax.random.key(0)}, x)
