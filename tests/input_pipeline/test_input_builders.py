"""TFDS builders: each prepares a small dataset in its official format and round-trips it."""

from __future__ import annotations

import math
import pathlib
import shutil

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets")

import tensorflow_datasets as tfds  # noqa: E402

from fgtbt_jax import landmarks  # noqa: E402
from input_pipeline import builders, demo, formats  # noqa: E402


@pytest.fixture(scope="module")
def demo_sets(tmp_path_factory):
    return demo.write_all(tmp_path_factory.mktemp("raw"), num_train=5, num_test=6, seed=3)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, demo_sets, real_faces_dir):
    out = tmp_path_factory.mktemp("tfds")
    for ds, s in demo_sets.items():
        builders.prepare(ds, data_dir=out, manual_dir=s.root, config="demo")
    builders.prepare("pts_folder", data_dir=out, manual_dir=real_faces_dir)
    return out


def _records(data_dir, ds, split, config="demo"):
    b = builders.get_builder(ds, data_dir, config)
    src = b.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
    return [src[i] for i in range(len(src))]


def _rgb(data: bytes) -> np.ndarray:
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), 4)


@pytest.mark.parametrize("ds", landmarks.DATASETS)
def test_demo_round_trip_matches_generator_truth(data_dir, demo_sets, ds):
    truth = demo_sets[ds].splits
    b = builders.get_builder(ds, data_dir, "demo")
    assert {k: v.num_examples for k, v in b.info.splits.items()} == {
        k: len(v) for k, v in truth.items()
    }
    uidx = landmarks.unified_index(ds)
    for split, faces in truth.items():
        recs = _records(data_dir, ds, split)
        for face, rec in zip(faces, recs, strict=True):
            pts = face.points[uidx]
            np.testing.assert_allclose(rec["landmarks"], pts, atol=2e-6)
            img = _rgb(rec["image"])
            assert img.shape == face.image.shape[:2] + (3,)
            assert (rec["height"], rec["width"]) == face.image.shape[:2]
            lossless = ds == "COFW" or (ds == "300W" and rec["image_id"].startswith(b"lfpw"))
            if ds == "COFW" and not np.array_equal(img, face.image):  # grayscale copy
                gray = face.image.astype(np.float32) @ [0.299, 0.587, 0.114]
                np.testing.assert_array_equal(img[..., 0], np.round(gray).astype(np.uint8))
                np.testing.assert_array_equal(img[..., 1], img[..., 0])
            elif lossless:
                np.testing.assert_array_equal(img, face.image)
            else:  # JPEG: the file's bytes are stored as they are
                root = demo_sets[ds].root / ("WFLW_images" if ds == "WFLW" else "")
                root = demo_sets[ds].root / "images" if ds == "AFLW" else root
                assert rec["image"] == (root / rec["image_id"].decode()).read_bytes()
                assert np.abs(img.astype(float) - face.image).mean() < 8.0
            lo, hi = pts.min(0), pts.max(0)
            if ds == "COFW":  # the reference's floor/ceil box
                lo, hi = np.floor(lo), np.ceil(hi)
                np.testing.assert_array_equal(rec["occlusion"], face.occluded[uidx])
            if ds == "AFLW":  # the face box of the whole face
                flo, fhi = face.points.min(0), face.points.max(0)
                np.testing.assert_allclose(rec["center"], (flo + fhi) / 2, atol=2e-6)
                assert rec["scale"] == pytest.approx((fhi - flo).max() / 200, abs=2e-6)
                assert rec["box_size"] == pytest.approx(math.sqrt(np.prod(fhi - flo)), abs=2e-5)
            else:
                np.testing.assert_allclose(rec["center"], (lo + hi) / 2, atol=2e-6)
                assert rec["scale"] == pytest.approx((hi - lo).max() / 200, abs=2e-6)
                assert rec["box_size"] == 0.0
            if ds == "WFLW" and split == "test":
                assert rec["attributes"] == {a: face.attributes[a] for a in rec["attributes"]}


def test_300w_paths_with_backslashes(data_dir, demo_sets):
    tsv = (demo_sets["300W"].root / "train.tsv").read_text()
    assert "lfpw\\trainset\\image_" in tsv
    ids = [r["image_id"].decode() for r in _records(data_dir, "300W", "train")]
    assert ids[0].startswith("lfpw/trainset/") and "\\" not in "".join(ids)


