"""The network's numerical ops as the SPEC writes them, in standard JAX (``model.kernels="xla"``).

Every function here is the plain formula on ``lax``/``jax.numpy`` ops, differentiated by JAX's
own autodiff (except ``batch_norm_train``, whose two-pass VJP keeps fewer bytes for the
backward pass): what XLA compiles well on GPU and TPU. :mod:`fgtbt_jax.ops.cpu` holds faster
XLA:CPU lowerings of the same functions (same signatures, same results to float32 rounding).
All tensors are NHWC unless an ``axis`` says where the channels are.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

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


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's default GELU: the exact erf form."""
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
    ``lax.conv_general_dilated``."""
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=CONV_DIMENSIONS)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """``F.interpolate(mode='bilinear', align_corners=False)`` on NHWC (half-pixel centres)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="bilinear", antialias=False)
