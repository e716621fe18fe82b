"""ONNX and StableHLO export of the tiny reference checkpoint, checked in their runtimes, and
``detect.py --backend onnx`` with JAX, Flax and TensorFlow made unimportable."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("jax2onnx")
pytest.importorskip("onnxruntime")

from helpers import blocked_command, subprocess_env  # noqa: E402

from configs import fgtbt  # noqa: E402
from fgtbt_jax import load_pretrained  # noqa: E402
from fgtbt_jax.export import function, stablehlo, verify  # noqa: E402
from fgtbt_jax.export import onnx as onnx_export  # noqa: E402
from fgtbt_jax.inference import detector  # noqa: E402
from fgtbt_jax.inference.onnx_backend import OnnxPredictor  # noqa: E402
from input_pipeline.formats import read_pts  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXPORT = dict(with_flip=True, decode=True, refine="dark")  # what detect.py runs by default


@pytest.fixture(scope="module")
def tiny_dft(ref_dir):
    """(config, model, variables): the reference checkpoint with the exportable high-pass."""
    config = fgtbt.get_config("reference_tiny")
    config.model.fft = "dft"
    return config, *load_pretrained(ref_dir / "tiny_checkpoint.pth", config)


@pytest.fixture(scope="module")
def tiny_fn(tiny_dft):
    config, model, variables = tiny_dft
    return config, function.inference_fn(model, variables, **EXPORT)


@pytest.fixture(scope="module")
def onnx_path(tiny_fn, tmp_path_factory):
    """Flip + DARK decoding at batch 1 (jax2onnx cannot lower the decoding's ``%`` on a
    symbolic batch), as detect.py runs it."""
    config, fn = tiny_fn
    meta = function.metadata(config, batch="1", **EXPORT)
    proto = onnx_export.export(
        fn, config.img_size, 1, output_names=function.output_names(True), metadata=meta
    )
    assert proto.opset_import[0].version >= 18
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_onnx_decoded_matches_jax(tiny_fn, onnx_path):
    config, fn = tiny_fn
    predictor = OnnxPredictor(onnx_path)
    assert predictor.metadata["fgtbt.csam_reduction"] == "batch"
    assert (predictor.img_size, predictor.refine, predictor.with_flip) == (96, "dark", True)
    names = function.output_names(True)
    run = {"onnx": lambda x: [predictor(x)[n] for n in names]}
    rows = verify.verify(fn, names, config.img_size, run, batches=(1,))
    assert {r["output"] for r in rows} == {"points", "scores"}
    for r in rows:
        assert r["relative"] < 1e-4, r


def test_onnx_heatmaps_dynamic_batch_1_and_3(tiny_dft, tmp_path):
    config, model, variables = tiny_dft
    fn = function.inference_fn(model, variables, with_flip=False, decode=False, refine="none")
    meta = function.metadata(config, batch="dynamic", with_flip=False, decode=False, refine="none")
    proto = onnx_export.export(fn, 96, None, output_names=("heatmaps",), metadata=meta)
    (tmp_path / "hm.onnx").write_bytes(proto.SerializeToString())
    predictor = OnnxPredictor(tmp_path / "hm.onnx")
    run = {"onnx": lambda x: [predictor(x)["heatmaps"]]}
    rows = verify.verify(fn, ("heatmaps",), 96, run, batches=(1, 3))
    assert [r["batch"] for r in rows] == [1, 3]
    for r in rows:
        assert r["relative"] < 1e-4, r


def test_stablehlo_round_trip_per_sample_csam(ref_dir, tmp_path):
    """``csam_reduction=sample``: serialized, deserialized, symbolic batch, batch-independent."""
    config = fgtbt.get_config("reference_tiny")
    config.model.csam_reduction = "sample"
    model, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    fn = function.inference_fn(model, variables, with_flip=False, decode=False, refine="none")
    exported = stablehlo.export(fn, config.img_size, None)
    assert set(exported.platforms) == {"cpu", "cuda", "tpu"}
    stablehlo.save(exported, str(tmp_path / "tiny.shlo"))
    loaded = stablehlo.load(str(tmp_path / "tiny.shlo"))
    rows = verify.verify(fn, ("heatmaps",), config.img_size, {"jax.export": loaded.call})
    for r in rows:
        assert r["relative"] < 1e-5, r
    x = np.random.default_rng(0).standard_normal((3, 96, 96, 3)).astype(np.float32)
    alone = np.asarray(loaded.call(x[1:2])[0])
    batched = np.asarray(loaded.call(x)[0])
    assert verify.relative_diff(batched[1:2], alone) < 1e-5


NO_JAX = ("jax", "jaxlib", "flax", "tensorflow", "optax", "orbax")


def test_detect_onnx_backend_without_jax(onnx_path, real_faces_dir, tmp_path):
    names = ("takeo.ppm", "einstein.jpg", "breakingbad.jpg")
    boxes = {}
    for name in names:
        pts = read_pts(real_faces_dir / (pathlib.Path(name).stem + ".pts"))
        boxes[name] = [list(detector.landmark_box(pts))]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    images = [str(real_faces_dir / n) for n in names]
    common = ["--boxes", str(tmp_path / "boxes.json"), *images]
    script = str(ROOT / "scripts" / "detect.py")
    ckpt = str(ROOT / "tests" / "fixtures" / "reference" / "tiny_checkpoint.pth")
    config = str(ROOT / "configs" / "fgtbt.py") + ":reference_tiny"
    jax_cmd = [sys.executable, script, "--checkpoint", ckpt, "--config", config]
    jax_cmd += ["--out", str(tmp_path / "jax"), *common]
    onnx_cmd = blocked_command(NO_JAX, script, "--backend", "onnx")
    onnx_cmd += ["--checkpoint", str(onnx_path), "--out", str(tmp_path / "onnx"), *common]
    for cmd in (jax_cmd, onnx_cmd):
        res = subprocess.run(
            cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=subprocess_env()
        )
        assert res.returncode == 0, res.stdout + res.stderr
    assert "BLOCKED_MODULES_LOADED []" in res.stdout, res.stdout
    for name in names:
        stem = pathlib.Path(name).stem
        a = json.loads((tmp_path / "jax" / f"{stem}.json").read_text())
        b = json.loads((tmp_path / "onnx" / f"{stem}.json").read_text())
        assert len(a["faces"]) == len(b["faces"]) == 1
        pa = np.asarray(a["faces"][0]["landmarks_124"])
        pb = np.asarray(b["faces"][0]["landmarks_124"])
        assert pa.shape == (124, 2)
        assert np.abs(pa - pb).max() <= 0.01, (name, np.abs(pa - pb).max())
