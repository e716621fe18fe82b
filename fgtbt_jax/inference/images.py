"""Landmarks of the faces in still images: boxes → :class:`~fgtbt_jax.inference.tracking.
CropLandmarker` → JSON record and annotated PNG per image.

:func:`detect_images` writes, for every readable image, ``OUT/<stem>.json``::

  {"image": path, "width": W, "height": H,
   "faces": [{"box": [x0, y0, x1, y1], "score": s, "center": [cx, cy], "scale": scale,
              "landmarks_124": [[x, y] × 124], "landmarks": [[x, y] × K], "scheme": name}]}

(pixels of the original image; ``landmarks`` are ``scheme``'s points in its own order) and
``OUT/<stem>.png`` with the boxes and landmarks drawn. Faces come from the given boxes (taken as
tight landmark boxes) or, for images without any, from the face detector (its boxes calibrated
to the training crop, :func:`fgtbt_jax.inference.detector.box_to_center_scale`).
"""

from __future__ import annotations

import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from fgtbt_jax import errors, landmarks
from fgtbt_jax.inference import detector, tracking, video

if TYPE_CHECKING:  # fgtbt_jax.schemes imports JAX; --backend onnx runs without it
    from fgtbt_jax import schemes

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
)
FaceDetector = Callable[[np.ndarray], Sequence[detector.Face]]


def scheme_index(scheme: str, unified: schemes.UnifiedSet | None = None) -> np.ndarray:
    """Unified channels of ``scheme``'s points: a built-in dataset's name, ``"unified"`` (the
    124 built-in channels), or a scheme dataset of ``unified`` (the run's set, wider heatmaps).
    """
    if scheme == "unified":
        return np.arange(landmarks.NUM_UNIFIED)
    if scheme in landmarks.DATASET_ID:
        return landmarks.unified_index(scheme)
    if unified is None or scheme not in unified.datasets:
        raise errors.ConfigError(
            f"--scheme {scheme}: not a built-in dataset and not a scheme dataset of the config "
            "(its file in --config.data.schemes, its name in --config.data.datasets)"
        )
    return unified.index_maps[unified.datasets.index(scheme)]


def list_inputs(args: Sequence[str]) -> list[pathlib.Path]:
    """The files named in ``args``; a folder stands for its images and videos (recursively)."""
    out: list[pathlib.Path] = []
    for arg in args:
        p = pathlib.Path(arg)
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES or video.is_video(f)
            )
        else:
            out.append(p)
    return out


def read_rgb(path: pathlib.Path) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB (grayscale is replicated), or None when unreadable."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if img is None else np.ascontiguousarray(img[..., ::-1])


def face_records(
    rgb: np.ndarray,
    faces: Sequence[detector.Face],
    landmarker: tracking.CropLandmarker,
    *,
    tight_boxes: bool,
    scheme: str,
    unified: schemes.UnifiedSet | None = None,
) -> list[dict]:
    """The JSON records of ``faces`` in ``rgb`` (see the module docstring). ``tight_boxes``:
    the boxes are landmark boxes (given), else detector boxes (calibrated to the crop)."""
    if tight_boxes:
        crops = [
            detector.box_to_center_scale(f.box, box_to_landmark_box=1.0, center_shift_y=0.0)
            for f in faces
        ]
    else:
        crops = [detector.box_to_center_scale(f.box) for f in faces]
    index = scheme_index(scheme, unified)
    return [
        {
            "box": [float(v) for v in face.box],
            "score": float(face.score),
            "center": [float(v) for v in center],
            "scale": float(scale),
            "landmarks_124": pred.points[: landmarks.NUM_UNIFIED].round(3).tolist(),
            "landmarks": pred.points[index].round(3).tolist(),
            "scheme": scheme,
        }
        for face, (center, scale), pred in zip(faces, crops, landmarker(rgb, crops), strict=True)
    ]


def detect_images(
    paths: Sequence[pathlib.Path],
    landmarker: tracking.CropLandmarker,
    out_dir: pathlib.Path,
    *,
    boxes: dict[str, list[detector.Face]],
    face_detector: FaceDetector | None,
    detector_error: str = "",
    max_faces: int = 10,
    scheme: str = "unified",
    unified: schemes.UnifiedSet | None = None,
) -> int:
    """Writes ``<stem>.json`` / ``<stem>.png`` per image into ``out_dir``; returns the number
    of images that failed (unreadable, or no boxes given and ``face_detector`` is None, whose
    reason is ``detector_error``). Progress goes to stdout, one line per image."""
    failures, used_stems = 0, set()
    for n, path in enumerate(paths, 1):
        t0 = time.time()
        prefix = f"[{n}/{len(paths)}] {path}"
        rgb = read_rgb(path)
        if rgb is None:
            print(f"{prefix}: cannot read image, skipped", flush=True)
            failures += 1
            continue
        given = detector.boxes_for(boxes, path)
        if given is None and face_detector is None:
            print(f"{prefix}: no boxes given and no face detector: {detector_error}")
            failures += 1
            continue
        found = list(given if given is not None else face_detector(rgb))[:max_faces]
        faces = face_records(
            rgb, found, landmarker, tight_boxes=given is not None, scheme=scheme, unified=unified
        )
        stem = path.stem if path.stem not in used_stems else f"{path.stem}_{path.suffix[1:]}"
        used_stems.add(stem)
        record = {"image": str(path), "width": rgb.shape[1], "height": rgb.shape[0]}
        record["faces"] = faces
        if not faces:
            record["note"] = "no face found" if given is None else "no face box given"
        (out_dir / f"{stem}.json").write_text(json.dumps(record) + "\n")
        drawn = video.draw(
            rgb, [f["box"] for f in faces], [np.asarray(f["landmarks"]) for f in faces]
        )
        _write_png(out_dir / f"{stem}.png", drawn)
        msg = f"{len(faces)} face(s)" if faces else record["note"]
        print(f"{prefix}: {msg} ({time.time() - t0:.1f} s)", flush=True)
    return failures


def _write_png(path: pathlib.Path, bgr: np.ndarray) -> None:
    import cv2

    cv2.imwrite(str(path), bgr)
