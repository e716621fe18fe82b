"""A ``jax.profiler`` trace of a chosen window of training steps (``config.profile``).

``profile.num_steps`` > 0 traces steps ``start_step … start_step + num_steps − 1`` on process 0
(``profile.hosts = "first"``) or on every process (``"all"``) into
``WORKDIR/plugins/profile/<run>/``, where TensorBoard's profile plugin and xprof find it
(``tensorboard --logdir WORKDIR``). The trace starts after the previous step's outputs are ready
and stops once the last traced step's outputs are, so it holds whole steps; the compile of the
train step is never in it (the run's first step is traced from after its compile).
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import ml_collections

HOSTS = ("first", "all")


class ProfileWindow:
    """The trace window of one run; call :meth:`before_step` / :meth:`after_step` around each
    step inside ``with window:`` (which stops a trace cut short by preemption or an error)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
        p = config.get("profile") or ml_collections.ConfigDict()
        self.first = int(p.get("start_step", 1))
        self.num_steps = int(p.get("num_steps", 0))
        hosts = str(p.get("hosts", "first"))
        if hosts not in HOSTS:
            raise ValueError(f"config.profile.hosts={hosts!r}; choose one of {HOSTS}")
        if self.num_steps > 0 and self.first < 1:
            raise ValueError(f"config.profile.start_step={self.first}; steps count from 1")
        self.last = self.first + self.num_steps - 1
        self.enabled = self.num_steps > 0 and (hosts == "all" or jax.process_index() == 0)
        self.logdir = pathlib.Path(workdir)
        self.active = False
        self._step: Any = None  # the open StepTraceAnnotation

    def before_step(self, step: int, state: Any) -> bool:
        """Starts the trace before ``step`` if it opens the window, and marks the step in the
        trace (xprof's step-time view); True if it started the trace."""
        started = False
        if self.enabled and not self.active and step == self.first:
            jax.block_until_ready(state)  # the previous step is not part of the window
            jax.profiler.start_trace(str(self.logdir))
            self.active = started = True
        if self.active:
            self._step = jax.profiler.StepTraceAnnotation("train", step_num=step)
            self._step.__enter__()
        return started

    def after_step(self, step: int, outputs: Any) -> bool:
        """Ends the step's mark; stops the trace after ``step`` if it closes the window (True)."""
        if not self.active:
            return False
        if step < self.last:
            self._end_step()
            return False
        jax.block_until_ready(outputs)
        self.stop()
        return True

    def _end_step(self) -> None:
        if self._step is not None:
            self._step.__exit__(None, None, None)
            self._step = None

    def stop(self) -> None:
        self._end_step()
        if self.active:
            jax.profiler.stop_trace()
            self.active = False

    def __enter__(self) -> ProfileWindow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def runs(self) -> list[pathlib.Path]:
        """The trace directories ``WORKDIR/plugins/profile/<run>`` written so far."""
        root = self.logdir / "plugins" / "profile"
        return sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
