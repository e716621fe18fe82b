"""Serialized StableHLO (``jax.export``) for cpu, cuda and tpu in one artifact.

Load anywhere JAX runs (no model code needed)::

    exported = jax.export.deserialize(open(path, "rb").read())
    outputs = exported.call(images)  # tuple, see fgtbt_jax.export.function.output_names
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

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


def save(exported: jax.export.Exported, path: str) -> None:
    with open(path, "wb") as f:
        f.write(exported.serialize())


def load(path: str) -> jax.export.Exported:
    with open(path, "rb") as f:
        return jax.export.deserialize(bytearray(f.read()))
