"""Ahead-of-time compilation of the train and eval steps for accelerators this machine lacks.

TPU targets: libtpu (``pip install -e ".[tpu]"``) describes a pod slice through
``jax.experimental.topologies`` without any TPU attached, and XLA:TPU compiles the real train
step for a mesh of those devices, as MaxText's ``train_compile.py`` does. The compiled
executable reports per-device memory (``memory_analysis()``) and FLOPs / bytes accessed
(``cost_analysis()``); rows also carry the HBM-traffic model of the optimized HLO
(``hbm_traffic``, :mod:`fgtbt_jax.traffic`) and the roofline on it (``roofline_hbm``), next to
the roofline on XLA's "bytes accessed" (``roofline``), which also counts on-chip buffers.

GPU targets (``gpu:h100-8``, ``gpu:h200-8``, ``gpu:a100-8``, multi-host ``gpu:h100-2x8``): the
CUDA plugin (``pip install -e ".[gpu-aot]"``) describes NVIDIA GPUs from a text
``GpuTargetConfigProto`` (:func:`gpu_target_config`, built from the named fields of
:data:`GPU_SPECS`) and XLA:GPU compiles for them on a machine without GPU or driver
("deviceless", as jax's ``tests/aot_test.py``), with ``JAX_PLATFORMS=cpu``. Memory plans and
bytes are XLA:GPU's own; there is no autotuning without a GPU, so GEMMs get untuned default
configurations (kernel choices and times are not meaningful), and Triton GEMMs are switched
off (:data:`GPU_COMPILER_OPTIONS`). The executable has no ``cost_analysis()``:
FLOPs are XLA's HLO cost analysis of the unoptimized program divided by the device count (the
optimized GPU module hides GEMMs/convolutions in cuBLAS/cuDNN custom calls, which that analysis
does not count); bytes accessed are that analysis of the optimized per-device module plus the
operands and results of its custom calls (:func:`fgtbt_jax.compiled.optimized_cost`). GPU rows
carry the traffic model too (every fusion boundary in device memory, cuBLAS/cuDNN calls as the
GEMMs and convolutions they are; L2 is not modelled).
:func:`export_cuda` still serializes a ``jax.export`` artefact (StableHLO with the shardings)
for a real CUDA host (``--export_dir``).

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
from fgtbt_jax import errors, paths, schemes
from fgtbt_jax.evaluation import decoding
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.train import sharding
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The fields of XLA's ``GpuTargetConfigProto`` that differ between the GPUs below.

    Values as in XLA's ``xla/backends/gpu/target_config/specs/<name>.txtpb`` (Apache-2.0, the
    OpenXLA authors; the device properties CUDA reports for that card); the fields common to
    all of them (thread, block and register limits) are in :func:`gpu_target_config`.
    """

    name: str  # CUDA's device name, also JAX's ``device_kind``
    compute_capability: tuple[int, int]
    accelerated_features: bool  # sm_90a (wgmma, TMA) on Hopper
    core_count: int  # streaming multiprocessors
    fpus_per_core: int
    clock_rate_ghz: float
    memory_bandwidth: int  # bytes/s
    l2_cache_size: int
    device_memory_size: int  # bytes the driver reports (less than the marketing "80 GB")
    shared_memory_per_core: int
    shared_memory_per_block_optin: int


# From XLA's specs h100_sxm.txtpb, h200.txtpb and a100_sxm_80.txtpb (openxla/xla, 2026).
GPU_SPECS: dict[str, GpuSpec] = {
    "h100": GpuSpec(
        "NVIDIA H100 80GB HBM3", (9, 0), True, 132, 128, 1.98, 3352320000000, 52428800,
        84942979072, 233472, 232448,
    ),
    "h200": GpuSpec(
        "NVIDIA H200 141GB HBM3e", (9, 0), True, 132, 128, 1.98, 4800000000000, 52428800,
        151397597184, 233472, 232448,
    ),
    "a100": GpuSpec(
        "NVIDIA A100-SXM4-80GB", (8, 0), False, 108, 64, 1.41, 2039040000000, 41943040,
        85100068864, 167936, 166912,
    ),
}  # fmt: skip


