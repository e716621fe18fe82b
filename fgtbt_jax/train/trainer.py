"""``train_and_evaluate``: the FGTBT training loop (SPEC §6), single- or multi-process.

Every process runs the same code on its share of the data: ``jax.distributed`` joins the
processes into one mesh, and every collective or barrier-bearing call (orbax checkpoint
managers, restores, evaluation, the EMA export's restore) runs on all of them. Process 0 alone
writes the files outside orbax: the JSON-lines metrics, TensorBoard events and the exported
``.pth``.

WORKDIR (local or gs://, see :mod:`fgtbt_jax.paths`) layout: ``checkpoints/`` (orbax; see
:mod:`fgtbt_jax.checkpointing`), ``metrics.jsonl``, ``eval.jsonl``, ``tb/`` (see
:mod:`fgtbt_jax.train.writers`), a profile window's trace in ``plugins/profile/``
(:mod:`fgtbt_jax.train.profiler`) and, at the end, ``config.export_pth`` and ``goodput.json``
(:mod:`fgtbt_jax.train.goodput`; step timing, FLOPs and MFU: docs/observability.md). A rerun
with the same WORKDIR resumes from the latest checkpoint. SIGTERM (preemption) makes every
process save the same step and return :data:`PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath

from fgtbt_jax import checkpointing, errors, landmarks, paths, schemes
from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax.evaluation.evaluator import Evaluator
from fgtbt_jax.models.fgtbt import build_model, init_variables
from fgtbt_jax.ops import resolve_kernels
from fgtbt_jax.train import (
    compile_cache,
    goodput,
    profiler,
    sharding,
    throughput,
    writers,
)
from fgtbt_jax.train import state as train_state
from fgtbt_jax.train import step as train_step
from input_pipeline import sources

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM


def info(message: str) -> None:
    """A progress message: printed by process 0, logged by every process."""
    logging.info(message)
    if jax.process_index() == 0:
        print(message, flush=True)


# ------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Collects per-step metrics (device arrays) and turns them into log lines.

    ``flush`` fetches pending metrics, fails on a non-finite loss and returns the window's
    averages (per-dataset losses over the steps where the dataset was in the batch).
    ``names``: the dataset name of each id (``UnifiedSet.id_names()``; default the four
    built-in datasets).
    """

    def __init__(
        self,
        total_steps: int,
        global_batch: int,
        start_step: int,
        names: tuple[str, ...] = landmarks.DATASETS,
    ) -> None:
        self.total, self.global_batch = total_steps, global_batch
        self.names = names
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
            i = int(np.argmax(bad))
            raise FloatingPointError(
                f"non-finite FMB loss {loss[i]} at step {steps[i]}; "
                f"per-dataset {values[i]['loss_per_dataset']}"
            )
        per = np.stack([v["loss_per_dataset"] for v in values])
        present = np.stack([v["dataset_present"] for v in values])
        out = {"loss": float(loss.mean())}
        for d, name in enumerate(self.names):
            if name and present[:, d].any():
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
        per = " ".join(f"{n} {m['loss_' + n]:.4f}" for n in self.names if n and "loss_" + n in m)
        speed = (
            f"{m['images_per_sec']:.1f} img/s ETA {_eta(m['eta_sec'])}"
            if "images_per_sec" in m
            else "(compiling)"
        )
        timing = ""
        if "step_time_s" in m:
            timing = (
                f" | step {m['step_time_s']:.3f} s, data wait {m['data_wait_s']:.3f} s, "
                f"checkpoint {m['checkpoint_blocking_s']:.2f} s"
            )
            if m.get("tflops_per_device") is not None:
                timing += f", {m['tflops_per_device']:.3g} TFLOP/s/device"
            if m.get("mfu") is not None:
                timing += f", MFU {m['mfu']:.1%}"
        return (
            f"step {step}/{self.total} loss {m['loss']:.4f} [{per}] lr {m['lr']:.3g} {speed}"
            f"{timing}"
        )


def _report_progress(config: ml_collections.ConfigDict, writer: writers.MetricWriter) -> Any:
    """clu's ``ReportProgress`` (steps/s, uptime to TensorBoard; ETA in the work-unit notes)."""
    if writer.writer is None:
        return None
    from clu import periodic_actions

    return periodic_actions.ReportProgress(
        num_train_steps=int(config.total_steps),
        writer=writer.writer,
        every_steps=int(config.log_every),
        every_secs=None,
    )


