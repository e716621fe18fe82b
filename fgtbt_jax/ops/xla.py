"""The network's numerical ops as the SPEC writes them, in standard JAX (``model.kernels="xla"``).

Every function here is the plain formula on ``lax``/``jax.numpy`` ops, differentiated by JAX's
own autodiff: what XLA compiles well on GPU and TPU. The exceptions each say what they work
around on XLA:TPU and what they gain (docs/traffic.md measures them): ``batch_norm_train`` and
``conv_s1_taps`` have hand-written VJPs, ``gelu`` and ``attention`` are rematerialized in the
backward pass, ``space_to_depth`` permutes by one-hot matmuls. :mod:`fgtbt_jax.ops.cpu` holds
faster XLA:CPU lowerings of the same functions (same signatures, same results to float32
rounding).
All tensors are NHWC unless an ``axis`` says where the channels are.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.ops.common import (
    Dtype,
    Padding,
    channel_shape,
    expand_groups,
    fold_blocks,
    group_mean,
    param_dtype,
    tile_blocks,
)
from fgtbt_jax.ops.space_to_depth import conv2d_space_to_depth

# Strided convolutions from this stride up (the stems' 7×7/4 ``proj``) are computed over
# space-to-depth blocks (:mod:`fgtbt_jax.ops.space_to_depth`: what XLA:TPU's lowering costs and
# what the blocks save). The 3×3/2 patch embeddings would pay +78 % FLOPs for it (not measured).
SPACE_TO_DEPTH_MIN_STRIDE = 4

NAME = "xla"  # the ``model.kernels`` value of this op path

CONV_DIMENSIONS = ("NHWC", "HWIO", "NHWC")

# Compiler options of the one-off jitted parameter initialisation (None: the backend's own).
INIT_COMPILER_OPTIONS: dict[str, Any] | None = None


def batch_norm_statistics(
    xf: jax.Array, groups: int, epsilon: float, axis: int, blocks: int = 1
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-group mean and biased variance (groups, C) of ``xf`` with channels on ``axis`` (in
    ``blocks`` space-to-depth positions: C = channels / blocks, each reduced over its positions
    too), plus the centred input and the per-group 1/sqrt(var + eps)."""
    axes = tuple(a for a in range(xf.ndim) if a != axis)
    mean_g = fold_blocks(group_mean(xf, axes, groups), blocks)  # (g, C)
    centered = xf - expand_groups(tile_blocks(mean_g, blocks), xf, groups, axis)
    var_g = fold_blocks(group_mean(jnp.square(centered), axes, groups), blocks)
    return mean_g, var_g, centered, jax.lax.rsqrt(var_g + epsilon)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Dtype,
    axis: int,
    blocks: int = 1,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm with batch statistics, channels on ``axis``: (normalized output in
    ``dtype``, per-group mean and biased variance (groups, C)). Statistics in
    ``param_dtype(dtype)`` (float32 for float32 and bfloat16). ``blocks`` > 1: the channel axis
    holds ``blocks`` space-to-depth positions × C channels (position major); ``scale``,
    ``bias`` and the statistics have C entries, each channel reduced over its positions too.

    The forward pass is :func:`batch_norm_train_and_rstd`'s formula; the VJP is hand-written
    (two passes over the data: the reductions, then the input gradient). What it works
    around: autodiff of the formula keeps the centred and normalized float32 copies of the
    input until the backward pass (each twice the bytes of a bfloat16 activation; XLA:CPU does
    not rematerialize them, XLA:TPU stores some). This VJP keeps only ``x`` in its own dtype and
    the (groups, C) statistics. Gain: the two stems alone on one TPU v5e chip, bfloat16, 4
    images: 7.43 → 6.96 GB of HBM traffic (docs/traffic.md); on XLA:CPU not measured alone.
    """
    return _batch_norm_train_fwd(x, scale, bias, groups, epsilon, dtype, axis, blocks)[0]


def _batch_norm_train_fwd(x, scale, bias, groups, epsilon, dtype, axis, blocks):
    out, rstd_g = batch_norm_train_and_rstd(x, scale, bias, groups, epsilon, dtype, axis, blocks)
    return out, (x, scale, out[1], rstd_g)


def _batch_norm_train_bwd(groups, epsilon, dtype, axis, blocks, res, cts):
    x, scale, mean_g, rstd_g = res
    gy, g_mean, g_var = cts
    xf = x.astype(param_dtype(dtype))
    gy = gy.astype(xf.dtype)
    axes = tuple(a for a in range(x.ndim) if a != axis)

    def expand(stat):  # (g, C) → broadcastable to x
        return expand_groups(tile_blocks(stat, blocks), xf, groups, axis)

    def channel_mean(v):  # → (g, C)
        return fold_blocks(group_mean(v, axes, groups), blocks)

    centered = xf - expand(mean_g)
    xhat = centered * expand(rstd_g)
    d_bias = fold_blocks(jnp.sum(gy, axis=axes), blocks, "sum")
    d_scale = fold_blocks(jnp.sum(gy * xhat, axis=axes), blocks, "sum")
    channels = channel_shape(x, axis)
    gxh = gy * tile_blocks(scale, blocks).reshape(channels)  # gradient w.r.t. xhat
    m1 = channel_mean(gxh)
    m2 = channel_mean(gxh * xhat)
    n = x.size // (scale.shape[0] * groups)
    dx = expand(rstd_g) * (gxh - expand(m1) - xhat * expand(m2))
    # The statistics are outputs too (for the running averages); their cotangents are zero in
    # training, but are honoured for completeness.
    dx = dx + expand(g_mean / n) + centered * expand(2 * g_var / n)
    return dx.astype(x.dtype), d_scale, d_bias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm_train_and_rstd(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Dtype,
    axis: int,
    blocks: int = 1,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
    """:func:`batch_norm_train`'s formula (its forward pass, and the reference its VJP is tested
    against): its outputs and the per-group 1/sqrt(var + eps) (groups, C) it normalized with."""
    xf = x.astype(param_dtype(dtype))
    mean_g, var_g, centered, rstd_g = batch_norm_statistics(xf, groups, epsilon, axis, blocks)
    y = centered * expand_groups(tile_blocks(rstd_g, blocks), xf, groups, axis)
    shape = channel_shape(x, axis)
    scale, bias = tile_blocks(scale, blocks), tile_blocks(bias, blocks)
    out = (y * scale.reshape(shape) + bias.reshape(shape)).astype(dtype)
    return (out, mean_g, var_g), rstd_g


def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype
) -> jax.Array:
    """LayerNorm over the last axis, statistics in ``param_dtype(dtype)``, output in ``dtype``."""
    xf = x.astype(param_dtype(dtype))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return (centered * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(dtype)


@jax.checkpoint
def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√d)·v per head, rematerialized in the backward pass. q (B, N, heads, d),
    k and v (B, M, heads, d) → (B, N, heads, d).

    ``jax.nn.dot_product_attention``; in float64 the plain formula, entirely in float64 (that
    function's softmax is float32). What the remat works around: autodiff keeps the
    (B, heads, N, M) softmax for the backward pass, and XLA:TPU writes it to HBM in float32 and
    reads it back (the spatial reduction leaves M = 225 keys, while N is 14,400 tokens in
    stage 1). What it gains: only q, k and v are kept; the logits are recomputed from them in
    the backward pass (2·B·heads·N·M·d more FLOPs, under 1 % of the release step; its four
    stages' attention backward: 2.65 → 1.24 GB of HBM traffic, docs/traffic.md). Same values.
    """
    if q.dtype == jnp.float64:
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
        return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)
    return jax.nn.dot_product_attention(q, k, v)


