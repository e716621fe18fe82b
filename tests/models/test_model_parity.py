"""The Flax network against tensors produced by the original PyTorch implementation."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import OP_PATHS_AND_FORMS, op_path_id

from configs import fgtbt
from fgtbt_jax import load_pretrained
from fgtbt_jax.models.backbone import high_pass, tokens_as_view, view_as_tokens
from fgtbt_jax.models.fgtbt import build_model, init_variables


def jit_apply(model, **kwargs):
    """Eager Flax applies dispatch op by op; one compiled function per model is much faster."""
    return jax.jit(lambda v, x: model.apply(v, x, train=False, **kwargs))


def rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def nchw(x) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def tiny(ref_dir):
    config = fgtbt.get_config("reference_tiny")
    model, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    return config, model, variables


@pytest.fixture(scope="module")
def images(ref_outputs):
    return jnp.asarray(ref_outputs["input_nchw"].transpose(0, 2, 3, 1))


def test_high_pass_matches_reference(images, ref_outputs):
    assert rel_err(nchw(high_pass(images)), ref_outputs["hpf_nchw"]) < 1e-4


@pytest.fixture(scope="module", params=OP_PATHS_AND_FORMS, ids=op_path_id)
def eval_outputs(request, ref_dir, images):
    """(heatmaps, backbone stage maps) of the batch of 4, from one compiled function, with
    each ``model.kernels`` and ``model.decoder_form`` (the other tests use the defaults,
    ``auto``), the reference checkpoint loaded by that model."""
    config = fgtbt.get_config("reference_tiny")
    config.model.kernels, config.model.decoder_form = request.param
    model, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    assert (model.ops.NAME, model.decoder_form) == request.param
    out, state = jit_apply(model, capture_intermediates=lambda mdl, _: mdl.name == "backbone")(
        variables, images
    )
    return out, state["intermediates"]["backbone"]["__call__"][0]


def test_backbone_stages_match_reference(eval_outputs, ref_outputs):
    for s, f in enumerate(eval_outputs[1], start=1):
        assert rel_err(nchw(f), ref_outputs[f"eval_stage{s}_nchw"]) < 1e-4, f"stage {s}"


def test_heatmaps_batched_match_reference(eval_outputs, ref_outputs):
    out = eval_outputs[0]
    assert out.shape == (4, 48, 48, 124)
    assert rel_err(nchw(out), ref_outputs["eval_heatmaps_nchw"]) < 1e-4


def test_heatmaps_one_at_a_time_match_reference(tiny, images, ref_outputs):
    _, model, variables = tiny
    apply = jit_apply(model)
    out = np.concatenate([np.asarray(apply(variables, images[i : i + 1])) for i in range(2)])
    ref = ref_outputs["eval_heatmaps_per_sample_nchw"]
    assert rel_err(nchw(out), ref) < 1e-4
    # CSAM pools over the batch: the batched result is genuinely different (the quirk is real).
    assert rel_err(ref, ref_outputs["eval_heatmaps_nchw"][:2]) > 1e-3


def test_per_sample_csam_is_batch_independent(tiny, images):
    config, _, variables = tiny
    config = fgtbt.get_config("reference_tiny")
    config.model.csam_reduction = "sample"
    model = build_model(config.model)
    apply = jit_apply(model)
    batched = np.asarray(apply(variables, images))
    single = np.asarray(apply(variables, images[1:2]))
    np.testing.assert_allclose(batched[1:2], single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_stat_groups_reproduce_separate_batches(tiny, images):
    """stat_groups=2 on a batch of 4 equals two independent batches of 2 (per-device stats)."""
    config, _, variables = tiny
    grouped = build_model(config.model, stat_groups=2)
    model = build_model(config.model)
    out = np.asarray(jit_apply(grouped)(variables, images))
    apply = jit_apply(model)
    halves = np.concatenate([np.asarray(apply(variables, images[i : i + 2])) for i in (0, 2)])
    np.testing.assert_allclose(out, halves, rtol=0, atol=1e-5 * np.abs(halves).max())


def test_prompt_view_reinterprets_memory():
    """The reference's ``.view(B, C, A, A)`` of (B, N, C) tokens, checked on raw memory order."""
    b, a, c = 2, 3, 5
    tokens = np.arange(b * a * a * c, dtype=np.float32).reshape(b, a * a, c)
    view_nchw = tokens.reshape(b, c, a, a)  # what torch's .view does on contiguous memory
    got = np.asarray(tokens_as_view(jnp.asarray(tokens)))  # (B, C, A·A)
    np.testing.assert_array_equal(got, view_nchw.reshape(b, c, a * a))
    np.testing.assert_array_equal(np.asarray(view_as_tokens(jnp.asarray(got))), tokens)


