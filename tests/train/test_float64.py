"""``model.dtype=float64`` against the original implementation run entirely in float64.

``tiny_reference_float64.npz`` (see tests/fixtures/reference/README.md, last paragraph) holds the
original's float64 forward, loss, gradients and BatchNorm statistics for the tiny checkpoint.
Errors are per tensor, relative to that tensor's max |ref|; the bounds are the README's fair
float64 tolerances (two float64 runs of the original on 1 and 2 threads reach: losses 2e-16,
BatchNorm 2e-15, gradients median 4e-15 / worst 3e-11):

* high-pass image, the four stage outputs and the heatmaps (eval mode): 1e-10;
* the four per-dataset loss terms and the total: 1e-12;
* every non-zero gradient: 1e-8; the 17 structurally-zero ones: |g| <= 1e-12 · the largest
  reference gradient (they vanish in exact arithmetic; both sides hold rounding noise);
* BatchNorm running statistics after the train forward: 1e-10.

Both ``model.kernels`` paths with both ``model.decoder_form``s are held to the same bounds: the
forward over the four pairs (one eval compile each), the train step over the two pairs that
``decoder_form="auto"`` does not pick (one train-step compile each; the float32 step tests in
test_train_step.py run the other two), and no compiled step may hold a float32 op. Everything
runs under ``jax.enable_x64(True)`` inside the fixtures, so other tests keep 32-bit JAX; the
results leave the context as NumPy arrays.
"""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    OP_PATHS_AND_FORMS,
    PAPER_OP_PATHS_AND_FORMS,
    ROOT,
    op_path_id,
    reference_batch,
    subprocess_env,
)

from configs import fgtbt
from fgtbt_jax import landmarks
from fgtbt_jax.models.backbone import high_pass
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert
from fgtbt_jax.porting.pth import load_pth
from fgtbt_jax.train import sharding
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step

DATASETS = landmarks.DATASETS


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _float64_config(pair=("xla", "paper"), **model_overrides):
    config = fgtbt.get_config("reference_tiny")  # release optimizer: AdamW 2.5e-4, wd 0.01
    config.model.dtype = "float64"
    config.model.kernels, config.model.decoder_form = pair
    for key, value in model_overrides.items():
        setattr(config.model, key, value)
    return config


def _nchw(x: jax.Array) -> np.ndarray:
    return np.asarray(x).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module", params=OP_PATHS_AND_FORMS, ids=op_path_id)
def forward64(request, ref_dir, ref_float64):
    """Eval-mode float64 forward of the reference batch: hpf, stages, heatmaps (NCHW), dtypes."""
    with jax.enable_x64(True):
        config = _float64_config(request.param)
        model = build_model(config.model)
        sd = load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]
        variables = convert.variables_from_state_dict(sd, model, config.img_size)
        images = jnp.asarray(ref_float64["input_nchw"].transpose(0, 2, 3, 1))
        apply = jax.jit(
            lambda v, x: model.apply(
                v, x, train=False, capture_intermediates=lambda m, _: m.name == "backbone"
            )
        )
        lowered = apply.lower(variables, images)
        heatmaps, state = lowered.compile()(variables, images)
        stages = state["intermediates"]["backbone"]["__call__"][0]
        return {
            "hpf": _nchw(high_pass(images)),
            "hpf_hlo": jax.jit(high_pass).lower(images).as_text(),
            "hlo": lowered.as_text(),
            "stages": [_nchw(s) for s in stages],
            "heatmaps": _nchw(heatmaps),
            "variable_dtypes": {str(x.dtype) for x in jax.tree.leaves(variables)},
            "path": op_path_id(request.param),
        }


