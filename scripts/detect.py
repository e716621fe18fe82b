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
test-time flip unless ``--noflip``. ``--backend onnx --checkpoint model.onnx`` runs a model from
``scripts/export.py --format onnx --decode`` with onnxruntime, without importing JAX (its crop
size, flip and refinement are the export's; ``--config`` is not used).

Videos (files OpenCV's ``VideoCapture`` reads, e.g. ``.mp4``, ``.avi``, ``.mov``; or a live
device with ``--camera N``) are tracked (``fgtbt_jax.inference.tracking``): the detector runs
every ``--detect_every`` frames and whenever a face is lost, otherwise each face is cropped
where its previous landmarks were; landmarks are smoothed with a One Euro filter
(``--smooth``, ``--min_cutoff``, ``--beta``). Per video ``OUT/<stem>.jsonl`` (one line per
frame: ``{"frame", "time", "faces": [{"track_id", "box", "score", "detected", "center",
"scale", "landmarks_124", "landmarks", "scheme"}], "batching", "csam_reduction"}``) and the
annotated ``OUT/<stem>.mp4``; ``--camera N`` writes ``camera<N>.*`` until the stream ends or
Ctrl-C. By default each face of a frame runs on its own, as above (``"batching":
"per_face"``); ``--batch_faces`` runs all faces of a frame as one batch with
``model.csam_reduction=sample``, so that no face's result depends on the others
(``"batching": "per_frame"``).
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

from fgtbt_jax import landmarks, paths, transforms  # noqa: E402
from fgtbt_jax.inference import detector, smoothing, tracking, video

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
    # decoding.REFINEMENTS, spelled out: importing decoding imports JAX (--backend onnx must not).
    "refine",
    "dark",
    ("none", "quarter", "dark"),
    "Sub-pixel refinement of the heatmap maxima.",
)
_FLIP = flags.DEFINE_bool("flip", True, "Test-time horizontal flip (average with the mirror).")
_BACKEND = flags.DEFINE_enum(
    "backend", "jax", ["jax", "onnx"], "jax: a checkpoint; onnx: an exported .onnx model."
)
_MAX_FACES = flags.DEFINE_integer("max_faces", 10, "At most this many faces per image.")
_DET_MAX_SIDE = flags.DEFINE_integer(
    "detector_max_side", 480, "Longest image side the face detector works at."
)
_CAMERA = flags.DEFINE_integer("camera", None, "Also track a live camera (OpenCV index N).")
_DETECT_EVERY = flags.DEFINE_integer(
    "detect_every", 10, "Video: run the face detector every K frames (and when a face is lost)."
)
_MAX_MISSED = flags.DEFINE_integer(
    "max_missed", 5, "Video: end a track after this many frames without plausible landmarks."
)
_MIN_CONFIDENCE = flags.DEFINE_float(
    "min_confidence", 0.2, "Video: a face is lost below this mean heatmap peak."
)
_SMOOTH = flags.DEFINE_enum("smooth", "oneeuro", ["oneeuro", "none"], "Video: smoothing.")
_MIN_CUTOFF = flags.DEFINE_float(
    "min_cutoff", smoothing.MIN_CUTOFF, "One Euro: cutoff (Hz) at rest; lower = less jitter."
)
_BETA = flags.DEFINE_float(
    "beta", smoothing.BETA, "One Euro: cutoff increase per face size/s of speed; higher = less lag."
)
_BATCH_FACES = flags.DEFINE_bool(
    "batch_faces",
    False,
    "Video: run the faces of a frame as one batch (sets model.csam_reduction=sample).",
)
_MAX_FRAMES = flags.DEFINE_integer("max_frames", None, "Video: stop after this many frames.")


def list_images(inputs: list[str]) -> list[pathlib.Path]:
    out: list[pathlib.Path] = []
    for arg in inputs:
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


def track_videos(
    sources: list[pathlib.Path | int],
    network: tracking.Network,
    img_size: int,
    config,
    out_dir: pathlib.Path,
    scheme: str,
    scheme_index: np.ndarray,
) -> int:
    """Tracks faces through each video file or camera index; returns the number that failed.

    ``network``: the :data:`tracking.Network` contract (normalised (B, S, S, 3) crops of side
    ``img_size`` → heatmap points, peaks and heatmap size).
    """
    batch_faces = _BATCH_FACES.value
    landmarker = tracking.CropLandmarker(network, img_size, batch_faces=batch_faces)
    extra = {
        "batching": "per_frame" if batch_faces else "per_face",
        "csam_reduction": str(config.model.csam_reduction),
    }
    try:
        face_detector = detector.FaceDetector(max_side=_DET_MAX_SIDE.value)
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"videos need the face detector: {e}", file=sys.stderr)
        return len(sources)
    failures, used_stems = 0, set()
    for n, src in enumerate(sources, 1):
        try:
            source = video.VideoSource(src)
        except ValueError as e:
            print(f"[video {n}/{len(sources)}] {e}, skipped", flush=True)
            failures += 1
            continue
        stem = f"camera{src}" if isinstance(src, int) else src.stem
        while stem in used_stems:
            stem += "_"
        used_stems.add(stem)
        print(f"[video {n}/{len(sources)}] {source.name} ({source.fps:g} frames/s)", flush=True)
        tracker = tracking.Tracker(
            landmarker,
            face_detector,
            detect_every=_DETECT_EVERY.value,
            max_missed=_MAX_MISSED.value,
            max_faces=_MAX_FACES.value,
            min_confidence=_MIN_CONFIDENCE.value,
            smooth=_SMOOTH.value == "oneeuro",
            min_cutoff=_MIN_CUTOFF.value,
            beta=_BETA.value,
        )
        try:
            summary = video.run_video(
                source, tracker, out_dir, stem, scheme=scheme, scheme_index=scheme_index,
                extra=extra, max_frames=_MAX_FRAMES.value,
                progress=video.Progress(source.num_frames),
            )  # fmt: skip
        except KeyboardInterrupt:
            print(f"interrupted; {out_dir / stem}.jsonl / .mp4 hold the frames so far")
            return failures
        print(
            f"  {summary['frames']} frames in {summary['seconds']:.1f} s "
            f"({summary['frames'] / max(summary['seconds'], 1e-9):.2f} frames/s), "
            f"detector on {summary['detector_calls']} frames, tracks {summary['tracks']}: "
            f"{summary['jsonl']}, {summary['video']}",
            flush=True,
        )
    return failures


