r"""Prints the train step's HBM traffic and FLOPs by model part, forward and backward.

  python scripts/traffic_attribution.py --config configs/fgtbt.py:release \
      --target tpu:v5e-8 --batch_per_device 4 --dtype bfloat16 --json traffic.json

Compiles the trainer's train step (``--target tpu:<slice>`` through libtpu, no TPU needed;
``gpu:<chip>-<GPUs>`` through the CUDA plugin, no GPU needed: ``pip install -e ".[gpu-aot]"``,
``JAX_PLATFORMS=cpu``; or ``cpu:<devices>``), applies the traffic model of
``fgtbt_jax/traffic.py`` to the optimized HLO (per top-level instruction: operands and result
at tiled sizes, HBM vs on-chip; cuBLAS / cuDNN calls like the GEMMs and convolutions they
are) and groups instructions by model part (``fgtbt_jax/attribution.py``). ``--hlo FILE``
reads a saved optimized HLO text instead of compiling (``--save_hlo`` writes one). GPU
targets' ``xla_flops`` / ``xla_bytes_accessed`` are those of ``scripts/aot_compile.py``'s
GPU rows (``fgtbt_jax/train/aot.py`` says where each comes from).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from fgtbt_jax import attribution, errors, traffic  # noqa: E402
from fgtbt_jax import compiled as compiled_figures  # noqa: E402
from fgtbt_jax.train import aot  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fgtbt.py:release", lock_config=False
)
_TARGET = flags.DEFINE_string(
    "target", "tpu:v5e-8", "tpu:<slice>, gpu:<chip>-<GPUs> or cpu:<devices>."
)
_BATCH = flags.DEFINE_integer("batch_per_device", 4, "Images per device.")
_DTYPE = flags.DEFINE_string("dtype", None, "Compute dtype (default: config.model.dtype).")
_FSDP = flags.DEFINE_bool("fsdp", None, "FSDP state (default: config.sharding.fsdp).")
_TOP = flags.DEFINE_integer("top", 15, "Rows of the printed table.")
_JSON = flags.DEFINE_string("json", None, "Write totals and all part rows here.")
_HLO = flags.DEFINE_string("hlo", None, "Read this optimized HLO text instead of compiling.")
_SAVE_HLO = flags.DEFINE_string("save_hlo", None, "Write the compiled optimized HLO text here.")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    kind, _, count = _TARGET.value.partition(":")
    if kind == "cpu" and count.isdigit():
        jax.config.update("jax_num_cpu_devices", int(count))
    dtype = _DTYPE.value or str(config.model.dtype)
    fsdp = bool(config.sharding.fsdp) if _FSDP.value is None else _FSDP.value
    xla_cost = None
    memory = None
    if _HLO.value:
        path = pathlib.Path(_HLO.value)
        if not path.is_file():
            raise FileNotFoundError(f"--hlo: no such file {path}")
        text = path.read_text()
    else:
        try:
            lowered, compiled = attribution.compile_train_step(
                config, _TARGET.value, batch_per_device=_BATCH.value, dtype=dtype, fsdp=fsdp
            )
        except ValueError as e:
            raise errors.ConfigError(f"--target/--batch_per_device: {e}") from None
        text = compiled.as_text()
        if kind == "cpu":
            xla_cost = compiled_figures.cost(compiled)
            memory = compiled_figures.memory(compiled)
        else:  # as aot_compile.py's rows (on GPU: cuBLAS/cuDNN calls included)
            target = aot.parse_target(_TARGET.value)
            figures = aot.compiled_figures_of(target, lowered, compiled, target.num_devices)
            xla_cost = {"flops": figures["flops"], "bytes accessed": figures["bytes_accessed"]}
            memory = figures["memory_bytes"]
        if _SAVE_HLO.value:
            pathlib.Path(_SAVE_HLO.value).write_text(text)
    result = attribution.report(traffic.of_hlo(text), xla_cost)
    result["setup"] = {
        "preset": config.preset,
        "target": None if _HLO.value else _TARGET.value,
        "batch_per_device": _BATCH.value,
        "dtype": dtype,
        "sharding": "fsdp" if fsdp else "data_parallel",
        "jax": jax.__version__,
        "hlo": _HLO.value,
    }
    if memory is not None:
        result["memory_bytes"] = memory
    totals = result["totals"]
    print(json.dumps(result["setup"]))
    for key in ("hbm_bytes", "on_chip_bytes", "boundary_bytes", "xla_bytes_accessed"):
        value = totals[key]
        print(f"{key:>20}: {'-' if value is None else f'{value / 1e9:.2f} GB'} per step")
    for key in ("matmul_flops", "xla_flops"):
        value = totals[key]
        print(f"{key:>20}: {'-' if value is None else f'{value / 1e9:.1f} GFLOP'} per step")
    print(attribution.format_table(result["parts"], _TOP.value, totals["hbm_bytes"]))
    if _JSON.value:
        out = pathlib.Path(_JSON.value)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    errors.run(main)
