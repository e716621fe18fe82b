"""AdamW, schedule and EMA against the PyTorch reference (SPEC §6)."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fgtbt_jax.porting.pth import load_pth
from fgtbt_jax.train import optim

RELEASE_OPTIM = {
    "lr": 2.5e-4,
    "b1": 0.9,
    "b2": 0.999,
    "eps": 1e-8,
    "weight_decay": 0.01,
    "milestones": (40_000, 70_000, 90_000, 100_000),
    "gamma": 0.8,
    "warmup_steps": 0,
    "clip_norm": 0.0,
    "grad_accum_steps": 1,
}


def _load_config(preset: str):
    path = pathlib.Path(__file__).parents[2] / "configs" / "fgtbt.py"
    spec = importlib.util.spec_from_file_location("_fgtbt_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def _step(tx: optax.GradientTransformation, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_one_adamw_step_matches_reference(ref_dir):
    sd = load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]
    with np.load(ref_dir / "tiny_reference_grads.npz") as f:
        grads = {k: f[k] for k in f.files}
    with np.load(ref_dir / "tiny_reference_params_after_adamw_step.npz") as f:
        after = {k: f[k] for k in f.files}
    unused = json.loads((ref_dir / "tiny_reference_meta.json").read_text())["unused_grads"]
    assert set(after) == set(grads) | set(unused)

    # Flat state-dict space: every parameter, zero gradients for the unused ones, which are
    # frozen because PyTorch skips parameters whose gradient is None.
    params = {k: jnp.asarray(sd[k]) for k in after}
    full_grads = {k: grads[k] if k in grads else np.zeros_like(sd[k]) for k in after}
    trainable = {k: k in grads for k in after}
    tx, _ = optim.make_optimizer(_load_config("release").optim, 100_000, trainable=trainable)
    new = jax.jit(lambda p, g: _step(tx, p, [g]))(params, full_grads)

    for k in after:
        got, want, old = np.asarray(new[k]), after[k], sd[k]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=k)
        # The step itself (about lr in size) to float32 rounding of the parameters.
        np.testing.assert_allclose(got - old, want - old, rtol=0, atol=2.5e-7, err_msg=k)
    for k in unused:
        np.testing.assert_array_equal(np.asarray(new[k]), sd[k])
        np.testing.assert_array_equal(after[k], sd[k])

    # Without freezing, AdamW would decay the unused parameters, unlike the reference.
    tx_all, _ = optim.make_optimizer(RELEASE_OPTIM, 100_000)
    decayed = _step(tx_all, {k: params[k] for k in unused}, [{k: full_grads[k] for k in unused}])
    for k in unused:
        np.testing.assert_allclose(np.asarray(decayed[k]), sd[k] * (1 - 2.5e-4 * 0.01), rtol=1e-6)


def test_release_schedule_at_milestones():
    _, schedule = optim.make_optimizer(_load_config("release").optim, 100_000)
    expected = {
        0: 2.5e-4,
        39_999: 2.5e-4,
        40_000: 2.5e-4 * 0.8,
        69_999: 2.5e-4 * 0.8,
        70_000: 2.5e-4 * 0.8**2,
        90_000: 2.5e-4 * 0.8**3,
        99_999: 2.5e-4 * 0.8**3,
        100_000: 2.5e-4 * 0.8**4,
    }
    for step, lr in expected.items():
        np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6, err_msg=str(step))
        np.testing.assert_allclose(float(jax.jit(schedule)(step)), lr, rtol=1e-6)


def test_warmup_keeps_milestones_absolute():
    cfg = dict(RELEASE_OPTIM, lr=1.0, milestones=(10,), gamma=0.5, warmup_steps=4)
    _, schedule = optim.make_optimizer(cfg, 20)
    got = [float(schedule(s)) for s in (0, 1, 3, 4, 9, 10, 15)]
    np.testing.assert_allclose(got, [0.25, 0.5, 1.0, 1.0, 1.0, 0.5, 0.5], rtol=1e-7)
    with pytest.raises(ValueError, match="milestones"):
        optim.make_optimizer(dict(RELEASE_OPTIM, milestones=(5, 3)), 10)


def test_matches_torch_adamw_with_multistep_lr():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"w": (5, 3), "b": (3,)}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)
    ]
    cfg = dict(RELEASE_OPTIM, lr=1e-2, milestones=(2, 4), gamma=0.5, weight_decay=0.1)

    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    opt = torch.optim.AdamW(tparams.values(), lr=1e-2, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)
    for g in grads:
        for k, p in tparams.items():
            p.grad = torch.tensor(g[k])
        opt.step()
        sched.step()

    tx, _ = optim.make_optimizer(cfg, 6)
    new = _step(tx, jax.tree.map(jnp.asarray, params), grads)
    for k in shapes:
        np.testing.assert_allclose(
            np.asarray(new[k]), tparams[k].detach().numpy(), rtol=1e-6, atol=5e-7
        )


def test_clipping_and_accumulation():
    rng = np.random.default_rng(1)
    params = {"a": jnp.asarray(rng.normal(size=(4, 4)), jnp.float32)}
    g = {"a": rng.normal(size=(4, 4)).astype(np.float32)}
    norm = float(np.linalg.norm(g["a"]))
    unit = {"a": g["a"] / norm}
    base = dict(RELEASE_OPTIM, lr=1e-2)

    # Clipped to norm 1, gradients of norms 10 and 2 along g both become g/|g|.
    tx_clip, _ = optim.make_optimizer(dict(base, clip_norm=1.0), 10)
    tx, _ = optim.make_optimizer(base, 10)
    got = _step(tx_clip, params, [{"a": unit["a"] * 10}, {"a": unit["a"] * 2}])
    want = _step(tx, params, [unit, unit])
    np.testing.assert_allclose(np.asarray(got["a"]), np.asarray(want["a"]), rtol=1e-6)
    unclipped = _step(tx, params, [{"a": unit["a"] * 10}, {"a": unit["a"] * 2}])
    assert not np.allclose(np.asarray(unclipped["a"]), np.asarray(want["a"]), rtol=1e-4)

    # Accumulating two micro-batches equals one step on their mean gradient.
    g2 = {"a": rng.normal(size=(4, 4)).astype(np.float32)}
    tx_acc, _ = optim.make_optimizer(dict(base, grad_accum_steps=2), 10)
    state = tx_acc.init(params)
    upd, state = tx_acc.update(g, state, params)
    np.testing.assert_array_equal(np.asarray(upd["a"]), 0.0)
    p1 = optax.apply_updates(params, upd)
    upd, state = tx_acc.update(g2, state, p1)
    got = optax.apply_updates(p1, upd)
    want = _step(tx, params, [{"a": (g["a"] + g2["a"]) / 2}])
    np.testing.assert_allclose(np.asarray(got["a"]), np.asarray(want["a"]), rtol=1e-6)


def test_ema():
    d = optim.ema_decay(1)
    assert d == pytest.approx(0.5**0.0004)
    # Half-life of 10 000 / (4·batch) steps.
    assert optim.ema_decay(4) ** (10_000 / 16) == pytest.approx(0.5)

    ema = {"w": jnp.ones((2,)), "h": jnp.ones((2,), jnp.bfloat16), "n": jnp.array(3, jnp.int32)}
    new = {"w": jnp.zeros((2,)), "h": jnp.full((2,), 2.0, jnp.bfloat16), "n": jnp.array(7)}
    out = jax.jit(optim.ema_update)(ema, new, 0.75)
    np.testing.assert_allclose(np.asarray(out["w"]), [0.75, 0.75])
    assert out["h"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["h"], np.float32), [1.25, 1.25])
    assert int(out["n"]) == 7
