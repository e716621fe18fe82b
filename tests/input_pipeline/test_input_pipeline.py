"""Training/evaluation pipelines: geometry (coloured dots), interleaving, determinism, resume."""

from __future__ import annotations

import colorsys
import math
import os

import cv2
import numpy as np
import pytest

pytest.importorskip("tensorflow")

from configs import fgtbt  # noqa: E402
from fgtbt_jax import landmarks  # noqa: E402
from input_pipeline import builders, formats, pipeline  # noqa: E402

ORDER = np.repeat(np.arange(4, dtype=np.int32), 2)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    c = fgtbt.get_config("tiny")
    c.img_size, c.heatmap_size = 32, 16
    c.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    c.data.demo_num_images = 6
    c.data.batch_per_dataset = 2
    pipeline.ensure_demo_data(c)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Geometry: coloured dots at the landmarks


def _palette(n):
    return np.array([colorsys.hsv_to_rgb(i / n, 1.0, 1.0) for i in range(n)]) * 255


def _dot_image(points, h, w):
    """Black image with a 3×3 dot of a distinct hue at each point (annotation = index + ½)."""
    img = np.zeros((h, w, 3), np.uint8)
    for (x, y), col in zip(points, _palette(len(points)), strict=True):
        u, v = int(x - 0.5), int(y - 0.5)
        img[v - 1 : v + 2, u - 1 : u + 2] = np.round(col)
    return img


def _centroids(image_rgb, n):
    """Intensity-weighted centroid (x, y) of every hue in the (crop) image, by nearest hue."""
    img = image_rgb.astype(np.float64)
    inten = np.linalg.norm(img, axis=-1)
    pal = _palette(n)
    pal /= np.linalg.norm(pal, axis=1, keepdims=True)
    cls = np.argmax(img @ pal.T, axis=-1)
    on = inten > 0.15 * inten.max()
    ys, xs = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    out = np.full((n, 2), np.nan)
    for k in range(n):
        m = on & (cls == k)
        if m.any():
            wgt = inten[m]
            out[k] = [np.sum(xs[m] * wgt) / wgt.sum(), np.sum(ys[m] * wgt) / wgt.sum()]
    return out


def _spec_transform(center, scale, size, rot_deg):
    """SPEC §4's T (2×3), written out here independently of fgtbt_jax.transforms."""
    h = 200.0 * scale
    s = size / h
    t = np.array([[s, 0, size * (-center[0] / h + 0.5)], [0, s, size * (-center[1] / h + 0.5)]])
    if rot_deg == 0:  # "composed, when rotating, with …"
        return t
    a = math.radians(-rot_deg)
    r = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    lin = r @ t[:, :2]
    off = r @ (t[:, 2] - size / 2) + size / 2
    return np.concatenate([lin, off[:, None]], axis=1)


def _aflw_points(rng):
    # AFLW-like layout (19 points, ≥ 9 px apart) inside a 70-px face at (100, 90).
    base = np.array(
        [[-28, -22], [-18, -26], [-8, -22], [8, -22], [18, -26], [28, -22],
         [-24, -10], [-16, -10], [-8, -10], [8, -10], [16, -10], [24, -10],
         [-10, 8], [0, 4], [10, 8], [-14, 20], [0, 22], [14, 20], [0, 34]], float
    )  # fmt: skip
    return np.round(base + rng.uniform(-1, 1, base.shape)) + [100.5, 90.5]


