"""Training checkpoints (orbax ``CheckpointManager``), preemption handling and EMA export.

Layout of a training workdir::

    WORKDIR/checkpoints/<step>/state   step, params, batch_stats, opt_state, rng
    WORKDIR/checkpoints/<step>/ema     {'params', 'batch_stats'}: the EMA weights
    WORKDIR/checkpoints/<step>/meta    JSON: step, config
    WORKDIR/checkpoints/<step>/metrics JSON: evaluation metrics of that step (when evaluated)

Saves are asynchronous (the arrays are copied on the device first, so the next training step
may donate the live state). Orbax writes each step into a temporary directory and renames it
when complete, so an interrupted save leaves the previous checkpoints intact and is ignored
(and removed) on the next start. Retention keeps the last ``keep`` steps plus, for every
``best_metrics`` entry, the step with the lowest value of that metric (e.g. per-dataset NME).
"""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from fgtbt_jax import paths

if TYPE_CHECKING:  # the trainer's state type; imported only by type checkers (layering)
    from fgtbt_jax.train.state import TrainState

PyTree = Any

CHECKPOINT_DIR = "checkpoints"
_STATE_FIELDS = ("step", "params", "batch_stats", "opt_state", "rng")


def checkpoint_dir(workdir: str | os.PathLike) -> epath.Path:
    """``WORKDIR/checkpoints`` (or ``workdir`` itself if it is already such a directory);
    local or gs://."""
    path = paths.resolve(workdir, "--workdir")
    return path if path.name == CHECKPOINT_DIR else path / CHECKPOINT_DIR


def _metric(metrics: Mapping[str, Any] | None, name: str) -> float:
    if not metrics or name not in metrics or metrics[name] is None:
        return math.inf
    value = float(metrics[name])
    return value if math.isfinite(value) else math.inf


class Checkpointer:
    """Saves and restores :class:`TrainState` s of one training workdir.

    Args:
      workdir: the training workdir (checkpoints go to ``workdir/checkpoints``).
      keep: number of most recent checkpoints kept.
      best_metrics: metric names (lower is better) whose best checkpoint is kept as well.
      async_save: write in a background thread (``wait()`` / ``close()`` join it).
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        keep: int = 3,
        best_metrics: Sequence[str] = (),
        async_save: bool = True,
    ) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = checkpoint_dir(workdir)
        policies: list[Any] = [checkpoint_managers.LatestN(n=keep)]
        # Lowest value per metric; steps without it count as +inf (sorted first, never kept
        # over a finite value; if none has it, the newest step, which LatestN keeps anyway).
        policies += [
            checkpoint_managers.BestN(
                get_metric_fn=functools.partial(_metric, name=name),
                reverse=True,
                n=1,
                keep_checkpoints_without_metrics=False,
            )
            for name in best_metrics
        ]
        primary = best_metrics[0] if best_metrics else None
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=1,  # the training loop decides when to save
            preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
            # Metrics are only written when a best_fn is set; it also defines best_step().
            best_fn=(lambda m: _metric(m, primary)) if primary else None,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "ema", "meta"), options=options
        )

    # ---------------------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(
        self,
        state: TrainState,
        *,
        config: ml_collections.ConfigDict | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> bool:
        """Starts saving ``state`` at step ``state.step``; returns False if that step exists.

        Blocks only while the arrays are copied; the write continues in the background.
        ``metrics`` (floats, lower is better for the ``best_metrics``) are stored with it.
        """
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps():
            return False
        # Private device copies: the caller may donate ``state`` to the next training step
        # while the background write still reads these buffers. One batched transfer with
        # the same shardings (a per-leaf ``x.copy()`` dispatches and compiles per leaf shape).
        state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state), may_alias=False)
        meta = {"step": step}
        if config is not None:
            meta["config"] = json.loads(config.to_json_best_effort())
        saved = self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave({k: getattr(state, k) for k in _STATE_FIELDS}),
                ema=ocp.args.StandardSave(state.ema_variables()),
                meta=ocp.args.JsonSave(meta),
            ),
            # Always a dict: orbax warns about checkpoints without metrics when tracking best.
            metrics=dict(metrics) if metrics is not None else {},
            force=True,
        )
        return bool(saved)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
        """The state saved at ``step`` (default: latest), laid out like ``abstract_state``.

        ``abstract_state`` is a tree of ``jax.ShapeDtypeStruct`` with shardings
        (:func:`fgtbt_jax.train.state.abstract_train_state`).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        abstract = {k: getattr(abstract_state, k) for k in _STATE_FIELDS}
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                ema=ocp.args.StandardRestore(abstract_state.ema_variables()),
            ),
        )
        ema = restored["ema"]
        return type(abstract_state)(
            **restored["state"], ema_params=ema["params"], ema_batch_stats=ema["batch_stats"]
        )

    def metrics(self, step: int) -> dict[str, Any] | None:
        m = self.manager.metrics(step)
        return dict(m) if m is not None else None

    def wait(self) -> None:
        """Blocks until pending saves are written (and old checkpoints deleted)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


READ_ONLY = ocp.CheckpointManagerOptions(
    read_only=True, save_interval_steps=0, create=False, enable_async_checkpointing=False
)


def _with_sharding(tree: PyTree) -> PyTree:
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(x, "sharding", None) or device
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(leaf, tree)


def restore_eval_variables(
    workdir: str | os.PathLike, abstract_variables: PyTree, step: int | None = None
) -> dict[str, PyTree]:
    """The EMA variables ``{'params', 'batch_stats'}`` of a training workdir's checkpoint.

    ``abstract_variables``: shapes/dtypes (e.g. ``porting.abstract_variables``); leaves without
    a sharding are restored onto the first local device. ``step`` defaults to the latest.
    """
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no training checkpoints under {workdir}")
    with ocp.CheckpointManager(directory, item_names=("ema",), options=READ_ONLY) as manager:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {directory}")
        target = _with_sharding(dict(abstract_variables))
        restored = manager.restore(
            step, args=ocp.args.Composite(ema=ocp.args.StandardRestore(target))
        )
    return dict(restored["ema"])


class PreemptionHandler:
    """Turns SIGTERM (preemption) into a flag the training loop polls between steps.

    Single process: the handler sets the flag. Multi-process: every process must save at the
    same step, so the decision comes from JAX's preemption sync point (the coordination
    service propagates the notice to all processes). Use as a context manager; the previous
    handler is restored on exit.
    """

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,)) -> None:
        self.signals = tuple(signals)
        self._event = threading.Event()
        self._previous: dict[int, Any] = {}
        self.multi_process = jax.process_count() > 1

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self._event.set()
        self.signum = signum

    def __enter__(self) -> PreemptionHandler:
        if not self.multi_process and threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()

    def trigger(self) -> None:
        """Requests a stop as if a signal had arrived (tests, custom stop conditions)."""
        self._event.set()

    def should_stop(self, step: int) -> bool:
        """True once a preemption notice arrived (all processes agree on the step)."""
        if self.multi_process:
            return ocp.multihost.reached_preemption(step) or self._event.is_set()
        return self._event.is_set()
