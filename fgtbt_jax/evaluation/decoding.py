"""Test-time flip and heatmap decoding, on device (SPEC §5).

Heatmaps are NHWC ``(B, H, W, C)``; points are ``(x, y)`` with ``x`` the column. Decoded points
are in heatmap *index* space (the integer index of the maximum, optionally refined) and go back
to the image with :func:`fgtbt_jax.transforms.inverse_transform_points` (``T⁻¹·(q − 1)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import landmarks

REFINEMENTS: tuple[str, ...] = ("none", "quarter", "dark")


FlipLayout = str | Sequence[int] | np.ndarray | None


def _channel_flip_permutation(layout: FlipLayout, channels: int) -> np.ndarray:
    if layout is None or isinstance(layout, str):
        dataset = layout or "unified"
        if dataset == "unified":
            perm = landmarks.unified_flip_permutation()
        else:
            perm = landmarks.flip_permutation(dataset)
    else:
        dataset = "given"
        perm = np.asarray(layout, np.int32)
    if perm.shape[0] != channels:
        raise ValueError(
            f"heatmaps have {channels} channels but the {dataset} flip permutation has "
            f"{perm.shape[0]}"
        )
    return perm


def flip_back(heatmaps: jax.Array, layout: FlipLayout = "unified") -> jax.Array:
    """Heatmaps of a mirrored input (B, H, W, C) → maps in the frame of the original image.

    Mirrors the W axis and swaps the symmetric channels of ``layout``: ``"unified"``/None: the
    124 unified channels; a dataset name: C is that dataset's own point count, in its order; a
    (C,) channel permutation (e.g. ``UnifiedSet.flip`` of a run with scheme datasets).
    """
    heatmaps = jnp.asarray(heatmaps)
    if heatmaps.ndim != 4:
        raise ValueError(f"expected NHWC heatmaps (B, H, W, C), got shape {heatmaps.shape}")
    perm = _channel_flip_permutation(layout, heatmaps.shape[-1])
    return heatmaps[:, :, ::-1, :][..., perm]


def flip_average(
    heatmaps: jax.Array, heatmaps_of_flipped_input: jax.Array, layout: FlipLayout = "unified"
) -> jax.Array:
    """``(h + flip_back(h_flip, layout)) / 2`` — the test-time flip of SPEC §5 (NHWC)."""
    return (jnp.asarray(heatmaps) + flip_back(heatmaps_of_flipped_input, layout)) / 2


def _gaussian_blur(maps: jax.Array, sigma: float) -> jax.Array:
    """Separable zero-padded Gaussian blur of (N, H, W) maps."""
    radius = max(1, int(math.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k = jnp.asarray(k / k.sum(), maps.dtype)
    x = maps[:, None]  # (N, 1, H, W)
    dn = ("NCHW", "OIHW", "NCHW")
    x = jax.lax.conv_general_dilated(
        x, k[None, None, :, None], (1, 1), "SAME", dimension_numbers=dn
    )
    x = jax.lax.conv_general_dilated(
        x, k[None, None, None, :], (1, 1), "SAME", dimension_numbers=dn
    )
    return x[:, 0]


def decode_argmax(
    heatmaps: jax.Array, refine: str = "none", *, dark_sigma: float | None = None
) -> jax.Array:
    """Heatmaps (B, H, W, K) → (B, K, 2) float32 points ``(x, y)`` in heatmap index space.

    ``refine``:
      ``"none"``    arg-max, ``x = idx mod W``, ``y = idx div W`` (the reference; first maximum
                    in row-major order on ties).
      ``"quarter"`` plus a quarter pixel toward the larger neighbour on each axis (interior
                    maxima only).
      ``"dark"``    plus the Newton step ``−H⁻¹∇`` of a second-order Taylor expansion of the
                    log-heatmap at the maximum (central differences; DARK, Zhang et al. 2020).
                    ``dark_sigma`` optionally smooths the maps with a Gaussian first (keeping each
                    map's maximum). Exact for Gaussian-shaped maps. Interior maxima only; the
                    step is dropped where the log-map is not locally concave and clipped to ±1.
    """
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    heatmaps = jnp.asarray(heatmaps, jnp.float32)
    if heatmaps.ndim != 4:
        raise ValueError(f"expected NHWC heatmaps (B, H, W, K), got shape {heatmaps.shape}")
    b, h, w, k = heatmaps.shape
    maps = jnp.transpose(heatmaps, (0, 3, 1, 2)).reshape(b * k, h, w)
    idx = jnp.argmax(maps.reshape(b * k, h * w), axis=-1)
    x = (idx % w).astype(jnp.int32)
    y = (idx // w).astype(jnp.int32)
    xy = jnp.stack([x, y], -1).astype(jnp.float32)
    if refine != "none":
        if refine == "dark":
            if dark_sigma:
                peak = jnp.max(maps, axis=(1, 2), keepdims=True)
                blurred = _gaussian_blur(maps, float(dark_sigma))
                maps = (
                    blurred
                    * peak
                    / jnp.maximum(jnp.max(blurred, axis=(1, 2), keepdims=True), 1e-10)
                )
            maps = jnp.log(jnp.maximum(maps, 1e-10))
        flat = maps.reshape(b * k, h * w)

        def at(dx: int, dy: int) -> jax.Array:
            xx = jnp.clip(x + dx, 0, w - 1)
            yy = jnp.clip(y + dy, 0, h - 1)
            return jnp.take_along_axis(flat, (yy * w + xx)[:, None], axis=1)[:, 0]

        interior = (x >= 1) & (x <= w - 2) & (y >= 1) & (y <= h - 2)
        gx = 0.5 * (at(1, 0) - at(-1, 0))
        gy = 0.5 * (at(0, 1) - at(0, -1))
        if refine == "quarter":
            offset = 0.25 * jnp.stack([jnp.sign(gx), jnp.sign(gy)], -1)
        else:
            c = at(0, 0)
            hxx = at(1, 0) - 2 * c + at(-1, 0)
            hyy = at(0, 1) - 2 * c + at(0, -1)
            hxy = 0.25 * (at(1, 1) - at(-1, 1) - at(1, -1) + at(-1, -1))
            det = hxx * hyy - hxy * hxy
            concave = (det > 1e-12) & (hxx < 0)
            safe = jnp.where(concave, det, 1.0)
            ox = -(hyy * gx - hxy * gy) / safe
            oy = -(hxx * gy - hxy * gx) / safe
            offset = jnp.where(concave[:, None], jnp.clip(jnp.stack([ox, oy], -1), -1, 1), 0.0)
        xy = xy + jnp.where(interior[:, None], offset, 0.0)
    return xy.reshape(b, k, 2)


def make_eval_step(
    model: Any,
    *,
    flip_test: bool = True,
    refine: str = "none",
    dark_sigma: float | None = None,
    flip: FlipLayout = "unified",
) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, jax.Array]]:
    """A pure ``(variables, batch) → {'heatmaps', 'points'}`` for the C unified channels.

    ``batch['image']``: (B, S, S, 3) float32 normalized NHWC. Returns ``heatmaps`` (B, S/2, S/2,
    C) (flip-averaged when ``flip_test``, channels swapped by ``flip``: the 124 built-in
    channels by default, else a run's ``UnifiedSet.flip``) and ``points`` (B, C, 2) float32 in
    heatmap index space (:func:`decode_argmax`). The mirrored images run as a separate forward
    pass (the network's CSAM statistics span the batch, so a joint batch would change the
    outputs).
    Wrap in ``jax.jit`` yourself (or use as is inside a jitted function).
    """
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")

    def eval_step(variables: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        images = batch["image"]
        heatmaps = model.apply(variables, images, train=False)
        if flip_test:
            mirrored = model.apply(variables, images[:, :, ::-1, :], train=False)
            heatmaps = flip_average(heatmaps, mirrored, flip)
        points = decode_argmax(heatmaps, refine, dark_sigma=dark_sigma)
        return {"heatmaps": heatmaps, "points": points}

    return eval_step


def make_predict_fn(
    model: Any,
    *,
    flip_test: bool = True,
    refine: str = "none",
    dark_sigma: float | None = None,
    flip: FlipLayout = "unified",
) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, jax.Array]]:
    """Same contract and results as ``jax.jit(make_eval_step(...))``, but the network is
    compiled once and called twice (image, mirror) instead of being compiled twice inside one
    program: about half the compile time, which dominates short runs on a CPU."""
    if refine not in REFINEMENTS:
        raise ValueError(f"refine must be one of {REFINEMENTS}, got {refine!r}")
    forward = jax.jit(lambda variables, images: model.apply(variables, images, train=False))
    mirror = jax.jit(lambda images: images[:, :, ::-1, :])
    average = jax.jit(lambda h, hf: flip_average(h, hf, flip))
    decode = jax.jit(lambda h: decode_argmax(h, refine, dark_sigma=dark_sigma))

    def predict(variables: Mapping[str, Any], batch: Mapping[str, Any]) -> dict[str, jax.Array]:
        images = jnp.asarray(batch["image"])
        heatmaps = forward(variables, images)
        if flip_test:
            heatmaps = average(heatmaps, forward(variables, mirror(images)))
        return {"heatmaps": heatmaps, "points": decode(heatmaps)}

    return predict
