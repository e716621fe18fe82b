r"""Compiles the train and eval steps ahead of time for TPU slices and NVIDIA GPUs.

  pip install -e ".[tpu]"   # libtpu, matched to the installed jax
  python scripts/aot_compile.py --config configs/fgtbt.py:release --target tpu:v5e-8 \
      --batch_per_device 1,4 --sharding dp,fsdp --json aot.json
  pip install -e ".[gpu-aot]"   # the CUDA plugin and CUDA wheels, matched to the installed jax
  JAX_PLATFORMS=cpu python scripts/aot_compile.py --config configs/fgtbt.py:release \
      --target gpu:h100-8,gpu:a100-8 --dtype bfloat16 --batch_per_device 4 --json aot.json

Runs on a CPU machine: libtpu describes the TPU slice, the CUDA plugin the GPUs
(``gpu:<h100|h200|a100>-<GPUs>`` or multi-host ``gpu:h100-<hosts>x<GPUs per host>``), both
through ``jax.experimental.topologies``, and XLA:TPU / XLA:GPU compile the trainer's jitted
train step and the evaluator's eval step for a mesh of those devices, with the trainer's
shardings (``--sharding dp`` = data parallel with a replicated state, ``fsdp`` =
``config.sharding.fsdp``). Prints, per row, the per-device memory of the compiled executable
(arguments, outputs, temporaries; whether it fits the chip's HBM), FLOPs and bytes accessed,
compile time and a roofline estimate (a lower bound on step time and the images/s per chip it
implies, from the chip's published peak FLOP/s and HBM bandwidth), also on the HBM-traffic
model of ``fgtbt_jax/traffic.py`` (columns ``GB HBM``, ``HBM≤i/s``). A TPU
configuration that does not fit fails to compile with XLA's out-of-memory error, recorded in
the row; XLA:GPU compiles it anyway (the row says it does not fit; a GPU would fail to
allocate at run time). GPU compiles are not autotuned, and their FLOPs and bytes come from
XLA's HLO cost analysis (``fgtbt_jax/train/aot.py`` says which module each comes from).

``--export_dir DIR`` with GPU targets serializes each step with ``jax.export`` for ``cuda``
(StableHLO with the shardings, compiled by the CUDA host that loads it) instead of compiling
it; this needs no CUDA plugin.

``--json OUT`` is rewritten after every row (rows are keyed by target, step, batch, dtype,
sharding and kernels, so several runs can fill one file); rows still to be measured are
written with ``"status": "not measured"`` first, so an interrupted run leaves them marked.
``--json``, ``--export_dir`` and ``--save_hlo`` (each compiled program's optimized HLO text,
for ``scripts/traffic_attribution.py --hlo``) may be ``gs://`` URLs (each file written whole or
not at all).
"""

from __future__ import annotations

import json
import logging
import os
import traceback

import jax
from absl import app, flags
from etils import epath
from ml_collections import config_flags

from fgtbt_jax import errors, paths
from fgtbt_jax.train import aot

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fgtbt.py:release", lock_config=False
)
_TARGET = flags.DEFINE_list(
    "target",
    ["tpu:v5e-8"],
    f"tpu:<slice> ({', '.join(aot.TPU_SLICES)}), gpu:<chip>-<GPUs> or "
    f"gpu:<chip>-<hosts>x<GPUs per host> (chip: {', '.join(aot.GPU_SPECS)})",
)
_STEP = flags.DEFINE_list("step", ["train", "eval"], "Steps to compile: train, eval.")
_BATCH = flags.DEFINE_list("batch_per_device", ["1"], "Per-device batch sizes.")
_DTYPE = flags.DEFINE_list("dtype", [], "Compute dtypes (default: config.model.dtype).")
_SHARDING = flags.DEFINE_list(
    "sharding", [], "dp and/or fsdp (default: from config.sharding.fsdp)."
)
_JSON = flags.DEFINE_string("json", None, "JSON file of rows (updated after every row).")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir",
    None,
    "GPU targets: serialize the steps with jax.export into this directory instead of "
    "compiling them (no CUDA plugin needed).",
)

