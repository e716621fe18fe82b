"""MiT (SegFormer) backbone with frequency-guided prompts (FGSA), SPEC §2.1. NHWC throughout.

Names follow the PyTorch module tree under ``encoder.backbone`` of the release.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax.models.layers import (
    DropPath,
    Layers,
    expand_groups,
    group_max,
    group_mean,
    param_dtype,
)
from fgtbt_jax.ops import space_to_depth

STEM_FORMS = ("paper", "blocks")


def high_pass(x: jax.Array, sigma: float = 20.0) -> jax.Array:
    """|real(IFFT(M · FFT(x)))| with a Gaussian high-pass M centred on the shifted spectrum.

    x: (B, H, W, C) NHWC. Forward-normalized FFT (divide by H·W on the way in, not on the way
    back), as the reference. Computed in float32 (complex64), or in float64 (complex128) for
    float64 input.
    """
    x = x.astype(param_dtype(x.dtype))
    h, w = x.shape[1], x.shape[2]
    spec = jnp.fft.fftshift(jnp.fft.fft2(x, axes=(1, 2), norm="forward"), axes=(1, 2))
    rows = jnp.arange(h, dtype=x.dtype)[:, None] - h // 2
    cols = jnp.arange(w, dtype=x.dtype)[None, :] - w // 2
    mask = 1.0 - jnp.exp(-(rows**2 + cols**2) / (2.0 * sigma**2))
    spec = spec * mask[None, :, :, None]
    out = jnp.fft.ifft2(jnp.fft.ifftshift(spec, axes=(1, 2)), axes=(1, 2), norm="forward")
    return jnp.abs(jnp.real(out))


def _low_pass_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) real matrix L with ``L @ v = IFFT(g · FFT(v))`` for the centred 1-D Gaussian g.

    g is even on the frequency circle, so L is a real symmetric circulant; built in float64.
    """
    k = np.arange(n) - n // 2
    g = np.fft.ifftshift(np.exp(-(k.astype(np.float64) ** 2) / (2.0 * sigma**2)))
    return np.fft.ifft(g[:, None] * np.fft.fft(np.eye(n), axis=0), axis=0).real


def high_pass_dft(x: jax.Array, sigma: float = 20.0) -> jax.Array:
    """:func:`high_pass` with real matrices instead of ``jnp.fft`` (``model.fft="dft"``).

    For exporters without complex FFTs (ONNX). The mask M = 1 − g(r)·g(c) is separable, so the
    result is ``|x − L_H x L_Wᵀ|`` with the real circulant low-pass matrices L of the 1-D DFTs:
    two matmuls, equal to the FFT path within float32 rounding. x: (B, H, W, C) NHWC;
    computed in float32, or float64 for float64 input.
    """
    x = x.astype(param_dtype(x.dtype))
    lh = jnp.asarray(_low_pass_matrix(x.shape[1], sigma), x.dtype)
    lw = jnp.asarray(_low_pass_matrix(x.shape[2], sigma), x.dtype)
    return jnp.abs(x - jnp.einsum("ij,bjkc,lk->bilc", lh, x, lw))