@pytest.mark.parametrize("rot, flip", [(25.0, True), (-17.0, False), (0.0, True), (30.0, False)])
def test_coloured_dots_land_on_the_transformed_landmarks(rot, flip):
    rng = np.random.default_rng(int(rot) + 100 + 100 * flip)
    pts = _aflw_points(rng)
    w, h = 200, 170
    image = _dot_image(pts, h, w)
    center, scale = np.array([100.0, 96.0]), 0.36  # crop box 90 px → ×1.07 at 96²
    out = pipeline.train_example(
        image, pts, center, scale, "AFLW", scale_mult=1.0, rot_deg=rot, flip=flip,
        img_size=96, heatmap_size=48,
    )  # fmt: skip
    crop = np.clip((out["image"] * pipeline.STD + pipeline.MEAN) * 255, 0, 255)
    found = _centroids(crop, len(pts))

    # Expected: the flip mirrors x → W − x and swaps the symmetric pairs, then T at the crop
    # size; the dot at array index u lands at crop index T·u + ½ (crop_affine's convention).
    perm = landmarks.flip_permutation("AFLW") if flip else np.arange(19)
    p_new = pts[perm].copy()
    c_new = center.copy()
    if flip:
        p_new[:, 0] = w - p_new[:, 0]
        c_new[0] = w - c_new[0]
    s_eff = scale * 1.25
    t_in = _spec_transform(c_new, s_eff, 96, rot)
    expected = (p_new - 0.5) @ t_in[:, :2].T + t_in[:, 2] + 0.5
    err = np.linalg.norm(found[perm] - expected, axis=1)
    assert np.all(err < 1.0), err.max()

    # The integer heatmap targets: trunc(T·p) + 1 at 48², in AFLW's unified slots.
    t_hm = _spec_transform(c_new, s_eff, 48, rot)
    q = np.trunc(np.trunc(p_new @ t_hm[:, :2].T + t_hm[:, 2]) + 1).astype(np.int32)
    uidx = landmarks.unified_index("AFLW")
    np.testing.assert_array_equal(out["coords"][uidx], q)
    assert out["mask"].sum() == 19 and out["mask"][uidx].all()
    assert np.all(out["coords"][~out["mask"]] == 0) and out["dataset_id"] == 3


def test_dots_through_the_tfds_pipeline(tmp_path):
    # End to end (official AFLW files → TFDS → tf.data): every batch's targets sit on the dots.
    rng = np.random.default_rng(5)
    (tmp_path / "manual" / "images").mkdir(parents=True)
    recs = []
    for i in range(3):
        pts = _aflw_points(rng)
        cv2.imwrite(str(tmp_path / "manual" / "images" / f"d{i}.png"),
                    cv2.cvtColor(_dot_image(pts, 170, 200), cv2.COLOR_RGB2BGR))  # fmt: skip
        recs.append(formats.FaceRecord(f"d{i}.png", pts, np.array([100.0, 96.0]), 0.36, "", 0))
    for split in ("train", "test"):
        formats.write_aflw_csv(tmp_path / "manual" / f"face_landmarks_aflw_{split}.csv", recs)
    builders.prepare("aflw", data_dir=tmp_path / "tfds", manual_dir=tmp_path / "manual")
    c = fgtbt.get_config("tiny")
    c.img_size, c.heatmap_size = 96, 48
    c.data.source, c.data.data_dir, c.data.datasets = "official", str(tmp_path / "tfds"), ("AFLW",)
    c.data.flip_prob, c.data.rotation_prob, c.data.scale_range = 1.0, 1.0, (0.9, 1.1)
    uidx = landmarks.unified_index("AFLW")
    perm = landmarks.flip_permutation("AFLW")  # always flipped: slot j shows dot perm[j]
    for batch in _take(pipeline.make_train_iterator(c, variant="official", seed=3), 2):
        assert batch["image"].shape == (2, 96, 96, 3) and list(batch["dataset_id"]) == [3, 3]
        for img, coords in zip(batch["image"], batch["coords"], strict=True):
            found = _centroids(np.clip((img * pipeline.STD + pipeline.MEAN) * 255, 0, 255), 19)
            # dot at crop index i ⇒ heatmap T·p = (i − ½ + s·R(½, ½)) / 2, |s·R(½,½)| ≤ 0.71·s
            tp = (found[perm] - 0.5) / 2
            s_in = 96 / (200 * 0.36 * 1.25 * 0.9)
            q = coords[uidx] - 1  # = trunc(T·p)
            assert np.all(q <= tp + 0.36 * s_in + 0.1) and np.all(q > tp - 0.36 * s_in - 1.1)


