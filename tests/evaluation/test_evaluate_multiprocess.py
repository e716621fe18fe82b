"""Two processes (``jax.distributed`` on CPU) evaluate exactly like one.

Each process runs the trainer's ``Evaluator`` (with the weights as arrays spanning both
processes' devices, as in a multi-host trainer) and then ``scripts/evaluate.py``, on its share
of the demo 300W test set (10 images in batches of 4: process 1 also gets a padding batch).
Metrics, per-image errors and report files must equal those of one process, and only process 0
writes the report.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

from helpers import free_port, subprocess_env

from configs import fgtbt

ROOT = pathlib.Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "tests" / "fixtures" / "reference" / "tiny_checkpoint.pth"

WORKER = pathlib.Path(__file__).with_name("evaluate_worker.py")


def _start(data_dir: pathlib.Path, out: pathlib.Path, **env_extra: str) -> subprocess.Popen:
    env = subprocess_env(**env_extra)
    args = {"data_dir": str(data_dir), "checkpoint": str(CHECKPOINT), "out": str(out)}
    return subprocess.Popen(
        [sys.executable, str(WORKER), json.dumps(args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _evaluator_metrics(stdout: str) -> dict[str, float]:
    lines = [x for x in stdout.splitlines() if x.startswith("EVALUATOR ")]
    assert len(lines) == 1, stdout[-3000:]
    return json.loads(lines[0].removeprefix("EVALUATOR "))


def test_two_processes_evaluate_like_one(tmp_path):
    from input_pipeline import pipeline

    config = fgtbt.get_config("reference_tiny")
    config.data.data_dir = str(tmp_path / "tfds")
    config.data.demo_num_images = 4
    pipeline.ensure_demo_data(config)  # once, before the processes read it
    assert pipeline.eval_size(config, "300W", variant="demo") == 10

    port = str(free_port())
    procs = [
        _start(
            tmp_path / "tfds",
            tmp_path / f"two_{i}",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(i),
        )
        for i in range(2)
    ]
    shutil.copytree(tmp_path / "tfds", tmp_path / "tfds_one")  # runs never share a data_dir
    single = _start(tmp_path / "tfds_one", tmp_path / "one")
    outputs = [p.communicate(timeout=900) for p in (*procs, single)]
    for p, (out, err) in zip((*procs, single), outputs, strict=True):
        assert p.returncode == 0, (out + err)[-6000:]

    two = [_evaluator_metrics(out) for out, _ in outputs[:2]]
    one = _evaluator_metrics(outputs[2][0])
    assert two[0] == two[1] == one  # exact, on every process
    assert set(one) >= {"nme_300W", "standard/300W/full/nme_inter_pupil"}

    assert not (tmp_path / "two_1").exists()  # process 1 writes nothing
    report_two = json.loads((tmp_path / "two_0" / "report.json").read_text())
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report_two == report_one
    counts = {s: m["count"] for s, m in report_one["metrics"]["reference"]["300W"].items()}
    assert counts == {"full": 10, "challenging": 4, "common": 6}
    for name in ("per_image.csv", "report.md"):
        assert (tmp_path / "two_0" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert (tmp_path / "two_0" / "ced.png").stat().st_size > 10_000
