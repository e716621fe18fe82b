"""Plain helpers shared by several test modules (import as ``from helpers import …``)."""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fgtbt_jax import landmarks

ROOT = pathlib.Path(__file__).parents[1]


def reference_batch(ref_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference train batch (COFW, WFLW, 300W, AFLW, one each) in unified form: ``image``
    (4, S, S, 3) NHWC, ``coords`` (4, 124, 2) int32, ``mask`` (4, 124) bool, ``dataset_id`` (4,)."""
    coords = np.zeros((4, landmarks.NUM_UNIFIED, 2), np.int32)
    mask = np.zeros((4, landmarks.NUM_UNIFIED), bool)
    for b, name in enumerate(landmarks.DATASETS):
        idx = landmarks.unified_index(name)
        coords[b, idx] = ref_outputs[f"train_target_coords_{name}"][0]
        mask[b, idx] = True
    return {
        "image": ref_outputs["input_nchw"].transpose(0, 2, 3, 1),
        "coords": coords,
        "mask": mask,
        "dataset_id": np.arange(4, dtype=np.int32),
    }


def subprocess_env() -> dict[str, str]:
    """The environment for a child Python process: CPU JAX, no inherited JAX / XLA settings,
    the project and tests/ importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")])
    )
    return env