def _memory_line(compiled: Any) -> str:
    """Per-device bytes of a compiled executable (``memory_analysis()``), or why not."""
    try:
        m = compiled_figures.memory(compiled)
    except compiled_figures.Unavailable as e:
        return str(e)
    parts = " ".join(f"{k} {m[k] / 2**20:.1f} MiB" for k in ("argument", "output", "temp", "alias"))
    return f"train step memory per device: {parts}, total {m['total'] / 2**20:.1f} MiB"


def _compile(
    step_fn: Any,
    state: Any,
    batch: dict,
    clock: goodput.Clock,
    mesh: jax.sharding.Mesh,
    config: ml_collections.ConfigDict,
) -> tuple[Any, throughput.StepCost]:
    """Compiles the train step once (timed as ``compile``) and logs its memory and FLOPs."""
    t = time.perf_counter()
    with clock.measure("compile"), compile_cache.CacheHits() as hits:
        compiled = step_fn.lower(state, batch).compile()
    info(f"compiled the train step in {time.perf_counter() - t:.1f} s")
    if config.get("compilation_cache_dir"):
        how = "loaded from" if hits.count else "compiled, not found in"
        info(f"train step {how} the compilation cache")
    info(_memory_line(compiled))
    cost = throughput.StepCost.of(
        compiled,
        devices=mesh.size,
        global_batch=int(batch["dataset_id"].shape[0]),
        device_kind=mesh.devices.flat[0].device_kind,
        dtype=str(config.model.dtype),
    )
    info(cost.line())
    return compiled, cost


def _log_input_rate(delivered: float, rows: int, window: dict[str, float]) -> None:
    """Logs (every process) the images/s this process's input pipeline delivers and the rate
    its share of the step consumes, once after warm-up."""
    consumed = rows / window["step_time_s"] if window["step_time_s"] > 0 else float("inf")
    verdict = "keeps up" if delivered >= consumed else "STARVES the step"
    message = (
        f"input pipeline of process {jax.process_index()}: delivers {delivered:.1f} images/s "
        f"({goodput.RATE_BATCHES} batches drained), the step consumes {consumed:.1f} images/s "
        f"({rows} per step per process): {verdict}"
    )
    info(message)
    if delivered < consumed:
        logging.warning(message)  # on every process, whatever the verbosity


class BatchShapeError(ValueError):
    """The global batch cannot be split over the mesh (the message says what to set)."""