# ---------------------------------------------------------------------------------------------
# Interleaving, determinism, resumption, sharding


def test_every_batch_has_exact_counts_and_order(config):
    mask = landmarks.annotation_mask()
    for b in _take(pipeline.make_train_iterator(config, variant="demo", seed=0), 25):
        assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.float32
        assert b["coords"].shape == (8, 124, 2) and b["coords"].dtype == np.int32
        np.testing.assert_array_equal(b["dataset_id"], ORDER)
        np.testing.assert_array_equal(b["mask"], mask[ORDER])
        assert np.all(b["coords"][~b["mask"]] == 0)
        assert np.abs(b["image"].mean()) < 3 and b["image"].std() > 0.1


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_deterministic_and_resumable(config):
    first = _take(pipeline.make_train_iterator(config, variant="demo", seed=7), 6)
    _same(first, _take(pipeline.make_train_iterator(config, variant="demo", seed=7), 6))
    _same(
        first[4:],
        _take(pipeline.make_train_iterator(config, variant="demo", seed=7, start_step=4), 2),
    )
    other = next(pipeline.make_train_iterator(config, variant="demo", seed=8))
    assert not np.array_equal(other["image"], first[0]["image"])


def test_processes_share_the_global_batch(config):
    single = _take(pipeline.make_train_iterator(config, variant="demo", seed=1), 3)
    parts = [
        _take(
            pipeline.make_train_iterator(
                config, variant="demo", seed=1, process_index=p, process_count=2
            ),
            3,
        )
        for p in range(2)
    ]
    for t in range(3):
        for p in range(2):  # process p holds sample p of every dataset
            for k in single[t]:
                np.testing.assert_array_equal(parts[p][t][k], single[t][k][p::2], err_msg=k)
    with pytest.raises(ValueError, match="divisible"):
        pipeline.make_train_iterator(config, variant="demo", seed=1, process_count=3)


def test_each_epoch_visits_every_record_once(config):
    plan = pipeline._TrainPlan(config, {d: 6 for d in landmarks.DATASETS}, 0, 0, 1)
    # COFW's 2 samples per step: steps 0–2 are epoch 0, steps 3–5 epoch 1
    recs = [plan.element(i)[1] for step in range(6) for i in (8 * step, 8 * step + 1)]
    assert sorted(recs[:6]) == list(range(6)) and sorted(recs[6:]) == list(range(6))
    assert recs[:6] != recs[6:]


def test_weighted_sampling(config):
    c = config.copy_and_resolve_references()
    c.data.sampling, c.data.weights = "weighted", (1.0, 0.0, 0.0, 3.0)
    batches = _take(pipeline.make_train_iterator(c, variant="demo", seed=0), 6)
    ids = np.concatenate([b["dataset_id"] for b in batches])
    assert set(ids) <= {0, 3} and (ids == 3).sum() > (ids == 0).sum()
    for b in batches:
        assert np.all(np.diff(b["dataset_id"]) >= 0) and len(b["dataset_id"]) == 8
    _same(
        batches[2:4],
        _take(pipeline.make_train_iterator(c, variant="demo", seed=0, start_step=2), 2),
    )


