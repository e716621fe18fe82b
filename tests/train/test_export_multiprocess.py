"""The EMA export of a workdir on two processes (issue #13): both restore, process 0 writes.

orbax's ``CheckpointManager`` waits at a barrier for every process, so an export called by
process 0 alone hangs until the coordination service kills the job. No network is compiled:
the checkpoint holds seeded random weights of the tiny network's shapes.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from configs import fgtbt
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert, pth

ROOT = pathlib.Path(__file__).parents[2]

SCRIPT = textwrap.dedent(
    """
    import pathlib, sys
    from fgtbt_jax.train import sharding
    sharding.maybe_initialize_distributed()
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from configs import fgtbt
    from fgtbt_jax.models.fgtbt import build_model
    from fgtbt_jax.porting import convert, pretrained
    from fgtbt_jax.train import checkpointing
    from fgtbt_jax.train.state import TrainState

    work = pathlib.Path(sys.argv[1])
    config = fgtbt.get_config("tiny")
    abstract = convert.abstract_variables(build_model(config.model), config.img_size)
    rng = np.random.default_rng(0)
    host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
    rep = NamedSharding(sharding.make_mesh(), P())
    v = jax.tree.map(lambda x: jax.device_put(x, rep), host)
    state = TrainState(
        step=jax.device_put(np.int32(5), rep), params=v["params"], batch_stats=v["batch_stats"],
        opt_state={}, ema_params=v["params"], ema_batch_stats=v["batch_stats"],
        rng=jax.device_put(np.zeros(2, np.uint32), rep),
    )
    with checkpointing.Checkpointer(work) as ckpt:
        ckpt.save(state)
    print("EXPORTED", pretrained.export_ema_pth(work, work / "ema.pth", config), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_export_on_two_processes_written_once(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT))
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SCRIPT, str(tmp_path)],
            cwd=ROOT,
            env={
                **env,
                "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                "JAX_NUM_PROCESSES": "2",
                "JAX_PROCESS_ID": str(i),
            },
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
