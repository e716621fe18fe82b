r"""Prints the size of an FGTBT configuration (shapes only: nothing is computed).

python scripts/model_info.py --config configs/fgtbt.py:release
"""

from __future__ import annotations

import pathlib
import sys

from absl import app
from ml_collections import config_flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fgtbt_jax import porting  # noqa: E402
from fgtbt_jax.model import build_model  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fgtbt.py:release"
)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    model = build_model(config.model)
    abstract = porting.abstract_variables(model, config.img_size)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["params"]))
    stats = [x for x in jax.tree.leaves(abstract["batch_stats"]) if x.dtype != np.int32]
    n_stats = sum(int(np.prod(x.shape)) for x in stats)
    entries = porting.mapping(model, config.img_size)
    print(f"preset: {config.preset}  input: {config.img_size}²  heatmaps: {config.heatmap_size}²")
    print(f"parameters: {n_params:,}")
    print(f"BatchNorm running statistics: {n_stats:,}")
    print(f"state-dict floating values: {n_params + n_stats:,}")
    print(f"state-dict tensors: {len(entries)}")


if __name__ == "__main__":
    app.run(main)
