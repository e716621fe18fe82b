"""Two processes (``jax.distributed`` on CPU) evaluate exactly like one.

Each process runs ``scripts/evaluate.py`` on its share of the demo 300W test set (10 images in
batches of 4: process 1 also gets a padding batch). Metrics, per-image errors and report files
must equal those of one process, and only process 0 writes the report. The trainer's
``Evaluator`` on two processes (weights as arrays spanning both processes' devices) is checked
by tests/train/test_train_multihost.py.
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


def _start(data_dir: pathlib.Path, out: pathlib.Path, **env_extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "scripts/evaluate.py",
            "--config=configs/fgtbt.py:reference_tiny",
            f"--config.data.data_dir={data_dir}",
            "--config.data.demo_num_images=4",
            f"--checkpoint={CHECKPOINT}",
            f"--out={out}",
            "--batch_size=4",
            "--datasets=300W",
        ],
        cwd=ROOT,
        env=subprocess_env(**env_extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


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

    assert not (tmp_path / "two_1").exists()  # process 1 writes nothing
    report_two = json.loads((tmp_path / "two_0" / "report.json").read_text())
    report_one = json.loads((tmp_path / "one" / "report.json").read_text())
    assert report_two == report_one
    counts = {s: m["count"] for s, m in report_one["metrics"]["reference"]["300W"].items()}
    assert counts == {"full": 10, "challenging": 4, "common": 6}
    for name in ("per_image.csv", "report.md"):
        assert (tmp_path / "two_0" / name).read_text() == (tmp_path / "one" / name).read_text()
    assert (tmp_path / "two_0" / "ced.png").stat().st_size > 10_000
