"""A base install (``pip install -e .``, no extras) trains on synthetic batches: train.py runs
with every optional package made unimportable."""

from __future__ import annotations

import pathlib
import subprocess

from helpers import ROOT, blocked_command, subprocess_env

from fgtbt_jax.porting import pth

# The extras' packages (data, torch, export, clu's metric writers).
EXTRAS = (
    "cv2", "tensorflow", "tensorflow_datasets", "h5py", "matplotlib", "torch", "clu",
    "tensorboard", "onnx", "onnxruntime", "jax2onnx",
)  # fmt: skip


def test_train_on_synthetic_batches_without_extras(tmp_path: pathlib.Path):
    cmd = blocked_command(
        EXTRAS,
        ROOT / "scripts" / "train.py",
        "--config", f"{ROOT / 'configs' / 'fgtbt.py'}:tiny",
        "--config.data.source=synthetic",
        "--config.data.batch_per_dataset=1",  # test_train_script's programs: compiled once
        "--config.total_steps=2",
        "--config.eval_every=0",
        "--config.checkpoint_every=2",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    res = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, timeout=900, env=subprocess_env()
    )
    assert res.returncode == 0, res.stdout + res.stderr
    assert "BLOCKED_MODULES_LOADED []" in res.stdout, res.stdout + res.stderr
    exported = list(tmp_path.glob("*.pth"))
    assert len(exported) == 1, sorted(p.name for p in tmp_path.iterdir())
    assert "model" in pth.load_pth(exported[0])
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") >= 1
