"""Ahead-of-time compilation of the train and eval steps for accelerators this machine lacks.

TPU targets: libtpu (``pip install -e ".[tpu]"``) describes a pod slice through
``jax.experimental.topologies`` without any TPU attached, and XLA:TPU compiles the real train
step for a mesh of those devices, as MaxText's ``train_compile.py`` does. The compiled
executable reports per-device memory (``memory_analysis()``) and FLOPs / bytes accessed
(``cost_analysis()``); rows also carry the HBM-traffic model of the optimized HLO
(``hbm_traffic``, :mod:`fgtbt_jax.traffic`) and the roofline on it (``roofline_hbm``), next to
the roofline on XLA's "bytes accessed" (``roofline``), which also counts on-chip buffers.

GPU targets: without a GPU and without the CUDA plugin, JAX can only *lower* for ``cuda``:
:func:`export_cuda` serializes a ``jax.export`` artefact (StableHLO with the shardings) that a
CUDA machine compiles on load. Nothing is compiled for the GPU here, so there is no memory or
cost analysis from XLA:GPU.

The steps are exactly the trainer's: :func:`fgtbt_jax.train.step.make_train_step` under
:func:`~fgtbt_jax.train.step.jit_train_step` with the shardings of
:func:`~fgtbt_jax.train.state.abstract_train_state` (data parallel, or FSDP with
``config.sharding.fsdp``), and the evaluator's flip-test
:func:`fgtbt_jax.evaluation.decoding.make_eval_step` on the EMA variables.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax import landmarks
from fgtbt_jax.evaluation import decoding
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.train import sharding
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (one JAX device = one chip for every target below).

    ``peak_flops``: dense bfloat16 FLOP/s (also the ceiling for float32 matmuls, which XLA:TPU
    runs as bfloat16 passes on the MXU at default precision); ``hbm_bandwidth`` in bytes/s.
    """

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    source: str


# Sources: Google Cloud TPU documentation, "System architecture" pages of each generation
# (https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), and NVIDIA's H100 / A100
# datasheets (SXM, dense bfloat16 tensor-core peak without sparsity).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip("NVIDIA H100 SXM", 80 * 10**9, 989e12, 3.35e12, "NVIDIA H100 datasheet"),
    "a100": Chip("NVIDIA A100 SXM 80GB", 80 * 10**9, 312e12, 2.039e12, "NVIDIA A100 datasheet"),
}

# Pod-slice names as Cloud TPU sells them → (chip, topology, chip config), the table of
# MaxText's accelerator_to_spec_map.py. v4/v5p slices count TensorCores (2 per chip, fused into
# one "megacore" device), v5e/v6e slices count chips.
TPU_SLICES: dict[str, tuple[str, str, str]] = {
    "v4-8": ("v4", "v4:2x2x1", "megacore"),
    "v4-16": ("v4", "v4:2x2x2", "megacore"),
    "v4-32": ("v4", "v4:2x2x4", "megacore"),
    "v4-64": ("v4", "v4:2x4x4", "megacore"),
    "v5p-8": ("v5p", "v5:2x2x1", "megacore"),
    "v5p-16": ("v5p", "v5:2x2x2", "megacore"),
    "v5p-32": ("v5p", "v5:2x2x4", "megacore"),
    "v5e-4": ("v5e", "v5e:2x2", "default"),
    "v5e-8": ("v5e", "v5e:2x4", "default"),
    "v5e-16": ("v5e", "v5e:4x4", "default"),
    "v5e-32": ("v5e", "v5e:4x8", "default"),
    "v6e-4": ("v6e", "v6e:2x2", "default"),
    "v6e-8": ("v6e", "v6e:2x4", "default"),
    "v6e-16": ("v6e", "v6e:4x4", "default"),
}


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``tpu:<slice>`` (e.g. ``tpu:v5e-8``) or ``gpu:<chip>-<count>``."""

    name: str
    platform: str  # "tpu" or "cuda"
    chip: Chip
    num_devices: int
    topology: str | None = None
    chip_config: str | None = None


def parse_target(name: str) -> Target:
    """``tpu:<slice>`` (a key of :data:`TPU_SLICES`, e.g. ``tpu:v5e-8``) or ``gpu:h100-8``."""
    kind, _, spec = name.partition(":")
    if kind == "tpu" and spec in TPU_SLICES:
        chip, topology, chip_config = TPU_SLICES[spec]
        dims = [int(d) for d in topology.split(":")[1].split("x")]
        return Target(name, "tpu", CHIPS[chip], int(np.prod(dims)), topology, chip_config)
    if kind == "gpu":
        chip, _, count = spec.rpartition("-")
        if chip in ("h100", "a100") and count.isdigit() and int(count) > 0:
            return Target(name, "cuda", CHIPS[chip], int(count))
    raise ValueError(
        f"unknown target {name!r}; choose tpu:<slice> with slice in {sorted(TPU_SLICES)} "
        "or gpu:<h100|a100>-<number of GPUs>"
    )


def tpu_devices(target: Target) -> list[Any]:
    """The devices of a TPU slice described by libtpu (no TPU needed; libtpu must be installed)."""
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        topology_name=target.topology,
        platform="tpu",
        chip_config_name=target.chip_config,
        chips_per_host_bounds=(2, 2, 1),
        wrap=(False, False, False),
    )
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(
            f"{target.name}: libtpu describes {len(devices)} devices, expected {target.num_devices}"
        )
    return devices


def mesh_of(devices: Sequence[Any]) -> Mesh:
    """The trainer's one-axis ``data`` mesh over ``devices``."""
    return Mesh(np.asarray(devices), (sharding.DATA_AXIS,))


