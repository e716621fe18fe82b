"""The network's numerical ops, in two interchangeable implementations (``model.kernels``).

``xla`` (:mod:`fgtbt_jax.ops.xla`): the SPEC's formulas on standard ``lax`` ops with JAX's own
autodiff, for GPU and TPU. ``cpu`` (:mod:`fgtbt_jax.ops.cpu`): the same functions lowered to
forms that XLA:CPU runs faster. ``"auto"`` picks ``cpu`` when JAX's default backend is the CPU.

Both are modules with the same function names and signatures (the "ops object"):
:func:`fgtbt_jax.models.fgtbt.build_model` picks one once and hands it to the model, whose
modules call ``ops.conv2d(...)`` etc. without knowing which one they hold. How the decoder is
formulated (``model.decoder_form``, :mod:`fgtbt_jax.models.fused_decoder`) is a separate,
model-level choice available with either.
"""

from __future__ import annotations

import types

import jax
import ml_collections

from fgtbt_jax import errors
from fgtbt_jax.ops import cpu, xla

KERNELS = ("auto", "xla", "cpu")
DECODER_FORMS = ("auto", "paper", "fused")
STEM_FORMS = ("auto", "paper", "blocks")

# What ``model.decoder_form="auto"`` means: the fused form with either op path (fewer FLOPs
# and HBM bytes on every backend; docs/traffic.md measures it on the release TPU step).
_AUTO_DECODER_FORM = "fused"
# What ``model.stem_form="auto"`` means with each op path. The xla path computes the stems on
# space-to-depth blocks (XLA:TPU's full-resolution stems cost most of their HBM traffic in
# 3- and 16/64-channel maps padded to 128 lanes; docs/traffic.md); the cpu path keeps the
# paper order, whose strided ``proj`` has its own XLA:CPU lowering (ops/cpu.py).
_AUTO_STEM_FORM = {"xla": "blocks", "cpu": "paper"}


def resolve_kernels(kernels: str) -> str:
    """``model.kernels`` → ``"xla"`` or ``"cpu"`` (``"auto"``: ``"cpu"`` when JAX's default
    backend is the CPU, else ``"xla"``)."""
    if kernels not in KERNELS:
        raise errors.ConfigError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels


def _resolve_form(field: str, value: str, choices: tuple[str, ...], auto: str, kernels: str) -> str:
    """A ``model.<field>`` form for a resolved ``kernels`` value: ``value``, or ``auto``."""
    if value not in choices:
        raise errors.ConfigError(f"model.{field} must be one of {choices}, got {value!r}")
    kernel_ops(kernels)  # rejects an unresolved or unknown value
    return auto if value == "auto" else value


def resolve_decoder_form(decoder_form: str, kernels: str) -> str:
    """``model.decoder_form`` → ``"paper"`` or ``"fused"`` for a resolved ``kernels`` value
    (``"auto"``: ``"fused"``)."""
    return _resolve_form("decoder_form", decoder_form, DECODER_FORMS, _AUTO_DECODER_FORM, kernels)


def resolve_stem_form(stem_form: str, kernels: str) -> str:
    """``model.stem_form`` → ``"paper"`` or ``"blocks"`` for a resolved ``kernels`` value
    (``"auto"``: ``"blocks"`` with the xla ops, ``"paper"`` with the cpu ops)."""
    auto = _AUTO_STEM_FORM.get(kernels, "")
    return _resolve_form("stem_form", stem_form, STEM_FORMS, auto, kernels)


def kernel_ops(kernels: str) -> types.ModuleType:
    """The op module of a resolved ``kernels`` value: :mod:`~fgtbt_jax.ops.xla` or
    :mod:`~fgtbt_jax.ops.cpu` (same function names and signatures)."""
    if kernels == "xla":
        return xla
    if kernels == "cpu":
        return cpu
    raise ValueError(f"kernels must be 'xla' or 'cpu' once resolved, got {kernels!r}")


def select(model_config: ml_collections.ConfigDict) -> tuple[types.ModuleType, str, str]:
    """The ops module, the decoder form ("paper" or "fused") and the stem form ("paper" or
    "blocks") of a ``config.model``: its ``kernels``, ``decoder_form`` and ``stem_form``
    resolved (a config without a form means "auto")."""
    kernels = resolve_kernels(model_config.kernels)
    return (
        kernel_ops(kernels),
        resolve_decoder_form(model_config.get("decoder_form", "auto"), kernels),
        resolve_stem_form(model_config.get("stem_form", "auto"), kernels),
    )
