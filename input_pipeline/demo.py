"""The bundled demo dataset: synthetic faces (:mod:`input_pipeline.demo_faces`) written in the
four official file formats (SPEC §4), so the TFDS builders of :mod:`input_pipeline.builders` read
them exactly like the real datasets.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Callable

import numpy as np

from fgtbt_jax import landmarks, schemes
from input_pipeline import formats
from input_pipeline.demo_faces import Face, render_face

# ----------------------------------------------------------------------------------------------
# Writing the four official formats


@dataclasses.dataclass
class DemoSet:
    """What :func:`write_official` wrote: the folder and the faces of each TFDS split."""

    root: pathlib.Path
    dataset: str
    splits: dict[str, list[Face]] = dataclasses.field(default_factory=dict)


_300W_SPLITS = {
    "train.tsv": "train",
    "test_common.tsv": "test_common",
    "test_ibug.tsv": "test_challenging",
}


def _bbox(points: np.ndarray) -> tuple[np.ndarray, float, float, float]:
    lo, hi = points.min(axis=0), points.max(axis=0)
    wh = hi - lo
    return (lo + hi) / 2.0, float(wh.max()) / 200.0, float(wh[0]), float(wh[1])


def _encode(image: np.ndarray, ext: str, quality: int = 92) -> bytes:
    import cv2

    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, bgr, params)
    assert ok
    return buf.tobytes()


def _rec(face: Face, dataset: str, image_id: str, **kw) -> formats.FaceRecord:
    pts = face.points[landmarks.unified_index(dataset)]
    center, scale, _, _ = _bbox(pts)
    return formats.FaceRecord(
        image_id=image_id, landmarks=pts, center=center, scale=scale, source="demo", row=0, **kw
    )


@dataclasses.dataclass(frozen=True)
class _Job:
    """What one :func:`write_official` call renders: seeds, split sizes, picture size."""

    seed: int
    tag: int  # 10 × dataset id; split t renders from the streams (seed, tag + t, i)
    num_train: int
    num_test: int
    size: tuple[int, int] | None

    def faces(
        self,
        t: int,
        n: int,
        *,
        force_cycle: tuple[str, ...] = (),
        difficulty: Callable[[int], str] = lambda i: "normal",
        occluder_prob: float,
    ) -> list[Face]:
        """``n`` faces of split ``t`` (face ``i``: forced attribute ``force_cycle[i mod …]``,
        ``difficulty(i)``)."""
        out = []
        for i in range(n):
            rng = np.random.default_rng([self.seed, self.tag + t, i])
            force = force_cycle[i % len(force_cycle)] if force_cycle else None
            out.append(render_face(rng, difficulty=difficulty(i), occluder_prob=occluder_prob,
                                   force=force, size=self.size))  # fmt: skip
        return out


def _write_image(path: pathlib.Path, image: np.ndarray, ext: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_encode(image, ext))


def _write_cofw(out: DemoSet, job: _Job) -> None:
    """``COFW_{train,test}_color.mat``; about one picture in five grayscale."""
    for split, n, t in (("train", job.num_train, 0), ("test", job.num_test, 1)):
        faces = job.faces(t, n, occluder_prob=0.6)
        out.splits[split] = faces
        images, phis = [], []
        for i, face in enumerate(faces):
            img = face.image
            if np.random.default_rng([job.seed, job.tag + t, i, 7]).random() < 0.2:
                img = np.round(img.astype(np.float32) @ [0.299, 0.587, 0.114]).astype(np.uint8)
            pts = face.points[landmarks.unified_index("COFW")]
            occ = face.occluded[landmarks.unified_index("COFW")]
            images.append(img)
            phis.append(np.concatenate([pts[:, 0], pts[:, 1], occ.astype(np.float64)]))
        formats.write_cofw_mat(out.root / f"COFW_{split}_color.mat", split, images, np.stack(phis))


def _write_wflw(out: DemoSet, job: _Job) -> None:
    """Train / test CSVs, the six attribute subsets of the test set, ``WFLW_images/``."""
    img_dir = out.root / "WFLW_images"
    for split, n, t in (("train", job.num_train, 0), ("test", job.num_test, 1)):
        cycle = formats.WFLW_ATTRIBUTES if split == "test" else ()
        faces = job.faces(t, n, force_cycle=cycle, occluder_prob=0.25)
        out.splits[split] = faces
        recs = []
        for i, face in enumerate(faces):
            rel = f"{i % 3}--Synthetic/{split}_{i:05d}.jpg"
            _write_image(img_dir / rel, face.image, ".jpg")
            recs.append(_rec(face, "WFLW", rel, attributes=face.attributes))
        formats.write_wflw_csv(out.root / f"face_landmarks_wflw_{split}.csv", recs)
        if split == "test":
            for attr in formats.WFLW_ATTRIBUTES:
                sub = [r for r in recs if r.attributes[attr]]
                formats.write_wflw_csv(out.root / f"face_landmarks_wflw_test_{attr}.csv", sub)


def _write_300w(out: DemoSet, job: _Job) -> None:
    """``train.tsv``, ``test_common.tsv``, ``test_ibug.tsv`` (harder faces), pictures in
    ``lfpw/`` (PNG), ``helen/``, ``afw/``, ``ibug/`` with paths partly written with ``\\``."""
    splits = (
        ("train.tsv", job.num_train, 0, "normal", ("lfpw\\trainset", "helen/trainset", "afw")),
        ("test_common.tsv", job.num_test, 1, "normal", ("lfpw\\testset", "helen/testset")),
        ("test_ibug.tsv", max(4, job.num_test // 2), 2, "hard", ("ibug",)),
    )
    for fname, n, t, difficulty, folders in splits:
        faces = job.faces(t, n, difficulty=lambda i, d=difficulty: d, occluder_prob=0.2)
        out.splits[_300W_SPLITS[fname]] = faces
        recs, paths, fives = [], [], []
        for i, face in enumerate(faces):
            folder = folders[i % len(folders)]
            ext = ".png" if folder.startswith("lfpw") else ".jpg"
            sep = "\\" if "\\" in folder else "/"
            rel = f"{folder}{sep}image_{t}{i:04d}{ext}"
            _write_image(out.root / rel.replace("\\", "/"), face.image, ext)
            rec = _rec(face, "300W", rel.replace("\\", "/"))
            pts = rec.landmarks
            five = np.stack([pts[36:42].mean(0), pts[42:48].mean(0), pts[30], pts[48],
                             pts[54]])  # fmt: skip
            recs.append(rec)
            paths.append(rel)
            fives.append(five)
        formats.write_300w_tsv(out.root / fname, recs, paths=paths, five_points=fives)


def _aflw_difficulty(split: str) -> Callable[[int], str]:
    if split == "test":  # every other face frontal (the test_frontal subset), the others hard
        return lambda i: "frontal" if i % 2 == 0 else "hard"
    return lambda i: "normal" if i % 3 else "hard"


def _write_aflw(out: DemoSet, job: _Job) -> None:
    """Train / test / test_frontal CSVs (box size of all 124 points), ``images/``."""
    img_dir = out.root / "images"
    for split, n, t in (("train", job.num_train, 0), ("test", job.num_test, 1)):
        faces = job.faces(t, n, difficulty=_aflw_difficulty(split), occluder_prob=0.2)
        out.splits[split] = faces
        recs = []
        for i, face in enumerate(faces):
            rel = f"flickr/{i % 3}/image{t}{i:05d}.jpg"
            _write_image(img_dir / rel, face.image, ".jpg")
            _, _, bw, bh = _bbox(face.points)
            rec = _rec(face, "AFLW", rel, box_size=math.sqrt(bw * bh))
            center, scale, _, _ = _bbox(face.points)
            rec.center, rec.scale = center, scale
            rec.attributes = {"frontal": abs(face.params.yaw) < 15}
            recs.append(rec)
        formats.write_aflw_csv(out.root / f"face_landmarks_aflw_{split}.csv", recs)
        if split == "test":
            frontal = [r for r in recs if r.attributes["frontal"]]
            formats.write_aflw_csv(out.root / "face_landmarks_aflw_test_frontal.csv", frontal)
            out.splits["test_frontal"] = [f for f in faces if abs(f.params.yaw) < 15]


_WRITERS: dict[str, Callable[[DemoSet, _Job], None]] = {
    "COFW": _write_cofw,
    "WFLW": _write_wflw,
    "300W": _write_300w,
    "AFLW": _write_aflw,
}


def write_official(
    out_dir: os.PathLike | str,
    dataset: str,
    num_train: int,
    num_test: int | None = None,
    *,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> DemoSet:
    """Write ``num_train`` / ``num_test`` synthetic faces of ``dataset`` in its official format.

    Layout (what the builder of the dataset expects as its ``manual_dir``):
      COFW: ``COFW_train_color.mat``, ``COFW_test_color.mat`` (some images grayscale).
      WFLW: ``face_landmarks_wflw_{train,test}.csv``, the six ``…_test_<attribute>.csv`` subset
            files, images under ``WFLW_images/``.
      300W: ``train.tsv``, ``test_common.tsv``, ``test_ibug.tsv`` (harder faces), images in
            ``lfpw/``, ``helen/``, ``afw/``, ``ibug/`` (paths partly written with ``\\``).
      AFLW: ``face_landmarks_aflw_{train,test,test_frontal}.csv``, images under ``images/``.
    ``image_size`` (height, width) fixes the picture size (default: random 160–256 px).
    Returns the folder and the rendered faces per split (the ground truth). Deterministic in
    (seed, dataset, image_size).
    """
    if dataset not in _WRITERS:
        raise ValueError(f"unknown dataset {dataset!r}")
    num_test = max(6, num_train // 4) if num_test is None else num_test
    root = pathlib.Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    job = _Job(int(seed), landmarks.DATASET_ID[dataset] * 10, num_train, num_test, image_size)
    out = DemoSet(root=root, dataset=dataset)
    _WRITERS[dataset](out, job)
    return out


def write_all(
    out_dir: os.PathLike | str,
    num_train: int,
    num_test: int | None = None,
    *,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> dict[str, DemoSet]:
    """All four datasets under ``out_dir/<DATASET>``; returns their folders."""
    return {
        ds: write_official(
            pathlib.Path(out_dir) / ds, ds, num_train, num_test, seed=seed, image_size=image_size
        )
        for ds in landmarks.DATASETS
    }


# Render streams of scheme datasets (after the built-in ones' 10 × dataset id).
_SCHEME_TAG = 10 * len(landmarks.DATASETS)


def write_scheme(
    out_dir: os.PathLike | str,
    scheme: schemes.Scheme,
    num_train: int,
    num_test: int | None = None,
    *,
    seed: int = 0,
    image_size: tuple[int, int] | None = None,
) -> DemoSet:
    """The demo faces re-annotated in ``scheme`` as a ``.pts`` folder (``train/``, ``test/``).

    A point mapped to a built-in point is that point of the face; a new point is placed by
    :func:`fgtbt_jax.schemes.place_new_points` (the midpoint its note names), so its true
    position is known by construction. PNG pictures, ``.pts`` in the scheme's point order (the
    coordinates as the other demo sets store them). Deterministic in (seed, scheme, image_size).
    """
    num_test = max(6, num_train // 4) if num_test is None else num_test
    root = pathlib.Path(out_dir)
    unified = schemes.derive((scheme.name,), [scheme])
    job = _Job(int(seed), _SCHEME_TAG, num_train, num_test, image_size)
    out = DemoSet(root=root, dataset=scheme.name)
    for split, n, t in (("train", num_train, 0), ("test", num_test, 1)):
        faces = job.faces(t, n, occluder_prob=0.2)
        out.splits[split] = faces
        for i, face in enumerate(faces):
            pts = schemes.place_new_points(face.points, unified)[unified.index_maps[0]]
            _write_image(root / split / f"{split}_{i:05d}.png", face.image, ".png")
            formats.write_pts(root / split / f"{split}_{i:05d}.pts", pts)
    return out
