"""The EMA export of a workdir on two processes (issue #13): both restore, process 0 writes.

orbax's ``CheckpointManager`` waits at a barrier for every process, so an export called by
process 0 alone hangs until the coordination service kills the job. No network is compiled:
the checkpoint holds seeded random weights of the tiny network's shapes.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys

import jax
import numpy as np
from helpers import free_port, subprocess_env

from configs import fgtbt
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert, pth

ROOT = pathlib.Path(__file__).parents[2]

WORKER = pathlib.Path(__file__).with_name("export_worker.py")


def test_export_on_two_processes_written_once(tmp_path):
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(tmp_path)],
            cwd=ROOT,
            env=subprocess_env(
                JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                JAX_NUM_PROCESSES="2",
                JAX_PROCESS_ID=str(i),
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, (out + err)[-6000:]
        assert "EXPORTED 5" in out

    config = fgtbt.get_config("tiny")
    model = build_model(config.model)
    abstract = convert.abstract_variables(model, config.img_size)
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    expected = convert.state_dict_from_variables(host, model, config.img_size)
    written = pth.load_pth(tmp_path / "ema.pth")
    assert written["epoch"] == 5
    assert written["model"]["sd"].keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_array_equal(written["model"]["sd"][k], v, err_msg=k)