def gpu_target_config(spec: GpuSpec) -> str:
    """``spec`` as a text ``stream_executor.GpuTargetConfigProto`` for
    ``jax.experimental.topologies.get_topology_desc(platform="cuda", target_config=...)``.

    Only fields that jaxlib 0.10.2 parses (newer XLA specs add e.g.
    ``collective_memory_granularity``, which it rejects).
    """
    major, minor = spec.compute_capability
    extension = "ACCELERATED_FEATURES" if spec.accelerated_features else "NONE"
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {spec.shared_memory_per_core}
  threads_per_core_limit: 2048
  core_count: {spec.core_count}
  fpus_per_core: {spec.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {spec.memory_bandwidth}
  l2_cache_size: {spec.l2_cache_size}
  clock_rate_ghz: {spec.clock_rate_ghz}
  device_memory_size: {spec.device_memory_size}
  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {extension} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  name: "{spec.name}"
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 }}
device_description_str: "{spec.name}"
"""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (one JAX device = one chip for every target below).

    ``peak_flops``: dense bfloat16 FLOP/s; ``peak_flops_float32``: the ceiling for float32
    matmuls at JAX's default precision (XLA:TPU runs them as bfloat16 passes on the MXU, so the
    bfloat16 peak; XLA:GPU as TF32 on the tensor cores, half of it); ``hbm_bandwidth`` in
    bytes/s. GPU ``hbm_bytes`` is the memory CUDA reports (:class:`GpuSpec`).
    """

    name: str
    hbm_bytes: int
    peak_flops: float
    hbm_bandwidth: float
    source: str
    peak_flops_float32: float | None = None  # None: same as peak_flops

    def peak_for(self, dtype: str) -> float:
        """Peak FLOP/s for a step computing in ``dtype``."""
        if dtype == "bfloat16" or self.peak_flops_float32 is None:
            return self.peak_flops
        return self.peak_flops_float32


# Sources: Google Cloud TPU documentation, "System architecture" pages of each generation
# (https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e), and NVIDIA's datasheets (SXM
# boards, dense tensor-core peaks without sparsity): H100 (nvidia.com/en-us/data-center/h100:
# BF16 989 TFLOPS, TF32 495 TFLOPS, 3.35 TB/s), H200 (nvidia.com/en-us/data-center/h200: BF16
# 989 TFLOPS, TF32 495 TFLOPS, 4.8 TB/s), A100 80GB (nvidia.com/en-us/data-center/a100: BF16
# 312 TFLOPS, TF32 156 TFLOPS, 2.039 TB/s).
CHIPS: dict[str, Chip] = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12, 1228e9, "cloud.google.com/tpu/docs/v4"),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12, 819e9, "cloud.google.com/tpu/docs/v5e"),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12, 2765e9, "cloud.google.com/tpu/docs/v5p"),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12, 1640e9, "cloud.google.com/tpu/docs/v6e"),
    "h100": Chip(
        "NVIDIA H100 SXM", GPU_SPECS["h100"].device_memory_size, 989e12, 3.35e12,
        "NVIDIA H100 datasheet (SXM)", 495e12,
    ),
    "h200": Chip(
        "NVIDIA H200 SXM", GPU_SPECS["h200"].device_memory_size, 989e12, 4.8e12,
        "NVIDIA H200 datasheet (SXM)", 495e12,
    ),
    "a100": Chip(
        "NVIDIA A100 SXM 80GB", GPU_SPECS["a100"].device_memory_size, 312e12, 2.039e12,
        "NVIDIA A100 datasheet (SXM 80GB)", 156e12,
    ),
}  # fmt: skip

# XLA:GPU flags for deviceless compiles: the Triton GEMM emitter cannot pick tile sizes without
# autotuning for some of the release model's dots ("Couldn't find output tile sizes that
# satisfy hlo", bf16[3600,320] in block3's attention); cuBLAS calls compile for every dot.
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

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
    """A compile target: ``tpu:<slice>`` (e.g. ``tpu:v5e-8``) or
    ``gpu:<chip>-[<hosts>x]<GPUs per host>`` (e.g. ``gpu:h100-8``, ``gpu:h100-2x8``)."""

    name: str
    platform: str  # "tpu" or "cuda"
    chip: Chip
    num_devices: int
    topology: str | None = None  # TPU: "v5e:2x4"; GPU: "<partitions>x<hosts>x<per host>"
    chip_config: str | None = None
    gpu: GpuSpec | None = None


