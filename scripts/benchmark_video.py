r"""Video frames/s: face detector on every frame vs landmark tracking, tiny and release networks.

  python scripts/benchmark_video.py --json benchmarks/video_cpu.json

The clip is the one of tests/inference/test_video.py: a 720×540 window over the annotated face
of ``breakingbad.jpg`` panned 2 px right and 1 px down per frame, ``--frames`` frames, written
to an ``mp4v`` file and read back with OpenCV. For each ``--presets`` network (random
parameters: the speed does not depend on their values) and each ``--detect_every`` K the full
video path runs: read frame → :class:`~fgtbt_jax.inference.tracking.Tracker` (Haar face
detector on every K-th frame, landmark network on every face, One Euro smoothing) → JSON line
and annotated frame written. ``K = 1`` is the detector on every frame.

Random parameters know no face, so their landmarks would send the crops anywhere: the network
runs for real on every crop, and the points it returns are then replaced by the clip's known
landmarks wherever the crop holds the face (as a trained network would find them), and
elsewhere marked as no face (confidence 0; the detector's false positives start no track). The
timing is therefore that of a trained network on this clip; the detector call counts are in
the JSON. Each network is compiled and warmed up on one crop before its timed runs; all runs
are in one process, one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import tempfile
import time

import numpy as np

from fgtbt_jax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]

WIDTH, HEIGHT, FPS = 720, 540, 25.0
PAN = (2, 1)
ID_BLOCK = 16  # frame index i is written as gray level 8·i into the top-left block


def read_pts(path: pathlib.Path) -> np.ndarray:
    text = path.read_text()
    return np.asarray(text[text.index("{") + 1 : text.index("}")].split(), float).reshape(-1, 2)


def write_clip(path: pathlib.Path, frames: int, faces_dir: pathlib.Path) -> np.ndarray:
    """Writes the pan clip; returns its (frames, 68, 2) landmarks in frame pixels."""
    import cv2

    if frames * 8 > 255:
        raise ValueError("at most 31 frames (the frame index is coded in 8 gray levels each)")
    image = cv2.imread(str(faces_dir / "breakingbad.jpg"))
    pts = read_pts(faces_dir / "breakingbad.pts") - 1.0
    x0, y0 = np.round(pts.mean(0) - [WIDTH / 2, HEIGHT / 2 + 30]).astype(int)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (WIDTH, HEIGHT))
    truth = []
    for i in range(frames):
        dx, dy = PAN[0] * i, PAN[1] * i
        frame = image[y0 + dy : y0 + dy + HEIGHT, x0 + dx : x0 + dx + WIDTH].copy()
        frame[:ID_BLOCK, :ID_BLOCK] = 8 * i
        writer.write(frame)
        truth.append(pts - [x0 + dx, y0 + dy])
    writer.release()
    return np.stack(truth)


class KnownGeometry:
    """Runs the real landmark network on every crop, then returns the clip's known landmarks
    where the crop holds the face (else the network's points with confidence 0)."""

    def __init__(self, landmarker, truth: np.ndarray) -> None:
        from fgtbt_jax import landmarks
        from fgtbt_jax.inference import detector

        self.landmarker, self.truth = landmarker, truth
        self.index = landmarks.unified_index("300W")
        self.box = detector.landmark_box
        self.network_calls = 0
        self.network_seconds = 0.0

    def __call__(self, rgb, crops):
        from fgtbt_jax.inference import tracking

        t0 = time.perf_counter()
        preds = self.landmarker(rgb, crops)
        self.network_seconds += time.perf_counter() - t0
        self.network_calls += len(crops)
        pts68 = self.truth[round(float(rgb[2 : ID_BLOCK - 2, 2 : ID_BLOCK - 2].mean()) / 8)]
        x0, y0, x1, y1 = self.box(pts68)
        centre, side = np.array([(x0 + x1) / 2, (y0 + y1) / 2]), max(x1 - x0, y1 - y0)
        out = []
        for (c, s), p in zip(crops, preds, strict=True):
            if np.abs(centre - c).max() < 0.2 * 200 * s and 0.5 < side / (200 * s) < 1.3:
                points = np.repeat(pts68.mean(0, keepdims=True), len(p.points), 0)
                points[self.index] = pts68
                p = tracking.FacePrediction(points, 0.9)
            else:  # a trained network finds no face in a crop without one
                p = tracking.FacePrediction(p.points, 0.0)
            out.append(p)
        return out


class TimedDetector:
    def __init__(self, detector) -> None:
        self.detector, self.calls, self.seconds = detector, 0, 0.0

    def __call__(self, rgb):
        t0 = time.perf_counter()
        faces = self.detector(rgb)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return faces


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "release"])
    parser.add_argument("--detect_every", nargs="+", type=int, default=[1, 10])
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--flip", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--refine", default="dark")
    parser.add_argument("--json", type=pathlib.Path)
    parser.add_argument(
        "--faces_dir", type=pathlib.Path, default=ROOT / "tests/fixtures/real_faces"
    )
    args = parser.parse_args()

    import jax

    from configs import fgtbt
    from fgtbt_jax import landmarks
    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.inference import detector, tracking, video
    from fgtbt_jax.models.fgtbt import build_model, init_variables

    results = []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        clip = tmp / "pan.mp4"
        truth = write_clip(clip, args.frames, args.faces_dir)
        face_detector = detector.FaceDetector()
        for preset in args.presets:
            config = fgtbt.get_config(preset)
            model = build_model(config.model)
            variables = jax.jit(lambda k, m=model, c=config: init_variables(m, k, c.img_size))(
                jax.random.key(0)
            )
            step = decoding.make_predict_fn(model, flip_test=args.flip, refine=args.refine)

            def network(images, step=step, variables=variables):
                out = step(variables, {"image": images})
                heatmaps = np.asarray(out["heatmaps"])
                return np.asarray(out["points"]), heatmaps.max(axis=(1, 2)), heatmaps.shape[1]

            landmarker = tracking.CropLandmarker(network, config.img_size, batch_faces=False)
            t0 = time.perf_counter()
            first = next(iter(video.VideoSource(clip)))[2]
            landmarker(first, [(np.array([WIDTH / 2, HEIGHT / 2]), 2.0)])
            compile_s = time.perf_counter() - t0
            for k in args.detect_every:
                predictor = KnownGeometry(landmarker, truth)
                timed = TimedDetector(face_detector)
                tracker = tracking.Tracker(predictor, timed, detect_every=k)
                summary = video.run_video(
                    video.VideoSource(clip), tracker, tmp, f"{preset}_k{k}", scheme="300W",
                    scheme_index=landmarks.unified_index("300W"),
                )  # fmt: skip
                faces = [
                    len(json.loads(line)["faces"])
                    for line in pathlib.Path(summary["jsonl"]).read_text().splitlines()
                ]
                row = {
                    "preset": preset,
                    "img_size": int(config.img_size),
                    "detect_every": k,
                    "frames": summary["frames"],
                    "frames_per_sec": summary["frames"] / summary["seconds"],
                    "seconds": summary["seconds"],
                    "detector_calls": timed.calls,
                    "detector_seconds": timed.seconds,
                    "network_faces": predictor.network_calls,
                    "network_seconds": predictor.network_seconds,
                    "frames_with_one_face": sum(n == 1 for n in faces),
                    "compile_and_warmup_s": compile_s,
                    "flip": args.flip,
                    "refine": args.refine,
                }
                results.append(row)
                print(json.dumps(row), flush=True)
    record = {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "device": str(jax.devices()[0]),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "clip": {"width": WIDTH, "height": HEIGHT, "frames": args.frames, "pan_px": PAN},
        "results": results,
    }
    print("| network | detector | frames/s | detector calls | detector s | network s | total s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        how = "every frame" if r["detect_every"] == 1 else f"tracking, K = {r['detect_every']}"
        print(
            f"| {r['preset']} ({r['img_size']}²) | {how} | {r['frames_per_sec']:.2f} | "
            f"{r['detector_calls']} | {r['detector_seconds']:.1f} | {r['network_seconds']:.1f} | "
            f"{r['seconds']:.1f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(errors.exit_on_error(main))
