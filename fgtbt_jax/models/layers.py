"""Basic layers with PyTorch semantics (NHWC throughout).

Module and parameter names mirror the PyTorch state dict of the release (SPEC §2.3), so that the
converter in :mod:`fgtbt_jax.porting.convert` is a table: a Flax ``Dense``/``Conv``/
``LayerNorm`` named ``fc1`` holds ``kernel``/``bias``/``scale`` where PyTorch holds
``fc1.weight``/``fc1.bias``.

Layers whose computation goes through an op of :mod:`fgtbt_jax.ops` hold the ops module they
compute with (``ops``), injected from outside: they never choose one. :class:`Layers` bundles
the ops with the compute dtype and the statistic groups, which every layer of a network shares,
and builds the layers with them; the network's modules hold one ``layers`` field.
"""

from __future__ import annotations

import dataclasses
import types

import flax.linen as nn
import jax
import jax.numpy as jnp

from fgtbt_jax.ops.common import (
    Dtype,
    channel_shape,
    expand_groups,
    group_max,
    group_mean,
    param_dtype,
    tile_blocks,
)

__all__ = [
    "BatchNorm",
    "Conv",
    "DropPath",
    "Dtype",
    "KernelBias",
    "LayerNorm",
    "Layers",
    "Ops",
    "dense",
    "expand_groups",
    "group_max",
    "group_mean",
    "param_dtype",
]

# A module of fgtbt_jax.ops: each has the same function names and signatures.
Ops = types.ModuleType


def dense(features: int, *, dtype: Dtype, name: str | None = None) -> nn.Dense:
    """``nn.Dense`` computing in ``dtype`` with parameters in ``param_dtype(dtype)``."""
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype(dtype), name=name)


class BatchNorm(nn.Module, kw_only=True):
    """BatchNorm with PyTorch semantics; channels on ``axis`` (default: the last one).

    Train mode normalizes with the biased batch variance and updates the running variance with
    the *unbiased* one (PyTorch), ``running = (1 - momentum) * running + momentum * batch`` with
    PyTorch's momentum 0.1 (Flax's 0.9). ``num_batches_tracked`` is kept as PyTorch does.
    Parameters and statistics are kept in ``param_dtype(dtype)`` (float32 for bfloat16).
    Train mode computes with ``ops.batch_norm_train``.

    ``blocks`` > 1: the channel axis holds ``blocks`` positions × C channels (space-to-depth
    order, position major), and each of the C channels is normalized over the positions too,
    as over the full-resolution map they came from (parameters and statistics have C entries).
    """

    ops: Ops
    momentum: float = 0.1
    epsilon: float = 1e-5
    stat_groups: int = 1
    dtype: Dtype = jnp.float32
    axis: int = -1
    blocks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        axis = self.axis % x.ndim
        c = x.shape[axis] // self.blocks
        pd = param_dtype(self.dtype)
        scale = self.param("scale", nn.initializers.ones, (c,), pd)
        bias = self.param("bias", nn.initializers.zeros, (c,), pd)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), pd))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), pd))
        tracked = self.variable(
            "batch_stats", "num_batches_tracked", lambda: jnp.zeros((), jnp.int32)
        )
        if train:
            g = self.stat_groups
            y, mean_g, var_g = self.ops.batch_norm_train(
                x, scale, bias, g, self.epsilon, self.dtype, axis, self.blocks
            )
            n = x.size // (c * g)
            if not self.is_initializing():
                unbiased = var_g * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = (1 - m) * ra_mean.value + m * jnp.mean(mean_g, axis=0)
                ra_var.value = (1 - m) * ra_var.value + m * jnp.mean(unbiased, axis=0)
                tracked.value = tracked.value + 1
            return y
        shape = channel_shape(x, axis)

        def tiled(v: jax.Array) -> jax.Array:
            return tile_blocks(v, self.blocks).reshape(shape)

        mean, var = tiled(ra_mean.value), tiled(ra_var.value)
        y = (x.astype(pd) - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * tiled(scale) + tiled(bias)).astype(self.dtype)


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
        # A per-sample factor (0 or 1/keep): the backward pass keeps only this (B, 1, …) mask.
        return x * (mask.astype(x.dtype) / jnp.asarray(keep, x.dtype))


