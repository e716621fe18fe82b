"""HBM traffic and FLOPs of a compiled FGTBT train step, by model part and direction.

Each top-level instruction of the traffic model (:mod:`fgtbt_jax.traffic`) is named by its
HLO metadata: ``op_name`` carries the Flax module path (``…/backbone/block2_0/attn/…``) and
JAX's transformations — ops of the backward pass carry ``transpose(jvp(…))`` — and the
instruction's innermost recorded Python frame names code outside modules (the loss, the
optimizer, the EMA, the FFT high-pass). A part is the first rule of :data:`PARTS` whose pattern
matches ``op_name | file:function``; an instruction that XLA fused from several parts counts wholly
for the part that names the fusion (its root op).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import ml_collections

from fgtbt_jax import traffic

# (label, pattern) in order; the label's {1}, {2} take the pattern's groups.
PARTS: tuple[tuple[str, str], ...] = (
    ("EMA", r":ema_update\b"),
    ("heatmap targets", r":(render_heatmaps|heatmaps_and_weights|_gaussian|_points)\b"),
    ("loss", r"/train/loss\.py:"),
    ("FFT high-pass", r":high_pass(_dft)?\b"),
    ("stem: patch_embed1", r"/backbone/patch_embed1/"),
    ("stem: prompt handcrafted_generator1", r"/prompt_generator[.\w]*/handcrafted_generator1/"),
    ("stage {1} patch embed", r"/backbone/patch_embed(\d)/"),
    ("stage {1} prompt CSAM", r"/prompt_generator[.\w]*/shared_csam(\d)/"),
    ("stage {1} prompt handcrafted", r"/prompt_generator[.\w]*/handcrafted_generator(\d)/"),
    (
        "stage {2} prompt branch",
        r"/prompt_generator[.\w]*/(embedding_generator|lightweight_mlp|shared_mlp|bn|conv)(\d)",
    ),
    ("stage {1} attention", r"/backbone/block(\d)_\d+/attn/"),
    ("stage {1} depthwise conv", r"/backbone/block(\d)_\d+/mlp/dwconv/"),
    ("stage {1} Mix-FFN", r"/backbone/block(\d)_\d+/mlp/"),
    ("stage {1} block norms, residual", r"/backbone/block(\d)_\d+/"),
    ("stage {1} norm", r"/backbone/norm(\d)/"),
    ("prompt branch (other)", r"/prompt_generator[.\w]*/"),
    ("decoder", r"/decode_head/"),
    ("backbone (other)", r"/backbone/"),
    # Left in the step itself: optax's update (its frames are not recorded) and the metrics.
    ("optimizer", r"optax/|/train/optim\.py:|/train/step\.py:\S*train_step$"),
    ("parameter layout copies", r"^state\.(params|batch_stats)"),
)


def direction(op_name: str) -> str:
    """``backward`` (``transpose(…)`` in the op's name), ``forward`` (``jvp(…)``), else
    ``update`` (code outside the differentiated loss: optimizer, EMA, metrics)."""
    if "transpose(" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "update"


def part(row: traffic.Row, parts: Sequence[tuple[str, str]] = PARTS) -> str:
    """The model part of one instruction (``other`` when no rule matches)."""
    file, function = row.stack[0] if row.stack else ("", "")
    key = f"{row.op_name} | {file}:{function}"
    for label, pattern in parts:
        m = re.search(pattern, key)
        if m:
            return label.format(None, *m.groups())
    return "other"


@dataclasses.dataclass
class PartRow:
    """Totals of one (part, direction): bytes at tiled sizes, matmul FLOPs, instructions."""

    part: str
    direction: str
    hbm_bytes: int = 0
    on_chip_bytes: int = 0
    flops: float = 0.0
    instructions: int = 0


def by_part(rows: Iterable[traffic.Row], parts: Sequence[tuple[str, str]] = PARTS) -> list[PartRow]:
    """Rows grouped by (part, direction), largest HBM traffic first."""
    groups: dict[tuple[str, str], PartRow] = {}
    for r in rows:
        key = (part(r, parts), direction(r.op_name))
        g = groups.setdefault(key, PartRow(*key))
        g.hbm_bytes += r.hbm_bytes
        g.on_chip_bytes += r.on_chip_bytes
        g.flops += r.count * r.flops
        g.instructions += 1
    return sorted(groups.values(), key=lambda g: (-g.hbm_bytes, -g.flops, g.part))


def compile_train_step(
    config: ml_collections.ConfigDict,
    target: str,
    *,
    batch_per_device: int,
    dtype: str,
    fsdp: bool,
) -> tuple[Any, Any]:
    """The trainer's train step lowered and compiled for ``target``: ``tpu:<slice>`` (through
    libtpu, no TPU needed), ``gpu:<chip>-<GPUs>`` (through the CUDA plugin, no GPU needed; see
    :mod:`fgtbt_jax.train.aot`) or ``cpu:<devices>`` (needs that many CPU devices,
    ``jax_num_cpu_devices``). Returns ``(lowered, compiled)``; raises ``ValueError`` for an
    unknown target."""
    import jax

    from fgtbt_jax.train import aot

    kind, _, count = target.partition(":")
    if kind == "cpu":
        devices = jax.devices("cpu")
        if not count.isdigit() or not 0 < int(count) <= len(devices):
            raise ValueError(f"target {target!r}: cpu:<n> with n ≤ {len(devices)} CPU devices")
        devices = devices[: int(count)]
        parsed = None
    else:
        parsed = aot.parse_target(target)
        devices = aot.target_devices(parsed)
    mesh = aot.mesh_of(devices)
    c = aot.step_config(
        config, batch_per_device=batch_per_device, num_devices=mesh.size, dtype=dtype, fsdp=fsdp
    )
    if parsed is not None:
        kernels = aot.kernels_of(c, parsed)
        if kernels is not None:
            c.model.kernels = kernels
    step, args = aot.train_step_and_args(c, mesh)
    if parsed is None:
        lowered = step.lower(*args)
        return lowered, lowered.compile()
    lowered, compiled, _ = aot.compile_step(step, args, parsed)
    return lowered, compiled


def report(model: traffic.Traffic, xla_cost: dict[str, float] | None = None) -> dict:
    """JSON-able totals (the traffic model's and XLA's cost analysis) and the part rows."""
    xla_cost = xla_cost or {}
    return {
        "totals": {
            **model.summary(),
            "xla_bytes_accessed": xla_cost.get("bytes accessed"),
            "xla_flops": xla_cost.get("flops"),
        },
        "parts": [dataclasses.asdict(p) for p in by_part(model.rows)],
    }


def format_table(parts: Sequence[dict], top: int, hbm_total: float) -> str:
    """The ``top`` part rows as a markdown table (GB = 10⁹ bytes, GFLOP = 10⁹ FLOPs)."""
    lines = [
        "| # | part | pass | HBM GB | % of HBM | on-chip GB | matmul GFLOP | instr. |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, p in enumerate(parts[:top], 1):
        share = 100.0 * p["hbm_bytes"] / hbm_total if hbm_total else 0.0
        lines.append(
            f"| {i} | {p['part']} | {p['direction']} | {p['hbm_bytes'] / 1e9:.2f} | "
            f"{share:.1f} | {p['on_chip_bytes'] / 1e9:.2f} | {p['flops'] / 1e9:.1f} | "
            f"{p['instructions']} |"
        )
    return "\n".join(lines)
