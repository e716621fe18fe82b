"""The decoder's exact algebraic fusions (``model.decoder_form="fused"``), SPEC §2.2.

Two pairs of consecutive linear layers of the decode head are composed into one, with the same
parameters and the same results up to float32 rounding (and the channel dropout moves onto the
following 1×1 layer's kernel, :func:`channel_dropout_linear`):

* ``linear_c{s}`` → bilinear resize to stage 1 → concat [c4, c3, c2, c1] → ``linear_fuse_conv``
  (:func:`fuse_stages`): each stage's Linear composed with its block of the 1×1 fusion kernel,
  run at the stage's own resolution, then resized and summed.
* ``upSample`` (ConvTranspose2d k4 s2 p1) → ``conv2`` (3×3, padding 1) (:func:`upsample_conv3x3`):
  one 3×3 convolution at the input resolution producing the four output phases.

They are a formulation of the model, not a backend trick: fewer FLOPs and smaller intermediates
on any device. The ops they compute with (``resize_bilinear``, ``conv_s1``) come from the
injected ops module (:mod:`fgtbt_jax.ops`). NHWC throughout.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.models.layers import Dtype


def fuse_stages(
    feats: list[jax.Array],
    linear: list[tuple[jax.Array, jax.Array]],
    fuse: jax.Array,
    dtype: Dtype,
    *,
    ops: types.ModuleType,
) -> jax.Array:
    """SPEC §2.2's ``linear_c{s}`` → resize to stage 1 → concat [c4, c3, c2, c1] →
    ``linear_fuse.conv`` (1×1, no bias), in a cheaper order with the same parameters.

    Each stage's ``linear_c{s}`` (kernel (E_s, D), bias (D,)) is composed with its block of the
    fusion kernel ``fuse`` (1, 1, n·D, D): both are linear and bilinear resizing commutes with
    channel mixing, so the fusion runs at each stage's own resolution and the n·D-channel
    concatenation at stage-1 resolution never exists. feats: n NHWC maps at strides 4..32;
    returns (B, H1, W1, D).
    """
    n = len(feats)
    d = fuse.shape[-1]
    h, w = feats[0].shape[1:3]
    blocks = fuse.reshape(n, d, d)  # in concatenation order [c4, c3, c2, c1]
    x = None
    for s, (f, (kc, bc)) in enumerate(zip(feats, linear, strict=True)):
        block = blocks[n - 1 - s]
        y = jnp.einsum("bhwc,cd->bhwd", f.astype(dtype), (kc @ block).astype(dtype))
        y = y + (bc @ block).astype(dtype)
        y = y if s == 0 else ops.resize_bilinear(y, h, w)
        x = y if x is None else x + y
    # Materialized once: XLA would otherwise recompute the n-term sum inside each pass of the
    # following BatchNorm, forward and backward (n reads of the (B, H1, W1, D) map per pass).
    return jax.lax.optimization_barrier(x)


def channel_dropout_linear(
    x: jax.Array, scale: jax.Array | None, kernel: jax.Array, bias: jax.Array, dtype: Dtype
) -> jax.Array:
    """Dropout2d with per-sample channel factors ``scale`` (B, C) (None: no dropout), then a
    1×1 layer (``kernel`` (C, O), ``bias`` (O,)), on NHWC ``x`` (B, H, W, C) → (B, H, W, O).

    The factors are constant over H and W, so they scale the kernel's rows instead of the map:
    ``(x ⊙ s) · K = x · (s ⊙ K)``, one matmul with a per-sample kernel. The (B, H, W, C) masked
    copy and its gradient never exist.
    """
    if scale is None:
        return jnp.einsum("bhwc,co->bhwo", x, kernel.astype(dtype)) + bias.astype(dtype)
    per_sample = (scale[:, :, None] * kernel[None]).astype(dtype)
    return jnp.einsum("bhwc,bco->bhwo", x, per_sample) + bias.astype(dtype)


def _taps(kind: str) -> np.ndarray:
    """0/1 tap tables of ConvTranspose2d(k=4, s=2, p=1) along one axis, with output phases a
    (output 2m + a) and input offsets e (input m + e, e = -1, 0, 1).

    ``"up"``: T[a, e + 1, k] = 1 when kernel tap k links input m + e to output 2m + a.
    ``"up_conv"``: T[a, e + 1, d + 1, k] = 1 when, for a following 3-tap convolution with tap
    d (reading up-sampled position 2m + a + d), kernel tap k links input m + e to it.
    """
    up = np.zeros((2, 3, 4), np.float32)
    for a in range(2):
        for e in (-1, 0, 1):
            k = a + 1 - 2 * e
            if 0 <= k < 4:
                up[a, e + 1, k] = 1
    if kind == "up":
        return up
    both = np.zeros((2, 3, 3, 4), np.float32)
    for a in range(2):
        for d in (-1, 0, 1):
            q = a + d  # up-sampled row 2m + q = 2(m + q // 2) + q % 2
            for e in (-1, 0, 1):
                src = q // 2 + e  # input offset from m
                if -1 <= src <= 1:
                    both[a, src + 1, d + 1] += up[q % 2, e + 1]
    return both


def _depth_to_space(y: jax.Array, channels: int) -> jax.Array:
    """(B, H, W, 2·2·C) with channels ordered (a, b, c) → (B, 2H, 2W, C), out[2m+a, 2n+b]."""
    b, h, w, _ = y.shape
    y = y.reshape(b, h, w, 2, 2, channels).transpose(0, 1, 3, 2, 4, 5)
    return y.reshape(b, 2 * h, 2 * w, channels)


def conv_transpose_4x4_s2(
    x: jax.Array, kernel: jax.Array, bias: jax.Array, *, ops: types.ModuleType
) -> jax.Array:
    """PyTorch ``ConvTranspose2d(k=4, s=2, p=1)`` on NHWC as a 3×3 convolution to the four
    output phases plus depth-to-space. ``kernel`` (4, 4, C_out, C_in) is the Flax
    ``ConvTranspose(transpose_kernel=True)`` layout (= torch weight .transpose(2, 3, 1, 0)).
    No multiply-add hits the zeros that the lhs-dilated ``lax.conv_transpose`` inserts.
    """
    t = jnp.asarray(_taps("up"), kernel.dtype)
    c_out = kernel.shape[2]
    k3 = jnp.einsum("aek,bfl,klci->efiabc", t, t, kernel).reshape(3, 3, kernel.shape[3], -1)
    y = ops.conv_s1(x, k3.astype(x.dtype), ((1, 1), (1, 1)))
    return _depth_to_space(y, c_out) + bias


def upsample_conv3x3(
    x: jax.Array, kt: jax.Array, bt: jax.Array, w2: jax.Array, *, ops: types.ModuleType
) -> jax.Array:
    """``conv3x3_pad1(ConvTranspose2d_k4_s2_p1(x; kt, bt); w2)`` without the intermediate map
    (the decoder's ``upSample`` then ``conv2``).

    The two linear layers compose into one 3×3 convolution at the input resolution with
    2·2·C_out outputs (one per output phase): about 4× fewer FLOPs than running the 3×3
    convolution on the up-sampled map. The composed kernel sees the transposed convolution's
    values just outside the map where the second convolution pads with zeros, so the four
    border lines of the output are recomputed exactly from their definition.

    x: (B, H, W, C_in) NHWC; kt (4, 4, C_mid, C_in) Flax ConvTranspose layout; bt (C_mid,);
    w2 (3, 3, C_mid, C_out) HWIO. Returns (B, 2H, 2W, C_out).
    """
    c_out = w2.shape[-1]
    both = jnp.asarray(_taps("up_conv"), kt.dtype)
    kc = jnp.einsum("aedk,bfgl,klci,dgco->efiabo", both, both, kt, w2)
    kc = kc.reshape(3, 3, x.shape[-1], 4 * c_out).astype(x.dtype)
    out = _depth_to_space(ops.conv_s1(x, kc, ((1, 1), (1, 1))), c_out)
    out = out + jnp.einsum("c,dgco->o", bt, w2).astype(x.dtype)  # the bias, away from borders

    def up(strip: jax.Array) -> jax.Array:
        return conv_transpose_4x4_s2(strip, kt.astype(x.dtype), bt.astype(x.dtype), ops=ops)

    w2 = w2.astype(x.dtype)
    top = ops.conv_s1(up(x[:, :2])[:, :2], w2, ((1, 0), (1, 1)))
    bottom = ops.conv_s1(up(x[:, -2:])[:, -2:], w2, ((0, 1), (1, 1)))
    left = ops.conv_s1(up(x[:, :, :2])[:, :, :2], w2, ((1, 1), (1, 0)))
    right = ops.conv_s1(up(x[:, :, -2:])[:, :, -2:], w2, ((1, 1), (0, 1)))
    # The border lines replace the composed kernel's (left and right win at the corners), by
    # selects that fuse with the depth-to-space copy instead of four in-place updates.
    rows = jnp.arange(out.shape[1])[:, None, None]
    cols = jnp.arange(out.shape[2])[None, :, None]
    out = jnp.where(rows == 0, top, jnp.where(rows == out.shape[1] - 1, bottom, out))
    return jnp.where(cols == 0, left, jnp.where(cols == out.shape[2] - 1, right, out))
