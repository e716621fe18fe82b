"""Mesh / batch / FSDP sharding on the test process's 8 CPU devices (tests/conftest.py)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fgtbt_jax.train import sharding


def test_sharding_on_8_cpu_devices():
    assert jax.device_count() == 8, jax.devices()
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": 8} and mesh.axis_names == ("data",)
    assert sharding.make_mesh(4).devices.size == 4
    with pytest.raises(ValueError):
        sharding.make_mesh(9)

    rng = np.random.default_rng(0)
    local = {
        "image": rng.normal(size=(16, 6, 6, 3)).astype(np.float32),
        "dataset_id": np.arange(16, dtype=np.int32) % 4,
    }
    batch = sharding.shard_batch(local, mesh)
    for key, arr in batch.items():
        assert arr.shape == local[key].shape and arr.dtype == local[key].dtype, key
        assert arr.sharding.spec == P("data"), arr.sharding
        assert len(arr.addressable_shards) == 8
        for shard in arr.addressable_shards:
            assert shard.data.shape == (2,) + local[key].shape[1:], shard.data.shape
            np.testing.assert_array_equal(np.asarray(shard.data), local[key][shard.index])
        np.testing.assert_array_equal(np.asarray(arr), local[key])
    with pytest.raises(ValueError, match="'x'"):  # 12 rows over 8 devices
        sharding.shard_batch({"x": np.zeros((12, 2))}, mesh)

    params = {
        "big": rng.normal(size=(96, 256)).astype(np.float32),  # 256 divisible, largest
        "odd": np.zeros((129, 127), np.float32),  # no dimension divisible by 8
        "small": np.zeros((8, 8), np.float32),  # below min_size
        "conv": jax.ShapeDtypeStruct((3, 3, 64, 128), jnp.float32),
    }
    specs = sharding.fsdp_sharding(params, mesh)
    assert specs["big"].spec == P(None, "data"), specs["big"]
    assert specs["odd"].spec == P(), specs["odd"]
    assert specs["small"].spec == P(), specs["small"]
    assert specs["conv"].spec == P(None, None, None, "data"), specs["conv"]
    big = jax.device_put(params["big"], specs["big"])
    assert {s.data.shape for s in big.addressable_shards} == {(96, 32)}

    def f(p, b):
        x = b["image"].reshape(16, -1) @ p["w"]
        return jnp.tanh(x) * b["dataset_id"][:, None]

    w = rng.normal(size=(108, 256)).astype(np.float32)
    p_shard = sharding.fsdp_sharding({"w": w}, mesh)
    assert p_shard["w"].spec == P(None, "data")
    b_shard = {k: sharding.data_sharding(mesh) for k in batch}
    jf = jax.jit(f, in_shardings=(p_shard, b_shard), out_shardings=sharding.data_sharding(mesh))
    out = jf({"w": jax.device_put(w, p_shard["w"])}, batch)
    assert out.sharding.spec == P("data")
    x64 = local["image"].reshape(16, -1).astype(np.float64)
    want = np.tanh(x64 @ w) * local["dataset_id"][:, None]
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-5, atol=2e-5)
    rep = jax.jit(f, out_shardings=sharding.replicated(mesh))({"w": w}, local)
    assert rep.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(rep), np.asarray(out), rtol=1e-6, atol=1e-6)


def test_maybe_initialize_distributed_noop(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