def test_pts_folder_real_faces(data_dir, real_faces_dir):
    recs = {r["image_id"].decode(): r for r in _records(data_dir, "pts_folder", "data")}
    assert sorted(recs) == ["breakingbad.jpg", "einstein.jpg", "takeo.ppm"]
    for name, rec in recs.items():
        stem = pathlib.Path(name).stem
        body = (real_faces_dir / f"{stem}.pts").read_text().split("{")[1].split("}")[0]
        pts = np.array([[float(v) for v in ln.split()] for ln in body.strip().splitlines()])
        np.testing.assert_array_equal(rec["landmarks"], pts)
        expected = cv2.cvtColor(cv2.imread(str(real_faces_dir / name)), cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(_rgb(rec["image"]), expected)
        assert (rec["height"], rec["width"]) == expected.shape[:2]
    assert recs["breakingbad.jpg"]["image"] == (real_faces_dir / "breakingbad.jpg").read_bytes()
    assert recs["takeo.ppm"]["image"][:4] == b"\x89PNG"  # re-encoded for TensorFlow


def _bad_wflw(tmp_path, demo_sets, line: int, value: str) -> pathlib.Path:
    manual = tmp_path / "wflw"
    shutil.copytree(demo_sets["WFLW"].root, manual)
    csv = manual / "face_landmarks_wflw_train.csv"
    lines = csv.read_text().splitlines()
    cols = lines[line - 1].split(",")
    cols[10] = value
    lines[line - 1] = ",".join(cols)
    csv.write_text("\n".join(lines) + "\n")
    return manual


def test_failed_preparation_leaves_nothing(tmp_path, demo_sets):
    manual = _bad_wflw(tmp_path, demo_sets, line=4, value="NaN")
    out = tmp_path / "tfds"
    with pytest.raises(formats.AnnotationError, match=r"face_landmarks_wflw_train.csv, row 4"):
        builders.prepare("wflw", data_dir=out, manual_dir=manual, config="demo")
    b = builders.get_builder("wflw", out, "demo")
    assert not b.is_prepared()
    left = [p.name for p in (out / "wflw" / "demo").iterdir()] if (out / "wflw").exists() else []
    assert "1.0.0" not in left and not any("incomplete" in n for n in left), left
    # a missing image stops it too, naming the annotation row
    (manual / "face_landmarks_wflw_train.csv").write_text(
        (demo_sets["WFLW"].root / "face_landmarks_wflw_train.csv").read_text()
    )
    (manual / "WFLW_images" / "1--Synthetic" / "train_00001.jpg").unlink()
    with pytest.raises(formats.AnnotationError, match=r"row 3: image not found"):
        builders.prepare("wflw", data_dir=out, manual_dir=manual, config="demo")
    assert not builders.get_builder("wflw", out, "demo").is_prepared()


def test_skip_policy_counts_and_reports(tmp_path, demo_sets):
    manual = _bad_wflw(tmp_path, demo_sets, line=2, value="oops")
    b = builders.prepare(
        "wflw", data_dir=tmp_path / "tfds", manual_dir=manual, config="demo", on_error="skip"
    )
    assert b.skip_log.count == 1 and "row 2" in str(b.skip_log.skipped[0])
    b = builders.get_builder("wflw", tmp_path / "tfds", "demo")  # reload from disk
    assert b.info.splits["train"].num_examples == 4
    assert b.info.metadata["skipped_train"] == 1 and b.info.metadata["skipped_test"] == 0


def test_pts_folder_in_a_scheme(tmp_path):
    from helpers import DEMO_SCHEME, assert_one_error_line, run_script, write_pts_faces

    from fgtbt_jax import schemes

    my19 = schemes.load_scheme(DEMO_SCHEME)
    manual, out = tmp_path / "my19", tmp_path / "tfds"
    truth = {s: write_pts_faces(manual / s, n, 19, seed=n) for s, n in (("train", 3), ("test", 2))}
    args = ["--dataset", "pts_folder", "--scheme", str(DEMO_SCHEME), "--manual_dir", str(manual)]
    res = run_script("scripts/prepare_data.py", *args, "--data_dir", str(out))
    assert res.returncode == 0, res.stderr[-3000:]
    b = builders.scheme_builder(my19, out)  # what a run that lists MY19 reads
    assert b.is_prepared() and b.data_dir.endswith("pts_folder/MY19/1.0.0")
    for split, faces in truth.items():
        src = b.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding()})
        recs = {src[i]["image_id"].decode(): src[i] for i in range(len(src))}
        assert sorted(recs) == sorted(faces)
        for name, pts in faces.items():
            np.testing.assert_array_equal(recs[name]["landmarks"], pts)
    # a .pts with the wrong point count: named on one error line; skipped with --on_error=skip
    write_pts_faces(manual / "test" / "bad", 1, 18, seed=9)
    bad = manual / "test" / "bad" / "face_00.pts"
    res = run_script("scripts/prepare_data.py", *args, "--data_dir", str(tmp_path / "tfds2"))
    assert_one_error_line(res, f"{bad}: 18 points, expected 19")
    assert not builders.scheme_builder(my19, tmp_path / "tfds2").is_prepared()
    b = builders.prepare(
        "pts_folder", data_dir=tmp_path / "tfds3", manual_dir=manual, scheme=my19, on_error="skip"
    )
    assert b.skip_log.count == 1 and b.info.splits["test"].num_examples == 2
