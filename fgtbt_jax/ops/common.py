"""What both op paths and the layers share: dtype rules and per-group batch statistics.

Nothing here depends on the op path (:mod:`fgtbt_jax.ops.xla` or :mod:`fgtbt_jax.ops.cpu`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Dtype = Any
Padding = tuple[tuple[int, int], tuple[int, int]]


def param_dtype(dtype: Dtype) -> jnp.dtype:
    """The dtype of parameters, normalization statistics, the FFT and the loss for a compute
    ``dtype``: float32 for float32 and bfloat16 compute, float64 for float64 (everything then
    runs in float64; it needs ``jax_enable_x64``)."""
    return jnp.promote_types(dtype, jnp.float32)


def group_mean(x: jax.Array, axes: tuple[int, ...], groups: int) -> jax.Array:
    """Mean of ``x`` over ``axes`` (which include the batch axis 0), per group of samples.

    With ``groups`` > 1 the batch is split into that many consecutive groups, each reduced on its
    own: under data parallelism with one group per device this reproduces per-device statistics
    (the reference's unsynchronised BatchNorm and CSAM) inside a global-view ``jit``.
    Returns shape ``(groups, *kept_dims)``.
    """
    return jnp.mean(_split_groups(x, groups), axis=tuple(a + 1 for a in axes))


def group_max(x: jax.Array, axes: tuple[int, ...], groups: int) -> jax.Array:
    """Maximum of ``x`` over ``axes`` per group of samples, as :func:`group_mean`."""
    return jnp.max(_split_groups(x, groups), axis=tuple(a + 1 for a in axes))


def _split_groups(x: jax.Array, groups: int) -> jax.Array:
    b = x.shape[0]
    if b % groups:
        raise ValueError(f"batch {b} is not divisible into {groups} statistic groups")
    return x.reshape((groups, b // groups) + x.shape[1:])


def expand_groups(stat: jax.Array, x: jax.Array, groups: int, axis: int = -1) -> jax.Array:
    """Broadcasts per-group statistics ``(groups, C)`` back to ``x`` (B, ..., C, ...), with the
    channels on ``axis`` (default: last)."""
    b = x.shape[0]
    stat = jnp.repeat(stat, b // groups, axis=0)  # (B, C)
    return stat.reshape(channel_shape(x, axis, batch=True))


def fold_blocks(stat: jax.Array, blocks: int, reduce: str = "mean") -> jax.Array:
    """Per-channel statistics (…, blocks·C) of a space-to-depth channel axis (``blocks``
    positions × C channels, position major) → (…, C): the mean (or sum) over the positions."""
    if blocks == 1:
        return stat
    split = stat.reshape(*stat.shape[:-1], blocks, stat.shape[-1] // blocks)
    return jnp.mean(split, axis=-2) if reduce == "mean" else jnp.sum(split, axis=-2)


def tile_blocks(stat: jax.Array, blocks: int) -> jax.Array:
    """(…, C) → (…, blocks·C): per-channel values repeated for each space-to-depth position
    (the inverse layout of :func:`fold_blocks`)."""
    return stat if blocks == 1 else jnp.tile(stat, (1,) * (stat.ndim - 1) + (blocks,))


def channel_shape(x: jax.Array, axis: int, *, batch: bool = False) -> list[int]:
    """``[1, …, C, …, 1]`` broadcasting a (C,) vector along ``axis`` of ``x`` (and the batch
    axis too with ``batch``)."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = x.shape[axis]
    if batch:
        shape[0] = x.shape[0]
    return shape
