"""In-memory synthetic face-like batches (``config.data.source = "synthetic"``).

Every image shows the same 124-point constellation (a fixed random template, one colour per
unified landmark, drawn as small blurred dots on a smooth random background) under a random
similarity transform; the targets are those points in heatmap space. The network can learn to
find them, so the loss and NME fall with training, and nothing needs TensorFlow or files.

Batches follow the input pipeline's contract (``input_pipeline.pipeline.make_train_iterator``):

* ``image``      (B, S, S, 3) float32, NHWC, ImageNet-normalized
* ``coords``     (B, C, 2) int32 ``(x, y)`` heatmap-space targets in unified slots (zeros where
  the sample's dataset does not annotate the landmark; C = 124 without schemes)
* ``mask``       (B, C) bool annotation mask
* ``dataset_id`` (B,) int32 (``UnifiedSet.dataset_ids``: built-ins 0..3, scheme datasets 4+)

The global batch holds ``config.data.batch_per_dataset`` rows of each dataset of
``config.data.datasets``, in the run's order (:func:`fgtbt_jax.schemes.run_datasets`); the
scheme datasets of ``config.data.schemes`` see the same faces with their new points placed as
:func:`fgtbt_jax.schemes.place_new_points` says. Row ``r`` of step ``t`` depends only on
``(seed, t, r)``, so a process's slice and a resumed run (``start_step``) see exactly the rows an
uninterrupted single-process run sees.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import ml_collections
import numpy as np

from fgtbt_jax import landmarks, schemes, transforms
from fgtbt_jax.transforms import imagenet_normalize

_TEMPLATE_SEED = 20_240_601
_EVAL_STREAM = 1_000_003  # keeps evaluation samples apart from training steps


@functools.cache
def _template() -> tuple[np.ndarray, np.ndarray]:
    """(124, 2) points in [-1, 1]² (unit-disc-ish face layout) and (124, 3) colours in [0, 1]."""
    rng = np.random.default_rng(_TEMPLATE_SEED)
    radius = 0.9 * np.sqrt(rng.uniform(0.0, 1.0, landmarks.NUM_UNIFIED))
    angle = rng.uniform(0.0, 2 * np.pi, landmarks.NUM_UNIFIED)
    points = np.stack([radius * np.cos(angle), 1.15 * radius * np.sin(angle)], axis=-1)
    colours = rng.uniform(0.2, 1.0, (landmarks.NUM_UNIFIED, 3))
    return points, colours


@functools.cache
def _builtin() -> schemes.UnifiedSet:
    return schemes.derive(landmarks.DATASETS)


def _unified(config: ml_collections.ConfigDict) -> schemes.UnifiedSet:
    return schemes.unified_set_of(config.data)


def _layout(unified: schemes.UnifiedSet) -> tuple[np.ndarray, np.ndarray]:
    """(C, 2) template points and (C, 3) colours of every channel of ``unified``."""
    points, colours = _template()
    if unified.num_channels == landmarks.NUM_UNIFIED:
        return points, colours
    extra = [
        np.random.default_rng((_TEMPLATE_SEED, c)).uniform(0.2, 1.0, 3)
        for c in range(landmarks.NUM_UNIFIED, unified.num_channels)
    ]
    return schemes.place_new_points(points, unified), np.concatenate([colours, extra])


def dataset_ids(config: ml_collections.ConfigDict) -> np.ndarray:
    """(B,) int32 dataset id of every row of a global batch (run order, blocks of bpd)."""
    ids = _unified(config).dataset_ids
    return np.repeat(ids, int(config.data.batch_per_dataset))


def _upsample_bilinear(grid: np.ndarray, size: int) -> np.ndarray:
    """(2, 2, C) corner values → (size, size, C), bilinear with pixel-centre alignment."""
    t = np.clip((np.arange(size) + 0.5) * 2.0 / size - 0.5, 0.0, 1.0).astype(np.float32)
    top = grid[0, None, 0] * (1 - t)[:, None] + grid[0, None, 1] * t[:, None]  # (size, C)
    bottom = grid[1, None, 0] * (1 - t)[:, None] + grid[1, None, 1] * t[:, None]
    return top[None] * (1 - t)[:, None, None] + bottom[None] * t[:, None, None]


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (H, W, C), radius 4σ, mirrored borders (numpy only)."""
    radius = max(1, int(round(4 * sigma)))
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k /= k.sum()
    out = np.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")
    out = sum(w * out[i : i + image.shape[0]] for i, w in enumerate(k))
    out = sum(w * out[:, i : i + image.shape[1]] for i, w in enumerate(k))
    return out.astype(np.float32)


