r"""Compiled throughput of FGTBT in JAX, side by side with PyTorch (eager / torch.compile).

  python scripts/benchmark.py --config configs/fgtbt.py:release --steps 5 --warmup 2 \
      --compare-torch --torch-compile --json benchmarks/release_cpu.json

Cases (one row each): framework ``jax`` | ``torch-eager`` | ``torch-compile`` × mode
``train`` (forward in train mode, FMB loss, backward, AdamW, EMA: the real training step of
:mod:`fgtbt_jax.train.step`, and the same step written in PyTorch in
:mod:`benchmarks.torch_oracle.loss`), ``eval`` (forward + arg-max decoding,
:mod:`fgtbt_jax.evaluation.decoding`)
and ``eval_flip`` (the same with the test-time flip: two forward passes). Synthetic data of the
configured shapes; parameters are random (the speed does not depend on their values).

``--frameworks onnxruntime`` adds the eval modes exported to ONNX and run by onnxruntime on
the CPU (``benchmarking.prepare_onnxruntime``; needs the ``export`` extra).

The cases are :mod:`fgtbt_jax.benchmarking`'s; every case runs in a fresh process
(``benchmarking.run_case_isolated``), so that the frameworks neither share thread pools nor
each other's memory high-water mark. Timing: ``--warmup`` untimed steps after compilation, then
``--steps`` steps each synchronised (``block_until_ready`` / ``cuda.synchronize``);
``images_per_sec`` = batch / median step time. The machine's float32 matmul peak is measured in
the same run (best of several square GEMMs in JAX) and gives the JAX cases' MFU from XLA's
FLOP count (``compiled.cost_analysis()``).

Configuration: ``--config path.py:preset`` and any ``--config.FIELD=VALUE`` override
(ml_collections ``config_flags``, as in train.py), e.g. ``--config.model.kernels=xla`` or
``=cpu`` (each JAX row records the resolved ``kernels``), ``--config.model.dtype=bfloat16``
(or ``=float64``, which switches on ``jax_enable_x64`` in the JAX worker),
``--config.model.remat=True``.

Output: ``--json`` writes a list of case dicts (fields: ``benchmarking.row``) and a markdown
table is printed, with the JAX / PyTorch-eager throughput ratio per mode.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from fgtbt_jax import benchmarking, errors

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    f"{ROOT / 'configs' / 'fgtbt.py'}:release",
    "Config file and preset, e.g. configs/fgtbt.py:release; any field can be overridden with "
    "--config.FIELD=VALUE (--config.model.dtype=bfloat16, --config.model.kernels=xla, "
    "--config.model.remat=True).",
)
_BATCH = flags.DEFINE_integer("batch", None, "Default: 4 × data.batch_per_dataset.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per case.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_MODES = flags.DEFINE_list(
    "modes", list(benchmarking.MODES), f"Subset of {','.join(benchmarking.MODES)}."
)
_DEVICES = flags.DEFINE_integer("devices", None, "JAX devices (default: all).")
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks",
    None,
    f"Subset of {','.join(benchmarking.FRAMEWORKS)} (overrides the flags below).",
)
_COMPARE_TORCH = flags.DEFINE_boolean("compare-torch", False, "Also time PyTorch eager.")
_TORCH_COMPILE = flags.DEFINE_boolean("torch-compile", False, "Also time torch.compile.")
_TORCH_COMPILE_TIMEOUT = flags.DEFINE_float(
    "torch-compile-timeout", 1800.0, "Seconds allowed per torch.compile case (with compiling)."
)
_MATMUL_SIZE = flags.DEFINE_integer("matmul-size", 4096, "Side of the peak-GEMM probe.")
_NO_MATMUL_PEAK = flags.DEFINE_boolean("no-matmul-peak", False, "Skip the peak-GEMM probe.")
_JSON = flags.DEFINE_string("json", None, "Write the result rows here.")
_REPORT = flags.DEFINE_string("report", None, "Only print the table of a saved --json file.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (config overrides: --config.X=Y)")
    if _REPORT.value is not None:
        rows = json.loads(pathlib.Path(_REPORT.value).read_text())
        print(
            benchmarking.markdown_table(
                rows, next((r["matmul_peak"] for r in rows if "matmul_peak" in r), None)
            )
        )
        return

    modes = _MODES.value
    bad = [m for m in modes if m not in benchmarking.MODES]
    if bad:
        raise app.UsageError(f"--modes: unknown mode(s) {bad}; choose from {benchmarking.MODES}")
    config = _CONFIG.value
    batch = _BATCH.value or 4 * int(config.data.batch_per_dataset)
    if _FRAMEWORKS.value:
        frameworks = _FRAMEWORKS.value
        bad = [f for f in frameworks if f not in benchmarking.FRAMEWORKS]
        if bad:
            raise app.UsageError(
                f"--frameworks: unknown framework(s) {bad}; choose from {benchmarking.FRAMEWORKS}"
            )
    else:
        frameworks = ["jax"]
        if _COMPARE_TORCH.value:
            frameworks.append("torch-eager")
        if _TORCH_COMPILE.value:
            frameworks.append("torch-compile")
    base = {
        "config_json": config.to_json(),
        "preset": config.preset,
        "img_size": int(config.img_size),
        "batch": batch,
        "dtype": config.model.dtype,
        "devices": _DEVICES.value,
        "threads": os.cpu_count(),
        "steps": _STEPS.value,
        "warmup": _WARMUP.value,
        "remat": bool(config.model.remat),
    }

    peak = None
    if not _NO_MATMUL_PEAK.value:
        peak = benchmarking.run_isolated(benchmarking.measure_jax_matmul_peak, _MATMUL_SIZE.value)
        print(f"matmul peak: {peak}", file=sys.stderr, flush=True)
        if "flops_per_sec" not in peak:
            peak = None

    rows = []
    for mode in modes:
        for fw in frameworks:
            spec = dict(base, framework=fw, mode=mode)
            timeout = _TORCH_COMPILE_TIMEOUT.value if fw == "torch-compile" else None
            row = benchmarking.with_mfu(benchmarking.run_case_isolated(spec, timeout), peak)
            rows.append(row)
            keys = ("framework", "mode", "kernels", "images_per_sec", "compile_seconds", "error")
            summary = {k: row.get(k) for k in keys}
            print(f"case: {summary}", file=sys.stderr, flush=True)
            if _JSON.value:  # keep partial results of long runs
                _write_json(_JSON.value, rows)

    print(benchmarking.markdown_table(rows, peak))
    if _JSON.value:
        _write_json(_JSON.value, rows)


def _write_json(path: str, rows: list[dict]) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    errors.run(main)
