"""fgtbt_jax.torch_fgtbt: the PyTorch FGTBT against the reference implementation's outputs."""

from __future__ import annotations

import importlib.util
import pathlib
import re

import numpy as np
import pytest
from helpers import TINY_TORCH, tiny_torch_model

torch = pytest.importorskip("torch")

from benchmarks.torch_oracle.fgtbt import (  # noqa: E402
    DropPath,
    FGTBTTorch,
    build_torch_model_from_config,
    highpass_filter,
)
from fgtbt_jax.porting.pth import load_pth  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("torch_two_threads")


@pytest.fixture(scope="module")
def tiny_state_dict(ref_dir: pathlib.Path) -> dict:
    sd = load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]
    return {k: torch.from_numpy(v) for k, v in sd.items()}


def _assert_close(got: torch.Tensor, want: np.ndarray, name: str, rel: float = 1e-4) -> None:
    got = got.detach().numpy()
    assert got.shape == want.shape, (name, got.shape, want.shape)
    err = np.abs(got - want).max()
    scale = np.abs(want).max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel} x max|ref| {scale:.3g}"


def test_eval_matches_reference(ref_dir: pathlib.Path, ref_outputs: dict) -> None:
    model = tiny_torch_model(ref_dir).eval()
    x = torch.from_numpy(ref_outputs["input_nchw"])
    with torch.no_grad():
        _assert_close(highpass_filter(x, 20.0), ref_outputs["hpf_nchw"], "hpf")
        feats = model.forward_features(x)
        for s, f in enumerate(feats, 1):
            _assert_close(f, ref_outputs[f"eval_stage{s}_nchw"], f"stage{s}")
        heatmaps = model(x)
        _assert_close(heatmaps, ref_outputs["eval_heatmaps_nchw"], "heatmaps (batch of 4)")
        # CSAM reduces over the batch: the first two images run alone give other heatmaps.
        alone = torch.cat([model(x[i : i + 1]) for i in range(2)])
    want_alone = ref_outputs["eval_heatmaps_per_sample_nchw"]
    _assert_close(alone, want_alone, "heatmaps (one image at a time)")
    assert np.abs(heatmaps[:2].numpy() - want_alone).max() > 1e-3 * np.abs(want_alone).max()


def test_csam_per_sample_option(ref_dir: pathlib.Path, ref_outputs: dict) -> None:
    """'sample' makes outputs batch-independent; for one image it equals the reference."""
    model = tiny_torch_model(ref_dir, csam_reduction="sample").eval()
    x = torch.from_numpy(ref_outputs["input_nchw"])
    with torch.no_grad():
        batched = model(x[:2])
    _assert_close(batched, ref_outputs["eval_heatmaps_per_sample_nchw"], "per-sample CSAM")
    with pytest.raises(ValueError, match="csam_reduction"):
        FGTBTTorch(**TINY_TORCH, csam_reduction="global")


def test_train_mode_matches_reference(ref_outputs: dict, ref_dir: pathlib.Path) -> None:
    """Train mode with dropout / drop-path 0: BatchNorm on batch statistics, and the running
    statistics updated with momentum 0.1 and the unbiased variance."""
    model = tiny_torch_model(ref_dir, drop_path_rate=0.0, decoder_dropout=0.0).train()
    out = model(torch.from_numpy(ref_outputs["input_nchw"]))
    _assert_close(out, ref_outputs["train_heatmaps_nchw"], "train-mode heatmaps")
    state = model.state_dict()
    with np.load(ref_dir / "tiny_reference_bn_after_train_forward.npz") as bn:
        assert len(bn.files) > 0
        for k in bn.files:
            _assert_close(state[k], bn[k], k, rel=1e-5)


