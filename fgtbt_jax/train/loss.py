"""Gaussian heatmap targets and the FMB loss (SPEC §3).

All heatmaps are NHWC: ``(batch, rows, cols, landmarks)``. Coordinates are ``(x, y)`` pairs in
heatmap pixels, ``x`` the column and ``y`` the row. Everything here is a pure ``jnp`` function
that can be jitted; targets are drawn on the device from coordinates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# The fields of ``config.loss`` (configs/fgtbt.py) the loss reads.
LOSS_FIELDS: tuple[str, ...] = (
    "omega",
    "theta",
    "epsilon",
    "alpha",
    "sigma",
    "weight_map_threshold",
    "weight_map_scale",
)


def gaussian_table(sigma: float, dtype: Any = np.float32) -> tuple[np.ndarray, int]:
    """Values of exp(-d / (2σ²)) for squared distances d = 0..2r², and r = ⌊3σ⌋.

    Computed in float64 on the host and rounded once to ``dtype``, as the reference draws its
    targets; a lookup keeps device-side targets bit-identical to it.
    """
    radius = int(math.floor(3.0 * sigma))
    d = np.arange(2 * radius * radius + 1, dtype=np.float64)
    return np.exp(-d / (2.0 * sigma * sigma)).astype(dtype), radius


def render_heatmaps(
    coords: jax.Array, size: int | tuple[int, int], sigma: float = 3.0, dtype: Any = jnp.float32
) -> jax.Array:
    """Gaussian target heatmaps drawn from point coordinates.

    Args:
      coords: (B, K, 2) ``(x, y)`` points in heatmap pixels (x = column, y = row); integers, or
        floats which are truncated toward zero like the reference's ``int()``.
      size: heatmap side ``S`` or ``(H, W)``.
      sigma: Gaussian standard deviation in pixels (static).
      dtype: of the heatmaps (float32, or float64 for a float64 loss).

    Returns:
      (B, H, W, K) ``dtype``, NHWC. Each map holds exp(-((c-x)² + (r-y)²) / 2σ²) (peak 1 at the
      point) inside the (2⌊3σ⌋+1)² window centred on the point, clipped to the map, and zero
      elsewhere; a point whose window lies entirely outside the map gives an all-zero map.
    """
    h, w = (size, size) if isinstance(size, int) else size
    x, y = _points(coords)
    dx = jnp.arange(w, dtype=jnp.int32)[None, None, :, None] - x  # (B, 1, W, K)
    dy = jnp.arange(h, dtype=jnp.int32)[None, :, None, None] - y  # (B, H, 1, K)
    return _gaussian(dx, dy, sigma, dtype)


def _points(coords: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, K, 2) ``(x, y)`` points → int32 x and y, each (B, 1, 1, K)."""
    coords = jnp.asarray(coords)
    if coords.ndim != 3 or coords.shape[-1] != 2:
        raise ValueError(f"coords must be (B, K, 2) (x, y) points, got shape {coords.shape}")
    if not jnp.issubdtype(coords.dtype, jnp.integer):
        coords = jnp.trunc(coords)
    coords = coords.astype(jnp.int32)
    return coords[:, None, None, :, 0], coords[:, None, None, :, 1]


def _gaussian(dx: jax.Array, dy: jax.Array, sigma: float, dtype: Any) -> jax.Array:
    """The target value at column/row offsets ``dx``, ``dy`` from the point (broadcast):
    ``gaussian_table``'s entry dx² + dy² inside the window, 0 outside.

    Looked up in two steps, without a per-pixel gather: the row of the host table
    G[i, j] = table[i² + j²] (i, j ≤ r) for |dy| (a lookup on the small row-offset array),
    then its entry |dx| by r + 1 selects, elementwise. Identical values; XLA:TPU does not fuse
    a gather over the (B, H, W, K) maps into the loss and writes them and their indices to
    HBM, while selects fuse (targets and loss of the release bfloat16 train step: 1.1 GB →
    0.03 GB, docs/traffic.md).
    """
    table, radius = gaussian_table(float(sigma), dtype)
    offsets = np.arange(radius + 1)
    grid = table[offsets[:, None] ** 2 + offsets[None, :] ** 2]  # (r + 1, r + 1)
    adx, ady = jnp.abs(dx), jnp.abs(dy)
    row = jnp.asarray(grid)[jnp.minimum(ady, radius)]  # (…dy's shape, r + 1)
    value = jnp.zeros((), dtype)
    for j in offsets:
        value = jnp.where(adx == j, row[..., j], value)
    return jnp.where(ady <= radius, value, jnp.zeros((), dtype))


