"""Two processes through ``jax.distributed`` (CPU, Gloo collectives on localhost) train like one.

Each process runs ``fgtbt_jax.train.trainer``'s loop (toy network, see tests/toy_model.py) on
its half of every global batch (``synthetic.process_rows``) with BatchNorm / CSAM-style
statistics across both processes, and writes one orbax checkpoint together. The result equals
a single-process run on the same global batches up to float summation order (the processes'
rows reach the global array in another order: rounds of datasets instead of dataset blocks).
"""

from __future__ import annotations

import json
import pathlib
import subprocess

import numpy as np
from helpers import assert_trees_close, free_port, subprocess_env
from toy_model import restore_toy, toy_command

ROOT = pathlib.Path(__file__).parents[2]
OVERRIDES = {"sharding.cross_device_stats": True, "total_steps": 4}


def _start(workdir: pathlib.Path, **env_extra: str) -> subprocess.Popen:
    env = subprocess_env(**env_extra)
    args = {"workdir": str(workdir), "overrides": OVERRIDES}
    return subprocess.Popen(
        toy_command(args),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_processes_match_one(tmp_path):
    port = str(free_port())
    procs = [
        _start(
            tmp_path / "two",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    single = _start(tmp_path / "one")
    outputs = [p.communicate(timeout=300) for p in (*procs, single)]
    for p, (out, err) in zip((*procs, single), outputs, strict=True):
        assert p.returncode == 0, (out + err)[-6000:]
    # Process 0 reports for both; the mesh spans the two processes' devices.
    assert "on 2 device(s), 2 process(es)" in outputs[0][0], outputs[0][0]
    assert "cross-device batch statistics" in outputs[0][0]
    assert "train step memory per device: argument" in outputs[0][0]
    assert "step 4/4" in outputs[0][0] and "step" not in outputs[1][0], outputs[1][0]

    assert_trees_close(
        restore_toy(tmp_path / "two", 4, **OVERRIDES), restore_toy(tmp_path / "one", 4, **OVERRIDES)
    )
    losses = [
        [json.loads(x)["loss"] for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("two", "one")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    assert len(losses[0]) == 4