def test_prompt_view_rejects_non_square_grid():
    with pytest.raises(ValueError, match="square"):
        tokens_as_view(jnp.zeros((1, 6, 4)))


def test_conv_transpose_matches_torch():
    """ConvTranspose2d(k=4, s=2, p=1) with the porting layout, against torch itself."""
    torch = pytest.importorskip("torch")
    from fgtbt_jax.porting.convert import Entry

    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 5, 4, 4)).astype(np.float32)  # torch (in, out, kh, kw)
    bias = rng.standard_normal(5).astype(np.float32)
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    ref = torch.nn.functional.conv_transpose2d(
        torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(bias), stride=2, padding=1
    ).numpy()
    layer = nn.ConvTranspose(
        5, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), transpose_kernel=True
    )
    kernel = Entry("w", "params", ("k",), "conv", (4, 4, 5, 3)).to_flax(w)
    out = layer.apply({"params": {"kernel": kernel, "bias": bias}}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(nchw(out), ref, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params(tiny, images, ref_outputs):
    config = fgtbt.get_config("reference_tiny")
    config.model.dtype = "bfloat16"
    _, variables = tiny[1], tiny[2]
    model = build_model(config.model)
    out = jit_apply(model)(variables, images)
    assert out.dtype == jnp.bfloat16
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    # bfloat16 keeps about 3 significant digits; the heatmaps must still be close.
    assert rel_err(nchw(out.astype(jnp.float32)), ref_outputs["eval_heatmaps_nchw"]) < 0.1


def test_model_rejects_bad_input(tiny):
    _, model, variables = tiny
    with pytest.raises(ValueError, match="NHWC"):
        model.apply(variables, jnp.zeros((1, 3, 96, 96)))
    with pytest.raises(ValueError, match="float32"):
        model.apply(variables, jnp.zeros((1, 96, 96, 3), jnp.uint8))


@pytest.mark.parametrize("pair", OP_PATHS_AND_FORMS, ids=op_path_id)
def test_release_configuration_shapes(pair):
    """The full 480² network, checked by shapes only (a real forward pass is scripted:
    ``python scripts/model_info.py --config configs/fgtbt.py:release --forward 1``)."""
    from fgtbt_jax.porting import convert

    config = fgtbt.get_config("release")
    config.model.kernels, config.model.decoder_form = pair
    model = build_model(config.model)
    variables = convert.abstract_variables(model, config.img_size)
    images = jax.ShapeDtypeStruct((2, 480, 480, 3), jnp.float32)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, images)
    assert out.shape == (2, 240, 240, 124) and out.dtype == jnp.float32
    out, updates = jax.eval_shape(
        lambda v, x: model.apply(
            v,
            x,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": jax.random.key(0), "drop_path": jax.random.key(1)},
        ),
        variables,
        images,
    )
    assert out.shape == (2, 240, 240, 124)
    assert jax.tree.structure(updates["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )


def test_init_variables_under_a_trace():
    """``init_variables`` inside ``jax.eval_shape`` (its own jitted init carries compiler
    options, which only the outermost jit may): the variables' shapes and dtypes of
    ``model.init``."""
    config = fgtbt.get_config("reference_tiny")
    model = build_model(config.model)
    key = jax.random.key(0)
    got = jax.eval_shape(lambda k: init_variables(model, k, 32), key)
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    want = jax.eval_shape(lambda k, x: model.init({"params": k}, x, train=False), key, x)
    assert jax.tree.structure(got) == jax.tree.structure(dict(want))
    assert jax.tree.leaves(got) == jax.tree.leaves(want)
