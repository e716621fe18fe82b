"""Ahead-of-time compilation (scripts/aot_compile.py) with the tiny preset.

The TPU test compiles through libtpu's topology description (no TPU needed) and is skipped when
libtpu is not installed (``pip install -e ".[tpu]"``). The GPU compile tests use the CUDA
plugin's topology description (no GPU needed) and are skipped without it
(``pip install -e ".[gpu-aot]"``). The cuda export test only lowers and serializes with
``jax.export``, which needs neither a GPU nor a CUDA plugin.
"""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import pytest
from helpers import ROOT, needs_cuda_plugin, run_script
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import fgtbt
from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax import traffic
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.train import aot, sharding
from fgtbt_jax.train import state as train_state


def _run(tmp_path: pathlib.Path, *args: str, **env: str) -> list[dict]:
    out = tmp_path / "aot.json"
    proc = run_script(
        "scripts/aot_compile.py",
        "--config",
        "configs/fgtbt.py:tiny",
        "--json",
        str(out),
        *args,
        timeout=1800,
        **env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(out.read_text())


def test_parse_target():
    v4 = aot.parse_target("tpu:v4-32")  # 32 TensorCores = 16 megacore chips
    assert (v4.platform, v4.num_devices, v4.topology) == ("tpu", 16, "v4:2x2x4")
    assert aot.parse_target("tpu:v5e-8").num_devices == 8
    h100 = aot.parse_target("gpu:h100-8")
    assert (h100.platform, h100.num_devices, h100.topology) == ("cuda", 8, "1x1x8")
    two_hosts = aot.parse_target("gpu:h100-2x8")  # partitions x hosts x GPUs per host
    assert (two_hosts.num_devices, two_hosts.topology) == (16, "1x2x8")
    assert aot.parse_target("gpu:a100-8").chip.peak_for("float32") == 156e12  # TF32
    assert aot.parse_target("gpu:h200-8").chip.hbm_bytes > 140e9
    for bad in ("tpu:v5e-3", "gpu:h100", "cpu:8", "gpu:v100-8", "gpu:h100-0", "gpu:h100-2x"):
        with pytest.raises(ValueError, match="unknown target"):
            aot.parse_target(bad)


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); TPU compilation needs it",
)
def test_tpu_compile_tiny(tmp_path):
    # One XLA:TPU compile with FSDP of the tiny train step with one block per stage at 32²
    # (about a minute of CPU on a 2-core machine), with XLA's default flags.
    small = {"model.depths": (1, 1, 1, 1), "img_size": 32, "heatmap_size": 16}
    overrides = [f"--config.{k}={v}".replace(" ", "") for k, v in small.items()]
    (row,) = _run(
        tmp_path, "--target", "tpu:v5e-4", "--step", "train", "--sharding", "fsdp", *overrides,
        "--save_hlo", str(tmp_path / "hlo"), xla_flags="",
    )  # fmt: skip
    assert (row["step"], row["sharding"], row["status"]) == ("train", "fsdp", "compiled"), row
    # The saved optimized HLO is the program the row's traffic figures were read from.
    saved = tmp_path / "hlo" / "tpu_v5e-4" / "train_tiny_float32_fsdp_b1.hlo.txt"
    assert row["hlo_path"] == str(saved)
    assert traffic.of_hlo(saved.read_text()).summary() == row["hbm_traffic"]
    mem = row["memory_bytes"]
    assert mem["argument"] > 0 and mem["temp"] >= 0
    assert mem["total"] == mem["argument"] + mem["output"] - mem["alias"] + mem["temp"]
    assert row["fits"] is True and row["flops"] > 0 and row["bytes_accessed"] > 0
    roof = row["roofline"]
    assert roof["estimate"] is True
    assert roof["step_seconds_lower_bound"] >= row["flops"] / roof["peak_flops"]
    # FSDP splits the large parameters and optimizer moments over the 4 devices (the small ones
    # stay replicated): a device holds clearly less than the whole train state (parameters, two
    # AdamW moments, EMA, BatchNorm statistics), 70 % of it here.
    config = fgtbt.get_config("tiny")
    config.update_from_flattened_dict(small)
    tx, _ = train_state.make_optimizer(config)
    abstract = train_state.abstract_train_state(
        config, build_model(config.model), tx, sharding.make_mesh(1)
    )
    whole = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert mem["argument"] < 0.8 * whole, (mem["argument"], whole)
    # The train step donates its state: XLA aliases (most of) the argument bytes to outputs.
    assert mem["alias"] > 0.5 * mem["argument"], mem