_SAVE_HLO = flags.DEFINE_string(
    "save_hlo",
    None,
    "Also write each compiled program's optimized HLO text under this directory "
    "(<dir>/<target>/<step>_<preset>_<dtype>_<sharding>_b<batch>.hlo.txt), e.g. for "
    "scripts/traffic_attribution.py --hlo.",
)

KEY = ("target", "step", "batch_per_device", "dtype", "sharding", "kernels")


def _key(row: dict) -> tuple:
    return tuple(row.get(k) for k in KEY)


def _load(path: epath.Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return json.loads(path.read_text())


def _save(path: epath.Path | None, rows: list[dict]) -> None:
    if path is None:
        return
    paths.write_text(path, json.dumps(rows, indent=1) + "\n")  # whole or not at all


def _upsert(rows: list[dict], row: dict) -> None:
    for i, old in enumerate(rows):
        if _key(old) == _key(row):
            rows[i] = row
            return
    rows.append(row)


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x / aot.GiB:.2f}"


def format_row(row: dict) -> str:
    mem = row.get("memory_bytes") or {}
    roof = row.get("roofline") or {}
    flops, traffic = row.get("flops"), row.get("bytes_accessed")
    fits = {True: "yes", False: "NO", None: "-"}[row.get("fits")]
    t = roof.get("step_seconds_lower_bound")
    ips = roof.get("images_per_second_per_chip_upper_bound")
    hbm = (row.get("hbm_traffic") or {}).get("hbm_bytes")
    ips_hbm = (row.get("roofline_hbm") or {}).get("images_per_second_per_chip_upper_bound")
    seconds = row.get("compile_seconds") or row.get("export_seconds")
    return (
        f"{row['target']:<13} {row['step']:<5} {row['batch_per_device']:>3} {row['dtype']:<8} "
        f"{row['sharding']:<13} {_gib(mem.get('argument')):>7} {_gib(mem.get('output')):>7} "
        f"{_gib(mem.get('temp')):>7} {_gib(mem.get('total')):>7} {fits:>4} "
        f"{'-' if flops is None else f'{flops / 1e9:.1f}':>8} "
        f"{'-' if traffic is None else f'{traffic / 1e9:.2f}':>8} "
        f"{'-' if t is None else f'{t * 1e3:.1f}':>8} {'-' if ips is None else f'{ips:.1f}':>7} "
        f"{'-' if hbm is None else f'{hbm / 1e9:.2f}':>8} "
        f"{'-' if ips_hbm is None else f'{ips_hbm:.1f}':>7} "
        f"{'-' if seconds is None else f'{seconds:.0f}':>6}  {row.get('status', '')}"
    )


