"""Throughput of the compiled train step: FLOPs per step, TFLOP/s per device and MFU.

``flops_per_step`` is XLA's cost analysis of the compiled step (:mod:`fgtbt_jax.compiled`),
counted once: the compiled program is the per-device SPMD partition, so its FLOPs are those of
one device and the global step does ``program FLOPs × devices``. ``tflops_per_device`` is
``flops_per_step / step_time / devices``; ``mfu`` divides it by the device's published peak
(:func:`peak_flops`, from the chip table :data:`fgtbt_jax.train.aot.CHIPS`), or is None where
no peak is known (CPU, unlisted accelerators, float64).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax.train.aot import CHIPS, Chip

# jax.Device.device_kind (lower case) → key of aot.CHIPS. The first matching fragment wins, so
# "v5 lite" (v5e) precedes "v5" (v5p). H100 PCIe / NVL have other peaks and stay unknown.
_KINDS: tuple[tuple[str, str], ...] = (
    ("tpu v4", "v4"),
    ("tpu v5 lite", "v5e"),
    ("tpu v5e", "v5e"),
    ("tpu v5p", "v5p"),
    ("tpu v5", "v5p"),
    ("tpu v6 lite", "v6e"),
    ("tpu v6e", "v6e"),
    ("h200", "h200"),
    ("h100", "h100"),
    ("a100", "a100"),
)
_UNLISTED_VARIANTS = ("pcie", "nvl")


def chip_of(device_kind: str) -> Chip | None:
    """The :data:`~fgtbt_jax.train.aot.CHIPS` entry of a ``jax.Device.device_kind``, or None."""
    kind = device_kind.lower()
    if any(v in kind for v in _UNLISTED_VARIANTS):
        return None
    for fragment, key in _KINDS:
        if fragment in kind:
            return CHIPS.get(key)
    return None


def peak_flops(device_kind: str, dtype: str) -> float | None:
    """Published dense peak FLOP/s of one device for the compute ``dtype``, or None if unknown.

    bfloat16: the table's peak. float32: on TPUs the same (XLA:TPU runs float32 matmuls as
    bfloat16 MXU passes at default precision); on NVIDIA GPUs half of it, the TF32 tensor-core
    rate that XLA:GPU uses for float32 matmuls (A100/H100/H200 datasheets: TF32 = BF16 / 2).
    float64: None.
    """
    chip = chip_of(device_kind)
    if chip is None or dtype not in ("bfloat16", "float32"):
        return None
    if dtype == "float32" and device_kind.lower().startswith("nvidia"):
        return chip.peak_flops / 2
    return chip.peak_flops


@dataclasses.dataclass(frozen=True)
class StepCost:
    """FLOPs of one compiled train step over ``devices`` devices and the peak to compare with.

    ``flops_per_step`` is None where the backend reports no cost analysis.
    """

    flops_per_step: float | None
    devices: int
    global_batch: int
    peak_flops_per_device: float | None
    device_kind: str

    @classmethod
    def of(
        cls, compiled: Any, *, devices: int, global_batch: int, device_kind: str, dtype: str
    ) -> StepCost:
        per_device = compiled_figures.flops(compiled)
        return cls(
            flops_per_step=None if per_device is None else per_device * devices,
            devices=devices,
            global_batch=global_batch,
            peak_flops_per_device=peak_flops(device_kind, dtype),
            device_kind=device_kind,
        )

    def window(self, step_time_s: float) -> dict[str, float | None]:
        """``tflops_per_device`` and ``mfu`` (None where unknown) at ``step_time_s`` per step."""
        if self.flops_per_step is None or step_time_s <= 0:
            return {"tflops_per_device": None, "mfu": None}
        per_device = self.flops_per_step / step_time_s / self.devices
        mfu = per_device / self.peak_flops_per_device if self.peak_flops_per_device else None
        return {"tflops_per_device": per_device / 1e12, "mfu": mfu}

    def record(self) -> dict[str, float | int | str | None]:
        """The figures as a JSON-ready dict (with ``flops_per_image``)."""
        per_image = None
        if self.flops_per_step is not None:
            per_image = self.flops_per_step / self.global_batch
        return {**dataclasses.asdict(self), "flops_per_image": per_image}

    def line(self) -> str:
        """One log line: FLOPs per step and per image, and the peak MFU is measured against."""
        if self.flops_per_step is None:
            flops = "FLOPs per step unknown (no cost analysis on this backend)"
        else:
            flops = (
                f"{self.flops_per_step / 1e9:.2f} GFLOP per step, "
                f"{self.flops_per_step / self.global_batch / 1e9:.2f} GFLOP per image "
                f"(XLA cost analysis × {self.devices} device(s))"
            )
        chip = chip_of(self.device_kind)
        if self.peak_flops_per_device is None or chip is None:
            peak = f"MFU: no published peak for {self.device_kind!r} at this dtype"
        else:
            peak = (
                f"MFU against {self.peak_flops_per_device / 1e12:.0f} TFLOP/s per device "
                f"({chip.name}, {chip.source})"
            )
        return f"{flops}; {peak}"
