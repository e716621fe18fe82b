"""SegFormer-style heatmap decoder (``decode_head``), SPEC §2.2. NHWC throughout."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.models import fused_decoder
from fgtbt_jax.models.layers import Layers, param_dtype

DECODER_FORMS = ("paper", "fused")


class Bottleneck(nn.Module, kw_only=True):
    """Pre-activation bottleneck ``conv1``: 256 → 128 (mid 64) with a BN-ReLU-1×1 shortcut."""

    layers: Layers
    features: int = 128
    mid: int = 64

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        lay = self.layers
        y = nn.relu(lay.batch_norm(name="bn1")(x, train))
        y = lay.conv(self.mid, 1, bias=False, name="conv1")(y)
        y = nn.relu(lay.batch_norm(name="bn2")(y, train))
        y = lay.conv(self.mid, 3, padding=1, bias=False, name="conv2")(y)
        y = nn.relu(lay.batch_norm(name="bn3")(y, train))
        y = lay.conv(self.features, 1, bias=False, name="conv3")(y)
        s = nn.relu(lay.batch_norm(name="downsample_0")(x, train))
        s = lay.conv(self.features, 1, bias=False, name="downsample_2")(s)
        return y + s


class ChannelDropoutScale(nn.Module):
    """Dropout2d's factors per sample and channel, (B, C): 0 or 1 / (1 − ``rate``), for NHWC
    input ``x``; None outside training. Named like the ``nn.Dropout(rate, broadcast_dims=(1,
    2))`` it stands for, it draws the same mask from the same ``dropout`` rng stream."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array | None:
        if not train or self.rate == 0.0:
            return None
        keep = 1.0 - self.rate
        b, c = x.shape[0], x.shape[-1]
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (b, 1, 1, c))[:, 0, 0]
        scale = mask.astype(param_dtype(x.dtype))
        return scale / keep if keep > 0 else scale


class DecodeHead(nn.Module, kw_only=True):
    """Four stage maps (strides 4..32, NHWC) → heatmaps (B, 2·H1, 2·W1, num_landmarks).

    ``form`` "paper" runs the layers in SPEC §2.2's order; "fused" runs the two pairs of
    consecutive linear layers (``linear_c{s}`` with ``linear_fuse_conv``, ``upSample`` with
    ``conv2``) in the composed forms of :mod:`fgtbt_jax.models.fused_decoder`, and applies the
    channel dropout to ``linear_pred``'s kernel instead of the map. Same parameters, same
    results up to rounding (the same dropout mask for the same rng).
    """

    layers: Layers
    embed_dims: Sequence[int]
    decoder_dim: int = 768
    num_landmarks: int = 124
    dropout: float = 0.1
    form: str = "paper"

    @nn.compact
    def __call__(self, feats: Sequence[jax.Array], train: bool) -> jax.Array:
        if self.form not in DECODER_FORMS:
            raise ValueError(f"decoder form must be one of {DECODER_FORMS}, got {self.form!r}")
        lay = self.layers
        x = self._fuse_stages(list(feats))
        x = nn.relu(lay.batch_norm(name="linear_fuse_bn")(x, train))
        x = self._dropout_linear_pred(x, train)
        x = Bottleneck(layers=lay, features=128, mid=64, name="conv1")(x, train)
        out = self._upsample_conv2(x)
        if self.is_initializing():
            # ``conv_seg`` is in the release checkpoint but unused; keep it for strict export.
            lay.kernel_bias((1, 1, 128, self.num_landmarks), name="conv_seg")()
        return out

    def _fuse_stages(self, feats: list[jax.Array]) -> jax.Array:
        """``linear_c{s}`` per stage, resized to stage 1, concatenated as [c4, c3, c2, c1],
        ``linear_fuse_conv``: (B, H1, W1, decoder_dim)."""
        lay, d = self.layers, self.decoder_dim
        if self.form == "fused":
            linear = [
                lay.kernel_bias((f.shape[-1], d), name=f"linear_c{s + 1}")()
                for s, f in enumerate(feats)
            ]
            fuse_shape = (1, 1, len(feats) * d, d)
            fuse, _ = lay.kernel_bias(fuse_shape, bias=False, name="linear_fuse_conv")()
            return fused_decoder.fuse_stages(feats, linear, fuse, lay.dtype, ops=lay.ops)
        h, w = feats[0].shape[1:3]
        maps = [lay.dense(d, name=f"linear_c{s + 1}")(f) for s, f in enumerate(feats)]
        maps = [maps[0]] + [lay.ops.resize_bilinear(m, h, w) for m in maps[1:]]
        x = jnp.concatenate(maps[::-1], axis=-1)
        return lay.conv(d, 1, bias=False, name="linear_fuse_conv")(x)

    def _dropout_linear_pred(self, x: jax.Array, train: bool) -> jax.Array:
        """Dropout2d (whole channels: the mask is shared over H and W) then ``linear_pred``
        (1×1, 256 outputs): (B, H1, W1, decoder_dim) → (B, H1, W1, 256)."""
        lay = self.layers
        if self.form == "fused":
            kernel, bias = lay.kernel_bias((1, 1, x.shape[-1], 256), name="linear_pred")()
            scale = ChannelDropoutScale(self.dropout, name="Dropout_0")(x, train)
            return fused_decoder.channel_dropout_linear(x, scale, kernel[0, 0], bias, lay.dtype)
        x = nn.Dropout(self.dropout, broadcast_dims=(1, 2))(x, deterministic=not train)
        return lay.conv(256, 1, name="linear_pred")(x)

    def _upsample_conv2(self, x: jax.Array) -> jax.Array:
        """``upSample`` (ConvTranspose2d k4 s2 p1, 128 channels) then ``conv2`` (3×3, padding 1,
        no bias) to the heatmaps."""
        lay = self.layers
        if self.form == "fused":
            kt, bt = lay.kernel_bias((4, 4, 128, x.shape[-1]), name="upSample")()
            w2, _ = lay.kernel_bias((3, 3, 128, self.num_landmarks), bias=False, name="conv2")()
            return fused_decoder.upsample_conv3x3(x, kt, bt, w2, ops=lay.ops)
        # PyTorch ConvTranspose2d(k=4, s=2, p=1): Flax padding k - 1 - p on each side, with the
        # kernel flipped and transposed as PyTorch's (transpose_kernel).
        x = nn.ConvTranspose(
            128,
            (4, 4),
            strides=(2, 2),
            padding=((2, 2), (2, 2)),
            transpose_kernel=True,
            dtype=lay.dtype,
            param_dtype=param_dtype(lay.dtype),
            name="upSample",
        )(x)
        return lay.conv(self.num_landmarks, 3, padding=1, bias=False, name="conv2")(x)
