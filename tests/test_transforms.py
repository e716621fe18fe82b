"""Crop / landmark geometry against the reference (eval_and_transform_reference.npz)."""

from __future__ import annotations

import numpy as np
import pytest

from fgtbt_jax import landmarks, transforms


def _cases(eval_ref):
    cols = [str(c) for c in eval_ref["transform_cases_columns"]]
    return [dict(zip(cols, row, strict=True)) for row in eval_ref["transform_cases"]]


def test_transform_cases_exact(eval_ref):
    cases = _cases(eval_ref)
    assert len(cases) == 40
    assert any(c["rot_deg"] != 0 for c in cases)
    for i, c in enumerate(cases):
        args = ([c["pt_x"], c["pt_y"]], [c["center_x"], c["center_y"]], c["scale"])
        kw = dict(output_size=int(c["out_size"]), rot_deg=c["rot_deg"])
        f = transforms.transform_points(*args, **kw, integer=False)
        q = transforms.transform_points(*args, **kw, integer=True)
        np.testing.assert_array_equal(f, [c["float_x"], c["float_y"]], err_msg=f"case {i}")
        np.testing.assert_array_equal(q, [c["int_x"], c["int_y"]], err_msg=f"case {i}")


def test_transform_vectorised_and_inverse(eval_ref):
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 400, (7, 5, 2))
    for c in _cases(eval_ref)[:10]:
        center, scale = (c["center_x"], c["center_y"]), c["scale"]
        size, rot = int(c["out_size"]), c["rot_deg"]
        q = transforms.transform_points(pts, center, scale, size, rot, integer=False)
        assert q.shape == pts.shape
        one = transforms.transform_points(pts[3, 2], center, scale, size, rot, integer=False)
        np.testing.assert_allclose(q[3, 2], one, rtol=0, atol=1e-9)
        back = transforms.inverse_transform_points(q, center, scale, size, rot)
        np.testing.assert_allclose(back, pts, rtol=0, atol=1e-9)


@pytest.mark.parametrize("ds", landmarks.DATASETS)
def test_fliplr_exact(eval_ref, ds):
    out = transforms.fliplr_points(
        eval_ref[f"fliplr_{ds}_input_xy"], int(eval_ref[f"fliplr_{ds}_width"]), ds
    )
    np.testing.assert_array_equal(out, eval_ref[f"fliplr_{ds}_output_xy"])


def test_fliplr_scheme_is_the_mirrored_face_reannotated():
    from importlib import resources

    from fgtbt_jax import schemes

    scheme = schemes.load_scheme(
        str(resources.files("fgtbt_jax").joinpath("data/schemes/demo_my19.json"))
    )
    u = schemes.derive((scheme.name,), [scheme])
    face = np.random.default_rng(0).uniform(0, 100, (124, 2))  # the 124 unified points
    mirrored = face.copy()
    mirrored[:, 0] = 100 - mirrored[:, 0]
    mirrored = mirrored[landmarks.unified_flip_permutation()]  # built-in pairs only
    want = schemes.place_new_points(mirrored, u)[u.index_maps[0]]
    got = transforms.fliplr_points(schemes.place_new_points(face, u)[u.index_maps[0]], 100, scheme)
    np.testing.assert_allclose(got, want, atol=1e-12)
    assert transforms.uses_integer_transform(scheme)


def test_fliplr_bad_shape():
    with pytest.raises(ValueError, match="300W has 68 points"):
        transforms.fliplr_points(np.zeros((29, 2)), 100, "300W")


@pytest.mark.parametrize("ds", landmarks.DATASETS)
def test_eval_targets_and_map_back_exact(eval_ref, ds):
    """Quantized targets and the mapping back of targets and predictions (32² heatmaps)."""
    for i in range(2):
        center, scale = eval_ref[f"{ds}_center_xy"][i], eval_ref[f"{ds}_scale"][i]
        q = transforms.heatmap_target_points(
            eval_ref[f"{ds}_gt_original_xy"][i],
            center,
            scale,
            32,
            integer=transforms.uses_integer_transform(ds),
        )
        np.testing.assert_array_equal(q, eval_ref[f"{ds}_targets_heatmap_xy"][i])
        for src, dst in (
            ("targets_heatmap", "targets_original"),
            ("decoded_heatmap", "pred_original"),
        ):
            back = transforms.inverse_transform_points(
                eval_ref[f"{ds}_{src}_xy"][i], center, scale, 32, dtype=np.float32
            )
            np.testing.assert_array_equal(back.astype(np.float32), eval_ref[f"{ds}_{dst}_xy"][i])
            # the float64 variant differs only by float32 rounding of T's entries
            back64 = transforms.inverse_transform_points(
                eval_ref[f"{ds}_{src}_xy"][i], center, scale, 32
            )
            np.testing.assert_allclose(back64, back, rtol=0, atol=1e-3)


