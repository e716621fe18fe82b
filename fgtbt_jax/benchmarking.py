"""Throughput benchmark cases: FGTBT's train / eval steps in JAX, PyTorch (eager or
``torch.compile``) and onnxruntime, each measured the same way in a process of its own.

A case is a :class:`Spec` (framework × mode × the config's shapes). :func:`run_case` prepares
the framework's step (:data:`PREPARE`: one function per framework, all returning a
:class:`Prepared`), runs ``warmup`` untimed and ``steps`` timed synchronised steps and returns
one row (:func:`row`): ``images_per_sec`` = batch / median step time, compile time, peak memory
and where it was read, the framework's extras (device, FLOP count, resolved ``kernels``).
:func:`run_isolated` runs a case in a fresh ``spawn`` process (frameworks share neither thread
pools nor the memory high-water mark) and returns its row, or a row with ``error``.
:func:`measure_jax_matmul_peak` gives the float32 GEMM rate that the JAX rows' MFU refers to.

Modes: ``train`` (forward in train mode, FMB loss, backward, AdamW, EMA: the training step of
:mod:`fgtbt_jax.train.step`, and the same step in PyTorch, ``benchmarks.torch_oracle.loss``),
``eval`` (forward + arg-max decoding, :mod:`fgtbt_jax.evaluation.decoding`) and ``eval_flip``
(with the test-time flip: two forward passes). Data: the synthetic faces of
``input_pipeline.synthetic.mixed_batch`` at the configured shapes; random parameters (the speed
does not depend on their values).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import statistics
import time
import traceback
from collections.abc import Callable
from typing import Any

from ml_collections import ConfigDict

from fgtbt_jax import compiled as compiled_figures
from input_pipeline import synthetic

FRAMEWORKS = ("jax", "torch-eager", "torch-compile", "onnxruntime")
MODES = ("train", "eval", "eval_flip")

Spec = dict[str, Any]
"""One case: ``framework``, ``mode``, ``config_json`` (the config, overrides included),
``preset``, ``img_size``, ``batch``, ``dtype``, ``devices`` (JAX; None = all), ``threads``,
``steps``, ``warmup``, ``remat``."""


class Unsupported(Exception):
    """The framework cannot run this case (e.g. onnxruntime and ``train``)."""


@dataclasses.dataclass
class Prepared:
    """A framework's compiled step for one case, ready to be timed.

    ``step()`` runs one step and returns what ``sync`` waits for; ``rss0`` is the process's
    RSS once the framework was imported, before the model existed; ``memory(rss_growth)``
    (called after the timed steps with the peak RSS minus ``rss0``) gives ``(peak bytes,
    where it was read)``; ``fields`` go into the row.
    """

    step: Callable[[], Any]
    sync: Callable[[Any], Any]
    compile_seconds: float | None
    rss0: int
    memory: Callable[[int], tuple[int | None, str | None]]
    fields: dict[str, Any]


def config_from_spec(spec: Spec) -> ConfigDict:
    """The case's configuration (``--config`` with its overrides, as JSON in the spec)."""
    return ConfigDict(json.loads(spec["config_json"]))


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _timed_loop(run_step, sync, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        sync(run_step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(run_step())
        times.append(time.perf_counter() - t0)
    return times


def row(spec: Spec, **fields: Any) -> dict:
    """One result row: the spec's identity fields plus the measured ones."""
    step_seconds = fields.get("step_seconds") or []
    out = {
        "framework": spec["framework"],
        "mode": spec["mode"],
        "preset": spec["preset"],
        "img_size": spec["img_size"],
        "batch": spec["batch"],
        "dtype": spec["dtype"],
        "kernels": None,  # model.kernels as resolved (JAX rows)
        "devices": spec.get("devices", 1),
        "threads": spec["threads"],
        "images_per_sec": None,
        "images_per_sec_mean": None,
        "compile_seconds": None,
        "peak_memory_bytes": None,
        "memory_source": None,
        "peak_rss_delta_bytes": None,
        "step_seconds": step_seconds,
        "warmup": spec["warmup"],
    }
    out.update(fields)
    if step_seconds:
        out["images_per_sec"] = spec["batch"] / statistics.median(step_seconds)
        out["images_per_sec_mean"] = spec["batch"] * len(step_seconds) / sum(step_seconds)
    return out


def _jax_memory(compiled: Any, device: Any) -> tuple[int | None, str | None]:
    stats = None
    with contextlib.suppress(Exception):
        stats = device.memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "device.memory_stats:peak_bytes_in_use"
    with contextlib.suppress(compiled_figures.Unavailable):
        total = compiled_figures.memory(compiled)["total"]
        return total, "xla.memory_analysis:temp+argument+output-alias"
    return None, None


def prepare_jax(spec: Spec) -> Prepared:
    """The trainer's train step (sharded over ``devices``) or the evaluator's eval step."""
    import jax

    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.models.fgtbt import build_model, enable_x64_if_requested, init_variables
    from fgtbt_jax.train import sharding
    from fgtbt_jax.train import state as train_state
    from fgtbt_jax.train import step as train_step

    rss0 = _current_rss()
    config = config_from_spec(spec)
    enable_x64_if_requested(config.model)  # before any array is created
    mesh = sharding.make_mesh(spec.get("devices") or None)
    model = build_model(config.model)
    batch_np = synthetic.mixed_batch(spec["batch"], config.img_size, config.heatmap_size)
    device = mesh.devices.flat[0]

    t0 = time.perf_counter()
    if spec["mode"] == "train":
        tx, schedule = train_state.make_optimizer(config)
        state, shardings = train_state.create_train_state(config, model, tx, mesh)
        batch = jax.device_put(batch_np, train_step.batch_sharding(mesh))
        jitted = train_step.jit_train_step(
            train_step.make_train_step(model, tx, schedule, config), shardings, mesh
        )
        t1 = time.perf_counter()
        compiled = jitted.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - t1
        holder = {"state": state}

        def step():
            holder["state"], metrics = compiled(holder["state"], batch)
            return holder["state"], metrics

    else:
        variables = init_variables(model, jax.random.PRNGKey(0), config.img_size)
        rep = sharding.replicated(mesh)
        variables = jax.device_put(variables, rep)
        images = jax.device_put(batch_np["image"], sharding.data_sharding(mesh))
        fn = decoding.make_eval_step(model, flip_test=spec["mode"] == "eval_flip")
        jitted = jax.jit(fn, in_shardings=(rep, sharding.data_sharding(mesh)))
        t1 = time.perf_counter()
        compiled = jitted.lower(variables, {"image": images}).compile()
        compile_seconds = time.perf_counter() - t1

        def step():
            return compiled(variables, {"image": images})

    flops = compiled_figures.flops(compiled)
    return Prepared(
        step,
        jax.block_until_ready,
        compile_seconds,
        rss0,
        lambda _: _jax_memory(compiled, device),
        {
            "setup_seconds": t1 - t0,
            "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
            "kernels": model.ops.NAME,
            "flops_per_image": None if flops is None else flops / spec["batch"],
            "backend_versions": {"jax": jax.__version__},
        },
    )


def prepare_torch(spec: Spec) -> Prepared:
    """The PyTorch oracle (``benchmarks.torch_oracle``), eager or ``torch.compile`` (whose
    first call, which compiles, is timed as ``compile_seconds``), on CUDA if available."""
    import torch

    from benchmarks.torch_oracle import loss as torch_loss
    from benchmarks.torch_oracle.fgtbt import build_torch_model_from_config
    from fgtbt_jax import landmarks
    from fgtbt_jax.train.state import ema_decay

    torch.set_num_threads(spec["threads"])
    rss0 = _current_rss()
    config = config_from_spec(spec)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = build_torch_model_from_config(config.model).to(dev)
    batch_np = synthetic.mixed_batch(spec["batch"], config.img_size, config.heatmap_size)
    batch = {
        "image": torch.from_numpy(batch_np["image"].transpose(0, 3, 1, 2).copy()).to(dev),
        "coords": torch.from_numpy(batch_np["coords"]).to(dev),
        "mask": torch.from_numpy(batch_np["mask"]).to(dev),
        "dataset_id": torch.from_numpy(batch_np["dataset_id"]).to(dev),
    }
    autocast_dtype = torch.bfloat16 if spec["dtype"] == "bfloat16" else None
    compiled = spec["framework"] == "torch-compile"

    def sync(_):
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if spec["mode"] == "train":
        weights = torch.from_numpy(landmarks.fmb_weights(float(config.loss.beta))).to(dev)
        fwd = torch.compile(model) if compiled else None
        train_step = torch_loss.make_train_step(
            model,
            weights,
            lr=float(config.optim.lr),
            betas=(float(config.optim.b1), float(config.optim.b2)),
            eps=float(config.optim.eps),
            weight_decay=float(config.optim.weight_decay),
            ema_decay=ema_decay(config) if config.ema else None,
            loss_cfg=config.loss,
            autocast_dtype=autocast_dtype,
            forward=fwd,
        )

        def step():
            return train_step(batch)

    else:
        model.eval()
        fwd = torch.compile(model) if compiled else model
        perm = torch.from_numpy(landmarks.unified_flip_permutation()).to(dev)
        flip = spec["mode"] == "eval_flip"

        @torch.inference_mode()
        def step():
            ctx = (
                torch.autocast(dev.type, autocast_dtype)
                if autocast_dtype is not None
                else contextlib.nullcontext()
            )
            with ctx:
                x = batch["image"]
                heat = fwd(x).float()
                if flip:
                    mirrored = fwd(torch.flip(x, dims=(3,))).float()
                    heat = (heat + torch.flip(mirrored, dims=(3,))[:, perm]) / 2
            b, k, h, w = heat.shape
            idx = heat.reshape(b, k, h * w).argmax(-1)
            return torch.stack([idx % w, idx // w], -1).float()

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    compile_seconds = None
    if compiled:  # the first call compiles (forward, and backward for train)
        t0 = time.perf_counter()
        sync(step())
        compile_seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        name = torch.cuda.get_device_name()

        def memory(_):
            return torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"

    else:
        name = platform.processor() or platform.machine()

        def memory(rss_growth):
            return rss_growth, "process peak RSS minus RSS before model creation"

    return Prepared(
        step,
        sync,
        compile_seconds,
        rss0,
        memory,
        {"device": f"{dev.type}:{name}", "backend_versions": {"torch": torch.__version__}},
    )


def prepare_onnxruntime(spec: Spec) -> Prepared:
    """Eval modes only: the eval step (arg-max decoding, flip for ``eval_flip``) exported to
    ONNX (``scripts/export.py``'s path, ``model.fft=dft``, random init) and run by onnxruntime
    on the CPU with ``threads`` intra-op threads; ``compile_seconds`` = export + session."""
    if spec["mode"] == "train":
        raise Unsupported("onnxruntime: eval modes only")
    if spec["dtype"] != "float32":
        raise Unsupported("onnxruntime: float32 only")
    import jax
    import onnxruntime as ort

    from fgtbt_jax.export import function
    from fgtbt_jax.export import onnx as onnx_export
    from fgtbt_jax.models.fgtbt import build_model, init_variables

    rss0 = _current_rss()
    config = config_from_spec(spec)
    config.model.fft = "dft"
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0), config.img_size)
    fn = function.inference_fn(
        model, variables, with_flip=spec["mode"] == "eval_flip", decode=True, refine="none"
    )
    images = synthetic.mixed_batch(spec["batch"], config.img_size, config.heatmap_size)["image"]
    t0 = time.perf_counter()
    proto = onnx_export.export(
        fn, config.img_size, spec["batch"], output_names=function.output_names(True), metadata={}
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = spec["threads"]
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    compile_seconds = time.perf_counter() - t0
    del proto, variables
    return Prepared(
        lambda: session.run(None, {"images": images}),
        lambda out: out,
        compile_seconds,
        rss0,
        lambda _: (None, None),
        {"device": "cpu", "backend_versions": {"onnxruntime": ort.__version__}},
    )


PREPARE: dict[str, Callable[[Spec], Prepared]] = {
    "jax": prepare_jax,
    "torch-eager": prepare_torch,
    "torch-compile": prepare_torch,
    "onnxruntime": prepare_onnxruntime,
}


def run_case(spec: Spec) -> dict:
    """Prepares and times one case in this process; its :func:`row`."""
    try:
        prepared = PREPARE[spec["framework"]](spec)
    except Unsupported as e:
        return row(spec, error=str(e))
    times = _timed_loop(prepared.step, prepared.sync, spec["warmup"], spec["steps"])
    rss_delta = _peak_rss() - prepared.rss0
    mem, source = prepared.memory(rss_delta)
    return row(
        spec,
        step_seconds=times,
        compile_seconds=prepared.compile_seconds,
        peak_memory_bytes=mem,
        memory_source=source,
        peak_rss_delta_bytes=rss_delta,
        **prepared.fields,
    )


def _child(target: Callable[[Any], dict], arg: Any, conn: Any) -> None:
    try:
        result = target(arg)
    except BaseException:  # noqa: BLE001 - reported to the parent as the case's error
        result = {"error": traceback.format_exc()[-2000:]}
    conn.send(result)
    conn.close()


def run_isolated(
    target: Callable[[Any], dict], arg: Any, timeout: float | None = None
) -> dict | None:
    """``target(arg)`` in a fresh ``spawn`` process; its result, or ``{"error": ...}`` when it
    raised, died or ran past ``timeout`` seconds (then it is killed)."""
    ctx = multiprocessing.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(target, arg, send), daemon=True)
    proc.start()
    send.close()
    try:
        if not recv.poll(timeout):
            proc.kill()
            return {"error": f"timed out after {timeout:.0f} s"}
        return recv.recv()
    except EOFError:
        proc.join()
        return {"error": f"the case's process died (exit {proc.exitcode})"}
    finally:
        proc.join(5)
        recv.close()


def run_case_isolated(spec: Spec, timeout: float | None = None) -> dict:
    """:func:`run_case` in a fresh process (:func:`run_isolated`); ``wall_seconds`` added."""
    t0 = time.perf_counter()
    result = run_isolated(run_case, spec, timeout)
    if "framework" not in result:
        return row(spec, **result)
    result["wall_seconds"] = time.perf_counter() - t0
    return result


def with_mfu(row: dict, peak: dict | None) -> dict:
    """``row`` with ``mfu`` (JAX rows: XLA's FLOPs × images/s / the measured matmul peak, else
    None) and the ``peak`` of :func:`measure_jax_matmul_peak` it refers to."""
    if (
        row["framework"] == "jax"
        and row.get("flops_per_image")
        and peak
        and row.get("images_per_sec")
    ):
        row["matmul_peak_flops_per_sec"] = peak["flops_per_sec"]
        row["mfu"] = row["flops_per_image"] * row["images_per_sec"] / peak["flops_per_sec"]
    else:
        row.setdefault("mfu", None)
    if peak:
        row["matmul_peak"] = peak
    return row


def measure_jax_matmul_peak(size: int = 4096, repeats: int = 5) -> dict:
    """Best float32 GEMM rate (FLOP/s) of ``size``² × ``size``² in JAX on the default device."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (size, size), jnp.float32)
    b = jax.random.normal(k2, (size, size), jnp.float32)
    mm = jax.jit(lambda x, y: jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST))
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    device = jax.devices()[0]
    return {
        "size": size,
        "repeats": repeats,
        "best_seconds": best,
        "flops_per_sec": 2.0 * size**3 / best,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
    }


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def markdown_table(rows: list[dict], peak: dict | None) -> str:
    """The rows as a markdown table, with the JAX / PyTorch throughput ratios per case."""

    def by_framework(name: str) -> dict:
        return {(r["mode"], r["batch"], r["dtype"]): r for r in rows if r["framework"] == name}

    eager, compiled = by_framework("torch-eager"), by_framework("torch-compile")

    def ratio(r: dict, others: dict) -> str:
        ref = others.get((r["mode"], r["batch"], r["dtype"]))
        if r["framework"] != "jax" or not ref or not ref.get("images_per_sec"):
            return "—"
        return f"{r['images_per_sec'] / ref['images_per_sec']:.2f}×"

    lines = [
        "| framework | kernels | mode | batch | dtype | images/s | JAX / torch-eager "
        "| JAX / torch-compile | compile s | peak memory MiB | GFLOP/image | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kernels = r.get("kernels") or "—"
        head = f"| {r['framework']} | {kernels} | {r['mode']} | {r['batch']} | {r['dtype']} "
        if r.get("error"):
            lines.append(head + f"| error: {r['error'].splitlines()[0][:60]} | | | | | | |")
            continue
        mem = r.get("peak_memory_bytes")
        gflop = r.get("flops_per_image")
        lines.append(
            head + f"| {_fmt(r['images_per_sec'], '.3f')} | {ratio(r, eager)} "
            f"| {ratio(r, compiled)} | {_fmt(r.get('compile_seconds'), '.1f')} "
            f"| {_fmt(None if mem is None else mem / 2**20, '.0f')} "
            f"| {_fmt(None if gflop is None else gflop / 1e9, '.1f')} "
            f"| {_fmt(r.get('mfu'), '.1%')} |"
        )
    if peak:
        lines.append("")
        lines.append(
            f"Measured float32 matmul peak ({peak['size']}² GEMM, best of {peak['repeats']}, "
            f"{peak['device']}): {peak['flops_per_sec'] / 1e9:.1f} GFLOP/s."
        )
    return "\n".join(lines)
