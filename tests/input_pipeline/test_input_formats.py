"""Official annotation formats: round trips through writers/readers, and bad input."""

from __future__ import annotations

import csv
import pathlib

import cv2
import h5py
import numpy as np
import pytest

from input_pipeline import formats


def _rec(k: int, i: int, rng, **kw) -> formats.FaceRecord:
    pts = np.round(rng.uniform(10, 90, (k, 2)), 3)
    return formats.FaceRecord(
        image_id=f"sub/img_{i}.png",
        landmarks=pts,
        center=np.array([50.25, 49.5]),
        scale=0.4 + i,
        source="t",
        row=0,
        **kw,
    )


def _images(root: pathlib.Path, n: int) -> None:
    (root / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cv2.imwrite(str(root / "sub" / f"img_{i}.png"), np.full((20, 30, 3), i, np.uint8))


@pytest.mark.parametrize("dataset", ["WFLW", "AFLW"])
def test_csv_round_trip(tmp_path, dataset):
    rng = np.random.default_rng(0)
    k = formats.NUM_POINTS[dataset]
    recs = [_rec(k, i, rng, box_size=12.5 + i) for i in range(3)]
    _images(tmp_path / "imgs", 3)
    write = formats.write_wflw_csv if dataset == "WFLW" else formats.write_aflw_csv
    read = formats.read_wflw_csv if dataset == "WFLW" else formats.read_aflw_csv
    write(tmp_path / "a.csv", recs)
    with open(tmp_path / "a.csv") as f:  # the official layout, checked independently
        rows = list(csv.reader(f))
    assert len(rows) == 4 and len(rows[0]) == (4 if dataset == "WFLW" else 5) + 2 * k
    got = read(tmp_path / "a.csv", [tmp_path / "missing", tmp_path / "imgs"])
    for r, g in zip(recs, got, strict=True):
        np.testing.assert_allclose(g.landmarks, r.landmarks, atol=1e-6)
        np.testing.assert_allclose(g.center, r.center)
        assert g.scale == pytest.approx(r.scale)
        assert g.box_size == (pytest.approx(r.box_size) if dataset == "AFLW" else 0.0)
        assert g.image_path == str(tmp_path / "imgs" / r.image_id)
    assert [g.row for g in got] == [2, 3, 4]


def test_300w_tsv_round_trip_with_backslashes(tmp_path):
    rng = np.random.default_rng(1)
    recs = [_rec(68, i, rng) for i in range(2)]
    _images(tmp_path, 2)
    paths = ["sub\\img_0.png", "sub/img_1.png"]
    formats.write_300w_tsv(tmp_path / "t.tsv", recs, paths=paths)
    lines = (tmp_path / "t.tsv").read_text().splitlines()
    cols = lines[1].split("\t")
    assert len(cols) == 6 and cols[0] == "sub\\img_0.png" and len(cols[2].split(",")) == 136
    got = formats.read_300w_tsv(tmp_path / "t.tsv", [tmp_path])
    assert [g.image_id for g in got] == ["sub/img_0.png", "sub/img_1.png"]
    np.testing.assert_allclose(got[1].landmarks, recs[1].landmarks, atol=1e-6)
    # Without a header line the first record is kept (the reference's pandas would drop it).
    (tmp_path / "nohdr.tsv").write_text("\n".join(lines[1:]) + "\n")
    assert len(formats.read_300w_tsv(tmp_path / "nohdr.tsv", [tmp_path])) == 2


def test_cofw_mat_round_trip_matlab_layout(tmp_path):
    rng = np.random.default_rng(2)
    color = rng.integers(0, 255, (12, 17, 3), dtype=np.uint8)
    gray = rng.integers(0, 255, (9, 11), dtype=np.uint8)
    pts = rng.uniform(1, 9, (2, 29, 2))
    occ = rng.random((2, 29)) < 0.3
    phis = np.concatenate([pts[..., 0], pts[..., 1], occ.astype(float)], axis=1)
    formats.write_cofw_mat(tmp_path / "c.mat", "train", [color, gray], phis)
    with h5py.File(tmp_path / "c.mat", "r") as f:  # MATLAB v7.3 storage: transposed arrays
        assert f["phisTr"].shape == (87, 2)
        assert f[f["IsTr"][0, 0]].shape == (3, 17, 12)
    assert (tmp_path / "c.mat").read_bytes()[:10] == b"MATLAB 7.3"
    got = formats.read_cofw_mat(tmp_path / "c.mat", "train")
    np.testing.assert_array_equal(got[0].image, color)
    np.testing.assert_array_equal(got[1].image, gray)
    np.testing.assert_allclose(got[1].landmarks, pts[1])
    np.testing.assert_array_equal(got[1].occlusion, occ[1])
    # centre/scale: floor/ceil box of the points (reference rule)
    x0, x1 = np.floor(pts[0, :, 0].min()), np.ceil(pts[0, :, 0].max())
    y0, y1 = np.floor(pts[0, :, 1].min()), np.ceil(pts[0, :, 1].max())
    np.testing.assert_allclose(got[0].center, [(x0 + x1) / 2, (y0 + y1) / 2])
    assert got[0].scale == pytest.approx(max(x1 - x0, y1 - y0) / 200)
    with pytest.raises(formats.AnnotationError, match="missing variable 'IsT'"):
        formats.read_cofw_mat(tmp_path / "c.mat", "test")


def test_pts_read_write(tmp_path, real_faces_dir):
    text = (real_faces_dir / "einstein.pts").read_text().split("{")[1].split("}")[0]
    expected = np.array([[float(v) for v in line.split()] for line in text.strip().splitlines()])
    pts = formats.read_pts(real_faces_dir / "einstein.pts")
    np.testing.assert_array_equal(pts, expected)
    assert pts.shape == (68, 2)
    formats.write_pts(tmp_path / "x.pts", pts)
    np.testing.assert_allclose(formats.read_pts(tmp_path / "x.pts"), pts, atol=1e-6)
    recs = formats.read_pts_folder(real_faces_dir, num_points=68)
    assert sorted(r.image_id for r in recs) == ["breakingbad.jpg", "einstein.jpg", "takeo.ppm"]


# ---------------------------------------------------------------------------------------------
# Bad input


def _wflw_file(tmp_path, rows: list[list[str]], header: bool = True) -> pathlib.Path:
    _images(tmp_path, 3)
    hdr = ["image_name", "scale", "center_w", "center_h"] + [f"p{i}" for i in range(196)]
    path = tmp_path / "w.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header:
            w.writerow(hdr)
        w.writerows(rows)
    return path


def _good_row(i=0) -> list[str]:
    return [f"sub/img_{i}.png", "0.5", "40", "41"] + ["12.5"] * 196


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: r[:-1], "199 columns, expected 200"),
        (lambda r: r[:10] + ["abc"] + r[11:], r"non-numeric p6 \(column 11\): 'abc'"),
        (lambda r: r[:10] + ["nan"] + r[11:], "not finite"),
        (lambda r: r[:2] + ["x1"] + r[3:], "non-numeric center_w"),
        (lambda r: ["sub/nope.png"] + r[1:], "image not found: 'sub/nope.png'"),
    ],
)
def test_bad_rows_name_file_and_row(tmp_path, mutate, message):
    path = _wflw_file(tmp_path, [_good_row(0), mutate(_good_row(1)), _good_row(2)])
    with pytest.raises(formats.AnnotationError, match=message) as e:
        formats.read_wflw_csv(path, [tmp_path])
    assert e.value.file == str(path) and e.value.row == 3
    assert f"{path}, row 3" in str(e.value)
    log = formats.SkipLog("skip")
    recs = formats.read_wflw_csv(path, [tmp_path], log)
    assert [r.row for r in recs] == [2, 4] and log.count == 1
    assert "skipped 1 records" in log.summary()


