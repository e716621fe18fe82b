"""The space-to-depth lowering of strided convolutions (fgtbt_jax.ops.space_to_depth) against
``lax.conv_general_dilated``, values and VJPs in float64: the two sum the same products, so
they agree to float64 rounding."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax.ops import cpu, xla
from fgtbt_jax.ops.space_to_depth import (
    conv2d_space_to_depth,
    space_to_depth,
    space_to_depth_kernel,
)


def _lax_conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding),) * 2, dimension_numbers=xla.CONV_DIMENSIONS
    )


@pytest.mark.parametrize(
    "h,wd,c,o,k,stride,pad",
    [
        (16, 16, 3, 5, 7, 4, 3),  # the stem's 7×7/4, padding 3
        (13, 11, 2, 3, 7, 4, 3),  # odd sizes: the last block completed with zeros
        (18, 9, 3, 2, 7, 4, 0),  # no padding: windows leave the last rows unread
        (10, 10, 2, 3, 5, 4, 6),  # padding wider than the stride: zero blocks in front
        (9, 7, 3, 4, 3, 2, 1),  # 3×3/2
        (12, 12, 2, 2, 4, 4, 0),  # kernel = stride
        (11, 11, 2, 3, 5, 3, 2),
    ],
)
def test_conv2d_space_to_depth_matches_lax_float64(h, wd, c, o, k, stride, pad):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, h, wd, c)))
        w = jnp.asarray(rng.standard_normal((k, k, c, o)))
        got, got_vjp = jax.vjp(lambda a, b: conv2d_space_to_depth(a, b, stride, pad), x, w)
        want, want_vjp = jax.vjp(lambda a, b: _lax_conv(a, b, stride, pad), x, w)
        assert got.dtype == jnp.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        ct = jnp.asarray(rng.standard_normal(want.shape))
        for a, b in zip(got_vjp(ct), want_vjp(ct), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "h,wd,c,o,k,padding",
    [
        (9, 7, 40, 3, 2, ((1, 0), (1, 0))),  # the blocks stem's 2×2 proj: one zero block in front
        (6, 6, 50, 2, 3, ((1, 1), (0, 2))),  # asymmetric padding
        (5, 8, 33, 4, 2, ((0, 1), (1, 1))),
        (7, 7, 20, 2, 2, ((0, 0), (0, 0))),  # no padding: a smaller output
    ],
)
def test_conv_s1_taps_matches_lax_float64(h, wd, c, o, k, padding):
    """The tap-matmul lowering of wide stride-1 convolutions (``xla.conv_s1`` picks it when
    C_in > kh·kw·C_out) against ``lax.conv_general_dilated``: values and the hand-written VJP
    to float64 rounding."""
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.standard_normal((2, h, wd, c)))
        w = jnp.asarray(rng.standard_normal((k, k, c, o)))
        got, got_vjp = jax.vjp(lambda a, b: xla.conv_s1_taps(a, b, padding), x, w)
        want, want_vjp = jax.vjp(
            lambda a, b: jax.lax.conv_general_dilated(
                a, b, (1, 1), padding, dimension_numbers=xla.CONV_DIMENSIONS
            ),
            x,
            w,
        )
        assert got.dtype == jnp.float64 and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        ct = jnp.asarray(rng.standard_normal(want.shape))
        for a, b in zip(got_vjp(ct), want_vjp(ct), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_xla_conv_s1_uses_taps_for_wide_inputs_only():
    """A 2×2 kernel over 1024 channels to 64 (the blocks stem) becomes a matmul (no convolution
    in the program); the decoder's 3×3 over 128 channels to 496 stays a convolution."""

    def convolutions(c, o, k):
        x = jnp.zeros((1, 8, 8, c), jnp.bfloat16)
        w = jnp.zeros((k, k, c, o), jnp.bfloat16)
        hlo = jax.jit(lambda a, b: xla.conv_s1(a, b, ((1, 0), (1, 0)))).lower(x, w).as_text()
        return hlo.count("stablehlo.convolution")

    assert convolutions(1024, 64, 2) == 0
    assert convolutions(128, 496, 3) == 1


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float64"])
def test_xla_space_to_depth_is_the_reshuffle_exactly(dtype):
    """The xla ops' one-hot-matmul space-to-depth equals the reshape/transpose one bit for bit
    (odd values, large and tiny magnitudes), and the cpu ops keep the reshuffle."""
    rng = np.random.default_rng(2)
    values = rng.standard_normal((2, 12, 8, 3)) * 10.0 ** rng.integers(-30, 30, (2, 12, 8, 3))
    with jax.enable_x64(dtype == "float64"):
        x = jnp.asarray(values, dtype)
        got = xla.space_to_depth(x, 4)
        assert got.dtype == x.dtype and got.shape == (2, 3, 2, 48)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(space_to_depth(x, 4)))
    assert cpu.space_to_depth is space_to_depth


