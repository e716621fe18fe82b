"""Scheme declarations (fgtbt_jax.schemes): validation, the derived unified set, head extension."""

from __future__ import annotations

import copy
import json
from importlib import resources

import flax
import jax
import numpy as np
import pytest

from configs import fgtbt
from fgtbt_jax import landmarks, load_pretrained, schemes
from fgtbt_jax.evaluation import decoding
from fgtbt_jax.export import function
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert

DEMO = resources.files("fgtbt_jax").joinpath("data/schemes/demo_my19.json")


@pytest.fixture(scope="module")
def demo() -> schemes.Scheme:
    return schemes.load_scheme(str(DEMO))


def demo_json() -> dict:
    return json.loads(DEMO.read_text())


# --- the four built-in datasets: today's constants and the reference fixtures -----------------


def test_four_datasets_give_todays_weights_masks_and_flip(ref_outputs, ref_float64):
    u = schemes.derive(landmarks.DATASETS)
    assert u.num_channels == 124
    np.testing.assert_array_equal(u.fmb_weights(), landmarks.fmb_weights())
    np.testing.assert_array_equal(
        u.fmb_weights(dtype=np.float64), landmarks.fmb_weights(dtype=np.float64)
    )
    # The original code's weights: torch.pow rounds 0.9² one ulp away from numpy in float64, and
    # its float32 run computes in float32 (1 - 0.9f)/(1 - 0.9f) = 0.99999982.
    np.testing.assert_allclose(
        u.fmb_weights(dtype=np.float64), ref_float64["fmb_weights_124"], rtol=3e-16, atol=0
    )
    np.testing.assert_allclose(u.fmb_weights(), ref_outputs["fmb_weights_124"], rtol=4e-7, atol=0)
    np.testing.assert_array_equal(u.counts, landmarks.occurrence_counts())
    np.testing.assert_array_equal(u.mask, landmarks.annotation_mask())
    np.testing.assert_array_equal(u.flip, landmarks.unified_flip_permutation())
    for d, name in enumerate(landmarks.DATASETS):
        np.testing.assert_array_equal(u.index_maps[d], landmarks.unified_index(name))


def test_fewer_datasets_reweight_by_occurrence_in_the_run():
    u = schemes.derive(("300W", "WFLW"))
    n = np.isin(np.arange(124), landmarks.unified_index("300W")).astype(int) + np.isin(
        np.arange(124), landmarks.unified_index("WFLW")
    ).astype(int)
    np.testing.assert_array_equal(u.counts, n)
    w = u.fmb_weights()
    assert np.all(w[n == 0] == 0)
    np.testing.assert_allclose(w[n == 1], 1.0)
    np.testing.assert_allclose(w[n == 2], 0.1 / (1 - 0.81), rtol=1e-6)


# --- the demo scheme ------------------------------------------------------------------------


def test_demo_scheme_with_the_four_datasets(demo):
    u = schemes.derive((*landmarks.DATASETS, "MY19"), [demo])
    new = [p.name for p in demo.points if p.is_new]
    assert u.num_channels == 124 + len(new) == 133
    assert u.channels[124:] == tuple(f"MY19:{n}" for n in new)
    idx = u.index_maps[4]
    assert idx[0] == landmarks.unified_index("300W")[36]
    assert idx[4] == landmarks.unified_index("WFLW")[96]
    np.testing.assert_array_equal(idx[10:], np.arange(124, 133))
    # A shared point counts one more dataset; a new point only MY19.
    base = landmarks.occurrence_counts()
    assert u.counts[idx[0]] == base[idx[0]] + 1
    np.testing.assert_array_equal(u.counts[124:], 1)
    np.testing.assert_array_equal(u.mask[:4, :124], landmarks.annotation_mask())
    assert not u.mask[:4, 124:].any() and u.mask[4].sum() == 19
    # The unified flip mirrors MY19's own flip: flipping channels = flipping the scheme's points.
    np.testing.assert_array_equal(u.flip[idx], idx[demo.flip_permutation()])
    assert sorted(u.flip) == list(range(133))
    assert u.init_from == {
        124 + new.index("nose_bridge_mid"): landmarks.unified_index("300W")[28],
        124 + new.index("brow_mid"): landmarks.unified_index("300W")[27],
    }


def test_custom_dataset_alone(demo):
    u = schemes.derive(("MY19",), [demo])
    assert u.num_channels == 133 and u.mask.shape == (1, 133)
    w = u.fmb_weights()
    np.testing.assert_array_equal(w[u.index_maps[0]], 1.0)
    assert w.sum() == 19


