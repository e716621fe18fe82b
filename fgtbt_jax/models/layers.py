"""Basic layers with PyTorch semantics (NHWC throughout).

Module and parameter names mirror the PyTorch state dict of the release (SPEC §2.3), so that the
converter in :mod:`fgtbt_jax.porting.convert` is a table: a Flax ``Dense``/``Conv``/
``LayerNorm`` named ``fc1`` holds ``kernel``/``bias``/``scale`` where PyTorch holds
``fc1.weight``/``fc1.bias``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's GELU default is the exact erf form. Rematerialized: the backward pass recomputes
# it from its input instead of keeping the erf/exp intermediates of the forward pass.
gelu = jax.checkpoint(functools.partial(nn.gelu, approximate=False))


def param_dtype(dtype: Dtype) -> jnp.dtype:
    """The dtype of parameters, normalization statistics, the FFT and the loss for a compute
    ``dtype``: float32 for float32 and bfloat16 compute, float64 for float64 (everything then
    runs in float64; it needs ``jax_enable_x64``)."""
    return jnp.promote_types(dtype, jnp.float32)


def dense(features: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
    """``nn.Dense`` computing in ``dtype`` with parameters in ``param_dtype(dtype)``."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype(dtype), name=name)


def group_mean(x: jax.Array, axes: tuple[int, ...], groups: int) -> jax.Array:
    """Mean of ``x`` over ``axes`` (which include the batch axis 0), per group of samples.

    With ``groups`` > 1 the batch is split into that many consecutive groups, each reduced on its
    own: under data parallelism with one group per device this reproduces per-device statistics
    (the reference's unsynchronised BatchNorm and CSAM) inside a global-view ``jit``.
    Returns shape ``(groups, *kept_dims)``.
    """
    b = x.shape[0]
    if b % groups:
        raise ValueError(f"batch {b} is not divisible into {groups} statistic groups")
    xg = x.reshape((groups, b // groups) + x.shape[1:])
    return jnp.mean(xg, axis=tuple(a + 1 for a in axes))


def group_max(x: jax.Array, axes: tuple[int, ...], groups: int) -> jax.Array:
    b = x.shape[0]
    if b % groups:
        raise ValueError(f"batch {b} is not divisible into {groups} statistic groups")
    xg = x.reshape((groups, b // groups) + x.shape[1:])
    return jnp.max(xg, axis=tuple(a + 1 for a in axes))


def expand_groups(stat: jax.Array, x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """Broadcasts per-group statistics ``(groups, C)`` back to ``x`` (B, ..., C, ...), with the
    channels on ``axis`` (default: last)."""
    b = x.shape[0]
    stat = jnp.repeat(stat, b // groups, axis=0)  # (B, C)
    shape = [b] + [1] * (x.ndim - 1)
    shape[axis % x.ndim] = x.shape[axis]
    return stat.reshape(shape)


class BatchNorm(nn.Module):
    """BatchNorm with PyTorch semantics; channels on ``axis`` (default: the last one).

    Train mode normalizes with the biased batch variance and updates the running variance with
    the *unbiased* one (PyTorch), ``running = (1 - momentum) * running + momentum * batch`` with
    PyTorch's momentum 0.1 (Flax's 0.9). ``num_batches_tracked`` is kept as PyTorch does.
    Parameters and statistics are kept in ``param_dtype(dtype)`` (float32 for bfloat16).
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        axis = self.axis % x.ndim
        c = x.shape[axis]
        pd = param_dtype(self.dtype)
        scale = self.param("scale", nn.initializers.ones, (c,), pd)
        bias = self.param("bias", nn.initializers.zeros, (c,), pd)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), pd))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), pd))
        tracked = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        if train:
            g = self.stat_groups
            y, mean_g, var_g = _batch_norm_train(x, scale, bias, g, self.epsilon, self.dtype, axis)
            n = x.size // (c * g)
            if not self.is_initializing():
                unbiased = var_g * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean_g, axis=0)
                ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(unbiased, axis=0)
                tracked.value = tracked.value + 1
            return y
        shape = _channel_shape(x, axis)
        mean, var = ra_mean.value.reshape(shape), ra_var.value.reshape(shape)
        y = (x.astype(pd) - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.reshape(shape) + bias.reshape(shape)).astype(self.dtype)


def _bn_stats(xf: jax.Array, groups: int, epsilon: float, axis: int):
    axes = tuple(a for a in range(xf.ndim) if a != axis)
    mean_g = group_mean(xf, axes, groups)  # (g, C)
    centered = xf - expand_groups(mean_g, xf, groups, axis)
    var_g = group_mean(jnp.square(centered), axes, groups)
    return mean_g, var_g, centered, jax.lax.rsqrt(var_g + epsilon)


def _channel_shape(x: jax.Array, axis: int) -> list[int]:
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return shape


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _batch_norm_train(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    groups: int,
    epsilon: float,
    dtype: Dtype,
    axis: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Train-mode BatchNorm, channels on ``axis``: (normalized output, per-group mean and
    biased variance (groups, C)). The VJP keeps only ``x`` and the statistics and needs two
    passes over the data (the reductions, then the input gradient)."""
    return _batch_norm_train_fwd(x, scale, bias, groups, epsilon, dtype, axis)[0]


def _batch_norm_train_fwd(x, scale, bias, groups, epsilon, dtype, axis):
    xf = x.astype(param_dtype(dtype))
    mean_g, var_g, centered, rstd_g = _bn_stats(xf, groups, epsilon, axis)
    y = centered * expand_groups(rstd_g, xf, groups, axis)
    shape = _channel_shape(x, axis)
    out = ((y * scale.reshape(shape) + bias.reshape(shape)).astype(dtype), mean_g, var_g)
    return out, (x, scale, mean_g, rstd_g)


def _batch_norm_train_bwd(groups, epsilon, dtype, axis, res, cts):
    x, scale, mean_g, rstd_g = res
    gy, g_mean, g_var = cts
    xf = x.astype(param_dtype(dtype))
    gy = gy.astype(xf.dtype)
    axes = tuple(a for a in range(x.ndim) if a != axis)

    def expand(stat):
        return expand_groups(stat, xf, groups, axis)

    centered = xf - expand(mean_g)
    xhat = centered * expand(rstd_g)
    d_bias = jnp.sum(gy, axis=axes)
    d_scale = jnp.sum(gy * xhat, axis=axes)
    gxh = gy * scale.reshape(_channel_shape(x, axis))  # gradient w.r.t. xhat
    m1 = group_mean(gxh, axes, groups)  # (g, C)
    m2 = group_mean(gxh * xhat, axes, groups)
    n = x.size // (x.shape[axis] * groups)
    dx = expand(rstd_g) * (gxh - expand(m1) - xhat * expand(m2))
    # The statistics are outputs too (for the running averages); their cotangents are zero in
    # training, but are honoured for completeness.
    dx = dx + expand(g_mean / n) + centered * expand(2 * g_var / n)
    return dx.astype(x.dtype), d_scale, d_bias


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (rng stream ``drop_path``)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("drop_path")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        # A per-sample factor (0 or 1/keep): the backward pass keeps only this (B, 1, …) mask.
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


# --------------------------------------------------------------------------------------------
# Convolutions. XLA:CPU's generic convolution is slow for several of this network's shapes (1×1
# convolutions with many channels, depthwise convolutions, and above all the weight gradients of
# any convolution), so ``conv2d`` lowers each shape to the op that compiles well everywhere:
# matmuls, shifted multiply-adds, or a forward convolution with a matmul-based weight gradient.
# --------------------------------------------------------------------------------------------

_DN = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _lax_conv(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_DN)


def _conv_weight_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, padding: Padding) -> jax.Array:
    """Weight gradient (kh, kw, I, O) of a stride-1 convolution as kh matmuls.

    dW[i, j] = Σ_(b, y, x) x_pad[b, y + i, x + j] ⊗ g[b, y, x]. The kw column shifts of the
    operand with fewer channels are concatenated along channels (x_pad's, or those of g padded
    like the input gradient: x_pad[y + i, x + j] ↔ g_pad[y' + kh - 1 - i, x' + kw - 1 - j]), so
    each of the kh matmuls contracts over all positions at once.
    """
    (pt, pb), (pl, pr) = padding
    h, w = x.shape[1], x.shape[2]
    c, o = x.shape[-1], g.shape[-1]
    ho, wo = g.shape[1], g.shape[2]
    acc = param_dtype(x.dtype)  # float32 accumulation at least
    if c <= o:
        # Tie x to g (0·g[0]) so that XLA does not compute the shifted copies of x early in
        # the forward pass and keep them alive until the backward pass.
        x = x + 0 * g[:1, :1, :1, :1].astype(x.dtype)
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        cols = jnp.concatenate([xp[:, :, j : j + wo] for j in range(kw)], axis=-1)
        rows = [
            jnp.einsum("bhwk,bhwo->ko", cols[:, i : i + ho], g, preferred_element_type=acc)
            for i in range(kh)
        ]
        return jnp.stack(rows).reshape(kh, kw, c, o)
    gp = jnp.pad(g, ((0, 0), (kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr), (0, 0)))
    cols = jnp.concatenate([gp[:, :, kw - 1 - j : kw - 1 - j + w] for j in range(kw)], axis=-1)
    rows = [
        jnp.einsum(
            "bhwc,bhwk->ck", x, cols[:, kh - 1 - i : kh - 1 - i + h], preferred_element_type=acc
        )
        for i in range(kh)
    ]
    return jnp.stack(rows).reshape(kh, c, kw, o).transpose(0, 2, 1, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_s1(x: jax.Array, w: jax.Array, padding: Padding) -> jax.Array:
    """Stride-1 NHWC convolution (cross-correlation) with HWIO kernel ``w`` and explicit
    ``padding`` ((top, bottom), (left, right)); its VJP uses a forward convolution for the input
    gradient and matmuls for the weight gradient."""
    return _lax_conv(x, w, padding)


def _conv_s1_fwd(x: jax.Array, w: jax.Array, padding: Padding):
    return _lax_conv(x, w, padding), (x, w)


def _conv_s1_bwd(padding: Padding, res, g: jax.Array):
    x, w = res
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = _lax_conv(g, flipped, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    dw = _conv_weight_grad(x, g, kh, kw, padding)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_s1.defvjp(_conv_s1_fwd, _conv_s1_bwd)


def _space_to_depth(x: jax.Array, s: int) -> jax.Array:
    b, h, w, c = x.shape
    x = x.reshape(b, h // s, s, w // s, s, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // s, w // s, s * s * c)


def _strided_geometry(x_shape, k: int, s: int, p: int) -> tuple[int, int, int, int, int]:
    """(out H, out W, kernel in blocks, padded H, padded W) of a k×k stride-s conv, padding p,
    with the padded input a whole number of s-blocks covering every window."""
    h, w = x_shape[1], x_shape[2]
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    kb = -(-k // s)
    return ho, wo, kb, (ho + kb - 1) * s, (wo + kb - 1) * s


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_strided(x: jax.Array, w: jax.Array, stride: int, padding: int) -> jax.Array:
    """k×k stride-``stride`` NHWC convolution with symmetric ``padding`` (PyTorch semantics).

    Forward: XLA's convolution. VJP: the input gradient as a stride-1 convolution in the
    space-to-depth domain (blocks of stride², kernel ⌈k/stride⌉²) and the weight gradient as k
    matmuls over strided taps, instead of XLA's dilated convolutions, which are slow on CPU.
    """
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding),) * 2, dimension_numbers=_DN
    )


def _conv_strided_fwd(x, w, stride, padding):
    return conv_strided(x, w, stride, padding), (x, w)


def _conv_strided_bwd(stride, padding, res, g):
    x, w = res
    k, s, p = w.shape[0], stride, padding
    b, h, wd, c = x.shape
    o = w.shape[-1]
    ho, wo, kb, hp, wp = _strided_geometry(x.shape, k, s, p)
    # Input gradient: in space-to-depth form the convolution is stride-1 with kernel
    # W'[u, v, (i, j, c), o] = W[s·u + i, s·v + j, c, o] (zero beyond k).
    wpad = jnp.pad(w, ((0, kb * s - k), (0, kb * s - k), (0, 0), (0, 0)))
    w_s2d = wpad.reshape(kb, s, kb, s, c, o).transpose(0, 2, 1, 3, 4, 5)
    w_s2d = w_s2d.reshape(kb, kb, s * s * c, o)
    flipped = jnp.flip(w_s2d, (0, 1)).transpose(0, 1, 3, 2)
    dx_s2d = _lax_conv(g, flipped.astype(g.dtype), ((kb - 1, kb - 1), (kb - 1, kb - 1)))
    dx = dx_s2d.reshape(b, hp // s, wp // s, s, s, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dx.reshape(b, hp, wp, c)
    # Input rows / columns that no window reaches get zero gradient.
    dx = jnp.pad(dx, ((0, 0), (0, max(p + h - hp, 0)), (0, max(p + wd - wp, 0)), (0, 0)))
    dx = dx[:, p : p + h, p : p + wd]
    # Weight gradient: that of the stride-1 convolution in the space-to-depth domain, folded
    # back to k×k. The 0·g term ties the copies of x to the backward pass (see _depthwise_bwd).
    x = x + 0 * g[:1, :1, :1, :1].astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), (p, max(hp - h - p, 0)), (p, max(wp - wd - p, 0)), (0, 0)))
    xs = _space_to_depth(xp[:, :hp, :wp], s)
    dw = _conv_weight_grad(xs, g, kb, kb, ((0, 0), (0, 0)))  # (kb, kb, s·s·C, O)
    dw = dw.reshape(kb, kb, s, s, c, o).transpose(0, 2, 1, 3, 4, 5).reshape(kb * s, kb * s, c, o)
    return dx.astype(x.dtype), dw[:k, :k].astype(w.dtype)


conv_strided.defvjp(_conv_strided_fwd, _conv_strided_bwd)


def _depthwise3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    h, wd = x.shape[1], x.shape[2]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = None
    for i in range(3):
        for j in range(3):
            term = xp[:, i : i + h, j : j + wd] * w[i, j, 0]
            out = term if out is None else out + term
    return out


@jax.custom_vjp
def depthwise_conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    """Depthwise 3×3 convolution, padding 1, as nine shifted multiply-adds (one fused loop).

    x: (B, H, W, C) NHWC; w: (3, 3, 1, C). The VJP keeps only ``x`` and ``w``.
    """
    return _depthwise3x3(x, w)


def _depthwise_fwd(x: jax.Array, w: jax.Array):
    return _depthwise3x3(x, w), (x, w)


def _depthwise_bwd(res, g: jax.Array):
    x, w = res
    dx = _depthwise3x3(g, jnp.flip(w, (0, 1)))
    h, wd = x.shape[1], x.shape[2]
    # A data dependence on g (adding 0·g[0]) keeps XLA from computing the nine shifted copies
    # of x early in the forward pass and holding them until here.
    x = x + 0 * g[:1, :1, :1, :1].astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))).astype(param_dtype(x.dtype))
    gf = g.astype(xp.dtype)
    dw = jnp.stack(
        [
            jnp.sum(xp[:, i : i + h, j : j + wd] * gf, axis=(0, 1, 2))
            for i in range(3)
            for j in range(3)
        ]
    )
    return dx, dw.reshape(w.shape).astype(w.dtype)


depthwise_conv3x3.defvjp(_depthwise_fwd, _depthwise_bwd)


def conv2d(
    x: jax.Array, w: jax.Array, stride: int = 1, padding: int = 0, groups: int = 1
) -> jax.Array:
    """PyTorch ``F.conv2d`` (symmetric padding, no bias) on NHWC ``x`` with HWIO kernel ``w``
    (kh, kw, C_in / groups, C_out)."""
    kh, kw, cin, cout = w.shape
    b, h, wd, c = x.shape
    if groups == 1 and kh == kw == 1 and stride == 1 and padding == 0:
        return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])
    if groups == c == cout and cin == 1 and kh == kw == 3 and stride == 1 and padding == 1:
        return depthwise_conv3x3(x, w)
    if groups == 1 and kh == kw == stride and padding == 0 and h % stride == 0 and wd % stride == 0:
        # Non-overlapping patches: a patchify reshape and one matmul.
        patches = _space_to_depth(x, stride)
        return jnp.einsum("bhwk,ko->bhwo", patches, w.reshape(-1, cout))
    if groups == 1 and stride == 1:
        return conv_s1(x, w, ((padding, padding), (padding, padding)))
    if groups == 1:
        return conv_strided(x, w, stride, padding)
    return jax.lax.conv_general_dilated(
        x,
        w,
        (stride, stride),
        ((padding, padding), (padding, padding)),
        dimension_numbers=_DN,
        feature_group_count=groups,
    )