def test_float64_forward_matches_reference(forward64, ref_float64):
    errors = {"hpf": rel_err(forward64["hpf"], ref_float64["hpf_nchw"])}
    errors |= {
        f"stage{s}": rel_err(got, ref_float64[f"eval_stage{s}_nchw"])
        for s, got in enumerate(forward64["stages"], start=1)
    }
    errors["heatmaps"] = rel_err(
        forward64["heatmaps"][:2], ref_float64["eval_heatmaps_first2_nchw"]
    )
    print(
        f"\nfloat64 forward, {forward64['path']}: "
        + ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    )
    assert forward64["variable_dtypes"] == {"float64", "int32"}  # int32: num_batches_tracked
    # Nothing is computed in float32 behind our back; the FFT runs in complex128.
    assert "complex<f64>" in forward64["hpf_hlo"] and "f32" not in forward64["hpf_hlo"]
    assert "f32" not in forward64["hlo"]
    assert forward64["hpf"].dtype == np.float64
    # Measured (cpu; xla): hpf 6.7e-16; stages 2.0e-15 to 6.6e-15 (both); heatmaps 3.6e-15;
    # 3.8e-15.
    assert rel_err(forward64["hpf"], ref_float64["hpf_nchw"]) < 1e-10
    for s, got in enumerate(forward64["stages"], start=1):
        assert got.dtype == np.float64
        assert rel_err(got, ref_float64[f"eval_stage{s}_nchw"]) < 1e-10, f"stage {s}"
    assert forward64["heatmaps"].dtype == np.float64
    assert rel_err(forward64["heatmaps"][:2], ref_float64["eval_heatmaps_first2_nchw"]) < 1e-10


@pytest.fixture(scope="module", params=PAPER_OP_PATHS_AND_FORMS, ids=op_path_id)
def step64(request, ref_dir, ref_float64):
    """One float64 train step from the reference checkpoint on the reference batch (our own
    float64 high-pass image). Returns state dicts (release names) and metrics as NumPy."""
    with jax.enable_x64(True):
        config = _float64_config(request.param, drop_path_rate=0.0, decoder_dropout=0.0)
        model = build_model(config.model)
        sd = load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]
        variables = convert.variables_from_state_dict(sd, model, config.img_size)
        mesh = sharding.make_mesh(1)
        tx, schedule = train_state.make_optimizer(config)
        state, shardings = train_state.create_train_state(
            config, model, tx, mesh, variables=variables
        )
        state_dtypes = {str(x.dtype) for x in jax.tree.leaves(state)}
        step = train_step.jit_train_step(
            train_step.make_train_step(model, tx, schedule, config, return_grads=True),
            shardings,
            mesh,
        )
        batch = sharding.shard_batch(reference_batch(ref_float64), mesh)  # float64 images
        lowered = step.lower(state, batch)
        new_state, metrics = jax.device_get(lowered.compile()(state, batch))

        def torch_dict(variables):
            return convert.state_dict_from_variables(variables, model, config.img_size)

        return {
            "sd": sd,
            "metrics": metrics,
            "grads": torch_dict({"params": metrics["grads"], "batch_stats": new_state.batch_stats}),
            "after": torch_dict(new_state.variables()),
            "hlo": lowered.as_text(),
            "state_dtypes": state_dtypes,
            "new_state_dtypes": {str(x.dtype) for x in jax.tree.leaves(new_state)},
            "path": op_path_id(request.param),
        }


@pytest.mark.slow  # one compile of the float64 train step (about 1-2 min)
def test_float64_loss_terms_match_reference(step64, ref_float64):
    # Forward, loss, backward, AdamW and EMA: no float32 anywhere in the compiled step.
    assert "complex<f64>" in step64["hlo"] and "f32" not in step64["hlo"]
    metrics = step64["metrics"]
    errors = [
        abs(metrics["loss_per_dataset"][d] - ref_float64[f"train_loss_{name}"])
        / abs(ref_float64[f"train_loss_{name}"])
        for d, name in enumerate(DATASETS)
    ]
    total = abs(metrics["loss"] - ref_float64["train_loss_total"]) / abs(
        ref_float64["train_loss_total"]
    )
    print(
        f"\nfloat64 loss, {step64['path']}: per dataset "
        + ", ".join(f"{e:.1e}" for e in errors)
        + f"; total {total:.1e}"
    )
    assert metrics["loss"].dtype == metrics["loss_per_dataset"].dtype == np.float64
    # Measured (cpu; xla): COFW 8.8e-14, WFLW 1.8e-14; 1.7e-14, 300W 7.0e-14, AFLW 7.0e-15,
    # total 8.2e-15; 8.0e-15.
    for d, name in enumerate(DATASETS):
        want = ref_float64[f"train_loss_{name}"]
        assert abs(metrics["loss_per_dataset"][d] - want) <= 1e-12 * abs(want), name
    want = ref_float64["train_loss_total"]
    assert abs(metrics["loss"] - want) <= 1e-12 * abs(want)


def _reference_grads(ref_float64) -> dict[str, np.ndarray]:
    return {k.removeprefix("grad/"): v for k, v in ref_float64.items() if k.startswith("grad/")}


