"""Face detection on the real photos and the crop → heatmap → decode → map-back path."""

from __future__ import annotations

import json
import math
import pathlib
import subprocess
import sys

import cv2
import numpy as np
import pytest
from helpers import subprocess_env

from fgtbt_jax import transforms
from fgtbt_jax.evaluation import decoding
from fgtbt_jax.inference import detector

PHOTOS = ("breakingbad.jpg", "einstein.jpg", "takeo.ppm")
ROOT = pathlib.Path(__file__).resolve().parents[2]


def read_pts(path: pathlib.Path) -> np.ndarray:
    text = path.read_text()
    body = text[text.index("{") + 1 : text.index("}")]
    pts = np.asarray(body.split(), np.float64).reshape(-1, 2)
    assert pts.shape == (68, 2), path
    return pts


def read_rgb(path: pathlib.Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return img if img.ndim == 2 else img[..., ::-1]


@pytest.fixture(scope="module")
def detections(real_faces_dir):
    det = detector.FaceDetector()
    out = {}
    for name in PHOTOS:
        img = read_rgb(real_faces_dir / name)
        out[name] = (det(img), read_pts(real_faces_dir / (pathlib.Path(name).stem + ".pts")))
    return out


@pytest.mark.slow
def test_detector_finds_the_annotated_face(detections):
    for name, (faces, pts) in detections.items():
        lm_box = detector.landmark_box(pts)
        ious = [detector.iou(f.box, lm_box) for f in faces]
        assert faces and max(ious) > 0.3, (name, ious)
        # the crop derived from the matching box covers the face like a training crop
        face = faces[int(np.argmax(ious))]
        center, scale = detector.box_to_center_scale(face.box)
        q = transforms.transform_points(pts, center, scale, 64, integer=False)
        assert np.all((q >= 0) & (q < 64)), name  # every landmark inside the crop
        side = max(lm_box[2] - lm_box[0], lm_box[3] - lm_box[1])
        # training crops: landmark box / (200·scale) = 1/1.25 = 0.8, × 1/U(0.75, 1.25)
        assert 0.55 < side / (200 * scale) < 1.1, (name, side / (200 * scale))


def test_box_to_center_scale_and_iou():
    c, s = detector.box_to_center_scale(
        [10, 20, 110, 220], box_to_landmark_box=1.0, center_shift_y=0.0
    )
    np.testing.assert_allclose(c, [60, 120])
    assert s == pytest.approx(200 / 200 * 1.25)
    c, s = detector.box_to_center_scale([0, 0, 100, 100])
    np.testing.assert_allclose(c, [50, 50 + 100 * detector.HAAR_CENTER_SHIFT_Y])
    assert s == pytest.approx(100 * detector.HAAR_BOX_TO_LANDMARK_BOX / 200 * 1.25)
    assert detector.iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="x1 > x0"):
        detector.box_to_center_scale([5, 5, 5, 9])


