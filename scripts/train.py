r"""Trains FGTBT (SPEC §6) on one CPU, a GPU/TPU host or a multi-host mesh.

  python scripts/train.py --config configs/fgtbt.py:tiny --workdir /tmp/fgtbt_tiny
  python scripts/train.py --config configs/fgtbt.py:release --workdir gs://… \
      --config.init_backbone=mit_b4.pth

Any config field can be overridden (``--config.optim.lr=1e-4``). ``--config.data.source``:
``demo`` (default; the bundled synthetic face set, prepared on first use), ``official`` (TFDS
datasets of the official files) or ``synthetic`` (in-memory batches, no TensorFlow).

WORKDIR receives ``checkpoints/`` (orbax; running again with the same WORKDIR resumes from the
latest one: step, optimizer, EMA, RNG and data position), ``metrics.jsonl`` (one JSON object
per logged step), ``eval.jsonl``, TensorBoard events in ``tb/`` and, at the end, the EMA
weights as a release-layout ``.pth`` (``config.export_pth``). SIGTERM (preemption) saves a
checkpoint and exits with status 143.

Multi-host: every host runs this script; ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and
``JAX_PROCESS_ID`` (or a Slurm / TPU environment) make it call ``jax.distributed.initialize()``.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from fgtbt_jax import landmarks
from fgtbt_jax.evaluation.evaluator import Evaluator
from fgtbt_jax.models.fgtbt import build_model, enable_x64_if_requested, init_variables  # noqa: E402
from fgtbt_jax.ops import resolve_kernels  # noqa: E402
from fgtbt_jax.porting import convert, pretrained, pth
from fgtbt_jax.train import checkpointing, sharding, synthetic
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM


def info(message: str) -> None:
    """A progress message, printed by process 0 only."""
    if jax.process_index() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------
# Data and evaluation sources
# ------------------------------------------------------------------------------------------


def train_batches(config: ml_collections.ConfigDict, start_step: int) -> Iterator[dict]:
    """This process's rows of the global batches of steps ``start_step, start_step + 1, …``."""
    kwargs = dict(
        seed=int(config.seed),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        start_step=start_step,
    )
    if config.data.source == "synthetic":
        return synthetic.make_train_iterator(config, **kwargs)
    from input_pipeline import pipeline

    if config.data.source == "demo":
        pipeline.ensure_demo_data(config)
    return pipeline.make_train_iterator(config, **kwargs)


# ------------------------------------------------------------------------------------------
# Logging
# ------------------------------------------------------------------------------------------