@pytest.mark.slow  # shares the float64 train-step compile
def test_float64_gradients_match_reference(step64, ref_float64):
    grads, ref = step64["grads"], _reference_grads(ref_float64)
    zero = set(ref_float64["grad_structurally_zero_names"].tolist())
    assert len(ref) == 308 and len(zero) == 17 and zero <= set(ref)
    largest = max(float(np.abs(g).max()) for g in ref.values())
    errors = {}
    for key, want in ref.items():
        got = grads[key]
        assert got.dtype == np.float64 and got.shape == want.shape, key
        if key in zero:  # measured: at most 4.6e-17 of the largest gradient
            assert np.abs(got).max() <= 1e-12 * largest, key
        else:
            errors[key] = rel_err(got, want)
    # Measured over the 291 non-zero gradients: median 1.1e-12, worst 4.4e-11 (cpu) / 5.1e-11
    # (xla), in shared_csam1.semantic_att.linear.2 (weight / bias), like the original's own 1-
    # vs 2-thread runs.
    worst = max(errors, key=errors.get)
    zero_max = max(float(np.abs(grads[k]).max()) for k in zero) / largest
    print(
        f"\nfloat64 gradients, {step64['path']}: {len(errors)} non-zero, median "
        f"{np.median(list(errors.values())):.1e}, worst {errors[worst]:.1e} ({worst}); "
        f"structurally zero <= {zero_max:.1e} x largest"
    )
    assert errors[worst] <= 1e-8, (worst, errors[worst])
    # The unused conv_seg gets no gradient (zeros here, None in PyTorch).
    for key in ("encoder.decode_head.conv_seg.weight", "encoder.decode_head.conv_seg.bias"):
        assert key not in ref and not np.any(grads[key])


@pytest.mark.slow  # shares the float64 train-step compile
def test_float64_batchnorm_statistics_match_reference(step64, ref_float64):
    ref = {
        k.removeprefix("bn_after/"): v for k, v in ref_float64.items() if k.startswith("bn_after/")
    }
    assert len(ref) == 66
    worst = max(rel_err(step64["after"][key], want) for key, want in ref.items())
    print(f"\nfloat64 BatchNorm statistics, {step64['path']}: worst {worst:.1e}")
    for key, want in ref.items():  # measured: at most 7.3e-14
        got = step64["after"][key]
        assert got.dtype == np.float64
        assert rel_err(got, want) <= 1e-10, key


@pytest.mark.slow  # shares the float64 train-step compile
def test_float64_adamw_step(step64, ref_float64):
    """Parameters, moments and EMA stay float64, and the update is PyTorch's first AdamW step
    (decoupled decay, bias-corrected moments: lr·g/(|g| + eps)), written out here in NumPy, from
    our float64 gradients (which the test above holds to the original's)."""
    assert step64["state_dtypes"] == step64["new_state_dtypes"]
    assert step64["state_dtypes"] <= {"float64", "int32", "uint32"}
    lr, eps, wd = 2.5e-4, 1e-8, 0.01
    sd, grads = step64["sd"], step64["grads"]
    for key in _reference_grads(ref_float64):
        p, g = sd[key].astype(np.float64), grads[key]
        want = p * (1 - lr * wd) - lr * g / (np.abs(g) + eps)
        got = step64["after"][key]
        assert got.dtype == np.float64
        # Float64 rounding of p (|p| < 2.5) and of the update: a few ulp.
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-14, err_msg=key)
    for key in ("encoder.decode_head.conv_seg.weight", "encoder.decode_head.conv_seg.bias"):
        np.testing.assert_array_equal(step64["after"][key], sd[key])  # frozen, no decay


def test_float64_needs_x64():
    """Without ``jax_enable_x64`` a float64 model is refused with the way to enable it; the
    entry points' helper enables it for float64 configs only."""
    with pytest.raises(ValueError, match="enable_x64_if_requested"):
        build_model(_float64_config().model)
    code = (
        "import jax\n"
        "from configs import fgtbt\n"
        "from fgtbt_jax.models.fgtbt import build_model, enable_x64_if_requested\n"
        "config = fgtbt.get_config('tiny')\n"
        "enable_x64_if_requested(config.model)\n"
        "assert not jax.config.read('jax_enable_x64')\n"
        "config.model.dtype = 'float64'\n"
        "enable_x64_if_requested(config.model)\n"
        "assert jax.config.read('jax_enable_x64')\n"
        "build_model(config.model)\n"
        "print('ok')\n"
    )
    env = subprocess_env()
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
