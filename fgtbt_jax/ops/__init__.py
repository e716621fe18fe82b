"""The network's numerical ops, in two interchangeable implementations (``model.kernels``).

``xla`` (:mod:`fgtbt_jax.ops.xla`): the SPEC's formulas on standard ``lax`` ops with JAX's own
autodiff, for GPU and TPU. ``cpu`` (:mod:`fgtbt_jax.ops.cpu`): the same functions lowered to
forms that XLA:CPU runs faster. ``"auto"`` picks ``cpu`` when JAX's default backend is the CPU.
"""

from __future__ import annotations

import types

import jax

from fgtbt_jax.ops import cpu, xla

KERNELS = ("auto", "xla", "cpu")


def resolve_kernels(kernels: str) -> str:
    """``model.kernels`` → ``"xla"`` or ``"cpu"`` (``"auto"``: ``"cpu"`` when JAX's default
    backend is the CPU, else ``"xla"``)."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels


def kernel_ops(kernels: str) -> types.ModuleType:
    """The op module of a resolved ``kernels`` value: :mod:`~fgtbt_jax.ops.xla` or
    :mod:`~fgtbt_jax.ops.cpu` (same function names and signatures)."""
    if kernels == "xla":
        return xla
    if kernels == "cpu":
        return cpu
    raise ValueError(f"kernels must be 'xla' or 'cpu' once resolved, got {kernels!r}")