class TensorBoard:
    """Scalar TensorBoard event files through TensorFlow's core ``tf.summary.write``.

    (``tf.summary.scalar`` and ``flax.metrics.tensorboard`` need the separate ``tensorboard``
    package; the core op writes the same ``scalars``-plugin events.)
    """

    def __init__(self, logdir: pathlib.Path) -> None:
        import tensorflow as tf
        from tensorflow.core.framework import summary_pb2

        tf.config.set_visible_devices([], "GPU")  # TF must not claim accelerator memory
        self.tf = tf
        self.writer = tf.summary.create_file_writer(str(logdir))
        self.metadata = summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
        )

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        with self.writer.as_default():
            for key, value in values.items():
                tensor = self.tf.constant(value, self.tf.float32)
                self.tf.summary.write(prefix + key, tensor, step=step, metadata=self.metadata)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsLog:
    """metrics.jsonl / eval.jsonl and TensorBoard on process 0; resumed logs are truncated."""

    def __init__(self, workdir: pathlib.Path, start_step: int) -> None:
        self.enabled = jax.process_index() == 0
        self.train_path = workdir / "metrics.jsonl"
        self.eval_path = workdir / "eval.jsonl"
        self.writer = None
        if not self.enabled:
            return
        for path in (self.train_path, self.eval_path):  # drop lines past the restored step
            if path.exists():
                lines = [x for x in path.read_text().splitlines() if x.strip()]
                kept = [x for x in lines if json.loads(x)["step"] <= start_step]
                path.write_text("".join(x + "\n" for x in kept))
        self.writer = TensorBoard(workdir / "tb")

    def write(self, path: pathlib.Path, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        self.writer.scalars(step, values, "" if path == self.train_path else "eval/")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Collects per-step metrics (device arrays) and turns them into log lines.

    ``flush`` fetches pending metrics, fails on a non-finite loss and returns the window's
    averages (per-dataset losses over the steps where the dataset was in the batch).
    """

    def __init__(self, total_steps: int, global_batch: int, start_step: int) -> None:
        self.total, self.global_batch = total_steps, global_batch
        self.pending: list[tuple[int, dict]] = []
        self.t_last, self.step_last = None, start_step

    def add(self, step: int, metrics: dict) -> None:
        self.pending.append((step, metrics))

    def flush(self) -> dict[str, float] | None:
        if not self.pending:
            return None
        steps = [s for s, _ in self.pending]
        values = jax.device_get([m for _, m in self.pending])
        self.pending = []
        loss = np.array([v["loss"] for v in values])
        bad = ~np.isfinite(loss)
        if bad.any():
            step = steps[int(np.argmax(bad))]
            raise FloatingPointError(
                f"non-finite FMB loss {loss[bad][0]} at step {step}; "
                f"per-dataset {values[int(np.argmax(bad))]['loss_per_dataset']}"
            )
        per = np.stack([v["loss_per_dataset"] for v in values])
        present = np.stack([v["dataset_present"] for v in values])
        out = {"loss": float(loss.mean())}
        for d, name in enumerate(landmarks.DATASETS):
            if present[:, d].any():
                out[f"loss_{name}"] = float(per[present[:, d], d].mean())
        out["lr"] = float(values[-1]["lr"])
        out["grad_norm"] = float(np.mean([v["grad_norm"] for v in values]))
        now, step = time.time(), steps[-1]
        if self.t_last is not None and step > self.step_last:
            sec_per_step = (now - self.t_last) / (step - self.step_last)
            out["images_per_sec"] = self.global_batch / sec_per_step
            out["eta_sec"] = sec_per_step * (self.total - step)
        self.t_last, self.step_last = now, step
        return out

    def line(self, step: int, m: dict[str, float]) -> str:
        per = " ".join(f"{n} {m['loss_' + n]:.4f}" for n in landmarks.DATASETS if "loss_" + n in m)
        speed = (
            f"{m['images_per_sec']:.1f} img/s ETA {_eta(m['eta_sec'])}"
            if "images_per_sec" in m
            else "(compiling)"
        )
        return f"step {step}/{self.total} loss {m['loss']:.4f} [{per}] lr {m['lr']:.3g} {speed}"


# ------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------


def initial_variables(config: ml_collections.ConfigDict, model: Any) -> dict | None:
    """Variables from ``config.init_checkpoint`` / ``config.init_backbone``, or None (random)."""
    if config.init_checkpoint and config.init_backbone:
        raise ValueError("set at most one of config.init_checkpoint and config.init_backbone")
    if config.init_checkpoint:
        _, variables = pretrained.load_pretrained(config.init_checkpoint, config)
        logging.info("initialised from %s", config.init_checkpoint)
        return variables
    if config.init_backbone:
        init_key, _ = train_state.seed_keys(int(config.seed))
        variables = jax.jit(lambda key: init_variables(model, key, int(config.img_size)))(init_key)
        state_dict = convert.state_dict_from_release(
            pth.load_pth(config.init_backbone), config.init_backbone
        )
        variables, report = convert.import_partial(
            variables, state_dict, model, int(config.img_size)
        )
        info(f"backbone import from {config.init_backbone}:\n{report.table()}")
        return variables
    return None


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, build: Callable = build_model
) -> int:
    """Trains to ``config.total_steps`` (resuming from WORKDIR); returns the process exit code.

    ``build(model_config, stat_groups=…)`` makes the network (tests pass a small stand-in).
    """
    workdir_path = pathlib.Path(workdir).absolute()
    if jax.process_index() == 0:
        workdir_path.mkdir(parents=True, exist_ok=True)
    total = int(config.total_steps)

    mesh = sharding.make_mesh(int(config.sharding.get("num_devices", 0)) or None)
    cross = bool(config.sharding.cross_device_stats)
    # stat_groups = devices: per-device BatchNorm/CSAM statistics like the reference's
    # unsynchronised data parallelism; 1: statistics over the whole global batch.
    model = build(config.model, stat_groups=1 if cross else mesh.size)
    logging.info("model.kernels: %s", resolve_kernels(config.model.kernels))
    init_model = build(config.model)
    tx, schedule = train_state.make_optimizer(config)
    abstract = train_state.abstract_train_state(config, init_model, tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    datasets = tuple(n for n in landmarks.DATASETS if n in set(config.data.datasets))
    ckpt = checkpointing.Checkpointer(
        workdir_path,
        keep=int(config.keep_checkpoints),
        best_metrics=[f"nme_{n}" for n in datasets],
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract)
        logging.info("resumed from step %d of %s", int(state.step), ckpt.directory)
    else:
        variables = initial_variables(config, init_model)
        state, _ = train_state.create_train_state(config, init_model, tx, mesh, variables=variables)
    start = int(jax.device_get(state.step))
    info(
        f"{'resuming at' if start else 'starting'} step {start}/{total} on {mesh.size} "
        f"device(s), {jax.process_count()} process(es); "
        f"{'cross-device' if cross else 'per-device'} batch statistics"
    )

    log = MetricsLog(workdir_path, start)
    evaluator = Evaluator(config, build) if int(config.eval_every) > 0 else None

    def evaluate(step: int) -> dict[str, float] | None:
        if evaluator is None:
            return None
        every_all = int(config.get("eval_all_every", 0))
        if step == 0 or step == total or (every_all and step % every_all == 0):
            names = datasets
        else:
            names = ("300W",) if "300W" in datasets else datasets
        metrics = evaluator(state.ema_variables(), names)
        if metrics is not None:
            log.write(log.eval_path, step, metrics)
            nme = " ".join(f"{n} {metrics[f'nme_{n}']:.4f}" for n in names if f"nme_{n}" in metrics)
            info(f"eval step {step}: NME (reference protocol, inter-ocular) {nme}")
        return metrics

    if start == 0:
        eval_metrics = evaluate(0)  # the random (or imported) initialisation as a baseline
        if eval_metrics is not None:
            ckpt.save(state, config=config, metrics=eval_metrics)

    step_fn = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, config), shardings, mesh
    )
    global_batch = len(synthetic.dataset_ids(config))
    progress = Progress(total, global_batch, start)
    batches = train_batches(config, start) if start < total else iter(())
    exit_code = 0
    with checkpointing.PreemptionHandler() as preemption:
        for step in range(start + 1, total + 1):
            local = next(batches)
            if not cross:  # each device's slice then mixes the datasets
                local = train_step.interleave_datasets(local)
            batch = sharding.shard_batch({k: local[k] for k in train_step.BATCH_KEYS}, mesh)
            state, metrics = step_fn(state, batch)
            progress.add(step, metrics)

            preempted = preemption.should_stop(step)
            if step % int(config.log_every) == 0 or step in (start + 1, total) or preempted:
                values = progress.flush()
                log.write(log.train_path, step, values)
                info(progress.line(step, values))
            eval_metrics = None
            if evaluator is not None and (step % int(config.eval_every) == 0 or step == total):
                eval_metrics = evaluate(step)
            if (
                step % int(config.checkpoint_every) == 0
                or step == total
                or preempted
                or eval_metrics is not None
            ):
                progress.flush()  # never checkpoint a state whose loss went non-finite
                ckpt.save(state, config=config, metrics=eval_metrics)
            if preempted:
                ckpt.wait()
                info(f"preempted: saved step {step}; rerun to resume")
                exit_code = PREEMPTED_EXIT_CODE
                break

    ckpt.close()
    if exit_code == 0 and config.get("export_pth") and jax.process_index() == 0:
        path = workdir_path / config.export_pth
        step = pretrained.export_ema_pth(workdir_path, path, config)
        info(f"exported EMA weights of step {step} to {path}")
    log.close()
    return exit_code


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    sharding.maybe_initialize_distributed()  # before any other JAX call
    enable_x64_if_requested(_CONFIG.value.model)  # before any array is created
    code = train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    if code:
        sys.exit(code)


if __name__ == "__main__":
    app.run(main)
