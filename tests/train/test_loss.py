"""Heatmap targets and the FMB loss against the reference (SPEC §3)."""

from __future__ import annotations

import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import reference_batch

from fgtbt_jax import landmarks
from fgtbt_jax.train import loss

DATASETS = landmarks.DATASETS


def _unified_batch(ref_outputs: dict[str, np.ndarray]):
    """The reference train batch's heatmaps (NHWC), coords, mask and dataset ids."""
    batch = reference_batch(ref_outputs)
    pred = ref_outputs["train_heatmaps_nchw"].transpose(0, 2, 3, 1)
    return pred, batch["coords"], batch["mask"], batch["dataset_id"]


_render = jax.jit(loss.render_heatmaps, static_argnums=(1, 2))


def _load_config(preset: str):
    path = pathlib.Path(__file__).parents[2] / "configs" / "fgtbt.py"
    spec = importlib.util.spec_from_file_location("_fgtbt_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


LOSS = _load_config("tiny").loss
_loss = jax.jit(functools.partial(loss.fmb_loss, loss_cfg=LOSS))


def test_gaussian_targets_match_reference_exactly(eval_ref):
    points = eval_ref["gaussian_points_xy"]  # (5, 2), incl. border, fractional, out-of-map
    expected = eval_ref["gaussian_heatmaps_sigma3"]  # (5, 64, 64)
    got = np.asarray(_render(points[None], 64, 3.0))
    assert got.shape == (1, 64, 64, 5) and got.dtype == np.float32
    np.testing.assert_array_equal(got[0].transpose(2, 0, 1), expected)


def test_train_targets_match_reference(ref_outputs):
    for name in DATASETS:
        coords = ref_outputs[f"train_target_coords_{name}"]
        got = np.asarray(_render(coords, 48))
        np.testing.assert_array_equal(
            got.transpose(0, 3, 1, 2),
            ref_outputs[f"train_target_heatmaps_{name}_nchw"],
            err_msg=name,
        )


def test_render_window_and_outside():
    coords = np.array([[[5, 7], [-10, 3], [3, 30], [-9, -9], [20, 20]]], np.int32)
    h = np.asarray(loss.render_heatmaps(coords, (16, 24)))  # H=16, W=24
    assert h.shape == (1, 16, 24, 5)
    # Peak 1 at row 7, column 5; window 19 wide, nothing outside it.
    assert h[0, 7, 5, 0] == 1.0
    assert h[0, 7, 6, 0] == np.float32(math.exp(-1 / 18))
    assert np.all(h[0, :, 15:, 0] == 0) and h[0, 7, 14, 0] > 0
    # Windows entirely outside the map draw nothing.
    assert np.all(h[0, :, :, 1] == 0) and np.all(h[0, :, :, 2] == 0)
    # Window corner just touching the map.
    assert np.count_nonzero(h[0, :, :, 3]) == 1 and h[0, 0, 0, 3] == np.float32(math.exp(-9))
    # Column 20 of a 24-wide map: clipped window.
    assert np.count_nonzero(h[0, :, :, 4].any(axis=0)) == 24 - 11


def test_adaptive_wing_formula():
    omega, theta, eps, alpha = 14.0, 0.5, 1.0, 2.1

    def awing(p: float, y: float) -> float:  # SPEC §3 written out with math
        d, a = abs(p - y), alpha - y
        if d < theta:
            return omega * math.log(1 + (d / eps) ** a)
        big_a = omega * (1 / (1 + (theta / eps) ** a)) * a * (theta / eps) ** (a - 1) / eps
        return big_a * d - (theta * big_a - omega * math.log(1 + (theta / eps) ** a))

    rng = np.random.default_rng(0)
    pred = rng.uniform(-1.5, 2.0, 200).astype(np.float32)
    target = rng.uniform(0.0, 1.0, 200).astype(np.float32)
    target[:20] = 0.0
    got = np.asarray(loss.adaptive_wing(pred, target))
    want = np.array([awing(float(p), float(y)) for p, y in zip(pred, target, strict=True)])
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
    assert float(loss.adaptive_wing(jnp.zeros(()), jnp.zeros(()))) == 0.0


def test_weight_map():
    t = np.zeros((1, 6, 7, 2), np.float32)
    t[0, 3, 4, 0] = 0.2  # exactly at the threshold counts
    t[0, 0, 0, 1] = 0.19  # below the threshold
    t[0, 5, 6, 1] = 0.9  # corner: clipped 2x2 neighbourhood
    w = np.asarray(loss.weight_map(t))
    want = np.ones_like(t)
    want[0, 2:5, 3:6, 0] = 11.0
    want[0, 4:6, 5:7, 1] = 11.0
    np.testing.assert_array_equal(w, want)


@pytest.mark.parametrize(
    "sigma,threshold", [(3.0, 0.2), (1.0, 0.5), (2.0, 0.01), (1.0, 0.0), (1.0, 1.5)]
)
def test_heatmaps_and_weights_equal_pooled_definition(sigma, threshold):
    """The elementwise targets and weights of ``heatmaps_and_weights`` (what ``fmb_loss``
    uses) against ``render_heatmaps`` and the max-pooled ``weight_map`` of it, exactly:
    points inside, on the edges and corners, just outside and far outside the map."""
    rng = np.random.default_rng(7)
    h, w = 20, 27
    points = [(0, 0), (w - 1, h - 1), (0, h - 1), (w - 1, 0), (-1, 5), (w, 3), (4, -2)]
    points += [(-12, -12), (w + 30, 4), (13, 9)]
    coords = np.concatenate([np.array(points), rng.integers(-4, 31, (14, 2))])[None]
    coords = np.repeat(coords, 2, axis=0).astype(np.int32)
    coords[1] = coords[1, ::-1]
    target, weight = loss.heatmaps_and_weights(coords, (h, w), sigma, jnp.float32, threshold, 7.0)
    want = loss.render_heatmaps(coords, (h, w), sigma)
    np.testing.assert_array_equal(np.asarray(target), np.asarray(want))
    np.testing.assert_array_equal(
        np.asarray(weight), np.asarray(loss.weight_map(want, threshold, 7.0))
    )
    if 0.0 < threshold <= 1.0:  # both kinds of pixel occur (else all 8 or all 1)
        assert 1.0 < float(jnp.mean(weight)) < 8.0


def test_fmb_loss_matches_reference(ref_outputs):
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    total, per_dataset = _loss(pred, coords, mask, ds, landmarks.fmb_weights())
    want = np.array([ref_outputs[f"train_loss_{n}"] for n in DATASETS])
    np.testing.assert_allclose(np.asarray(per_dataset), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(ref_outputs["train_loss_total"]), rtol=1e-5)
    assert total.dtype == jnp.float32


def test_fmb_loss_config_and_presence(ref_outputs):
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    cfg = _load_config("tiny").loss
    w = landmarks.fmb_weights()
    total, _ = jax.jit(lambda *a: loss.fmb_loss(*a, loss_cfg=cfg))(pred, coords, mask, ds, w)
    np.testing.assert_allclose(float(total), float(ref_outputs["train_loss_total"]), rtol=1e-5)
    # A different weight-map scale changes the loss.
    cfg.weight_map_scale = 0.0
    other, _ = jax.jit(lambda *a: loss.fmb_loss(*a, loss_cfg=cfg))(pred, coords, mask, ds, w)
    assert abs(float(other) - float(total)) > 0.1
    np.testing.assert_array_equal(
        np.asarray(loss.dataset_presence(np.array([2, 2, 0]))), [True, False, True, False]
    )


def test_fmb_loss_mixed_batch(ref_outputs):
    """Two WFLW samples and one AFLW sample: L_WFLW is the mean of the single-sample losses."""
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    w = landmarks.fmb_weights()
    # Second WFLW sample: the WFLW targets against the prediction made for the 300W image.
    sel = np.array([1, 1, 3])
    pred3 = np.stack([pred[1], pred[2], pred[3]])
    coords3, mask3, ds3 = coords[sel], mask[sel], ds[sel]
    total, per = _loss(pred3, coords3, mask3, ds3, w)

    _, single_b = _loss(pred[2:3], coords[1:2], mask[1:2], ds[1:2], w)
    want_wflw = (float(ref_outputs["train_loss_WFLW"]) + float(single_b[1])) / 2
    want_aflw = float(ref_outputs["train_loss_AFLW"])
    np.testing.assert_allclose(np.asarray(per), [0.0, want_wflw, 0.0, want_aflw], rtol=1e-5)
    np.testing.assert_allclose(float(total), want_wflw + want_aflw, rtol=1e-5)


def test_fmb_loss_permutation_invariant(ref_outputs):
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    w = landmarks.fmb_weights()
    total, per = _loss(pred, coords, mask, ds, w)
    perm = np.array([2, 0, 3, 1])
    total_p, per_p = _loss(pred[perm], coords[perm], mask[perm], ds[perm], w)
    np.testing.assert_allclose(float(total_p), float(total), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(per_p), np.asarray(per), rtol=1e-6)


def test_fmb_loss_gradient_finite_and_masked(ref_outputs):
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    w = landmarks.fmb_weights()
    # Make some predictions equal the targets exactly (δ = 0) to probe the kink of |·|.
    target = np.asarray(loss.render_heatmaps(coords, 48))
    pred = pred.copy()
    pred[:, :10] = target[:, :10]

    grad = jax.jit(jax.grad(lambda p: loss.fmb_loss(p, coords, mask, ds, w, loss_cfg=LOSS)[0]))(
        pred
    )
    grad = np.asarray(grad)
    assert np.all(np.isfinite(grad))
    # Unannotated channels get no gradient; annotated ones do.
    assert np.all(grad.transpose(0, 3, 1, 2)[~mask] == 0)
    assert np.all(np.abs(grad.transpose(0, 3, 1, 2)[mask]).sum(axis=(1, 2)) > 0)


def test_fmb_loss_bfloat16(ref_outputs):
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    w = landmarks.fmb_weights()
    pred_bf16 = jnp.asarray(pred, jnp.bfloat16)
    total, _ = _loss(pred_bf16, coords, mask, ds, w)
    total_f32, _ = _loss(pred_bf16.astype(jnp.float32), coords, mask, ds, w)
    assert total.dtype == jnp.float32
    assert float(total) == float(total_f32)
    np.testing.assert_allclose(float(total), float(ref_outputs["train_loss_total"]), rtol=1e-2)


def test_fmb_loss_bad_shapes(ref_outputs):
    pred, coords, mask, ds = _unified_batch(ref_outputs)
    with pytest.raises(ValueError, match="coords"):
        loss.fmb_loss(pred, coords[:, :10], mask, ds, landmarks.fmb_weights(), loss_cfg=LOSS)