def check_batch(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> int:
    """The global batch size; raises :class:`BatchShapeError` unless it splits evenly over the
    mesh's devices and the processes, naming the smallest ``data.batch_per_dataset`` that does.
    """
    global_batch = sources.global_batch_size(config)
    per_dataset = int(config.data.batch_per_dataset)
    num_datasets = global_batch // max(per_dataset, 1)
    n = math.lcm(mesh.size, jax.process_count())
    if global_batch and global_batch % n == 0:
        return global_batch
    step = n // math.gcd(num_datasets, n)  # batch_per_dataset must be a multiple of this
    fix = max(step, -(-per_dataset // step) * step)
    raise BatchShapeError(
        f"the global batch of {global_batch} images (data.batch_per_dataset={per_dataset} × "
        f"{num_datasets} datasets) cannot split evenly over the {mesh.size} devices of the "
        f"mesh ({jax.process_count()} process(es)); set --config.data.batch_per_dataset={fix} "
        f"(a multiple of {step}), or fewer devices with --config.sharding.num_devices"
    )


# ------------------------------------------------------------------------------------------
# Initialisation
# ------------------------------------------------------------------------------------------


def _widened_checkpoint(config: ml_collections.ConfigDict) -> dict:
    """``config.init_checkpoint`` for a head wider than 124 channels: a 124-channel checkpoint
    (the released model) widened by :func:`fgtbt_jax.schemes.extend_head` (report logged), or
    one that already has the config's channels (e.g. an earlier run's export)."""
    from fgtbt_jax.porting import convert, pretrained

    narrow = ml_collections.ConfigDict(config.to_dict())
    narrow.model.num_landmarks = landmarks.NUM_UNIFIED
    try:
        _, variables = pretrained.load_pretrained(
            config.init_checkpoint, narrow, "config.init_checkpoint"
        )
    except convert.CheckpointMismatchError:
        _, variables = pretrained.load_pretrained(
            config.init_checkpoint, config, "config.init_checkpoint"
        )
        logging.info("initialised from %s", config.init_checkpoint)
        return variables
    unified = schemes.unified_set_of(config.data)
    variables, report = schemes.extend_head(variables, unified, seed=int(config.seed))
    info(
        f"head extended from {landmarks.NUM_UNIFIED} to {unified.num_channels} channels "
        f"({config.init_checkpoint}):\n{report.table()}"
    )
    return variables


def initial_variables(config: ml_collections.ConfigDict, model: Any) -> dict | None:
    """Variables from ``config.init_checkpoint`` / ``config.init_backbone``, or None (random)."""
    from fgtbt_jax.porting import convert, pretrained, pth

    if config.init_checkpoint and config.init_backbone:
        raise errors.ConfigError(
            "set at most one of config.init_checkpoint and config.init_backbone"
        )
    if config.init_checkpoint:
        if int(config.model.num_landmarks) > landmarks.NUM_UNIFIED:
            return _widened_checkpoint(config)
        _, variables = pretrained.load_pretrained(
            config.init_checkpoint, config, "config.init_checkpoint"
        )
        logging.info("initialised from %s", config.init_checkpoint)
        return variables
    if config.init_backbone:
        init_key, _ = train_state.seed_keys(int(config.seed))
        variables = init_variables(model, init_key, int(config.img_size))
        path = paths.checkpoint(config.init_backbone, "config.init_backbone")
        state_dict = convert.state_dict_from_release(pth.load_pth(path), config.init_backbone)
        variables, report = convert.import_partial(
            variables, state_dict, model, int(config.img_size)
        )
        info(f"backbone import from {config.init_backbone}:\n{report.table()}")
        return variables
    return None


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------


def check_paths(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> epath.Path:
    """The workdir as an ``epath.Path``; unsupported schemes of any run path refused at once."""
    for flag, value, hub in (
        ("config.init_checkpoint", config.init_checkpoint, True),
        ("config.init_backbone", config.init_backbone, True),
        ("config.compilation_cache_dir", config.get("compilation_cache_dir", ""), False),
    ):
        paths.check(value, flag, hub=hub)
    paths.run_data_dir(config.data)  # gs://: staged to config.data.stage_dir
    return paths.resolve(workdir, "--workdir")


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, build: Callable = build_model
) -> int:
    """Trains to ``config.total_steps`` (resuming from WORKDIR); returns the process exit code.

    0 when done (EMA weights exported if ``config.export_pth``), :data:`PREEMPTED_EXIT_CODE`
    after a preemption save. ``build(model_config, stat_groups=…)`` makes the network (tests
    pass a small stand-in). Call it on every process of a multi-process job.
    """
    clock = goodput.Clock()
    workdir = check_paths(config, workdir)
    unified = schemes.configure(config)  # model.num_landmarks follows the run's datasets
    if config.get("compilation_cache_dir"):
        info(f"compilation cache: {compile_cache.enable(config.compilation_cache_dir)}")
    total = int(config.total_steps)
    # Mesh first: a batch that cannot split over it fails before any data or model work.
    mesh = sharding.make_mesh(int(config.sharding.num_devices) or None)
    global_batch = check_batch(config, mesh)
    profile = profiler.ProfileWindow(config, workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
    data = sources.create(config)  # prepared: process 0 first, then the others

    # Model. stat_groups = devices: per-device BatchNorm/CSAM statistics like the
    # reference's unsynchronised data parallelism; 1: statistics over the whole global batch.
    cross = bool(config.sharding.cross_device_stats)
    model = build(config.model, stat_groups=1 if cross else mesh.size)
    init_model = build(config.model)
    tx, schedule = train_state.make_optimizer(config)
    abstract = train_state.abstract_train_state(config, init_model, tx, mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    # State: the latest checkpoint, else a jitted sharded init (shapes from jax.eval_shape).
    datasets = unified.datasets
    ckpt = checkpointing.Checkpointer(
        workdir, keep=int(config.keep_checkpoints), best_metrics=[f"nme_{n}" for n in datasets]
    )
    if ckpt.latest_step() is not None:
        state = ckpt.restore(abstract)
    else:
        variables = initial_variables(config, init_model)
        state, _ = train_state.create_train_state(config, init_model, tx, mesh, variables=variables)
    start = int(jax.device_get(state.step))
    info(
        f"{'resuming at' if start else 'starting'} step {start}/{total} on {mesh.size} "
        f"device(s), {jax.process_count()} process(es); mesh {dict(mesh.shape)} of "
        f"{mesh.devices.flat[0].platform} devices; batch {global_batch} "
        f"({global_batch / mesh.size:g} per device); "
        f"{'FSDP' if config.sharding.fsdp else 'data-parallel, replicated'} parameters; "
        f"{'cross-device' if cross else 'per-device'} batch statistics; "
        f"model.kernels {resolve_kernels(config.model.kernels)}"
    )

    writer = writers.MetricWriter(workdir, start, tensorboard=config.get("tensorboard", True))
    report_progress = _report_progress(config, writer)
    evaluator = Evaluator(config, build, data) if int(config.eval_every) > 0 else None

    def evaluate(step: int) -> dict[str, float] | None:
        """Evaluation on every process (collective); logged by process 0."""
        every_all = int(config.eval_all_every)
        if step == 0 or step == total or (every_all and step % every_all == 0):
            names = datasets
        else:
            names = ("300W",) if "300W" in datasets else datasets
        jax.block_until_ready(state)  # the step's own time is not evaluation
        with clock.measure("evaluation"):
            metrics = evaluator(state.ema_variables(), names)
        if metrics is not None:
            writer.write_eval(step, metrics)
            nme = " ".join(f"{n} {metrics[f'nme_{n}']:.4f}" for n in names if f"nme_{n}" in metrics)
            info(f"eval step {step}: NME (reference protocol, inter-ocular) {nme}")
        return metrics

    def save(metrics: dict[str, float] | None) -> None:
        """Starts an asynchronous save; only the blocking part is timed as checkpointing."""
        jax.block_until_ready(state)
        with clock.measure("checkpoint"):
            ckpt.save(state, config=config, metrics=metrics)

    if start == 0 and evaluator is not None:
        eval_metrics = evaluate(0)  # the random (or imported) initialisation as a baseline
        if eval_metrics is not None:
            save(eval_metrics)

    step_fn = train_step.jit_train_step(
        train_step.make_train_step(model, tx, schedule, config), shardings, mesh
    )

    def global_batch_at(local: dict) -> dict[str, jax.Array]:
        if not cross:  # each device's slice then mixes the datasets
            local = train_step.interleave_datasets(local)
        return sharding.shard_batch({k: local[k] for k in train_step.BATCH_KEYS}, mesh)

    progress = Progress(total, global_batch, start, unified.id_names())
    batches = data.train_iterator(start) if start < total else iter(())
    compiled = cost = None
    window_steps, rate_logged = 0, False
    exit_code = 0
    clock.loop_started()
    with checkpointing.PreemptionHandler() as preemption, profile:
        for step in range(start + 1, total + 1):
            if compiled is not None:
                profile.before_step(step, state)
            with clock.measure("input_wait"):
                local = next(batches)
            batch = global_batch_at(local)
            if compiled is None:  # compile once, report what it needs, train with it
                compiled, cost = _compile(step_fn, state, batch, clock, mesh, config)
                profile.before_step(step, state)
            state, metrics = compiled(state, batch)
            window_steps += 1
            if profile.after_step(step, (state, metrics)):
                info(f"profiled steps {profile.first}-{step} into {profile.runs()[-1]}")
            progress.add(step, metrics)
            if report_progress is not None:
                report_progress(step)

            preempted = preemption.should_stop(step)
            if step % int(config.log_every) == 0 or step in (start + 1, total) or preempted:
                values = progress.flush()
                values.update(clock.window(window_steps))
                values.update(cost.window(values["step_time_s"]))
                window_steps = 0
                writer.write_train(step, values)
                info(progress.line(step, values))
                if not rate_logged and start + 1 < step < total and not preempted:
                    rate_logged = True  # once, after the warm-up window
                    with clock.measure("input_wait"):
                        batches, delivered = goodput.measure_delivery(
                            batches, min(goodput.RATE_BATCHES, total - step)
                        )
                    _log_input_rate(delivered, len(local["dataset_id"]), values)
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
                save(eval_metrics)
            if preempted:
                with clock.measure("checkpoint"):
                    ckpt.wait()
                info(f"preempted: saved step {step}; rerun to resume")
                exit_code = PREEMPTED_EXIT_CODE
                break
    clock.loop_ended()

    with clock.measure("checkpoint"):
        ckpt.close()  # waits until every save is committed
    if exit_code == 0 and config.export_pth:
        from fgtbt_jax.porting import pretrained

        # All processes restore (orbax barriers); process 0 writes the file.
        path = workdir / config.export_pth
        step = pretrained.export_ema_pth(workdir, path, config)
        info(f"exported EMA weights of step {step} to {path}")
    summary = clock.summary()
    if cost is not None:
        summary["train_step"] = cost.record()
    info(("preempted, " if exit_code else "") + goodput.summary_line(summary))
    if jax.process_index() == 0:
        goodput.write_summary(workdir, summary)
    writer.close()
    return exit_code
