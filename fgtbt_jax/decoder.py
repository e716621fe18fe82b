"""SegFormer-style heatmap decoder (``decode_head``), SPEC §2.2. NHWC throughout."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.layers import BatchNorm, Dtype, conv, resize_bilinear


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


class DecodeHead(nn.Module):
    """Four stage maps (strides 4..32, NHWC) → heatmaps (B, 2·H1, 2·W1, num_landmarks)."""

    embed_dims: Sequence[int]
    decoder_dim: int = 768
    num_landmarks: int = 124
    dropout: float = 0.1
    stat_groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool) -> jax.Array:
        dt = self.dtype
        h, w = feats[0].shape[1:3]
        maps = []
        for s, f in enumerate(feats):
            y = nn.Dense(self.decoder_dim, dtype=dt, name=f"linear_c{s + 1}")(f)
            maps.append(y if s == 0 else resize_bilinear(y, h, w))
        x = jnp.concatenate(maps[::-1], axis=-1)  # [c4, c3, c2, c1]
        x = conv(self.decoder_dim, 1, bias=False, dtype=dt, name="linear_fuse_conv")(x)
        x = nn.relu(
            BatchNorm(stat_groups=self.stat_groups, dtype=dt, name="linear_fuse_bn")(x, train)
        )
        # Dropout2d: whole channels, i.e. the mask is shared over H and W.
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
        x = conv(256, 1, dtype=dt, name="linear_pred")(x)
        x = Bottleneck(128, 64, self.stat_groups, dt, name="conv1")(x, train)
        # ConvTranspose2d(k=4, s=2, p=1): gradient-of-conv semantics (flipped, in/out swapped
        # kernel) with padding k - 1 - p = 2 on each side of the dilated input.
        x = nn.ConvTranspose(
            128,
            (4, 4),
            strides=(2, 2),
            padding=((2, 2), (2, 2)),
            transpose_kernel=True,
            dtype=dt,
            name="upSample",
        )(x)
        out = conv(self.num_landmarks, 3, 1, 1, bias=False, dtype=dt, name="conv2")(x)
        if self.is_initializing():
            # ``conv_seg`` is in the release checkpoint but unused; keep it for strict export.
            conv(self.num_landmarks, 1, dtype=dt, name="conv_seg")(x[:, :1, :1])
        return out
