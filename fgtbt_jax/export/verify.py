"""Exported artifacts against the JAX function they came from, on seeded random images."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np


def relative_diff(got: np.ndarray, ref: np.ndarray) -> float:
    """max |got − ref| / max |ref| (0 when both are all zeros)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    scale = float(np.abs(ref).max())
    diff = float(np.abs(got - ref).max())
    return diff / scale if scale else diff


def verify(
    fn: Callable[[jax.Array], tuple[jax.Array, ...]],
    names: Sequence[str],
    img_size: int,
    runtimes: dict[str, Callable[[np.ndarray], Sequence[np.ndarray]]],
    batches: Sequence[int] = (1, 3),
    seed: int = 0,
) -> list[dict]:
    """Rows ``{runtime, batch, output, max_abs_diff, max_magnitude, relative}``.

    ``runtimes``: name → callable (B, S, S, 3) float32 → outputs in ``names`` order.
    """
    reference = jax.jit(fn)
    rows = []
    for batch in batches:
        rng = np.random.default_rng(seed + batch)
        images = rng.standard_normal((batch, img_size, img_size, 3)).astype(np.float32)
        expected = [np.asarray(v) for v in reference(images)]
        for runtime, run in runtimes.items():
            got = [np.asarray(v) for v in run(images)]
            for name, g, e in zip(names, got, expected, strict=True):
                if g.shape != e.shape:
                    raise ValueError(f"{runtime} {name}: shape {g.shape}, JAX gives {e.shape}")
                rows.append(
                    {
                        "runtime": runtime,
                        "batch": batch,
                        "output": name,
                        "max_abs_diff": float(np.abs(g.astype(np.float64) - e).max()),
                        "max_magnitude": float(np.abs(e).max()),
                        "relative": relative_diff(g, e),
                    }
                )
    return rows
