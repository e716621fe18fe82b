"""The function that is exported: normalized images → heatmaps, or → points and scores."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from fgtbt_jax.evaluation import decoding
from fgtbt_jax.transforms import IMAGENET_MEAN, IMAGENET_STD


def output_names(decode: bool) -> tuple[str, ...]:
    return ("points", "scores") if decode else ("heatmaps",)


def inference_fn(
    model: Any,
    variables: Mapping[str, Any],
    *,
    with_flip: bool,
    decode: bool,
    refine: str,
    channel_flip: decoding.FlipLayout = "unified",
) -> Callable[[jax.Array], tuple[jax.Array, ...]]:
    """``images → outputs`` with the variables closed over (they become constants).

    images: (B, S, S, 3) float32 ImageNet-normalized NHWC. Outputs (see :func:`output_names`):
    ``heatmaps`` (B, S/2, S/2, C) NHWC (C = ``model.num_landmarks``, 124 for the release);
    with ``decode``, ``points`` (B, C, 2) float32 ``(x, y)`` in heatmap index space
    (:func:`decoding.decode_argmax` with ``refine``) and ``scores`` (B, C) the maxima of the
    maps. ``with_flip`` averages with the mirrored input's maps, which run as a separate forward
    pass (CSAM statistics span the batch), their channels mirrored by ``channel_flip`` (the
    run's ``UnifiedSet.flip`` for a head widened by schemes).
    """
    if refine not in decoding.REFINEMENTS:
        raise ValueError(f"refine must be one of {decoding.REFINEMENTS}, got {refine!r}")

    def fn(images: jax.Array) -> tuple[jax.Array, ...]:
        heatmaps = model.apply(variables, images, train=False)
        if with_flip:
            mirrored = model.apply(variables, images[:, :, ::-1, :], train=False)
            heatmaps = decoding.flip_average(heatmaps, mirrored, channel_flip)
        if not decode:
            return (heatmaps,)
        points = decoding.decode_argmax(heatmaps, refine)
        return points, jnp.max(heatmaps, axis=(1, 2))

    return fn


def metadata(
    config: ml_collections.ConfigDict, *, with_flip: bool, decode: bool, refine: str, batch: str
) -> dict[str, str]:
    """String metadata stored with an artifact (what the runtime side needs to use it)."""
    return {
        "fgtbt.preset": str(config.preset),
        "fgtbt.img_size": str(int(config.img_size)),
        "fgtbt.heatmap_size": str(int(config.img_size) // 2),
        "fgtbt.input": "images (B, S, S, 3) float32 NHWC, RGB, (x/255 - mean) / std",
        "fgtbt.mean": ",".join(str(v) for v in IMAGENET_MEAN),
        "fgtbt.std": ",".join(str(v) for v in IMAGENET_STD),
        "fgtbt.outputs": ",".join(output_names(decode)),
        "fgtbt.with_flip": str(bool(with_flip)).lower(),
        "fgtbt.decode": str(bool(decode)).lower(),
        "fgtbt.refine": refine if decode else "",
        "fgtbt.csam_reduction": str(config.model.csam_reduction),
        "fgtbt.batch": batch,
        "fgtbt.points": "(x, y) in heatmap index space" if decode else "",
    }
