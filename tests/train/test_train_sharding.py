"""Data-parallel and FSDP train steps on the test process's 8 CPU devices (tests/conftest.py)
equal the single-device step.

With the small stand-in network of tests/toy_model.py: what is tested is the train step's
sharding (batch split over the ``data`` axis, replicated or FSDP-split state, BatchNorm /
CSAM-style statistics across devices or per device), not the architecture.
"""

from __future__ import annotations

import jax
import numpy as np
from toy_model import build_toy, toy_config

from fgtbt_jax.train import sharding
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step
from input_pipeline import synthetic


def run(num_devices: int, fsdp: bool, stat_groups: int, steps: int = 2):
    """``steps`` train steps of the toy network on 16-row batches over ``num_devices``."""
    config = toy_config(
        **{"data.batch_per_dataset": 4, "model.toy_width": 64, "sharding.fsdp": fsdp}
    )
    mesh = sharding.make_mesh(num_devices)
    model = build_toy(config.model, stat_groups=stat_groups)
    tx, schedule = train_state.make_optimizer(config)
    state, shardings = train_state.create_train_state(config, build_toy(config.model), tx, mesh)
    step = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, config), shardings, mesh
    )
    losses = []
    for t in range(steps):
        batch = sharding.shard_batch(synthetic.global_batch(config, 0, t), mesh)
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_close(a, b, what, atol=2e-6):
    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(
                x, y, rtol=2e-5, atol=atol, err_msg=f"{what} {jax.tree_util.keystr(path)}"
            )
        else:
            np.testing.assert_array_equal(x, y, err_msg=what)


def test_train_step_on_8_cpu_devices():
    assert jax.device_count() == 8, jax.devices()
    single, loss_1 = run(1, False, 1)
    replicated, loss_r = run(8, False, 1)
    fsdp, loss_f = run(8, True, 1)

    # The state really is laid out as asked.
    w = replicated.params["conv2"]["kernel"]
    assert w.sharding.is_fully_replicated and len(w.sharding.device_set) == 8
    w = fsdp.params["conv2"]["kernel"]  # (3, 3, 64, 64): split on the first dim of 64
    assert tuple(w.sharding.spec)[:3] == (None, None, "data"), w.sharding
    assert {s.data.shape for s in w.addressable_shards} == {(3, 3, 8, 64)}
    mu = [x for x in jax.tree.leaves(fsdp.opt_state) if getattr(x, "shape", ()) == (3, 3, 64, 64)]
    mu.append(fsdp.ema_params["conv2"]["kernel"])
    assert len(mu) == 3, len(mu)  # Adam's mu and nu, and the EMA
    assert all({s.data.shape for s in x.addressable_shards} == {(3, 3, 8, 64)} for x in mu)
    assert fsdp.params["head"]["kernel"].sharding.is_fully_replicated  # below min_size

    np.testing.assert_allclose(loss_r, loss_1, rtol=1e-5)
    np.testing.assert_allclose(loss_f, loss_1, rtol=1e-5)
    host = jax.device_get(single)
    assert_close(jax.device_get(replicated), host, "replicated")
    assert_close(jax.device_get(fsdp), host, "fsdp")

    # Per-device statistics: 8 groups of 2 rows. Same numbers as the global-view computation
    # with 8 statistic groups on one device, and genuinely different from cross-device.
    per_device, loss_p = run(8, False, 8)
    grouped_1, loss_g = run(1, False, 8)
    np.testing.assert_allclose(loss_p, loss_g, rtol=1e-5)
    # (Adam normalises the step, so an element with a near-zero gradient may move by a few
    # percent of lr = 1e-3 differently when the reduction order changes.)
    assert_close(jax.device_get(per_device), jax.device_get(grouped_1), "per-device", 1e-4)
    assert abs(loss_p[1] - loss_1[1]) > 1e-4 * abs(loss_1[1]), (loss_p, loss_1)
    bs_p = np.asarray(per_device.batch_stats["bn1"]["var"])
    bs_1 = np.asarray(single.batch_stats["bn1"]["var"])
    assert not np.allclose(bs_p, bs_1, rtol=1e-4)
