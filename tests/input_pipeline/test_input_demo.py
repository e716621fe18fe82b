"""The synthetic face generator: landmark semantics, symmetry, pixels, speed, determinism."""

from __future__ import annotations

import numpy as np

from fgtbt_jax import landmarks
from input_pipeline import demo_faces


def _frontal(**kw) -> demo_faces.FaceParams:
    return demo_faces.FaceParams(**kw)


def test_slots_mirror_like_the_dataset_flip_pairs():
    # A symmetric face mirrored (x → −x) must equal the face with every unified landmark
    # replaced by its mirror partner, as given by the datasets' flip pairs (landmarks.json).
    p = _frontal(smile=0.4, mouth_open=0.15, gaze=(0.0, 0.3))
    pts = demo_faces.unified_points_3d(p)
    mirrored = pts * np.array([-1.0, 1.0, 1.0])
    np.testing.assert_allclose(mirrored, pts[landmarks.unified_flip_permutation()], atol=1e-12)
    assert len({tuple(np.round(q, 9)) for q in pts}) == 124  # all distinct
    # shared landmarks: WFLW and 300W agree exactly on the chin, brows and lips
    w, t = landmarks.unified_index("WFLW"), landmarks.unified_index("300W")
    np.testing.assert_array_equal(pts[w[16]], pts[t[8]])


def test_300w_semantics_of_a_frontal_face():
    # 68-point iBUG markup facts (image coordinates, y down), independent of the slot table.
    pts = demo_faces.unified_points_3d(_frontal(mouth_open=0.1))[landmarks.unified_index("300W")]
    x, y = pts[:, 0], pts[:, 1]
    assert np.all(np.diff(x[0:9]) > 0) and np.all(np.diff(x[8:17]) > 0)  # jaw left → right
    assert np.argmax(y[0:17]) == 8  # chin lowest
    assert np.all(np.diff(x[17:22]) > 0) and np.all(np.diff(x[22:27]) > 0)  # brows
    assert np.all(np.diff(y[27:31]) > 0)  # bridge goes down to the tip (30)
    assert y[30] < y[33] < y[51] < y[57] < y[8]  # tip, subnasale, lips, chin
    assert x[36] < x[39] < x[42] < x[45]  # eye corners: outer/inner left, inner/outer right
    assert y[37] < y[41] and y[38] < y[40] and y[43] < y[47] and y[44] < y[46]  # lids
    assert x[48] < x[60] < x[64] < x[54]  # outer then inner mouth corners
    assert y[51] < y[62] < y[66] < y[57]  # upper lip top, inner upper, inner lower, bottom
    assert np.all(y[17:27] < y[36:48].min())  # brows above the eyes


def test_pupils_are_dark_and_sclera_bright():
    # The pupil landmark must fall on the drawn pupil; a point on the line to the outer eye
    # corner, past the iris, on the white of the eye.
    for i in range(12):
        rng = np.random.default_rng([7, i])
        p = demo_faces.sample_params(rng)
        p.eye_open, p.gaze, p.yaw = (1.0, 1.0), (0.0, 0.0), 0.5 * p.yaw
        face = demo_faces.render_face(rng, params=p, occluder_prob=0.0, size=(256, 256))
        lum = face.image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        margin = 0.0 if face.attributes["blur"] else 15.0
        for pupil, corner in ((122, 78), (123, 96)):
            if face.occluded[pupil]:  # under a hair fringe
                continue
            c = face.points[pupil] - 0.5  # annotation → array index
            s = c + 0.6 * (face.points[corner] - 0.5 - c)
            pc, ps = np.round(c).astype(int), np.round(s).astype(int)
            assert lum[pc[1], pc[0]] + margin < lum[ps[1], ps[0]], (i, pupil)


def test_generator_is_deterministic_and_varied():
    faces = [demo_faces.render_face(np.random.default_rng([3, i])) for i in range(20)]
    again = demo_faces.render_face(np.random.default_rng([3, 5]))
    np.testing.assert_array_equal(again.image, faces[5].image)
    np.testing.assert_array_equal(again.points, faces[5].points)
    for f in faces:
        h, w = f.image.shape[:2]
        assert 160 <= h <= 256 and 160 <= w <= 256 and f.image.dtype == np.uint8
        assert np.all(f.points > -w) and np.all(f.points < 2 * w)
    yaws = [f.params.yaw for f in faces]
    assert max(yaws) - min(yaws) > 20
    assert any(f.occluded.any() for f in faces)


def test_forced_wflw_attributes():
    for attr in ("largepose", "expression", "illumination", "occlusion", "blur", "makeup"):
        face = demo_faces.render_face(np.random.default_rng([9, len(attr)]), force=attr)
        assert face.attributes[attr], attr


def test_scheme_demo_set_reannotates_the_faces(tmp_path):
    from importlib import resources

    from fgtbt_jax import schemes
    from input_pipeline import demo, formats

    scheme = schemes.load_scheme(
        str(resources.files("fgtbt_jax").joinpath("data/schemes/demo_my19.json"))
    )
    out = demo.write_scheme(tmp_path, scheme, 2, 1, image_size=(64, 64))
    u300, uw = landmarks.unified_index("300W"), landmarks.unified_index("WFLW")
    for split, n in (("train", 2), ("test", 1)):
        files = sorted((tmp_path / split).glob("*.pts"))
        assert len(files) == n and all(f.with_suffix(".png").exists() for f in files)
        for face, f in zip(out.splits[split], files, strict=True):
            pts, u = formats.read_pts(f), face.points
            assert pts.shape == (19, 2)
            np.testing.assert_allclose(pts[0], u[u300[36]], atol=1e-3)
            np.testing.assert_allclose(pts[5], u[uw[97]], atol=1e-3)
            # new points: the midpoints their notes name (right_cheek: 300W 3 and 31)
            np.testing.assert_allclose(pts[10], (u[u300[3]] + u[u300[31]]) / 2, atol=1e-3)
            np.testing.assert_allclose(pts[18], (u[u300[21]] + u[u300[22]]) / 2, atol=1e-3)
