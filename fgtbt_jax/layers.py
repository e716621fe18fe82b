"""Basic layers with PyTorch semantics (NHWC throughout).

Module and parameter names mirror the PyTorch state dict of the release (SPEC §2.3), so that the
converter in :mod:`fgtbt_jax.porting` is a table: a Flax ``Dense``/``Conv``/``LayerNorm`` named
``fc1`` holds ``kernel``/``bias``/``scale`` where PyTorch holds ``fc1.weight``/``fc1.bias``.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's GELU default is the exact erf form.
gelu = functools.partial(nn.gelu, approximate=False)


def group_mean(x: jax.Array, axes: tuple[int, ...], groups: int) -> jax.Array:
    """Mean of ``x`` over ``axes`` (which include the batch axis 0), per group of samples.

    With ``groups`` > 1 the batch is split into that many consecutive groups, each reduced on its
    own: under data parallelism with one group per device this reproduces per-device statistics
    (the reference's unsynchronised BatchNorm and CSAM) inside a global-view ``jit``.
    Returns shape ``(groups, *kept_dims)``.
    """
    b = x.shape[0]
    if b % groups:
        raise ValueError(f"batch {b} is not divisible into {groups} statistic groups")
    xg = x.reshape((groups, b // groups) + x.shape[1:])
    return jnp.mean(xg, axis=tuple(a + 1 for a in axes))


def group_max(x: jax.Array, axes: tuple[int, ...], groups: int) -> jax.Array:
    b = x.shape[0]
    if b % groups:
        raise ValueError(f"batch {b} is not divisible into {groups} statistic groups")
    xg = x.reshape((groups, b // groups) + x.shape[1:])
    return jnp.max(xg, axis=tuple(a + 1 for a in axes))


def expand_groups(stat: jax.Array, x: jax.Array, groups: int) -> jax.Array:
    """Broadcasts per-group statistics ``(groups, C)`` back to ``x`` (B, ..., C)."""
    b = x.shape[0]
    stat = jnp.repeat(stat, b // groups, axis=0)  # (B, C)
    return stat.reshape((b,) + (1,) * (x.ndim - 2) + (x.shape[-1],))


class BatchNorm(nn.Module):
    """BatchNorm over the last (channel) axis with PyTorch semantics.

    Train mode normalizes with the biased batch variance and updates the running variance with
    the *unbiased* one (PyTorch), ``running = (1 - momentum) * running + momentum * batch`` with
    PyTorch's momentum 0.1 (Flax's 0.9). ``num_batches_tracked`` is kept as PyTorch does.
    Statistics are computed in float32 whatever the compute dtype.
    """

    momentum: float = 0.1
    epsilon: float = 1e-5
    stat_groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        tracked = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            g = self.stat_groups
            mean_g = group_mean(xf, axes, g)  # (g, C)
            centered = xf - expand_groups(mean_g, xf, g)
            var_g = group_mean(jnp.square(centered), axes, g)
            n = xf.size // (c * g)
            if not self.is_initializing():
                unbiased = var_g * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean_g, axis=0)
                ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(unbiased, axis=0)
                tracked.value = tracked.value + 1
            y = centered * jax.lax.rsqrt(expand_groups(var_g, xf, g) + self.epsilon)
        else:
            y = (xf - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch per sample (rng stream ``drop_path``)."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        rng = self.make_rng("drop_path")
        mask = jax.random.bernoulli(rng, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


def conv(
    features: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    *,
    bias: bool = True,
    groups: int = 1,
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """A PyTorch-style ``Conv2d`` (symmetric explicit padding) on NHWC input."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=bias,
        feature_group_count=groups,
        dtype=dtype,
        name=name,
    )


def layer_norm(epsilon: float, dtype: Dtype, name: str | None = None) -> nn.LayerNorm:
    # Explicit eps: Flax defaults to 1e-6, PyTorch to 1e-5 (SPEC §2.1 says which is which).
    return nn.LayerNorm(epsilon=epsilon, dtype=dtype, name=name)


def resize_bilinear(x: jax.Array, height: int, width: int) -> jax.Array:
    """``F.interpolate(mode='bilinear', align_corners=False)`` on NHWC (half-pixel centres)."""
    b, _, _, c = x.shape
    return jax.image.resize(x, (b, height, width, c), method="bilinear", antialias=False)
