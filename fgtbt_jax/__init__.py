"""fgtbt-jax: FGTBT (Frequency-Guided Task-Balancing Transformer) in JAX/Flax.

The package tree follows the architecture: ``models/`` (the network), ``porting/`` (PyTorch
``.pth`` ⇄ Flax), ``train/`` (loss, optimizer, sharding, train step, the loop),
``evaluation/`` (decoding, metrics, reports), ``inference/`` (face detection and the detection
pipeline); ``landmarks`` and ``transforms`` are the unified landmark scheme and crop geometry,
``checkpointing`` the orbax checkpoints (below both ``train/`` and ``porting/``), ``errors`` the
errors scripts report as one line.

The public API below is imported on first use, so numpy-only modules (``fgtbt_jax.landmarks``,
``fgtbt_jax.transforms``) import without JAX.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["FGTBT", "build_model", "export_pth", "load_pretrained"]
__version__ = "0.1.0"

_PUBLIC = {
    "FGTBT": "fgtbt_jax.models.fgtbt",
    "build_model": "fgtbt_jax.models.fgtbt",
    "export_pth": "fgtbt_jax.porting.pretrained",
    "load_pretrained": "fgtbt_jax.porting.pretrained",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'fgtbt_jax' has no attribute {name!r}")