class Conv(nn.Module):
    """A PyTorch-style ``Conv2d`` on NHWC input, with ``nn.Conv``'s parameters (``kernel``
    (kh, kw, C_in / groups, C_out) HWIO and ``bias``) and initializers, computed by
    :func:`conv2d`."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        pd = param_dtype(self.dtype)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, pd)
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), pd)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = conv2d(x, kernel, self.stride, self.padding, self.groups)
        return y if bias is None else y + bias


class KernelBias(nn.Module):
    """Declares the parameters of an ``nn.Dense`` / ``nn.Conv`` / ``nn.ConvTranspose`` of
    kernel shape ``shape`` (same names and initializers) and returns ``(kernel, bias)``
    (bias None without ``use_bias``), for layers computed together in a fused form. The
    parameters are in ``param_dtype(dtype)``."""

    shape: tuple[int, ...]
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        pd = param_dtype(self.dtype)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, pd)
        bias = (
            self.param("bias", nn.initializers.zeros, (self.shape[-1],), pd)
            if self.use_bias
            else None
        )
        return kernel, bias


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    *,
    bias: bool = True,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> Conv:
    """A PyTorch-style ``Conv2d`` (symmetric explicit padding) on NHWC input."""
    return Conv(features, kernel, stride, padding, bias, groups, dtype, name=name)


@functools.partial(jax.checkpoint, static_argnums=(3, 4))
def _layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float, dtype: Dtype
) -> jax.Array:
    xf = x.astype(param_dtype(dtype))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    centered = xf - mean
    var = jnp.mean(jnp.square(centered), axis=-1, keepdims=True)
    return (centered * jax.lax.rsqrt(var + epsilon) * scale + bias).astype(dtype)


class LayerNorm(nn.Module):
    """LayerNorm over the last axis with ``nn.LayerNorm``'s parameters ``scale`` and ``bias``
    (statistics and parameters in ``param_dtype(dtype)``). Rematerialized: the backward pass
    keeps only the input."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        pd = param_dtype(self.dtype)
        scale = self.param("scale", nn.initializers.ones, (c,), pd)
        bias = self.param("bias", nn.initializers.zeros, (c,), pd)
        return _layer_norm(x, scale, bias, self.epsilon, self.dtype)


