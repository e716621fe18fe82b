"""Metric writing for the trainer: JSON lines, TensorBoard and logging, once per job.

Process 0 writes one JSON object per logged step to ``WORKDIR/metrics.jsonl`` (training) and
``WORKDIR/eval.jsonl`` (evaluation) and, through clu's default writer, TensorBoard events to
``WORKDIR/tb`` (unless ``config.tensorboard`` is off) plus log lines; WORKDIR is local or
gs://. Other processes only log (``just_logging``). Without ``clu`` / ``tensorboard``
installed (the ``data`` extra), the JSON lines and logging remain.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
from etils import epath

from fgtbt_jax import paths

TRAIN_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
TENSORBOARD_DIR = "tb"


def _clu_writer(logdir: epath.Path, just_logging: bool) -> Any | None:
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
        os.fspath(logdir), just_logging=just_logging, asynchronous=False
    )


class MetricWriter:
    """Training and evaluation scalars of one run (see the module docstring).

    ``workdir``: local or gs://. ``start_step``: the step the run (re)starts from; JSON lines of
    later steps, left by an interrupted run, are dropped so that a resumed run writes every
    step once. Object stores have no append, so each write rewrites the whole file (kept in
    memory; one object upload on gs://, a file moved into place locally): whatever sequence of
    runs, resumes and preemptions, each logged step's line is there exactly once.
    ``tensorboard``: False leaves out the TensorBoard events (``config.tensorboard``).
    """

    def __init__(
        self, workdir: str | os.PathLike, start_step: int, *, tensorboard: bool = True
    ) -> None:
        workdir = paths.resolve(workdir, "--workdir")
        self.lead = jax.process_index() == 0
        self.train_path = workdir / TRAIN_FILE
        self.eval_path = workdir / EVAL_FILE
        self.lines: dict[str, list[str]] = {TRAIN_FILE: [], EVAL_FILE: []}
        if self.lead:
            for path in (self.train_path, self.eval_path):
                if path.exists():
                    lines = [x for x in path.read_text().splitlines() if x.strip()]
                    kept = [x for x in lines if json.loads(x)["step"] <= start_step]
                    self.lines[path.name] = kept
                    if kept != lines:
                        paths.write_text(path, "".join(x + "\n" for x in kept))
        self.writer = _clu_writer(
            workdir / TENSORBOARD_DIR, just_logging=not (self.lead and tensorboard)
        )

    def _write(
        self, path: epath.Path, step: int, values: Mapping[str, float | None], prefix: str
    ) -> None:
        if self.lead:
            lines = self.lines[path.name]
            lines.append(json.dumps({"step": int(step), **values}))
            paths.write_text(path, "".join(x + "\n" for x in lines))
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
