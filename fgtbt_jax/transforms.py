"""Crop geometry shared by the data pipeline, evaluation and inference (SPEC §4, §5).

Conventions (all arrays are ``(..., 2)`` ``(x, y)``; float64 internally):

* ``center_xy`` and ``scale`` describe the face box: it has side ``h = 200 * scale`` pixels and is
  centred on ``center_xy`` (the loaders have already multiplied ``scale`` by 1.25).
* ``get_transform(center, scale, S, rot)`` is the reference's 3×3 matrix
  ``T = [[s, 0, S(-cx/h + 1/2)], [0, s, S(-cy/h + 1/2)], [0, 0, 1]]``, ``s = S / h``, composed
  with a rotation by ``-rot`` degrees about ``(S/2, S/2)`` (``rot > 0`` turns the face
  counter-clockwise on screen).
* Landmarks go to **heatmap index space** (the integer index of a heatmap pixel is where its
  target Gaussian peaks) as ``q = T·p + 1`` with ``S = heatmap size``; WFLW keeps the float,
  the other datasets truncate toward zero first (``trunc(T·p) + 1``). The loss targets are
  ``trunc(q)`` (what :func:`heatmap_target_points` returns). A decoded heatmap index ``q``
  goes back to the image as ``T⁻¹·(q − 1)``.
* Images are cropped with :func:`crop_affine`, an OpenCV-convention affine (pixel centres at
  integer indices, ``dst(i) = src(M⁻¹ i)``): a source pixel at array index ``u`` lands at crop
  index ``i = T_S·u + 1/2`` where ``T_S`` is ``get_transform`` at the crop size ``S``. This is
  what the reference's crop (integer corner ``trunc(T⁻¹(−1)) + 1``, copy, centre-aligned
  resize) does on average over the corner truncation, so a ported checkpoint sees the image
  where it was trained to see it.

  Relation between the input crop (``S_in``) and the heatmaps (``S_hm = S_in / 2``): since
  ``T_{S_in} = 2·T_{S_hm}`` (rotation included), a point ``p`` whose heatmap index is
  ``q = T_{S_hm}·p + 1`` sits at crop index ``i = 2q − 3/2``, i.e. heatmap index ``j`` and crop
  index ``i = 2j − 1.5`` show the same image content (for annotations given in array-index
  coordinates of the image; any constant annotation offset is learnt by the network alike in
  training and test). With rotation the image turns about ``(S/2, S/2)`` in ``T`` coordinates
  exactly like the landmarks (the reference rotated the image about a point 1 input pixel away;
  ≤ 0.5 px at 30°, irrelevant at test time where ``rot = 0``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from fgtbt_jax import landmarks

if TYPE_CHECKING:
    from fgtbt_jax.schemes import Scheme

# The network's input normalization (RGB in [0, 1]), as the reference's torchvision transform.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ArrayLike = np.ndarray | list | tuple


def imagenet_normalize(
    rgb: Any, *, scale: float = 255.0, dtype: Any = np.float32, xp: Any = np
) -> Any:
    """ImageNet normalization ``(rgb / scale - mean) / std`` of (…, 3) RGB values in
    ``[0, scale]`` (uint8 levels by default; ``scale=1.0`` for values already in [0, 1]).

    Computed in ``dtype`` (float32; float64 for a look-up table rounded once at the end) with
    :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD` as float32 constants (converted to ``dtype``),
    in that order of operations, so every caller gets the same bits. ``xp``: ``numpy`` or
    ``jax.numpy`` (arrays of that module in and out).
    """
    mean = xp.asarray(np.asarray(IMAGENET_MEAN, np.float32), dtype)
    std = xp.asarray(np.asarray(IMAGENET_STD, np.float32), dtype)
    return (xp.asarray(rgb, dtype) / scale - mean) / std


def _center(center_xy: _ArrayLike) -> tuple[float, float]:
    c = np.asarray(center_xy, np.float64).reshape(-1)
    if c.shape != (2,):
        raise ValueError(f"center_xy must hold 2 values (x, y), got shape {np.shape(center_xy)}")
    return float(c[0]), float(c[1])


def _points(points_xy: _ArrayLike) -> np.ndarray:
    p = np.asarray(points_xy, np.float64)
    if p.ndim == 0 or p.shape[-1] != 2:
        raise ValueError(f"points must have shape (..., 2), got {p.shape}")
    return p


def get_transform(
    center_xy: _ArrayLike,
    scale: float,
    output_size: int,
    rot_deg: float = 0.0,
    *,
    dtype: type = np.float64,
) -> np.ndarray:
    """(3, 3) float64 matrix ``T`` of SPEC §4 (image coordinates → ``output_size`` crop).

    ``dtype`` is the arithmetic the scale/translation entries are computed in (the result is
    float64 either way). ``np.float32`` reproduces the reference's evaluation bit for bit: it
    held centre and scale as float32 tensors there, so those entries were float32 products.
    """
    cx, cy = _center(center_xy)
    if not float(scale) > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    one = np.dtype(dtype).type
    h = one(200.0) * one(scale)
    size = one(output_size)
    if one is np.float32:
        # PyTorch evaluates `number / tensor` as `tensor.reciprocal() * number`.
        inv_h = one(1.0) / h
        s = float(inv_h * size)
        tx = float(size * (inv_h * -one(cx) + one(0.5)))
        ty = float(size * (inv_h * -one(cy) + one(0.5)))
    else:
        s = float(size / h)
        tx = float(size * (-one(cx) / h + one(0.5)))
        ty = float(size * (-one(cy) / h + one(0.5)))
    t = np.array([[s, 0.0, tx], [0.0, s, ty], [0.0, 0.0, 1.0]])
    size = float(output_size)
    if rot_deg != 0:
        a = -float(rot_deg) * np.pi / 180.0  # this operation order reproduces the reference bits
        sn, cs = np.sin(a), np.cos(a)
        rot = np.array([[cs, -sn, 0.0], [sn, cs, 0.0], [0.0, 0.0, 1.0]])
        to_origin = np.array([[1.0, 0.0, -size / 2], [0.0, 1.0, -size / 2], [0.0, 0.0, 1.0]])
        back = np.array([[1.0, 0.0, size / 2], [0.0, 1.0, size / 2], [0.0, 0.0, 1.0]])
        t = back @ (rot @ (to_origin @ t))
    return t


def _apply(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    return p @ t[:2, :2].T + t[:2, 2]


def transform_points(
    points_xy: _ArrayLike,
    center_xy: _ArrayLike,
    scale: float,
    output_size: int,
    rot_deg: float = 0.0,
    *,
    integer: bool,
) -> np.ndarray:
    """Image points (..., 2) → heatmap index space: ``T·p + 1`` or ``trunc(T·p) + 1``.

    ``integer=False`` is WFLW's float variant, ``integer=True`` the other datasets'. The result
    is float64 in both cases; the integer heatmap centres are :func:`heatmap_target_points`.
    """
    q = _apply(get_transform(center_xy, scale, output_size, rot_deg), _points(points_xy))
    if integer:
        q = np.trunc(q)
    return q + 1.0


def heatmap_target_points(
    points_xy: _ArrayLike,
    center_xy: _ArrayLike,
    scale: float,
    output_size: int,
    rot_deg: float = 0.0,
    *,
    integer: bool,
) -> np.ndarray:
    """Integer (int32) heatmap centres of the loss targets: ``trunc(transform_points(...))``.

    Truncation is toward zero (the reference's ``.int()``), also for negative coordinates.
    """
    q = transform_points(points_xy, center_xy, scale, output_size, rot_deg, integer=integer)
    return np.trunc(q).astype(np.int32)


def uses_integer_transform(dataset: str | Scheme) -> bool:
    """Whether ``dataset`` truncates ``T·p`` before adding 1 (all but WFLW; a scheme dataset
    (:class:`fgtbt_jax.schemes.Scheme`) does, as 300W, COFW and AFLW)."""
    if not isinstance(dataset, str):
        return True
    if dataset not in landmarks.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {landmarks.DATASETS}")
    return dataset != "WFLW"


def inverse_transform_points(
    points_xy: _ArrayLike,
    center_xy: _ArrayLike,
    scale: float,
    output_size: int,
    rot_deg: float = 0.0,
    *,
    dtype: type = np.float64,
) -> np.ndarray:
    """Heatmap index space (..., 2) → image: ``T⁻¹·(q − 1)`` (float64, no rounding).

    ``dtype``: see :func:`get_transform` (``np.float32`` = the reference's evaluation).
    """
    t_inv = np.linalg.inv(get_transform(center_xy, scale, output_size, rot_deg, dtype=dtype))
    return _apply(t_inv, _points(points_xy) - 1.0)


def fliplr_points(points_xy: _ArrayLike, width: float, dataset: str | Scheme) -> np.ndarray:
    """Training-time horizontal flip: ``x → width − x``, then swap ``dataset``'s symmetric pairs.

    ``dataset``: a built-in name or a :class:`fgtbt_jax.schemes.Scheme` (its ``flip_pairs``).
    ``points_xy``: (K, 2) in the dataset's own point order; returns a new (K, 2) float64 array.
    The image itself is mirrored with ``image[:, ::-1]`` and the crop centre x with
    ``width − cx``.
    """
    p = _points(points_xy).copy()
    if isinstance(dataset, str):
        name, perm = dataset, landmarks.flip_permutation(dataset)
    else:
        name, perm = dataset.name, dataset.flip_permutation()
    k = len(perm)
    if p.shape != (k, 2):
        raise ValueError(f"{name} has {k} points: expected shape ({k}, 2), got {p.shape}")
    p[:, 0] = float(width) - p[:, 0]
    return p[perm]


def crop_affine(
    center_xy: _ArrayLike, scale: float, output_size: int, rot_deg: float = 0.0
) -> np.ndarray:
    """(2, 3) float64 affine for ``cv2.warpAffine(image, M, (S, S))``: image → S×S crop.

    ``M = T_S[:2] + [0, 0, 1/2]``: a pixel at array index ``u`` lands at crop index
    ``T_S·u + 1/2`` (see the module docstring for how this relates to heatmap coordinates).
    """
    m = get_transform(center_xy, scale, output_size, rot_deg)[:2].copy()
    m[:, 2] += 0.5
    return m


def crop_image(
    image: np.ndarray,
    center_xy: _ArrayLike,
    scale: float,
    output_size: int,
    rot_deg: float = 0.0,
    *,
    border_value: float = 0.0,
) -> np.ndarray:
    """Bilinear S×S crop of ``image`` (H, W[, C]) with :func:`crop_affine`, zero outside.

    When the crop shrinks the face by more than 2× the image is first reduced with area
    averaging (``cv2.INTER_AREA``) so the bilinear warp does not alias; the geometry stays
    that of :func:`crop_affine`. Returns the image's dtype (float images stay float).
    """
    import cv2

    m = crop_affine(center_xy, scale, output_size, rot_deg)
    shrink = 200.0 * float(scale) / float(output_size)
    if shrink > 2.0:
        f = int(np.floor(shrink / 1.5))
        h, w = image.shape[:2]
        nw, nh = max(1, round(w / f)), max(1, round(h / f))
        image = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
        # source index u maps to reduced index u' = (u + 1/2)·(n'/n) − 1/2; compose M with it.
        fx, fy = nw / w, nh / h
        down = np.array([[fx, 0.0, 0.5 * fx - 0.5], [0.0, fy, 0.5 * fy - 0.5], [0.0, 0.0, 1.0]])
        m = (np.vstack([m, [0.0, 0.0, 1.0]]) @ np.linalg.inv(down))[:2]
    return cv2.warpAffine(
        image,
        m,
        (int(output_size), int(output_size)),
        flags=cv2.INTER_LINEAR,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=(border_value,) * 4,
    )
