"""Pretrained weights in and out: release ``.pth`` files, orbax directories, training workdirs.

This is the one module that depends on both the porting table (:mod:`fgtbt_jax.porting.convert`)
and the training checkpoints (:mod:`fgtbt_jax.checkpointing`).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping

import jax
import ml_collections
import orbax.checkpoint as ocp

from fgtbt_jax import checkpointing
from fgtbt_jax.models.fgtbt import FGTBT, build_model
from fgtbt_jax.porting import convert, pth


def export_pth(
    variables: Mapping,
    path: str | os.PathLike,
    config: ml_collections.ConfigDict,
    *,
    epoch: int = 0,
) -> None:
    """Writes ``variables`` as a release-layout ``.pth`` that the original code loads strictly."""
    model = build_model(config.model)
    sd = convert.state_dict_from_variables(variables, model, config.img_size)
    obj = {
        "model": {"name": "segformer", "args": convert.release_args(config), "sd": sd},
        "epoch": epoch,
    }
    pth.save_pth(obj, path)


def save_variables(variables: Mapping, directory: str | os.PathLike) -> None:
    """Saves ``{'params', 'batch_stats'}`` as an orbax checkpoint directory."""
    directory = pathlib.Path(directory).absolute()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory, jax.device_get(dict(variables)), force=True)
        ckptr.wait_until_finished()


def restore_variables(directory: str | os.PathLike, model: FGTBT, img_size: int) -> dict:
    """Restores variables saved by :func:`save_variables` or by ``scripts/train.py``.

    A training workdir (orbax ``CheckpointManager`` layout) gives the latest step's EMA weights.
    """
    directory = pathlib.Path(directory).absolute()
    target = convert.abstract_variables(model, img_size)
    if (directory / "_CHECKPOINT_METADATA").exists() or (directory / "_METADATA").exists():
        with ocp.StandardCheckpointer() as ckptr:
            return dict(ckptr.restore(directory, target))
    return checkpointing.restore_eval_variables(directory, target)


def load_pretrained(
    path: str | os.PathLike, config: ml_collections.ConfigDict
) -> tuple[FGTBT, dict]:
    """``(model, variables)`` from a release-layout ``.pth``, a bare state dict or orbax dir."""
    model = build_model(config.model)
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        return model, restore_variables(path, model, config.img_size)
    sd = convert.state_dict_from_release(pth.load_pth(path), str(path))
    return model, convert.variables_from_state_dict(sd, model, config.img_size, source=str(path))


def export_ema_pth(
    workdir: str | os.PathLike,
    path: str | os.PathLike,
    config: ml_collections.ConfigDict,
    step: int | None = None,
) -> int:
    """Writes the EMA weights of a workdir's checkpoint as a release-layout ``.pth``.

    Multi-process: call it on every process (the orbax manager and restore wait at barriers
    for all of them); process 0 writes the file. Returns the exported step (stored as the
    file's ``epoch`` field).
    """
    directory = checkpointing.checkpoint_dir(workdir)
    if step is None:
        with ocp.CheckpointManager(
            directory, item_names=("ema",), options=checkpointing.READ_ONLY
        ) as m:
            step = m.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
    model = build_model(config.model)
    abstract = convert.abstract_variables(model, int(config.img_size))
    variables = checkpointing.restore_eval_variables(workdir, abstract, step)
    if jax.process_index() == 0:
        export_pth(jax.device_get(variables), path, config, epoch=int(step))
    return int(step)
