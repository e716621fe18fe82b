"""XLA:CPU fast paths of the network's ops (``model.kernels="cpu"``, the default on CPU).

Each function computes what its namesake in :mod:`fgtbt_jax.ops.xla` computes (same signature,
same parameters, results equal to float32 rounding; ``tests/ops`` checks values and VJPs), in a
form that XLA:CPU runs faster: matmuls instead of XLA:CPU's generic convolution, hand-written
VJPs instead of its slow dilated-convolution weight gradients, rematerialization of cheap
elementwise ops. On GPU/TPU these forms are not expected to help (cuDNN and the MXU run native
convolutions and their gradients well), so ``model.kernels="auto"`` picks them only when the
default backend is CPU. The decoder's algebraic fusions are not here: they are a formulation of
the model (``model.decoder_form="fused"``, :mod:`fgtbt_jax.models.fused_decoder`), available with
either op path; ``decoder_form="auto"`` picks them with these ops.

Gains are stated per function where measured. What is measured as a whole: the release
benchmark with ``--config.model.kernels=cpu`` against ``=xla`` on the same 2-core CPU
(README "Speed", ``benchmarks/release_cpu_kernels_*.json``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from fgtbt_jax.ops import xla
from fgtbt_jax.ops.common import Padding, param_dtype
from fgtbt_jax.ops.space_to_depth import space_to_depth

# XLA:CPU weakness: the jitted parameter initialisation (a threefry draw and a truncated-normal
# transform per parameter, ~1,400 kernels for the tiny network) spends most of its compile time
# in LLVM optimizing kernels that run once. Compiled without backend optimization: 85 s → 22 s
# for the tiny network on 2 cores; initial values change by float32 rounding (≤ 2e-7).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}

NAME = "cpu"  # the ``model.kernels`` value of this op path

# --------------------------------------------------------------------------------------------
# Normalization and activation
# --------------------------------------------------------------------------------------------


# The two-pass BatchNorm VJP was written for XLA:CPU (which keeps autodiff's float32 centred
# copies alive); it is the xla path's BatchNorm now too (issue #29: fewer bytes on TPU).
batch_norm_train = xla.batch_norm_train

layer_norm = jax.checkpoint(xla.layer_norm, static_argnums=(3, 4))
layer_norm.__doc__ = """:func:`fgtbt_jax.ops.xla.layer_norm`, rematerialized.