class OverlapPatchEmbed(nn.Module, kw_only=True):
    """BN → ReLU → 1×1 → BN → ReLU → k×k/stride (``proj``) → BN → ReLU → 1×1 (``conv3``) → LN.

    (B, H, W, C_in) → tokens (B, H'·W', C) plus the grid size (H', W').

    ``on_blocks`` (the "blocks" stem form, exact): everything up to ``proj`` runs on the input's
    stride×stride space-to-depth blocks (B, H/s, W/s, s·s·C_in) instead of the full-resolution
    map: the BatchNorms reduce each channel over the blocks too, the 1×1 ``conv1`` is its
    kernel repeated block-diagonally over the s·s positions, and ``proj`` is the stride-1
    convolution over blocks of :mod:`fgtbt_jax.ops.space_to_depth`. Same parameters, same
    statistics, the same products summed in another order; the full-resolution maps with 3 or
    C channels (C < 128 lanes on TPU) never exist. Falls back to the paper order when H or W is
    not a multiple of the stride.
    """

    layers: Layers
    features: int
    kernel: int
    stride: int
    on_blocks: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, int, int]:
        lay, f = self.layers, self.features
        s = self.stride
        if self.on_blocks and x.shape[1] % s == 0 and x.shape[2] % s == 0:
            x = self._proj_on_blocks(x, train)
        else:
            x = nn.relu(lay.batch_norm(name="bn1")(x, train))
            x = lay.conv(f, 1, bias=False, name="conv1")(x)
            x = nn.relu(lay.batch_norm(name="bn2")(x, train))
            k = self.kernel
            x = lay.conv(f, k, stride=s, padding=k // 2, name="proj")(x)
        x = nn.relu(lay.batch_norm(name="bn3")(x, train))
        x = lay.conv(f, 1, bias=False, name="conv3")(x)
        b, h, w, c = x.shape
        x = lay.layer_norm(1e-5, name="norm")(x.reshape(b, h * w, c))
        return x, h, w

    def _proj_on_blocks(self, x: jax.Array, train: bool) -> jax.Array:
        """BN → ReLU → 1×1 → BN → ReLU → ``proj`` of (B, H, W, C_in) on s×s blocks:
        (B, H/s, W/s, C)."""
        lay, f, k, s = self.layers, self.features, self.kernel, self.stride
        h, w, c_in = x.shape[1:]
        # (B, H/s, W/s, s·s·C_in), materialized: the barrier keeps XLA from moving bn1's
        # reductions back onto the full-resolution input (3 channels: 42× its bytes on TPU).
        x = jax.lax.optimization_barrier(lay.ops.space_to_depth(x, s))
        x = nn.relu(lay.batch_norm(blocks=s * s, name="bn1")(x, train))
        kernel, _ = lay.kernel_bias((1, 1, c_in, f), bias=False, name="conv1")()
        diagonal = jnp.kron(jnp.eye(s * s, dtype=kernel.dtype), kernel[0, 0])
        x = jnp.einsum("bhwc,cd->bhwd", x, diagonal.astype(lay.dtype))
        x = nn.relu(lay.batch_norm(blocks=s * s, name="bn2")(x, train))
        kernel, bias = lay.kernel_bias((k, k, f, f), name="proj")()
        blocks_kernel, pad, (oh, ow) = space_to_depth.on_blocks(kernel, s, k // 2, (h, w))
        x = lay.ops.conv_s1(x, blocks_kernel.astype(lay.dtype), pad)[:, :oh, :ow]
        return x + bias.astype(lay.dtype)

    @classmethod
    def of_stage(
        cls, stage: int, features: int, layers: Layers, name: str, *, stem_form: str = "paper"
    ) -> OverlapPatchEmbed:
        """The patch embedding of stage ``stage`` (0-based): 7×7/4, then 3×3/2; the stem
        (stage 0) on space-to-depth blocks when ``stem_form`` is "blocks"."""
        if stem_form not in STEM_FORMS:
            raise ValueError(f"stem form must be one of {STEM_FORMS}, got {stem_form!r}")
        kernel, stride = (7, 4) if stage == 0 else (3, 2)
        on_blocks = stage == 0 and stem_form == "blocks"
        return cls(
            layers=layers,
            features=features,
            kernel=kernel,
            stride=stride,
            on_blocks=on_blocks,
            name=name,
        )


class Attention(nn.Module, kw_only=True):
    """Efficient self-attention with spatial reduction ``sr`` of keys and values."""

    layers: Layers
    num_heads: int
    sr_ratio: int

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        lay = self.layers
        b, n, c = x.shape
        hd = c // self.num_heads
        q = lay.dense(c, name="q")(x).reshape(b, n, self.num_heads, hd)
        if self.sr_ratio > 1:
            kv_in = x.reshape(b, h, w, c)
            s = self.sr_ratio
            kv_in = lay.conv(c, s, stride=s, name="sr")(kv_in)
            kv_in = kv_in.reshape(b, -1, c)
            kv_in = lay.layer_norm(1e-5, name="norm")(kv_in)
        else:
            kv_in = x
        kv = lay.dense(2 * c, name="kv")(kv_in)
        kv = kv.reshape(b, -1, 2, self.num_heads, hd)  # k first, then v (SPEC §2.1)
        out = lay.ops.attention(q, kv[:, :, 0], kv[:, :, 1])
        return lay.dense(c, name="proj")(out.reshape(b, n, c))


class DWConv(nn.Module, kw_only=True):
    """Depthwise 3×3 convolution (padding 1, bias) of tokens (B, N, C) on their H×W grid."""

    layers: Layers

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        b, n, c = x.shape
        dw = self.layers.conv(c, 3, padding=1, groups=c, name="dwconv")
        return dw(x.reshape(b, h, w, c)).reshape(b, n, c)


class Mlp(nn.Module, kw_only=True):
    """fc1 → depthwise 3×3 on the token grid → GELU → fc2 (Mix-FFN), tokens (B, N, C)."""

    layers: Layers
    hidden: int

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        lay = self.layers
        c = x.shape[-1]
        x = lay.dense(self.hidden, name="fc1")(x)
        x = DWConv(layers=lay, name="dwconv")(x, h, w)
        return lay.dense(c, name="fc2")(lay.gelu(x))


class Block(nn.Module, kw_only=True):
    """Pre-norm transformer block: attention and Mix-FFN, each with stochastic depth."""

    layers: Layers
    num_heads: int
    mlp_ratio: int
    sr_ratio: int
    drop_path: float

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int, train: bool) -> jax.Array:
        lay = self.layers
        dp = DropPath(self.drop_path)
        y = lay.layer_norm(1e-6, name="norm1")(x)
        attn = Attention(layers=lay, num_heads=self.num_heads, sr_ratio=self.sr_ratio, name="attn")
        x = x + dp(attn(y, h, w), train)
        y = lay.layer_norm(1e-6, name="norm2")(x)
        mlp = Mlp(layers=lay, hidden=x.shape[-1] * self.mlp_ratio, name="mlp")
        return x + dp(mlp(y, h, w), train)


class CSAM(nn.Module, kw_only=True):
    """Channel attention of the prompt branch (``shared_csam{s}.semantic_att``).

    x: the reference's (B, C′, A, A) view with its channels on ``axis`` (any layout of the
    spatial axes). ``reduction`` "batch" pools over (batch, A, A) like the reference (per
    statistic group), "sample" over (A, A) only.
    """

    layers: Layers
    reduction: str = "batch"
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = self.axis % x.ndim
        c = x.shape[axis]
        fc1 = self.layers.dense(c // 16, name="linear_0")
        fc2 = self.layers.dense(c, name="linear_2")

        def mlp(v):
            return fc2(nn.relu(fc1(v)))

        spatial = tuple(a for a in range(1, x.ndim) if a != axis)
        if self.reduction == "batch":
            g = self.layers.stat_groups
            mx = group_max(x, (0,) + spatial, g)  # (g, C′)
            mean = group_mean(x, (0,) + spatial, g)
            att = expand_groups(nn.sigmoid(mlp(mx) + mlp(mean)), x, g, axis)
        elif self.reduction == "sample":
            mx, mean = jnp.max(x, axis=spatial), jnp.mean(x, axis=spatial)  # (B, C′)
            att = expand_groups(nn.sigmoid(mlp(mx) + mlp(mean)), x, x.shape[0], axis)
        else:
            raise ValueError(f"csam_reduction must be 'batch' or 'sample', got {self.reduction!r}")
        return x * att


def tokens_as_view(f: jax.Array) -> jax.Array:
    """The reference's ``.view(B, C′, A, A)`` of row-major tokens (B, N, C′), with the A×A grid
    kept flat: (B, C′, N), channels on axis 1.

    The memory is *reinterpreted*, not transposed: view[b, c, i·A + j] = flat(f[b])[c·N + i·A + j].
    """
    b, n, c = f.shape
    a = int(round(n**0.5))
    if a * a != n:
        raise ValueError(f"the prompt reshape needs a square token grid, got {n} tokens")
    return f.reshape(b, c, n)


def view_as_tokens(g: jax.Array) -> jax.Array:
    """Inverse of :func:`tokens_as_view`: (B, C′, N) → tokens (B, N, C′), same memory."""
    b, c, n = g.shape
    return g.reshape(b, n, c)


class PromptGenerator(nn.Module, kw_only=True):
    """FGSA prompt branch (``prompt_generator``): per-stage parameters, applied before each block.

    Sub-module names mirror the reference: ``handcrafted_generator{s}``, ``embedding_generator{s}``,
    ``lightweight_mlp{s}_{i}`` (i restarts at 0 in each stage), ``shared_mlp{s}``, ``bn{s}``,
    ``conv{s}``, ``shared_csam{s}``.
    """

    layers: Layers
    embed_dims: Sequence[int]
    depths: Sequence[int]
    scale_factor: int = 4
    hpf_sigma: float = 20.0
    csam_reduction: str = "batch"
    fft: str = "fft"
    stem_form: str = "paper"

    def setup(self):
        lay = self.layers
        dims = [e // self.scale_factor for e in self.embed_dims]
        self.handcrafted = [
            OverlapPatchEmbed.of_stage(
                s, d, lay, name=f"handcrafted_generator{s + 1}", stem_form=self.stem_form
            )
            for s, d in enumerate(dims)
        ]
        self.embedding = [
            lay.dense(d, name=f"embedding_generator{s + 1}") for s, d in enumerate(dims)
        ]
        self.lightweight = [
            [lay.dense(d, name=f"lightweight_mlp{s + 1}_{i}_0") for i in range(self.depths[s])]
            for s, d in enumerate(dims)
        ]
        self.shared_mlp = [
            lay.dense(e, name=f"shared_mlp{s + 1}") for s, e in enumerate(self.embed_dims)
        ]
        # The prompt map is processed in the reference's (B, C′, A·A) memory layout (channels on
        # axis 1), which is a free reshape of the (B, N, C′) tokens both ways.
        self.bn = [lay.batch_norm(axis=1, name=f"bn{s + 1}") for s in range(len(dims))]
        # 1×1 convolutions on that layout, applied as matmuls over axis 1 (whatever the ops: the
        # compiler lowers a 1×1 convolution to the same dot).
        self.conv = [
            lay.kernel_bias((1, 1, e + 2 * d, e + 2 * d), name=f"conv{s + 1}")
            for s, (e, d) in enumerate(zip(self.embed_dims, dims, strict=True))
        ]
        self.csam = [
            CSAM(layers=lay, reduction=self.csam_reduction, axis=1, name=f"shared_csam{s + 1}")
            for s in range(len(dims))
        ]

    def handcrafted_prompts(self, image: jax.Array, train: bool) -> list[jax.Array]:
        """High-pass image (B, H, W, 3) → per-stage handcrafted tokens hc_s (B, N_s, E_s/4)."""
        if self.fft not in ("fft", "dft"):
            raise ValueError(f"model.fft must be 'fft' or 'dft', got {self.fft!r}")
        hpf = high_pass if self.fft == "fft" else high_pass_dft
        dt = self.layers.dtype
        x = hpf(image.astype(param_dtype(dt)), self.hpf_sigma).astype(dt)
        out = []
        for gen in self.handcrafted:
            tokens, h, w = gen(x, train)
            out.append(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, -1)
        return out

    def embedding_prompt(self, stage: int, tokens: jax.Array) -> jax.Array:
        return self.embedding[stage](tokens)

    def __call__(
        self, stage: int, block: int, x: jax.Array, hc: jax.Array, emb: jax.Array, train: bool
    ) -> jax.Array:
        """Returns the prompt-updated tokens x + prompt (B, N, E_s)."""
        dt = self.layers.dtype
        g = tokens_as_view(jnp.concatenate([x, hc, emb], axis=-1))  # (B, C′, N)
        r = g
        g = self.csam[stage](g)
        g = nn.relu(self.bn[stage](g, train))
        kernel, bias = self.conv[stage]()
        g = jnp.einsum("bcn,co->bon", g, kernel[0, 0].astype(dt))
        g = g + bias.astype(dt)[:, None] + r
        f = self.layers.gelu(self.lightweight[stage][block](view_as_tokens(g)))
        return x + self.shared_mlp[stage](f)


class MixVisionTransformer(nn.Module, kw_only=True):
    """Four-stage MiT with FGSA prompts. (B, H, W, 3) → four maps at strides 4, 8, 16, 32."""

    layers: Layers
    embed_dims: Sequence[int]
    num_heads: Sequence[int]
    depths: Sequence[int]
    sr_ratios: Sequence[int]
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    hpf_sigma: float = 20.0
    prompt_scale_factor: int = 4
    csam_reduction: str = "batch"
    remat: bool = False
    fft: str = "fft"
    stem_form: str = "paper"

    @nn.compact
    def __call__(self, image: jax.Array, train: bool) -> list[jax.Array]:
        lay = self.layers
        prompt = PromptGenerator(
            layers=lay,
            embed_dims=self.embed_dims,
            depths=self.depths,
            scale_factor=self.prompt_scale_factor,
            hpf_sigma=self.hpf_sigma,
            csam_reduction=self.csam_reduction,
            fft=self.fft,
            stem_form=self.stem_form,
            name="prompt_generator",
        )
        hcs = prompt.handcrafted_prompts(image, train)
        total = sum(self.depths)
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        block_cls = nn.remat(Block, static_argnums=(2, 3, 4)) if self.remat else Block
        x = image.astype(lay.dtype)
        outs, cur = [], 0
        for s, dim in enumerate(self.embed_dims):
            embed = OverlapPatchEmbed.of_stage(
                s, dim, lay, name=f"patch_embed{s + 1}", stem_form=self.stem_form
            )
            tokens, h, w = embed(x, train)
            emb = prompt.embedding_prompt(s, tokens)
            for i in range(self.depths[s]):
                tokens = prompt(s, i, tokens, hcs[s], emb, train)
                tokens = block_cls(
                    layers=lay,
                    num_heads=self.num_heads[s],
                    mlp_ratio=self.mlp_ratio,
                    sr_ratio=self.sr_ratios[s],
                    drop_path=rates[cur + i],
                    name=f"block{s + 1}_{i}",
                )(tokens, h, w, train)
            cur += self.depths[s]
            tokens = lay.layer_norm(1e-6, name=f"norm{s + 1}")(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, dim)
            outs.append(x)
        return outs
