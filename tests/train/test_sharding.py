"""Mesh / batch / FSDP sharding on 8 fake CPU devices (run in a subprocess: XLA_FLAGS must be set
before jax is imported)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

from fgtbt_jax.train import sharding

ROOT = pathlib.Path(__file__).parents[2]

SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    from fgtbt_jax.train import sharding

    assert jax.device_count() == 8, jax.devices()
    assert sharding.maybe_initialize_distributed() is False
    mesh = sharding.make_mesh()
    assert mesh.shape == {"data": 8} and mesh.axis_names == ("data",)
    assert sharding.make_mesh(4).devices.size == 4
    try:
        sharding.make_mesh(9)
        raise AssertionError("make_mesh(9) should fail")
    except ValueError:
        pass

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
    try:
        sharding.shard_batch({"x": np.zeros((12, 2))}, mesh)
        raise AssertionError("12 rows over 8 devices should fail")
    except ValueError as e:
        assert "'x'" in str(e)

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
    print("SHARDING_OK")
    """
)


def test_sharding_on_8_cpu_devices():
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_"))
    }
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=8",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
    )
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "SHARDING_OK" in proc.stdout, proc.stdout + proc.stderr


def test_maybe_initialize_distributed_noop(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("JAX_COORDINATOR", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")):
            monkeypatch.delenv(key)
    assert sharding.maybe_initialize_distributed() is False