def test_boxes_json(tmp_path):
    p = tmp_path / "b.json"
    p.write_text(
        json.dumps({"a.jpg": [[1, 2, 30, 40]], "b": [{"box": [0, 0, 5, 5], "score": 0.5}]})
    )
    boxes = detector.load_boxes_json(p)
    assert detector.boxes_for(boxes, "/x/a.jpg")[0].box == (1, 2, 30, 40)
    assert detector.boxes_for(boxes, "dir/b.png")[0].score == 0.5
    assert detector.boxes_for(boxes, "c.jpg") is None
    p.write_text(json.dumps({"a.jpg": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="box 0 must be"):
        detector.load_boxes_json(p)


def _oracle_heatmaps(q: np.ndarray, size: int, sigma: float = 1.5) -> np.ndarray:
    """(K, 2) float heatmap points → (1, size, size, K) Gaussians centred exactly on them."""
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    g = np.exp(-((xs[..., None] - q[:, 0]) ** 2 + (ys[..., None] - q[:, 1]) ** 2) / (2 * sigma**2))
    return g[None].astype(np.float32)


@pytest.mark.parametrize("name", PHOTOS)
def test_oracle_heatmaps_round_trip(real_faces_dir, name):
    """Annotation → crop/heatmap geometry → oracle maps → decode → image, within quantisation.

    An isotropic Gaussian sampled on the grid peaks at the grid point nearest its centre, so
    the arg-max is off by ≤ 1/2 heatmap pixel per axis: ≤ (√2/2)·h/S_hm image pixels
    (h = 200·scale, no rotation). The crop uses the annotation's own box (the training
    geometry); detection boxes are covered by the test above.
    """
    pts = read_pts(real_faces_dir / (pathlib.Path(name).stem + ".pts"))
    box = detector.landmark_box(pts)
    center, scale = detector.box_to_center_scale(box, box_to_landmark_box=1.0, center_shift_y=0)
    s_hm = 64
    img = read_rgb(real_faces_dir / name)
    crop = transforms.crop_image(img, center, scale, 2 * s_hm)
    assert crop.shape[:2] == (2 * s_hm, 2 * s_hm)
    q = transforms.transform_points(pts, center, scale, s_hm, integer=False)
    maps = _oracle_heatmaps(q, s_hm)
    bound = math.sqrt(2) / 2 * 200 * scale / s_hm
    errors = {}
    for refine in decoding.REFINEMENTS:
        dec = np.asarray(decoding.decode_argmax(maps, refine))[0]
        back = transforms.inverse_transform_points(dec, center, scale, s_hm)
        errors[refine] = np.linalg.norm(back - pts, axis=-1)
    print(
        f"\n{name}: h/S_hm = {200 * scale / s_hm:.2f} px, bound {bound:.2f} px; mean error "
        + ", ".join(f"{k} {v.mean():.3f} px (max {v.max():.3f})" for k, v in errors.items())
    )
    assert errors["none"].max() <= bound + 1e-3
    assert errors["quarter"].mean() < errors["none"].mean()
    assert errors["dark"].mean() < 0.1 * errors["none"].mean()


def test_detect_cli_with_boxes(tmp_path, real_faces_dir):
    """scripts/detect.py on the tiny reference checkpoint with given boxes (no detector)."""
    ckpt = ROOT / "tests" / "fixtures" / "reference" / "tiny_checkpoint.pth"
    pts = read_pts(real_faces_dir / "takeo.pts")
    boxes = tmp_path / "boxes.json"
    boxes.write_text(
        json.dumps(
            {n: [list(detector.landmark_box(pts))] for n in ("takeo.ppm", "gray")} | {"blank": []}
        )
    )
    gray = tmp_path / "gray.png"
    cv2.imwrite(str(gray), cv2.imread(str(real_faces_dir / "takeo.ppm"), cv2.IMREAD_GRAYSCALE))
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), np.full((60, 80, 3), 127, np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "scripts" / "detect.py"),
        "--checkpoint",
        str(ckpt),
        "--config",
        str(ROOT / "configs" / "fgtbt.py") + ":reference_tiny",
        "--out",
        str(out),
        "--boxes",
        str(boxes),
        "--scheme",
        "300W",
        str(real_faces_dir / "takeo.ppm"),
        str(gray),
        str(blank),
        str(broken),
    ]
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=300, env=subprocess_env()
    )
    assert res.returncode == 0, res.stdout + res.stderr
    rec = json.loads((out / "takeo.json").read_text())
    assert rec["image"].endswith("takeo.ppm")
    (face,) = rec["faces"]
    assert face["scheme"] == "300W"
    assert np.asarray(face["landmarks_124"]).shape == (124, 2)
    assert np.asarray(face["landmarks"]).shape == (68, 2)
    assert (out / "takeo.png").stat().st_size > 0
    gray_rec = json.loads((out / "gray.json").read_text())
    assert np.asarray(gray_rec["faces"][0]["landmarks"]).shape == (68, 2)
    blank_rec = json.loads((out / "blank.json").read_text())
    assert blank_rec["faces"] == [] and "no face" in blank_rec.get("note", "")
    assert "broken.jpg" in res.stdout + res.stderr  # reported, the batch went on
    # A model widened to a scheme dataset (the demo MY19, 133 channels): --scheme MY19 gives
    # its 19 points; those it shares with the built-in datasets are read from the same channels
    # as the 124-channel model's (equal outputs at step 0), the 9 new ones from the new channels.
    from helpers import DEMO_SCHEME, wide_tiny_checkpoint

    _, unified, _ = wide_tiny_checkpoint(
        ROOT / "tests" / "fixtures" / "reference", tmp_path / "wide.pth"
    )
    datasets = ",".join(f'"{d}"' for d in unified.datasets)
    wide = [
        *cmd[:2],
        "--checkpoint", str(tmp_path / "wide.pth"),
        *cmd[4:6],
        f'--config.data.schemes=("{DEMO_SCHEME}",)',
        f"--config.data.datasets=({datasets})",
        "--out", str(out / "wide"),
        *cmd[8:10],
        "--scheme", "MY19",
        str(real_faces_dir / "takeo.ppm"),
    ]  # fmt: skip
    res = subprocess.run(
        wide, capture_output=True, text=True, cwd=ROOT, timeout=300, env=subprocess_env()
    )
    assert res.returncode == 0, res.stdout + res.stderr
    (my19,) = json.loads((out / "wide" / "takeo.json").read_text())["faces"]
    assert my19["scheme"] == "MY19"
    got = np.asarray(my19["landmarks"])
    assert got.shape == (19, 2)
    idx = unified.index_maps[unified.datasets.index("MY19")]
    shared = idx < 124
    assert shared.sum() == 10
    np.testing.assert_allclose(
        got[shared], np.asarray(face["landmarks_124"])[idx[shared]], atol=0.05
    )
    np.testing.assert_allclose(my19["landmarks_124"], face["landmarks_124"], atol=0.05)
    # an unknown scheme name is one error line
    bad = wide[:]
    bad[bad.index("--scheme") + 1] = "MY20"
    res = subprocess.run(
        bad, capture_output=True, text=True, cwd=ROOT, timeout=300, env=subprocess_env()
    )
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith(
        "error: --scheme MY20"
    )