def test_drop_path_and_dropout_are_active_in_train_mode(ref_dir: pathlib.Path) -> None:
    torch.manual_seed(0)
    dp = DropPath(0.5).train()
    y = dp(torch.ones(4000, 3))
    kept = y[:, 0] != 0
    assert torch.all(y[kept] == 2.0) and 0.45 < kept.float().mean() < 0.55
    assert torch.equal(dp.eval()(torch.ones(5, 3)), torch.ones(5, 3))
    model = tiny_torch_model(ref_dir, drop_path_rate=0.3, decoder_dropout=0.5)
    x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model.train()(x), model(x)
        c, d = model.eval()(x), model(x)
    assert not torch.allclose(a, b)
    assert torch.equal(c, d)
    backbone = model.encoder.backbone
    rates = [blk.drop_path.rate for s in range(1, 5) for blk in getattr(backbone, f"block{s}")]
    np.testing.assert_allclose(rates, np.linspace(0.0, 0.3, 6), rtol=1e-6)


def test_normalization_constants_follow_spec() -> None:
    """SPEC §2.1: block and stage LayerNorms eps 1e-6, other LayerNorms 1e-5; BatchNorm eps 1e-5,
    momentum 0.1; exact GELU. (An eps change hides inside the 1e-4 output tolerance.)"""
    model = FGTBTTorch(**TINY_TORCH)
    block_or_stage = re.compile(r"^encoder\.backbone\.(block\d\.\d+\.norm[12]|norm\d)$")
    layer_norms = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)}
    assert sum(bool(block_or_stage.match(n)) for n in layer_norms) == 2 * 6 + 4
    for name, m in layer_norms.items():
        assert m.eps == (1e-6 if block_or_stage.match(name) else 1e-5), name
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            assert (m.eps, m.momentum) == (1e-5, 0.1), name
        if isinstance(m, torch.nn.GELU):
            assert m.approximate == "none", name


def test_release_state_dict_matches_manifest(ref_dir: pathlib.Path) -> None:
    """The b4 release configuration has exactly the manifest's keys (in order), shapes, dtypes."""
    rows = (ref_dir / "fgtbt_b4_state_dict_keys.tsv").read_text().splitlines()
    assert rows[0].split("\t") == ["key", "shape", "dtype"]
    manifest = [r.split("\t") for r in rows[1:] if r]
    with torch.device("meta"):
        model = FGTBTTorch(
            embed_dims=(64, 128, 320, 512),
            num_heads=(1, 2, 5, 8),
            depths=(3, 6, 18, 3),
            sr_ratios=(8, 4, 2, 1),
            decoder_dim=768,
        )
    sd = model.state_dict()
    assert list(sd) == [r[0] for r in manifest]
    for key, shape, dtype in manifest:
        t = sd[key]
        got_shape = "x".join(str(n) for n in t.shape) or "scalar"
        assert (got_shape, str(t.dtype).removeprefix("torch.")) == (shape, dtype), key
    manifest_floats = sum(
        int(np.prod([int(n) for n in shape.split("x")])) if shape != "scalar" else 1
        for _, shape, dtype in manifest
        if dtype.startswith("float")
    )
    ours = sum(t.numel() for t in sd.values() if t.is_floating_point())
    assert ours == manifest_floats
    assert round(ours / 1e6, 2) == 53.66  # SPEC §2.3


def _load_config_module():
    spec = importlib.util.spec_from_file_location("_fgtbt_config", ROOT / "configs" / "fgtbt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_from_config_matches_checkpoint(tiny_state_dict: dict) -> None:
    pytest.importorskip("ml_collections")
    config = _load_config_module().get_config("reference_tiny")
    model = build_torch_model_from_config(config.model)
    assert model.load_state_dict(tiny_state_dict, strict=True)
    assert model.encoder.backbone.prompt_generator.shared_csam1.reduction == "batch"
    out = model.eval()(torch.zeros(1, 3, config.img_size, config.img_size))
    assert tuple(out.shape) == (1, 124, config.heatmap_size, config.heatmap_size)


def test_non_square_input_is_refused(ref_dir: pathlib.Path) -> None:
    model = tiny_torch_model(ref_dir).eval()
    with pytest.raises(ValueError, match="square"), torch.no_grad():
        model(torch.zeros(1, 3, 96, 64))
