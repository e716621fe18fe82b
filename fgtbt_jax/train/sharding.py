"""Data-parallel / FSDP sharding over a one-axis device mesh named ``data``.

The global batch is split along its first dimension over ``data``; parameters and optimizer state
are replicated, or with :func:`fsdp_sharding` split along one dimension over the same axis (XLA
inserts the all-gathers). Works for one process and for multi-host runs (see
:func:`maybe_initialize_distributed`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh with axis ``data`` over the first ``num_devices`` devices (default: all).

    Auto axis type: the jitted functions say their shardings, XLA propagates the rest.
    """
    devices = jax.devices()
    n = len(devices) if num_devices is None else int(num_devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are available")
    return jax.make_mesh((n,), (DATA_AXIS,), (jax.sharding.AxisType.Auto,), devices=devices[:n])


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data``, the other dimensions replicated."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def _fsdp_spec(shape: tuple[int, ...], n: int, min_size: int) -> PartitionSpec:
    if n == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return PartitionSpec()
    # Largest dimension that the mesh size divides (the first one on ties).
    best = None
    for i, dim in enumerate(shape):
        if dim % n == 0 and (best is None or dim > shape[best]):
            best = i
    if best is None:
        return PartitionSpec()
    spec = [None] * len(shape)
    spec[best] = DATA_AXIS
    return PartitionSpec(*spec)


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """A NamedSharding per leaf of ``tree`` (arrays or ``jax.ShapeDtypeStruct``s).

    Leaves with at least ``min_size`` elements are split along their largest dimension divisible
    by the ``data`` axis size; smaller leaves and leaves without such a dimension are replicated.
    """
    n = mesh.shape[DATA_AXIS]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, _fsdp_spec(tuple(np.shape(x)), n, min_size)), tree
    )


def shard_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global arrays split over ``data`` from this process's slice of the batch.

    Each process passes its own rows (leading dimension = global batch / process count); the
    global batch must divide evenly over the mesh devices.
    """
    sharding = data_sharding(mesh)
    n = mesh.shape[DATA_AXIS]
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_rows = value.shape[0] * jax.process_count() if value.ndim else 0
        if value.ndim == 0 or global_rows % n:
            raise ValueError(
                f"batch[{key!r}] of shape {value.shape}: the global batch of {global_rows} rows "
                f"must split evenly over the {n} devices of the 'data' axis"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def maybe_initialize_distributed() -> bool:
    """Calls ``jax.distributed.initialize()`` for a multi-process run; no-op otherwise.

    ``JAX_COORDINATOR_ADDRESS`` (read by JAX) with ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``
    (read here) starts a job by hand; otherwise JAX's own cluster detection (Slurm, Open MPI,
    Cloud TPU, Kubernetes) decides, and without a cluster this is a single-process run. Must
    run before any other JAX call. Returns True if it initialized.
    """
    if jax.distributed.is_initialized():
        return False
    env = os.environ
    kwargs: dict[str, Any] = {}
    if env.get("JAX_COORDINATOR_ADDRESS"):
        if "JAX_NUM_PROCESSES" in env:
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if "JAX_PROCESS_ID" in env:
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:
        if env.get("JAX_COORDINATOR_ADDRESS"):
            raise
        if isinstance(e, RuntimeError):  # JAX already computed: too late to join a cluster
            logging.warning("not initializing jax.distributed: %s", e)
        return False  # ValueError: no coordinator detected, a single process
    logging.info(
        "jax.distributed: process %d of %d, %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )
    return True
