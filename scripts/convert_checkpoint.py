r"""Converts FGTBT checkpoints between the PyTorch release layout and orbax.

  python scripts/convert_checkpoint.py --config configs/fgtbt.py:release \
      --input fgtbt_b4.pth --output /tmp/fgtbt_b4_orbax

The direction follows the paths: a ``.pth`` input is written as an orbax directory, an orbax
directory (or a training workdir: its latest EMA weights) as a release-layout ``.pth``.
``--report`` imports a partial checkpoint (e.g. SegFormer's ImageNet ``mit_b4.pth``) into a freshly
initialised model non-strictly and prints what loaded and what did not.
"""

from __future__ import annotations

import pathlib

import jax
from absl import flags
from ml_collections import config_flags

from fgtbt_jax import errors
from fgtbt_jax.models.fgtbt import build_model, enable_x64_if_requested, init_variables
from fgtbt_jax.porting import (
    convert,
    pretrained,
    pth,
)

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fgtbt.py:release"
)
_INPUT = flags.DEFINE_string("input", None, "A .pth file or an orbax directory.", required=True)
_OUTPUT = flags.DEFINE_string("output", None, "Output .pth file or orbax directory.", required=True)
_REPORT = flags.DEFINE_bool(
    "report", False, "Partial (non-strict) import of --input; print the load table."
)
_PREFIX = flags.DEFINE_string(
    "prefix", "encoder.backbone.", "With --report: prefix added to keys that lack it."
)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    enable_x64_if_requested(config.model)
    src, dst = pathlib.Path(_INPUT.value), pathlib.Path(_OUTPUT.value)
    if _REPORT.value:
        model = build_model(config.model)
        variables = jax.jit(lambda k: init_variables(model, k, config.img_size))(
            jax.random.key(config.seed)
        )
        sd = convert.state_dict_from_release(pth.load_pth(src), str(src))
        variables, report = convert.import_partial(
            variables, sd, model, config.img_size, prefix=_PREFIX.value
        )
        print(report.table())
    else:
        _, variables = pretrained.load_pretrained(src, config)
    if dst.suffix in (".pth", ".pt"):
        pretrained.export_pth(variables, dst, config)
    else:
        pretrained.save_variables(variables, dst)
    print(f"wrote {dst}")


if __name__ == "__main__":
    errors.run(main)
