"""The FGTBT network: MiT backbone with FFT prompts + heatmap decoder (SPEC §2).

    model = build_model(config.model)
    variables = model.init({"params": key}, images, train=False)
    heatmaps = model.apply(variables, images, train=False)   # (B, H/2, W/2, 124) NHWC

``images`` are NHWC float32, ImageNet-normalized. Training mode needs the ``dropout`` and
``drop_path`` rng streams and ``mutable=["batch_stats"]``.

``model.dtype`` "float32" (default), "bfloat16" (bfloat16 compute; parameters, BatchNorm
statistics, FFT and loss stay float32) or "float64" (everything in float64, complex128 FFT; for
numerical debugging). float64 needs ``jax_enable_x64``: entry points call
:func:`enable_x64_if_requested` before creating any array.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fgtbt_jax import errors
from fgtbt_jax import ops as ops_lib
from fgtbt_jax.models.backbone import MixVisionTransformer
from fgtbt_jax.models.decoder import DecodeHead
from fgtbt_jax.models.layers import Layers, Ops, param_dtype
from fgtbt_jax.transforms import imagenet_normalize

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float64": jnp.float64}


def enable_x64_if_requested(model_config: ml_collections.ConfigDict) -> None:
    """Switches on ``jax_enable_x64`` when ``model_config.dtype`` is "float64" (and only then).

    Call it at the start of a program, before any JAX array exists: arrays created before keep
    32-bit types.
    """
    if model_config.dtype == "float64":
        jax.config.update("jax_enable_x64", True)


class FGTBT(nn.Module, kw_only=True):
    """(B, H, W, 3) normalized images → (B, H/2, W/2, num_landmarks) heatmaps, NHWC.

    ``ops`` (a module of :mod:`fgtbt_jax.ops`, chosen by :func:`build_model`) is what every
    layer computes with; ``decoder_form`` ("paper" or "fused") how the decode head is
    formulated, ``stem_form`` ("paper" or "blocks") how the two full-resolution stems are
    (:class:`~fgtbt_jax.models.backbone.OverlapPatchEmbed`). None changes the parameters.
    """

    ops: Ops
    embed_dims: Sequence[int] = (64, 128, 320, 512)
    num_heads: Sequence[int] = (1, 2, 5, 8)
    depths: Sequence[int] = (3, 6, 18, 3)
    sr_ratios: Sequence[int] = (8, 4, 2, 1)
    mlp_ratio: int = 4
    decoder_dim: int = 768
    num_landmarks: int = 124
    drop_path_rate: float = 0.1
    decoder_dropout: float = 0.1
    hpf_sigma: float = 20.0
    prompt_scale_factor: int = 4
    csam_reduction: str = "batch"
    stat_groups: int = 1
    remat: bool = False
    dtype: jnp.dtype = jnp.float32
    fft: str = "fft"
    decoder_form: str = "paper"
    stem_form: str = "paper"

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images (B, H, W, 3), got shape {images.shape}")
        if images.dtype not in (jnp.float32, param_dtype(self.dtype)):
            raise ValueError(f"images must be float32 (normalized), got {images.dtype}")
        layers = Layers(ops=self.ops, dtype=self.dtype, stat_groups=self.stat_groups)
        feats = MixVisionTransformer(
            layers=layers,
            embed_dims=self.embed_dims,
            num_heads=self.num_heads,
            depths=self.depths,
            sr_ratios=self.sr_ratios,
            mlp_ratio=self.mlp_ratio,
            drop_path_rate=self.drop_path_rate,
            hpf_sigma=self.hpf_sigma,
            prompt_scale_factor=self.prompt_scale_factor,
            csam_reduction=self.csam_reduction,
            remat=self.remat,
            fft=self.fft,
            stem_form=self.stem_form,
            name="backbone",
        )(images, train)
        return DecodeHead(
            layers=layers,
            embed_dims=self.embed_dims,
            decoder_dim=self.decoder_dim,
            num_landmarks=self.num_landmarks,
            dropout=self.decoder_dropout,
            form=self.decoder_form,
            name="decode_head",
        )(feats, train)


def build_model(model_config: ml_collections.ConfigDict, *, stat_groups: int = 1) -> FGTBT:
    """The network of a ``config.model`` (see configs/fgtbt.py).

    ``stat_groups`` splits the batch into that many groups for BatchNorm / CSAM statistics
    (one per device reproduces the reference's per-device statistics under data parallelism).
    The ops module and the decoder and stem forms are chosen here, once, from the config
    (:func:`fgtbt_jax.ops.select`; ``model.ops.NAME`` names the ops chosen).
    """
    m = model_config
    if m.dtype not in _DTYPES:
        raise errors.ConfigError(f"model.dtype must be one of {sorted(_DTYPES)}, got {m.dtype!r}")
    if m.dtype == "float64" and not jax.config.read("jax_enable_x64"):
        raise errors.ConfigError(
            "model.dtype=float64 needs 64-bit JAX, which is off: call "
            "fgtbt_jax.models.fgtbt.enable_x64_if_requested(config.model) at the start of the "
            "program (the scripts do), use `with jax.enable_x64(True):`, or set JAX_ENABLE_X64=1"
        )
    ops, decoder_form, stem_form = ops_lib.select(m)
    return FGTBT(
        ops=ops,
        embed_dims=tuple(m.embed_dims),
        num_heads=tuple(m.num_heads),
        depths=tuple(m.depths),
        sr_ratios=tuple(m.sr_ratios),
        mlp_ratio=m.mlp_ratio,
        decoder_dim=m.decoder_dim,
        num_landmarks=m.num_landmarks,
        drop_path_rate=m.drop_path_rate,
        decoder_dropout=m.decoder_dropout,
        hpf_sigma=m.hpf_sigma,
        prompt_scale_factor=m.prompt_scale_factor,
        csam_reduction=m.csam_reduction,
        stat_groups=stat_groups,
        remat=m.remat,
        dtype=_DTYPES[m.dtype],
        fft=m.fft,
        decoder_form=decoder_form,
        stem_form=stem_form,
    )


def init_variables(model: FGTBT, rng: jax.Array, img_size: int) -> dict:
    """Random initial variables ``{'params', 'batch_stats'}`` for (1, img_size, img_size, 3)
    NHWC, computed by a jitted init compiled with the ops' ``INIT_COMPILER_OPTIONS`` (or,
    under ``jax.jit`` / ``jax.eval_shape``, traced into the caller's program)."""

    def init(key: jax.Array) -> dict:
        x = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
        return dict(model.init({"params": key}, x, train=False))

    if isinstance(rng, jax.core.Tracer):  # compiler options belong to the outermost jit
        return init(rng)
    options = model.ops.INIT_COMPILER_OPTIONS
    return jax.jit(init, compiler_options=options)(rng)


def normalize_images(images_uint8: jax.Array) -> jax.Array:
    """uint8 RGB (…, 3) → ImageNet-normalized float32."""
    return imagenet_normalize(images_uint8, xp=jnp)
