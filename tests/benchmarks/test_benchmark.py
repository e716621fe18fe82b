"""The benchmark: its PyTorch training step, the fast convolution / resize paths of the Flax
layers it times, and a smoke run of scripts/benchmark.py (fields, not timings)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_torch_model, torch_reference_batch

from fgtbt_jax import landmarks
from fgtbt_jax.models.decoder import conv_transpose_4x4_s2, upsample_conv3x3
from fgtbt_jax.models.layers import conv2d, resize_bilinear

torch = pytest.importorskip("torch")
F = torch.nn.functional

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("_benchmark", ROOT / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pytestmark = pytest.mark.usefixtures("torch_two_threads")


# ------------------------------------------------------------------------------------------
# PyTorch side: FMB loss and training step against the reference implementation's numbers
# ------------------------------------------------------------------------------------------


def test_torch_fmb_loss_matches_reference(ref_outputs):
    from benchmarks.torch_oracle import loss as torch_loss

    batch = torch_reference_batch(ref_outputs)
    pred = torch.from_numpy(ref_outputs["train_heatmaps_nchw"])
    weights = torch.from_numpy(ref_outputs["fmb_weights_124"])
    total, per_dataset = torch_loss.fmb_loss(
        pred, batch["coords"], batch["mask"], batch["dataset_id"], weights
    )
    want = [float(ref_outputs[f"train_loss_{n}"]) for n in landmarks.DATASETS]
    np.testing.assert_allclose(per_dataset.numpy(), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(ref_outputs["train_loss_total"]), rtol=1e-5)
    for b, name in enumerate(landmarks.DATASETS):  # the drawn targets themselves
        idx = landmarks.unified_index(name)
        target = torch_loss.render_heatmaps(batch["coords"][b : b + 1, idx], 48, 48)
        np.testing.assert_array_equal(
            target.numpy(), ref_outputs[f"train_target_heatmaps_{name}_nchw"]
        )


def test_torch_train_step_matches_reference_adamw_step(ref_dir, ref_outputs):
    """One step of the benchmark's PyTorch training step from the tiny checkpoint: gradients
    and updated parameters equal the reference's (dropout / drop-path off, as it ran)."""
    from benchmarks.torch_oracle import loss as torch_loss

    model = tiny_torch_model(ref_dir, drop_path_rate=0.0, decoder_dropout=0.0)
    weights = torch.from_numpy(ref_outputs["fmb_weights_124"])
    step = torch_loss.make_train_step(model, weights, ema_decay=0.5)
    loss = step(torch_reference_batch(ref_outputs))
    np.testing.assert_allclose(float(loss), float(ref_outputs["train_loss_total"]), rtol=1e-5)

    with np.load(ref_dir / "tiny_reference_grads.npz") as f:
        grads = {k: f[k] for k in f.files}
    with np.load(ref_dir / "tiny_reference_params_after_adamw_step.npz") as f:
        after = {k: f[k] for k in f.files}
    named = dict(model.named_parameters())
    scale = max(np.abs(g).max() for g in grads.values())
    for key, want in grads.items():
        got = named[key].grad.numpy()
        # Relative per tensor (float32 differences, the FFT's above all, grow through the
        # train-mode BatchNorms to a few 1e-3), floored for tensors whose true gradient is ~0
        # (biases before a BatchNorm), where only rounding noise remains.
        tol = 1e-2 * max(np.abs(want).max(), 1e-3 * scale)
        assert np.abs(got - want).max() <= tol, key
    for key, want in after.items():
        # AdamW's first step moves each weight by about ±lr: a sign flip of a ~0 gradient
        # shows up as 2·lr.
        np.testing.assert_allclose(named[key].detach().numpy(), want, atol=6e-4, err_msg=key)
    assert named["encoder.decode_head.conv_seg.weight"].grad is None


# ------------------------------------------------------------------------------------------
# JAX fast paths: each against lax / torch on small shapes, values and gradients
# ------------------------------------------------------------------------------------------


