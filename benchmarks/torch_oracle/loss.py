"""The FMB loss (SPEC §3) and a training step in PyTorch, for the benchmark's PyTorch side.

Mirrors :mod:`fgtbt_jax.train.loss` on NCHW tensors: Gaussian targets drawn from integer
coordinates, Adaptive Wing loss times the 3×3-max-pooled weight map, then the per-dataset
balancing. Test / benchmark tooling only, like :mod:`benchmarks.torch_oracle.fgtbt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from fgtbt_jax.train.loss import gaussian_table, loss_fields


def render_heatmaps(
    coords: torch.Tensor, height: int, width: int, sigma: float = 3.0
) -> torch.Tensor:
    """Gaussian targets (B, K, H, W) float32 (NCHW) from (B, K, 2) integer ``(x, y)`` points.

    exp(-d² / 2σ²) inside the (2⌊3σ⌋+1)² window around each point, clipped to the map, zero
    elsewhere; values are float64 exponentials rounded once to float32 (as the reference).
    """
    table, radius = gaussian_table(float(sigma))
    table = torch.from_numpy(table).to(coords.device)
    coords = coords.to(torch.int64)
    x = coords[:, :, 0, None, None]  # (B, K, 1, 1)
    y = coords[:, :, 1, None, None]
    dx = torch.arange(width, device=coords.device)[None, None, None, :] - x  # (B, K, 1, W)
    dy = torch.arange(height, device=coords.device)[None, None, :, None] - y  # (B, K, H, 1)
    inside = (dx.abs() <= radius) & (dy.abs() <= radius)
    d2 = torch.clamp(dx * dx + dy * dy, max=table.shape[0] - 1)
    return torch.where(inside, table[d2], torch.zeros((), device=coords.device))


def adaptive_wing(
    pred: torch.Tensor,
    target: torch.Tensor,
    omega: float = 14.0,
    theta: float = 0.5,
    epsilon: float = 1.0,
    alpha: float = 2.1,
) -> torch.Tensor:
    """Per-pixel Adaptive Wing loss (same formula as :func:`fgtbt_jax.loss.adaptive_wing`)."""
    delta = (pred - target).abs()
    a = alpha - target
    small = omega * torch.log1p(torch.pow(delta / epsilon, a))
    ratio = theta / epsilon
    big_a = omega * (1.0 / (1.0 + torch.pow(ratio, a))) * a * torch.pow(ratio, a - 1.0) / epsilon
    big_c = theta * big_a - omega * torch.log1p(torch.pow(ratio, a))
    return torch.where(delta < theta, small, big_a * delta - big_c)


def fmb_loss(
    pred: torch.Tensor,
    coords: torch.Tensor,
    mask: torch.Tensor,
    dataset_id: torch.Tensor,
    weights: torch.Tensor,
    *,
    num_datasets: int = 4,
    loss_cfg: Mapping[str, Any] | Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """FMB loss of NCHW heatmaps ``pred`` (B, K, H, W); returns ``(total, per_dataset (D,))``.

    ``coords`` (B, K, 2) integer ``(x, y)`` heatmap-space targets, ``mask`` (B, K) bool,
    ``dataset_id`` (B,) int, ``weights`` (K,) per-landmark weights. Computed in float32.
    """
    cfg = loss_fields(loss_cfg)
    pred = pred.float()
    b, k, h, w = pred.shape
    target = render_heatmaps(coords, h, w, cfg["sigma"])
    pooled = F.max_pool2d(target, 3, stride=1, padding=1)
    wmap = 1.0 + cfg["weight_map_scale"] * (pooled >= cfg["weight_map_threshold"]).float()
    per_pixel = (
        adaptive_wing(pred, target, cfg["omega"], cfg["theta"], cfg["epsilon"], cfg["alpha"]) * wmap
    )
    per_map = per_pixel.mean(dim=(2, 3))  # (B, K)
    maskf = mask.float()
    onehot = (dataset_id[:, None] == torch.arange(num_datasets, device=pred.device)).float()
    sums = (onehot[:, :, None] * (per_map * maskf)[:, None, :]).sum(0)  # (D, K)
    counts = (onehot[:, :, None] * maskf[:, None, :]).sum(0)
    annotated = counts > 0
    per_landmark = torch.where(annotated, sums / counts.clamp(min=1.0), torch.zeros_like(sums))
    weighted = per_landmark * weights.float()[None, :]
    per_dataset = weighted.sum(1) / annotated.sum(1).float().clamp(min=1.0)
    return per_dataset.sum(), per_dataset


def make_train_step(
    model: torch.nn.Module,
    weights: torch.Tensor,
    *,
    loss_cfg: Mapping[str, Any] | Any,
    lr: float = 2.5e-4,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    ema_decay: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """A PyTorch training step like the JAX one: train-mode forward, FMB loss, backward, AdamW
    (PyTorch's) over the trained parameters (``conv_seg`` excluded, as it gets no gradient in
    the reference) and, with ``ema_decay``, an EMA of parameters and buffers.

    The step takes a batch ``{'image' (B, 3, H, W) NCHW, 'coords', 'mask', 'dataset_id'}`` and
    returns the loss (a 0-d tensor). ``forward`` replaces ``model`` for the forward pass (e.g.
    a ``torch.compile``d module sharing its parameters).
    """
    fwd = forward if forward is not None else model
    params = [p for n, p in model.named_parameters() if ".conv_seg." not in n]
    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    ema = None
    if ema_decay is not None:
        ema = [t.detach().clone() for t in params]
        ema_buffers = [t.detach().clone() for t in model.buffers() if t.is_floating_point()]
        live_buffers = [t for t in model.buffers() if t.is_floating_point()]
    model.train()

    def step(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        if autocast_dtype is None:
            heatmaps = fwd(batch["image"])
        else:
            with torch.autocast(batch["image"].device.type, autocast_dtype):
                heatmaps = fwd(batch["image"])
        total, _ = fmb_loss(
            heatmaps,
            batch["coords"],
            batch["mask"],
            batch["dataset_id"],
            weights,
            loss_cfg=loss_cfg,
        )
        total.backward()
        opt.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - ema_decay)
                torch._foreach_lerp_(ema_buffers, live_buffers, 1.0 - ema_decay)
        return total.detach()

    return step
