"""FGTBT in PyTorch (NCHW), written from SPEC §2, with the release's state-dict layout.

Test and benchmark tooling: an independent implementation to cross-check the JAX model against
and to time PyTorch eager / ``torch.compile`` with. It loads the release's ``state_dict``
(``encoder.backbone.*``, ``encoder.decode_head.*``; see
``tests/fixtures/reference/fgtbt_b4_state_dict_keys.tsv``) strictly, including the unused
``decode_head.conv_seg``.

torch is imported by this module only; nothing else in the package needs it.

Faithfulness notes (SPEC §2): the prompt branch reinterprets the (B, N, C') token memory as a
(B, C', A, A) map (``reshape``, not a transpose); CSAM statistics reduce over the batch too
(``csam_reduction="batch"``, the default; "sample" reduces per sample); block and stage norms use
LayerNorm eps 1e-6, all other LayerNorms 1e-5; GELU is exact; BatchNorm eps 1e-5, momentum 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FGTBTTorch",
    "build_torch_model_from_config",
    "highpass_filter",
]


def highpass_filter(x: torch.Tensor, sigma: float = 20.0) -> torch.Tensor:
    """Gaussian high-pass of an NCHW image batch in the centred 2-D spectrum (SPEC §2.1.1).

    ``|real(ifft2(ifftshift(fftshift(fft2(x)) * M)))|`` with forward normalisation both ways and
    ``M = 1 - exp(-D² / (2σ²))``, ``D² = (row - H//2)² + (col - W//2)²``. Same shape as ``x``.
    """
    h, w = x.shape[-2:]
    rows = torch.arange(h, device=x.device, dtype=torch.float32) - h // 2
    cols = torch.arange(w, device=x.device, dtype=torch.float32) - w // 2
    d2 = rows[:, None] ** 2 + cols[None, :] ** 2
    mask = 1.0 - torch.exp(-d2 / (2.0 * sigma**2))
    spec = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="forward"), dim=(-2, -1))
    spec = torch.fft.ifftshift(spec * mask, dim=(-2, -1))
    return torch.fft.ifft2(spec, norm="forward").real.abs().to(x.dtype)


def _tokens_to_map(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, H·W, C) tokens -> (B, C, H, W) map (a transpose: position-major tokens)."""
    return x.reshape(x.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample, rescaling the kept ones."""

    def __init__(self, rate: float = 0.0) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


class OverlapPatchEmbed(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv k×k/stride (``proj``)-BN-ReLU-conv1x1 (``conv3``), then
    flattened to tokens and LayerNorm (eps 1e-5). (B, Cin, H, W) -> ((B, H'·W', C), H', W')."""

    def __init__(self, kernel: int, stride: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_chans)
        self.conv1 = nn.Conv2d(in_chans, embed_dim, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(embed_dim)
        self.proj = nn.Conv2d(embed_dim, embed_dim, kernel, stride, padding=kernel // 2)
        self.bn3 = nn.BatchNorm2d(embed_dim)
        self.conv3 = nn.Conv2d(embed_dim, embed_dim, 1, bias=False)
        self.norm = nn.LayerNorm(embed_dim, eps=1e-5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.conv1(F.relu(self.bn1(x)))
        x = self.proj(F.relu(self.bn2(x)))
        x = self.conv3(F.relu(self.bn3(x)))
        _, _, h, w = x.shape
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class Attention(nn.Module):
    """Multi-head attention with spatially reduced keys/values (``sr`` conv + LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        hd = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, hd).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.sr(_tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)
            x = self.norm(x)
        kv = self.kv(x).reshape(b, -1, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, kv[0], kv[1])  # scale hd**-0.5
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DWConv(nn.Module):
    """Depthwise 3×3 convolution on the token grid: (B, N, C) -> (B, N, C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.dwconv(_tokens_to_map(x, h, w)).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """fc1 -> depthwise conv -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.fc2(F.gelu(self.dwconv(self.fc1(x), h, w)))


class Block(nn.Module):
    """Pre-norm transformer block (LayerNorm eps 1e-6) with stochastic depth."""

    def __init__(
        self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, drop_path: float
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, sr_ratio)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class _SemanticAttention(nn.Module):
    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.linear = nn.Sequential(
            nn.Linear(channels, channels // reduction),
            nn.ReLU(),
            nn.Linear(channels // reduction, channels),
        )


class CSAM(nn.Module):
    """Channel attention from max- and mean-pooled statistics through a shared MLP.

    ``reduction="batch"`` pools over (batch, A, A) as the reference does (a sample's output then
    depends on its batch); ``"sample"`` pools over (A, A) only. Input/output (B, C', A, A).
    """

    def __init__(self, channels: int, reduction: str = "batch") -> None:
        super().__init__()
        if reduction not in ("batch", "sample"):
            raise ValueError(f"csam_reduction must be 'batch' or 'sample', got {reduction!r}")
        self.reduction = reduction
        self.semantic_att = _SemanticAttention(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = (0, 2, 3) if self.reduction == "batch" else (2, 3)
        mlp = self.semantic_att.linear
        amax = x.amax(dim=dims)
        mean = x.mean(dim=dims)
        att = torch.sigmoid(mlp(amax) + mlp(mean))  # (C',) or (B, C')
        return x * att.reshape(-1, x.shape[1], 1, 1)


class PromptGenerator(nn.Module):
    """The frequency prompt branch (FGSA injection, SPEC §2.1 steps 2-5)."""

    def __init__(
        self,
        embed_dims: Sequence[int],
        depths: Sequence[int],
        scale_factor: int = 4,
        hpf_sigma: float = 20.0,
        csam_reduction: str = "batch",
    ) -> None:
        super().__init__()
        self.hpf_sigma = hpf_sigma
        self.depths = tuple(depths)
        widths = [e // scale_factor for e in embed_dims]
        in_chans = [3] + widths[:-1]
        for s in range(4):
            k, stride = (7, 4) if s == 0 else (3, 2)
            self.add_module(
                f"handcrafted_generator{s + 1}",
                OverlapPatchEmbed(k, stride, in_chans[s], widths[s]),
            )
        for s in range(4):
            self.add_module(f"embedding_generator{s + 1}", nn.Linear(embed_dims[s], widths[s]))
        for s in range(4):
            c = embed_dims[s] + 2 * widths[s]
            for i in range(depths[s]):
                self.add_module(
                    f"lightweight_mlp{s + 1}_{i}", nn.Sequential(nn.Linear(c, widths[s]), nn.GELU())
                )
            self.add_module(f"shared_mlp{s + 1}", nn.Linear(widths[s], embed_dims[s]))
            self.add_module(f"bn{s + 1}", nn.BatchNorm2d(c))
            self.add_module(f"conv{s + 1}", nn.Conv2d(c, c, 1))
            self.add_module(f"shared_csam{s + 1}", CSAM(c, csam_reduction))

    def init_handcrafted(self, x: torch.Tensor) -> list[torch.Tensor]:
        """High-pass the normalized input, then the chain of generators: 4 × (B, N_s, E_s/4)."""
        feats = []
        h = highpass_filter(x, self.hpf_sigma)
        for s in range(4):
            tokens, hh, ww = getattr(self, f"handcrafted_generator{s + 1}")(h)
            feats.append(tokens)
            h = _tokens_to_map(tokens, hh, ww)
        return feats

    def init_prompt(self, tokens: torch.Tensor, stage: int) -> torch.Tensor:
        """emb_s from the stage's patch-embedded tokens: (B, N, E) -> (B, N, E/4)."""
        return getattr(self, f"embedding_generator{stage}")(tokens)

    def get_prompt(
        self,
        x: torch.Tensor,
        handcrafted: torch.Tensor,
        embedding: torch.Tensor,
        stage: int,
        index: int,
    ) -> torch.Tensor:
        """x + prompt for block ``index`` of ``stage`` (1-based). x: (B, N, E), N a square."""
        f = torch.cat([x, handcrafted, embedding], dim=2)
        b, n, c = f.shape
        a = math.isqrt(n)
        if a * a != n:
            raise ValueError(f"the prompt branch needs a square token grid, got {n} tokens")
        # Quirk (SPEC §2.1.4): raw (N, C') memory read as (C', A, A), not a transpose.
        f = f.reshape(b, c, a, a)
        r = f
        f = getattr(self, f"shared_csam{stage}")(f)
        f = F.relu(getattr(self, f"bn{stage}")(f))
        f = getattr(self, f"conv{stage}")(f) + r
        f = f.reshape(b, n, c)
        f = getattr(self, f"lightweight_mlp{stage}_{index}")(f)
        return x + getattr(self, f"shared_mlp{stage}")(f)


class MixVisionTransformerEVP(nn.Module):
    """MiT backbone with frequency prompts: (B, 3, H, W) -> 4 maps at strides 4, 8, 16, 32."""

    def __init__(
        self,
        embed_dims: Sequence[int],
        num_heads: Sequence[int],
        depths: Sequence[int],
        sr_ratios: Sequence[int],
        mlp_ratio: float = 4,
        drop_path_rate: float = 0.1,
        hpf_sigma: float = 20.0,
        scale_factor: int = 4,
        csam_reduction: str = "batch",
    ) -> None:
        super().__init__()
        self.depths = tuple(depths)
        in_chans = [3] + list(embed_dims[:-1])
        for s in range(4):
            k, stride = (7, 4) if s == 0 else (3, 2)
            self.add_module(
                f"patch_embed{s + 1}", OverlapPatchEmbed(k, stride, in_chans[s], embed_dims[s])
            )
        total = sum(depths)
        rates = [drop_path_rate * i / (total - 1) if total > 1 else 0.0 for i in range(total)]
        start = 0
        for s in range(4):
            blocks = [
                Block(embed_dims[s], num_heads[s], mlp_ratio, sr_ratios[s], rates[start + i])
                for i in range(depths[s])
            ]
            start += depths[s]
            self.add_module(f"block{s + 1}", nn.ModuleList(blocks))
            self.add_module(f"norm{s + 1}", nn.LayerNorm(embed_dims[s], eps=1e-6))
        self.prompt_generator = PromptGenerator(
            embed_dims, depths, scale_factor, hpf_sigma, csam_reduction
        )
        self.apply(_init_segformer)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        pg = self.prompt_generator
        handcrafted = pg.init_handcrafted(x)
        outs = []
        for s in range(1, 5):
            x, h, w = getattr(self, f"patch_embed{s}")(x)
            embedding = pg.init_prompt(x, s)
            for i, block in enumerate(getattr(self, f"block{s}")):
                x = pg.get_prompt(x, handcrafted[s - 1], embedding, s, i)
                x = block(x, h, w)
            x = _tokens_to_map(getattr(self, f"norm{s}")(x), h, w)
            outs.append(x)
        return outs


def _init_segformer(m: nn.Module) -> None:
    """SegFormer's backbone initialisation (truncated normal linears, He-normal convs)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class _LinearProj(nn.Module):
    """Per-position Linear on a map: (B, C, H, W) -> (B, D, H, W)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return self.proj(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)


class _ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck with a BN-ReLU-conv shortcut (``downsample``)."""

    def __init__(self, in_ch: int = 256, out_ch: int = 128, mid: int = 64) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, mid, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, out_ch, 1, bias=False)
        self.downsample = nn.Sequential(
            nn.BatchNorm2d(in_ch), nn.ReLU(), nn.Conv2d(in_ch, out_ch, 1, bias=False)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return out + self.downsample(x)


class _UpSample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(x)


class SegFormerHeatmapHead(nn.Module):
    """SegFormer MLP decoder + bottleneck + ×2 transposed conv -> (B, L, H/2, W/2) heatmaps."""

    def __init__(
        self,
        embed_dims: Sequence[int],
        decoder_dim: int,
        num_landmarks: int = 124,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.conv_seg = nn.Conv2d(128, num_landmarks, 1)  # unused; kept for strict loading
        for s in (4, 3, 2, 1):
            self.add_module(f"linear_c{s}", _LinearProj(embed_dims[s - 1], decoder_dim))
        self.linear_fuse = _ConvBNReLU(4 * decoder_dim, decoder_dim)
        self.dropout = nn.Dropout2d(dropout)
        self.linear_pred = nn.Conv2d(decoder_dim, 256, 1)
        self.conv1 = PreActBottleneck(256, 128, 64)
        self.upSample = _UpSample(128)
        self.conv2 = nn.Conv2d(128, num_landmarks, 3, padding=1, bias=False)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[2:]
        maps = []
        for s in (4, 3, 2, 1):
            m = getattr(self, f"linear_c{s}")(feats[s - 1])
            if s != 1:
                m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
            maps.append(m)
        x = self.linear_fuse(torch.cat(maps, dim=1))
        x = self.linear_pred(self.dropout(x))
        return self.conv2(self.upSample(self.conv1(x)))


class _Encoder(nn.Module):
    def __init__(self, backbone: nn.Module, decode_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head


class FGTBTTorch(nn.Module):
    """The whole network: normalized NCHW images (B, 3, H, W), H = W a multiple of 32 ->
    heatmaps (B, num_landmarks, H/2, W/2). State-dict keys ``encoder.backbone.*`` and
    ``encoder.decode_head.*`` as in the release."""

    def __init__(
        self,
        embed_dims: Sequence[int] = (64, 128, 320, 512),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        depths: Sequence[int] = (3, 6, 18, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        decoder_dim: int = 768,
        num_landmarks: int = 124,
        mlp_ratio: float = 4,
        drop_path_rate: float = 0.1,
        decoder_dropout: float = 0.1,
        hpf_sigma: float = 20.0,
        csam_reduction: str = "batch",
        prompt_scale_factor: int = 4,
    ) -> None:
        super().__init__()
        stages = dict(
            embed_dims=embed_dims, num_heads=num_heads, depths=depths, sr_ratios=sr_ratios
        )
        for name, seq in stages.items():
            if len(seq) != 4:
                raise ValueError(f"{name} needs 4 entries (one per stage), got {list(seq)}")
        backbone = MixVisionTransformerEVP(
            embed_dims,
            num_heads,
            depths,
            sr_ratios,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            hpf_sigma=hpf_sigma,
            scale_factor=prompt_scale_factor,
            csam_reduction=csam_reduction,
        )
        head = SegFormerHeatmapHead(embed_dims, decoder_dim, num_landmarks, decoder_dropout)
        self.encoder = _Encoder(backbone, head)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four backbone stage maps (B, E_s, H / 2^(s+1), W / 2^(s+1)), s = 1..4, NCHW."""
        return self.encoder.backbone(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder.decode_head(self.encoder.backbone(x))


def build_torch_model_from_config(config_model: Any) -> FGTBTTorch:
    """An :class:`FGTBTTorch` from our model config (``configs/fgtbt.py`` ``model_config``).

    ``dtype`` and ``remat`` of the config are JAX-side settings and are ignored here (cast the
    module with ``.to(torch.bfloat16)`` or use autocast for reduced precision).
    """
    c = config_model
    return FGTBTTorch(
        embed_dims=tuple(c.embed_dims),
        num_heads=tuple(c.num_heads),
        depths=tuple(c.depths),
        sr_ratios=tuple(c.sr_ratios),
        decoder_dim=int(c.decoder_dim),
        num_landmarks=int(c.num_landmarks),
        mlp_ratio=c.mlp_ratio,
        drop_path_rate=float(c.drop_path_rate),
        decoder_dropout=float(c.decoder_dropout),
        hpf_sigma=float(c.hpf_sigma),
        csam_reduction=str(c.csam_reduction),
        prompt_scale_factor=int(c.get("prompt_scale_factor", 4)),
    )