def make_predictor(config) -> tuple[tracking.Network, int, tuple]:
    """``(network, crop size, (mean, std))``; ``network``: (B, S, S, 3) normalized float32 NHWC
    → (points (B, 124, 2) in heatmap index space, heatmap peaks (B, 124), heatmap size)."""
    if _BACKEND.value == "onnx":
        from fgtbt_jax.inference.onnx_backend import OnnxPredictor

        onnx_model = OnnxPredictor(_CHECKPOINT.value)
        wanted = {"decode": True, "with_flip": _FLIP.value, "refine": _REFINE.value}
        got = {k: getattr(onnx_model, k) for k in wanted}
        if got != wanted:
            raise ValueError(f"{_CHECKPOINT.value} was exported with {got}; flags ask {wanted}")
        meta = onnx_model.metadata
        mean, std = (
            np.asarray(meta[k].split(","), np.float32) for k in ("fgtbt.mean", "fgtbt.std")
        )
        return (
            lambda x: (*(onnx_model(x)[k] for k in ("points", "scores")), onnx_model.heatmap_size),
            onnx_model.img_size,
            (mean, std),
        )
    import fgtbt_jax
    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.models.fgtbt import enable_x64_if_requested

    enable_x64_if_requested(config.model)
    model, variables = fgtbt_jax.load_pretrained(_CHECKPOINT.value, config, "--checkpoint")
    step = decoding.make_predict_fn(model, flip_test=_FLIP.value, refine=_REFINE.value)

    def predict(images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        out = step(variables, {"image": images})
        heatmaps = np.asarray(out["heatmaps"])
        return np.asarray(out["points"]), heatmaps.max(axis=(1, 2)), heatmaps.shape[1]

    mean_std = (
        np.asarray(transforms.IMAGENET_MEAN, np.float32),
        np.asarray(transforms.IMAGENET_STD, np.float32),
    )
    return predict, int(config.img_size), mean_std


def main(argv: list[str]) -> int:
    try:  # images, videos, --boxes and --out stay on local disk; the checkpoint may not
        for arg in argv[1:]:
            paths.local(arg, "input", "images and videos are read from local disk")
        paths.local(_OUT.value, "--out", "annotated images are written to local disk")
        if _BOXES.value:
            paths.local(_BOXES.value, "--boxes", "read from local disk")
        paths.check(_CHECKPOINT.value, "--checkpoint", hub=True)
    except paths.PathError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = list_images(argv[1:])
    images = [p for p in inputs if not video.is_video(p)]
    sources: list[pathlib.Path | int] = [p for p in inputs if video.is_video(p)]
    if _CAMERA.value is not None:
        sources.append(_CAMERA.value)
    if not inputs and not sources:
        print("no input images (give files or folders after the flags)", file=sys.stderr)
        return 2
    config = _CONFIG.value
    if _BATCH_FACES.value:
        config.model.csam_reduction = "sample"
    out_dir = pathlib.Path(_OUT.value)
    out_dir.mkdir(parents=True, exist_ok=True)
    boxes = detector.load_boxes_json(_BOXES.value) if _BOXES.value else {}

    predict, size, (mean, std) = make_predictor(config)
    scheme = _SCHEME.value
    scheme_index = (
        np.arange(landmarks.NUM_UNIFIED) if scheme == "unified" else landmarks.unified_index(scheme)
    )
    failures = 0
    if sources:
        failures += track_videos(sources, predict, size, config, out_dir, scheme, scheme_index)
    face_detector = None
    detector_error = None
    used_stems: set[str] = set()
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
            points, _, hm_size = predict(((crop / 255.0 - mean) / std)[None])
            pts = transforms.inverse_transform_points(points[0], center, scale, hm_size)
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
    total = len(images) + len(sources)
    print(f"done: {total - failures}/{total} inputs written to {out_dir}")
    return 1 if failures == total else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))
