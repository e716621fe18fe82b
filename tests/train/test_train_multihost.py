"""The trainer's whole lifecycle on two processes (``jax.distributed``, one CPU each).

The stand-in network (tests/toy_model.py, through ``train_and_evaluate`` as scripts/train.py
calls it) on the demo tf.data pipeline: start → evaluation at step 0 → SIGTERM to process 1
only → both processes save the same step and exit with the preemption code → a rerun resumes →
evaluation and checkpoint at the end. The reference is one process with two CPU devices (same
mesh size, same global batches), run without interruption. Every orbax manager, restore and
evaluation must run on both processes, or the job dies at a barrier (issue #13). The EMA export
on two processes is tests/train/test_export_multiprocess.py; the real network's train step is
held to the reference in test_train_step.py.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import time

import jax
import numpy as np
import pytest
from helpers import free_port, subprocess_env
from toy_model import restore_toy, toy_command

from configs import fgtbt

ROOT = pathlib.Path(__file__).parents[2]
TOTAL = 3
PAUSE = 2  # process 1 gets SIGTERM while both wait for step 2's batch
PREEMPTED = 143
TIMEOUT = 600  # seconds per phase (generous: a busy 2-core machine)


def _overrides(data_dir: pathlib.Path) -> dict:
    return {
        "data.source": "demo",
        "data.data_dir": str(data_dir),
        "data.shuffle_buffer": 8,
        "data.batch_per_dataset": 2,  # one share per process
        "total_steps": TOTAL,
        "checkpoint_every": 100,
        "eval_every": 100,  # evaluations at step 0 and at the end
    }


def _start(
    workdir: pathlib.Path, data_dir: pathlib.Path, name: str, pause: bool = False, **env_extra: str
) -> tuple[subprocess.Popen, pathlib.Path, pathlib.Path]:
    args = {"workdir": str(workdir), "overrides": _overrides(data_dir)}
    if pause:
        args.update(pause_at=PAUSE, go=str(workdir.parent / "go"))
    out, err = workdir.parent / f"{name}.out", workdir.parent / f"{name}.err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(
            toy_command(args), cwd=ROOT, env=subprocess_env(**env_extra), stdout=o, stderr=e
        )
    return proc, out, err


def _two_processes(workdir: pathlib.Path, data_dir: pathlib.Path, run: str, **kw) -> list:
    port = free_port()
    return [
        _start(
            workdir,
            data_dir,
            f"{run}_p{i}",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
            **kw,
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
    first = _two_processes(two, data_dir, "first", pause=True)
    started += [reference, *first]

    # SIGTERM to process 1 once both processes wait for step PAUSE's batch (after the step-0
    # evaluation and step 1), then let them go on: both save that step and stop.
    deadline = time.time() + TIMEOUT
    while not all(f"AT_STEP {PAUSE}" in out.read_text() for _, out, _ in first):
        if time.time() > deadline or any(p.poll() is not None for p, _, _ in first):
            pytest.fail(
                "\n".join(out.read_text() + err.read_text()[-3000:] for _, out, err in first)
            )
        time.sleep(0.1)
    out0 = first[0][1]
    assert "eval step 0:" in out0.read_text()
    first[1][0].send_signal(signal.SIGTERM)
    # The coordination service agrees on the stop step from the steps the processes have
    # reached (1): give the notice time to reach every process before step 2 runs.
    while "SIGTERM caught" not in first[1][2].read_text():
        if time.time() > deadline:
            pytest.fail(first[1][2].read_text()[-3000:])
        time.sleep(0.1)
    time.sleep(3)
    (two.parent / "go").touch()
    codes = _wait(first)
    assert codes == [PREEMPTED, PREEMPTED], [e.read_text()[-4000:] for _, _, e in first]
    saved = int(out0.read_text().split("preempted: saved step ")[1].split(";")[0])
    assert 1 <= saved < TOTAL

    second = _two_processes(two, data_dir, "second")
    started += second
    codes = _wait([*second, reference])
    assert codes == [0, 0, 0], [e.read_text()[-4000:] for _, _, e in (*second, reference)]
    assert f"resuming at step {saved}/{TOTAL}" in second[0][1].read_text()
    # Process 1 prints nothing of its own; process 0 reports for the job.
    assert "step" not in first[1][1].read_text() + second[1][1].read_text()

    # The final state (parameters, EMA, optimizer, BatchNorm statistics) equals the
    # single-process run's, bit for bit.
    over = _overrides(data_dir)
    a, b = restore_toy(two, TOTAL, **over), restore_toy(one, TOTAL, **over)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)

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