def test_nme_normalizer(demo):
    pts = np.zeros((1, 19, 2))
    pts[0, 0], pts[0, 3] = (10, 20), (40, 60)  # eye corners 50 apart
    pts[0, 4], pts[0, 5] = (0, 0), (0, 7)
    pts[0, 9] = (100, 0)
    np.testing.assert_allclose(demo.nme_normalizer(pts), [50.0])
    np.testing.assert_allclose(demo.nme_normalizer(pts, "inter_pupil"), [7.0])
    with pytest.raises(schemes.SchemeError, match="declares no box"):
        demo.nme_normalizer(pts, "box")
    obj = demo_json()
    obj["normalization"] = {"box": True, "inter_pupil": [[0, 1], [2, 3]]}
    boxed = schemes.parse_scheme(obj, "b.json")
    np.testing.assert_allclose(boxed.nme_normalizer(pts), [np.sqrt(100 * 60)])


# --- declaration errors ---------------------------------------------------------------------


def _edit(path, value):
    obj = demo_json()
    *parents, last = path
    node = obj
    for p in parents:
        node = node[p]
    if value is KeyError:
        del node[last]
    else:
        node[last] = value
    return obj


@pytest.mark.parametrize(
    "path, value, message",
    [
        (("points", 2), ["300X", 42], r"points\[2\]: unknown dataset '300X'"),
        (("points", 2), ["300W", 68], r"points\[2\]: 300W has points 0\.\.67, got index 68"),
        (("points", 2), ["COFW", -1], r"COFW has points 0\.\.28"),
        (("points", 2), "300W 42", r"points\[2\]: expected"),
        (("points", 14, 2, "init_from"), ["AFLW", 19], r"points\[14\] init_from: AFLW has"),
        # WFLW 60 is the same unified channel as 300W 36 (points[0]).
        (("points", 1), ["WFLW", 60], r"points\[1\] WFLW 60: duplicate mapping.*points\[0\]"),
        (("points", 11, 1), "right_cheek", r"duplicate mapping, new point name 'right_cheek'"),
        (
            ("flip_pairs",),
            [[0, 2], [1, 3], [4, 5], [7, 8], [10, 11], [12, 13], [16, 17]],
            r"flip_pairs: flip pair not symmetric: \[0, 2\] \(300W 36, 300W 42\)",
        ),
        (("flip_pairs", 2), [4, 14], r"flip pair not symmetric: \[4, 14\].*new point"),
        (("flip_pairs", 3), [7, 7], r"flip_pairs\[3\]: \[7, 7\] must be two different points"),
        (("flip_pairs", 3), [0, 9], r"flip_pairs\[3\]: point 0 is already paired with 3"),
        (("flip_pairs", 3), [10, 19], r"flip_pairs\[3\]: \[10, 19\] must be"),
        (("normalization", "inter_ocular"), [0], r"normalization\.inter_ocular: too few points"),
        (("normalization", "inter_ocular"), [[0, 3], [3, 0]], r"too few points: both sides"),
        (("normalization", "inter_ocular"), [0, 19], r"point index 19 out of range 0\.\.18"),
        (("normalization", "inter_ocular"), KeyError, r"needs inter_ocular or box"),
        (("normalization", "cheeks"), [10, 11], r"normalization: expected an object"),
        (("name",), "300W", r"name '300W' is taken"),
        (("flip_pairs",), KeyError, r"missing key 'flip_pairs'"),
    ],
)
def test_declaration_errors(path, value, message):
    with pytest.raises(schemes.SchemeError, match=message) as e:
        schemes.parse_scheme(_edit(path, value), "my.json")
    assert str(e.value).startswith("my.json: ") and "\n" not in str(e.value)


def test_unpaired_mirror_point_is_an_error():
    obj = _edit(("flip_pairs",), [[1, 2], [4, 5], [7, 8]])
    with pytest.raises(schemes.SchemeError, match=r"point 0 \(300W 36\) has a mirror point"):
        schemes.parse_scheme(obj, "my.json")


def test_file_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(schemes.SchemeError, match=rf"^{bad}: not JSON"):
        schemes.load_scheme(bad)
    with pytest.raises(schemes.SchemeError, match="missing.json: cannot read"):
        schemes.load_scheme(tmp_path / "missing.json")


def test_unified_set_of_a_config():
    config = fgtbt.get_config("tiny")
    config.data.datasets = ("300W", "AFLW", "COFW", "WFLW")
    u = schemes.unified_set_of(config.data)
    assert u.datasets == landmarks.DATASETS
    np.testing.assert_array_equal(u.mask, landmarks.annotation_mask())
    config.data.datasets = ("MY19", "WFLW")
    config.data.schemes = (str(DEMO),)
    u = schemes.unified_set_of(config.data)
    assert u.datasets == ("WFLW", "MY19") and u.num_channels == 133