class Conv(nn.Module, kw_only=True):
    """A PyTorch-style ``Conv2d`` (symmetric explicit padding) on NHWC input, with ``nn.Conv``'s
    parameters (``kernel`` (kh, kw, C_in / groups, C_out) HWIO and ``bias``) and initializers,
    computed by ``ops.conv2d``."""

    ops: Ops
    features: int
    kernel_size: int
    stride: int = 1
    padding: int = 0
    use_bias: bool = True
    groups: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel_size
        shape = (k, k, x.shape[-1] // self.groups, self.features)
        pd = param_dtype(self.dtype)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, pd)
        bias = (
            self.param("bias", nn.initializers.zeros, (self.features,), pd)
            if self.use_bias
            else None
        )
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = self.ops.conv2d(x, kernel, self.stride, self.padding, self.groups)
        return y if bias is None else y + bias


class KernelBias(nn.Module):
    """Declares the parameters of an ``nn.Dense`` / ``nn.Conv`` / ``nn.ConvTranspose`` of
    kernel shape ``shape`` (same names and initializers) and returns ``(kernel, bias)``
    (bias None without ``use_bias``), for layers computed together in a fused form. The
    parameters are in ``param_dtype(dtype)``."""

    shape: tuple[int, ...]
    use_bias: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        pd = param_dtype(self.dtype)
        kernel = self.param("kernel", nn.initializers.lecun_normal(), self.shape, pd)
        bias = (
            self.param("bias", nn.initializers.zeros, (self.shape[-1],), pd)
            if self.use_bias
            else None
        )
        return kernel, bias


class LayerNorm(nn.Module, kw_only=True):
    """LayerNorm over the last axis with ``nn.LayerNorm``'s parameters ``scale`` and ``bias``
    (statistics and parameters in ``param_dtype(dtype)``), computed by ``ops.layer_norm``.
    ``epsilon`` is explicit: Flax defaults to 1e-6, PyTorch to 1e-5 (SPEC §2.1 says which is
    which)."""

    ops: Ops
    epsilon: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        pd = param_dtype(self.dtype)
        scale = self.param("scale", nn.initializers.ones, (c,), pd)
        bias = self.param("bias", nn.initializers.zeros, (c,), pd)
        return self.ops.layer_norm(x, scale, bias, self.epsilon, self.dtype)


@dataclasses.dataclass(frozen=True)
class Layers:
    """The layers of one network with what they all share, chosen once (by
    :func:`fgtbt_jax.models.fgtbt.build_model`): the ops module they compute with, the compute
    ``dtype`` (parameters in ``param_dtype(dtype)``) and the number of sample groups of the
    BatchNorm / CSAM statistics."""

    ops: Ops
    dtype: Dtype = jnp.float32
    stat_groups: int = 1

    def conv(
        self,
        features: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        groups: int = 1,
        name: str | None = None,
    ) -> Conv:
        """A PyTorch-style ``Conv2d``: :class:`Conv`."""
        return Conv(
            ops=self.ops,
            features=features,
            kernel_size=kernel_size,
            stride=stride,
            padding=padding,
            use_bias=bias,
            groups=groups,
            dtype=self.dtype,
            name=name,
        )

    def batch_norm(self, *, axis: int = -1, blocks: int = 1, name: str | None = None) -> BatchNorm:
        """:class:`BatchNorm` over this network's statistic groups, channels on ``axis`` (in
        ``blocks`` space-to-depth positions)."""
        return BatchNorm(
            ops=self.ops,
            stat_groups=self.stat_groups,
            dtype=self.dtype,
            axis=axis,
            blocks=blocks,
            name=name,
        )

    def layer_norm(self, epsilon: float, *, name: str | None = None) -> LayerNorm:
        return LayerNorm(ops=self.ops, epsilon=epsilon, dtype=self.dtype, name=name)

    def dense(self, features: int, *, name: str | None = None) -> nn.Dense:
        return dense(features, dtype=self.dtype, name=name)

    def kernel_bias(
        self, shape: tuple[int, ...], *, bias: bool = True, name: str | None = None
    ) -> KernelBias:
        return KernelBias(shape, use_bias=bias, dtype=self.dtype, name=name)

    def gelu(self, x: jax.Array) -> jax.Array:
        """PyTorch's default GELU (exact erf form)."""
        return self.ops.gelu(x)