@jax.checkpoint
def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU: the exact erf form, rematerialized in the backward pass.

    What the remat works around: autodiff would store the erf/exp intermediates of the Mix-FFN's
    4·E-wide hidden map for the backward pass; XLA:TPU writes them to HBM as float32 and
    bfloat16 copies. What it gains: only the GELU's input is kept (a stage-1 Mix-FFN alone on
    one v5e chip: HBM 0.56 → 0.07 GB, XLA FLOPs 14.1 → 14.9 G; the release bfloat16 train
    step, 4 images per chip: 1.8 GB less over the Mix-FFNs and their depthwise convolutions,
    docs/traffic.md). Same values.
    """
    return jax.nn.gelu(x, approximate=False)


def conv2d(
    x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0, groups: int = 1
) -> jax.Array:
    """PyTorch ``F.conv2d`` (symmetric padding, no bias) on NHWC ``x`` with HWIO kernel ``w``
    (kh, kw, C_in / groups, C_out): one ``lax.conv_general_dilated``; a dense convolution with
    stride ≥ ``SPACE_TO_DEPTH_MIN_STRIDE`` and a kernel wider than its stride as the exact
    stride-1 convolution over space-to-depth blocks (:func:`conv2d_space_to_depth`)."""
    if groups == 1 and stride >= SPACE_TO_DEPTH_MIN_STRIDE and min(w.shape[:2]) > stride:
        return conv2d_space_to_depth(x, w, stride, padding)
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=CONV_DIMENSIONS,
        feature_group_count=groups,
    )


def conv_s1(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 NHWC convolution (cross-correlation) with HWIO kernel ``w`` and explicit,
    possibly asymmetric ``padding`` ((top, bottom), (left, right)): one
    ``lax.conv_general_dilated``, or :func:`conv_s1_taps` when the input has more channels
    than the kernel has tap outputs (C_in > kh·kw·C_out: the blocks stems' 2×2 ``proj``)."""
    kh, kw, c_in, c_out = w.shape
    if kh * kw > 1 and c_in > kh * kw * c_out:
        return conv_s1_taps(x, w, padding)
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=CONV_DIMENSIONS)


