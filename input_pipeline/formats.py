r"""Readers and writers for the official annotation formats of SPEC §4, plus iBUG ``.pts``.

Every reader returns a list of :class:`FaceRecord` with the coordinates exactly as the file
holds them (float64, no offset applied) and ``scale`` as the file holds it (the pipeline
multiplies by 1.25). Bad input raises :class:`AnnotationError`, which names the file and the
1-based line (CSV/TSV), row (COFW ``.mat``) or point; with ``on_error="skip"`` the bad record
is counted in a :class:`SkipLog` instead and the reader carries on.

Formats (as the reference reads them):

* WFLW  — CSV with a header row: ``image_name, scale, center_w, center_h, x0, y0, … x97, y97``
  (200 columns). Files ``face_landmarks_wflw_{train,test,test_<attribute>}.csv``.
* AFLW  — CSV with a header row: ``image_name, scale, box_size, center_w, center_h`` + 19 pairs
  (43 columns). Files ``face_landmarks_aflw_{train,test[,_frontal]}.csv``.
* 300W  — TSV: ``image_path`` (may contain ``\``), the five-point string (unused), the 68 points
  as one string ``"x1,y1,x2,y2,…"``, ``scale``, ``center_w``, ``center_h`` (6 columns). A header
  row is optional (detected: the reference's ``pandas.read_csv`` always eats line 1).
* COFW  — MATLAB v7.3 (HDF5) ``.mat``: cell array of images ``IsTr``/``IsT`` (``uint8``, H×W or
  H×W×3 in MATLAB, i.e. stored transposed) and ``phisTr``/``phisT`` (N×87: 29 x, 29 y, 29
  occlusion flags). Centre and scale come from the points (reference: floor/ceil box).
* ``.pts`` — iBUG/menpo: ``version: 1``, ``n_points: K``, ``{``, K lines ``x y``, ``}``.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from fgtbt_jax import errors

PathLike = str | os.PathLike

WFLW_ATTRIBUTES: tuple[str, ...] = (
    "largepose",
    "expression",
    "illumination",
    "makeup",
    "occlusion",
    "blur",
)

NUM_POINTS = {"COFW": 29, "WFLW": 98, "300W": 68, "AFLW": 19}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif")


class AnnotationError(errors.Error, ValueError):
    """Bad annotation or image. ``file`` and ``row`` (1-based line/row, 0 = whole file)."""

    def __init__(self, file: PathLike, row: int, message: str):
        self.file = os.fspath(file)
        self.row = int(row)
        self.reason = message
        where = f"{self.file}, row {self.row}" if self.row else self.file
        super().__init__(f"{where}: {message}")


@dataclasses.dataclass
class SkipLog:
    """Error policy. ``policy="raise"`` re-raises; ``"skip"`` records and continues."""

    policy: str = "raise"
    skipped: list[AnnotationError] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if self.policy not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {self.policy!r}")

    def handle(self, err: AnnotationError) -> None:
        if self.policy == "raise":
            raise err
        self.skipped.append(err)

    @property
    def count(self) -> int:
        return len(self.skipped)

    def summary(self, limit: int = 10) -> str:
        if not self.skipped:
            return "skipped 0 records"
        lines = [f"skipped {self.count} records:"]
        lines += [f"  {e}" for e in self.skipped[:limit]]
        if self.count > limit:
            lines.append(f"  ... and {self.count - limit} more")
        return "\n".join(lines)


@dataclasses.dataclass
class FaceRecord:
    """One annotated face.

    landmarks: (K, 2) float64 (x, y) as in the file. center: (2,) float64. scale: face box side
    / 200 as in the file (not yet × 1.25). ``image_path`` (a file) or ``image`` (an array,
    COFW: H×W or H×W×3 uint8) holds the picture. ``source``/``row`` locate it for messages.
    """

    image_id: str
    landmarks: np.ndarray
    center: np.ndarray
    scale: float
    source: str
    row: int
    image_path: str | None = None
    image: np.ndarray | None = None
    box_size: float = 0.0
    occlusion: np.ndarray | None = None
    attributes: dict[str, bool] = dataclasses.field(default_factory=dict)


def _file_record(
    path: PathLike,
    row: int,
    rel: str,
    pts: np.ndarray,
    center: tuple[float, float],
    scale: float,
    image_roots: Sequence[PathLike],
    check_images: bool,
    box_size: float = 0.0,
) -> FaceRecord:
    """A record of an annotation row naming its image file ``rel`` (resolved against
    ``image_roots`` when ``check_images``)."""
    if scale <= 0:
        raise AnnotationError(path, row, f"scale must be positive, got {scale}")
    return FaceRecord(
        image_id=rel.strip().replace("\\", "/"),
        landmarks=pts,
        center=np.array(center),
        scale=float(scale),
        source=os.fspath(path),
        row=row,
        image_path=resolve_image(image_roots, rel, path, row) if check_images else rel,
        box_size=float(box_size),
    )


def _float(file, row, value: str, what: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AnnotationError(file, row, f"non-numeric {what}: {value!r}") from None
    if not math.isfinite(v):
        raise AnnotationError(file, row, f"{what} is not finite: {value!r}")
    return v


def _floats(file, row, values: Sequence[str], what: str) -> np.ndarray:
    return np.array([_float(file, row, v, f"{what}[{i}]") for i, v in enumerate(values)])


def _check_nonempty(path: pathlib.Path) -> None:
    if not path.exists():
        raise AnnotationError(path, 0, "annotation file not found")
    if path.stat().st_size == 0:
        raise AnnotationError(path, 0, "empty file")


def resolve_image(roots: Sequence[PathLike], rel: str, file: PathLike, row: int) -> str:
    """First existing ``root/rel`` (``\\`` read as ``/``); AnnotationError if none exists."""
    rel = rel.strip().replace("\\", "/")
    if not rel:
        raise AnnotationError(file, row, "empty image path")
    tried = []
    for root in roots:
        p = pathlib.Path(root) / rel.lstrip("/")
        if p.is_file():
            return os.fspath(p)
        tried.append(os.fspath(p))
    raise AnnotationError(file, row, f"image not found: {rel!r} (looked for {tried})")


def box_center_scale(points: np.ndarray) -> tuple[np.ndarray, float]:
    """COFW rule (reference): centre ((⌊xmin⌋+⌈xmax⌉)/2, …), scale = max side of that box / 200."""
    xmin, ymin = np.min(points, axis=0)
    xmax, ymax = np.max(points, axis=0)
    x0, x1, y0, y1 = math.floor(xmin), math.ceil(xmax), math.floor(ymin), math.ceil(ymax)
    center = np.array([(x0 + x1) / 2.0, (y0 + y1) / 2.0])
    return center, max(x1 - x0, y1 - y0) / 200.0


# ----------------------------------------------------------------------------------------------
# CSV (WFLW, AFLW)


def _read_csv(
    path: PathLike,
    *,
    dataset: str,
    image_roots: Sequence[PathLike],
    log: SkipLog,
    check_images: bool,
) -> list[FaceRecord]:
    path = pathlib.Path(path)
    _check_nonempty(path)
    k = NUM_POINTS[dataset]
    n_meta = 4 if dataset == "WFLW" else 5
    ncol = n_meta + 2 * k
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or all(not r for r in rows):
        raise AnnotationError(path, 0, "empty file")
    header = rows[0]
    if len(header) != ncol:
        raise AnnotationError(path, 1, f"header has {len(header)} columns, expected {ncol}")
    try:
        float(header[1])
        looks_like_data = True
    except ValueError:
        looks_like_data = False
    if looks_like_data:
        raise AnnotationError(path, 1, "line 1 looks like data; the format needs a header row")
    records = []
    for line, cols in enumerate(rows[1:], start=2):
        if not cols or all(not c.strip() for c in cols):
            continue  # blank line
        try:
            if len(cols) != ncol:
                raise AnnotationError(path, line, f"{len(cols)} columns, expected {ncol}")
            vals = np.array(
                [
                    _float(path, line, cols[j], f"{header[j].strip()} (column {j + 1})")
                    for j in range(1, ncol)
                ]
            )
            meta, pts = vals[: n_meta - 1], vals[n_meta - 1 :].reshape(k, 2)
            if dataset == "WFLW":
                scale, cx, cy = meta
                box = 0.0
            else:
                scale, box, cx, cy = meta
            records.append(
                _file_record(
                    path, line, cols[0], pts, (cx, cy), scale, image_roots, check_images, box
                )
            )
        except AnnotationError as e:
            log.handle(e)
    if not records and not log.count:
        raise AnnotationError(path, 0, "no records (header only)")
    return records


def read_wflw_csv(
    path: PathLike,
    image_roots: Sequence[PathLike],
    log: SkipLog | None = None,
    *,
    check_images: bool = True,
) -> list[FaceRecord]:
    """WFLW CSV → records (98 points). ``image_roots``: folders tried in order for each path."""
    return _read_csv(
        path,
        dataset="WFLW",
        image_roots=image_roots,
        log=log or SkipLog(),
        check_images=check_images,
    )


def read_aflw_csv(
    path: PathLike,
    image_roots: Sequence[PathLike],
    log: SkipLog | None = None,
    *,
    check_images: bool = True,
) -> list[FaceRecord]:
    """AFLW CSV → records (19 points, ``box_size`` = the NME normaliser)."""
    return _read_csv(
        path,
        dataset="AFLW",
        image_roots=image_roots,
        log=log or SkipLog(),
        check_images=check_images,
    )


def _fmt(v: float) -> str:
    return f"{float(v):.6f}".rstrip("0").rstrip(".") if math.isfinite(v) else str(v)


def write_wflw_csv(path: PathLike, records: Iterable[FaceRecord]) -> None:
    """Write records (``image_id`` = path relative to the image root) as a WFLW CSV."""
    header = ["image_name", "scale", "center_w", "center_h"]
    header += [f"original_{i}_{c}" for i in range(98) for c in "xy"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            row = [r.image_id, _fmt(r.scale), _fmt(r.center[0]), _fmt(r.center[1])]
            w.writerow(row + [_fmt(v) for v in np.asarray(r.landmarks).reshape(-1)])


def write_aflw_csv(path: PathLike, records: Iterable[FaceRecord]) -> None:
    """Write records as an AFLW CSV (with ``box_size``)."""
    header = ["image_name", "scale", "box_size", "center_w", "center_h"]
    header += [f"original_{i}_{c}" for i in range(19) for c in "xy"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            row = [r.image_id, _fmt(r.scale), _fmt(r.box_size), _fmt(r.center[0])]
            row += [_fmt(r.center[1])]
            w.writerow(row + [_fmt(v) for v in np.asarray(r.landmarks).reshape(-1)])


# ----------------------------------------------------------------------------------------------
# 300W TSV

_TSV_COLUMNS = ("image_path", "landmarks_5pts", "landmarks_target", "scale", "center_w", "center_h")


def read_300w_tsv(
    path: PathLike,
    image_roots: Sequence[PathLike],
    log: SkipLog | None = None,
    *,
    check_images: bool = True,
) -> list[FaceRecord]:
    """300W TSV → records (68 points). Windows separators in paths are accepted."""
    log = log or SkipLog()
    path = pathlib.Path(path)
    _check_nonempty(path)
    with open(path, encoding="utf-8-sig") as f:
        lines = f.read().splitlines()
    if not any(line.strip() for line in lines):
        raise AnnotationError(path, 0, "empty file")
    start = 0
    first = lines[0].split("\t")
    if len(first) >= 4:
        try:
            float(first[3])
        except ValueError:
            start = 1  # header row
    records = []
    for line_no, text in enumerate(lines[start:], start=start + 1):
        if not text.strip():
            continue
        cols = text.split("\t")
        try:
            if len(cols) != 6:
                raise AnnotationError(path, line_no, f"{len(cols)} columns, expected 6")
            pts_str = cols[2].strip().strip('"')
            values = [v for v in pts_str.split(",")]
            if len(values) != 136:
                raise AnnotationError(
                    path, line_no, f"landmark string has {len(values)} values, expected 136"
                )
            pts = _floats(path, line_no, values, "coordinate").reshape(68, 2)
            scale = _float(path, line_no, cols[3], "scale")
            cx = _float(path, line_no, cols[4], "center_w")
            cy = _float(path, line_no, cols[5], "center_h")
            rel = cols[0]
            records.append(
                _file_record(path, line_no, rel, pts, (cx, cy), scale, image_roots, check_images)
            )
        except AnnotationError as e:
            log.handle(e)
    if not records and not log.count:
        raise AnnotationError(path, 0, "no records")
    return records


def write_300w_tsv(
    path: PathLike,
    records: Iterable[FaceRecord],
    *,
    paths: Sequence[str] | None = None,
    five_points: Sequence[np.ndarray] | None = None,
) -> None:
    """Write a 300W TSV with a header row. ``paths`` override ``image_id`` (e.g. with ``\\``)."""
    records = list(records)
    with open(path, "w", newline="") as f:
        f.write("\t".join(_TSV_COLUMNS) + "\n")
        for i, r in enumerate(records):
            rel = paths[i] if paths is not None else r.image_id
            five = five_points[i] if five_points is not None else np.zeros((5, 2))
            cols = [
                rel,
                ",".join(_fmt(v) for v in np.asarray(five).reshape(-1)),
                ",".join(_fmt(v) for v in np.asarray(r.landmarks).reshape(-1)),
                _fmt(r.scale),
                _fmt(r.center[0]),
                _fmt(r.center[1]),
            ]
            f.write("\t".join(cols) + "\n")


# ----------------------------------------------------------------------------------------------
# COFW (MATLAB v7.3 / HDF5)

COFW_KEYS = {"train": ("IsTr", "phisTr"), "test": ("IsT", "phisT")}


def read_cofw_mat(path: PathLike, split: str, log: SkipLog | None = None) -> list[FaceRecord]:
    """COFW v7.3 ``.mat`` → records (29 points, occlusion flags, images as arrays).

    Grayscale images stay (H, W); colour ones are (H, W, 3) RGB uint8.
    """
    import h5py

    log = log or SkipLog()
    path = pathlib.Path(path)
    _check_nonempty(path)
    img_key, pts_key = COFW_KEYS[split]
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise AnnotationError(path, 0, f"not a MATLAB v7.3 (HDF5) file: {e}") from None
    records = []
    with f:
        for key in (img_key, pts_key):
            if key not in f:
                raise AnnotationError(path, 0, f"missing variable {key!r} (found {list(f)})")
        refs = np.asarray(f[img_key][()]).reshape(-1)
        phis = np.asarray(f[pts_key][()], np.float64)
        if phis.ndim != 2 or 87 not in phis.shape:
            raise AnnotationError(path, 0, f"{pts_key} has shape {phis.shape}, expected N×87")
        if phis.shape[0] == 87 and phis.shape[1] != 87:
            phis = phis.T  # MATLAB column-major N×87 reads as 87×N
        if len(refs) != len(phis):
            raise AnnotationError(
                path, 0, f"{img_key} holds {len(refs)} images but {pts_key} {len(phis)} rows"
            )
        if len(refs) == 0:
            raise AnnotationError(path, 0, "no records")
        for i, (ref, phi) in enumerate(zip(refs, phis, strict=True)):
            row = i + 1
            try:
                if not np.all(np.isfinite(phi)):
                    raise AnnotationError(path, row, f"{pts_key} row has non-finite values")
                try:
                    img = np.asarray(f[ref][()])
                except Exception as e:  # noqa: BLE001 - any h5py failure is a bad record
                    raise AnnotationError(
                        path, row, f"unreadable image in {img_key}: {e}"
                    ) from None
                img = np.transpose(img)  # MATLAB column-major → (H, W[, 3])
                if img.ndim == 3 and img.shape[2] == 1:
                    img = img[..., 0]
                if not (img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 3)) or img.size == 0:
                    raise AnnotationError(path, row, f"image has shape {img.shape}")
                if img.dtype != np.uint8:
                    if img.max() <= 1.0 and img.dtype.kind == "f":
                        img = img * 255.0
                    img = np.clip(np.round(img), 0, 255).astype(np.uint8)
                pts = np.stack([phi[0:29], phi[29:58]], axis=1)
                center, scale = box_center_scale(pts)
                records.append(
                    FaceRecord(
                        image_id=f"{path.name}#{row}",
                        landmarks=pts,
                        center=center,
                        scale=scale,
                        source=os.fspath(path),
                        row=row,
                        image=np.ascontiguousarray(img),
                        occlusion=phi[58:87] > 0.5,
                    )
                )
            except AnnotationError as e:
                log.handle(e)
    return records


def write_cofw_mat(
    path: PathLike, split: str, images: Sequence[np.ndarray], phis: np.ndarray
) -> None:
    """Write a COFW-style MATLAB v7.3 file (HDF5 with a MATLAB userblock, cell of uint8)."""
    import h5py

    img_key, pts_key = COFW_KEYS[split]
    phis = np.asarray(phis, np.float64)
    if phis.shape != (len(images), 87):
        raise ValueError(f"phis must be ({len(images)}, 87), got {phis.shape}")
    with h5py.File(path, "w", userblock_size=512) as f:
        refs_group = f.create_group("#refs#")
        refs = np.empty((1, len(images)), dtype=h5py.ref_dtype)
        for i, img in enumerate(images):
            d = refs_group.create_dataset(f"img{i}", data=np.transpose(np.asarray(img, np.uint8)))
            d.attrs["MATLAB_class"] = np.bytes_("uint8")
            refs[0, i] = d.ref
        cell = f.create_dataset(img_key, data=refs, dtype=h5py.ref_dtype)
        cell.attrs["MATLAB_class"] = np.bytes_("cell")
        p = f.create_dataset(pts_key, data=phis.T)
        p.attrs["MATLAB_class"] = np.bytes_("double")
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created by: fgtbt-jax. HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        block = header.ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02" + b"IM"
        f.write(block.ljust(128, b"\x00"))


# ----------------------------------------------------------------------------------------------
# iBUG .pts


def read_pts(path: PathLike) -> np.ndarray:
    """(K, 2) float64 points of an iBUG ``.pts`` file (1-based pixel convention, as stored)."""
    path = pathlib.Path(path)
    _check_nonempty(path)
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    n = None
    pts = []
    inside = False
    for i, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text:
            continue
        if text.startswith("n_points"):
            try:
                n = int(text.split(":", 1)[1])
            except (IndexError, ValueError):
                raise AnnotationError(path, i, f"bad n_points line {text!r}") from None
        elif text == "{":
            inside = True
        elif text == "}":
            inside = False
        elif inside:
            parts = text.split()
            if len(parts) != 2:
                raise AnnotationError(path, i, f"expected 'x y', got {text!r}")
            pts.append([_float(path, i, parts[0], "x"), _float(path, i, parts[1], "y")])
        elif not text.startswith("version"):
            raise AnnotationError(path, i, f"unexpected line {text!r}")
    if n is None:
        raise AnnotationError(path, 0, "missing 'n_points' header")
    if len(pts) != n:
        raise AnnotationError(path, 0, f"n_points is {n} but {len(pts)} points are listed")
    return np.asarray(pts, np.float64).reshape(n, 2)


def write_pts(path: PathLike, points: np.ndarray) -> None:
    pts = np.asarray(points, np.float64)
    body = "\n".join(f"{_fmt(x)} {_fmt(y)}" for x, y in pts)
    pathlib.Path(path).write_text(f"version: 1\nn_points: {len(pts)}\n{{\n{body}\n}}\n")


def read_pts_folder(
    folder: PathLike, log: SkipLog | None = None, *, num_points: int | None = None
) -> list[FaceRecord]:
    """Images with a same-stem ``.pts`` beside them (recursively). Centre/scale: the COFW rule.

    A ``.pts`` without an image is an error; images without ``.pts`` are ignored.
    ``num_points``: required point count (e.g. 68), checked per file.
    """
    log = log or SkipLog()
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise AnnotationError(folder, 0, "folder not found")
    pts_files = sorted(folder.rglob("*.pts"))
    if not pts_files:
        raise AnnotationError(folder, 0, "no .pts files")
    records = []
    for pts_file in pts_files:
        try:
            pts = read_pts(pts_file)
            if num_points is not None and len(pts) != num_points:
                raise AnnotationError(pts_file, 0, f"{len(pts)} points, expected {num_points}")
            image = None
            for cand in sorted(pts_file.parent.glob(pts_file.stem + ".*")):
                if cand.suffix.lower() in IMAGE_EXTENSIONS:
                    image = cand
                    break
            if image is None:
                raise AnnotationError(pts_file, 0, "no image with the same name beside it")
            center, scale = box_center_scale(pts)
            records.append(
                FaceRecord(
                    image_id=os.fspath(image.relative_to(folder)),
                    landmarks=pts,
                    center=center,
                    scale=scale,
                    source=os.fspath(pts_file),
                    row=0,
                    image_path=os.fspath(image),
                )
            )
        except AnnotationError as e:
            log.handle(e)
    return records


# ----------------------------------------------------------------------------------------------
# Images


def _magic_supported(data: bytes) -> bool:
    """Formats both TensorFlow and OpenCV decode: JPEG, PNG, BMP, GIF, WebP."""
    return (
        data[:3] == b"\xff\xd8\xff"
        or data[:8] == b"\x89PNG\r\n\x1a\n"
        or data[:2] == b"BM"
        or data[:4] in (b"GIF8",)
        or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
    )


def decode_image(data: bytes) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB, EXIF orientation ignored (like PIL in the reference); None if bad."""
    import cv2

    arr = np.frombuffer(data, np.uint8)
    img = cv2.imdecode(arr, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        return None
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an (H, W) or (H, W, 3) RGB uint8 array."""
    import cv2

    img = np.asarray(image, np.uint8)
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img)
    if not ok:
        raise ValueError("PNG encoding failed")
    return buf.tobytes()


def load_image_bytes(record: FaceRecord) -> tuple[bytes, int, int]:
    """Encoded image of ``record``, checked by decoding it, plus its (height, width).

    Files in a format other than JPEG/PNG/BMP/GIF/WebP (e.g. ``.ppm``), and files OpenCV can
    decode only partially, are re-encoded as PNG. AnnotationError names the annotation row.
    """
    if record.image is not None:
        img = record.image
        return encode_png(img), int(img.shape[0]), int(img.shape[1])
    try:
        data = pathlib.Path(record.image_path).read_bytes()
    except OSError as e:
        raise AnnotationError(record.source, record.row, f"cannot read image: {e}") from None
    img = decode_image(data) if data else None
    if img is None:
        raise AnnotationError(
            record.source, record.row, f"unreadable image file {record.image_path!r}"
        )
    if not _magic_supported(data):
        data = encode_png(img)
    return data, int(img.shape[0]), int(img.shape[1])
