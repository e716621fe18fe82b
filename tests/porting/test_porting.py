"""Checkpoint conversion: release .pth ⇄ Flax variables ⇄ orbax, against the reference files."""

from __future__ import annotations

import zipfile

import jax
import numpy as np
import pytest
from helpers import run_script

from configs import fgtbt
from fgtbt_jax import export_pth, load_pretrained
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert, pretrained, pth


def read_manifest(path) -> dict[str, tuple[tuple[int, ...], str]]:
    rows = {}
    with open(path) as f:
        assert next(f).split() == ["key", "shape", "dtype"]
        for line in f:
            key, shape, dtype = line.rstrip("\n").split("\t")
            dims = () if shape == "scalar" else tuple(int(d) for d in shape.split("x"))
            rows[key] = (dims, dtype)
    return rows


@pytest.fixture(scope="module")
def tiny_sd(ref_dir):
    return pth.load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]


def test_release_export_matches_manifest_exactly(ref_dir):
    """Every key, shape and dtype of the released checkpoint, from shapes only (eval_shape)."""
    config = fgtbt.get_config("release")
    model = build_model(config.model)
    manifest = read_manifest(ref_dir / "fgtbt_b4_state_dict_keys.tsv")
    assert len(manifest) == 929
    ours = {}
    for e in convert.mapping(model, config.img_size):
        ours[e.torch_key] = (e.torch_shape, "int64" if e.kind == "counter" else "float32")
    assert set(ours) == set(manifest), set(ours) ^ set(manifest)
    for key, want in manifest.items():
        assert ours[key] == want, key


def test_tiny_pth_roundtrip_is_bit_exact(tiny_sd, ref_dir, tmp_path):
    config = fgtbt.get_config("reference_tiny")
    model, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    out = tmp_path / "exported.pth"
    export_pth(variables, out, config, epoch=7)
    back = pth.load_pth(out)
    assert back["epoch"] == 7 and back["model"]["name"] == "segformer"
    sd = back["model"]["sd"]
    assert list(sd) == list(tiny_sd), "key order differs from the release"
    for key, ref in tiny_sd.items():
        got = sd[key]
        assert got.dtype == ref.dtype and got.shape == ref.shape, key
        assert np.array_equal(got, ref), key


def test_exported_pth_loads_in_torch_strictly(ref_dir, tmp_path):
    torch = pytest.importorskip("torch")
    from benchmarks.torch_oracle.fgtbt import build_torch_model_from_config

    config = fgtbt.get_config("reference_tiny")
    _, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    export_pth(variables, tmp_path / "x.pth", config)
    ck = torch.load(tmp_path / "x.pth", weights_only=True)
    net = build_torch_model_from_config(config.model)
    net.load_state_dict(ck["model"]["sd"], strict=True)
    ref = torch.load(ref_dir / "tiny_checkpoint.pth", weights_only=True)["model"]["sd"]
    for k, v in ref.items():
        assert torch.equal(ck["model"]["sd"][k], v), k


def test_orbax_roundtrip(ref_dir, tmp_path):
    config = fgtbt.get_config("reference_tiny")
    model, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    pretrained.save_variables(variables, tmp_path / "orbax")
    _, restored = load_pretrained(tmp_path / "orbax", config)
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(restored), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_wrong_architecture_lists_mismatches(ref_dir):
    config = fgtbt.get_config("release")
    with pytest.raises(convert.CheckpointMismatchError) as info:
        load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    msg = str(info.value)
    assert "tiny_checkpoint.pth" in msg
    assert (
        "shape encoder.backbone.patch_embed1.conv1.weight: checkpoint 16x3x1x1, model 64x3x1x1"
        in msg
    )
    assert "missing encoder.backbone.block1.2.norm1.weight" in msg


def test_bad_files_give_clear_errors(tmp_path, tiny_sd):
    config = fgtbt.get_config("reference_tiny")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(pth.PthFormatError, match="junk.pth"):
        load_pretrained(junk, config)
    with pytest.raises(FileNotFoundError):
        load_pretrained(tmp_path / "absent.pth", config)
    bad = dict(tiny_sd)
    key = "encoder.backbone.norm1.weight"
    bad[key] = bad[key].astype(np.float64)
    pth.save_pth({"model": {"name": "segformer", "args": {}, "sd": bad}}, tmp_path / "f64.pth")
    with pytest.raises(
        convert.CheckpointMismatchError, match=f"unsupported dtype float64 for {key}"
    ):
        load_pretrained(tmp_path / "f64.pth", config)


def test_float64_pth_round_trip(tmp_path, ref_dir, tiny_sd):
    """A float64 model exports float64 tensors; the file loads back into a float64 model
    unchanged and is refused by a float32 one (that would be a silent downcast)."""
    config = fgtbt.get_config("reference_tiny")
    config.model.dtype = "float64"
    path = tmp_path / "f64.pth"
    with jax.enable_x64(True):
        _, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
        export_pth(variables, path, config)
        sd = pth.load_pth(path)["model"]["sd"]
        floats = {str(v.dtype) for k, v in sd.items() if not k.endswith("num_batches_tracked")}
        assert floats == {"float64"}
        for key, want in tiny_sd.items():  # float32 -> float64 -> file: exact
            np.testing.assert_array_equal(sd[key], want, err_msg=key)
        _, back = load_pretrained(path, config)
    assert {str(x.dtype) for x in jax.tree.leaves(back)} == {"float64", "int32"}
    jax.tree.map(np.testing.assert_array_equal, back, variables)
    with pytest.raises(convert.CheckpointMismatchError, match="only into a float64 model"):
        load_pretrained(path, fgtbt.get_config("reference_tiny"))


