r"""Trains FGTBT (SPEC §6) on one CPU, a GPU/TPU host or a multi-host mesh.

  python scripts/train.py --config configs/fgtbt.py:tiny --workdir /tmp/fgtbt_tiny
  python scripts/train.py --config configs/fgtbt.py:release --workdir gs://… \
      --config.init_backbone=mit_b4.pth

Any config field can be overridden (``--config.optim.lr=1e-4``). ``--config.data.source``:
``demo`` (default; the bundled synthetic face set, prepared on first use), ``official`` (TFDS
datasets of the official files) or ``synthetic`` (in-memory batches, no TensorFlow).

``--config.profile.num_steps=N`` traces N steps for TensorBoard's profile tab; step timing,
TFLOP/s, MFU and the goodput summary are described in docs/observability.md.

The loop is :func:`fgtbt_jax.train.trainer.train_and_evaluate` (WORKDIR layout, resumption and
preemption are described there). SIGTERM (preemption) saves a checkpoint and exits with 143.

Multi-host: every host runs this script; ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (or a Slurm / TPU environment) make it call ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fgtbt_jax import errors
from fgtbt_jax.models.fgtbt import enable_x64_if_requested
from fgtbt_jax.train import sharding, trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.maybe_initialize_distributed()  # before any other JAX call
    enable_x64_if_requested(_CONFIG.value.model)  # before any array is created
    try:
        code = trainer.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except trainer.BatchShapeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    errors.run(main)
