"""What a step costs: per-window timing fields, FLOPs / MFU, the goodput summary, the profiler
window and the fail-fast batch check, on the toy network in this process."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import ROOT, subprocess_env
from toy_model import build_toy, toy_config

from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax.train import aot, goodput, sharding, throughput, trainer

FIELDS = ("step_time_s", "data_wait_s", "tflops_per_device", "mfu", "checkpoint_blocking_s")


def _run(workdir: pathlib.Path, **overrides: object) -> float:
    """Trains the toy network on one device; returns the wall time measured around the call."""
    config = toy_config(**{"sharding.num_devices": 1, **overrides})
    t = time.perf_counter()
    assert trainer.train_and_evaluate(config, workdir, build=build_toy) == 0
    return time.perf_counter() - t


def test_step_fields_goodput_and_profile_window(tmp_path, capsys):
    wall = _run(
        tmp_path,
        total_steps=8,
        log_every=2,
        eval_every=4,
        eval_all_every=0,
        **{"data.synthetic_eval_images": 4, "profile.start_step": 3, "profile.num_steps": 2},
    )
    out = capsys.readouterr().out

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4, 6, 8]
    summary = json.loads((tmp_path / goodput.GOODPUT_FILE).read_text())
    flops = summary["train_step"]["flops_per_step"]
    for r in rows:
        assert all(k in r for k in FIELDS), r
        assert 0 < r["data_wait_s"] <= r["step_time_s"]
        assert r["checkpoint_blocking_s"] >= 0
        assert r["mfu"] is None  # no published peak for a CPU
        np.testing.assert_allclose(r["tflops_per_device"], flops / r["step_time_s"] / 1e12)
    # Checkpoints at steps 2, 4, 6 (checkpoint_every = 2) were blocking in the next windows.
    assert all(r["checkpoint_blocking_s"] > 0 for r in rows[2:])
    events = next((tmp_path / "tb").glob("events.out.tfevents.*")).read_bytes()
    assert b"step_time_s" in events and b"tflops_per_device" in events

    # Goodput: every part present, non-negative (rest may be rounding), adding up to the wall.
    parts = summary["parts_s"]
    assert list(parts) == list(goodput.PARTS)
    assert sum(parts.values()) == pytest.approx(summary["wall_s"], abs=1.0)
    assert summary["wall_s"] == pytest.approx(wall, abs=1.0)
    assert all(v >= 0 for k, v in parts.items() if k != "rest") and parts["rest"] > -0.01
    assert parts["compile"] > 0 and parts["steps"] > 0 and parts["evaluation"] > 0
    assert parts["checkpoint"] > 0 and parts["input_wait"] > 0
    assert sum(summary["fractions"].values()) == pytest.approx(1.0, abs=1e-6)

    # Logged once: compile time, FLOPs, the input pipeline's rate; the goodput line at the end.
    assert out.count("compiled the train step in") == 1
    assert out.count("GFLOP per step") == 1 and "no published peak for 'cpu'" in out
    assert out.count("input pipeline of process 0: delivers") == 1
    assert "goodput" in out.splitlines()[-1]

    # The trace: one run directory with the XSpace protobuf, written for steps 3-4.
    runs = list((tmp_path / "plugins" / "profile").iterdir())
    assert len(runs) == 1 and list(runs[0].glob("*.xplane.pb")), runs
    assert "profiled steps 3-4 into" in out


def test_no_trace_unless_asked(tmp_path):
    _run(tmp_path, total_steps=2)
    assert not (tmp_path / "plugins").exists()
    assert (tmp_path / goodput.GOODPUT_FILE).is_file()


def test_flops_per_step_are_the_compiled_programs(tmp_path):
    """goodput.json's FLOPs per step = XLA's cost analysis of the same step compiled here."""
    _run(tmp_path, total_steps=1)
    recorded = json.loads((tmp_path / goodput.GOODPUT_FILE).read_text())["train_step"]
    config = toy_config(**{"sharding.num_devices": 1})
    step, args = aot.train_step_and_args(config, sharding.make_mesh(1), build_toy)
    expected = compiled_figures.flops(step.lower(*args).compile())
    assert expected and recorded["flops_per_step"] == expected
    assert recorded["flops_per_image"] == expected / 4 and recorded["devices"] == 1


def test_peak_table_and_mfu():
    v5e, h100 = aot.CHIPS["v5e"], aot.CHIPS["h100"]
    assert throughput.peak_flops("TPU v5 lite", "bfloat16") == v5e.peak_flops
    assert throughput.peak_flops("TPU v5e", "float32") == v5e.peak_flops
    assert throughput.peak_flops("TPU v4", "bfloat16") == aot.CHIPS["v4"].peak_flops
    assert throughput.peak_flops("TPU v5", "bfloat16") == aot.CHIPS["v5p"].peak_flops
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == h100.peak_flops
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", "float32") == h100.peak_flops / 2
    assert throughput.peak_flops("NVIDIA H100 PCIe", "bfloat16") is None
    assert throughput.peak_flops("cpu", "float32") is None
    assert throughput.peak_flops("TPU v4", "float64") is None
    cost = throughput.StepCost(
        flops_per_step=8 * 100e12,
        devices=8,
        global_batch=8,
        peak_flops_per_device=v5e.peak_flops,
        device_kind="TPU v5 lite",
    )
    w = cost.window(step_time_s=1.0)  # 100 TFLOP/s per device of 197
    assert w["tflops_per_device"] == pytest.approx(100.0)
    assert 0 < w["mfu"] <= 1 and w["mfu"] == pytest.approx(100e12 / v5e.peak_flops)


def test_batch_that_cannot_split_fails_before_any_work(tmp_path):
    # 2 of the 4 datasets, 1 image each: a global batch of 2 cannot split over 4 devices
    # (tests/conftest.py gives the test process 8 CPU devices).
    config = toy_config(**{"sharding.num_devices": 4, "data.datasets": ("COFW", "WFLW")})
    with pytest.raises(trainer.BatchShapeError, match=r"data.batch_per_dataset=2 \(a multiple"):
        trainer.train_and_evaluate(config, tmp_path / "run", build=build_toy)
    assert not (tmp_path / "run").exists()  # nothing prepared, initialised or written
    config = toy_config(**{"sharding.num_devices": 4, "data.batch_per_dataset": 3})
    mesh = sharding.make_mesh(4)
    assert trainer.check_batch(config, mesh) == 12


def test_script_says_what_to_set_for_a_pod(tmp_path):
    """scripts/train.py on 8 devices with the release's 1 image per dataset: one `error:` line
    naming data.batch_per_dataset, exit 2, no traceback, nothing written."""
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/train.py",
            "--config",
            "configs/fgtbt.py:release",
            "--workdir",
            str(tmp_path / "run"),
        ],
        cwd=ROOT,
        env=subprocess_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "global batch of 4 images" in errors[0] and "8 devices" in errors[0]
    assert "--config.data.batch_per_dataset=2" in errors[0]
    assert not (tmp_path / "run").exists()
