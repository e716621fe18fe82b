r"""Facial landmarks for images: face boxes → crop → FGTBT heatmaps → landmarks in the image.

  python scripts/detect.py --checkpoint fgtbt_b4.pth --out /tmp/lm photo.jpg folder/
  python scripts/detect.py --checkpoint tests/fixtures/reference/tiny_checkpoint.pth \
      --config configs/fgtbt.py:reference_tiny --scheme 300W --out /tmp/lm img.png

For every image ``OUT/<stem>.json``::

  {"image": path, "width": W, "height": H,
   "faces": [{"box": [x0, y0, x1, y1], "score": s, "center": [cx, cy], "scale": scale,
              "landmarks_124": [[x, y] × 124], "landmarks": [[x, y] × K], "scheme": name}]}

(pixels of the original image, ``x`` to the right, ``y`` down; ``landmarks`` are the
``--scheme`` dataset's points in its own order, or the 124 unified points for ``unified``) and
``OUT/<stem>.png`` with boxes and landmarks drawn. Faces come from ``--boxes`` (JSON
``{"name.jpg": [[x0, y0, x1, y1], ...]}``, keys by file name or stem; ``[]`` = no face) or, for
images not listed there, from the Haar-cascade detector (``fgtbt_jax.inference.detector``).
Images without a face get a JSON with ``"faces": []`` and a note; unreadable images are
reported and skipped.
Each face runs as its own batch of one (the network's CSAM statistics span the batch), with the
test-time flip unless ``--noflip``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

from absl import app, flags
from ml_collections import config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from fgtbt_jax import landmarks, transforms  # noqa: E402
from fgtbt_jax.evaluation import decoding
from fgtbt_jax.inference import detector  # noqa: E402
from fgtbt_jax.models.fgtbt import IMAGENET_MEAN, IMAGENET_STD, enable_x64_if_requested  # noqa: E402

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp"}
SCHEMES = (*landmarks.DATASETS, "unified")

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(ROOT / "configs" / "fgtbt.py") + ":release",
    "Config, e.g. configs/fgtbt.py:release",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Release-layout .pth, state dict or orbax directory.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output directory.", required=True)
_SCHEME = flags.DEFINE_enum("scheme", "unified", SCHEMES, "Landmark scheme of 'landmarks'.")
_BOXES = flags.DEFINE_string("boxes", None, "JSON file with face boxes per image.")
_REFINE = flags.DEFINE_enum(
    "refine", "dark", decoding.REFINEMENTS, "Sub-pixel refinement of the heatmap maxima."
)
_FLIP = flags.DEFINE_bool("flip", True, "Test-time horizontal flip (average with the mirror).")
_MAX_FACES = flags.DEFINE_integer("max_faces", 10, "At most this many faces per image.")
_DET_MAX_SIDE = flags.DEFINE_integer(
    "detector_max_side", 480, "Longest image side the face detector works at."
)


def list_images(inputs: list[str]) -> list[pathlib.Path]:
    out: list[pathlib.Path] = []
    for arg in inputs:
        p = pathlib.Path(arg)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)
    return out


def read_rgb(path: pathlib.Path) -> np.ndarray | None:
    """uint8 (H, W, 3) RGB (grayscale is replicated), or None when unreadable."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if img is None else np.ascontiguousarray(img[..., ::-1])


def draw(rgb: np.ndarray, faces: list[dict]) -> np.ndarray:
    canvas = np.ascontiguousarray(rgb[..., ::-1])  # BGR for OpenCV
    unit = max(1, round(max(rgb.shape[:2]) / 400))
    for face in faces:
        x0, y0, x1, y1 = (round(v) for v in face["box"])
        cv2.rectangle(canvas, (x0, y0), (x1, y1), (0, 200, 255), unit)
        for x, y in face["landmarks"]:
            cv2.circle(canvas, (round(x), round(y)), unit + 1, (0, 255, 0), -1, cv2.LINE_AA)
    return canvas


def main(argv: list[str]) -> int:
    images = list_images(argv[1:])
    if not images:
        print("no input images (give files or folders after the flags)", file=sys.stderr)
        return 2
    config = _CONFIG.value
    enable_x64_if_requested(config.model)
    out_dir = pathlib.Path(_OUT.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = detector.load_boxes_json(_BOXES.value) if _BOXES.value else {}

    import fgtbt_jax

    model, variables = fgtbt_jax.load_pretrained(_CHECKPOINT.value, config)
    step = decoding.make_predict_fn(model, flip_test=_FLIP.value, refine=_REFINE.value)
    size = int(config.img_size)
    mean = np.asarray(IMAGENET_MEAN, np.float32)
    std = np.asarray(IMAGENET_STD, np.float32)
    scheme = _SCHEME.value
    scheme_index = (
        np.arange(landmarks.NUM_UNIFIED) if scheme == "unified" else landmarks.unified_index(scheme)
    )
    face_detector = None
    detector_error = None
    used_stems: set[str] = set()
    failures = 0
    for n, path in enumerate(images, 1):
        t0 = time.time()
        prefix = f"[{n}/{len(images)}] {path}"
        rgb = read_rgb(path)
        if rgb is None:
            print(f"{prefix}: cannot read image, skipped", flush=True)
            failures += 1
            continue
        given = detector.boxes_for(boxes, path)
        if given is None:
            if face_detector is None and detector_error is None:
                try:
                    face_detector = detector.FaceDetector(max_side=_DET_MAX_SIDE.value)
                except (FileNotFoundError, RuntimeError, ValueError) as e:
                    detector_error = str(e)
            if face_detector is None:
                print(f"{prefix}: no boxes given and no face detector: {detector_error}")
                failures += 1
                continue
            found = face_detector(rgb)
        else:
            found = given
        found = found[: _MAX_FACES.value]
        faces = []
        for face in found:
            if given is None:
                center, scale = detector.box_to_center_scale(face.box)
            else:  # given boxes are taken as tight face boxes
                center, scale = detector.box_to_center_scale(
                    face.box, box_to_landmark_box=1.0, center_shift_y=0.0
                )
            crop = transforms.crop_image(rgb, center, scale, size).astype(np.float32)
            batch = {"image": ((crop / 255.0 - mean) / std)[None]}
            out = step(variables, batch)
            hm_size = int(out["heatmaps"].shape[1])
            pts = transforms.inverse_transform_points(
                np.asarray(out["points"])[0], center, scale, hm_size
            )
            faces.append(
                {
                    "box": [float(v) for v in face.box],
                    "score": float(face.score),
                    "center": [float(v) for v in center],
                    "scale": float(scale),
                    "landmarks_124": pts.round(3).tolist(),
                    "landmarks": pts[scheme_index].round(3).tolist(),
                    "scheme": scheme,
                }
            )
        stem = path.stem if path.stem not in used_stems else f"{path.stem}_{path.suffix[1:]}"
        used_stems.add(stem)
        record = {"image": str(path), "width": rgb.shape[1], "height": rgb.shape[0]}
        record["faces"] = faces
        if not faces:
            record["note"] = "no face found" if given is None else "no face box given"
        (out_dir / f"{stem}.json").write_text(json.dumps(record) + "\n")
        cv2.imwrite(str(out_dir / f"{stem}.png"), draw(rgb, faces))
        msg = f"{len(faces)} face(s)" if faces else record["note"]
        print(f"{prefix}: {msg} ({time.time() - t0:.1f} s)", flush=True)
    print(f"done: {len(images) - failures}/{len(images)} images written to {out_dir}")
    return 1 if failures == len(images) else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
