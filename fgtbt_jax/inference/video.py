"""Video in and out for landmark tracking: OpenCV capture, JSON lines, annotated MP4, progress.

:func:`run_video` reads frames (a file OpenCV's ``VideoCapture`` opens, or a camera index),
passes each to a :class:`~fgtbt_jax.inference.tracking.Tracker` and writes

* ``<stem>.jsonl``: one line per frame, ``{"frame": i, "time": t, "faces": [...], **extra}``,
  each face ``{"track_id", "box": [x0, y0, x1, y1], "score", "detected", "center",
  "scale", "landmarks_124": [[x, y] × 124], "landmarks": [[x, y] × K], "scheme"}`` (pixels of
  the frame; ``box`` is the smoothed 68-point landmark box, ``score`` the mean heatmap peak,
  ``center``/``scale`` the crop the network saw, ``detected`` whether the face detector found
  the face in this frame);
* ``<stem>.mp4``: the frames with boxes, landmarks and track ids drawn (OpenCV ``VideoWriter``,
  fourcc ``mp4v``, the input's frame rate; no external binaries).

Time stamps: frame index / the file's frame rate for files (30 if the file has none),
seconds since the first frame for cameras.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

import numpy as np

from fgtbt_jax import landmarks
from fgtbt_jax.inference import tracking

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv", ".flv", ".gif"}
)
FOURCC = "mp4v"  # writable by the opencv-python(-headless) wheels' bundled FFmpeg
DEFAULT_FPS = 30.0


def is_video(path: str | pathlib.Path) -> bool:
    return pathlib.Path(path).suffix.lower() in VIDEO_SUFFIXES


class VideoSource:
    """Frames of a video file or camera as ``(index, time s, uint8 (H, W, 3) RGB)``.

    ``source``: a path, or an ``int`` camera index. Raises ValueError naming the source when
    OpenCV cannot open it. ``fps`` is the container's frame rate (``DEFAULT_FPS`` if unknown),
    ``num_frames`` its frame count (None for cameras or when unknown).
    """

    def __init__(self, source: str | pathlib.Path | int) -> None:
        import cv2

        self.live = isinstance(source, int)
        self.name = f"camera {source}" if self.live else str(source)
        self._cap = cv2.VideoCapture(source if self.live else str(source))
        if not self._cap.isOpened():
            raise ValueError(f"OpenCV cannot open {self.name} as a video")
        fps = float(self._cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self.fps = fps if 0 < fps < 1000 else DEFAULT_FPS
        count = int(self._cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self.num_frames = count if count > 0 and not self.live else None

    def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
        index, start = 0, time.monotonic()
        try:
            while True:
                ok, bgr = self._cap.read()
                if not ok:
                    return
                t = time.monotonic() - start if self.live else index / self.fps
                if bgr.ndim == 2:
                    bgr = np.repeat(bgr[..., None], 3, axis=-1)
                yield index, t, np.ascontiguousarray(bgr[..., 2::-1])
                index += 1
        finally:
            self._cap.release()


class VideoSink:
    """Writes BGR uint8 (H, W, 3) frames to an MP4 (fourcc ``FOURCC``)."""

    def __init__(self, path: str | pathlib.Path, fps: float, size_wh: tuple[int, int]) -> None:
        import cv2

        self.path = pathlib.Path(path)
        self._writer = cv2.VideoWriter(
            str(self.path), cv2.VideoWriter_fourcc(*FOURCC), float(fps), tuple(size_wh)
        )
        if not self._writer.isOpened():
            raise ValueError(
                f"OpenCV cannot write {self.path} with fourcc {FOURCC!r} (this OpenCV build "
                "has no MPEG-4 encoder?)"
            )
        self.frames = 0

    def write(self, bgr: np.ndarray) -> None:
        self._writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        self._writer.release()


class Progress:
    """One status line: frames done (of total), frames/s, ETA; rewritten at most every
    ``interval`` s (``\\r`` on a terminal, one line per update otherwise)."""

    def __init__(
        self, total: int | None, stream: TextIO = sys.stderr, interval: float = 1.0
    ) -> None:
        self.total, self.stream, self.interval = total, stream, interval
        self.start = self._last = time.monotonic()
        self.done = 0

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        if self.total:
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            return f"{self.done}/{self.total} frames, {rate:.2f} frames/s, ETA {eta:.0f} s"
        return f"{self.done} frames, {rate:.2f} frames/s"

    def update(self, done: int, final: bool = False) -> None:
        self.done = done
        now = time.monotonic()
        if final or now - self._last >= self.interval:
            self._last = now
            tty = self.stream.isatty()
            end = ("\n" if final else "") if tty else "\n"
            self.stream.write(("\r" if tty else "") + self.line() + end)
            self.stream.flush()


def draw(
    rgb: np.ndarray,
    boxes: Sequence[Sequence[float]],
    points: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
) -> np.ndarray:
    """BGR copy of ``rgb`` (uint8 (H, W, 3)) with each face's box ``[x0, y0, x1, y1]``, its
    (K, 2) ``points`` (non-finite ones skipped) and its label (if given) drawn."""
    import cv2

    canvas = np.ascontiguousarray(rgb[..., ::-1])
    unit = max(1, round(max(rgb.shape[:2]) / 400))
    color = (0, 200, 255)
    for i, (box, pts) in enumerate(zip(boxes, points, strict=True)):
        x0, y0, x1, y1 = (round(v) for v in box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, unit)
        if labels is not None:
            cv2.putText(
                canvas, labels[i], (x0, max(y0 - 4 * unit, 10 * unit)),
                cv2.FONT_HERSHEY_SIMPLEX, 0.5 * unit, color, unit, cv2.LINE_AA,
            )  # fmt: skip
        for x, y in pts:
            if np.isfinite(x) and np.isfinite(y):
                cv2.circle(canvas, (round(x), round(y)), unit + 1, (0, 255, 0), -1, cv2.LINE_AA)
    return canvas


def draw_faces(rgb: np.ndarray, faces: Sequence[tracking.TrackedFace], scheme_index) -> np.ndarray:
    """BGR copy of ``rgb`` with each face's box, ``scheme_index`` points and track id drawn."""
    return draw(
        rgb,
        [f.box for f in faces],
        [f.points[scheme_index] for f in faces],
        [f"#{f.track_id}" for f in faces],
    )


