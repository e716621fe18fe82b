r"""Prints the size of an FGTBT configuration (shapes only: nothing is computed).

python scripts/model_info.py --config configs/fgtbt.py:release
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from fgtbt_jax import errors
from fgtbt_jax.models.fgtbt import build_model, enable_x64_if_requested, init_variables
from fgtbt_jax.porting import convert

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fgtbt.py:release"
)
_FORWARD = flags.DEFINE_integer(
    "forward", 0, "Also run one eval-mode forward pass on a batch of this many random images."
)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    enable_x64_if_requested(config.model)
    model = build_model(config.model)
    abstract = convert.abstract_variables(model, config.img_size)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    stats = [x for x in jax.tree.leaves(abstract["batch_stats"]) if x.dtype != np.int32]
    n_stats = sum(int(np.prod(x.shape)) for x in stats)
    entries = convert.mapping(model, config.img_size)
    print(f"preset: {config.preset}  input: {config.img_size}²  heatmaps: {config.heatmap_size}²")
    print(f"model.kernels: {model.ops.NAME} (config: {config.model.kernels})")
    print(f"model.decoder_form: {model.decoder_form} (config: {config.model.decoder_form})")
    print(f"parameters: {n_params:,}")
    print(f"BatchNorm running statistics: {n_stats:,}")
    print(f"state-dict floating values: {n_params + n_stats:,}")
    print(f"state-dict tensors: {len(entries)}")
    if _FORWARD.value:
        b, s = _FORWARD.value, config.img_size
        variables = init_variables(model, jax.random.key(config.seed), s)
        images = jax.random.normal(jax.random.key(1), (b, s, s, 3), jax.numpy.float32)
        apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
        t0 = time.perf_counter()
        out = jax.block_until_ready(apply(variables, images))
        t1 = time.perf_counter()
        out = jax.block_until_ready(apply(variables, images))
        t2 = time.perf_counter()
        finite = bool(jax.numpy.isfinite(out).all())
        print(f"forward: input {images.shape} -> heatmaps {out.shape} {out.dtype}, finite={finite}")
        print(f"first call (compile + run) {t1 - t0:.1f} s, second call {t2 - t1:.2f} s")


if __name__ == "__main__":
    errors.run(main)
