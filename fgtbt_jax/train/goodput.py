"""Where a training run's wall time goes: per-window step timing and the goodput summary.

One :class:`Clock` per run, started when ``train_and_evaluate`` begins. The trainer wraps the
blocking parts in :meth:`Clock.measure` with a part name (``compile``, ``input_wait``,
``checkpoint``, ``evaluation``) and marks where the step loop begins and ends; the rest splits
into ``startup`` (before the loop), ``steps`` (productive step time inside the loop) and
``rest`` (after the loop: closing, export). So the parts add up to the wall time exactly.

Per logged window (:meth:`Clock.window`): ``step_time_s`` (mean wall time per step, without
compile, evaluation and checkpoint blocking; input wait included), ``data_wait_s`` (mean time
per step in ``next()`` of the input iterator) and ``checkpoint_blocking_s`` (seconds training
waited on saves since the last log).

Steps run asynchronously: the host fetches the next batch while the device computes, so input
wait counts the time the training loop's thread waited for the pipeline, and a step's device
time is paid wherever the host next blocks on its outputs (logging, evaluation, saving — the
trainer synchronises before timing evaluation and saves).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import pathlib
import time
from collections.abc import Callable, Iterator

GOODPUT_FILE = "goodput.json"
RATE_BATCHES = 8  # batches drained back to back to measure the input pipeline's rate
MEASURED = ("compile", "input_wait", "checkpoint", "evaluation")
PARTS = ("startup", "compile", "steps", "input_wait", "checkpoint", "evaluation", "rest")


class Clock:
    """Wall-time accounting of one run (see the module docstring). ``now``: a monotonic clock."""

    def __init__(self, now: Callable[[], float] = time.perf_counter) -> None:
        self.now = now
        self.t0 = now()
        # Measured seconds per part in each phase: before, inside and after the step loop.
        self._phases = [dict.fromkeys(MEASURED, 0.0) for _ in range(3)]
        self._phase = 0
        self._marks: list[float] = []  # loop start, loop end
        self._window = dict.fromkeys(MEASURED, 0.0)
        self._window_start = self.t0

    @contextlib.contextmanager
    def measure(self, part: str) -> Iterator[None]:
        """Counts the wall time of the ``with`` body as ``part`` (one of :data:`MEASURED`)."""
        if part not in MEASURED:
            raise ValueError(f"unknown part {part!r}; choose one of {MEASURED}")
        t = self.now()
        try:
            yield
        finally:
            dt = self.now() - t
            self._phases[self._phase][part] += dt
            self._window[part] += dt

    def loop_started(self) -> None:
        """The step loop begins: the unmeasured time before it is start-up."""
        self._mark(1)
        self._window_start, self._window = self._marks[-1], dict.fromkeys(MEASURED, 0.0)

    def loop_ended(self) -> None:
        """The step loop is over: the unmeasured time after it is the rest."""
        self._mark(2)

    def _mark(self, phase: int) -> None:
        while self._phase < phase:
            self._marks.append(self.now())
            self._phase += 1

    def window(self, steps: int) -> dict[str, float]:
        """Timing of the ``steps`` steps since the last call (or the loop's start); resets."""
        now = self.now()
        w = self._window
        stepping = now - self._window_start - w["compile"] - w["evaluation"] - w["checkpoint"]
        self._window_start, self._window = now, dict.fromkeys(MEASURED, 0.0)
        steps = max(int(steps), 1)
        return {
            "step_time_s": stepping / steps,
            "data_wait_s": w["input_wait"] / steps,
            "checkpoint_blocking_s": w["checkpoint"],
        }

    def summary(self) -> dict:
        """``wall_s``, ``parts_s`` and ``fractions`` of :data:`PARTS` (adding up to ``wall_s``)
        and ``goodput`` (the fraction in productive steps), up to now."""
        now = self.now()
        edges = [self.t0, *self._marks, now][:4]
        edges += [now] * (4 - len(edges))
        # Before, inside and after the step loop.
        spans = [b - a for a, b in zip(edges, edges[1:], strict=False)]
        parts = {k: sum(p[k] for p in self._phases) for k in MEASURED}
        unmeasured = [span - sum(p.values()) for span, p in zip(spans, self._phases, strict=True)]
        parts["startup"], parts["steps"], parts["rest"] = unmeasured
        wall = now - self.t0
        parts = {k: parts[k] for k in PARTS}
        return {
            "wall_s": wall,
            "parts_s": parts,
            "fractions": {k: (v / wall if wall > 0 else 0.0) for k, v in parts.items()},
            "goodput": parts["steps"] / wall if wall > 0 else 0.0,
        }


def summary_line(summary: dict) -> str:
    """The goodput summary as one log line."""
    parts = ", ".join(
        f"{k.replace('_', ' ')} {v:.1f} s ({summary['fractions'][k]:.0%})"
        for k, v in summary["parts_s"].items()
    )
    return f"goodput {summary['goodput']:.0%} of {summary['wall_s']:.1f} s wall time: {parts}"


def write_summary(workdir: pathlib.Path, summary: dict) -> pathlib.Path:
    """Writes ``summary`` (plus any extra keys the trainer adds) to ``WORKDIR/goodput.json``."""
    path = pathlib.Path(workdir) / GOODPUT_FILE
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def measure_delivery(
    batches: Iterator[dict], n: int = RATE_BATCHES
) -> tuple[Iterator[dict], float]:
    """Images/s this process's input pipeline delivers when drained: ``n`` batches pulled back
    to back (after warm-up, so prefetch buffers hold at most a few of them). Returns an iterator
    that yields those batches and then the rest, in order, and the rate."""
    t = time.perf_counter()
    got = [next(batches) for _ in range(max(int(n), 1))]
    dt = time.perf_counter() - t
    rows = sum(len(b["dataset_id"]) for b in got)
    return itertools.chain(got, batches), rows / dt if dt > 0 else float("inf")