def heatmaps_and_weights(
    coords: jax.Array,
    size: int | tuple[int, int],
    sigma: float = 3.0,
    dtype: Any = jnp.float32,
    threshold: float = 0.2,
    scale: float = 10.0,
) -> tuple[jax.Array, jax.Array]:
    """``render_heatmaps(coords, size, sigma, dtype)`` and ``weight_map`` of it, elementwise.

    The 3×3 max of a target map at a pixel is the target at the in-map neighbour nearest the
    point: the Gaussian window decreases in |dx| and |dy| separately, and ``weight_map``'s
    max-pool pads with −inf (no neighbour off the map). The table is non-increasing in the
    squared distance d, so that value reaches ``threshold`` exactly when the neighbour lies in
    the window at d ≤ the last table index whose value does: the weight needs neither the
    pooled map nor a second table lookup, and both maps are elementwise in the coordinates
    (they fuse into the loss). Identical values. Both (B, H, W, K) ``dtype``.
    """
    h, w = (size, size) if isinstance(size, int) else size
    x, y = _points(coords)
    cols = jnp.arange(w, dtype=jnp.int32)[None, None, :, None]
    rows = jnp.arange(h, dtype=jnp.int32)[None, :, None, None]
    target = _gaussian(cols - x, rows - y, sigma, dtype)
    table, radius = gaussian_table(float(sigma), dtype)
    if threshold <= 0:  # every pooled value (0 outside the windows too) reaches it
        return target, jnp.full(target.shape, 1.0 + scale, dtype)
    reaching = np.flatnonzero(table >= threshold)  # a prefix 0..last of the table's indices
    last = int(reaching[-1]) if reaching.size else -1
    near_x = jnp.clip(x, jnp.maximum(cols - 1, 0), jnp.minimum(cols + 1, w - 1)) - x
    near_y = jnp.clip(y, jnp.maximum(rows - 1, 0), jnp.minimum(rows + 1, h - 1)) - y
    inside = (jnp.abs(near_x) <= radius) & (jnp.abs(near_y) <= radius)
    hit = inside & (near_x * near_x + near_y * near_y <= last)
    return target, 1.0 + scale * hit.astype(dtype)


def adaptive_wing(
    pred: jax.Array,
    target: jax.Array,
    omega: float = 14.0,
    theta: float = 0.5,
    epsilon: float = 1.0,
    alpha: float = 2.1,
) -> jax.Array:
    """Per-pixel Adaptive Wing loss (Wang et al. 2019), same shape as ``pred`` / ``target``.

    With δ = |pred - target| and a = α - target: ω·ln(1 + (δ/ε)^a) where δ < θ, else A·δ - C
    with A = ω · a · (θ/ε)^(a-1) / (ε (1 + (θ/ε)^a)) and C = θ·A - ω·ln(1 + (θ/ε)^a).
    """
    dtype = jnp.promote_types(jnp.promote_types(pred.dtype, target.dtype), jnp.float32)
    pred = pred.astype(dtype)
    target = target.astype(dtype)
    delta = jnp.abs(pred - target)
    a = alpha - target
    small = omega * jnp.log1p(jnp.power(delta / epsilon, a))
    ratio = theta / epsilon
    big_a = omega * (1.0 / (1.0 + jnp.power(ratio, a))) * a * jnp.power(ratio, a - 1.0) / epsilon
    big_c = theta * big_a - omega * jnp.log1p(jnp.power(ratio, a))
    return jnp.where(delta < theta, small, big_a * delta - big_c)


def weight_map(target: jax.Array, threshold: float = 0.2, scale: float = 10.0) -> jax.Array:
    """1 + scale·[maxpool3×3(target) ≥ threshold] (stride 1, padding 1), NHWC (B, H, W, K)."""
    target = target.astype(jnp.promote_types(target.dtype, jnp.float32))
    pooled = jax.lax.reduce_window(
        target,
        -jnp.inf,
        jax.lax.max,
        window_dimensions=(1, 3, 3, 1),
        window_strides=(1, 1, 1, 1),
        padding=((0, 0), (1, 1), (1, 1), (0, 0)),
    )
    return 1.0 + scale * (pooled >= threshold).astype(target.dtype)


def dataset_presence(dataset_id: jax.Array, num_datasets: int = 4) -> jax.Array:
    """(num_datasets,) bool: which datasets have at least one sample in the batch."""
    return jnp.any(jnp.asarray(dataset_id)[:, None] == jnp.arange(num_datasets)[None, :], axis=0)


