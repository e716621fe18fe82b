"""Figures read from a compiled XLA program: the one place that parses them.

``cost(compiled)`` gives XLA's cost analysis (``flops``, ``bytes accessed``, …) as a flat dict;
``memory(compiled)`` gives the per-device buffer sizes of ``memory_analysis()``;
``traffic(compiled)`` the HBM-traffic model of the optimized HLO (:mod:`fgtbt_jax.traffic`),
which, unlike XLA's "bytes accessed", counts each top-level instruction's operands and result
once at their tiled sizes and tells HBM from on-chip buffers. The trainer's start-up log,
``train/aot.py`` (planning rows) and ``scripts/benchmark.py`` all read them here.

Deviceless GPU executables (compiled for a ``jax.experimental.topologies`` description, no GPU
attached) have no ``cost_analysis()``: XLA:GPU's needs a local client. ``module_cost`` runs
XLA's generic HLO cost analysis over an HLO module instead: ``optimized_cost(compiled)`` over
the compiled per-device module, ``lowered_cost(lowered)`` over the unoptimized (global, not
yet partitioned) module. The generic analysis counts ``dot`` / ``convolution`` instructions but
not the cuBLAS / cuDNN custom calls that XLA:GPU rewrites them into, so GPU FLOPs come from the
lowered module and GPU bytes accessed from the optimized one, plus the operands and results of
its custom calls (:func:`custom_call_bytes`).
"""

from __future__ import annotations

import re
from typing import Any

import jax

from fgtbt_jax import traffic as traffic_model


class Unavailable(RuntimeError):
    """The backend does not report this figure for a compiled program (the message says why)."""


def cost(compiled: Any) -> dict[str, float]:
    """``compiled.cost_analysis()`` as one flat dict (empty when the backend gives none).

    Older JAX returned one dict per computation; the entry program's comes first.
    """
    try:
        c = compiled.cost_analysis()
    except Exception:  # backends without the analysis raise (e.g. NotImplementedError)
        return {}
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    return {k: float(v) for k, v in dict(c or {}).items()}


def module_cost(module: Any) -> dict[str, float]:
    """XLA's HLO cost analysis of an ``HloModule`` (flat dict: ``flops``, ``bytes accessed``, …).

    Runs on the host CPU client, so it works for modules compiled for any backend; custom calls
    (cuBLAS GEMMs, cuDNN convolutions) count no FLOPs and no bytes.
    """
    from jax._src.lib import _jax  # the analysis is exposed only here (jaxlib 0.10)

    client = jax.devices("cpu")[0].client
    return {k: float(v) for k, v in _jax.hlo_module_cost_analysis(client, module).items()}


_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4}
_BYTES |= {"s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_SHAPE = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\]")
_CUSTOM_CALL = re.compile(r"=\s*(.*?)\s+custom-call\((.*?)\), custom_call_target=")


def _shape_bytes(text: str, skip_scratch: bool = False) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if skip_scratch and dtype in ("s8", "u8"):
            continue  # cuBLAS / cuDNN workspace results
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * _BYTES.get(dtype, 1)
    return total


def custom_call_bytes(module: Any) -> tuple[int, int]:
    """``(number of custom calls, bytes they read and write)`` in an ``HloModule``'s text:
    operands plus results without the int8 workspace buffers, each call counted once (calls in
    loop bodies are not multiplied by trip counts)."""
    from jaxlib import _hlo  # HloPrintOptions (jaxlib 0.10): print each operand's shape

    options = _hlo.HloPrintOptions()
    options.print_operand_shape = True
    options.print_metadata = False
    options.print_backend_config = False
    calls = _CUSTOM_CALL.findall(module.to_string(options))
    return len(calls), sum(_shape_bytes(out, True) + _shape_bytes(ins) for out, ins in calls)


def optimized_cost(compiled: Any) -> dict[str, float]:
    """:func:`module_cost` of the optimized (per-device, partitioned) entry module of
    ``compiled`` (a ``jax.stages.Compiled``), with the custom calls' bytes added to
    ``bytes accessed`` (the generic analysis counts each as −1 FLOPs and −1 bytes; undone).

    Adds ``custom calls`` and ``custom call bytes``; ``flops`` still excludes them.
    """
    module = compiled.runtime_executable().hlo_modules()[0]
    cost = module_cost(module)
    calls, nbytes = custom_call_bytes(module)
    cost["flops"] = cost.get("flops", 0.0) + calls
    cost["bytes accessed"] = cost.get("bytes accessed", 0.0) + calls + nbytes
    cost["custom calls"], cost["custom call bytes"] = float(calls), float(nbytes)
    return cost


def lowered_cost(lowered: Any) -> dict[str, float]:
    """:func:`module_cost` of the unoptimized HLO of ``lowered`` (a ``jax.stages.Lowered``):
    whole-program (all devices) figures before SPMD partitioning and backend rewrites."""
    return module_cost(lowered.compiler_ir("hlo").get_hlo_module())


def flops(compiled: Any) -> float | None:
    """FLOPs per call of ``compiled`` from its cost analysis, or None where not reported."""
    value = cost(compiled).get("flops")
    return value if value is not None and value > 0 else None


def memory(compiled: Any) -> dict[str, int]:
    """Per-device bytes of ``compiled``: ``argument``, ``output``, ``alias`` (donated inputs
    reused as outputs), ``temp`` and ``total`` = argument + output − alias + temp.

    Raises ``Unavailable`` where the backend has no memory analysis.
    """
    try:
        m = compiled.memory_analysis()
    except Exception as e:  # backends without the analysis raise (e.g. NotImplementedError)
        raise Unavailable(f"memory analysis unavailable ({type(e).__name__}: {e})") from e
    if m is None:
        raise Unavailable("memory analysis unavailable on this backend")
    row = {
        "argument": int(m.argument_size_in_bytes),
        "output": int(m.output_size_in_bytes),
        "alias": int(m.alias_size_in_bytes),
        "temp": int(m.temp_size_in_bytes),
    }
    row["total"] = row["argument"] + row["output"] - row["alias"] + row["temp"]
    return row


def traffic(compiled: Any) -> traffic_model.Traffic:
    """The HBM / on-chip traffic model of ``compiled``'s optimized HLO
    (:mod:`fgtbt_jax.traffic`: per top-level instruction, operands and result at tiled sizes).
    """
    return traffic_model.of_hlo(compiled.as_text())
