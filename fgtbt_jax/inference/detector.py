"""Face boxes for inference: OpenCV Haar cascade detection, or boxes given in a JSON file.

The detector runs OpenCV's stock frontal-face Haar cascades with ``cv2.CascadeClassifier``
(OpenCV 4.x, whose wheels bundle the XML files in ``cv2.data.haarcascades``, so it works offline
right after ``pip install``; OpenCV 5 dropped the cascade classifier, hence the ``<5`` pin).
The XML is looked up in ``$FGTBT_HAAR_CASCADE``, the package's ``data/`` folder,
``cv2.data.haarcascades`` and the system OpenCV data folders.

Boxes are ``[x0, y0, x1, y1]`` in pixels of the full image. :func:`box_to_center_scale` turns a
box into the ``(center, scale)`` of the training crops (SPEC §4: scale = side of the landmark
bounding box / 200 × 1.25).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import numpy as np

from fgtbt_jax import errors

CASCADE_NAME = "haarcascade_frontalface_default.xml"
_SYSTEM_DIRS = (
    "/usr/share/opencv4/haarcascades",
    "/usr/share/opencv/haarcascades",
    "/usr/local/share/opencv4/haarcascades",
    "/usr/local/share/opencv/haarcascades",
    "/opt/homebrew/share/opencv4/haarcascades",
)

# Calibration of FaceDetector boxes to the training geometry, measured on the three annotated
# real photos in tests/fixtures/real_faces (68-point box side / detection box side: 0.81, 0.99,
# 0.83; landmark-box centre below the detection centre by 0.24, 0.11, 0.18 detection sides):
# the landmark box is about 0.88 times the detection side and centred 0.17 sides lower.
HAAR_BOX_TO_LANDMARK_BOX = 0.88
HAAR_CENTER_SHIFT_Y = 0.17
CROP_SCALE_FACTOR = 1.25  # every loader multiplies the landmark-box scale by this (SPEC §4)


@dataclasses.dataclass(frozen=True)
class Face:
    """A face box ``[x0, y0, x1, y1]`` (pixels) with a detector score (higher is surer)."""

    box: tuple[float, float, float, float]
    score: float = 1.0

    def to_json(self) -> dict:
        return {"box": [float(v) for v in self.box], "score": float(self.score)}


def find_cascade(name: str = CASCADE_NAME) -> pathlib.Path:
    """Path of the Haar cascade XML ``name``; raises FileNotFoundError listing where it looked."""
    candidates: list[pathlib.Path] = []
    env = os.environ.get("FGTBT_HAAR_CASCADE")
    if env:
        candidates.append(pathlib.Path(env))
    candidates.append(pathlib.Path(__file__).parent / "data" / name)
    try:
        import cv2

        data_dir = getattr(getattr(cv2, "data", None), "haarcascades", None)
        if data_dir:
            candidates.append(pathlib.Path(data_dir) / name)
    except ImportError:  # pragma: no cover
        pass
    candidates += [pathlib.Path(d) / name for d in _SYSTEM_DIRS]
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(
        f"OpenCV Haar cascade {name!r} not found; looked in: "
        + ", ".join(str(c) for c in candidates)
        + ". Install it (Debian/Ubuntu: `apt-get install opencv-data`; or an OpenCV 4.x wheel), "
        "set FGTBT_HAAR_CASCADE=/path/to/" + name + ", or pass face boxes with --boxes."
    )


def to_gray(image: np.ndarray) -> np.ndarray:
    """uint8 grayscale of an (H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA image."""
    import cv2

    img = np.asarray(image)
    if img.dtype != np.uint8:
        img = np.clip(img, 0, 255).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        return img
    if img.ndim == 3 and img.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2GRAY if img.shape[2] == 3 else cv2.COLOR_RGBA2GRAY
        return cv2.cvtColor(img, code)
    raise ValueError(f"unsupported image shape {img.shape}")


class FaceDetector:
    """Face detector returning :class:`Face` boxes in full-image pixels, best first.

    Runs each Haar cascade of ``cascades`` on the image turned by each angle of ``rotations``
    (degrees; tilted heads are missed by upright cascades), maps every detection back to the
    image as an upright square, clusters them (IoU > ``merge_iou``) and keeps clusters whose
    summed neighbour count (OpenCV's ``minNeighbors`` count, per pass) reaches ``min_score``.
    The score of a face is that sum; its box the score-weighted mean of the cluster.

    Large images are first reduced so their longer side is at most ``max_side`` pixels
    (histogram-equalised grayscale). ``min_face_frac``: smallest face side searched for, as a
    fraction of the reduced image's shorter side (at least 24 px).

    The defaults (frontal ``default`` + ``alt2`` cascades at 0°, ±20°, ``min_score`` 8, longest
    side 480) find the annotated face in all three photos of tests/fixtures/real_faces; the
    plain OpenCV recipe (one upright ``default`` pass) misses two of them.
    """

    def __init__(
        self,
        cascades: Sequence[str | os.PathLike] = (
            CASCADE_NAME,
            "haarcascade_frontalface_alt2.xml",
        ),
        *,
        rotations: Sequence[float] = (0.0, -20.0, 20.0),
        max_side: int = 480,
        scale_factor: float = 1.1,
        min_neighbors: int = 3,
        min_score: float = 8.0,
        min_face_frac: float = 0.08,
        merge_iou: float = 0.3,
    ) -> None:
        import cv2

        paths = []
        for c in cascades:
            p = pathlib.Path(c)
            paths.append(p if p.is_file() else find_cascade(p.name))
        self.cascade_paths = paths
        if not hasattr(cv2, "CascadeClassifier"):
            raise RuntimeError(
                f"OpenCV {cv2.__version__} has no CascadeClassifier (dropped in OpenCV 5): "
                "pip install 'opencv-python-headless<5', or pass face boxes with --boxes"
            )
        self._cascades = []
        for p in paths:
            c = cv2.CascadeClassifier(str(p))
            if c.empty():
                raise ValueError(f"OpenCV could not load the cascade {p}")
            self._cascades.append(c)
        self.rotations = tuple(float(r) for r in rotations)
        self.max_side = max_side
        self.scale_factor = scale_factor
        self.min_neighbors = min_neighbors
        self.min_score = min_score
        self.min_face_frac = min_face_frac
        self.merge_iou = merge_iou

    def _run(self, cascade, gray: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
        boxes, counts = cascade.detectMultiScale2(
            gray,
            scaleFactor=self.scale_factor,
            minNeighbors=self.min_neighbors,
            minSize=(min_size, min_size),
        )
        return np.asarray(boxes, np.float64).reshape(-1, 4), np.asarray(counts).reshape(-1)

    def __call__(self, image: np.ndarray) -> list[Face]:
        """``image``: (H, W) grayscale or (H, W, 3) RGB, uint8 (other dtypes are clipped)."""
        import cv2

        gray = to_gray(image)
        h, w = gray.shape
        f = min(1.0, self.max_side / max(h, w))
        if f < 1.0:
            gray = cv2.resize(gray, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
        gray = cv2.equalizeHist(gray)
        gh, gw = gray.shape
        min_size = max(24, int(self.min_face_frac * min(gh, gw)))
        dets: list[tuple[np.ndarray, float]] = []
        for rot in self.rotations:
            if rot:
                m = cv2.getRotationMatrix2D((gw / 2, gh / 2), rot, 1.0)
                c, s = abs(m[0, 0]), abs(m[0, 1])
                cw, ch = int(gh * s + gw * c) + 1, int(gh * c + gw * s) + 1
                m[:, 2] += (cw / 2 - gw / 2, ch / 2 - gh / 2)
                turned = cv2.warpAffine(gray, m, (cw, ch), flags=cv2.INTER_LINEAR)
                back = cv2.invertAffineTransform(m)
            else:
                turned, back = gray, np.array([[1.0, 0, 0], [0, 1.0, 0]])
            for cascade in self._cascades:
                for (bx, by, bw, bh), n in zip(*self._run(cascade, turned, min_size), strict=True):
                    cx, cy = back @ (bx + bw / 2, by + bh / 2, 1.0)
                    box = np.array([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]) / f
                    dets.append((box, float(n)))
        dets.sort(key=lambda d: -d[1])
        clusters: list[list[tuple[np.ndarray, float]]] = []
        for box, n in dets:
            for cl in clusters:
                if iou(cl[0][0], box) > self.merge_iou:
                    cl.append((box, n))
                    break
            else:
                clusters.append([(box, n)])
        faces = []
        for cl in clusters:
            score = sum(n for _, n in cl)
            if score >= self.min_score:
                wts = np.array([max(n, 1e-6) for _, n in cl])
                box = (np.stack([b for b, _ in cl]) * wts[:, None]).sum(0) / wts.sum()
                faces.append(Face(tuple(float(v) for v in box), float(score)))
        return sorted(faces, key=lambda fc: -fc.score)


# --------------------------------------------------------------------------------------------
# Boxes ↔ crop geometry
# --------------------------------------------------------------------------------------------


def box_to_center_scale(
    box: Sequence[float],
    *,
    box_to_landmark_box: float = HAAR_BOX_TO_LANDMARK_BOX,
    center_shift_y: float = HAAR_CENTER_SHIFT_Y,
    crop_factor: float = CROP_SCALE_FACTOR,
) -> tuple[np.ndarray, float]:
    """Face box ``[x0, y0, x1, y1]`` → crop ``(center (2,), scale)`` like the training crops.

    side = max(box width, height); centre = box centre + (0, ``center_shift_y``·side);
    scale = ``box_to_landmark_box``·side / 200 · ``crop_factor``. The defaults calibrate a Haar
    box to the landmark bounding box (training: landmark box / 200 × 1.25). For a box that
    already is a tight landmark box pass ``box_to_landmark_box=1, center_shift_y=0``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must be [x0, y0, x1, y1] with x1 > x0 and y1 > y0, got {box}")
    side = max(x1 - x0, y1 - y0)
    center = np.array([(x0 + x1) / 2, (y0 + y1) / 2 + center_shift_y * side])
    return center, box_to_landmark_box * side / 200.0 * crop_factor


def landmark_box(points_xy: np.ndarray) -> tuple[float, float, float, float]:
    """Tight ``[x0, y0, x1, y1]`` of (K, 2) points (NaN rows ignored)."""
    p = np.asarray(points_xy, np.float64)
    p = p[np.isfinite(p).all(-1)]
    return (float(p[:, 0].min()), float(p[:, 1].min()), float(p[:, 0].max()), float(p[:, 1].max()))


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x0, y0, x1, y1]`` boxes."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def load_boxes_json(path: str | os.PathLike) -> dict[str, list[Face]]:
    """Boxes per image from JSON: ``{"img.jpg": [[x0, y0, x1, y1], ...]}`` or
    ``{"img.jpg": [{"box": [...], "score": s}, ...]}``; keys match a file name or stem."""
    path = pathlib.Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise errors.InputFileError(f"cannot read boxes from {path}: {e}") from e
    if not isinstance(data, dict):
        raise errors.InputFileError(f"{path}: expected an object mapping image names to box lists")
    out: dict[str, list[Face]] = {}
    for key, items in data.items():
        if not isinstance(items, list):
            raise errors.InputFileError(f"{path}: {key!r} must map to a list of boxes")
        faces = []
        for i, it in enumerate(items):
            box, score = (
                (it.get("box"), it.get("score", 1.0)) if isinstance(it, dict) else (it, 1.0)
            )
            if not (isinstance(box, list | tuple) and len(box) == 4):
                raise errors.InputFileError(
                    f"{path}: {key!r} box {i} must be [x0, y0, x1, y1], got {box!r}"
                )
            x0, y0, x1, y1 = (float(v) for v in box)
            if not (x1 > x0 and y1 > y0):
                raise errors.InputFileError(f"{path}: {key!r} box {i} is empty: {box!r}")
            faces.append(Face((x0, y0, x1, y1), float(score)))
        out[key] = faces
    return out


def boxes_for(boxes: dict[str, list[Face]], image_path: str | os.PathLike) -> list[Face] | None:
    """The boxes given for ``image_path`` (by full path, file name or stem), or None."""
    p = pathlib.Path(image_path)
    for key in (str(image_path), p.name, p.stem):
        if key in boxes:
            return boxes[key]
    return None
