"""Preemption and resumption of scripts/train.py, and crash-safety of checkpoint saves.

The training loop runs in subprocesses with the small stand-in network (tests/toy_model.py)
through ``train_and_evaluate(..., build=...)`` so that compiling stays cheap; the loop,
checkpointing, data position and RNG handling are the script's own.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
from helpers import subprocess_env
from toy_model import restore_toy, toy_command

from fgtbt_jax import checkpointing
from fgtbt_jax.train import sharding
from fgtbt_jax.train import state as train_state

ROOT = pathlib.Path(__file__).parents[2]


def _start(args: dict) -> subprocess.Popen:
    return subprocess.Popen(
        toy_command(args),
        cwd=ROOT,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _log(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    go = tmp_path / "go"
    uninterrupted = _start({"workdir": str(full)})
    interrupted = _start({"workdir": str(cut), "pause_at": 3, "go": str(go)})
    # Wait until the interrupted run is about to take step 3, then send SIGTERM for real.
    for line in interrupted.stdout:
        if line.startswith("AT_STEP 3"):
            break
    else:
        raise AssertionError(interrupted.stderr.read()[-5000:])
    interrupted.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    go.touch()
    out, err = interrupted.communicate(timeout=240)
    assert interrupted.returncode == 143, err[-5000:]
    assert "preempted: saved step 3" in out, out
    # The goodput summary of the preempted run: logged, and its parts add up to its wall time.
    assert "preempted, goodput" in out, out
    summary = json.loads((cut / "goodput.json").read_text())
    assert abs(sum(summary["parts_s"].values()) - summary["wall_s"]) < 1.0, summary
    # Steps 2 (regular) and 3 (on SIGTERM; checkpoint_every = 2) exist, nothing later.
    with checkpointing.Checkpointer(cut) as ckpt:
        assert ckpt.all_steps() == [2, 3]

    resumed = _start({"workdir": str(cut)})
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-5000:]
    assert "resuming at step 3/6" in out, out
    out_full, err_full = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, err_full[-5000:]

    # Same parameters, optimizer state, EMA, batch statistics and RNG: bit for bit.
    a, b = restore_toy(full, 6), restore_toy(cut, 6)
    assert int(a.step) == int(b.step) == 6
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))
    # The resumed log continues the interrupted one with the same losses.
    log_full, log_cut = _log(full), _log(cut)
    assert [r["step"] for r in log_cut] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in log_cut] == [r["loss"] for r in log_full]
    assert (cut / "tb").is_dir() and any((cut / "tb").iterdir())


SAVER = textwrap.dedent(
    """
    import os, signal, sys
    import jax.numpy as jnp
    from fgtbt_jax import checkpointing
    from fgtbt_jax.train import state as train_state

    def state(step):
        big = {"w": jnp.full((4096, 4096), float(step)), "b": jnp.arange(3.0) + step}
        return train_state.TrainState(
            step=jnp.int32(step), params=big, batch_stats={"n": jnp.int32(step)},
            opt_state={"mu": big["b"] * 2}, ema_params=big, ema_batch_stats={"n": jnp.int32(0)},
            rng=jnp.zeros(2, jnp.uint32))

    ckpt = checkpointing.Checkpointer(sys.argv[1])
    ckpt.save(state(1))
    ckpt.wait()
    ckpt.save(state(2))  # asynchronous: returns while the files are being written
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def _abstract() -> train_state.TrainState:
    big = {
        "w": jax.ShapeDtypeStruct((4096, 4096), jnp.float32),
        "b": jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    return jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(
            a.shape, a.dtype, sharding=sharding.replicated(sharding.make_mesh(1))
        ),
        train_state.TrainState(
            step=i32,
            params=big,
            batch_stats={"n": i32},
            opt_state={"mu": jax.ShapeDtypeStruct((3,), jnp.float32)},
            ema_params=big,
            ema_batch_stats={"n": i32},
            rng=jax.ShapeDtypeStruct((2,), jnp.uint32),
        ),
    )


