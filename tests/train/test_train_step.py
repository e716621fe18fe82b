"""The train step against the PyTorch reference (one step on tiny_checkpoint.pth), plus units.

Gradient tolerance. The parameter gradients are ill-conditioned with respect to float32
rounding on this random tiny checkpoint: LayerNorms over 4 prompt channels of nearly constant
tokens amplify input rounding a few hundred times. Two consequences, both measured here:

* The high-pass image (an FFT of the input; no parameter gradient flows through it) rounds
  differently in XLA and in PocketFFT, and an exact float64 one differs from the reference's
  float32 one by 3.9e-7 of its maximum, which moves some gradients by 2.4e-2
  (``test_reference_gradients_depend_on_high_pass_rounding``). So the one-step fixture feeds
  the reference's own high-pass image (``hpf_nchw``); the FFT itself is held to it by the
  forward parity tests.
* Even then the reference file is float32-noisy: a float64 evaluation of the same step
  (``fgtbt_jax.torch_fgtbt``, network in float64) differs from it by up to 5.8e-3 per tensor
  (``linear_pred.weight``; median 8.6e-4), so no implementation meets "1e-3 for every
  tensor" against the file. Ours is closer to that float64 evaluation (median 4.0e-4, worst
  3.1e-3) than the reference file is, and within 5.7e-3 (median 9.0e-4) of the file.

Per-tensor error = max|got - want| / max(max|want|, 1e-4 * largest gradient) (the floor is for
tensors whose true gradient is ~0, e.g. biases before a BatchNorm). A layout or semantics error
gives O(1).

Against exact arithmetic: ``tiny_reference_float64.npz`` is the original run entirely in
float64 (with an exact high-pass image). ``test_gradients_match_reference`` reports how far our
float32 step's gradients are from it, beside the original's own float32 run (the reference
file), per non-zero tensor relative to its max |float64 gradient|; both float32 runs here use
the same float32 high-pass image, whose rounding dominates their worst tensors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    TINY_LOSS,
    distance_to_exact,
    reference_batch,
    tiny_torch_model,
    torch_reference_batch,
)

from configs import fgtbt
from fgtbt_jax import landmarks
from fgtbt_jax.models import backbone
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert
from fgtbt_jax.porting.pth import load_pth
from fgtbt_jax.train import sharding
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step
from input_pipeline import synthetic

DATASETS = landmarks.DATASETS


@pytest.fixture(scope="module", params=["cpu", "xla"])
def one_step(request, ref_dir, ref_outputs):
    """One train step from the reference checkpoint: (model, old state dict, new state, metrics),
    with each ``model.kernels`` (one compile each)."""
    config = fgtbt.get_config("reference_tiny")  # release optimizer: AdamW 2.5e-4, wd 0.01
    config.model.kernels = request.param
    config.model.drop_path_rate = 0.0
    config.model.decoder_dropout = 0.0
    model = build_model(config.model)
    sd = load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]
    variables = convert.variables_from_state_dict(sd, model, config.img_size)
    mesh = sharding.make_mesh(1)
    tx, schedule = train_state.make_optimizer(config)
    state, shardings = train_state.create_train_state(config, model, tx, mesh, variables=variables)
    step = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, config, return_grads=True),
        shardings,
        mesh,
    )
    batch = sharding.shard_batch(reference_batch(ref_outputs), mesh)
    hpf = jnp.asarray(ref_outputs["hpf_nchw"].transpose(0, 2, 3, 1))

    def reference_high_pass(x: jax.Array, sigma: float) -> jax.Array:
        assert x.shape == hpf.shape and sigma == 20.0
        return hpf

    with pytest.MonkeyPatch.context() as mp:  # see the module docstring
        mp.setattr(backbone, "high_pass", reference_high_pass)
        new_state, metrics = step(state, batch)
    return model, config, sd, jax.device_get(new_state), jax.device_get(metrics)


def _torch_dict(model, config, variables) -> dict[str, np.ndarray]:
    return convert.state_dict_from_variables(variables, model, config.img_size)


@pytest.mark.slow  # shares one compile of the real train step (about 1-2 min)
def test_loss_terms_match_reference(one_step, ref_outputs):
    _, _, _, _, metrics = one_step
    want = np.array([ref_outputs[f"train_loss_{n}"] for n in DATASETS])
    np.testing.assert_allclose(metrics["loss_per_dataset"], want, rtol=1e-5)
    np.testing.assert_allclose(metrics["loss"], ref_outputs["train_loss_total"], rtol=1e-5)
    assert metrics["dataset_present"].all()
    np.testing.assert_allclose(metrics["lr"], 2.5e-4, rtol=1e-6)


def _high_pass_float64(x_nchw: np.ndarray, sigma: float = 20.0) -> np.ndarray:
    """The high-pass image of SPEC's prompt branch computed in float64 with NumPy (NCHW)."""
    h, w = x_nchw.shape[-2:]
    d2 = (np.arange(h)[:, None] - h // 2) ** 2 + (np.arange(w)[None, :] - w // 2) ** 2
    spec = np.fft.fftshift(np.fft.fft2(x_nchw.astype(np.float64), norm="forward"), axes=(-2, -1))
    spec *= 1.0 - np.exp(-d2 / (2.0 * sigma**2))
    return np.abs(np.fft.ifft2(np.fft.ifftshift(spec, axes=(-2, -1)), norm="forward").real)


def _float64_grads(ref_dir, ref_outputs, hpf_nchw: np.ndarray) -> dict[str, np.ndarray]:
    """Parameter gradients of the reference step evaluated by the PyTorch FGTBT in float64, on
    the given high-pass image (the loss stays float32, which moves them by < 3e-7)."""
    torch = pytest.importorskip("torch")
    from benchmarks.torch_oracle import fgtbt as torch_fgtbt
    from benchmarks.torch_oracle import loss as torch_loss

    model = tiny_torch_model(ref_dir, drop_path_rate=0.0, decoder_dropout=0.0).double().train()
    batch = torch_reference_batch(ref_outputs)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch_fgtbt, "highpass_filter", lambda x, sigma: torch.from_numpy(hpf_nchw))
        heatmaps = model(batch["image"].double())
    weights = torch.from_numpy(ref_outputs["fmb_weights_124"])
    total, _ = torch_loss.fmb_loss(
        heatmaps, batch["coords"], batch["mask"], batch["dataset_id"], weights, loss_cfg=TINY_LOSS
    )
    total.backward()
    return {n: p.grad.numpy() for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def float64_grads(ref_dir, ref_outputs, torch_two_threads):
    """Float64 evaluations of the step: on the reference's high-pass image and on an exact one."""
    reference_hpf = ref_outputs["hpf_nchw"].astype(np.float64)
    exact_hpf = _high_pass_float64(ref_outputs["input_nchw"])
    return {
        "reference_hpf": _float64_grads(ref_dir, ref_outputs, reference_hpf),
        "exact_hpf": _float64_grads(ref_dir, ref_outputs, exact_hpf),
        "hpf_error": float(np.abs(exact_hpf - reference_hpf).max() / np.abs(exact_hpf).max()),
    }


@pytest.fixture(scope="module")
def reference_grads(ref_dir) -> dict[str, np.ndarray]:
    with np.load(ref_dir / "tiny_reference_grads.npz") as f:
        return {k: f[k].astype(np.float64) for k in f.files}


def _floor(grads: dict[str, np.ndarray]) -> float:
    return 1e-4 * max(float(np.abs(g).max()) for g in grads.values())


def _grad_errors(
    got: dict[str, np.ndarray], want: dict[str, np.ndarray], floor: float
) -> tuple[dict[str, float], dict[str, float]]:
    """Per tensor of ``want``: (max error, L2 error), each relative as in the module docstring."""
    max_err, l2_err = {}, {}
    for key, w in want.items():
        g = np.asarray(got[key], np.float64)
        assert g.shape == w.shape, key
        max_err[key] = float(np.abs(g - w).max() / max(np.abs(w).max(), floor))
        l2_err[key] = float(np.linalg.norm(g - w) / max(np.linalg.norm(w), floor))
    return max_err, l2_err


@pytest.mark.slow  # shares one compile of the real train step (about 1-2 min)
def test_gradients_match_reference(
    one_step, reference_grads, float64_grads, ref_float64, record_property
):
    model, config, _, new_state, metrics = one_step
    ref = reference_grads
    variables = {"params": metrics["grads"], "batch_stats": new_state.batch_stats}
    grads = _torch_dict(model, config, variables)
    floor = _floor(ref)
    # Against the reference file (measured: max error median 9.0e-4, worst 5.7e-3; L2 worst
    # 2.7e-3. The float64 evaluation: median 8.6e-4, worst 5.8e-3).
    max_err, l2_err = _grad_errors(grads, ref, floor)
    worst = max(max_err, key=max_err.get)
    assert max_err[worst] < 1e-2, (worst, max_err[worst])
    assert np.median(list(max_err.values())) < 1.5e-3
    assert max(l2_err.values()) < 5e-3, max(l2_err, key=l2_err.get)
    # Relative to the largest gradient of all, every tensor is within 1e-3 (measured 2.1e-4;
    # the float64 evaluation 2.0e-4).
    assert max(_grad_errors(grads, ref, floor=1e4 * floor)[0].values()) < 1e-3
    # Against the float64 evaluation of the same step (measured: median 4.0e-4, worst 3.1e-3,
    # L2 worst 1.4e-3), and closer to it than the reference file is (median 8.6e-4).
    exact = float64_grads["reference_hpf"]
    max_err, l2_err = _grad_errors(grads, exact, floor)
    file_err, _ = _grad_errors(ref, exact, floor)
    assert max(max_err.values()) < 5e-3, max(max_err, key=max_err.get)
    assert max(l2_err.values()) < 2e-3, max(l2_err, key=l2_err.get)
    assert np.median(list(max_err.values())) < min(1e-3, np.median(list(file_err.values())))
    # Distance to exact arithmetic (the original's float64 run), ours beside the original's
    # float32 run, over the 291 non-zero gradients (measured: ours median 2.9e-3, worst 2.39e-2;
    # the original's median 3.1e-3, worst 2.41e-2, as its README states).
    ours, original = distance_to_exact(grads, ref_float64), distance_to_exact(ref, ref_float64)
    assert len(ours) == len(original) == 291
    figures = {
        f"{who}_float32_vs_float64_{stat}": float(fn(list(errs.values())))
        for who, errs in (("ours", ours), ("original", original))
        for stat, fn in (("median", np.median), ("worst", np.max))
    }
    for name, value in figures.items():
        record_property(name, value)
    print("\ngradients vs the float64 file, per non-zero tensor:", figures)
    assert (
        figures["ours_float32_vs_float64_median"] <= figures["original_float32_vs_float64_median"]
    )
    assert (
        figures["ours_float32_vs_float64_worst"]
        <= 1.5 * figures["original_float32_vs_float64_worst"]
    )
    # The unused conv_seg gets no gradient (zeros here, None in PyTorch).
    for key in ("encoder.decode_head.conv_seg.weight", "encoder.decode_head.conv_seg.bias"):
        assert key not in ref and not np.any(grads[key])


def test_reference_gradients_depend_on_high_pass_rounding(reference_grads, float64_grads):
    """Why the one-step fixture feeds the reference's high-pass image: an exact (float64) one,
    within 1e-6 of it, moves some gradients by > 1e-2 (measured 2.4e-2, conv1.bn1.bias)."""
    assert float64_grads["hpf_error"] < 1e-6
    max_err, _ = _grad_errors(
        float64_grads["exact_hpf"], float64_grads["reference_hpf"], _floor(reference_grads)
    )
    assert max(max_err.values()) > 1e-2


@pytest.mark.slow  # shares one compile of the real train step (about 1-2 min)
def test_batchnorm_statistics_after_step(one_step, ref_dir):
    model, config, sd, new_state, _ = one_step
    with np.load(ref_dir / "tiny_reference_bn_after_train_forward.npz") as f:
        ref = {k: f[k] for k in f.files}
    got = _torch_dict(model, config, new_state.variables())
    assert len(ref) == 66
    for key, want in ref.items():
        np.testing.assert_allclose(
            got[key], want, rtol=0, atol=1e-4 * np.abs(want).max(), err_msg=key
        )
    # Every BatchNorm call counts a batch; the prompt generator's bn1..bn4 are shared by the
    # blocks of their stage and run once per block (as in PyTorch).
    counters = [k for k in got if k.endswith("num_batches_tracked")]
    assert len(counters) == 33
    for key in counters:
        calls = 1
        if key.startswith("encoder.backbone.prompt_generator.bn"):
            calls = config.model.depths[int(key.split(".bn")[1][0]) - 1]
        assert int(got[key]) == int(np.asarray(sd[key])) + calls, key


@pytest.mark.slow  # shares one compile of the real train step (about 1-2 min)
def test_params_after_adamw_step(one_step, ref_dir, reference_grads):
    """AdamW's first step is lr·g/(|g| + eps) ≈ lr·sign(g) + decay. Elements whose gradient is
    within the float32 noise of the tensor (see the module docstring) may step differently,
    by at most 2·lr; where |g_ref| > sqrt(4e-7 · max|g_ref|) and the signs agree, a gradient
    error of 3 % of max|g| moves the step by < 1e-6 (d step / dg = lr·eps / g²)."""
    model, config, sd, new_state, metrics = one_step
    with np.load(ref_dir / "tiny_reference_params_after_adamw_step.npz") as f:
        after = {k: f[k] for k in f.files}
    ref_grads = reference_grads
    got = _torch_dict(model, config, new_state.variables())
    grads = _torch_dict(
        model, config, {"params": metrics["grads"], "batch_stats": new_state.batch_stats}
    )
    lr = 2.5e-4
    scale = max(float(np.abs(g).max()) for g in ref_grads.values())
    disagree = total = 0
    for key, want in after.items():
        step_ours, step_ref = got[key] - sd[key], want - sd[key]
        if key not in ref_grads:  # conv_seg: frozen, not even weight decay
            np.testing.assert_array_equal(got[key], sd[key], err_msg=key)
            continue
        np.testing.assert_array_less(np.abs(step_ours - step_ref), 2 * lr * 1.001)
        g = ref_grads[key]
        # Gradients that are truly zero (before a normalisation) are noise at ~1e-4 of the
        # largest gradient (as in test_gradients_match_reference).
        significant = np.abs(g) > np.sqrt(4e-7 * max(np.abs(g).max(), 1e-4 * scale))
        same = significant & (np.sign(grads[key]) == np.sign(g))
        np.testing.assert_allclose(step_ours[same], step_ref[same], rtol=0, atol=1e-6, err_msg=key)
        disagree += int((~same).sum())
        total += same.size
    assert disagree / total < 0.05, (disagree, total)  # measured: 2.7 %


def test_trainable_mask_freezes_conv_seg():
    params = {
        "decode_head": {"conv_seg": {"kernel": 1, "bias": 2}, "conv2": {"kernel": 3}},
        "backbone": {"x": 4},
    }
    mask = train_state.trainable_mask(params)
    assert mask == {
        "decode_head": {"conv_seg": {"kernel": False, "bias": False}, "conv2": {"kernel": True}},
        "backbone": {"x": True},
    }


def test_interleave_datasets():
    ids = np.array([0, 0, 1, 1, 2, 2, 3, 3], np.int32)
    batch = {"dataset_id": ids, "x": np.arange(8)}
    out = train_step.interleave_datasets(batch)
    np.testing.assert_array_equal(out["dataset_id"], [0, 1, 2, 3, 0, 1, 2, 3])
    np.testing.assert_array_equal(out["x"], [0, 2, 4, 6, 1, 3, 5, 7])
    uneven = {"dataset_id": np.array([0, 0, 1]), "x": np.arange(3)}
    np.testing.assert_array_equal(train_step.interleave_datasets(uneven)["x"], [0, 1, 2])


def test_synthetic_batches_are_deterministic_and_split_over_processes():
    config = fgtbt.get_config("tiny")
    config.img_size, config.heatmap_size = 32, 16
    full = synthetic.global_batch(config, seed=3, step=5)
    assert full["image"].shape == (8, 32, 32, 3) and full["image"].dtype == np.float32
    assert full["coords"].dtype == np.int32 and full["mask"].shape == (8, 124)
    np.testing.assert_array_equal(full["dataset_id"], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(full["mask"], landmarks.annotation_mask()[full["dataset_id"]])
    assert np.all(full["coords"][~full["mask"]] == 0)
    inside = full["coords"][full["mask"]]
    assert inside.min() >= 0 and inside.max() <= 16
    it = synthetic.make_train_iterator(config, seed=3, start_step=5)
    np.testing.assert_array_equal(next(it)["image"], full["image"])
    assert not np.array_equal(next(it)["image"], full["image"])
    # Two processes: each gets one sample of every dataset; together the whole batch.
    rows = [synthetic.process_rows(config, p, 2) for p in range(2)]
    np.testing.assert_array_equal(rows[0], [0, 2, 4, 6])
    np.testing.assert_array_equal(rows[1], [1, 3, 5, 7])
    part = next(
        synthetic.make_train_iterator(
            config, seed=3, process_index=1, process_count=2, start_step=5
        )
    )
    np.testing.assert_array_equal(part["image"], full["image"][rows[1]])


def test_ema_and_gradient_accumulation():
    """EMA moves only on real updates; two accumulated micro-steps = one step on the mean."""
    from toy_model import build_toy, toy_config

    config = toy_config(**{"optim.grad_accum_steps": 2, "total_steps": 4, "ema_half_life": 0})
    mesh = sharding.make_mesh(1)
    model = build_toy(config.model)
    tx, schedule = train_state.make_optimizer(config)
    state, shardings = train_state.create_train_state(config, model, tx, mesh)
    step = jax.jit(train_step.make_train_step(model, tx, schedule, config))
    b0 = synthetic.global_batch(config, 0, 0)
    s1, _ = step(state, b0)
    # After the first micro-step: parameters and EMA unchanged, batch statistics updated.
    jax.tree.map(np.testing.assert_array_equal, s1.params, state.params)
    jax.tree.map(np.testing.assert_array_equal, s1.ema_params, state.ema_params)
    assert int(s1.batch_stats["bn1"]["num_batches_tracked"]) == 1
    s2, _ = step(s1, synthetic.global_batch(config, 0, 1))
    decay = train_state.ema_decay(config)
    assert decay == pytest.approx(0.5 ** (4 * 1 * 2 / 10_000))  # release formula, BATCH = 1·2
    assert train_state.ema_decay(toy_config(ema_half_life=25)) ** 25 == pytest.approx(0.5)
    w0, w2 = state.params["head"]["kernel"], s2.params["head"]["kernel"]
    assert not np.allclose(w0, w2)
    np.testing.assert_allclose(
        s2.ema_params["head"]["kernel"], decay * w0 + (1 - decay) * w2, rtol=1e-6, atol=1e-7
    )
    assert int(s2.step) == 2

    # Same two batches, no accumulation, one step on their mean gradient.
    loss_fn = train_step.make_loss_fn(model, config)
    plain, _ = train_state.make_optimizer(toy_config(**{"total_steps": 4}))

    @jax.jit
    def mean_grad_step(params, batches, states):
        grads = [
            jax.grad(
                lambda p, b=b, s=s: loss_fn(
                    p, s.batch_stats, b, train_step.step_rngs(s.rng, s.step)
                )[0]
            )(params)
            for b, s in zip(batches, states, strict=True)
        ]
        mean = jax.tree.map(lambda a, b: (a + b) / 2, *grads)
        upd, _ = plain.update(mean, plain.init(params), params)
        return optax.apply_updates(params, upd)

    want = mean_grad_step(state.params, (b0, synthetic.global_batch(config, 0, 1)), (state, s1))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s2.params, want
    )


def test_ema_off_tracks_live_weights():
    from toy_model import build_toy, toy_config

    config = toy_config()
    config.ema = False
    model = build_toy(config.model)
    tx, schedule = train_state.make_optimizer(config)
    state, _ = train_state.create_train_state(config, model, tx, sharding.make_mesh(1))
    new, _ = jax.jit(train_step.make_train_step(model, tx, schedule, config))(
        state, synthetic.global_batch(config, 0, 0)
    )
    jax.tree.map(np.testing.assert_array_equal, new.ema_params, new.params)
    jax.tree.map(np.testing.assert_array_equal, new.ema_batch_stats, new.batch_stats)


def test_step_rngs_depend_on_step():
    key = jax.random.PRNGKey(0)
    a, b = train_step.step_rngs(key, jnp.int32(1)), train_step.step_rngs(key, jnp.int32(2))
    assert not np.array_equal(a["dropout"], b["dropout"])
    assert not np.array_equal(a["dropout"], a["drop_path"])
    np.testing.assert_array_equal(train_step.step_rngs(key, jnp.int32(1))["dropout"], a["dropout"])
