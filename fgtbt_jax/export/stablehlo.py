"""Serialized StableHLO (``jax.export``) for cpu, cuda and tpu in one artifact.

Load anywhere JAX runs (no model code needed)::

    exported = jax.export.deserialize(open(path, "rb").read())
    outputs = exported.call(images)  # tuple, see fgtbt_jax.export.function.output_names
"""

from __future__ import annotations

import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from fgtbt_jax import paths

PLATFORMS = ("cpu", "cuda", "tpu")


def export(
    fn: Callable[[jax.Array], tuple[jax.Array, ...]],
    img_size: int,
    batch: int | None,
    platforms: tuple[str, ...] = PLATFORMS,
) -> jax.export.Exported:
    """``jax.export`` of ``fn`` on (B, S, S, 3) float32 images, S = ``img_size``.

    ``batch=None`` makes B a symbolic dimension (any batch size runs).
    """
    b = jax.export.symbolic_shape("B")[0] if batch is None else batch
    spec = jax.ShapeDtypeStruct((b, img_size, img_size, 3), jnp.float32)
    return jax.export.export(jax.jit(fn), platforms=platforms)(spec)


def save(exported: jax.export.Exported, path: str | os.PathLike) -> None:
    """Writes the serialized artifact to ``path`` (local or ``gs://``), whole or not at all."""
    paths.write_bytes(path, exported.serialize())


def load(path: str | os.PathLike) -> jax.export.Exported:
    return jax.export.deserialize(bytearray(paths.resolve(path, "path").read_bytes()))
