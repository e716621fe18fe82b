"""Training with a scheme dataset (docs/schemes.md): the demo MY19 scheme beside the four demo
datasets, MY19 alone, and a 124-channel checkpoint widened to the run's head (toy network or no
compile at all: the real train step is tested against the reference in test_train_step.py)."""

from __future__ import annotations

import json
import pathlib
from importlib import resources

import flax
import numpy as np
import pytest
from toy_model import build_toy, toy_config

from configs import fgtbt
from fgtbt_jax import landmarks, load_pretrained, schemes
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import pretrained
from fgtbt_jax.train import trainer

DEMO = str(resources.files("fgtbt_jax").joinpath("data/schemes/demo_my19.json"))
FIVE = (*landmarks.DATASETS, "MY19")


def _rows(workdir: pathlib.Path) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_five_demo_datasets_train_together(tmp_path, capsys):
    pytest.importorskip("tensorflow_datasets")
    config = toy_config(
        **{
            "sharding.num_devices": 1,
            "total_steps": 30,
            "checkpoint_every": 100,
            "eval_every": 100,  # evaluations at step 0 and at the end
            "optim.milestones": (100,),
            "data.batch_per_dataset": 2,
        }
    )
    config.data.source, config.data.data_dir = "demo", str(tmp_path / "tfds")
    config.data.demo_num_images, config.data.demo_image_size = 4, (96, 96)
    config.data.schemes, config.data.datasets = (DEMO,), FIVE
    assert trainer.train_and_evaluate(config, tmp_path / "w", build=build_toy) == 0
    assert config.model.num_landmarks == 133  # followed the run's unified set
    out = capsys.readouterr().out
    assert "batch 10 " in out and "MY19 " in out.split("step 30/30 loss")[1].split("]")[0]
    rows = _rows(tmp_path / "w")
    for r in rows:
        per = [r[f"loss_{n}"] for n in FIVE]
        assert all(np.isfinite(per)) and min(per) > 0
        np.testing.assert_allclose(sum(per), r["loss"], rtol=1e-5)
    my19 = np.array([r["loss_MY19"] for r in rows])
    assert my19[-5:].mean() < 0.85 * my19[:5].mean(), my19
    # Evaluation scores MY19 (its own normalization) beside the four built-in sets.
    evals = [json.loads(x) for x in (tmp_path / "w" / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 30]
    for e in evals:
        assert all(np.isfinite(e[f"nme_{n}"]) and e[f"nme_{n}"] > 0 for n in FIVE), e
    # The MY19 demo set: the demo faces as a .pts folder, its points 300W's where it maps them.
    raw = tmp_path / "tfds" / "demo_raw" / "MY19"
    assert len(list((raw / "train").glob("*.pts"))) == 4
    assert len(list((raw / "test").glob("*.pts"))) == 6


def test_my19_alone_trains_and_its_loss_falls(tmp_path):
    config = toy_config(
        **{
            "sharding.num_devices": 1,
            "total_steps": 30,
            "checkpoint_every": 100,
            "optim.milestones": (100,),
            "data.batch_per_dataset": 4,
        }
    )
    config.data.schemes, config.data.datasets = (DEMO,), ("MY19",)
    assert trainer.train_and_evaluate(config, tmp_path, build=build_toy) == 0
    rows = _rows(tmp_path)
    assert set(k for k in rows[0] if k.startswith("loss_")) == {"loss_MY19"}
    my19 = np.array([r["loss_MY19"] for r in rows])
    np.testing.assert_allclose(my19, [r["loss"] for r in rows], rtol=1e-6)
    assert my19[-5:].mean() < 0.85 * my19[:5].mean(), my19


def test_init_checkpoint_widens_the_124_channel_head(ref_dir, tmp_path, capsys):
    config = fgtbt.get_config("tiny")
    config.data.schemes, config.data.datasets = (DEMO,), FIVE
    config.init_checkpoint = str(ref_dir / "tiny_checkpoint.pth")
    unified = schemes.configure(config)
    variables = trainer.initial_variables(config, build_model(config.model))
    out = capsys.readouterr().out
    assert "head extended from 124 to 133 channels" in out
    assert "copied MY19:nose_bridge_mid <- unified:" in out and "fresh  MY19:right_cheek" in out

    _, released = load_pretrained(ref_dir / "tiny_checkpoint.pth", fgtbt.get_config("tiny"))
    want, _ = schemes.extend_head(released, unified, seed=int(config.seed))
    got, want = (flax.traverse_util.flatten_dict(v) for v in (variables, want))
    assert got.keys() == want.keys()
    for key, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=str(key))
    kernel = np.asarray(got[("params", "decode_head", "conv2", "kernel")])
    released_kernel = flax.traverse_util.flatten_dict(released)[
        ("params", "decode_head", "conv2", "kernel")
    ]
    assert kernel.shape[-1] == 133
    np.testing.assert_array_equal(kernel[..., :124], np.asarray(released_kernel))

    # A checkpoint that already has the 133 channels (an earlier run's export) loads as it is.
    pretrained.export_pth(variables, tmp_path / "my19.pth", config)
    config.init_checkpoint = str(tmp_path / "my19.pth")
    again = trainer.initial_variables(config, build_model(config.model))
    assert "head extended" not in capsys.readouterr().out
    np.testing.assert_array_equal(
        np.asarray(again["params"]["decode_head"]["conv2"]["kernel"]), kernel
    )


def test_num_landmarks_that_disagrees_names_the_flags():
    config = fgtbt.get_config("tiny")
    config.data.schemes, config.data.datasets = (DEMO,), ("MY19",)
    config.model.num_landmarks = 130
    with pytest.raises(schemes.SchemeError, match=r"--config.model.num_landmarks=130 disagrees"):
        schemes.configure(config)
    config.data.schemes, config.data.datasets = (), landmarks.DATASETS
    config.model.num_landmarks = 133
    with pytest.raises(schemes.SchemeError, match=r"--config.data.schemes=\[\]"):
        schemes.configure(config)
    config.model.num_landmarks = 124
    assert schemes.configure(config).num_channels == 124 == config.model.num_landmarks