def test_killed_save_keeps_last_good_checkpoint(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SAVER, str(tmp_path)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-5000:]
    ckdir = tmp_path / "checkpoints"
    # Killed mid-write: step 2 is only a temporary directory (orbax renames it when complete).
    names = sorted(p.name for p in ckdir.iterdir())
    assert "1" in names and "2" not in names and "2.orbax-checkpoint-tmp" in names, names

    # A stale temporary directory as a crash in any other phase would leave it.
    stale = ckdir / "7.orbax-checkpoint-tmp-1700000000000000"
    (stale / "state").mkdir(parents=True)
    (stale / "state" / "garbage").write_bytes(b"\0" * 10)

    with checkpointing.Checkpointer(tmp_path) as ckpt:
        assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
        state = ckpt.restore(_abstract())
        np.testing.assert_array_equal(np.asarray(state.params["w"][:2, :2]), 1.0)
        np.testing.assert_array_equal(np.asarray(state.opt_state["mu"]), [2.0, 4.0, 6.0])
        assert int(state.step) == 1
        # Saving continues normally after the crash.
        assert ckpt.save(state.replace(step=jnp.int32(2)))
    assert not [p for p in ckdir.iterdir() if "tmp" in p.name]  # cleaned up on start
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
    variables = checkpointing.restore_eval_variables(tmp_path, _abstract().ema_variables())
    np.testing.assert_array_equal(np.asarray(variables["params"]["b"]), [1.0, 2.0, 3.0])


def test_best_checkpoint_per_metric_is_kept(tmp_path):
    small = train_state.TrainState(
        step=jnp.int32(0),
        params={"w": jnp.zeros(2)},
        batch_stats={},
        opt_state={},
        ema_params={"w": jnp.zeros(2)},
        ema_batch_stats={},
        rng=jnp.zeros(2, jnp.uint32),
    )
    nme = {1: (0.5, 0.9), 2: (0.2, 0.8), 4: (0.3, 0.1)}  # (nme_300W, nme_WFLW)
    with checkpointing.Checkpointer(
        tmp_path, keep=2, best_metrics=("nme_300W", "nme_WFLW")
    ) as ckpt:
        for step in range(1, 8):
            m = nme.get(step)
            metrics = {"nme_300W": m[0], "nme_WFLW": m[1]} if m else None
            ckpt.save(small.replace(step=jnp.int32(step)), metrics=metrics)
        ckpt.wait()
        # Last two, best 300W (step 2), best WFLW (step 4).
        assert ckpt.all_steps() == [2, 4, 6, 7]
        assert ckpt.metrics(2) == {"nme_300W": 0.2, "nme_WFLW": 0.8}
        assert ckpt.manager.best_step() == 2


def test_killed_during_async_save_resumes_from_last_commit(tmp_path):
    """SIGKILL while the trainer's asynchronous save of step 4 is in flight: the rerun resumes
    from step 2, the last committed checkpoint, and ends bit-identical to an uninterrupted run."""
    big = {"model.toy_ballast": 2**24}  # 64 MiB parameter: the write outlives the kill
    full, cut = tmp_path / "full", tmp_path / "cut"
    uninterrupted = _start({"workdir": str(full), "overrides": big})
    killed = _start({"workdir": str(cut), "overrides": big, "kill_after_save": 4})
    out, err = killed.communicate(timeout=240)
    assert killed.returncode == -signal.SIGKILL, err[-5000:]
    assert "SAVING 4" in out, out
    names = sorted(p.name for p in (cut / "checkpoints").iterdir())
    assert "2" in names and "4" not in names, names  # step 4 was not committed
    assert any(n.startswith("4.orbax-checkpoint-tmp") for n in names), names

    resumed = _start({"workdir": str(cut), "overrides": big})
    out, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err[-5000:]
    assert "resuming at step 2/6" in out, out
    out_full, err_full = uninterrupted.communicate(timeout=240)
    assert uninterrupted.returncode == 0, err_full[-5000:]

    a, b = restore_toy(full, 6, **big), restore_toy(cut, 6, **big)
    assert int(a.step) == int(b.step) == 6
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))
    assert [r["loss"] for r in _log(cut)] == [r["loss"] for r in _log(full)]