def test_bare_state_dict_and_fp16_upcast(tmp_path, tiny_sd):
    config = fgtbt.get_config("reference_tiny")
    half = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tiny_sd.items()}
    pth.save_pth(half, tmp_path / "bare.pth")
    _, variables = load_pretrained(tmp_path / "bare.pth", config)
    kernel = variables["params"]["backbone"]["norm1"]["scale"]
    assert kernel.dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(kernel), tiny_sd["encoder.backbone.norm1.weight"].astype(np.float16)
    )


def test_partial_backbone_import_reports(tiny_sd):
    """A SegFormer-style backbone file (no prefix, extra and mis-shaped keys) loads non-strictly."""
    config = fgtbt.get_config("reference_tiny")
    model = build_model(config.model)
    abstract = convert.abstract_variables(model, config.img_size)
    variables = jax.tree.map(lambda a: np.full(a.shape, 0.5, a.dtype), abstract)
    prefix = "encoder.backbone."
    mit = {k[len(prefix) :]: v for k, v in tiny_sd.items() if k.startswith(prefix)}
    mit = {k: v for k, v in mit.items() if "prompt_generator" not in k}  # plain MiT has none
    mit["head.weight"] = np.zeros((1000, 128), np.float32)  # ImageNet classifier: unexpected
    mit["block1.0.attn.q.weight"] = np.zeros((3, 3), np.float32)  # wrong shape
    new, report = convert.import_partial(variables, mit, model, config.img_size)
    assert report.unexpected == ["head.weight"]
    assert [m[0] for m in report.mismatched] == ["block1.0.attn.q.weight"]
    assert all("prompt_generator" in k for k in report.missing if "q.weight" not in k)
    assert len(report.loaded) == len(mit) - 2
    np.testing.assert_array_equal(
        np.asarray(new["params"]["backbone"]["block1_0"]["attn"]["proj"]["kernel"]),
        tiny_sd[prefix + "block1.0.attn.proj.weight"].T,
    )
    # the mis-shaped and the missing ones keep their initial values
    np.testing.assert_array_equal(
        np.asarray(new["params"]["backbone"]["block1_0"]["attn"]["q"]["kernel"]),
        np.asarray(variables["params"]["backbone"]["block1_0"]["attn"]["q"]["kernel"]),
    )
    assert "loaded" in report.table() and "head.weight" in report.table()


def test_convert_script_both_directions(ref_dir, tmp_path, tiny_sd):
    cfg = "configs/fgtbt.py:reference_tiny"
    r = run_script(
        "scripts/convert_checkpoint.py",
        "--config",
        cfg,
        "--input",
        str(ref_dir / "tiny_checkpoint.pth"),
        "--output",
        str(tmp_path / "o"),
    )
    assert r.returncode == 0, r.stderr
    r = run_script(
        "scripts/convert_checkpoint.py",
        "--config",
        cfg,
        "--input",
        str(tmp_path / "o"),
        "--output",
        str(tmp_path / "back.pth"),
    )
    assert r.returncode == 0, r.stderr
    assert zipfile.is_zipfile(tmp_path / "back.pth")
    sd = pth.load_pth(tmp_path / "back.pth")["model"]["sd"]
    for k, v in tiny_sd.items():
        assert np.array_equal(sd[k], v), k
    r = run_script(
        "scripts/convert_checkpoint.py",
        "--config",
        "configs/fgtbt.py:release",
        "--input",
        str(ref_dir / "tiny_checkpoint.pth"),
        "--output",
        str(tmp_path / "x"),
    )
    assert r.returncode != 0 and "does not match the architecture" in r.stderr


def test_param_count_script_matches_manifest(ref_dir):
    manifest = read_manifest(ref_dir / "fgtbt_b4_state_dict_keys.tsv")
    want = sum(int(np.prod(s)) for s, d in manifest.values() if d == "float32")
    # With either kernels (fgtbt_jax.ops) the parameters are the same; the output says which.
    r = run_script(
        "scripts/model_info.py",
        "--config",
        "configs/fgtbt.py:release",
        "--config.model.kernels=xla",
    )
    assert r.returncode == 0, r.stderr
    assert f"state-dict floating values: {want:,}" in r.stdout
    assert "model.kernels: xla (config: xla)" in r.stdout


def test_widened_checkpoint_round_trips_through_pth(ref_dir, tmp_path, tiny_sd):
    """A 133-channel model (four datasets + MY19) exports in the release key layout with the
    larger head and loads back bit for bit; a 124-channel config refuses it."""
    from helpers import wide_tiny_checkpoint

    path = tmp_path / "wide.pth"
    config, unified, variables = wide_tiny_checkpoint(ref_dir, path)
    back = pth.load_pth(path)
    assert back["model"]["args"]["num_points"] == unified.num_channels == 133
    sd = back["model"]["sd"]
    assert list(sd) == list(tiny_sd)  # the release's keys, in its order
    widened = {k for k in sd if sd[k].shape != tiny_sd[k].shape}
    assert widened == {
        "encoder.decode_head.conv2.weight",
        "encoder.decode_head.conv_seg.weight",
        "encoder.decode_head.conv_seg.bias",
    }
    for k in widened:  # channels first in torch: the 124 released ones, then MY19's 9
        assert sd[k].shape[0] == 133 and sd[k].shape[1:] == tiny_sd[k].shape[1:], k
        np.testing.assert_array_equal(sd[k][:124], tiny_sd[k])
    _, loaded = load_pretrained(path, config)
    for (kp, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(loaded),
        jax.tree_util.tree_leaves_with_path(variables),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(kp))
    with pytest.raises(convert.CheckpointMismatchError, match="conv2"):
        load_pretrained(path, fgtbt.get_config("reference_tiny"))