def test_empty_and_header_only_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(formats.AnnotationError, match="empty file"):
        formats.read_wflw_csv(tmp_path / "empty.csv", [tmp_path])
    path = _wflw_file(tmp_path, [])
    with pytest.raises(formats.AnnotationError, match="no records"):
        formats.read_wflw_csv(path, [tmp_path])
    path = _wflw_file(tmp_path, [_good_row(0)], header=False)
    with pytest.raises(formats.AnnotationError, match="row 1.*header"):
        formats.read_wflw_csv(path, [tmp_path])
    (tmp_path / "e.tsv").write_text("\n\n")
    with pytest.raises(formats.AnnotationError, match="empty file"):
        formats.read_300w_tsv(tmp_path / "e.tsv", [tmp_path])
    with pytest.raises(formats.AnnotationError, match="not found"):
        formats.read_aflw_csv(tmp_path / "missing.csv", [tmp_path])


def test_bad_300w_point_string_and_pts(tmp_path):
    _images(tmp_path, 1)
    good = ["sub/img_0.png", "1,2", ",".join(["3"] * 136), "0.5", "10", "10"]
    bad = good[:2] + [",".join(["3"] * 135)] + good[3:]
    (tmp_path / "t.tsv").write_text("\t".join(good) + "\n" + "\t".join(bad) + "\n")
    with pytest.raises(formats.AnnotationError, match=r"t.tsv, row 2: .*135 values"):
        formats.read_300w_tsv(tmp_path / "t.tsv", [tmp_path])
    (tmp_path / "a.pts").write_text("version: 1\nn_points: 3\n{\n1 2\n3 x\n5 6\n}\n")
    with pytest.raises(formats.AnnotationError, match=r"a.pts, row 5: non-numeric y"):
        formats.read_pts(tmp_path / "a.pts")
    (tmp_path / "b.pts").write_text("version: 1\nn_points: 3\n{\n1 2\n}\n")
    with pytest.raises(formats.AnnotationError, match="n_points is 3 but 1"):
        formats.read_pts(tmp_path / "b.pts")


def test_unreadable_image_is_named(tmp_path):
    path = _wflw_file(tmp_path, [_good_row(0)])
    (tmp_path / "sub" / "img_0.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rec = formats.read_wflw_csv(path, [tmp_path])[0]
    with pytest.raises(formats.AnnotationError, match=r"w.csv, row 2: unreadable image"):
        formats.load_image_bytes(rec)
