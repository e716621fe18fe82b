"""Figures read from a compiled XLA program: the one place that parses them.

``cost(compiled)`` gives XLA's cost analysis (``flops``, ``bytes accessed``, …) as a flat dict;
``memory(compiled)`` gives the per-device buffer sizes of ``memory_analysis()``;
``traffic(compiled)`` the HBM-traffic model of the optimized HLO (:mod:`fgtbt_jax.traffic`),
which, unlike XLA's "bytes accessed", counts each top-level instruction's operands and result
once at their tiled sizes and tells HBM from on-chip buffers. The trainer's start-up log,
``train/aot.py`` (planning rows) and ``scripts/benchmark.py`` all read them here.
"""

from __future__ import annotations

from typing import Any

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