def test_a_scheme_dataset_keeps_the_built_in_streams_and_weights(config):
    from importlib import resources

    c = config.copy_and_resolve_references()
    c.data.schemes = (str(resources.files("fgtbt_jax").joinpath("data/schemes/demo_my19.json")),)
    c.data.datasets = ("MY19", *landmarks.DATASETS)
    sizes = {d: 6 for d in (*landmarks.DATASETS, "MY19")}
    four = pipeline._TrainPlan(config, sizes, 0, 0, 1)
    five = pipeline._TrainPlan(c, sizes, 0, 0, 1)
    assert five.datasets == [*landmarks.DATASETS, "MY19"] and five.batch == 10
    for step in range(4):
        for j in range(8):  # the built-in slots: same records and augmentation streams
            d, rec, rng = four.element(8 * step + j)
            d5, rec5, rng5 = five.element(10 * step + j)
            assert (d, rec, rng.random()) == (d5, rec5, rng5.random())
        assert five.element(10 * step + 8)[0] == "MY19"
    c.data.sampling = "weighted"
    c.data.weights = (2.0, 1.0, 1.0, 0.0, 0.0)  # config.data.datasets order: MY19 first
    np.testing.assert_allclose(
        pipeline._TrainPlan(c, sizes, 0, 0, 1).weights, [0.25, 0.25, 0, 0, 0.5]
    )
    c.data.weights = (0.25, 0.25, 0.25, 0.25)
    with pytest.raises(ValueError, match="one entry per dataset of config.data.datasets"):
        pipeline._TrainPlan(c, sizes, 0, 0, 1)


# ---------------------------------------------------------------------------------------------
# Evaluation


def test_eval_subsets_sizes_padding_and_points(config):
    assert pipeline.list_eval_subsets("300W") == ("full", "common", "challenging")
    assert pipeline.list_eval_subsets("wflw")[1:] == formats.WFLW_ATTRIBUTES
    n = {
        s: pipeline.eval_size(config, "300W", s, variant="demo")
        for s in ("full", "common", "challenging")
    }
    assert n["full"] == n["common"] + n["challenging"] == 6 + 4
    batches = list(pipeline.make_eval_iterator(config, "300W", "full", 4, variant="demo"))
    assert len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    assert valid.sum() == 10 and not valid[10:].any()
    b0 = batches[0]
    assert b0["image"].shape == (4, 32, 32, 3) and b0["image_id"][0].startswith("lfpw/testset/")
    assert set(b0["dataset_id"]) == {2}
    # points: the file's annotation in the 300W slots; scale is the crop scale (× 1.25)
    source = builders.get_builder("300W", config.data.data_dir, "demo").as_data_source
    rec = source("test_common")[0]
    np.testing.assert_allclose(b0["points"][0][landmarks.unified_index("300W")],
                               rec["landmarks"], rtol=1e-6)  # fmt: skip
    assert b0["scale"][0] == pytest.approx(rec["scale"] * 1.25)
    np.testing.assert_allclose(b0["center"][0], rec["center"], rtol=1e-6)
    assert not batches[-1]["mask"][~batches[-1]["valid"]].any()
    # WFLW attribute subsets follow the flags; AFLW carries its box size
    for attr in formats.WFLW_ATTRIBUTES:
        assert pipeline.eval_size(config, "WFLW", attr, variant="demo") >= 1
    a = next(pipeline.make_eval_iterator(config, "AFLW", "full", 2, variant="demo"))
    assert np.all(a["box_size"] > 0)
    # two processes deal the one-process batches round-robin and run the same number of batches
    p = [
        list(pipeline.make_eval_iterator(config, "300W", "full", 4, variant="demo",
                                         process_index=i, process_count=2))
        for i in range(2)
    ]  # fmt: skip
    assert len(p[0]) == len(p[1]) == 2

    def valid_ids(bs):
        return sorted(i for b in bs for i in b["image_id"][b["valid"]])

    assert valid_ids(p[0] + p[1]) == valid_ids(batches)


def test_normalize_is_imagenet():
    img = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    out = pipeline.normalize(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, (img / 255.0 - mean) / std, rtol=0, atol=1e-6)


def test_tensorflow_sees_no_accelerator():
    import tensorflow as tf

    assert tf.config.get_visible_devices("GPU") == []


def test_ensure_demo_data_is_idempotent(config):
    b = builders.get_builder("COFW", config.data.data_dir, "demo")
    info = os.path.join(b.data_dir, "dataset_info.json")
    stamp = os.stat(info).st_mtime_ns
    pipeline.ensure_demo_data(config)
    assert os.stat(info).st_mtime_ns == stamp
