"""fgtbt_jax.pth: torch-free reading and writing of zip-format torch.save checkpoints."""

from __future__ import annotations

import collections
import os
import pathlib
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np
import pytest

from fgtbt_jax.porting import pth
from fgtbt_jax.porting.pth import PthFormatError, TorchDtype, UnsafePickleError, load_pth, save_pth


def _bits(a: np.ndarray) -> np.ndarray:
    """The raw bytes of an array, for bit-exact comparisons (NaN payloads, -0.0 included)."""
    return np.array(a, order="C").reshape(-1).view(np.uint8)


def _assert_same_array(a: np.ndarray, b: np.ndarray, where: str = "") -> None:
    assert isinstance(a, np.ndarray), where
    assert a.dtype == b.dtype, (where, a.dtype, b.dtype)
    assert a.shape == b.shape, (where, a.shape, b.shape)
    np.testing.assert_array_equal(_bits(a), _bits(b), err_msg=where)


def _torch_to_numpy(t) -> np.ndarray:
    """A torch tensor as numpy, bfloat16 through its bits (torch's .numpy() refuses bfloat16)."""
    import torch

    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _assert_same_tree(a, b, where: str = "obj") -> None:
    """Structural equality; numpy arrays compared bit-exactly, container types compared too."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        _assert_same_array(a, b, where)
    else:
        assert a == b, (where, a, b)


def _example_checkpoint() -> dict:
    """The release's file layout with every dtype a checkpoint of ours holds."""
    rng = np.random.default_rng(0)
    sd = collections.OrderedDict()
    sd["encoder.backbone.block1.0.attn.q.weight"] = rng.standard_normal((8, 8), np.float32)
    sd["encoder.backbone.block1.0.attn.q.bias"] = rng.standard_normal(8).astype(np.float32)
    sd["encoder.decode_head.linear_fuse.bn.num_batches_tracked"] = np.array(7, np.int64)
    sd["half"] = rng.standard_normal((3, 5)).astype(np.float16)
    sd["bf16"] = rng.standard_normal((2, 3, 4)).astype(ml_dtypes.bfloat16)
    sd["f64"] = rng.standard_normal(4)
    sd["i64"] = np.array([-(2**62), -1, 0, 2**62], np.int64)
    sd["i32"] = np.arange(-3, 3, dtype=np.int32).reshape(2, 3)
    sd["i8"] = np.array([-128, 127], np.int8)
    sd["u8"] = np.array([0, 255], np.uint8)
    sd["bool"] = np.array([[True, False], [False, True]])
    sd["scalar_f32"] = np.array(np.float32(-0.0))
    sd["special"] = np.array([np.nan, np.inf, -np.inf, 1e-45], np.float32)
    sd["empty"] = np.zeros((0, 3), np.float32)
    # Non-contiguous and big-endian inputs are stored as their (little-endian) values.
    sd["transposed"] = rng.standard_normal((4, 6)).astype(np.float32).T
    sd["big_endian"] = np.arange(6, dtype=">f4").reshape(2, 3)
    return {
        "model": {
            "name": "segformer",
            "args": {
                "num_points": 124,
                "encoder_mode": {"name": "evp", "freq_nums": 0.25, "tuning_stage": 1234},
                "embed_dims": [16, 32, 64, 128],
                "sizes": (96, 48),
                "big": 2**70,
                "negative": -123456789,
                "flag": True,
                "nothing": None,
                "unicode": "Gesichtspunkte äöü ✓",
            },
            "sd": sd,
        },
        "epoch": 3,
    }


