"""Landmark tracking for video: crops follow the previous frame's landmarks.

Per frame, :class:`Tracker`:

1. predicts every live track's landmarks in the crop that its previous landmarks define, the
   way training crops were defined (SPEC §4: centre of the 68-point landmark box, scale = its
   longer side / 200 × 1.25; :func:`crop_from_landmarks`);
2. calls it *lost* when the prediction is implausible: mean heatmap peak below
   ``min_confidence``, or a 68-point landmark box whose side is outside ``spread_range`` times the
   crop box side (training crops hold the box at 0.8 × 1/U(0.75, 1.25) ∈ [0.64, 1.07]);
3. runs the face detector every ``detect_every`` frames, and on any frame where a track is lost
   or there is none;
4. matches detections to tracks greedily by IoU (the detection's box turned into the landmark
   box it implies, :func:`fgtbt_jax.inference.detector.box_to_center_scale`, against the track's
   landmark box) ≥ ``iou_threshold``: a matched lost track restarts from the detection's crop
   (its smoother is reset), an unmatched detection starts a new track (up to ``max_faces``);
   either only when the landmarks predicted in the detection's crop are plausible (a detection
   the landmark network does not confirm is taken for a false positive);
5. reports the faces with plausible landmarks; a track ends after more than ``max_missed``
   consecutive frames without; of two tracks on one face (IoU > ``duplicate_iou``) the younger
   ends.

The landmark predictor is a plain callable ``(frame, crops) → [FacePrediction]`` (the network
behind :class:`CropLandmarker`, or a test double), the detector a callable
``frame → [Face]`` (:class:`fgtbt_jax.inference.detector.FaceDetector`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from fgtbt_jax import landmarks, transforms
from fgtbt_jax.inference import detector as detector_lib
from fgtbt_jax.inference import smoothing

Crop = tuple[np.ndarray, float]  # (centre (2,) x, y in pixels, scale = crop box side / 200)
TRACK_SCHEME = "300W"  # the points whose box defines the crop (the detector is calibrated to it)
_TRACK_INDEX = landmarks.unified_index(TRACK_SCHEME)


@dataclasses.dataclass(frozen=True)
class FacePrediction:
    """One face's landmarks: ``points`` (124, 2) float64 image pixels (x right, y down) and
    ``confidence``, the mean over the 124 heatmaps of their maximum."""

    points: np.ndarray
    confidence: float


Predictor = Callable[[np.ndarray, Sequence[Crop]], list[FacePrediction]]
Network = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, int]]


class CropLandmarker:
    """Landmarks of faces in a frame: crop → network → heatmap points → image pixels.

    ``network`` maps a float32 (B, S, S, 3) NHWC ImageNet-normalised batch of crops
    (``S = img_size``) to ``(points, peaks, heatmap_size)``: points (B, 124, 2) in heatmap
    index space, peaks (B, 124) the maxima of the (flip-averaged, with the test-time flip)
    heatmaps of side ``heatmap_size``; any backend that keeps this contract plugs in (JAX, or
    an ONNX export with ``--decode``, whose ``scores`` are those maxima).

    ``batch_faces=False`` runs each face as its own batch of one, which is how the reference
    evaluates (its CSAM statistics span the batch, so a face's result depends on its batch
    mates); ``True`` sends all faces of a frame as one batch, which is only
    batch-independent with ``model.csam_reduction = "sample"``.
    """

    def __init__(self, network: Network, img_size: int, *, batch_faces: bool) -> None:
        self.network = network
        self.img_size = int(img_size)
        self.batch_faces = bool(batch_faces)

    def _crop(self, rgb: np.ndarray, crop: Crop) -> np.ndarray:
        return transforms.imagenet_normalize(
            transforms.crop_image(rgb, crop[0], crop[1], self.img_size)
        )

    def __call__(self, rgb: np.ndarray, crops: Sequence[Crop]) -> list[FacePrediction]:
        """``rgb``: uint8 (H, W, 3) frame; one prediction per crop, in order."""
        if not crops:
            return []
        images = np.stack([self._crop(rgb, c) for c in crops])
        groups = [images] if self.batch_faces else [images[i : i + 1] for i in range(len(crops))]
        points, peaks = [], []
        for g in groups:
            p, peak, hm_size = self.network(g)
            points.append(np.asarray(p, np.float64))
            peaks.append(np.asarray(peak, np.float32).mean(-1))
        return [
            FacePrediction(transforms.inverse_transform_points(p, center, scale, hm_size), float(c))
            for (center, scale), p, c in zip(
                crops, np.concatenate(points), np.concatenate(peaks), strict=True
            )
        ]


def crop_from_landmarks(points: np.ndarray) -> Crop:
    """The training crop of a face with these (124, 2) unified points (its 68-point box)."""
    box = detector_lib.landmark_box(np.asarray(points)[_TRACK_INDEX])
    return detector_lib.box_to_center_scale(box, box_to_landmark_box=1.0, center_shift_y=0.0)


def _expected_landmark_box(crop: Crop) -> tuple[float, float, float, float]:
    """The landmark box a training crop was cut around (side = 200·scale / 1.25)."""
    (cx, cy), scale = crop
    half = 100.0 * scale / detector_lib.CROP_SCALE_FACTOR
    return (cx - half, cy - half, cx + half, cy + half)


@dataclasses.dataclass
class Track:
    """A face followed over frames; ``crop`` is where the next frame is looked at."""

    track_id: int
    crop: Crop
    box: tuple[float, float, float, float]  # last plausible 68-point landmark box
    smoother: smoothing.OneEuroFilter | None
    unit: float = 1.0  # face size (pixels) the smoother's coordinates are divided by
    misses: int = 0
    restarts: int = 0


@dataclasses.dataclass(frozen=True)
class TrackedFace:
    """A face of one frame.

    ``points`` (124, 2) smoothed image pixels, ``raw_points`` before smoothing; ``box`` the
    smoothed 68-point landmark box ``[x0, y0, x1, y1]``; ``confidence`` the mean heatmap peak;
    ``crop`` the (centre, scale) the network saw; ``detection`` the matching detector box of
    this frame, if the detector ran and found it.
    """

    track_id: int
    points: np.ndarray
    raw_points: np.ndarray
    box: tuple[float, float, float, float]
    confidence: float
    crop: Crop
    detection: detector_lib.Face | None


class Tracker:
    """Tracks faces over the frames given to :meth:`update` (see the module docstring)."""

    def __init__(
        self,
        predictor: Predictor,
        face_detector: Callable[[np.ndarray], Sequence[detector_lib.Face]],
        *,
        detect_every: int = 10,
        max_missed: int = 5,
        max_faces: int = 10,
        iou_threshold: float = 0.3,
        duplicate_iou: float = 0.5,
        min_confidence: float = 0.2,
        spread_range: tuple[float, float] = (0.5, 1.3),
        smooth: bool = True,
        min_cutoff: float = smoothing.MIN_CUTOFF,
        beta: float = smoothing.BETA,
        box_to_crop: Callable[[Sequence[float]], Crop] = detector_lib.box_to_center_scale,
    ) -> None:
        if detect_every < 1:
            raise ValueError(f"detect_every must be >= 1, got {detect_every}")
        self.predictor = predictor
        self.face_detector = face_detector
        self.detect_every = int(detect_every)
        self.max_missed = int(max_missed)
        self.max_faces = int(max_faces)
        self.iou_threshold = float(iou_threshold)
        self.duplicate_iou = float(duplicate_iou)
        self.min_confidence = float(min_confidence)
        self.spread_range = spread_range
        self.smooth = smooth
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.box_to_crop = box_to_crop
        self.tracks: list[Track] = []
        self.frame_index = -1
        self.detector_calls = 0
        self.restarts = 0
        self._next_id = 0
        self._last_detection = None

    def plausible(self, prediction: FacePrediction, crop: Crop) -> bool:
        """Whether a prediction looks like a face in its crop (confidence and spread)."""
        if not np.isfinite(prediction.points).all():
            return False
        x0, y0, x1, y1 = detector_lib.landmark_box(prediction.points[_TRACK_INDEX])
        ratio = max(x1 - x0, y1 - y0) / (200.0 * crop[1])
        lo, hi = self.spread_range
        return prediction.confidence >= self.min_confidence and lo <= ratio <= hi

    def _new_smoother(self) -> smoothing.OneEuroFilter | None:
        return smoothing.OneEuroFilter(self.min_cutoff, self.beta) if self.smooth else None

    def _emit(
        self,
        track: Track,
        pred: FacePrediction,
        crop: Crop,
        t: float,
        detection: detector_lib.Face | None,
    ) -> TrackedFace:
        """The face of a plausible prediction; the track's next crop follows its raw points."""
        track.crop = crop_from_landmarks(pred.points)
        track.box = detector_lib.landmark_box(pred.points[_TRACK_INDEX])
        points = pred.points
        if track.smoother is not None:
            points = track.smoother(points / track.unit, t) * track.unit
        return TrackedFace(
            track.track_id,
            points,
            pred.points,
            detector_lib.landmark_box(points[_TRACK_INDEX]),
            pred.confidence,
            crop,
            detection,
        )

    def _new_track(self, crop: Crop) -> Track:
        box = _expected_landmark_box(crop)
        track = Track(self._next_id, crop, box, self._new_smoother(), 200.0 * float(crop[1]))
        self._next_id += 1
        return track

    def _restart(self, track: Track, crop: Crop) -> None:
        track.smoother, track.unit = self._new_smoother(), 200.0 * float(crop[1])
        track.restarts += 1
        self.restarts += 1

    def update(self, rgb: np.ndarray, t: float) -> list[TrackedFace]:
        """Faces in the next frame ``rgb`` (uint8 (H, W, 3)) at time ``t`` seconds, by track id."""
        self.frame_index += 1
        tracks = self.tracks
        preds = self.predictor(rgb, [tr.crop for tr in tracks])
        ok = [self.plausible(p, tr.crop) for p, tr in zip(preds, tracks, strict=True)]
        boxes = [
            detector_lib.landmark_box(p.points[_TRACK_INDEX]) if good else tr.box
            for p, tr, good in zip(preds, tracks, ok, strict=True)
        ]
        due = (
            self._last_detection is None
            or self.frame_index - self._last_detection >= self.detect_every
        )
        detections: list[detector_lib.Face] = []
        if due or not tracks or not all(ok):
            detections = list(self.face_detector(rgb))
            self.detector_calls += 1
            self._last_detection = self.frame_index
        det_crops = [self.box_to_crop(d.box) for d in detections]
        det_boxes = [_expected_landmark_box(c) for c in det_crops]
        pairs = sorted(
            (
                (detector_lib.iou(tb, db), i, j)
                for i, tb in enumerate(boxes)
                for j, db in enumerate(det_boxes)
            ),
            reverse=True,
        )
        match: dict[int, int] = {}
        used: set[int] = set()
        for overlap, i, j in pairs:
            if overlap < self.iou_threshold:
                break
            if i not in match and j not in used:
                match[i] = j
                used.add(j)
        # Lost tracks that a detection found again, and new faces: one more predictor call.
        redo = [i for i in range(len(tracks)) if not ok[i] and i in match]
        fresh = [j for j in range(len(detections)) if j not in used]
        fresh = fresh[: max(0, self.max_faces - len(tracks))]
        crops = [det_crops[match[i]] for i in redo] + [det_crops[j] for j in fresh]
        second = dict(zip(redo + [-1 - j for j in fresh], self.predictor(rgb, crops), strict=True))
        faces: list[TrackedFace] = []
        kept: list[Track] = []
        for i, (tr, pred, good) in enumerate(zip(tracks, preds, ok, strict=True)):
            detection = detections[match[i]] if i in match else None
            crop = tr.crop
            if not good and i in match:  # lost, found again by the detector: restart there
                crop = det_crops[match[i]]
                pred, good = second[i], self.plausible(second[i], crop)
                tr.crop, tr.box = crop, _expected_landmark_box(crop)
                if good:
                    self._restart(tr, crop)
            if not good:
                tr.misses += 1
                if tr.misses <= self.max_missed:
                    kept.append(tr)
                continue
            tr.misses = 0
            faces.append(self._emit(tr, pred, crop, t, detection))
            kept.append(tr)
        for j in fresh:  # a detection the landmarks do not confirm starts no track
            crop, pred = det_crops[j], second[-1 - j]
            if self.plausible(pred, crop):
                tr = self._new_track(crop)
                faces.append(self._emit(tr, pred, crop, t, detections[j]))
                kept.append(tr)
        self.tracks, faces = self._drop_duplicates(kept, faces)
        return sorted(faces, key=lambda f: f.track_id)

    def _drop_duplicates(
        self, tracks: list[Track], faces: list[TrackedFace]
    ) -> tuple[list[Track], list[TrackedFace]]:
        """Of two tracks whose boxes overlap by more than ``duplicate_iou``, the younger ends."""
        ended: set[int] = set()
        by_age = sorted(tracks, key=lambda tr: tr.track_id)
        for a, ta in enumerate(by_age):
            for tb in by_age[a + 1 :]:
                if ta.track_id in ended or tb.track_id in ended:
                    continue
                if detector_lib.iou(ta.box, tb.box) > self.duplicate_iou:
                    ended.add(tb.track_id)
        return (
            [tr for tr in tracks if tr.track_id not in ended],
            [f for f in faces if f.track_id not in ended],
        )