def step_config(
    config: ml_collections.ConfigDict,
    *,
    batch_per_device: int,
    num_devices: int,
    dtype: str,
    fsdp: bool,
) -> ml_collections.ConfigDict:
    """A copy of ``config`` for one compile: dtype, sharding and the global batch.

    The global batch is ``batch_per_device · num_devices`` and holds
    ``data.batch_per_dataset`` images of each of the four datasets, so it must be a multiple
    of four.
    """
    global_batch = batch_per_device * num_devices
    num_datasets = len(landmarks.DATASETS)
    if global_batch % num_datasets:
        raise ValueError(
            f"batch_per_device={batch_per_device} on {num_devices} devices gives a global batch "
            f"of {global_batch}, not a multiple of the {num_datasets} datasets"
        )
    c = ml_collections.ConfigDict(config.to_dict())
    c.model.dtype = dtype
    c.sharding.fsdp = fsdp
    c.data.batch_per_dataset = global_batch // num_datasets
    return c


def train_batch_spec(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, Any]:
    """Abstract global training batch (the :mod:`fgtbt_jax.train.step` contract), split over
    ``data``: ``image`` (B, S, S, 3) float32 NHWC, ``coords`` (B, 124, 2) int32, ``mask``
    (B, 124) bool, ``dataset_id`` (B,) int32."""
    b = int(config.data.batch_per_dataset) * len(landmarks.DATASETS)
    s = int(config.img_size)
    k = int(config.model.num_landmarks)
    split = sharding.data_sharding(mesh)
    shapes = {
        "image": ((b, s, s, 3), jnp.float32),
        "coords": ((b, k, 2), jnp.int32),
        "mask": ((b, k), jnp.bool_),
        "dataset_id": ((b,), jnp.int32),
    }
    return {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=split)
        for key, (shape, dtype) in shapes.items()
    }


def train_step_and_args(
    config: ml_collections.ConfigDict, mesh: Mesh, build: Callable = build_model
) -> tuple[Callable, tuple[Any, ...]]:
    """The trainer's jitted train step and abstract ``(state, batch)`` arguments for ``mesh``.

    Per-device BatchNorm/CSAM statistics (``stat_groups`` = devices) unless
    ``config.sharding.cross_device_stats``, as in training.
    """
    cross = bool(config.sharding.cross_device_stats)
    model = build(config.model, stat_groups=1 if cross else mesh.size)
    tx, schedule = train_state.make_optimizer(config)
    abstract = train_state.abstract_train_state(config, build(config.model), tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)
    step = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, config), shardings, mesh
    )
    return step, (abstract, train_batch_spec(config, mesh))


def eval_step_and_args(
    config: ml_collections.ConfigDict, mesh: Mesh, build: Callable = build_model
) -> tuple[Callable, tuple[Any, ...]]:
    """The evaluator's jitted flip-test eval step on the EMA variables (laid out as in the
    train state: replicated, or FSDP-split) and an ``image`` batch split over ``data``."""
    tx, _ = train_state.make_optimizer(config)
    model = build(config.model)
    abstract = train_state.abstract_train_state(config, model, tx, mesh)
    variables = abstract.ema_variables()
    batch = {"image": train_batch_spec(config, mesh)["image"]}
    split = sharding.data_sharding(mesh)
    step = jax.jit(
        decoding.make_eval_step(model),
        in_shardings=(jax.tree.map(lambda a: a.sharding, variables), {"image": split}),
        out_shardings=split,  # heatmaps and points stay split over the batch
    )
    return step, (variables, batch)


