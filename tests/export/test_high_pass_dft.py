"""``model.fft="dft"``: the high-pass prompt as real matmuls (exportable) against the FFT path."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from configs import fgtbt
from fgtbt_jax import load_pretrained
from fgtbt_jax.models.backbone import high_pass, high_pass_dft


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def high_pass_float64(x: np.ndarray, sigma: float = 20.0) -> np.ndarray:
    """The reference operator in float64 numpy, (B, H, W, C) NHWC."""
    h, w = x.shape[1:3]
    spec = np.fft.fftshift(np.fft.fft2(x, axes=(1, 2), norm="forward"), axes=(1, 2))
    r = np.arange(h)[:, None] - h // 2
    c = np.arange(w)[None, :] - w // 2
    spec = spec * (1.0 - np.exp(-(r**2 + c**2) / (2.0 * sigma**2)))[None, :, :, None]
    out = np.fft.ifft2(np.fft.ifftshift(spec, axes=(1, 2)), axes=(1, 2), norm="forward")
    return np.abs(out.real)


def test_dft_matches_reference_high_pass(ref_outputs):
    images = ref_outputs["input_nchw"].transpose(0, 2, 3, 1)
    ref = ref_outputs["hpf_nchw"].transpose(0, 2, 3, 1)
    assert rel_err(high_pass_dft(jnp.asarray(images)), ref) < 1e-4
    # Both paths are float32 roundings of the float64 operator (measured: FFT 4.7e-7, DFT
    # matmuls 2.0e-6 of the largest value).
    truth = high_pass_float64(images.astype(np.float64))
    assert rel_err(high_pass(jnp.asarray(images)), truth) < 5e-6
    assert rel_err(high_pass_dft(jnp.asarray(images)), truth) < 5e-6


def test_dft_odd_and_non_square_sizes():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 37, 50, 3)), np.float32) * 2
    truth = high_pass_float64(x.astype(np.float64), sigma=7.0)
    assert rel_err(high_pass_dft(jnp.asarray(x), 7.0), truth) < 2e-6
    assert rel_err(high_pass(jnp.asarray(x), 7.0), truth) < 2e-6


def test_model_with_dft_matches_fft_model(ref_dir, ref_outputs):
    config = fgtbt.get_config("reference_tiny")
    model, variables = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    config.model.fft = "dft"
    model_dft, _ = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    images = jnp.asarray(ref_outputs["input_nchw"].transpose(0, 2, 3, 1))
    out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
    out_dft = jax.jit(lambda v, x: model_dft.apply(v, x, train=False))(variables, images)
    assert rel_err(out_dft, out) < 1e-5
    assert rel_err(out_dft, ref_outputs["eval_heatmaps_nchw"].transpose(0, 2, 3, 1)) < 1e-4