def _expected_after_round_trip(obj):
    """What load_pth returns for ``obj``: contiguous native little-endian arrays."""
    if isinstance(obj, dict):
        return type(obj)((k, _expected_after_round_trip(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_expected_after_round_trip(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return np.array(obj, dtype=obj.dtype.newbyteorder("="), order="C")
    return obj


# ------------------------------------------------------------------------------- reading


def test_load_reference_checkpoint_layout(ref_dir: pathlib.Path) -> None:
    ck = load_pth(ref_dir / "tiny_checkpoint.pth")
    assert set(ck) == {"model", "epoch"}
    assert ck["model"]["name"] == "segformer"
    tiny = ck["model"]["args"]["tiny_variant"]
    assert tiny["embed_dims"] == [16, 32, 64, 128] and tiny["decoder_dim"] == 64
    sd = ck["model"]["sd"]
    assert all(k.startswith(("encoder.backbone.", "encoder.decode_head.")) for k in sd)
    nbt = sd["encoder.decode_head.linear_fuse.bn.num_batches_tracked"]
    assert nbt.dtype == np.int64 and nbt.shape == ()
    q = sd["encoder.backbone.block1.0.attn.q.weight"]
    assert q.dtype == np.float32 and q.shape == (16, 16) and q.flags.c_contiguous
    # Shapes follow the architecture (SPEC §2): stage-1 prompt width 1.5 * 16 = 24.
    assert sd["encoder.backbone.prompt_generator.conv1.weight"].shape == (24, 24, 1, 1)
    assert sd["encoder.decode_head.upSample.upsample.weight"].shape == (128, 128, 4, 4)


def test_load_reference_checkpoint_matches_torch(ref_dir: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    path = ref_dir / "tiny_checkpoint.pth"
    ours, theirs = load_pth(path), torch.load(path, weights_only=True)
    assert ours["epoch"] == theirs["epoch"]
    assert ours["model"]["args"] == theirs["model"]["args"]
    sd, ref = ours["model"]["sd"], theirs["model"]["sd"]
    assert list(sd) == list(ref)
    for k, v in ref.items():
        _assert_same_array(sd[k], v.numpy(), k)


def test_torch_save_views_and_dtypes_load(tmp_path: pathlib.Path) -> None:
    """Offsets, strides (transposed, sliced, expanded) and shared storages as torch saves them."""
    torch = pytest.importorskip("torch")
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10) * 0.5 - 3
    lin = torch.nn.Linear(3, 2)
    obj = {
        "base": base,
        "transposed": base.t(),
        "slice": base[2:5, 3:9:2],
        "row": base[4],
        "column": base[:, 7],
        "expanded": torch.tensor([1.0, 2.0]).expand(3, 2),
        "scalar_view": base[1, 1],
        "bf16": torch.linspace(-2, 2, 7, dtype=torch.bfloat16)[1::2],
        "half": torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).half().t(),
        "long": torch.tensor(5),
        "int": torch.arange(-4, 4, dtype=torch.int32).reshape(2, 4)[:, 1:],
        "bool": torch.tensor([True, False, True])[::2],
        "uint16": torch.tensor([1, 65535], dtype=torch.uint16),  # _rebuild_tensor_v3
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "state_dict": lin.state_dict(),
        "args": {"lr": 2.5e-4, "milestones": [40000, 70000]},
        "dtype": torch.bfloat16,
    }
    path = tmp_path / "views.pth"
    torch.save(obj, path)
    loaded = load_pth(path)
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            _assert_same_array(loaded[k], _torch_to_numpy(v), k)
    assert isinstance(loaded["state_dict"], collections.OrderedDict)
    for k, v in obj["state_dict"].items():
        _assert_same_array(loaded["state_dict"][k], v.numpy(), k)
    assert loaded["args"] == obj["args"]
    assert isinstance(loaded["dtype"], TorchDtype) and loaded["dtype"].name == "bfloat16"
    assert loaded["dtype"].numpy_dtype == ml_dtypes.bfloat16
    # Views of one storage come back as independent arrays.
    loaded["transposed"][0, 0] = 1e6
    assert loaded["base"][0, 0] == -3


# ------------------------------------------------------------------------------- writing


def test_save_then_torch_load_bit_exact(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    obj = _example_checkpoint()
    path = tmp_path / "export.pth"
    save_pth(obj, path)
    loaded = torch.load(path, weights_only=True)  # the safe loader must accept our file
    assert loaded["epoch"] == 3 and loaded["model"]["name"] == "segformer"
    assert loaded["model"]["args"] == obj["model"]["args"]
    assert type(loaded["model"]["sd"]) is collections.OrderedDict
    assert list(loaded["model"]["sd"]) == list(obj["model"]["sd"])
    expected = _expected_after_round_trip(obj)["model"]["sd"]
    torch_dtypes = {
        np.dtype(np.float32): torch.float32,
        np.dtype(np.float64): torch.float64,
        np.dtype(np.float16): torch.float16,
        np.dtype(ml_dtypes.bfloat16): torch.bfloat16,
        np.dtype(np.int64): torch.int64,
        np.dtype(np.int32): torch.int32,
        np.dtype(np.int8): torch.int8,
        np.dtype(np.uint8): torch.uint8,
        np.dtype(np.bool_): torch.bool,
    }
    for k, want in expected.items():
        t = loaded["model"]["sd"][k]
        assert isinstance(t, torch.Tensor) and not t.requires_grad, k
        assert t.dtype == torch_dtypes[want.dtype], (k, t.dtype)
        assert tuple(t.shape) == want.shape, k
        np.testing.assert_array_equal(_bits(_torch_to_numpy(t)), _bits(want), err_msg=k)
    # A state dict we write loads strictly into a torch module.
    lin = torch.nn.Linear(3, 2)
    sd = {"weight": np.ones((2, 3), np.float32), "bias": np.array([1.0, -1.0], np.float32)}
    save_pth(sd, tmp_path / "linear.pth")
    lin.load_state_dict(torch.load(tmp_path / "linear.pth", weights_only=True), strict=True)
    assert lin(torch.zeros(1, 3)).tolist() == [[1.0, -1.0]]


def test_round_trip_without_torch(tmp_path: pathlib.Path) -> None:
    obj = _example_checkpoint()
    path = tmp_path / "ckpt.pth"
    save_pth(obj, path)
    _assert_same_tree(load_pth(path), _expected_after_round_trip(obj))
    # Deterministic bytes: the same object gives the same file.
    save_pth(obj, tmp_path / "ckpt_copy.pth")
    zf1, zf2 = zipfile.ZipFile(path), zipfile.ZipFile(tmp_path / "ckpt_copy.pth")
    assert [zf1.read(i) for i in zf1.namelist()] == [zf2.read(i) for i in zf2.namelist()]


def test_saved_file_layout(tmp_path: pathlib.Path) -> None:
    """Records named after the file stem, torch's metadata records, data aligned to 64 bytes."""
    path = tmp_path / "model_best.pth"
    save_pth({"w": np.ones(3, np.float32), "b": np.zeros(5, np.int64)}, path)
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        assert names[0] == "model_best/data.pkl"
        assert {"model_best/byteorder", "model_best/version", "model_best/data/0"} <= set(names)
        assert zf.read("model_best/byteorder") == b"little"
        assert zf.read("model_best/version").strip() == b"3"
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        raw = path.read_bytes()
        for info in zf.infolist():
            off = info.header_offset
            name_len, extra_len = struct.unpack("<HH", raw[off + 26 : off + 30])
            assert (off + 30 + name_len + extra_len) % 64 == 0, info.filename
        assert raw[:4] == b"PK\x03\x04"
    assert not [p for p in tmp_path.iterdir() if p.name != "model_best.pth"]  # no temp left


def test_save_is_atomic_on_error(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "keep.pth"
    save_pth({"epoch": 1}, path)
    before = path.read_bytes()
    with pytest.raises(TypeError, match=r"obj\['model'\]\['bad'\]"):
        save_pth({"model": {"bad": {1, 2}}}, path)
    with pytest.raises(TypeError, match="uint16"):
        save_pth({"x": np.zeros(2, np.uint16)}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.pth"]


# ----------------------------------------------------------------------- hostile / broken input


class _Evil:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _zip_with_pickle(path: pathlib.Path, pkl: bytes, extra: dict[str, bytes] | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{path.stem}/data.pkl", pkl)
        zf.writestr(f"{path.stem}/byteorder", b"little")
        for name, data in (extra or {}).items():
            zf.writestr(f"{path.stem}/{name}", data)
        zf.writestr(f"{path.stem}/version", b"3\n")


def test_malicious_pickle_is_refused_and_not_executed(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    _zip_with_pickle(path, pickle.dumps({"model": {"sd": {"w": _Evil(marker)}}}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"(posix|os|nt)\.system") as err:
        load_pth(path)
    assert str(path) in str(err.value)
    assert isinstance(err.value, ValueError)
    assert not marker.exists()
    # Protocol 4 (STACK_GLOBAL) and a builtins call are refused too.
    path4 = tmp_path / "evil4.pth"
    _zip_with_pickle(path4, pickle.dumps(_Evil(marker), protocol=4))
    with pytest.raises(UnsafePickleError):
        load_pth(path4)
    path_eval = tmp_path / "eval.pth"
    _zip_with_pickle(path_eval, b"\x80\x02cbuiltins\neval\nX\x04\x00\x00\x001+1\x85R.")
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        load_pth(path_eval)
    assert not marker.exists()


def test_pickle_cannot_modify_allowed_objects(tmp_path: pathlib.Path) -> None:
    """BUILD on an allowed global (here our tensor rebuild function) must not change it."""
    for i, target in enumerate(
        [b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\nFloatStorage\n", b"ctorch\nfloat32\n"]
    ):
        path = tmp_path / f"build{i}.pth"
        state = b"}X\x03\x00\x00\x00abcK\x01s"  # {'abc': 1}
        slot_state = b"N}X\x04\x00\x00\x00nameK\x01s\x86"  # (None, {'name': 1})
        _zip_with_pickle(path, b"\x80\x02" + target + state + b"b" + slot_state + b"b.")
        with pytest.raises(PthFormatError, match=path.name):
            load_pth(path)
    assert not hasattr(pth._rebuild_tensor_v2, "abc")
    assert np.dtype("float32").name == "float32"
    save_pth({"w": np.ones(2, np.float32)}, tmp_path / "fine.pth")
    np.testing.assert_array_equal(load_pth(tmp_path / "fine.pth")["w"], np.ones(2, np.float32))


def test_truncated_and_random_files(tmp_path: pathlib.Path, ref_dir: pathlib.Path) -> None:
    raw = (ref_dir / "tiny_checkpoint.pth").read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(PthFormatError, match="truncated.pth"):
        load_pth(truncated)
    noise = tmp_path / "noise.pth"
    noise.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(PthFormatError, match="noise.pth"):
        load_pth(noise)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(PthFormatError, match="empty.pth"):
        load_pth(empty)
    with pytest.raises(PthFormatError, match="missing.pth"):
        load_pth(tmp_path / "missing.pth")


def test_missing_and_short_data_records(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "good.pth"
    save_pth({"w": np.arange(4, dtype=np.float32)}, path)
    with zipfile.ZipFile(path) as zf:
        records = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
    pkl = records.pop("data.pkl")
    missing = tmp_path / "missing_record.pth"
    _zip_with_pickle(missing, pkl)
    with pytest.raises(PthFormatError, match=r"missing_record\.pth.*missing_record/data/0"):
        load_pth(missing)
    short = tmp_path / "short.pth"
    _zip_with_pickle(short, pkl, {"data/0": records["data/0"][:8]})
    with pytest.raises(PthFormatError, match="short.pth"):
        load_pth(short)
    no_pkl = tmp_path / "no_pkl.pth"
    with zipfile.ZipFile(no_pkl, "w") as zf:
        zf.writestr("no_pkl/version", b"3\n")
    with pytest.raises(PthFormatError, match="data.pkl"):
        load_pth(no_pkl)


def test_legacy_format_and_unsupported_dtype(tmp_path: pathlib.Path) -> None:
    torch = pytest.importorskip("torch")
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(PthFormatError, match="_use_new_zipfile_serialization=True") as err:
        load_pth(legacy)
    assert "legacy.pth" in str(err.value)
    chalf = tmp_path / "chalf.pth"
    with pytest.warns(UserWarning):
        torch.save({"w": torch.zeros(2, dtype=torch.complex32)}, chalf)
    with pytest.raises(PthFormatError, match="complex32"):
        load_pth(chalf)
    # An unknown storage type is named.
    path = tmp_path / "qstorage.pth"
    pid = (
        b"(X\x07\x00\x00\x00storage"
        b"ctorch\nQInt8Storage\n"
        b"X\x01\x00\x00\x000"
        b"X\x03\x00\x00\x00cpu"
        b"K\x02"
        b"tQ"
    )
    _zip_with_pickle(path, b"\x80\x02" + pid + b".", {"data/0": b"\0\0"})
    with pytest.raises(PthFormatError, match="QInt8Storage"):
        load_pth(path)


def test_str_path_and_numpy_scalars(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "p.pth"
    save_pth({"x": np.float32(1.5), "n": np.int64(3)}, str(path))
    out = load_pth(os.fspath(path))
    assert out == {"x": 1.5, "n": 3} and type(out["n"]) is int