def render_sample(
    rng: np.random.Generator,
    dataset_id: int,
    img_size: int,
    heatmap_size: int,
    unified: schemes.UnifiedSet | None = None,
) -> dict[str, Any]:
    """One synthetic face: image (S, S, 3) float32 normalized, points and heatmap targets.

    Returns ``image``, ``points`` (C, 2) float64 image coordinates of every unified landmark,
    ``coords`` (C, 2) int32 heatmap targets (SPEC §4 convention of the dataset; zeros where
    the dataset does not annotate), ``mask`` (C,) bool, ``center`` (2,), ``scale`` (crop of
    side 200·scale = S around the centre, so the crop is the whole image) and ``box_size``.
    ``unified``: the run's unified set (default the four built-in datasets, C = 124).
    """
    s = img_size
    unified = _builtin() if unified is None else unified
    template, colours = _layout(unified)
    size = rng.uniform(0.28, 0.38) * s
    theta = np.deg2rad(rng.uniform(-25.0, 25.0))
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    centre = s / 2 + rng.uniform(-0.08, 0.08, 2) * s
    points = centre + size * template @ rot.T  # (C, 2) (x, y)

    # Smooth background: a bilinear blend of four random corner colours plus noise.
    corners = rng.uniform(0.0, 1.0, (2, 2, 3)).astype(np.float32)
    background = _upsample_bilinear(corners, s)
    dots = np.zeros((s, s, 3), np.float32)
    ij = np.clip(np.round(points).astype(int), 0, s - 1)
    np.add.at(dots, (ij[:, 1], ij[:, 0]), colours.astype(np.float32))
    blur = max(0.6, s / 96)
    dots = _gaussian_blur(dots, blur) * (2 * np.pi * blur * blur)
    image = 0.4 * background + np.clip(dots, 0.0, 1.0)
    image += rng.normal(0.0, 0.03, image.shape).astype(np.float32)
    image = imagenet_normalize(np.clip(image, 0.0, 1.0), scale=1.0)  # x / 1.0 is exact

    d = int(np.flatnonzero(unified.dataset_ids == dataset_id)[0])
    name = unified.datasets[d]
    center, scale = np.array([s / 2, s / 2]), s / 200.0
    mask = unified.mask[d]
    coords = np.zeros((unified.num_channels, 2), np.int32)
    coords[mask] = transforms.heatmap_target_points(
        points[mask],
        center,
        scale,
        heatmap_size,
        integer=transforms.uses_integer_transform(unified.schemes.get(name, name)),
    )
    box = points[mask].max(axis=0) - points[mask].min(axis=0)
    return {
        "image": image.astype(np.float32),
        "points": points,
        "coords": coords,
        "mask": mask,
        "center": center,
        "scale": scale,
        "box_size": float(np.sqrt(box[0] * box[1])),
    }


def global_batch(config: ml_collections.ConfigDict, seed: int, step: int) -> dict[str, np.ndarray]:
    """Every row of the global batch of training step ``step`` (see the module docstring)."""
    return _rows(config, seed, step, np.arange(len(dataset_ids(config))))


def _rows(
    config: ml_collections.ConfigDict, seed: int, step: int, rows: np.ndarray
) -> dict[str, np.ndarray]:
    ids = dataset_ids(config)
    return _train_rows(
        ids[rows], rows, int(config.img_size), int(config.heatmap_size), seed, step,
        _unified(config),
    )  # fmt: skip