def test_space_to_depth_kernel_of_the_stem():
    """7×7/4 with padding 3 → a 2×2 kernel over 16·C channels: tap (u, v) of block row/column
    offset (i, j) is the original tap (4u + i − 1, 4v + j − 1), zero outside 0…6."""
    w = jnp.arange(7 * 7 * 2 * 3, dtype=jnp.float32).reshape(7, 7, 2, 3) + 1
    ws = np.asarray(space_to_depth_kernel(w, 4, 3)).reshape(2, 2, 4, 4, 2, 3)
    for u in range(2):
        for v in range(2):
            for i in range(4):
                for j in range(4):
                    r, s = 4 * u + i - 1, 4 * v + j - 1
                    want = w[r, s] if 0 <= r < 7 and 0 <= s < 7 else 0 * w[0, 0]
                    np.testing.assert_array_equal(ws[u, v, i, j], want)


def test_xla_conv2d_uses_space_to_depth_for_the_stem_only():
    """The xla ops lower the 7×7/4 stem to a stride-1 convolution (no strided window left in
    the program); the 3×3/2 patch embeddings and the depthwise convolutions stay as they were."""
    x = jnp.zeros((1, 16, 16, 4), jnp.float32)

    def strides(k, stride, groups=1):
        w = jnp.zeros((k, k, 4 // groups, 4), jnp.float32)
        hlo = jax.jit(lambda a, b: xla.conv2d(a, b, stride, k // 2, groups)).lower(x, w).as_text()
        return re.findall(r"stablehlo\.convolution.*window = \{stride = \[(\d+), \d+\]", hlo)

    assert strides(7, 4) == ["1"]
    assert strides(3, 2) == ["2"]
    assert strides(3, 1, groups=4) == ["1"]


@pytest.mark.parametrize(
    "ops,h,wd",
    [(xla, 16, 24), (cpu, 16, 24), (xla, 14, 18)],  # 14×18: not in whole 4×4 blocks
    ids=lambda v: getattr(v, "NAME", str(v)),
)
def test_stem_on_blocks_matches_paper_float64(ops, h, wd):
    """``stem_form="blocks"`` (BN → ReLU → 1×1 → BN → ReLU → 7×7/4 on 4×4 blocks) against the
    paper order on the full-resolution map, train mode with two statistic groups, float64, on
    both op paths: same parameter tree, tokens, BatchNorm statistics, parameter and input
    gradients to float64 rounding (eval mode too). 14×18 falls back to the paper order."""
    from fgtbt_jax.models.backbone import OverlapPatchEmbed
    from fgtbt_jax.models.layers import Layers

    with jax.enable_x64(True):
        lay = Layers(ops=ops, dtype=jnp.float64, stat_groups=2)
        x = jax.random.normal(jax.random.key(1), (4, h, wd, 3), jnp.float64)
        paper = OverlapPatchEmbed.of_stage(0, 8, lay, name="stem")
        blocks = OverlapPatchEmbed.of_stage(0, 8, lay, name="stem", stem_form="blocks")
        variables = paper.init(jax.random.key(0), x, False)
        assert jax.tree.structure(variables) == jax.tree.structure(
            blocks.init(jax.random.key(0), x, False)
        )
        noise = jax.random.key(3)  # away from the initial scale 1 / bias 0 and statistics
        variables = jax.tree.map(
            lambda t: (
                t + 0.3 * jax.random.normal(noise, t.shape, t.dtype)
                if t.dtype == jnp.float64
                else t
            ),
            variables,
        )
        weights = jnp.cos(jnp.arange(8 * -(-h // 4) * -(-wd // 4), dtype=jnp.float64))

        def run(stem):
            def loss(params, x):
                (tokens, _, _), stats = stem.apply(
                    {"params": params, "batch_stats": variables["batch_stats"]},
                    x,
                    True,
                    mutable=["batch_stats"],
                )
                return jnp.sum(tokens * weights.reshape(tokens.shape[1:])), (tokens, stats)

            grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
            (grads, tokens_and_stats) = grad(variables["params"], x)
            return grads, tokens_and_stats, stem.apply(variables, x, False)[0]

        want, got = run(paper), run(blocks)
        for path, a, b in zip(
            jax.tree_util.tree_leaves_with_path(want),
            jax.tree.leaves(want),
            jax.tree.leaves(got),
            strict=True,
        ):
            name = jax.tree_util.keystr(path[0])
            # proj's bias gradient vanishes in exact arithmetic (bn3 follows): noise on both sides
            scale = max(float(jnp.max(jnp.abs(a))), 1.0 if "proj']['bias" in name else 1e-300)
            np.testing.assert_allclose(b / scale, a / scale, rtol=0, atol=1e-12, err_msg=name)
