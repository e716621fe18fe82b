"""scripts/train.py's whole lifecycle on two processes (``jax.distributed``, one CPU each).

The real tiny network on the demo tf.data pipeline: start → evaluation at step 0 → checkpoint
→ SIGTERM to process 1 only → both processes save the same step and exit with the preemption
code → a rerun resumes → evaluation and checkpoint at the end → EMA export. The reference is
one process with two CPU devices (same mesh size, same global batches), run without
interruption. Every orbax manager, restore and evaluation must run on both processes, or the
job dies at a barrier (issue #13).
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import free_port, subprocess_env

from configs import fgtbt
from fgtbt_jax.porting import pth

ROOT = pathlib.Path(__file__).parents[2]
TOTAL = 3
PREEMPTED = 143
TIMEOUT = 1800  # seconds per phase (generous: a busy 2-core machine compiles slowly)


def _overrides(data_dir: pathlib.Path) -> list[str]:
    return [
        f"--config.data.data_dir={data_dir}",
        f"--config.total_steps={TOTAL}",
        "--config.log_every=1",
        "--config.checkpoint_every=100",
        "--config.eval_every=100",  # evaluations at step 0 and at the end
        "--config.data.shuffle_buffer=8",
    ]


def _start(
    workdir: pathlib.Path, data_dir: pathlib.Path, name: str, **env_extra: str
) -> tuple[subprocess.Popen, pathlib.Path, pathlib.Path]:
    env = subprocess_env(
        # The rerun reuses the first run's executables.
        JAX_COMPILATION_CACHE_DIR=str(workdir.parents[1] / "jax_cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        **env_extra,
    )
    out, err = workdir.parent / f"{name}.out", workdir.parent / f"{name}.err"
    cmd = [
        sys.executable,
        "scripts/train.py",
        "--config",
        "configs/fgtbt.py:tiny",
        "--workdir",
        str(workdir),
        *_overrides(data_dir),
    ]
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=o, stderr=e)
    return proc, out, err


def _two_processes(workdir: pathlib.Path, data_dir: pathlib.Path, run: str) -> list:
    port = free_port()
    return [
        _start(
            workdir,
            data_dir,
            f"{run}_p{i}",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]


def _wait(jobs: list, timeout: float = TIMEOUT) -> list[int]:
    deadline = time.time() + timeout
    codes = []
    for proc, out, err in jobs:
        try:
            codes.append(proc.wait(timeout=max(deadline - time.time(), 1)))
        except subprocess.TimeoutExpired:
            pytest.fail(
                f"timed out; {out.name}:\n{out.read_text()[-3000:]}\n{err.read_text()[-6000:]}"
            )
    return codes


def _log(path: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@pytest.mark.slow  # three processes compile the real tiny network (~20 min at load 6 on 2 cores)
def test_two_process_lifecycle_matches_one_process_with_two_devices(tmp_path):
    from input_pipeline import pipeline

    data_dir = tmp_path / "tfds"
    config = fgtbt.get_config("tiny")
    config.data.data_dir = str(data_dir)
    pipeline.ensure_demo_data(config)  # once, shared by all runs

    one, two = tmp_path / "one" / "w", tmp_path / "two" / "w"
    one.parent.mkdir(), two.parent.mkdir()
    started: list = []
    try:
        _lifecycle(one, two, data_dir, started)
    finally:
        for p, _, _ in started:
            if p.poll() is None:
                p.kill()


def _lifecycle(one: pathlib.Path, two: pathlib.Path, data_dir: pathlib.Path, started: list):
    reference = _start(one, data_dir, "one", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    first = _two_processes(two, data_dir, "first")
    started += [reference, *first]

    # SIGTERM to process 1 once the step-0 evaluation is logged (the train step still has to
    # compile, so the notice arrives well before the last step).
    out0 = first[0][1]
    deadline = time.time() + TIMEOUT
    while "eval step 0:" not in out0.read_text():
        if time.time() > deadline or any(p.poll() is not None for p, _, _ in first):
            pytest.fail(f"no step-0 evaluation:\n{out0.read_text()}\n{first[0][2].read_text()}")
        time.sleep(0.1)
    first[1][0].send_signal(signal.SIGTERM)
    codes = _wait(first)
    assert codes == [PREEMPTED, PREEMPTED], [e.read_text()[-4000:] for _, _, e in first]
    saved = int(out0.read_text().split("preempted: saved step ")[1].split(";")[0])
    assert 1 <= saved < TOTAL
    assert not (two / "fgtbt_ema.pth").exists()

    second = _two_processes(two, data_dir, "second")
    started += second
    codes = _wait([*second, reference])
    assert codes == [0, 0, 0], [e.read_text()[-4000:] for _, _, e in (*second, reference)]
    assert f"resuming at step {saved}/{TOTAL}" in second[0][1].read_text()
    # Process 1 prints nothing of its own; process 0 reports for the job.
    assert "step" not in first[1][1].read_text() + second[1][1].read_text()

    # The exported EMA weights equal the single-process run's, bit for bit.
    a, b = pth.load_pth(two / "fgtbt_ema.pth"), pth.load_pth(one / "fgtbt_ema.pth")
    assert a["epoch"] == b["epoch"] == TOTAL
    assert a["model"]["sd"].keys() == b["model"]["sd"].keys()
    for k, v in a["model"]["sd"].items():
        np.testing.assert_array_equal(v, b["model"]["sd"][k], err_msg=k)

    # Metrics written once (process 0), every step exactly once across the preemption, and
    # the same losses as the single-process run.
    rows_two, rows_one = _log(two / "metrics.jsonl"), _log(one / "metrics.jsonl")
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2, 3]
    np.testing.assert_array_equal([r["loss"] for r in rows_two], [r["loss"] for r in rows_one])
    evals_two, evals_one = _log(two / "eval.jsonl"), _log(one / "eval.jsonl")
    assert [r["step"] for r in evals_two] == [r["step"] for r in evals_one] == [0, TOTAL]
    for x, y in zip(evals_two, evals_one, strict=True):
        assert x.keys() == y.keys()
        np.testing.assert_allclose([x[k] for k in x], [y[k] for k in x], rtol=1e-6)