def space_to_depth(x: jax.Array, s: int) -> jax.Array:
    """(B, H, W, C) → (B, H/s, W/s, s·s·C), channels ordered (row in block, column, C), as
    :func:`fgtbt_jax.ops.space_to_depth.space_to_depth` gives it, by two one-hot matmuls
    (each output is one input times 1 plus zeros: exact at ``HIGHEST`` precision).

    What it works around: XLA:TPU reshuffles a 3-channel NHWC image through arrays whose minor
    dimensions are (s, C) = (4, 3), stored padded to (8, 128) tiles (about 0.18 GB per pass at
    4 × 480²; two passes per stem). What it gains: the permutations run on the MXU between
    lane-dense arrays (0.7 GB less per release train step for both stems, docs/traffic.md)
    for 2·H·W·C·(H + W) FLOPs per image (5.3 GFLOP per stem at 4 × 480²).
    """
    b, h, w, c = x.shape
    rows = np.arange(h)[:, None, None] == s * np.arange(h // s)[:, None] + np.arange(s)
    cols = np.arange(w)[:, None, None] == s * np.arange(w // s)[:, None] + np.arange(s)
    y = jnp.einsum("bhwc,hir->bircw", x, jnp.asarray(rows, x.dtype), precision="highest")
    y = jnp.einsum("bircw,wjq->bijrqc", y, jnp.asarray(cols, x.dtype), precision="highest")
    return y.reshape(b, h // s, w // s, s * s * c)


def _taps_matrix(w: jax.Array) -> jax.Array:
    """HWIO kernel (kh, kw, C_in, C_out) → (C_in, kh·kw·C_out), columns ordered (a, b, o)."""
    kh, kw, c_in, c_out = w.shape
    return w.transpose(2, 0, 1, 3).reshape(c_in, kh * kw * c_out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_s1_taps(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """:func:`conv_s1` as one matmul to every tap's products, then their shifted sum (exact).

    ``P = x · W`` with W the kernel as a (C_in, kh·kw·C_out) matrix gives, at each input
    position, the products of all kh·kw taps; output (i, j) is the sum over taps (a, b) of
    tap (a, b)'s products at padded position (i + a, j + b). The same products, summed in
    float32 (or float64) across taps and rounded once to ``x``'s dtype. The VJP is written
    out so that the backward matmuls take the output gradient in ``x``'s dtype: the shifted
    copies of it that make dP are exact in that dtype (autodiff would carry them in float32).

    What it works around: XLA:TPU lowers the blocks stem's 2×2 convolution over a
    (B, 120, 120, 1024) map by padding the width to 128, expanding halo windows and keeping
    relaid copies of the input for the backward pass. What it gains: the wide input is read
    once, by a plain matmul, in the layout it has; the map that is shifted and summed has
    kh·kw·C_out channels (256 for 1024 in): the two stems' HBM traffic in the release bfloat16
    train step (4 images per chip) falls by 3.1 GB (docs/traffic.md). x: (B, H, W, C_in);
    w: (kh, kw, C_in, C_out) HWIO.
    """
    kh, kw, _, c_out = w.shape
    (top, bottom), (left, right) = padding
    b, h, wd, _ = x.shape
    taps = jnp.einsum(
        "bhwc,cd->bhwd", x, _taps_matrix(w), preferred_element_type=param_dtype(x.dtype)
    ).reshape(b, h, wd, kh, kw, c_out)
    taps = jnp.pad(taps, ((0, 0), (top, bottom), (left, right), (0, 0), (0, 0), (0, 0)))
    oh, ow = h + top + bottom - kh + 1, wd + left + right - kw + 1
    out = sum(taps[:, a : a + oh, c : c + ow, a, c] for a in range(kh) for c in range(kw))
    return out.astype(x.dtype)


def _conv_s1_taps_fwd(x: jax.Array, w: jax.Array, padding: Padding):
    return conv_s1_taps(x, w, padding), (x, w)


def _conv_s1_taps_bwd(padding: Padding, res, g: jax.Array):
    x, w = res
    kh, kw, c_in, c_out = w.shape
    (top, _), (left, _) = padding
    b, h, wd, _ = x.shape
    oh, ow = g.shape[1:3]
    zero = jnp.zeros((), g.dtype)
    # dP of tap (a, b) at input position p is g at output p + top - a (zero outside the map).
    d_taps = jnp.stack(
        [
            jax.lax.pad(
                g,
                zero,
                (
                    (0, 0, 0),
                    (a - top, h - oh - a + top, 0),
                    (c - left, wd - ow - c + left, 0),
                    (0, 0, 0),
                ),
            )
            for a in range(kh)
            for c in range(kw)
        ],
        axis=3,
    ).reshape(b, h, wd, kh * kw * c_out)
    matrix = _taps_matrix(w).astype(g.dtype)
    dx = jnp.einsum("bhwd,cd->bhwc", d_taps, matrix)
    dw = jnp.einsum("bhwc,bhwd->cd", x, d_taps, preferred_element_type=param_dtype(g.dtype))
    dw = dw.reshape(c_in, kh, kw, c_out).transpose(1, 2, 0, 3)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_s1_taps.defvjp(_conv_s1_taps_fwd, _conv_s1_taps_bwd)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """``F.interpolate(mode='bilinear', align_corners=False)`` on NHWC (half-pixel centres)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="bilinear", antialias=False)