def _reference_crop_position(u, center, scale, size):
    """Where the reference's crop (integer corners + centre-aligned resize) puts index u."""
    t_inv = np.linalg.inv(transforms.get_transform(center, scale, size))
    ul = np.trunc(t_inv[:2, :2] @ [-1.0, -1.0] + t_inv[:2, 2]) + 1
    br = np.trunc(t_inv[:2, :2] @ [size - 1.0, size - 1.0] + t_inv[:2, 2]) + 1
    return (u - ul + 0.5) * size / (br - ul) - 0.5


def test_crop_affine_matches_reference_crop_on_average():
    rng = np.random.default_rng(1)
    diffs = []
    size = 480
    for _ in range(2000):
        center = rng.uniform(150, 350, 2)
        scale = rng.uniform(0.8, 2.0)
        u = center + rng.uniform(-60, 60, 2)
        m = transforms.crop_affine(center, scale, size)
        ours = m[:, :2] @ u + m[:, 2]
        diffs.append((ours - _reference_crop_position(u, center, scale, size)) / (m[0, 0]))
    diffs = np.asarray(diffs)  # in source pixels
    assert np.abs(diffs.mean(0)).max() < 0.05
    assert np.abs(diffs).max() < 1.1  # corner truncation: within one source pixel


def test_crop_affine_heatmap_relation():
    """Crop index i and heatmap index q of the same image point: i = 2q - 1.5 (rotation too)."""
    rng = np.random.default_rng(2)
    for _ in range(20):
        center, scale, rot = rng.uniform(100, 300, 2), rng.uniform(0.5, 2.5), rng.uniform(-30, 30)
        p = rng.uniform(0, 400, (5, 2))
        q = transforms.transform_points(p, center, scale, 240, rot, integer=False)
        m = transforms.crop_affine(center, scale, 480, rot)
        np.testing.assert_allclose(p @ m[:, :2].T + m[:, 2], 2 * q - 1.5, atol=1e-9)


@pytest.mark.parametrize("scale, rot", [(1.0, 0.0), (0.6, 20.0), (6.0, -15.0)])
def test_crop_image_puts_pixels_where_the_affine_says(scale, rot):
    """A bright blob in the image ends up where crop_affine maps its centre (also downscaled)."""
    img = np.zeros((1200, 1300, 3), np.float32)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    blob = (517.0, 603.0)  # (x, y) array-index coordinates
    sigma = 3.0 * scale
    img[..., 1] = np.exp(-((xx - blob[0]) ** 2 + (yy - blob[1]) ** 2) / (2 * sigma**2))
    center = (560.0, 640.0)
    size = 64
    crop = transforms.crop_image(img, center, scale, size, rot)
    assert crop.shape == (size, size, 3) and crop.dtype == np.float32
    assert crop[..., 0].max() == 0.0
    g = crop[..., 1]
    ys, xs = np.mgrid[:size, :size]
    w = np.where(g > 0.05 * g.max(), g, 0.0)
    found = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
    m = transforms.crop_affine(center, scale, size, rot)
    expect = m[:, :2] @ blob + m[:, 2]
    np.testing.assert_allclose(found, expect, atol=0.15)


def test_bad_inputs():
    with pytest.raises(ValueError, match="scale must be positive"):
        transforms.get_transform((0, 0), 0.0, 64)
    with pytest.raises(ValueError, match="center_xy"):
        transforms.get_transform((0, 0, 0), 1.0, 64)
    with pytest.raises(ValueError, match="unknown dataset"):
        transforms.uses_integer_transform("XYZ")


def test_imagenet_normalize_bits():
    """The one normalization keeps each former call site's bits: float32 arithmetic on uint8
    levels (inference crops, the model helper) and on [0, 1] values (synthetic data), float64
    on float32 constants (the input pipeline's look-up table)."""
    import jax.numpy as jnp

    mean = np.asarray(transforms.IMAGENET_MEAN, np.float32)
    std = np.asarray(transforms.IMAGENET_STD, np.float32)
    u8 = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    want = (u8.astype(np.float32) / np.float32(255) - mean) / std
    # XLA may round differently from NumPy (it compiles the division): compare like with like.
    want_jnp = (jnp.asarray(u8, jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)
    for got, ref in (
        (transforms.imagenet_normalize(u8), want),
        (transforms.imagenet_normalize(u8, xp=jnp), want_jnp),
    ):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(
            np.asarray(got).view(np.uint32), np.asarray(ref).view(np.uint32)
        )
    unit = u8.astype(np.float32) / np.float32(255)
    got = transforms.imagenet_normalize(unit, scale=1.0)
    np.testing.assert_array_equal(got.view(np.uint32), ((unit - mean) / std).view(np.uint32))
    levels = np.arange(256.0)[:, None]
    want64 = (levels / 255.0 - mean.astype(np.float64)) / std.astype(np.float64)
    got64 = transforms.imagenet_normalize(levels, dtype=np.float64)
    assert got64.dtype == np.float64
    np.testing.assert_array_equal(got64.view(np.uint64), want64.view(np.uint64))