def test_run_errors(demo):
    with pytest.raises(schemes.SchemeError, match="unknown dataset 'MY20'"):
        schemes.derive(("300W", "MY20"), [demo])
    with pytest.raises(schemes.SchemeError, match="listed twice"):
        schemes.derive(("300W", "300W"))
    with pytest.raises(schemes.SchemeError, match="scheme name 'MY19' is also"):
        schemes.derive(("MY19",), [demo, demo])


# --- extending a 124-channel checkpoint -----------------------------------------------------


def test_extend_tiny_checkpoint_keeps_the_124_channels(ref_dir, ref_outputs, demo):
    config = fgtbt.get_config("reference_tiny")
    model, released = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    u = schemes.derive((*landmarks.DATASETS, "MY19"), [demo])
    wide_config = copy.deepcopy(config)
    wide_config.model.num_landmarks = u.num_channels
    wide = build_model(wide_config.model)

    extended, report = schemes.extend_head(released, u, seed=3)
    assert report.kept == 124
    assert [c for c, _ in report.copied] == ["MY19:nose_bridge_mid", "MY19:brow_mid"]
    assert len(report.fresh) == 7 and "MY19:right_cheek" in report.table()
    assert len(report.leaves) == 3
    # Same tree, shapes and dtypes as the wider model's own variables.
    want = convert.abstract_variables(wide, config.img_size)
    got = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), extended)
    assert jax.tree.structure(got) == jax.tree.structure(dict(want))
    assert jax.tree.leaves(got) == jax.tree.leaves(dict(want))

    flat = flax.traverse_util.flatten_dict(extended)
    kernel = np.asarray(flat[("params", "decode_head", "conv2", "kernel")])
    u300 = landmarks.unified_index("300W")
    np.testing.assert_array_equal(kernel[..., 128], kernel[..., u300[28]])
    fresh = kernel[..., [124 + i for i in (0, 1, 2, 3, 5, 6, 7)]]
    assert 0.5 < fresh.std() * np.sqrt(3 * 3 * 128) < 1.5  # lecun_normal over the fan-in
    again, _ = schemes.extend_head(released, u, seed=3)
    np.testing.assert_array_equal(
        kernel, flax.traverse_util.flatten_dict(again)[("params", "decode_head", "conv2", "kernel")]
    )

    images = ref_outputs["input_nchw"].transpose(0, 2, 3, 1)
    narrow = jax.jit(lambda v, x: model.apply(v, x, train=False))(released, images)
    out = jax.jit(lambda v, x: wide.apply(v, x, train=False))(extended, images)
    assert out.shape == narrow.shape[:3] + (133,)
    # Float32 sums run in another order for another channel count: ~1e-6 apart.
    np.testing.assert_allclose(np.asarray(out[..., :124]), np.asarray(narrow), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(out[..., 128]), np.asarray(narrow[..., u300[28]]), rtol=1e-5, atol=1e-5
    )

    # The exported function's test-time flip mirrors the widened head's channels by the run's
    # permutation: the 124 built-in channels as the released model's, MY19's right/left cheek
    # (points 10, 11 = channels 124, 125) with each other.
    exported = jax.jit(
        function.inference_fn(
            wide, extended, with_flip=True, decode=False, refine="none", channel_flip=u.flip
        )
    )
    (flipped,) = exported(images)
    mirror = images[:, :, ::-1]
    narrow_m = jax.jit(lambda v, x: model.apply(v, x, train=False))(released, mirror)
    out_m = jax.jit(lambda v, x: wide.apply(v, x, train=False))(extended, mirror)
    want = decoding.flip_average(narrow, narrow_m, "unified")
    np.testing.assert_allclose(np.asarray(flipped[..., :124]), want, rtol=1e-5, atol=1e-5)
    cheek = (out[..., 124] + out_m[:, :, ::-1, 125]) / 2
    np.testing.assert_allclose(np.asarray(flipped[..., 124]), cheek, rtol=1e-5, atol=1e-5)


def test_extend_rejects_a_wider_checkpoint(demo):
    u = schemes.derive(("MY19",), [demo])
    variables = {"params": {"decode_head": {"conv2": {"kernel": np.zeros((3, 3, 8, 133))}}}}
    with pytest.raises(schemes.SchemeError, match="conv2/kernel has 133 channels"):
        schemes.extend_head(variables, u)


def test_extend_without_new_points_is_the_identity():
    kernel = np.arange(3 * 3 * 2 * 124, dtype=np.float32).reshape(3, 3, 2, 124)
    variables = {"params": {"decode_head": {"conv2": {"kernel": kernel}}}}
    out, report = schemes.extend_head(variables, schemes.derive(("300W",)))
    np.testing.assert_array_equal(out["params"]["decode_head"]["conv2"]["kernel"], kernel)
    assert report.fresh == [] and report.copied == []
