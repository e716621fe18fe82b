"""SegFormer-style heatmap decoder (``decode_head``), SPEC §2.2. NHWC throughout."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.models.layers import BatchNorm, Dtype, KernelBias, conv, conv_s1, resize_bilinear


class Bottleneck(nn.Module):
    """Pre-activation bottleneck ``conv1``: 256 → 128 (mid 64) with a BN-ReLU-1×1 shortcut."""

    features: int = 128
    mid: int = 64
    stat_groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = dict(stat_groups=self.stat_groups, dtype=self.dtype)
        dt = self.dtype
        y = nn.relu(BatchNorm(name="bn1", **bn)(x, train))
        y = conv(self.mid, 1, bias=False, dtype=dt, name="conv1")(y)
        y = nn.relu(BatchNorm(name="bn2", **bn)(y, train))
        y = conv(self.mid, 3, 1, 1, bias=False, dtype=dt, name="conv2")(y)
        y = nn.relu(BatchNorm(name="bn3", **bn)(y, train))
        y = conv(self.features, 1, bias=False, dtype=dt, name="conv3")(y)
        s = nn.relu(BatchNorm(name="downsample_0", **bn)(x, train))
        s = conv(self.features, 1, bias=False, dtype=dt, name="downsample_2")(s)
        return y + s


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


def conv_transpose_4x4_s2(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """PyTorch ``ConvTranspose2d(k=4, s=2, p=1)`` on NHWC as a 3×3 convolution to the four
    output phases plus depth-to-space. ``kernel`` (4, 4, C_out, C_in) is the Flax
    ``ConvTranspose(transpose_kernel=True)`` layout (= torch weight .transpose(2, 3, 1, 0))."""
    t = jnp.asarray(_taps("up"), kernel.dtype)
    c_out = kernel.shape[2]
    k3 = jnp.einsum("aek,bfl,klci->efiabc", t, t, kernel).reshape(3, 3, kernel.shape[3], -1)
    y = conv_s1(x, k3.astype(x.dtype), ((1, 1), (1, 1)))
    return _depth_to_space(y, c_out) + bias


def upsample_conv3x3(x: jax.Array, kt: jax.Array, bt: jax.Array, w2: jax.Array) -> jax.Array:
    """``conv3x3_pad1(ConvTranspose2d_k4_s2_p1(x; kt, bt); w2)`` without the intermediate map.

    The two linear layers compose into one 3×3 convolution at the input resolution with
    2·2·C_out outputs (one per output phase): about 4× fewer FLOPs than running the 3×3
    convolution on the up-sampled map. The composed kernel sees the transposed convolution's
    values just outside the map where the second convolution pads with zeros, so the four
    border lines of the output are recomputed exactly from their definition.

    x: (B, H, W, C_in) NHWC; kt (4, 4, C_mid, C_in) Flax ConvTranspose layout; bt (C_mid,);
    w2 (3, 3, C_mid, C_out) HWIO. Returns (B, 2H, 2W, C_out).
    """
    b, h, w, _ = x.shape
    c_out = w2.shape[-1]
    both = jnp.asarray(_taps("up_conv"), kt.dtype)
    kc = jnp.einsum("aedk,bfgl,klci,dgco->efiabo", both, both, kt, w2)
    kc = kc.reshape(3, 3, x.shape[-1], 4 * c_out).astype(x.dtype)
    out = _depth_to_space(conv_s1(x, kc, ((1, 1), (1, 1))), c_out)
    out = out + jnp.einsum("c,dgco->o", bt, w2).astype(x.dtype)  # the bias, away from borders

    def up(strip: jax.Array) -> jax.Array:
        return conv_transpose_4x4_s2(strip, kt.astype(x.dtype), bt.astype(x.dtype))

    w2 = w2.astype(x.dtype)
    top = conv_s1(up(x[:, :2])[:, :2], w2, ((1, 0), (1, 1)))
    bottom = conv_s1(up(x[:, -2:])[:, -2:], w2, ((0, 1), (1, 1)))
    left = conv_s1(up(x[:, :, :2])[:, :, :2], w2, ((1, 1), (1, 0)))
    right = conv_s1(up(x[:, :, -2:])[:, :, -2:], w2, ((1, 1), (0, 1)))
    out = out.at[:, :1].set(top).at[:, -1:].set(bottom)
    return out.at[:, :, :1].set(left).at[:, :, -1:].set(right)


class DecodeHead(nn.Module):
    """Four stage maps (strides 4..32, NHWC) → heatmaps (B, 2·H1, 2·W1, num_landmarks).

    Computed in an algebraically equivalent, cheaper order (same parameters): each stage's
    ``linear_c{s}`` is composed with its block of ``linear_fuse_conv`` (both linear, and
    bilinear resizing commutes with channel mixing), so the fusion runs at each stage's own
    resolution instead of on the 4·D-channel concatenation; ``upSample`` and ``conv2`` run as
    one convolution (:func:`upsample_conv3x3`).
    """

    embed_dims: Sequence[int]
    decoder_dim: int = 768
    num_landmarks: int = 124
    dropout: float = 0.1
    stat_groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool) -> jax.Array:
        dt = self.dtype
        d = self.decoder_dim
        n = len(feats)
        h, w = feats[0].shape[1:3]
        linear = [
            KernelBias((f.shape[-1], d), dtype=dt, name=f"linear_c{s + 1}")()
            for s, f in enumerate(feats)
        ]
        fuse, _ = KernelBias((1, 1, n * d, d), use_bias=False, dtype=dt, name="linear_fuse_conv")()
        fuse = fuse.reshape(n, d, d)  # blocks in concatenation order [c4, c3, c2, c1]
        x = None
        for s, (f, (kc, bc)) in enumerate(zip(feats, linear, strict=True)):
            block = fuse[n - 1 - s]
            y = jnp.einsum("bhwc,cd->bhwd", f.astype(dt), (kc @ block).astype(dt))
            y = y + (bc @ block).astype(dt)
            y = y if s == 0 else resize_bilinear(y, h, w)
            x = y if x is None else x + y
        x = nn.relu(
            BatchNorm(stat_groups=self.stat_groups, dtype=dt, name="linear_fuse_bn")(x, train)
        )
        # Dropout2d: whole channels, i.e. the mask is shared over H and W.
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
        x = conv(256, 1, dtype=dt, name="linear_pred")(x)
        x = Bottleneck(128, 64, self.stat_groups, dt, name="conv1")(x, train)
        # ConvTranspose2d(k=4, s=2, p=1) then conv2 (3×3, no bias), fused.
        kt, bt = KernelBias((4, 4, 128, x.shape[-1]), dtype=dt, name="upSample")()
        w2, _ = KernelBias(
            (3, 3, 128, self.num_landmarks), use_bias=False, dtype=dt, name="conv2"
        )()
        out = upsample_conv3x3(x, kt, bt, w2)
        if self.is_initializing():
            # ``conv_seg`` is in the release checkpoint but unused; keep it for strict export.
            KernelBias((1, 1, 128, self.num_landmarks), dtype=dt, name="conv_seg")()
        return out