def face_record(face: tracking.TrackedFace, scheme_index: np.ndarray, scheme: str) -> dict:
    """The JSON object of one tracked face (see the module docstring)."""
    return {
        "track_id": int(face.track_id),
        "box": [round(float(v), 3) for v in face.box],
        "score": round(float(face.confidence), 5),
        "detected": face.detection is not None,
        "center": [round(float(v), 3) for v in face.crop[0]],
        "scale": round(float(face.crop[1]), 5),
        "landmarks_124": face.points[: landmarks.NUM_UNIFIED].round(3).tolist(),
        "landmarks": face.points[scheme_index].round(3).tolist(),
        "scheme": scheme,
    }


def run_video(
    source: VideoSource,
    tracker: tracking.Tracker,
    out_dir: str | pathlib.Path,
    stem: str,
    *,
    scheme: str,
    scheme_index: np.ndarray,
    extra: dict[str, Any] | None = None,
    max_frames: int | None = None,
    progress: Progress | None = None,
    write_video: bool = True,
) -> dict[str, Any]:
    """Track faces through ``source``; writes ``out_dir/<stem>.jsonl`` and ``<stem>.mp4``.

    ``extra`` is merged into every JSON line. Returns a summary: ``frames``, ``seconds``
    (wall time of the loop), ``detector_calls``, ``restarts``, ``tracks`` (ids started), the
    output paths.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl_path, video_path = out_dir / f"{stem}.jsonl", out_dir / f"{stem}.mp4"
    sink: VideoSink | None = None
    frames, ids = 0, set()
    start = time.perf_counter()
    with jsonl_path.open("w") as out:
        try:
            for index, t, rgb in source:
                if max_frames is not None and index >= max_frames:
                    break
                faces = tracker.update(rgb, t)
                ids.update(f.track_id for f in faces)
                record = {"frame": index, "time": round(t, 6)}
                record["faces"] = [face_record(f, scheme_index, scheme) for f in faces]
                out.write(json.dumps(record | (extra or {})) + "\n")
                if write_video:
                    if sink is None:
                        sink = VideoSink(video_path, source.fps, (rgb.shape[1], rgb.shape[0]))
                    sink.write(draw_faces(rgb, faces, scheme_index))
                frames += 1
                if progress is not None:
                    progress.update(frames)
        finally:
            if sink is not None:
                sink.close()
    if progress is not None:
        progress.update(frames, final=True)
    return {
        "frames": frames,
        "seconds": time.perf_counter() - start,
        "detector_calls": tracker.detector_calls,
        "restarts": tracker.restarts,
        "tracks": sorted(ids),
        "jsonl": str(jsonl_path),
        "video": str(video_path) if sink is not None else None,
    }


def track_sources(
    sources: Sequence[pathlib.Path | int],
    make_tracker: Callable[[], tracking.Tracker],
    out_dir: pathlib.Path,
    *,
    scheme: str,
    scheme_index: np.ndarray,
    extra: dict[str, Any] | None = None,
    max_frames: int | None = None,
) -> int:
    """Tracks faces through each video file or camera index (a fresh ``make_tracker()`` each)
    with :func:`run_video`, into ``out_dir/<stem>.*`` (``camera<N>`` for cameras; a repeated
    stem gets ``_`` appended). Returns the number of sources that could not be opened; stops
    at Ctrl-C, keeping what was written. Progress goes to stdout / stderr."""
    failures, used_stems = 0, set()
    for n, src in enumerate(sources, 1):
        try:
            source = VideoSource(src)
        except ValueError as e:
            print(f"[video {n}/{len(sources)}] {e}, skipped", flush=True)
            failures += 1
            continue
        stem = f"camera{src}" if isinstance(src, int) else pathlib.Path(src).stem
        while stem in used_stems:
            stem += "_"
        used_stems.add(stem)
        print(f"[video {n}/{len(sources)}] {source.name} ({source.fps:g} frames/s)", flush=True)
        try:
            summary = run_video(
                source, make_tracker(), out_dir, stem, scheme=scheme, scheme_index=scheme_index,
                extra=extra, max_frames=max_frames, progress=Progress(source.num_frames),
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
