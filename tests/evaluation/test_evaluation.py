"""Flip test, decoding, mapping back and NME against the reference (SPEC §5)."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fgtbt_jax import landmarks, schemes, transforms
from fgtbt_jax.evaluation import decoding, metrics, reports

DS = landmarks.DATASETS


def _nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def _flip_averaged(eval_ref, ds):
    return decoding.flip_average(
        _nhwc(eval_ref[f"{ds}_heatmaps_nchw"]),
        _nhwc(eval_ref[f"{ds}_heatmaps_flipped_input_nchw"]),
        ds,
    )


@pytest.mark.parametrize("ds", DS)
def test_decode_flip_averaged_exact(eval_ref, ds):
    xy = np.asarray(decoding.decode_argmax(_flip_averaged(eval_ref, ds)))
    assert xy.dtype == np.float32
    np.testing.assert_array_equal(xy, eval_ref[f"{ds}_decoded_heatmap_xy"])


@pytest.mark.parametrize("ds", DS)
def test_map_back_and_nme_exact(eval_ref, ds):
    """Unified-slot batch → Accumulator reproduces predictions, targets and NME bit for bit."""
    b = 2
    idx = landmarks.unified_index(ds)
    decoded = np.zeros((b, landmarks.NUM_UNIFIED, 2), np.float32)
    decoded[:, idx] = eval_ref[f"{ds}_decoded_heatmap_xy"]
    points = np.full((b, landmarks.NUM_UNIFIED, 2), np.nan, np.float32)
    points[:, idx] = eval_ref[f"{ds}_gt_original_xy"]
    batch = {
        "dataset_id": np.full(b, landmarks.DATASET_ID[ds]),
        "points": points,
        "mask": np.repeat(landmarks.annotation_mask()[[landmarks.DATASET_ID[ds]]], b, 0),
        "center": eval_ref[f"{ds}_center_xy"],
        "scale": eval_ref[f"{ds}_scale"],
        "box_size": eval_ref[f"{ds}_box_size"],
        "image_id": np.array([b"a", b"b"]),
    }
    acc = metrics.Accumulator()
    acc.add(decoded, batch, heatmap_size=32)
    for i, rec in enumerate(acc.records):
        np.testing.assert_array_equal(rec["pred_xy"], eval_ref[f"{ds}_pred_original_xy"][i])
        ref = rec["reference"]
        assert ref["nme_inter_ocular"] == eval_ref[f"{ds}_nme_io_per_image"][i]
        assert ref["nme_inter_pupil"] == eval_ref[f"{ds}_nme_ip_per_image"][i]
    targets = metrics.reference_targets(
        eval_ref[f"{ds}_gt_original_xy"][1],
        eval_ref[f"{ds}_center_xy"][1],
        eval_ref[f"{ds}_scale"][1],
        32,
        ds,
    )
    np.testing.assert_array_equal(targets, eval_ref[f"{ds}_targets_original_xy"][1])
    report = acc.report()
    m = report["metrics"]["reference"][ds]["full"]
    assert m["count"] == 2 and m["protocol"] == "reference"
    assert m["fr_0.1_count"] == int(eval_ref[f"{ds}_fr010_count"])
    np.testing.assert_allclose(m["nme_inter_pupil"], eval_ref[f"{ds}_nme_ip_per_image"].mean())
    assert set(report["metrics"]) == {"reference", "standard"}
    # the standard protocol is measured against the annotation itself: errors differ
    std = [r["standard"]["nme_inter_ocular"] for r in acc.records]
    assert not np.allclose(std, eval_ref[f"{ds}_nme_io_per_image"], rtol=0, atol=1e-6)


def test_standard_nme_by_hand():
    """300W: one point off by (3, 4) px, outer eye corners 100 px apart → NME io = 5/100/68."""
    gt = np.zeros((68, 2), np.float32)
    gt[:, 0] = np.arange(68) * 3.0
    gt[36:42, 1] = 50.0
    gt[42:48, 1] = 50.0
    gt[36:42, 0] = [0, 1, 2, 3, 4, 5]  # mean x 2.5
    gt[42:48, 0] = [95, 96, 97, 100, 98, 99]  # mean x 97.5, gt[45] = 100
    pred = gt.copy()
    pred[10] += (3.0, 4.0)
    io, ip = metrics.nme_per_image(pred, gt, "300W")
    np.testing.assert_allclose(io, 5 / 100 / 68, rtol=1e-6)
    np.testing.assert_allclose(ip, 5 / 95 / 68, rtol=1e-6)
    mask = np.ones(68, bool)
    mask[:34] = False  # the shifted point no longer counts
    assert metrics.nme_per_image(pred, gt, "300W", mask=mask) == (0.0, 0.0)
    with pytest.raises(ValueError, match="AFLW needs a positive box_size"):
        metrics.nme_per_image(np.zeros((19, 2)), np.zeros((19, 2)), "AFLW")


def test_failure_rate_ced_auc():
    nme = np.array([0.02, 0.05, 0.2])
    assert metrics.failure_rate(nme, 0.1) == (1, pytest.approx(1 / 3))
    t, f = metrics.ced_curve(nme, 0.1, 11)
    np.testing.assert_allclose(t, np.linspace(0, 0.1, 11))
    np.testing.assert_allclose(
        f, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3]
    )
    # AUC of a step CED: Σ (0.1 − e) over images with e < 0.1, / (0.1 · n)
    assert metrics.auc(nme, 0.1) == pytest.approx((0.08 + 0.05) / 0.3, abs=1e-4)
    assert metrics.auc(np.zeros(5)) == pytest.approx(1.0, abs=1e-4)


def _gaussian_maps(points_xy, size, sigma=2.0):
    """(K, 2) float points → (1, size, size, K) Gaussian maps peaked at the points."""
    ys, xs = np.mgrid[:size, :size].astype(np.float64)
    p = np.asarray(points_xy, np.float64)
    g = np.exp(-((xs[..., None] - p[:, 0]) ** 2 + (ys[..., None] - p[:, 1]) ** 2) / (2 * sigma**2))
    return g[None].astype(np.float32)


def test_decode_refinements_on_subpixel_gaussians():
    rng = np.random.default_rng(0)
    pts = rng.uniform(3, 28, (40, 2))
    maps = _gaussian_maps(pts, 32)
    err = {}
    for refine in decoding.REFINEMENTS:
        xy = np.asarray(decoding.decode_argmax(maps, refine))[0]
        err[refine] = np.linalg.norm(xy - pts, axis=-1)
    assert np.all(np.abs(np.asarray(decoding.decode_argmax(maps))[0] - pts) <= 0.5 + 1e-6)
    assert err["quarter"].mean() < err["none"].mean()
    assert err["dark"].max() < 1e-3  # log of a Gaussian is quadratic: the Taylor step is exact
    smoothed = np.asarray(decoding.decode_argmax(maps, "dark", dark_sigma=1.0))[0]
    assert np.linalg.norm(smoothed - pts, axis=-1).mean() < err["none"].mean()


def test_decode_border_and_ties():
    maps = np.zeros((1, 8, 8, 3), np.float32)
    maps[0, 0, 7, 0] = 1.0  # corner: no neighbours on one side → no refinement
    maps[0, 3, 2, 1] = maps[0, 3, 5, 1] = 1.0  # tie → first in row-major order
    maps[0, 6, 4, 2] = 1.0
    maps[0, 6, 5, 2] = 0.5
    for refine in decoding.REFINEMENTS:
        xy = np.asarray(decoding.decode_argmax(maps, refine))[0]
        np.testing.assert_array_equal(xy[:2], [[7, 0], [2, 3]])
    np.testing.assert_array_equal(
        np.asarray(decoding.decode_argmax(maps, "quarter"))[0, 2], [4.25, 6]
    )
    with pytest.raises(ValueError, match="refine"):
        decoding.decode_argmax(maps, "bogus")


def test_flip_back_is_an_involution_and_swaps_pairs():
    rng = np.random.default_rng(0)
    h = rng.normal(size=(2, 5, 6, 124)).astype(np.float32)
    np.testing.assert_array_equal(decoding.flip_back(decoding.flip_back(h)), h)
    perm = landmarks.unified_flip_permutation()
    j = int(np.flatnonzero(perm != np.arange(124))[0])
    np.testing.assert_array_equal(np.asarray(decoding.flip_back(h))[:, :, ::-1, perm[j]], h[..., j])
    with pytest.raises(ValueError, match="channels"):
        decoding.flip_back(h[..., :29], "300W")


class _FakeModel:
    """heatmaps[..., j] = w_j · (2×2 average of the red channel): mirror-equivariant maps."""

    def apply(self, variables, images, train=False):
        assert not train
        b, s, _, _ = images.shape
        r = images[..., 0].reshape(b, s // 2, 2, s // 2, 2).mean((2, 4))
        return r[..., None] * variables["w"]


def test_make_eval_step_flip():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 16, 16, 3)).astype(np.float32)
    w = jnp.asarray(rng.uniform(0.5, 1.5, 124), jnp.float32)
    step = jax.jit(decoding.make_eval_step(_FakeModel(), flip_test=True))
    out = step({"w": w}, {"image": jnp.asarray(images)})
    base = images[..., 0].reshape(3, 8, 2, 8, 2).mean((2, 4))
    perm = landmarks.unified_flip_permutation()
    # the mirrored pass sees the mirrored image; its maps mirrored back equal the original
    # ones with the partner channel's weight
    expect = base[..., None] * (np.asarray(w) + np.asarray(w)[perm]) / 2
    np.testing.assert_allclose(np.asarray(out["heatmaps"]), expect, rtol=1e-5, atol=1e-6)
    assert out["points"].shape == (3, 124, 2)
    predict = decoding.make_predict_fn(_FakeModel(), flip_test=True, refine="quarter")
    out2 = predict({"w": w}, {"image": images})
    np.testing.assert_allclose(np.asarray(out2["heatmaps"]), expect, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(out2["points"]),
        np.asarray(decoding.decode_argmax(out2["heatmaps"], "quarter")),
    )
    no_flip = decoding.make_eval_step(_FakeModel(), flip_test=False)({"w": w}, {"image": images})
    np.testing.assert_allclose(
        np.asarray(no_flip["heatmaps"]), base[..., None] * np.asarray(w), rtol=1e-6
    )


def test_evaluate_and_write_report(tmp_path):
    """End to end with a fake model whose maps peak exactly at the quantized targets."""
    rng = np.random.default_rng(2)
    size, hm = 16, 8
    batches = []
    for ds_id, ds in enumerate(DS[:3]):
        idx = landmarks.unified_index(ds)
        n = 2
        points = np.zeros((n, 124, 2), np.float32)
        points[:, idx] = rng.uniform(80, 120, (n, idx.size, 2))
        batches.append(
            {
                "image": np.zeros((n, size, size, 3), np.float32),
                "dataset_id": np.full(n, ds_id),
                "points": points,
                "mask": np.repeat(landmarks.annotation_mask()[[ds_id]], n, 0),
                "center": np.full((n, 2), 100.0, np.float32),
                "scale": np.full(n, 0.25, np.float32),
                "box_size": np.full(n, 40.0, np.float32),
                "image_id": np.array([f"{ds}_{i}" for i in range(n)]),
                "subset": np.array(["full|challenging", "full"]),
            }
        )

    def eval_step(variables, batch):
        # perfect heatmap-space predictions: the reference protocol's quantized targets
        b = current["batch"]
        from fgtbt_jax import transforms

        pts = np.zeros((len(b["dataset_id"]), 124, 2), np.float32)
        for i, d in enumerate(b["dataset_id"]):
            name = DS[int(d)]
            idx = landmarks.unified_index(name)
            pts[i, idx] = transforms.heatmap_target_points(
                b["points"][i, idx],
                b["center"][i],
                b["scale"][i],
                hm,
                integer=transforms.uses_integer_transform(name),
            )
        return {"heatmaps": np.zeros((len(pts), hm, hm, 124), np.float32), "points": pts}

    current = {}

    def feed():
        for b in batches:
            current["batch"] = b
            yield b

    cache = {}
    report = metrics.evaluate(eval_step, None, feed(), refine="none", cache=cache)
    assert len(cache) == 6 and report["meta"]["refine"] == "none"
    ref = report["metrics"]["reference"]
    assert list(ref) == ["COFW", "WFLW", "300W"]
    for ds in ref:
        assert ref[ds]["full"]["nme_inter_ocular"] == 0.0
        assert ref[ds]["full"]["auc_0.1"] == pytest.approx(1.0, abs=1e-3)
        assert ref[ds]["challenging"]["count"] == 1
        std = report["metrics"]["standard"][ds]["full"]
        assert std["nme_inter_ocular"] > 0  # quantization error is visible in the honest protocol
    paths = reports.write_report(report, tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["metrics"]["standard"]["WFLW"]["full"]["protocol"] == "standard"
    assert "per_image" not in saved
    assert "| reference | COFW | full | 2 |" in paths["md"].read_text()
    assert os.path.getsize(paths["png"]) > 10_000
    assert len(paths["csv"].read_text().splitlines()) == 1 + 6


# --- a scheme dataset (the demo MY19 scheme) beside the four built-in ones --------------------


@pytest.fixture(scope="module")
def my19_run():
    from helpers import DEMO_SCHEME

    my19 = schemes.load_scheme(DEMO_SCHEME)
    return my19, schemes.derive((*DS, "MY19"), [my19])


def test_scheme_dataset_nme_uses_its_normalization(my19_run):
    """MY19's NME: inter-ocular = |p0 − p3|, inter-pupil = |p4 − p5| (its declaration); the
    image's error is measured on its own 19 points read from their unified channels."""
    my19, unified = my19_run
    rng = np.random.default_rng(4)
    b, hm, c = 3, 32, unified.num_channels
    gt = rng.uniform(20, 100, (b, 19, 2)).astype(np.float32)
    center, scale = np.full((b, 2), 60, np.float32), np.full(b, 1.2, np.float32)
    idx = unified.index_maps[4]
    decoded = np.zeros((b, c, 2), np.float32)
    decoded[:, idx] = rng.uniform(8, 24, (b, 19, 2))
    points = np.zeros((b, c, 2), np.float32)
    points[:, idx] = gt
    batch = {
        "dataset_id": np.full(b, 4),
        "points": points,
        "mask": unified.mask[[4] * b],
        "center": center,
        "scale": scale,
        "image_id": np.array([b"x", b"y", b"z"]),
    }
    acc = metrics.Accumulator(("standard",), unified, [my19])
    acc.add(decoded, batch, heatmap_size=hm)
    for i, rec in enumerate(acc.records):
        assert rec["dataset"] == "MY19"
        pred = transforms.inverse_transform_points(decoded[i, idx], center[i], 1.2, hm)
        err = np.linalg.norm(pred - gt[i], axis=1).mean()
        io = np.linalg.norm(gt[i, 0] - gt[i, 3])
        ip = np.linalg.norm(gt[i, 4] - gt[i, 5])
        np.testing.assert_allclose(rec["standard"]["nme_inter_ocular"], err / io, rtol=1e-5)
        np.testing.assert_allclose(rec["standard"]["nme_inter_pupil"], err / ip, rtol=1e-5)
    # a built-in dataset in the same accumulator keeps its own rule and order in the report
    w = landmarks.unified_index("WFLW")
    batch_w = {**batch, "dataset_id": np.full(b, 1), "mask": unified.mask[[1] * b]}
    pts_w = np.zeros((b, c, 2), np.float32)
    pts_w[:, w] = rng.uniform(20, 100, (b, 98, 2))
    acc.add(np.zeros((b, c, 2), np.float32), {**batch_w, "points": pts_w}, heatmap_size=hm)
    report = acc.report()["metrics"]["standard"]
    assert list(report) == ["WFLW", "MY19"]
    assert report["MY19"]["full"]["count"] == b
    # ids that disagree with the layout (a MY19 row labelled WFLW) are an error, not a score
    with pytest.raises(ValueError, match="disagree on dataset ids"):
        acc.add(decoded, {**batch, "dataset_id": np.full(b, 1)}, heatmap_size=hm)
    with pytest.raises(ValueError, match=r"dataset_id \[5\] not in"):
        acc.add(decoded, {**batch, "dataset_id": np.full(b, 5)}, heatmap_size=hm)
    # MY19 alone: the pipeline's id is still 4 (built-ins keep 0..3), the same 133 channels
    alone = metrics.Accumulator(("standard",), schemes.derive(("MY19",), [my19]), [my19])
    alone.add(decoded, batch, heatmap_size=hm)
    assert [r["standard"] for r in alone.records] == [r["standard"] for r in acc.records[:b]]


