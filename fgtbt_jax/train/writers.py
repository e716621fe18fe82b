"""Metric writing for the trainer: JSON lines, TensorBoard and logging, once per job.

Process 0 appends one JSON object per logged step to ``WORKDIR/metrics.jsonl`` (training) and
``WORKDIR/eval.jsonl`` (evaluation) and, through clu's default writer, TensorBoard events to
``WORKDIR/tb`` plus log lines. Other processes only log (``just_logging``). Without ``clu`` /
``tensorboard`` installed (the ``data`` extra), the JSON lines and logging remain.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax

TRAIN_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tb"


def _clu_writer(logdir: pathlib.Path, just_logging: bool) -> Any | None:
    """clu's default writer (TensorBoard + logging), or None when clu / tensorboard is absent."""
    try:
        import tensorboard  # noqa: F401  (clu's summary writer needs it)
        import tensorflow as tf
        from clu import metric_writers
    except ImportError as e:
        logging.warning(
            "clu/tensorboard not available (%s): metrics go to %s/%s and the log only; "
            "pip install -e '.[data]' for TensorBoard",
            e,
            TRAIN_FILE,
            EVAL_FILE,
        )
        return None
    tf.config.set_visible_devices([], "GPU")  # TensorFlow must not claim accelerator memory
    return metric_writers.create_default_writer(
        logdir, just_logging=just_logging, asynchronous=False
    )


class MetricWriter:
    """Training and evaluation scalars of one run (see the module docstring).

    ``start_step``: the step the run (re)starts from; JSON lines of later steps, left by an
    interrupted run, are dropped so that a resumed run writes every step once.
    """

    def __init__(self, workdir: str | pathlib.Path, start_step: int) -> None:
        workdir = pathlib.Path(workdir)
        self.lead = jax.process_index() == 0
        self.train_path = workdir / TRAIN_FILE
        self.eval_path = workdir / EVAL_FILE
        if self.lead:
            for path in (self.train_path, self.eval_path):
                if path.exists():
                    lines = [x for x in path.read_text().splitlines() if x.strip()]
                    kept = [x for x in lines if json.loads(x)["step"] <= start_step]
                    path.write_text("".join(x + "\n" for x in kept))
        self.writer = _clu_writer(workdir / TENSORBOARD_DIR, just_logging=not self.lead)

    def _write(
        self, path: pathlib.Path, step: int, values: Mapping[str, float | None], prefix: str
    ) -> None:
        if self.lead:
            with path.open("a") as f:
                f.write(json.dumps({"step": int(step), **values}) + "\n")
        if self.writer is not None:  # TensorBoard has no null: unknown values (None) are left out
            scalars = {prefix + k: v for k, v in values.items() if v is not None}
            self.writer.write_scalars(int(step), scalars)
        else:
            logging.info("[%d] %s", step, {prefix + k: v for k, v in values.items()})

    def write_train(self, step: int, values: Mapping[str, float | None]) -> None:
        self._write(self.train_path, step, values, "")

    def write_eval(self, step: int, values: Mapping[str, float]) -> None:
        self._write(self.eval_path, step, values, "eval/")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