HEADER = (
    f"{'target':<13} {'step':<5} {'b/d':>3} {'dtype':<8} {'sharding':<13} {'arg GiB':>7} "
    f"{'out GiB':>7} {'tmp GiB':>7} {'tot GiB':>7} {'fits':>4} {'GFLOP':>8} {'GB acc':>8} "
    f"{'≥ms/step':>8} {'≤img/s':>7} {'GB HBM':>8} {'HBM≤i/s':>7} {'comp s':>6}"
)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    targets = [aot.parse_target(t) for t in _TARGET.value]
    dtypes = _DTYPE.value or [str(config.model.dtype)]
    shardings = _SHARDING.value or ["fsdp" if config.sharding.fsdp else "dp"]
    for s in shardings:
        if s not in ("dp", "fsdp"):
            raise app.UsageError(f"--sharding: dp or fsdp, got {s!r}")
    for s in _STEP.value:
        if s not in ("train", "eval"):
            raise app.UsageError(f"--step: train or eval, got {s!r}")
    batches = [int(b) for b in _BATCH.value]
    # Local or gs:// (an unsupported URL fails here, before anything compiles).
    path = paths.resolve(_JSON.value, "--json") if _JSON.value else None
    paths.check(_EXPORT_DIR.value, "--export_dir")
    gpu_devices = max((t.num_devices for t in targets if t.platform == "cuda"), default=0)
    if gpu_devices and "JAX_PLATFORMS" not in os.environ:
        # The CUDA plugin fails at cuInit without a driver unless the runtime stays on CPU.
        jax.config.update("jax_platforms", "cpu")
    if gpu_devices and _EXPORT_DIR.value:  # export needs as many CPU devices as GPUs
        jax.config.update("jax_num_cpu_devices", gpu_devices)

    plan = [
        (target, which, b, dtype, s)
        for target in targets
        for b in batches
        for dtype in dtypes
        for s in shardings
        for which in _STEP.value
    ]
    rows = _load(path)
    for target, which, b, dtype, s in plan:
        pending = {
            "target": target.name,
            "step": which,
            "batch_per_device": b,
            "dtype": dtype,
            "sharding": "fsdp" if s == "fsdp" else "data_parallel",
            "kernels": aot.kernels_of(config, target),
            "preset": config.preset,
            "status": "not measured",
        }
        if not any(_key(r) == _key(pending) for r in rows):
            rows.append(pending)
    _save(path, rows)

    print(HEADER, flush=True)
    meshes: dict[str, object] = {}
    for target, which, b, dtype, s in plan:
        if target.name not in meshes:
            exporting = target.platform == "cuda" and _EXPORT_DIR.value
            devices = (
                jax.devices("cpu")[: target.num_devices]
                if exporting
                else aot.target_devices(target)
            )
            meshes[target.name] = aot.mesh_of(devices)
        try:
            row = aot.measure(
                target,
                meshes[target.name],
                config,
                which,
                batch_per_device=b,
                dtype=dtype,
                fsdp=s == "fsdp",
                export_dir=_EXPORT_DIR.value,
                hlo_dir=_SAVE_HLO.value,
            )
            row["status"] = "compiled" if row["compiled"] else "exported (not compiled)"
        except Exception as e:  # noqa: BLE001 - an out-of-memory compile is a result, not a crash
            message = f"{type(e).__name__}: {e}"
            logging.error(
                "%s %s b=%d %s %s failed:\n%s",
                target.name,
                which,
                b,
                dtype,
                s,
                traceback.format_exc(),
            )
            oom = "RESOURCE_EXHAUSTED" in message or "ran out of memory" in message.lower()
            row = {
                "target": target.name,
                "platform": target.platform,
                "step": which,
                "preset": config.preset,
                "batch_per_device": b,
                "dtype": dtype,
                "sharding": "fsdp" if s == "fsdp" else "data_parallel",
                "kernels": aot.kernels_of(config, target),
                "hbm_bytes": target.chip.hbm_bytes,
                "fits": False if oom else None,
                "status": "out of memory" if oom else "failed",
                "error": message[:4000],
            }
        _upsert(rows, row)
        _save(path, rows)
        print(format_row(row), flush=True)
    print(
        "≥ms/step, ≤img/s: roofline ESTIMATE per chip, max(FLOPs / peak FLOP/s, bytes / HBM "
        'bandwidth); real steps are slower. GB acc: XLA\'s "bytes accessed" (counts on-chip '
        "buffers too). GB HBM, HBM≤i/s: the HBM-traffic model "
        "(fgtbt_jax/traffic.py) and the roofline on it."
    )
    if any(t.platform == "cuda" for t in targets) and not _EXPORT_DIR.value:
        print(
            "GPU targets: deviceless XLA:GPU compiles without autotuning (Triton GEMMs off); "
            "FLOPs from the unoptimized program / devices, bytes from the optimized module "
            "with its cuBLAS/cuDNN calls' operands. A GPU row over the HBM still compiles: "
            "XLA:GPU does not refuse it, the allocation would fail on the GPU."
        )


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    errors.run(main)