def parse_target(name: str) -> Target:
    """``tpu:<slice>`` (a key of :data:`TPU_SLICES`, e.g. ``tpu:v5e-8``) or
    ``gpu:<chip>-[<hosts>x]<GPUs per host>`` with chip in :data:`GPU_SPECS`."""
    kind, _, spec = name.partition(":")
    if kind == "tpu" and spec in TPU_SLICES:
        chip, topology, chip_config = TPU_SLICES[spec]
        dims = [int(d) for d in topology.split(":")[1].split("x")]
        return Target(name, "tpu", CHIPS[chip], int(np.prod(dims)), topology, chip_config)
    if kind == "gpu":
        chip, _, count = spec.rpartition("-")
        hosts, _, per_host = count.rpartition("x")
        hosts = hosts or "1"
        if chip in GPU_SPECS and hosts.isdigit() and per_host.isdigit():
            h, d = int(hosts), int(per_host)
            if h > 0 and d > 0:
                return Target(name, "cuda", CHIPS[chip], h * d, f"1x{h}x{d}", gpu=GPU_SPECS[chip])
    raise ValueError(
        f"unknown target {name!r}; choose tpu:<slice> with slice in {sorted(TPU_SLICES)} "
        f"or gpu:<chip>-<GPUs> / gpu:<chip>-<hosts>x<GPUs per host> with chip in "
        f"{sorted(GPU_SPECS)}"
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


def cuda_plugin_installed() -> bool:
    """Whether JAX's CUDA plugin (the ``gpu-aot`` extra) is importable."""
    import importlib.util

    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
    except ModuleNotFoundError:  # no ``jax_plugins`` namespace at all
        return False


def gpu_devices(target: Target) -> list[Any]:
    """The GPUs of ``target`` described by the CUDA plugin from :func:`gpu_target_config`
    (no GPU or driver needed; run with ``JAX_PLATFORMS=cpu``)."""
    if not cuda_plugin_installed():
        raise errors.Error(
            f"{target.name}: compiling for GPUs needs the CUDA plugin: pip install -e '.[gpu-aot]'"
        )
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(
        platform="cuda", target_config=gpu_target_config(target.gpu), topology=target.topology
    )
    devices = list(topo.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(
            f"{target.name}: the CUDA plugin describes {len(devices)} devices, "
            f"expected {target.num_devices}"
        )
    return devices


def target_devices(target: Target) -> list[Any]:
    """The devices of ``target`` (TPU: libtpu; GPU: the CUDA plugin), without any attached."""
    return tpu_devices(target) if target.platform == "tpu" else gpu_devices(target)


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
    ``data.batch_per_dataset`` images of each dataset of the run (four without schemes), so it
    must be a multiple of their number.
    """
    global_batch = batch_per_device * num_devices
    num_datasets = len(schemes.unified_set_of(config.data).datasets)
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
    ``data``: ``image`` (B, S, S, 3) float32 NHWC, ``coords`` (B, C, 2) int32, ``mask``
    (B, C) bool, ``dataset_id`` (B,) int32 (C = ``model.num_landmarks``)."""
    b = int(config.data.batch_per_dataset) * len(schemes.unified_set_of(config.data).datasets)
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


def roofline(
    flops: float, bytes_accessed: float, batch_per_device: int, chip: Chip, dtype: str
) -> dict:
    """Lower bound on the step time of one device from its FLOPs and HBM traffic.

    ``max(flops / peak, bytes / bandwidth)`` with the chip's peak for ``dtype``: an estimate
    that ignores communication, overlap limits and launch overheads, so real steps are slower
    and real images/s lower.
    """
    peak = chip.peak_for(dtype)
    t_compute = flops / peak
    t_memory = bytes_accessed / chip.hbm_bandwidth
    t = max(t_compute, t_memory)
    return {
        "estimate": True,
        "chip": chip.name,
        "peak_flops": peak,
        "hbm_bandwidth": chip.hbm_bandwidth,
        "source": chip.source,
        "arithmetic_intensity": flops / bytes_accessed if bytes_accessed else None,
        "bound": "compute" if t_compute >= t_memory else "memory",
        "step_seconds_lower_bound": t,
        "images_per_second_per_chip_upper_bound": batch_per_device / t if t else None,
    }


def compile_step(
    step: Callable, args: tuple[Any, ...], target: Target
) -> tuple[Any, Any, dict[str, float]]:
    """``step.lower(*args).compile()`` for ``target``: the lowered and compiled stages and the
    lowering and compile times. GPU compiles get :data:`GPU_COMPILER_OPTIONS` and bypass the
    persistent compilation cache (a deviceless executable cannot be loaded back from it)."""
    from jax._src import config as jax_config  # the cache switch as a context manager

    gpu = target.platform == "cuda"
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    with jax_config.enable_compilation_cache(not gpu and jax_config.enable_compilation_cache.value):
        compiled = lowered.compile(GPU_COMPILER_OPTIONS if gpu else None)
    t2 = time.perf_counter()
    return lowered, compiled, {"lower_seconds": t1 - t0, "compile_seconds": t2 - t1}


def compiled_figures_of(
    target: Target, lowered: Any, compiled: Any, num_devices: int
) -> dict[str, Any]:
    """Per-device memory, FLOPs and bytes accessed of a compile for ``target``, with where
    each figure comes from (see the module docstring for GPUs)."""
    if target.platform == "tpu":
        cost = compiled_figures.cost(compiled)
        return {
            "memory_bytes": compiled_figures.memory(compiled),
            "flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
            "flops_source": "cost_analysis() of the compiled executable",
        }
    optimized = compiled_figures.optimized_cost(compiled)
    return {
        "memory_bytes": compiled_figures.memory(compiled),
        "flops": compiled_figures.lowered_cost(lowered)["flops"] / num_devices,
        "bytes_accessed": optimized["bytes accessed"],
        "flops_source": (
            "HLO cost analysis of the unoptimized global program / number of devices (the "
            "optimized GPU module hides GEMMs and convolutions in cuBLAS/cuDNN custom calls)"
        ),
        "bytes_source": (
            "HLO cost analysis of the optimized per-device GPU module plus the operands and "
            "results of its cuBLAS/cuDNN custom calls (workspaces excluded)"
        ),
        "flops_optimized_module": optimized["flops"],
        "custom_calls": int(optimized["custom calls"]),
        "custom_call_bytes": optimized["custom call bytes"],
        "compiler_options": dict(GPU_COMPILER_OPTIONS),
        "autotuned": False,
    }


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
    hlo_dir: str | None = None,
) -> dict[str, Any]:
    """One JSON row: compile the ``which`` ∈ {train, eval} step for ``target`` (deviceless),
    or, for a GPU target with ``export_dir``, serialize it with :func:`export_cuda` there.
    ``hlo_dir``: also write the compiled program's optimized HLO text there (for
    ``scripts/traffic_attribution.py --hlo``; the row's ``hlo_path``)."""
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

    def artifact(directory: str, flag: str, suffix: str) -> Any:
        """<directory>/<target>/<step>_<preset>_<dtype>_<sharding>_b<batch>.<suffix>."""
        name = f"{which}_{c.preset}_{dtype}_{row['sharding']}_b{batch_per_device}.{suffix}"
        return paths.resolve(directory, flag) / target.name.replace(":", "_") / name

    if export_dir is None or target.platform == "tpu":
        lowered, compiled, times = compile_step(step, args, target)
        if hlo_dir is not None:
            path = artifact(hlo_dir, "--save_hlo", "hlo.txt")
            paths.write_bytes(path, compiled.as_text().encode())
            row["hlo_path"] = str(path)
        figures = compiled_figures_of(target, lowered, compiled, mesh.size)
        total = figures["memory_bytes"]["total"]
        flops, traffic = figures["flops"], figures["bytes_accessed"]
        hbm = compiled_figures.traffic(compiled)
        row.update(
            hbm_traffic=hbm.summary(),
            roofline_hbm=roofline(flops, hbm.hbm_bytes, batch_per_device, target.chip, dtype),
        )
        row.update(
            compiled=True,
            fits=total <= target.chip.hbm_bytes,
            roofline=roofline(flops, traffic, batch_per_device, target.chip, dtype),
            **figures,
            **times,
        )
    else:
        blob, times = export_cuda(step, args)
        path = artifact(export_dir, "--export_dir", "jax_export")
        paths.write_bytes(path, blob)  # whole or not at all, local or gs://
        row.update(
            compiled=False,
            memory_bytes=None,
            fits=None,
            flops=None,
            bytes_accessed=None,
            compile_seconds=None,
            exported_bytes=len(blob),
            export_path=str(path),
            note="jax.export artefact (serialized StableHLO) for a CUDA host, which compiles it",
            **times,
        )
    return row