def _train_rows(
    ids: np.ndarray,
    rows: np.ndarray,
    img_size: int,
    heatmap_size: int,
    seed: int,
    step: int,
    unified: schemes.UnifiedSet | None = None,
) -> dict[str, np.ndarray]:
    """Rows ``rows`` (dataset ids ``ids``) of step ``step``'s batch, stacked."""
    samples = [
        render_sample(np.random.default_rng((int(seed), int(step), int(r))), int(d), img_size,
                      heatmap_size, unified)
        for d, r in zip(ids, rows, strict=True)
    ]  # fmt: skip
    return {
        "image": np.stack([x["image"] for x in samples]),
        "coords": np.stack([x["coords"] for x in samples]),
        "mask": np.stack([x["mask"] for x in samples]),
        "dataset_id": np.asarray(ids, np.int32),
    }


def mixed_batch(
    batch_size: int, img_size: int, heatmap_size: int, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """A training batch of any size (benchmarks): row ``r`` is a face of dataset ``r mod 4``
    (``landmarks.DATASETS`` order), rendered as row ``r`` of step 0; same keys as
    :func:`global_batch`."""
    rows = np.arange(int(batch_size))
    ids = (rows % len(landmarks.DATASETS)).astype(np.int32)
    return _train_rows(ids, rows, int(img_size), int(heatmap_size), seed, 0)


def process_rows(
    config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> np.ndarray:
    """Indices of the global-batch rows that process ``process_index`` of ``process_count`` gets.

    The rows are dealt in rounds (one of each dataset per round: C₀ W₀ 3₀ A₀ C₁ W₁ …) and each
    process takes a contiguous run of that order, so every process draws a mix of datasets as
    in the reference's data-parallel training. Returned in global (dataset-block) order.
    """
    ids = dataset_ids(config)
    total = len(ids)
    if process_count < 1 or not 0 <= process_index < process_count or total % process_count:
        raise ValueError(
            f"global batch of {total} rows does not split over {process_count} processes "
            f"(process {process_index})"
        )
    per_dataset = int(config.data.batch_per_dataset)
    rounds = np.arange(total).reshape(-1, per_dataset).T.reshape(-1)  # C0 W0 3W0 A0 C1 ...
    per = total // process_count
    return np.sort(rounds[process_index * per : (process_index + 1) * per])


def make_train_iterator(
    config: ml_collections.ConfigDict,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator over this process's rows of the global batches from ``start_step`` on.

    See :func:`process_rows` for which rows a process gets.
    """
    rows = process_rows(config, process_index, process_count)
    step = int(start_step)
    while True:
        yield _rows(config, seed, step, rows)
        step += 1


def eval_batches(
    config: ml_collections.ConfigDict,
    *,
    num_per_dataset: int = 8,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Held-out synthetic evaluation batches in :func:`fgtbt_jax.evaluation.metrics.evaluate`'s
    contract.

    ``image`` (B, S, S, 3), ``dataset_id``, ``points`` (B, C, 2) image coordinates, ``mask``,
    ``center`` (B, 2), ``scale`` (B,), ``box_size`` (B,), ``image_id`` (B,) str.
    """
    unified = _unified(config)
    samples = []
    for d, name in zip(unified.dataset_ids, unified.datasets, strict=True):
        for k in range(num_per_dataset):
            rng = np.random.default_rng((int(seed), _EVAL_STREAM, int(d), k))
            x = render_sample(rng, int(d), int(config.img_size), int(config.heatmap_size), unified)
            x["dataset_id"] = int(d)
            x["image_id"] = f"synthetic_{name}_{k}"
            samples.append(x)
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        batches.append(
            {
                "image": np.stack([x["image"] for x in chunk]),
                "dataset_id": np.asarray([x["dataset_id"] for x in chunk], np.int32),
                "points": np.stack([x["points"] for x in chunk]).astype(np.float32),
                "mask": np.stack([x["mask"] for x in chunk]),
                "center": np.stack([x["center"] for x in chunk]).astype(np.float32),
                "scale": np.asarray([x["scale"] for x in chunk], np.float32),
                "box_size": np.asarray([x["box_size"] for x in chunk], np.float32),
                "image_id": np.asarray([x["image_id"] for x in chunk]),
            }
        )
    return batches
