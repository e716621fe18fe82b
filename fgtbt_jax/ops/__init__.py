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

from fgtbt_jax.ops import cpu, xla

KERNELS = ("auto", "xla", "cpu")
DECODER_FORMS = ("auto", "paper", "fused")

# What ``model.decoder_form="auto"`` means with each op path: the form each path has always
# computed (its lowered programs are unchanged by the switch). The cpu path used the fused form
# since it was written; the xla path keeps the SPEC's order, which the TPU/GPU figures measure.
_DEFAULT_DECODER_FORM = {"xla": "paper", "cpu": "fused"}


def resolve_kernels(kernels: str) -> str:
    """``model.kernels`` → ``"xla"`` or ``"cpu"`` (``"auto"``: ``"cpu"`` when JAX's default
    backend is the CPU, else ``"xla"``)."""
    if kernels not in KERNELS:
        raise ValueError(f"model.kernels must be one of {KERNELS}, got {kernels!r}")
    if kernels == "auto":
        return "cpu" if jax.default_backend() == "cpu" else "xla"
    return kernels


def resolve_decoder_form(decoder_form: str, kernels: str) -> str:
    """``model.decoder_form`` → ``"paper"`` or ``"fused"`` for a resolved ``kernels`` value
    (``"auto"``: ``"fused"`` with the cpu ops, ``"paper"`` with the xla ops)."""
    if decoder_form not in DECODER_FORMS:
        raise ValueError(f"model.decoder_form must be one of {DECODER_FORMS}, got {decoder_form!r}")
    kernel_ops(kernels)  # rejects an unresolved or unknown value
    return _DEFAULT_DECODER_FORM[kernels] if decoder_form == "auto" else decoder_form


def kernel_ops(kernels: str) -> types.ModuleType:
    """The op module of a resolved ``kernels`` value: :mod:`~fgtbt_jax.ops.xla` or
    :mod:`~fgtbt_jax.ops.cpu` (same function names and signatures)."""
    if kernels == "xla":
        return xla
    if kernels == "cpu":
        return cpu
    raise ValueError(f"kernels must be 'xla' or 'cpu' once resolved, got {kernels!r}")


def select(model_config: ml_collections.ConfigDict) -> tuple[types.ModuleType, str]:
    """The ops module and the decoder form ("paper" or "fused") of a ``config.model``: its
    ``kernels`` and ``decoder_form`` resolved (a config without ``decoder_form`` means "auto")."""
    kernels = resolve_kernels(model_config.kernels)
    return kernel_ops(kernels), resolve_decoder_form(
        model_config.get("decoder_form", "auto"), kernels
    )
