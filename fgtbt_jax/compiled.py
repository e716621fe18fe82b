"""Figures read from a compiled XLA program: the one place that parses them.

``cost(compiled)`` gives XLA's cost analysis (``flops``, ``bytes accessed``, …) as a flat dict;
``memory(compiled)`` gives the per-device buffer sizes of ``memory_analysis()``. The trainer's
start-up log, ``train/aot.py`` (planning rows) and ``scripts/benchmark.py`` all read them here.

Deviceless GPU executables (compiled for a ``jax.experimental.topologies`` description, no GPU
attached) have no ``cost_analysis()``: XLA:GPU's needs a local client. ``module_cost`` runs
XLA's generic HLO cost analysis over an HLO module instead: ``optimized_cost(compiled)`` over
the compiled per-device module, ``lowered_cost(lowered)`` over the unoptimized (global, not
yet partitioned) module. The generic analysis counts ``dot`` / ``convolution`` instructions but
not the cuBLAS / cuDNN custom calls that XLA:GPU rewrites them into, so GPU FLOPs come from the
lowered module and GPU bytes accessed from the optimized one.
"""

from __future__ import annotations

from typing import Any

import jax


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


def optimized_cost(compiled: Any) -> dict[str, float]:
    """:func:`module_cost` of the optimized (per-device, partitioned) entry module of
    ``compiled`` (a ``jax.stages.Compiled``)."""
    return module_cost(compiled.runtime_executable().hlo_modules()[0])


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