XLA:CPU weakness: the forward pass's float32 centred copy and statistics would be stored for
the backward pass (memory traffic as large as the activation, at every token LayerNorm);
recomputing them from the input is cheaper on a bandwidth-bound CPU. Applied whatever
``model.remat`` says. Gain: not measured separately."""

gelu = xla.gelu  # rematerialized there already (XLA:CPU gains from it as XLA:TPU does)
attention = xla.attention


# --------------------------------------------------------------------------------------------
# Convolutions. XLA:CPU's generic convolution is slow for several of this network's shapes (1×1
# convolutions with many channels, depthwise convolutions, and above all the weight gradients of
# any convolution), so ``conv2d`` lowers each shape to the op that XLA:CPU runs well: matmuls,
# shifted multiply-adds, or a forward convolution with a matmul-based weight gradient.
# --------------------------------------------------------------------------------------------


def conv_weight_grad(x: jax.Array, g: jax.Array, kh: int, kw: int, padding: Padding) -> jax.Array:
    """Weight gradient (kh, kw, I, O) of a stride-1 convolution as kh matmuls.

    dW[i, j] = Σ_(b, y, x) x_pad[b, y + i, x + j] ⊗ g[b, y, x]. The kw column shifts of the
    operand with fewer channels are concatenated along channels (x_pad's, or those of g padded
    like the input gradient: x_pad[y + i, x + j] ↔ g_pad[y' + kh - 1 - i, x' + kw - 1 - j]), so
    each of the kh matmuls contracts over all positions at once.

    XLA:CPU weakness: autodiff's weight gradient is a convolution with the output gradient as a
    (dilated) kernel, which XLA:CPU lowers to a slow generic loop nest.
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
    ``padding`` ((top, bottom), (left, right)).

    Forward and input gradient: XLA's convolution. XLA:CPU weakness worked around: the weight
    gradient (see :func:`conv_weight_grad`), computed here as kh matmuls. Gain: not measured
    separately.
    """
    return xla.conv_s1(x, w, padding)


def _conv_s1_fwd(x: jax.Array, w: jax.Array, padding: Padding):
    return xla.conv_s1(x, w, padding), (x, w)


def _conv_s1_bwd(padding: Padding, res, g: jax.Array):
    x, w = res
    kh, kw = w.shape[:2]
    (pt, pb), (pl, pr) = padding
    flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    dx = xla.conv_s1(g, flipped, ((kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)))
    dw = conv_weight_grad(x, g, kh, kw, padding)
    return dx.astype(x.dtype), dw.astype(w.dtype)


conv_s1.defvjp(_conv_s1_fwd, _conv_s1_bwd)


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
    space-to-depth domain (blocks of stride², kernel ⌈k/stride⌉²) and the weight gradient as
    matmuls over strided taps. XLA:CPU weakness: autodiff gives both as dilated convolutions
    (lhs- and rhs-dilated), which XLA:CPU runs as slow generic loops (the overlapping patch
    embeddings, 7×7/4 and 3×3/2). Gain: not measured separately.
    """
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((padding, padding),) * 2, dimension_numbers=xla.CONV_DIMENSIONS
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
    dx_s2d = xla.conv_s1(g, flipped.astype(g.dtype), ((kb - 1, kb - 1), (kb - 1, kb - 1)))
    dx = dx_s2d.reshape(b, hp // s, wp // s, s, s, c).transpose(0, 1, 3, 2, 4, 5)
    dx = dx.reshape(b, hp, wp, c)
    # Input rows / columns that no window reaches get zero gradient.
    dx = jnp.pad(dx, ((0, 0), (0, max(p + h - hp, 0)), (0, max(p + wd - wp, 0)), (0, 0)))
    dx = dx[:, p : p + h, p : p + wd]
    # Weight gradient: that of the stride-1 convolution in the space-to-depth domain, folded
    # back to k×k. The 0·g term ties the copies of x to the backward pass (see _depthwise_bwd).
    x = x + 0 * g[:1, :1, :1, :1].astype(x.dtype)
    xp = jnp.pad(x, ((0, 0), (p, max(hp - h - p, 0)), (p, max(wp - wd - p, 0)), (0, 0)))
    xs = space_to_depth(xp[:, :hp, :wp], s)
    dw = conv_weight_grad(xs, g, kb, kb, ((0, 0), (0, 0)))  # (kb, kb, s·s·C, O)
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
    XLA:CPU weakness: a ``feature_group_count=C`` convolution (the MLP's depthwise conv, C up
    to 2048 channels) and its gradients run as a slow generic loop nest on XLA:CPU; nine
    elementwise multiply-adds fuse into one vectorized loop. Gain: not measured separately.
    """
    return _depthwise3x3(x, w)


def _depthwise_fwd(x: jax.Array, w: jax.Array):
    return _depthwise3x3(x, w), (x, w)


def _depthwise_bwd(res, g: jax.Array):
    x, w = res
    dx = _depthwise3x3(g, jnp.flip(w, (0, 1)))
    h, wd = x.shape[1], x.shape[2]
    # A data dependence on g (adding 0·g[0]) keeps XLA's scheduler from computing the nine
    # shifted copies of x early in the forward pass and holding them until here.
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
    """:func:`fgtbt_jax.ops.xla.conv2d` lowered per shape to what XLA:CPU runs well: 1×1 as a
    matmul, depthwise 3×3 as :func:`depthwise_conv3x3`, non-overlapping patches
    (kernel = stride, the ``sr`` convs) as a reshape and one matmul, other stride-1 and strided
    convolutions with matmul weight gradients (:func:`conv_s1`, :func:`conv_strided`).

    XLA:CPU weakness: its generic convolution is slow for 1×1 convolutions with many channels
    and for patchify convolutions, whose matmul form runs at GEMM speed. Gain: not measured
    separately.
    """
    kh, kw, cin, cout = w.shape
    b, h, wd, c = x.shape
    if groups == 1 and kh == kw == 1 and stride == 1 and padding == 0:
        return jnp.einsum("bhwc,co->bhwo", x, w[0, 0])
    if groups == c == cout and cin == 1 and kh == kw == 3 and stride == 1 and padding == 1:
        return depthwise_conv3x3(x, w)
    if groups == 1 and kh == kw == stride and padding == 0 and h % stride == 0 and wd % stride == 0:
        return jnp.einsum("bhwk,ko->bhwo", space_to_depth(x, stride), w.reshape(-1, cout))
    if groups == 1 and stride == 1:
        return conv_s1(x, w, ((padding, padding), (padding, padding)))
    if groups == 1:
        return conv_strided(x, w, stride, padding)
    return xla.conv2d(x, w, stride, padding, groups)


# --------------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------------


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
    """:func:`fgtbt_jax.ops.xla.resize_bilinear`; integer up-sampling as two-tap stencils.

    XLA:CPU weakness: ``jax.image.resize`` lowers to dense (out × in) interpolation matrices
    contracted with the map, i.e. matmuls over mostly zeros; the stencil reads two neighbours
    per output. Other sizes fall back to ``jax.image.resize``. Gain: not measured separately.
    """
    _, h, w, _ = x.shape
    if height % h == 0 and width % w == 0 and height >= h and width >= w:
        y = x if height == h else _upsample_axis(x, 1, height // h)
        return y if width == w else _upsample_axis(y, 2, width // w)
    return xla.resize_bilinear(x, height, width)