def test_scheme_box_normalization():
    box = schemes.parse_scheme(
        {
            "name": "BOX3",
            "points": [["300W", 30], ["300W", 8], ["new", "chin_tip"]],
            "flip_pairs": [],
            "normalization": {"box": True},
        }
    )
    gt = np.array([[10, 10], [30, 50], [20, 30]], np.float32)
    io, ip = metrics.normalization_distances(gt, "BOX3", scheme=box)
    np.testing.assert_allclose([io, ip], [np.sqrt(20 * 40)] * 2, rtol=1e-6)


def test_flip_with_a_run_permutation(my19_run):
    """The wider heatmaps swap MY19's new pairs too; the 124 built-in channels as before."""
    _, unified = my19_run
    rng = np.random.default_rng(2)
    c = unified.num_channels
    h = rng.normal(size=(2, 4, 6, c)).astype(np.float32)
    back = np.asarray(decoding.flip_back(h, unified.flip))
    np.testing.assert_array_equal(decoding.flip_back(back, unified.flip), h)
    np.testing.assert_array_equal(back[..., :124], np.asarray(decoding.flip_back(h[..., :124])))
    right, left = unified.index_maps[4][10], unified.index_maps[4][11]  # right/left cheek
    np.testing.assert_array_equal(back[..., right], h[:, :, ::-1, left])
    with pytest.raises(ValueError, match="133 channels but the unified flip permutation has 124"):
        decoding.flip_back(h)
    w = jnp.asarray(rng.uniform(0.5, 1.5, c), jnp.float32)
    images = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
    out = decoding.make_predict_fn(_FakeModel(), flip=unified.flip)({"w": w}, {"image": images})
    base = images[..., 0].reshape(2, 8, 2, 8, 2).mean((2, 4))
    expect = base[..., None] * (np.asarray(w) + np.asarray(w)[unified.flip]) / 2
    np.testing.assert_allclose(np.asarray(out["heatmaps"]), expect, rtol=1e-5, atol=1e-6)
    assert out["points"].shape == (2, c, 2)