def layer_norm(epsilon: float, dtype: Dtype, name: str | None = None) -> LayerNorm:
    # Explicit eps: Flax defaults to 1e-6, PyTorch to 1e-5 (SPEC §2.1 says which is which).
    return LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
    """Bilinear ×``factor`` along ``axis`` (half-pixel centres, edge-clamped like PyTorch):
    output ``f·m + r`` reads ``m + t`` with ``t = (r + ½)/f - ½``, i.e. two neighbours."""
    n = x.shape[axis]
    take = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
    prev = jnp.concatenate([take(0, 1), take(0, n - 1)], axis=axis)
    nxt = jnp.concatenate([take(1, n), take(n - 1, n)], axis=axis)
    phases = []
    for r in range(factor):
        t = (r + 0.5) / factor - 0.5
        phases.append((-t) * prev + (1 + t) * x if t < 0 else (1 - t) * x + t * nxt)
    out = jnp.stack(phases, axis=axis + 1)
    return out.reshape(x.shape[:axis] + (n * factor,) + x.shape[axis + 1 :])


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """``F.interpolate(mode='bilinear', align_corners=False)`` on NHWC (half-pixel centres)."""
    b, h, w, c = x.shape
    if height % h == 0 and width % w == 0 and height >= h and width >= w:
        # Integer up-sampling: two-tap stencils instead of dense interpolation matrices.
        y = x if height == h else _upsample_axis(x, 1, height // h)
        return y if width == w else _upsample_axis(y, 2, width // w)
    return jax.image.resize(x, (b, height, width, c), method="bilinear", antialias=False)
