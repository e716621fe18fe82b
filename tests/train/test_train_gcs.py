"""Training runs whose workdir is a gs:// URL, against a real GCS server (fake-gcs-server).

The stand-in network (tests/toy_model.py) keeps compiles cheap: preemption (SIGTERM), resume,
the compilation cache on gs:// and two processes sharing one gs:// workdir. The tiny preset
through scripts/train.py trains, resumes after losing its last checkpoint, and exports the EMA
``.pth`` into the bucket. A TFDS data_dir on gs://: prepare_data.py uploads the demo datasets,
a toy run stages and reads them. Nothing may appear on local disk under a ``gs:`` folder.
"""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import TINY_TWO_STEPS, assert_trees_close, free_port, subprocess_env
from toy_model import restore_toy, toy_command

from configs import fgtbt
from fgtbt_jax import checkpointing, load_pretrained, paths
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert

ROOT = pathlib.Path(__file__).parents[2]
# TensorFlow's GCS client (TensorBoard) cannot be pointed at the emulator: docs/storage.md.
NO_TB = {"tensorboard": False}


def _start(cwd: pathlib.Path, gcs_env: dict, args: dict, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        toy_command(args),
        cwd=cwd,
        env=subprocess_env(**gcs_env, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _run(cmd: list[str], cwd: pathlib.Path, gcs_env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, cwd=cwd, env=subprocess_env(**gcs_env), capture_output=True, text=True, timeout=900
    )


def _steps(text: str) -> list[int]:
    return [json.loads(x)["step"] for x in text.splitlines()]


def test_sigterm_resume_and_compilation_cache_on_gcs(gcs_server, gcs_bucket, tmp_path):
    run, cache = f"{gcs_bucket}/run", f"{gcs_bucket}/jax_cache"
    overrides = {**NO_TB, "compilation_cache_dir": cache}
    # Every compile goes to the cache (the toy step compiles in well under a second).
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    go = tmp_path / "go"
    local = _start(
        tmp_path, gcs_server.env, {"workdir": str(tmp_path / "local"), "overrides": NO_TB}
    )
    cut = _start(
        tmp_path,
        gcs_server.env,
        {"workdir": run, "overrides": overrides, "pause_at": 3, "go": str(go)},
        **env,
    )
    before = []
    for line in cut.stdout:
        before.append(line)
        if line.startswith("AT_STEP 3"):
            break
    else:
        raise AssertionError(cut.stderr.read()[-5000:])
    cut.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    go.touch()
    out, err = cut.communicate(timeout=300)
    out = "".join(before) + out
    assert cut.returncode == 143, err[-5000:]
    assert "preempted: saved step 3" in out, out
    assert "train step compiled, not found in the compilation cache" in out, out
    objects = gcs_server.objects(run)
    steps = {int(n.split("/")[2]) for n in objects if n.startswith("run/checkpoints/")}
    assert steps == {2, 3}, objects
    assert _steps(gcs_server.read(f"{run}/metrics.jsonl").decode()) == [1, 2, 3]

    resumed = _start(tmp_path, gcs_server.env, {"workdir": run, "overrides": overrides}, **env)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-5000:]
    assert "resuming at step 3/6" in out, out
    assert "train step loaded from the compilation cache" in out, out
    out_local, err_local = local.communicate(timeout=300)
    assert local.returncode == 0, err_local[-5000:]

    # Each step's line exactly once, with the uninterrupted local run's losses.
    remote_log = [json.loads(x) for x in gcs_server.read(f"{run}/metrics.jsonl").splitlines()]
    local_log = [
        json.loads(x) for x in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in remote_log] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in remote_log] == [r["loss"] for r in local_log]
    # The state read back from the bucket in this process equals the local run's, bit for bit.
    a, b = restore_toy(run, 6), restore_toy(tmp_path / "local", 6)
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))
    assert any(n.startswith("jax_cache/") for n in gcs_server.objects(gcs_bucket))
    assert not any(n.startswith("run/tb/") for n in gcs_server.objects(run))
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()


