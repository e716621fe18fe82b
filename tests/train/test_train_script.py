"""Training end to end: scripts/train.py on the tiny preset (synthetic data, resumption, export)
and the library's ``train_and_evaluate`` in-process (evaluation hook, non-finite loss)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from helpers import subprocess_env
from toy_model import build_toy, toy_config

from configs import fgtbt
from fgtbt_jax import checkpointing, landmarks, load_pretrained
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert, pretrained
from fgtbt_jax.train import trainer

ROOT = pathlib.Path(__file__).parents[2]


def _train(workdir: pathlib.Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "scripts/train.py",
        "--config",
        "configs/fgtbt.py:tiny",
        "--workdir",
        str(workdir),
        *overrides,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )


@pytest.mark.slow  # compiles the real network's train step (1-3 min on a 2-core CPU)
def test_tiny_preset_smoke_and_resume(tmp_path):
    overrides = [
        "--config.data.source=synthetic",
        "--config.data.batch_per_dataset=1",
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=1",
        "--config.eval_every=0",
    ]
    proc = _train(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "starting step 0/2" in proc.stdout
    assert "step 2/2 loss" in proc.stdout and "img/s ETA" in proc.stdout, proc.stdout

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["lr"] == np.float32(1e-3)
        per = [r[f"loss_{n}"] for n in landmarks.DATASETS]
        np.testing.assert_allclose(sum(per), r["loss"], rtol=1e-5)
    assert rows[1]["images_per_sec"] > 0
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and b"loss_300W" in events[0].read_bytes()
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]

    # The exported release .pth holds the EMA weights of the last checkpoint.
    config = fgtbt.get_config("tiny")
    _, exported = load_pretrained(tmp_path / "fgtbt_ema.pth", config)
    model = build_model(config.model)
    ema = checkpointing.restore_eval_variables(
        tmp_path, convert.abstract_variables(model, config.img_size)
    )
    for a, b in zip(jax.tree.leaves(exported), jax.tree.leaves(ema), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The same through pretrained.restore_variables (workdir → latest EMA weights).
    again = pretrained.restore_variables(tmp_path, model, config.img_size)
    np.testing.assert_array_equal(
        np.asarray(again["params"]["decode_head"]["conv2"]["kernel"]),
        np.asarray(ema["params"]["decode_head"]["conv2"]["kernel"]),
    )

    # Running again resumes at the end: nothing left to train, the logs are kept.
    proc = _train(tmp_path, *overrides)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "resuming at step 2/2" in proc.stdout, proc.stdout
    assert "step 1/2" not in proc.stdout
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2


def _toy(workdir: pathlib.Path, overrides: dict) -> int:
    """The library's training loop in this process, with the toy network on one device."""
    config = toy_config(**{"sharding.num_devices": 1, **overrides})
    return trainer.train_and_evaluate(config, workdir, build=build_toy)


def test_evaluation_hook_and_best_checkpoints(tmp_path, capsys):
    code = _toy(
        tmp_path,
        {
            "total_steps": 4,
            "eval_every": 2,
            "eval_all_every": 4,
            "checkpoint_every": 100,
            "data.synthetic_eval_images": 4,
        },
    )
    assert code == 0
    assert "eval step 0: NME" in capsys.readouterr().out
    rows = [json.loads(x) for x in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2, 4]
    assert set(k for k in rows[1] if k.startswith("nme_")) == {"nme_300W"}  # 300W only
    assert set(k for k in rows[2] if k.startswith("nme_")) == {
        f"nme_{n}" for n in landmarks.DATASETS
    }
    for r in rows:
        assert all(np.isfinite(v) and v > 0 for k, v in r.items() if k.startswith("nme_"))
        assert "standard/300W/full/nme_inter_ocular" in r
    # Every evaluated step was checkpointed with its metrics (for best-per-dataset retention).
    with checkpointing.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [0, 2, 4]
        assert ckpt.metrics(2)["nme_300W"] == rows[1]["nme_300W"]


def test_non_finite_loss_fails_loudly(tmp_path):
    with pytest.raises(FloatingPointError, match="non-finite FMB loss"):
        _toy(tmp_path, {"total_steps": 3, "optim.lr": 1e38, "checkpoint_every": 100})
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())