def _lax_conv(x, w, stride, padding, groups):
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups,
    )


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
        (6, 4, 4, 3, 2, 1, 2),  # grouped: lax
    ],
)
def test_conv2d_paths_match_lax(size, cin, cout, k, stride, pad, groups):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((k, k, cin // groups, cout)), jnp.float32)
    got, got_vjp = jax.vjp(lambda a, b: conv2d(a, b, stride, pad, groups), x, w)
    want, want_vjp = jax.vjp(lambda a, b: _lax_conv(a, b, stride, pad, groups), x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)
    for a, b in zip(got_vjp(g), want_vjp(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("groups,axis", [(1, -1), (2, -1), (2, 1)])
def test_batch_norm_vjp_matches_autodiff(groups, axis):
    """The hand-written BatchNorm VJP against autodiff of the textbook formula."""
    from fgtbt_jax.models.layers import _batch_norm_train

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((4, 5, 6)) * 3 + 1, jnp.float32)
    c = x.shape[axis]
    scale = jnp.asarray(rng.standard_normal(c), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(c), jnp.float32)
    shape = [1, 1, 1]
    shape[axis] = c

    def textbook(x, scale, bias):
        xg = x.reshape((groups, 4 // groups) + x.shape[1:])
        red = tuple(a + 1 for a in range(3) if a != axis % 3)
        mean = jnp.mean(xg, axis=red, keepdims=True)
        var = jnp.mean((xg - mean) ** 2, axis=red, keepdims=True)
        y = ((xg - mean) / jnp.sqrt(var + 1e-5)).reshape(x.shape)
        stats = [s.reshape(groups, c) for s in (mean, var)]
        return (y * scale.reshape(shape) + bias.reshape(shape), *stats)

    def fast(x, scale, bias):
        return _batch_norm_train(x, scale, bias, groups, 1e-5, jnp.float32, axis % 3)

    got, got_vjp = jax.vjp(fast, x, scale, bias)
    want, want_vjp = jax.vjp(textbook, x, scale, bias)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    cts = tuple(jnp.asarray(rng.standard_normal(w.shape), jnp.float32) for w in want)
    for a, b in zip(got_vjp(cts), want_vjp(cts), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _torch_up_conv(x, kt, bt, w2):
    """ConvTranspose2d(4, 2, 1) then Conv2d(3, padding 1, no bias) in torch, NHWC in/out."""
    xt = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2))
    up = F.conv_transpose2d(
        xt,
        torch.from_numpy(np.asarray(kt).transpose(3, 2, 0, 1)),
        torch.from_numpy(np.asarray(bt)),
        stride=2,
        padding=1,
    )
    out = None
    if w2 is not None:
        out = F.conv2d(up, torch.from_numpy(np.asarray(w2).transpose(3, 2, 0, 1)), padding=1)
    return up.numpy().transpose(0, 2, 3, 1), None if out is None else out.numpy().transpose(
        0, 2, 3, 1
    )


def test_conv_transpose_and_fused_upsample_conv_match_torch():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 6, 3)).astype(np.float32)
    kt = rng.standard_normal((4, 4, 4, 3)).astype(np.float32)  # (kh, kw, out, in)
    bt = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
    up, fused = _torch_up_conv(x, kt, bt, w2)
    np.testing.assert_allclose(conv_transpose_4x4_s2(x, kt, bt), up, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upsample_conv3x3(x, kt, bt, w2), fused, rtol=1e-5, atol=1e-4)


def test_fused_upsample_conv_gradients_match_unfused():
    rng = np.random.default_rng(2)
    args = [
        jnp.asarray(rng.standard_normal(s), jnp.float32)
        for s in ((2, 4, 4, 3), (4, 4, 4, 3), (4,), (3, 3, 4, 2))
    ]

    def unfused(x, kt, bt, w2):
        up = (
            jax.lax.conv_transpose(
                x,
                kt,
                (2, 2),
                ((2, 2), (2, 2)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                transpose_kernel=True,
            )
            + bt
        )
        return _lax_conv(up, w2, 1, 1, 1)

    g = jnp.asarray(rng.standard_normal((2, 8, 8, 2)), jnp.float32)
    got = jax.vjp(upsample_conv3x3, *args)[1](g)
    want = jax.vjp(unfused, *args)[1](g)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("src,dst", [((3, 5), (12, 10)), ((2, 2), (16, 16)), ((4, 3), (8, 7))])
def test_resize_matches_torch_interpolate(src, dst):
    x = np.random.default_rng(3).standard_normal((2, 3, *src)).astype(np.float32)
    want = F.interpolate(torch.from_numpy(x), size=dst, mode="bilinear", align_corners=False)
    got = resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), *dst)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want.numpy(), atol=1e-5)


# ------------------------------------------------------------------------------------------
# The script
# ------------------------------------------------------------------------------------------

REQUIRED = {
    "framework",
    "mode",
    "images_per_sec",
    "compile_seconds",
    "peak_memory_bytes",
    "memory_source",
    "batch",
    "dtype",
    "device",
    "threads",
}


def test_benchmark_smoke(tmp_path):
    """A 32² one-block-per-stage variant of the tiny preset, one timed step per case."""
    bench = _load_benchmark()
    out = tmp_path / "bench.json"
    rows = bench.main(
        [
            "--config=configs/fgtbt.py:tiny",
            "--config.img_size=32",
            "--config.heatmap_size=16",
            "--config.model.depths=(1,1,1,1)",
            "--batch=4",
            "--steps=1",
            "--warmup=0",
            "--modes=train,eval",
            "--compare-torch",
            "--matmul-size=256",
            f"--json={out}",
        ]
    )
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(rows))
    assert [(r["framework"], r["mode"]) for r in saved] == [
        ("jax", "train"),
        ("torch-eager", "train"),
        ("jax", "eval"),
        ("torch-eager", "eval"),
    ]
    for r in saved:
        assert not r.get("error"), r.get("error")
        assert REQUIRED <= set(r), REQUIRED - set(r)
        assert r["batch"] == 4 and r["dtype"] == "float32" and r["img_size"] == 32
        assert r["images_per_sec"] > 0 and r["peak_memory_bytes"] > 0
        if r["framework"] == "jax":
            assert r["flops_per_image"] > 0 and 0 < r["mfu"]
            assert r["compile_seconds"] > 0
    # XLA's FLOP count: forward + backward is about three forward passes.
    train, forward = saved[0]["flops_per_image"], saved[2]["flops_per_image"]
    assert 2 * forward < train < 5 * forward


def test_benchmark_rejects_unknown_mode():
    bench = _load_benchmark()
    with pytest.raises(SystemExit, match="unknown mode"):
        bench.main(["--config=configs/fgtbt.py:tiny", "--modes=train,bogus"])
