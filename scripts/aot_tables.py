r"""Renders docs/planning.md's planning tables from the JSON rows of ``scripts/aot_compile.py``.

  python scripts/aot_tables.py --json benchmarks/aot_tpu_release.json            # print them
  python scripts/aot_tables.py --json benchmarks/aot_tpu_release.json --markdown docs/planning.md
  python scripts/aot_tables.py --targets gpu --json benchmarks/aot_gpu_release.json \
      --markdown docs/planning_gpu.md

The planning table has one line per target, dtype and sharding and one column per batch per
device (train step, ``kernels=xla``): the total memory per device and whether it fits, XLA's
out-of-memory verdict, or "not measured". The second table lists every compiled row in full,
with two rooflines: on XLA's "bytes accessed" and on the HBM-traffic model of
``fgtbt_jax/traffic.py`` (rows compiled since the model covers their target; "-" otherwise).
``--markdown`` rewrites both tables in place (each from its header line to the next blank line).
"""

from __future__ import annotations

import itertools
import json
import pathlib
import re

from absl import flags

from fgtbt_jax import errors

_JSON = flags.DEFINE_string("json", "benchmarks/aot_tpu_release.json", "aot_compile.py rows.")
_MARKDOWN = flags.DEFINE_string("markdown", None, "Markdown file whose tables are rewritten.")
_TARGETS = flags.DEFINE_enum("targets", "tpu", ["tpu", "gpu"], "Which targets' tables.")

GiB = 2**30
TARGETS = {"tpu:v5e-8": "v5e, 16 GiB", "tpu:v4-32": "v4, 32 GiB"}
GPU_TARGETS = {"gpu:h100-8": "H100 SXM, 79.11 GiB", "gpu:a100-8": "A100 SXM, 79.26 GiB"}
DTYPES = ("float32", "bfloat16")
SHARDINGS = {"data_parallel": "data parallel", "fsdp": "FSDP"}
BATCHES = (1, 4, 16)
PLAN_HEADER = (
    "| target (chip, HBM) | dtype | sharding | batch 1 / device | batch 4 / device "
    "| batch 16 / device |"
)
FULL_HEADER = (
    "| target | dtype | sharding | batch / device | step | arguments GiB (donated) "
    "| temporaries GiB | total GiB | GFLOP | GB accessed (XLA) | FLOP/byte | ≥ ms/step (XLA "
    "bytes) | ≤ images/s per chip (XLA bytes) | GB HBM (model) | ≤ images/s per chip (HBM "
    "model) | compile |"
)
# XLA:TPU states an out-of-memory compile in one of these two forms.
_OOM = (
    (re.compile(r"Used ([0-9.]+[GM]) of ([0-9.]+[GM]) hbm"), "used {} of {}"),
    (
        re.compile(r"HLO temporaries \(([0-9.]+[GM])\) exceeds available HBM \(([0-9.]+[GM])\)"),
        "temporaries {}, {} available",
    ),
)


def find(
    rows: list[dict], target: str, step: str, dtype: str, sharding: str, batch: int
) -> dict | None:
    """The row of one cell (``kernels=xla``, as ``auto`` resolves on TPU), or None."""
    key = (target, step, dtype, sharding, batch, "xla")
    fields = ("target", "step", "dtype", "sharding", "batch_per_device", "kernels")
    hits = [r for r in rows if tuple(r.get(f) for f in fields) == key]
    if len(hits) > 1:
        raise ValueError(f"{len(hits)} rows for {key}")
    return hits[0] if hits else None


def cell(row: dict | None) -> str:
    status = None if row is None else row.get("status")
    if status == "compiled":
        fits = "fits" if row["fits"] else "does NOT fit"
        return f"{row['memory_bytes']['total'] / GiB:.2f} GiB, {fits}"
    if status == "out of memory":
        for pattern, text in _OOM:
            m = pattern.search(row.get("error", ""))
            if m:
                return f"does NOT fit (XLA: {text.format(*m.groups())})"
        return "does NOT fit (XLA: out of memory)"
    return "failed to compile" if status == "failed" else "not measured"


def planning_table(rows: list[dict], targets: dict[str, str] = TARGETS) -> list[str]:
    lines = [PLAN_HEADER, "|---|---|---|---|---|---|"]
    for target, chip in targets.items():
        for dtype in DTYPES:
            for sharding, name in SHARDINGS.items():
                cells = [cell(find(rows, target, "train", dtype, sharding, b)) for b in BATCHES]
                lines.append(
                    f"| {target} ({chip}) | {dtype} | {name} | " + " | ".join(cells) + " |"
                )
    return lines


def full_table(rows: list[dict], targets: dict[str, str] = TARGETS) -> list[str]:
    lines = [FULL_HEADER, "|" + "---|" * FULL_HEADER.count(" |")]
    cells = itertools.product(targets, ("train", "eval"), DTYPES, SHARDINGS.items(), BATCHES)
    for target, step, dtype, (sharding, name), b in cells:
        r = find(rows, target, step, dtype, sharding, b)
        if r is None or r.get("status") != "compiled":
            continue
        m, roof = r["memory_bytes"], r["roofline"]
        hbm, roof_hbm = r.get("hbm_traffic"), r.get("roofline_hbm")
        model = (
            f"{hbm['hbm_bytes'] / 1e9:.1f} | "
            f"{roof_hbm['images_per_second_per_chip_upper_bound']:.1f}"
            if hbm and roof_hbm
            else "- | -"
        )
        lines.append(
            f"| {target} | {dtype} | {name} | {b} | "
            f"{'train' if step == 'train' else 'eval (flip test)'} | "
            f"{m['argument'] / GiB:.2f} ({m['alias'] / GiB:.2f}) | "
            f"{m['temp'] / GiB:.2f} | {m['total'] / GiB:.2f} | "
            f"{r['flops'] / 1e9:.1f} | {r['bytes_accessed'] / 1e9:.1f} | "
            f"{roof['arithmetic_intensity']:.1f} | "
            f"{roof['step_seconds_lower_bound'] * 1e3:.1f} | "
            f"{roof['images_per_second_per_chip_upper_bound']:.1f} | {model} | "
            f"{r['compile_seconds'] / 60:.1f} min |"
        )
    return lines


def replace_table(text: str, table: list[str]) -> str:
    """Replaces the table that starts with ``table[0]`` (up to the next blank line)."""
    lines = text.split("\n")
    try:
        start = lines.index(table[0])
    except ValueError:
        raise errors.InputFileError(
            f"--markdown: no table with the header {table[0]!r} (a table's header line must "
            "match the one this script writes)"
        ) from None
    end = start
    while end < len(lines) and lines[end].strip():
        end += 1
    return "\n".join(lines[:start] + table + lines[end:])


def main(argv: list[str]) -> None:
    del argv
    rows = json.loads(pathlib.Path(_JSON.value).read_text())
    targets = GPU_TARGETS if _TARGETS.value == "gpu" else TARGETS
    plan, full = planning_table(rows, targets), full_table(rows, targets)
    if _MARKDOWN.value is None:
        print("\n".join(plan + [""] + full))
        return
    path = pathlib.Path(_MARKDOWN.value)
    path.write_text(replace_table(replace_table(path.read_text(), plan), full))


if __name__ == "__main__":
    errors.run(main)