def test_two_processes_share_one_gcs_workdir(gcs_server, gcs_bucket, tmp_path):
    overrides = {**NO_TB, "sharding.cross_device_stats": True, "total_steps": 4}
    run, port = f"{gcs_bucket}/two", str(free_port())
    procs = [
        _start(
            tmp_path,
            gcs_server.env,
            {"workdir": run, "overrides": overrides},
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    single = _start(
        tmp_path, gcs_server.env, {"workdir": str(tmp_path / "one"), "overrides": overrides}
    )
    outputs = [p.communicate(timeout=300) for p in (*procs, single)]
    for p, (out, err) in zip((*procs, single), outputs, strict=True):
        assert p.returncode == 0, (out + err)[-6000:]
    assert "on 2 device(s), 2 process(es)" in outputs[0][0], outputs[0][0]

    # One orbax checkpoint written together, equal to the one-process local run up to
    # float summation order (see test_train_multiprocess.py).
    assert_trees_close(
        restore_toy(run, 4, **overrides), restore_toy(tmp_path / "one", 4, **overrides)
    )
    log = [json.loads(x) for x in gcs_server.read(f"{run}/metrics.jsonl").splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()


@pytest.mark.slow  # the tiny preset's train step (TINY_TWO_STEPS: test_train_script.py's program)
def test_tiny_preset_on_gcs_resumes_and_exports_ema_pth(gcs_server, gcs_bucket, tmp_path):
    run = f"{gcs_bucket}/tiny"
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py")]
    cmd += ["--config", f"{ROOT}/configs/fgtbt.py:tiny", "--workdir", run]
    cmd += [*TINY_TWO_STEPS, "--config.tensorboard=false"]

    def train() -> str:
        proc = _run(cmd, tmp_path, gcs_server.env)
        assert proc.returncode == 0, proc.stderr[-6000:]
        return proc.stdout

    out = train()
    assert f"exported EMA weights of step 2 to {run}/fgtbt_ema.pth" in out, out
    assert _steps(gcs_server.read(f"{run}/metrics.jsonl").decode()) == [1, 2]
    # As if the host died after logging step 2, before its checkpoint was committed: the rerun
    # resumes at step 1 from the bucket and trains step 2 again with the same program (from the
    # test run's compilation cache, tests/conftest.py), logging it once more.
    paths.resolve(f"{run}/checkpoints/2", "test").rmtree()
    out = train()
    assert "resuming at step 1/2" in out, out
    assert f"exported EMA weights of step 2 to {run}/fgtbt_ema.pth" in out, out
    objects = gcs_server.objects(run)
    steps = {int(n.split("/")[2]) for n in objects if n.startswith("tiny/checkpoints/")}
    assert steps == {1, 2}, objects
    assert _steps(gcs_server.read(f"{run}/metrics.jsonl").decode()) == [1, 2]
    assert not [n for n in objects if "tmp" in n.rsplit("/", 1)[-1]], objects

    # The exported .pth (read from the bucket) holds the last checkpoint's EMA weights.
    config = fgtbt.get_config("tiny")
    _, exported = load_pretrained(f"{run}/fgtbt_ema.pth", config)
    model = build_model(config.model)
    ema = checkpointing.restore_eval_variables(
        run, convert.abstract_variables(model, config.img_size)
    )
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not (tmp_path / "gs:").exists()


def test_metric_lines_once_after_resumes_on_gcs(gcs_server, gcs_bucket):
    from fgtbt_jax.train import writers

    workdir = f"{gcs_bucket}/w"

    def segment(start: int, train_steps: list[int], eval_steps: list[int] = ()) -> None:
        w = writers.MetricWriter(workdir, start, tensorboard=False)
        for s in train_steps:
            w.write_train(s, {"loss": float(s + 10 * start)})
        for s in eval_steps:
            w.write_eval(s, {"nme_300W": 0.1})
        w.close()

    segment(0, [1, 2, 3], [2])  # preempted after step 3, checkpoint at 2
    segment(2, [3, 4])  # resumed at 2: step 3 again
    segment(4, [])  # restarted, nothing logged
    segment(3, [4, 5], [4])  # back to an older checkpoint
    rows = [json.loads(x) for x in gcs_server.read(f"{workdir}/metrics.jsonl").splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1), (2, 2), (3, 23), (4, 34), (5, 35)]
    rows = [json.loads(x) for x in gcs_server.read(f"{workdir}/eval.jsonl").splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert gcs_server.objects(workdir) == ["w/eval.jsonl", "w/metrics.jsonl"]


def test_demo_data_dir_on_gcs_prepared_staged_and_trained(gcs_server, gcs_bucket, tmp_path):
    """prepare_data.py writes the demo datasets to a gs:// data_dir; a toy run stages them to
    its own folder and trains; staging again copies nothing; a truncated file is fetched again."""
    from fgtbt_jax import staging

    tfds_url, stage = f"{gcs_bucket}/tfds", tmp_path / "stage"
    prep = _run(
        [sys.executable, str(ROOT / "scripts/prepare_data.py"), "--dataset=demo"]
        + ["--num_images=4", "--image_size=32", f"--data_dir={tfds_url}"]
        + [f"--stage_dir={tmp_path / 'prep_stage'}"],
        tmp_path,
        gcs_server.env,
    )
    assert prep.returncode == 0, prep.stderr[-5000:]
    up = f"uploaded {tmp_path / 'prep_stage'}/wflw/demo/1.0.0 -> {tfds_url}/wflw/demo/1.0.0: "
    assert up in prep.stderr, prep.stderr[-5000:]
    objects = gcs_server.objects(tfds_url)
    folders = {"/".join(n.split("/")[1:4]) for n in objects}
    assert folders == {f"{d}/demo/1.0.0" for d in ("wflw", "face300w", "cofw", "aflw")}, objects
    assert any(n.endswith(".array_record-00000-of-00001") for n in objects), objects

    data = {"data.source": "demo", "data.data_dir": tfds_url, "data.stage_dir": str(stage)}
    data |= {"data.demo_num_images": 4, "data.demo_image_size": (32, 32)}
    overrides = {**NO_TB, **data, "total_steps": 2}
    run = _start(
        tmp_path, gcs_server.env, {"workdir": str(tmp_path / "run"), "overrides": overrides}
    )
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, (out + err)[-6000:]
    assert gcs_server.objects(tfds_url) == objects  # read, not prepared again
    assert _steps((tmp_path / "run" / "metrics.jsonl").read_text()) == [1, 2]

    wflw = f"{tfds_url}/wflw/demo/1.0.0"
    names = [n.removeprefix("tfds/wflw/demo/1.0.0/") for n in objects if "/wflw/" in n]
    staged = sorted(p.name for p in (stage / "wflw/demo/1.0.0").iterdir())
    assert staged == sorted(names)
    again = staging.download(wflw, stage / "wflw/demo/1.0.0")
    assert (again.files, again.skipped) == (0, len(names))
    shard = next(stage.glob("wflw/demo/1.0.0/*train.array_record-*"))
    whole = shard.read_bytes()
    shard.write_bytes(whole[: len(whole) // 2])  # an interrupted copy by another tool
    again = staging.download(wflw, stage / "wflw/demo/1.0.0")
    assert (again.files, again.bytes) == (1, len(whole))
    assert shard.read_bytes() == whole == gcs_server.read(f"{wflw}/{shard.name}")
    # Both directions mirror: a file gone from one side is deleted on the other.
    (stage / "wflw/demo/1.0.0/stray.txt").write_text("x")
    assert staging.upload(stage / "wflw/demo/1.0.0", wflw).files == 1
    assert "tfds/wflw/demo/1.0.0/stray.txt" in gcs_server.objects(wflw)
    (stage / "wflw/demo/1.0.0/stray.txt").unlink()
    assert staging.upload(stage / "wflw/demo/1.0.0", wflw).files == 0
    assert gcs_server.objects(tfds_url) == objects
    (stage / "wflw/demo/1.0.0/stray.txt").write_text("x")
    staging.download(wflw, stage / "wflw/demo/1.0.0")
    assert not (stage / "wflw/demo/1.0.0/stray.txt").exists()
    assert not (tmp_path / "gs:").exists() and not (ROOT / "gs:").exists()