def loss_fields(loss_cfg: Mapping[str, Any] | Any) -> dict[str, float]:
    """The :data:`LOSS_FIELDS` of ``config.loss`` as floats; a missing one is an error."""
    missing = [k for k in LOSS_FIELDS if k not in loss_cfg]
    if missing:
        raise KeyError(
            f"loss config lacks {missing} (the fields of config.loss in configs/fgtbt.py)"
        )
    return {k: float(loss_cfg[k]) for k in LOSS_FIELDS}


def fmb_loss(
    pred: jax.Array,
    coords: jax.Array,
    mask: jax.Array,
    dataset_id: jax.Array,
    weights: jax.Array,
    *,
    num_datasets: int = 4,
    loss_cfg: Mapping[str, Any] | Any,
) -> tuple[jax.Array, jax.Array]:
    """Fine-grained multi-task balancing loss over a batch mixing datasets (SPEC §3).

    Args:
      pred: (B, H, W, C) predicted heatmaps, NHWC (float32 or bfloat16: the loss is computed
        in float32; float64: in float64); C = 124 channels, or the run's unified set's.
      coords: (B, C, 2) int32 ``(x, y)`` heatmap-space targets in unified slots (values of
        unannotated slots are ignored).
      mask: (B, C) bool, True where the sample's dataset annotates the unified landmark.
      dataset_id: (B,) int32 in ``0..num_datasets-1`` (``landmarks.DATASETS`` order, then
        scheme datasets: ``UnifiedSet.dataset_ids``).
      weights: (C,) per-landmark weights w_j (``UnifiedSet.fmb_weights()``; pass float64
        ones for a float64 loss).
      num_datasets: number of dataset ids (static).
      loss_cfg: ``config.loss`` (or any mapping) with omega, theta, epsilon, alpha, sigma,
        weight_map_threshold, weight_map_scale (:data:`LOSS_FIELDS`).

    Returns:
      ``(total, per_dataset)`` in the loss dtype: per_dataset (num_datasets,) holds L_d = mean
      over d's landmarks j of w_j · mean over (d's samples annotating j, rows, cols) of the
      weighted Adaptive Wing loss, and 0 for datasets absent from the batch (see
      ``dataset_presence``);
      total = Σ_d L_d.
    """
    cfg = loss_fields(loss_cfg)
    pred = jnp.asarray(pred)
    dtype = jnp.promote_types(pred.dtype, jnp.float32)
    pred = pred.astype(dtype)
    coords, mask, dataset_id = jnp.asarray(coords), jnp.asarray(mask), jnp.asarray(dataset_id)
    b, h, w, k = pred.shape
    if coords.shape != (b, k, 2) or mask.shape != (b, k) or dataset_id.shape != (b,):
        raise ValueError(
            f"fmb_loss: pred {pred.shape} needs coords {(b, k, 2)}, mask {(b, k)}, "
            f"dataset_id {(b,)}; got {coords.shape}, {mask.shape}, {dataset_id.shape}"
        )
    target, weight = heatmaps_and_weights(
        coords,
        (h, w),
        cfg["sigma"],
        dtype,
        cfg["weight_map_threshold"],
        cfg["weight_map_scale"],
    )
    per_pixel = (
        adaptive_wing(pred, target, cfg["omega"], cfg["theta"], cfg["epsilon"], cfg["alpha"])
        * weight
    )
    per_map = jnp.mean(per_pixel, axis=(1, 2))  # (B, K): mean over rows, cols

    maskf = mask.astype(dtype)
    onehot = (dataset_id[:, None] == jnp.arange(num_datasets)[None, :]).astype(dtype)  # (B, D)
    # Plain sums, not matmuls: accelerators may run float32 matmuls at reduced precision.
    sums = jnp.sum(onehot[:, :, None] * (per_map * maskf)[:, None, :], axis=0)  # (D, K)
    counts = jnp.sum(onehot[:, :, None] * maskf[:, None, :], axis=0)  # (D, K): d's samples with j
    annotated = counts > 0
    per_landmark = jnp.where(annotated, sums / jnp.maximum(counts, 1.0), 0.0)
    weighted = per_landmark * jnp.asarray(weights, dtype)[None, :]
    n_landmarks = jnp.sum(annotated, axis=1).astype(dtype)
    per_dataset = jnp.sum(weighted, axis=1) / jnp.maximum(n_landmarks, 1.0)
    return jnp.sum(per_dataset), per_dataset
