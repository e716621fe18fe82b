"""The network's numerical ops as the SPEC writes them, in standard JAX (``model.kernels="xla"``).

Every function here is the plain formula on ``lax``/``jax.numpy`` ops, differentiated by JAX's
own autodiff: what XLA compiles well on GPU and TPU. :mod:`fgtbt_jax.ops.cpu` holds faster
XLA:CPU lowerings of the same functions (same signatures, same results to float32 rounding).
All tensors are NHWC unless an ``axis`` says where the channels are.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fgtbt_jax.ops.common import (
    Dtype,
    Padding,
    channel_shape,
    expand_groups,
    group_mean,
    param_dtype,
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
    xf: jax.Array, groups: int, epsilon: float, axis: int
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per-group mean and biased variance (groups, C) of ``xf`` with channels on ``axis``, plus
    the centred input and the per-group 1/sqrt(var + eps)."""
    axes = tuple(a for a in range(xf.ndim) if a != axis)
    mean_g = group_mean(xf, axes, groups)  # (g, C)
    centered = xf - expand_groups(mean_g, xf, groups, axis)
    var_g = group_mean(jnp.square(centered), axes, groups)
    return mean_g, var_g, centered, jax.lax.rsqrt(var_g + epsilon)


def batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Dtype,
    axis: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm with batch statistics, channels on ``axis``: (normalized output in
    ``dtype``, per-group mean and biased variance (groups, C)). Statistics in
    ``param_dtype(dtype)`` (float32 for float32 and bfloat16)."""
    return batch_norm_train_and_rstd(x, scale, bias, groups, epsilon, dtype, axis)[0]


def batch_norm_train_and_rstd(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Dtype,
    axis: int,
) -> tuple[tuple[jax.Array, jax.Array, jax.Array], jax.Array]:
    """:func:`batch_norm_train`'s outputs and the per-group 1/sqrt(var + eps) (groups, C) it
    normalized with (for a hand-written VJP, which then need not compute it again)."""
    xf = x.astype(param_dtype(dtype))
    mean_g, var_g, centered, rstd_g = batch_norm_statistics(xf, groups, epsilon, axis)
    y = centered * expand_groups(rstd_g, xf, groups, axis)
    shape = channel_shape(x, axis)
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
