r"""Facial landmarks for images: face boxes → crop → FGTBT heatmaps → landmarks in the image.

  python scripts/detect.py --checkpoint fgtbt_b4.pth --out /tmp/lm photo.jpg folder/
  python scripts/detect.py --checkpoint tests/fixtures/reference/tiny_checkpoint.pth \
      --config configs/fgtbt.py:reference_tiny --scheme 300W --out /tmp/lm img.png
  python scripts/detect.py --checkpoint my19_run/ --config configs/fgtbt.py:release \
      --config.data.schemes='("my19.json",)' \
      --config.data.datasets='("COFW","WFLW","300W","AFLW","MY19")' --scheme MY19 ...

For every image ``OUT/<stem>.json``::

  {"image": path, "width": W, "height": H,
   "faces": [{"box": [x0, y0, x1, y1], "score": s, "center": [cx, cy], "scale": scale,
              "landmarks_124": [[x, y] × 124], "landmarks": [[x, y] × K], "scheme": name}]}

(pixels of the original image, ``x`` to the right, ``y`` down; ``landmarks`` are the
``--scheme`` dataset's points in its own order, or the 124 unified points for ``unified``;
``landmarks_124`` the 124 built-in channels) and
``OUT/<stem>.png`` with boxes and landmarks drawn. Faces come from ``--boxes`` (JSON
``{"name.jpg": [[x0, y0, x1, y1], ...]}``, keys by file name or stem; ``[]`` = no face) or, for
images not listed there, from the Haar-cascade detector (``fgtbt_jax.inference.detector``).
Images without a face get a JSON with ``"faces": []`` and a note; unreadable images are
reported and skipped.
Each face runs as its own batch of one (the network's CSAM statistics span the batch), with the
test-time flip unless ``--noflip``. ``--scheme`` is a built-in dataset, ``unified``, or a
scheme dataset of the config (``--config.data.schemes`` files, the name in
``--config.data.datasets``): its points are read from the model's wider heatmaps
(docs/schemes.md). ``--backend onnx --checkpoint model.onnx`` runs a model from
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

import functools
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from fgtbt_jax import errors, landmarks, paths
from fgtbt_jax.inference import detector, images, networks, smoothing, tracking, video

ROOT = pathlib.Path(__file__).resolve().parents[1]
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
_SCHEME = flags.DEFINE_string(
    "scheme",
    "unified",
    f"Landmark scheme of 'landmarks': {', '.join(SCHEMES)} or a scheme dataset of the config.",
)
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


def main(argv: list[str]) -> int:
    # Images, videos, --boxes and --out stay on local disk; the checkpoint may not.
    for arg in argv[1:]:
        paths.local(arg, "input", "images and videos are read from local disk")
    paths.local(_OUT.value, "--out", "annotated images are written to local disk")
    if _BOXES.value:
        paths.local(_BOXES.value, "--boxes", "read from local disk")
    paths.check(_CHECKPOINT.value, "--checkpoint", hub=True)
    inputs = images.list_inputs(argv[1:])
    stills = [p for p in inputs if not video.is_video(p)]
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
    unified = None
    scheme_run = any(d not in landmarks.DATASET_ID for d in config.data.datasets)
    if _SCHEME.value not in SCHEMES or (scheme_run and _BACKEND.value == "jax"):
        from fgtbt_jax import schemes  # imports JAX

        unified = schemes.configure(config)  # the model's channels
    index = images.scheme_index(_SCHEME.value, unified)  # an unknown name stops here
    if _BACKEND.value == "onnx":
        network, size = networks.onnx_network(
            _CHECKPOINT.value, flip=_FLIP.value, refine=_REFINE.value
        )
    else:
        network, size = networks.jax_network(
            config,
            _CHECKPOINT.value,
            flip=_FLIP.value,
            refine=_REFINE.value,
            channel_flip=None if unified is None else unified.flip,
        )
    face_detector, detector_error = None, ""
    if sources or any(detector.boxes_for(boxes, p) is None for p in stills):
        try:
            face_detector = detector.FaceDetector(max_side=_DET_MAX_SIDE.value)
        except (FileNotFoundError, RuntimeError, ValueError) as e:
            detector_error = str(e)
    failures = 0
    if sources and face_detector is None:
        print(f"videos need the face detector: {detector_error}", file=sys.stderr)
        failures += len(sources)
    elif sources:
        batch_faces = _BATCH_FACES.value
        make_tracker = functools.partial(
            tracking.Tracker,
            tracking.CropLandmarker(network, size, batch_faces=batch_faces),
            face_detector,
            detect_every=_DETECT_EVERY.value,
            max_missed=_MAX_MISSED.value,
            max_faces=_MAX_FACES.value,
            min_confidence=_MIN_CONFIDENCE.value,
            smooth=_SMOOTH.value == "oneeuro",
            min_cutoff=_MIN_CUTOFF.value,
            beta=_BETA.value,
        )
        extra = {
            "batching": "per_frame" if batch_faces else "per_face",
            "csam_reduction": str(config.model.csam_reduction),
        }
        failures += video.track_sources(
            sources, make_tracker, out_dir, scheme=_SCHEME.value,
            scheme_index=index, extra=extra,
            max_frames=_MAX_FRAMES.value,
        )  # fmt: skip
    failures += images.detect_images(
        stills,
        tracking.CropLandmarker(network, size, batch_faces=False),  # images: a face per batch
        out_dir,
        boxes=boxes,
        face_detector=face_detector,
        detector_error=detector_error,
        max_faces=_MAX_FACES.value,
        scheme=_SCHEME.value,
        unified=unified,
    )
    total = len(stills) + len(sources)
    print(f"done: {total - failures}/{total} inputs written to {out_dir}")
    return 1 if failures == total else 0


if __name__ == "__main__":
    errors.run(main)
