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
    BatchNorm,
    DropPath,
    Dtype,
    KernelBias,
    conv,
    dense,
    expand_groups,
    gelu,
    group_max,
    group_mean,
    layer_norm,
    param_dtype,
)


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


class OverlapPatchEmbed(nn.Module):
    """BN → ReLU → 1×1 → BN → ReLU → k×k/stride (``proj``) → BN → ReLU → 1×1 (``conv3``) → LN.

    (B, H, W, C_in) → tokens (B, H'·W', C) plus the grid size (H', W').
    """

    features: int
    kernel: int
    stride: int
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> tuple[jax.Array, int, int]:
        bn = dict(stat_groups=self.stat_groups, dtype=self.dtype, kernels=self.kernels)
        cv = dict(dtype=self.dtype, kernels=self.kernels)
        x = nn.relu(BatchNorm(name="bn1", **bn)(x, train))
        x = conv(self.features, 1, bias=False, name="conv1", **cv)(x)
        x = nn.relu(BatchNorm(name="bn2", **bn)(x, train))
        x = conv(self.features, self.kernel, self.stride, self.kernel // 2, name="proj", **cv)(x)
        x = nn.relu(BatchNorm(name="bn3", **bn)(x, train))
        x = conv(self.features, 1, bias=False, name="conv3", **cv)(x)
        b, h, w, c = x.shape
        x = layer_norm(1e-5, self.dtype, self.kernels, name="norm")(x.reshape(b, h * w, c))
        return x, h, w


def _attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q·kᵀ/√d)·v per head, entirely in the inputs' dtype. q (B, N, heads, d), k and v
    (B, M, heads, d) → (B, N, heads, d)."""
    logits = jnp.einsum("bnhd,bmhd->bhnm", q, k) * q.shape[-1] ** -0.5
    return jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1), v)


class Attention(nn.Module):
    """Efficient self-attention with spatial reduction ``sr`` of keys and values."""

    dim: int
    num_heads: int
    sr_ratio: int
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        b, n, c = x.shape
        hd = c // self.num_heads
        q = dense(c, dtype=self.dtype, name="q")(x).reshape(b, n, self.num_heads, hd)
        if self.sr_ratio > 1:
            kv_in = x.reshape(b, h, w, c)
            s = self.sr_ratio
            kv_in = conv(c, s, s, 0, dtype=self.dtype, kernels=self.kernels, name="sr")(kv_in)
            kv_in = kv_in.reshape(b, -1, c)
            kv_in = layer_norm(1e-5, self.dtype, self.kernels, name="norm")(kv_in)
        else:
            kv_in = x
        kv = dense(2 * c, dtype=self.dtype, name="kv")(kv_in)
        kv = kv.reshape(b, -1, 2, self.num_heads, hd)  # k first, then v (SPEC §2.1)
        if q.dtype == jnp.float64:  # jax.nn.dot_product_attention's softmax is float32
            out = _attention(q, kv[:, :, 0], kv[:, :, 1])
        else:
            out = jax.nn.dot_product_attention(q, kv[:, :, 0], kv[:, :, 1])
        return dense(c, dtype=self.dtype, name="proj")(out.reshape(b, n, c))


class DWConv(nn.Module):
    """Depthwise 3×3 convolution (padding 1, bias) of tokens (B, N, C) on their H×W grid."""

    dim: int
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        b, n, c = x.shape
        dw = conv(c, 3, 1, 1, groups=c, dtype=self.dtype, kernels=self.kernels, name="dwconv")
        return dw(x.reshape(b, h, w, c)).reshape(b, n, c)


class Mlp(nn.Module):
    hidden: int
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        c = x.shape[-1]
        x = dense(self.hidden, dtype=self.dtype, name="fc1")(x)
        x = DWConv(self.hidden, dtype=self.dtype, kernels=self.kernels, name="dwconv")(x, h, w)
        x = gelu(x, self.kernels)
        return dense(c, dtype=self.dtype, name="fc2")(x)


class Block(nn.Module):
    dim: int
    num_heads: int
    mlp_ratio: int
    sr_ratio: int
    drop_path: float
    dtype: Dtype = jnp.float32
    kernels: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, h: int, w: int, train: bool) -> jax.Array:
        dt, kn = self.dtype, self.kernels
        dp = DropPath(self.drop_path)
        y = layer_norm(1e-6, dt, kn, name="norm1")(x)
        attn = Attention(self.dim, self.num_heads, self.sr_ratio, dt, kn, name="attn")
        x = x + dp(attn(y, h, w), train)
        y = layer_norm(1e-6, dt, kn, name="norm2")(x)
        return x + dp(Mlp(self.dim * self.mlp_ratio, dt, kn, name="mlp")(y, h, w), train)


class CSAM(nn.Module):
    """Channel attention of the prompt branch (``shared_csam{s}.semantic_att``).

    x: the reference's (B, C′, A, A) view with its channels on ``axis`` (any layout of the
    spatial axes). ``reduction`` "batch" pools over (batch, A, A) like the reference (per
    statistic group), "sample" over (A, A) only.
    """

    reduction: str = "batch"
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    axis: int = -1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        axis = self.axis % x.ndim
        c = x.shape[axis]
        fc1 = dense(c // 16, dtype=self.dtype, name="linear_0")
        fc2 = dense(c, dtype=self.dtype, name="linear_2")

        def mlp(v):
            return fc2(nn.relu(fc1(v)))

        spatial = tuple(a for a in range(1, x.ndim) if a != axis)
        if self.reduction == "batch":
            g = self.stat_groups
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


class PromptGenerator(nn.Module):
    """FGSA prompt branch (``prompt_generator``): per-stage parameters, applied before each block.

    Sub-module names mirror the reference: ``handcrafted_generator{s}``, ``embedding_generator{s}``,
    ``lightweight_mlp{s}_{i}`` (i restarts at 0 in each stage), ``shared_mlp{s}``, ``bn{s}``,
    ``conv{s}``, ``shared_csam{s}``.
    """

    embed_dims: Sequence[int]
    depths: Sequence[int]
    scale_factor: int = 4
    hpf_sigma: float = 20.0
    csam_reduction: str = "batch"
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    kernels: str = "xla"
    fft: str = "fft"

    def setup(self):
        dims = [e // self.scale_factor for e in self.embed_dims]
        groups, dt = self.stat_groups, self.dtype
        self.handcrafted = [
            OverlapPatchEmbed(
                d,
                7 if s == 0 else 3,
                4 if s == 0 else 2,
                groups,
                dt,
                self.kernels,
                name=f"handcrafted_generator{s + 1}",
            )
            for s, d in enumerate(dims)
        ]
        self.embedding = [
            dense(d, dtype=dt, name=f"embedding_generator{s + 1}") for s, d in enumerate(dims)
        ]
        self.lightweight = [
            [
                dense(d, dtype=dt, name=f"lightweight_mlp{s + 1}_{i}_0")
                for i in range(self.depths[s])
            ]
            for s, d in enumerate(dims)
        ]
        self.shared_mlp = [
            dense(e, dtype=dt, name=f"shared_mlp{s + 1}") for s, e in enumerate(self.embed_dims)
        ]
        # The prompt map is processed in the reference's (B, C′, A·A) memory layout (channels on
        # axis 1), which is a free reshape of the (B, N, C′) tokens both ways.
        self.bn = [
            BatchNorm(stat_groups=groups, dtype=dt, axis=1, kernels=self.kernels, name=f"bn{s + 1}")
            for s in range(len(dims))
        ]
        # 1×1 convolutions on that layout, applied as matmuls over axis 1 (with either kernels:
        # XLA lowers a 1×1 convolution to the same dot).
        self.conv = [
            KernelBias((1, 1, e + 2 * d, e + 2 * d), dtype=dt, name=f"conv{s + 1}")
            for s, (e, d) in enumerate(zip(self.embed_dims, dims, strict=True))
        ]
        self.csam = [
            CSAM(self.csam_reduction, groups, dt, axis=1, name=f"shared_csam{s + 1}")
            for s in range(len(dims))
        ]

    def handcrafted_prompts(self, image: jax.Array, train: bool) -> list[jax.Array]:
        """High-pass image (B, H, W, 3) → per-stage handcrafted tokens hc_s (B, N_s, E_s/4)."""
        if self.fft not in ("fft", "dft"):
            raise ValueError(f"model.fft must be 'fft' or 'dft', got {self.fft!r}")
        hpf = high_pass if self.fft == "fft" else high_pass_dft
        x = hpf(image.astype(param_dtype(self.dtype)), self.hpf_sigma).astype(self.dtype)
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
        g = tokens_as_view(jnp.concatenate([x, hc, emb], axis=-1))  # (B, C′, N)
        r = g
        g = self.csam[stage](g)
        g = nn.relu(self.bn[stage](g, train))
        kernel, bias = self.conv[stage]()
        g = jnp.einsum("bcn,co->bon", g, kernel[0, 0].astype(self.dtype))
        g = g + bias.astype(self.dtype)[:, None] + r
        f = gelu(self.lightweight[stage][block](view_as_tokens(g)), self.kernels)
        return x + self.shared_mlp[stage](f)


class MixVisionTransformer(nn.Module):
    """Four-stage MiT with FGSA prompts. (B, H, W, 3) → four maps at strides 4, 8, 16, 32."""

    embed_dims: Sequence[int]
    num_heads: Sequence[int]
    depths: Sequence[int]
    sr_ratios: Sequence[int]
    mlp_ratio: int = 4
    drop_path_rate: float = 0.1
    hpf_sigma: float = 20.0
    prompt_scale_factor: int = 4
    csam_reduction: str = "batch"
    stat_groups: int = 1
    remat: bool = False
    dtype: Dtype = jnp.float32
    kernels: str = "xla"
    fft: str = "fft"

    @nn.compact
    def __call__(self, image: jax.Array, train: bool) -> list[jax.Array]:
        prompt = PromptGenerator(
            self.embed_dims,
            self.depths,
            self.prompt_scale_factor,
            self.hpf_sigma,
            self.csam_reduction,
            self.stat_groups,
            self.dtype,
            self.kernels,
            fft=self.fft,
            name="prompt_generator",
        )
        hcs = prompt.handcrafted_prompts(image, train)
        total = sum(self.depths)
        rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        block_cls = nn.remat(Block, static_argnums=(2, 3, 4)) if self.remat else Block
        x = image.astype(self.dtype)
        outs, cur = [], 0
        for s, dim in enumerate(self.embed_dims):
            embed = OverlapPatchEmbed(
                dim,
                7 if s == 0 else 3,
                4 if s == 0 else 2,
                self.stat_groups,
                self.dtype,
                self.kernels,
                name=f"patch_embed{s + 1}",
            )
            tokens, h, w = embed(x, train)
            emb = prompt.embedding_prompt(s, tokens)
            for i in range(self.depths[s]):
                tokens = prompt(s, i, tokens, hcs[s], emb, train)
                tokens = block_cls(
                    dim,
                    self.num_heads[s],
                    self.mlp_ratio,
                    self.sr_ratios[s],
                    rates[cur + i],
                    self.dtype,
                    self.kernels,
                    name=f"block{s + 1}_{i}",
                )(tokens, h, w, train)
            cur += self.depths[s]
            tokens = layer_norm(1e-6, self.dtype, self.kernels, name=f"norm{s + 1}")(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, dim)
            outs.append(x)
        return outs
