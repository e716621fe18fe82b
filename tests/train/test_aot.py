"""Ahead-of-time compilation (scripts/aot_compile.py) with the tiny preset.

The TPU test compiles through libtpu's topology description (no TPU needed) and is skipped when
libtpu is not installed (``pip install -e ".[tpu]"``). The cuda test only lowers and serializes
with ``jax.export``, which needs neither a GPU nor a CUDA plugin.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pytest
from helpers import ROOT, run_script

from fgtbt_jax.train import aot


def _run(tmp_path: pathlib.Path, *args: str) -> list[dict]:
    out = tmp_path / "aot.json"
    proc = run_script(
        "scripts/aot_compile.py",
        "--config",
        "configs/fgtbt.py:tiny",
        "--json",
        str(out),
        *args,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_parse_target():
    v4 = aot.parse_target("tpu:v4-32")  # 32 TensorCores = 16 megacore chips
    assert (v4.platform, v4.num_devices, v4.topology) == ("tpu", 16, "v4:2x2x4")
    assert aot.parse_target("tpu:v5e-8").num_devices == 8
    assert aot.parse_target("gpu:h100-8").platform == "cuda"
    for bad in ("tpu:v5e-3", "gpu:h100", "cpu:8"):
        with pytest.raises(ValueError, match="unknown target"):
            aot.parse_target(bad)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); TPU compilation needs it",
)
def test_tpu_compile_tiny(tmp_path):
    # Two XLA:TPU compiles of the tiny train step, minutes of CPU on a 2-core machine.
    rows = _run(tmp_path, "--target", "tpu:v5e-4", "--step", "train", "--sharding", "dp,fsdp")
    by = {(r["step"], r["sharding"]): r for r in rows}
    assert set(by) == {("train", "data_parallel"), ("train", "fsdp")}
    for row in rows:
        assert row["status"] == "compiled", row
        mem = row["memory_bytes"]
        assert mem["argument"] > 0 and mem["temp"] >= 0
        assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
        assert row["fits"] is True and row["flops"] > 0 and row["bytes_accessed"] > 0
        roof = row["roofline"]
        assert roof["estimate"] is True
        assert roof["step_seconds_lower_bound"] >= row["flops"] / roof["peak_flops"]
    # FSDP splits the large parameters and optimizer moments over the 4 devices.
    dp, fsdp = by["train", "data_parallel"], by["train", "fsdp"]
    assert fsdp["memory_bytes"]["argument"] < dp["memory_bytes"]["argument"]
    # The train step donates its state: XLA aliases (most of) the argument bytes to outputs.
    assert dp["memory_bytes"]["alias"] > 0


def test_cuda_export_tiny(tmp_path):
    from jax import export

    rows = _run(
        tmp_path,
        "--target",
        "gpu:h100-2",
        "--batch_per_device",
        "2",
        "--step",
        "train,eval",
        "--export_dir",
        str(tmp_path / "exported"),
    )
    assert {r["step"] for r in rows} == {"train", "eval"}
    for row in rows:
        assert row["status"] == "exported (not compiled)" and row["compiled"] is False, row
        assert row["memory_bytes"] is None and row["fits"] is None
        exported = export.deserialize(pathlib.Path(row["export_path"]).read_bytes())
        assert exported.platforms == ("cuda",)
        assert exported.nr_devices == 2
        images = [a for a in exported.in_avals if a.shape[1:] == (96, 96, 3)]
        assert [a.shape[0] for a in images] == [4]  # global batch 2 per device × 2 GPUs


def test_planning_tables_are_those_of_the_recorded_json(tmp_path):
    """docs/planning.md's tables are what scripts/aot_tables.py renders from
    benchmarks/aot_tpu_release.json: rewriting a copy of the page changes nothing."""
    page = tmp_path / "planning.md"
    page.write_text((ROOT / "docs" / "planning.md").read_text())
    proc = run_script(
        "scripts/aot_tables.py",
        "--json",
        "benchmarks/aot_tpu_release.json",
        "--markdown",
        str(page),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert page.read_text() == (ROOT / "docs" / "planning.md").read_text()