def roofline(flops: float, bytes_accessed: float, batch_per_device: int, chip: Chip) -> dict:
    """Lower bound on the step time of one device from its FLOPs and HBM traffic.

    ``max(flops / peak, bytes / bandwidth)``: an estimate that ignores communication, overlap
    limits and launch overheads, so real steps are slower and real images/s lower.
    """
    t_compute = flops / chip.peak_flops
    t_memory = bytes_accessed / chip.hbm_bandwidth
    t = max(t_compute, t_memory)
    return {
        "estimate": True,
        "chip": chip.name,
        "peak_flops": chip.peak_flops,
        "hbm_bandwidth": chip.hbm_bandwidth,
        "source": chip.source,
        "arithmetic_intensity": flops / bytes_accessed if bytes_accessed else None,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "step_seconds_lower_bound": t,
        "images_per_second_per_chip_upper_bound": batch_per_device / t if t else None,
    }


def compile_tpu(step: Callable, args: tuple[Any, ...]) -> tuple[Any, dict[str, float]]:
    """``step.lower(*args).compile()`` with the lowering and compile times."""
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_seconds": t1 - t0, "compile_seconds": t2 - t1}


def export_cuda(step: Callable, args: tuple[Any, ...]) -> tuple[bytes, dict[str, float]]:
    """A serialized ``jax.export`` artefact of ``step`` for ``cuda`` (lowered, not compiled).

    ``jax.export`` serializes only standard pytree nodes, so the artefact takes and returns
    flat lists: the leaves of ``args`` and of the result in ``jax.tree.leaves`` order (rebuild
    them with the trees of :func:`train_step_and_args` / :func:`eval_step_and_args`). Inside,
    ``step`` keeps its shardings and donation.
    """
    from jax import export

    leaves, treedef = jax.tree.flatten(args)

    def flat(*xs: jax.Array) -> list[jax.Array]:
        return jax.tree.leaves(step(*jax.tree.unflatten(treedef, xs)))

    t0 = time.perf_counter()
    shardings = [x.sharding for x in leaves]
    exported = export.export(jax.jit(flat, in_shardings=shardings), platforms=["cuda"])(*leaves)
    blob = exported.serialize()
    return bytes(blob), {"export_seconds": time.perf_counter() - t0}


def kernels_of(config: ml_collections.ConfigDict, target: Target) -> str | None:
    """``model.kernels`` as the target would resolve it (``auto`` → ``xla`` off CPU), or None
    for a configuration without the field."""
    if "kernels" not in config.model:
        return None
    return "xla" if config.model.kernels == "auto" else str(config.model.kernels)


def measure(
    target: Target,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    which: str,
    *,
    batch_per_device: int,
    dtype: str,
    fsdp: bool,
    export_dir: str | None = None,
) -> dict[str, Any]:
    """One JSON row: compile (TPU) or export (GPU) the ``which`` ∈ {train, eval} step."""
    c = step_config(
        config, batch_per_device=batch_per_device, num_devices=mesh.size, dtype=dtype, fsdp=fsdp
    )
    kernels = kernels_of(c, target)
    if kernels is not None:
        c.model.kernels = kernels
    make = train_step_and_args if which == "train" else eval_step_and_args
    step, args = make(c, mesh)
    row: dict[str, Any] = {
        "target": target.name,
        "platform": target.platform,
        "num_devices": mesh.size,
        "step": which,
        "preset": c.preset,
        "img_size": int(c.img_size),
        "batch_per_device": batch_per_device,
        "global_batch": batch_per_device * mesh.size,
        "dtype": dtype,
        "sharding": "fsdp" if fsdp else "data_parallel",
        "kernels": kernels,
        "jax": jax.__version__,
        "hbm_bytes": target.chip.hbm_bytes,
    }
    if target.platform == "tpu":
        compiled, times = compile_tpu(step, args)
        memory = compiled_figures.memory(compiled)
        cost = compiled_figures.cost(compiled)
        flops, traffic = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
        hbm = compiled_figures.traffic(compiled)
        row.update(
            compiled=True,
            memory_bytes=memory,
            fits=memory["total"] <= target.chip.hbm_bytes,
            flops=flops,
            bytes_accessed=traffic,
            roofline=roofline(flops, traffic, batch_per_device, target.chip),
            hbm_traffic=hbm.summary(),
            roofline_hbm=roofline(flops, hbm.hbm_bytes, batch_per_device, target.chip),
            **times,
        )
    else:
        blob, times = export_cuda(step, args)
        row.update(
            compiled=False,
            memory_bytes=None,
            fits=None,
            flops=None,
            bytes_accessed=None,
            compile_seconds=None,
            exported_bytes=len(blob),
            note=(
                "jax.export lowering for cuda only (StableHLO, serialized); not compiled for "
                "the GPU (no GPU / CUDA plugin here), so no memory or cost analysis"
            ),
            **times,
        )
        if export_dir:
            import pathlib

            name = f"{which}_{c.preset}_{dtype}_{row['sharding']}_b{batch_per_device}.jax_export"
            path = pathlib.Path(export_dir) / target.name.replace(":", "_") / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            row["export_path"] = str(path)
    return row
