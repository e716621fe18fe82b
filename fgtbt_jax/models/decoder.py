"""SegFormer-style heatmap decoder (``decode_head``), SPEC §2.2. NHWC throughout."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.models.layers import BatchNorm, Dtype, KernelBias, conv, dense, param_dtype
from fgtbt_jax.ops import cpu, kernel_ops


class Bottleneck(nn.Module):
    """Pre-activation bottleneck ``conv1``: 256 → 128 (mid 64) with a BN-ReLU-1×1 shortcut."""

    features: int = 128
    mid: int = 64
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        bn = dict(stat_groups=self.stat_groups, dtype=self.dtype, kernels=self.kernels)
        cv = dict(bias=False, dtype=self.dtype, kernels=self.kernels)
        y = nn.relu(BatchNorm(name="bn1", **bn)(x, train))
        y = conv(self.mid, 1, name="conv1", **cv)(y)
        y = nn.relu(BatchNorm(name="bn2", **bn)(y, train))
        y = conv(self.mid, 3, 1, 1, name="conv2", **cv)(y)
        y = nn.relu(BatchNorm(name="bn3", **bn)(y, train))
        y = conv(self.features, 1, name="conv3", **cv)(y)
        s = nn.relu(BatchNorm(name="downsample_0", **bn)(x, train))
        s = conv(self.features, 1, name="downsample_2", **cv)(s)
        return y + s


class DecodeHead(nn.Module):
    """Four stage maps (strides 4..32, NHWC) → heatmaps (B, 2·H1, 2·W1, num_landmarks).

    With ``kernels="xla"`` the layers run in SPEC §2.2's order; with ``kernels="cpu"`` the two
    linear pairs run in the cheaper fused forms of :mod:`fgtbt_jax.ops.cpu` (same parameters):
    ``linear_c{s}`` composed with ``linear_fuse_conv`` (:func:`~fgtbt_jax.ops.cpu.decoder_fuse`)
    and ``upSample`` with ``conv2`` (:func:`~fgtbt_jax.ops.cpu.upsample_conv3x3`).
    """

    embed_dims: Sequence[int]
    decoder_dim: int = 768
    num_landmarks: int = 124
    dropout: float = 0.1
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool) -> jax.Array:
        dt, kn = self.dtype, self.kernels
        d = self.decoder_dim
        h, w = feats[0].shape[1:3]
        if kn == "cpu":
            linear = [
                KernelBias((f.shape[-1], d), dtype=dt, name=f"linear_c{s + 1}")()
                for s, f in enumerate(feats)
            ]
            fuse, _ = KernelBias(
                (1, 1, len(feats) * d, d), use_bias=False, dtype=dt, name="linear_fuse_conv"
            )()
            x = cpu.decoder_fuse(list(feats), linear, fuse, dt)
        else:
            # linear_c{s} per stage, resized to stage 1, concatenated as [c4, c3, c2, c1].
            maps = [dense(d, dtype=dt, name=f"linear_c{s + 1}")(f) for s, f in enumerate(feats)]
            maps = [maps[0]] + [kernel_ops(kn).resize_bilinear(m, h, w) for m in maps[1:]]
            x = jnp.concatenate(maps[::-1], axis=-1)
            x = conv(d, 1, bias=False, dtype=dt, kernels=kn, name="linear_fuse_conv")(x)
        x = BatchNorm(stat_groups=self.stat_groups, dtype=dt, kernels=kn, name="linear_fuse_bn")(
            x, train
        )
        x = nn.relu(x)
        # Dropout2d: whole channels, i.e. the mask is shared over H and W.
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
        x = conv(256, 1, dtype=dt, kernels=kn, name="linear_pred")(x)
        x = Bottleneck(128, 64, self.stat_groups, dt, kn, name="conv1")(x, train)
        if kn == "cpu":
            kt, bt = KernelBias((4, 4, 128, x.shape[-1]), dtype=dt, name="upSample")()
            w2, _ = KernelBias(
                (3, 3, 128, self.num_landmarks), use_bias=False, dtype=dt, name="conv2"
            )()
            out = cpu.upsample_conv3x3(x, kt, bt, w2)
        else:
            # PyTorch ConvTranspose2d(k=4, s=2, p=1): Flax padding k - 1 - p on each side, with
            # the kernel flipped and transposed as PyTorch's (transpose_kernel).
            x = nn.ConvTranspose(
                128,
                (4, 4),
                strides=(2, 2),
                padding=((2, 2), (2, 2)),
                transpose_kernel=True,
                dtype=dt,
                param_dtype=param_dtype(dt),
                name="upSample",
            )(x)
            out = conv(self.num_landmarks, 3, 1, 1, bias=False, dtype=dt, kernels=kn, name="conv2")(
                x
            )
        if self.is_initializing():
            # ``conv_seg`` is in the release checkpoint but unused; keep it for strict export.
            KernelBias((1, 1, 128, self.num_landmarks), dtype=dt, name="conv_seg")()
        return out
