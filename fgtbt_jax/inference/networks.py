"""The landmark networks behind :class:`~fgtbt_jax.inference.tracking.CropLandmarker`: a JAX
checkpoint or an ONNX export, each as a :data:`~fgtbt_jax.inference.tracking.Network`
(float32 (B, S, S, 3) ImageNet-normalized NHWC crops → points (B, C, 2) in heatmap index
space, heatmap peaks (B, C), heatmap size; C = 124, or a run's wider unified set) with its
crop size ``S``.

:func:`onnx_network` imports no JAX (onnxruntime only).
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np

from fgtbt_jax import errors, transforms
from fgtbt_jax.inference.tracking import Network


def jax_network(
    config: ml_collections.ConfigDict,
    checkpoint: str | os.PathLike,
    *,
    flip: bool,
    refine: str,
    channel_flip: np.ndarray | None = None,
) -> tuple[Network, int]:
    """``(network, img_size)`` of the model of ``config`` with the weights of ``checkpoint``
    (``.pth``, orbax directory or training workdir), decoded with ``refine``, averaged with
    the mirrored input's heatmaps when ``flip``. ``channel_flip``: the (C,) channel permutation
    of a model wider than the 124 built-in channels (``UnifiedSet.flip``)."""
    import fgtbt_jax
    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.models.fgtbt import enable_x64_if_requested

    enable_x64_if_requested(config.model)
    model, variables = fgtbt_jax.load_pretrained(checkpoint, config, "--checkpoint")
    channels = "unified" if channel_flip is None else channel_flip
    step = decoding.make_predict_fn(model, flip_test=flip, refine=refine, flip=channels)

    def network(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        out = step(variables, {"image": images})
        heatmaps = np.asarray(out["heatmaps"])
        return np.asarray(out["points"]), heatmaps.max(axis=(1, 2)), heatmaps.shape[1]

    return network, int(config.img_size)


def onnx_network(path: str | os.PathLike, *, flip: bool, refine: str) -> tuple[Network, int]:
    """``(network, img_size)`` of an export of ``scripts/export.py --format onnx --decode``.

    Raises :class:`fgtbt_jax.errors.Error` when the export's flip, refinement or input
    normalization differ from what is asked (they are baked into the file).
    """
    from fgtbt_jax.inference.onnx_backend import OnnxPredictor

    model = OnnxPredictor(path)
    wanted = {"decode": True, "with_flip": flip, "refine": refine}
    got = {k: getattr(model, k) for k in wanted}
    if got != wanted:
        raise errors.Error(f"{path} was exported with {got}; flags ask {wanted}")
    mean = np.asarray(transforms.IMAGENET_MEAN, np.float32)
    std = np.asarray(transforms.IMAGENET_STD, np.float32)
    if not (np.array_equal(model.mean, mean) and np.array_equal(model.std, std)):
        raise errors.Error(f"{path} expects another input normalization: {model.mean}, {model.std}")

    def network(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        out = model(images)
        return out["points"], out["scores"], model.heatmap_size

    return network, model.img_size