@needs_cuda_plugin
def test_gpu_target_configs_describe_the_cards():
    """jaxlib parses every generated GpuTargetConfigProto; hosts and devices per host are those
    of the target."""
    for name in ("gpu:h100-2x4", "gpu:h200-8", "gpu:a100-8"):
        target = aot.parse_target(name)
        devices = aot.gpu_devices(target)
        assert {d.device_kind for d in devices} == {target.gpu.name}
        per_host = target.num_devices // int(target.topology.split("x")[1])
        assert [d.process_index for d in devices] == [i // per_host for i in range(len(devices))]


@needs_cuda_plugin
def test_gpu_compile_figures_of_a_matmul():
    """A deviceless XLA:GPU compile of x @ w over 8 H100s: per-device memory from the
    executable, FLOPs counted on the unoptimized program (2·M·N·K), bytes on the optimized one."""
    target = aot.parse_target("gpu:h100-8")
    mesh = aot.mesh_of(aot.gpu_devices(target))
    m, k, n = 1024, 512, 256
    x = jax.ShapeDtypeStruct((m, k), jnp.bfloat16, sharding=NamedSharding(mesh, P("data")))
    w = jax.ShapeDtypeStruct((k, n), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    lowered, compiled, _ = aot.compile_step(jax.jit(lambda x, w: x @ w), (x, w), target)
    assert compiled.cost_analysis() is None  # why compiled.py runs the HLO analysis itself
    memory = compiled_figures.memory(compiled)
    assert memory["argument"] == (m // 8 * k + k * n) * 2  # x split over 8 GPUs, w replicated
    assert memory["output"] == m // 8 * n * 2
    assert compiled_figures.lowered_cost(lowered)["flops"] == 2 * m * n * k
    # The dot is one cuBLAS call: it reads x and w and writes the result (not its workspace).
    cost = compiled_figures.optimized_cost(compiled)
    assert cost["custom calls"] == 1
    assert cost["bytes accessed"] == (m // 8 * k + k * n + m // 8 * n) * 2


@pytest.mark.slow
@needs_cuda_plugin
def test_gpu_compile_tiny(tmp_path):
    # One deviceless XLA:GPU compile of the tiny train step: minutes of CPU on a 2-core machine.
    rows = _run(tmp_path, "--target", "gpu:h100-2", "--batch_per_device", "2", "--step", "train")
    (row,) = rows
    assert row["status"] == "compiled" and row["compiled"] is True, row
    mem = row["memory_bytes"]
    assert mem["argument"] > 0 and mem["temp"] > 0 and mem["alias"] > 0  # donated state
    assert row["fits"] is True and row["hbm_bytes"] == aot.GPU_SPECS["h100"].device_memory_size
    # GEMMs and convolutions are cuBLAS/cuDNN calls in the optimized module: its count misses
    # them, the unoptimized program's does not.
    assert row["flops"] > 2 * row["flops_optimized_module"] > 0
    assert row["bytes_accessed"] > 0 and row["autotuned"] is False
    # The traffic model: no on-chip memory space on GPU; its matmul FLOPs count the cuBLAS /
    # cuDNN calls (on the shapes XLA:GPU pads for tensor cores: above XLA's count, which is on
    # the unpadded program, for this tiny model's narrow layers).
    hbm = row["hbm_traffic"]
    assert hbm["hbm_bytes"] > 0 and hbm["on_chip_bytes"] == 0
    assert 0.5 * row["flops"] < hbm["matmul_flops"] < 1.5 * row["flops"]
    assert row["roofline_hbm"]["images_per_second_per_chip_upper_bound"] > 0
    roof = row["roofline"]
    assert roof["peak_flops"] == 495e12  # float32 matmuls run as TF32 on H100
    assert roof["step_seconds_lower_bound"] >= row["flops"] / roof["peak_flops"]


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


@pytest.mark.parametrize(
    "page, rows, targets",
    [
        ("docs/planning.md", "benchmarks/aot_tpu_release.json", "tpu"),
        ("docs/planning_gpu.md", "benchmarks/aot_gpu_release.json", "gpu"),
    ],
)
def test_planning_tables_are_those_of_the_recorded_json(tmp_path, page, rows, targets):
    """docs/planning.md's (TPU) and docs/planning_gpu.md's tables are what
    scripts/aot_tables.py renders from the recorded JSON: rewriting a copy changes nothing."""
    copy = tmp_path / pathlib.Path(page).name
    copy.write_text((ROOT / page).read_text())
    proc = run_script(
        "scripts/aot_tables.py", "--targets", targets, "--json", rows, "--markdown", str(copy)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert copy.read_text() == (ROOT / page).read_text()
