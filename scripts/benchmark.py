r"""Compiled throughput of FGTBT in JAX, side by side with PyTorch (eager / torch.compile).

  python scripts/benchmark.py --config configs/fgtbt.py:release --steps 5 --warmup 2 \
      --compare-torch --torch-compile --json benchmarks/release_cpu.json

Cases (one row each): framework ``jax`` | ``torch-eager`` | ``torch-compile`` × mode
``train`` (forward in train mode, FMB loss, backward, AdamW, EMA: the real training step of
:mod:`fgtbt_jax.train.step`, and the same step written in PyTorch in
:mod:`benchmarks.torch_oracle.loss`), ``eval`` (forward + arg-max decoding,
:mod:`fgtbt_jax.evaluation.decoding`)
and ``eval_flip`` (the same with the test-time flip: two forward passes). Synthetic data of the
configured shapes; parameters are random (the speed does not depend on their values).

``--frameworks onnxruntime`` adds the eval modes exported to ONNX and run by onnxruntime on
the CPU (``run_onnxruntime_case``; needs the ``export`` extra).

Every case runs in a fresh subprocess, so that the frameworks neither share thread pools nor
each other's memory high-water mark. Timing: ``--warmup`` untimed steps after compilation, then
``--steps`` steps each synchronised (``block_until_ready`` / ``cuda.synchronize``);
``images_per_sec`` = batch / median step time. The machine's float32 matmul peak is measured in
the same run (best of several square GEMMs in JAX) and gives the JAX cases' MFU from XLA's
FLOP count (``compiled.cost_analysis()``).

Configuration: ``--config path.py:preset`` and any ``--config.FIELD=VALUE`` override
(ml_collections ``config_flags``, as in train.py), e.g. ``--config.model.kernels=xla`` or
``=cpu`` (each JAX row records the resolved ``kernels``), ``--config.model.dtype=bfloat16``
(or ``=float64``, which switches on ``jax_enable_x64`` in the JAX worker),
``--config.model.remat=True``.

Output: ``--json`` writes a list of case dicts (see ``_case`` for the fields) and a markdown
table is printed, with the JAX / PyTorch-eager throughput ratio per mode.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from absl import app, flags
from ml_collections import ConfigDict, config_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fgtbt_jax import compiled as compiled_figures

FRAMEWORKS = ("jax", "torch-eager", "torch-compile", "onnxruntime")
MODES = ("train", "eval", "eval_flip")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def config_from_spec(spec: dict) -> ConfigDict:
    """The case's configuration (``--config`` with its overrides, as JSON in the spec)."""
    return ConfigDict(json.loads(spec["config_json"]))


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def synthetic_batch(batch: int, img_size: int, heatmap_size: int, seed: int = 0) -> dict:
    """NumPy batch: image (B, S, S, 3) float32 NHWC, coords (B, 124, 2) int32, mask (B, 124)
    bool (the dataset's annotated slots), dataset_id (B,) int32 cycling over the 4 datasets."""
    import numpy as np

    from fgtbt_jax import landmarks

    rng = np.random.default_rng(seed)
    k = landmarks.NUM_UNIFIED
    dataset_id = (np.arange(batch) % len(landmarks.DATASETS)).astype(np.int32)
    return {
        "image": rng.standard_normal((batch, img_size, img_size, 3), dtype=np.float32),
        "coords": rng.integers(0, heatmap_size, (batch, k, 2), dtype=np.int32),
        "mask": landmarks.annotation_mask()[dataset_id].astype(bool),
        "dataset_id": dataset_id,
    }


def _timed_loop(run_step, sync, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        sync(run_step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(run_step())
        times.append(time.perf_counter() - t0)
    return times


def _case(spec: dict, **fields: Any) -> dict:
    """One result row: the spec's identity fields plus the measured ones."""
    step_seconds = fields.get("step_seconds") or []
    row = {
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
    row.update(fields)
    if step_seconds:
        row["images_per_sec"] = spec["batch"] / statistics.median(step_seconds)
        row["images_per_sec_mean"] = spec["batch"] * len(step_seconds) / sum(step_seconds)
    return row


# --------------------------------------------------------------------------------------------
# JAX
# --------------------------------------------------------------------------------------------


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


def run_jax_case(spec: dict) -> dict:
    import jax

    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.models.fgtbt import build_model, enable_x64_if_requested
    from fgtbt_jax.train import sharding
    from fgtbt_jax.train import state as train_state
    from fgtbt_jax.train import step as train_step

    rss0 = _current_rss()
    config = config_from_spec(spec)
    enable_x64_if_requested(config.model)  # before any array is created
    mesh = sharding.make_mesh(spec.get("devices") or None)
    model = build_model(config.model)
    batch_np = synthetic_batch(spec["batch"], config.img_size, config.heatmap_size)
    device = mesh.devices.flat[0]

    t0 = time.perf_counter()
    if spec["mode"] == "train":
        tx, schedule = train_state.make_optimizer(config)
        state, shardings = train_state.create_train_state(config, model, tx, mesh)
        batch = jax.device_put(batch_np, train_step.batch_sharding(mesh))
        step = train_step.jit_train_step(
            train_step.make_train_step(model, tx, schedule, config), shardings, mesh
        )
        t1 = time.perf_counter()
        compiled = step.lower(state, batch).compile()
        compile_seconds = time.perf_counter() - t1
        holder = {"state": state}

        def run_step():
            holder["state"], metrics = compiled(holder["state"], batch)
            return holder["state"], metrics

    else:
        from fgtbt_jax.models.fgtbt import init_variables

        variables = init_variables(model, jax.random.PRNGKey(0), config.img_size)
        rep = sharding.replicated(mesh)
        variables = jax.device_put(variables, rep)
        images = jax.device_put(batch_np["image"], sharding.data_sharding(mesh))
        fn = decoding.make_eval_step(model, flip_test=spec["mode"] == "eval_flip")
        jitted = jax.jit(fn, in_shardings=(rep, sharding.data_sharding(mesh)))
        t1 = time.perf_counter()
        compiled = jitted.lower(variables, {"image": images}).compile()
        compile_seconds = time.perf_counter() - t1

        def run_step():
            return compiled(variables, {"image": images})

    setup_seconds = t1 - t0
    times = _timed_loop(run_step, jax.block_until_ready, spec["warmup"], spec["steps"])
    flops = compiled_figures.flops(compiled)
    mem, source = _jax_memory(compiled, device)
    row = _case(
        spec,
        step_seconds=times,
        compile_seconds=compile_seconds,
        setup_seconds=setup_seconds,
        peak_memory_bytes=mem,
        memory_source=source,
        peak_rss_delta_bytes=_peak_rss() - rss0,
        device=f"{device.platform}:{getattr(device, 'device_kind', '')}",
        kernels=model.ops.NAME,
        flops_per_image=None if flops is None else flops / spec["batch"],
        backend_versions={"jax": jax.__version__},
    )
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


# --------------------------------------------------------------------------------------------
# PyTorch
# --------------------------------------------------------------------------------------------


def run_torch_case(spec: dict) -> dict:
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
    batch_np = synthetic_batch(spec["batch"], config.img_size, config.heatmap_size)
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
        step = torch_loss.make_train_step(
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

        def run_step():
            return step(batch)

    else:
        model.eval()
        fwd = torch.compile(model) if compiled else model
        perm = torch.from_numpy(landmarks.unified_flip_permutation()).to(dev)
        flip = spec["mode"] == "eval_flip"

        @torch.inference_mode()
        def run_step():
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
        sync(run_step())
        compile_seconds = time.perf_counter() - t0
    times = _timed_loop(run_step, sync, spec["warmup"], spec["steps"])
    if dev.type == "cuda":
        mem, source = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        name = torch.cuda.get_device_name()
    else:
        mem, source = _peak_rss() - rss0, "process peak RSS minus RSS before model creation"
        name = platform.processor() or platform.machine()
    return _case(
        spec,
        step_seconds=times,
        compile_seconds=compile_seconds,
        peak_memory_bytes=mem,
        memory_source=source,
        peak_rss_delta_bytes=_peak_rss() - rss0,
        device=f"{dev.type}:{name}",
        backend_versions={"torch": torch.__version__},
    )


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


def run_onnxruntime_case(spec: dict) -> dict:
    """Eval modes only: the eval step (arg-max decoding, flip for ``eval_flip``) exported to ONNX
    (``scripts/export.py``'s path, ``model.fft=dft``, random init) and run by onnxruntime on the
    CPU with ``threads`` intra-op threads; ``compile_seconds`` = export + session creation."""
    if spec["mode"] == "train":
        return _case(spec, error="onnxruntime: eval modes only")
    import jax
    import onnxruntime as ort

    from fgtbt_jax.export import function
    from fgtbt_jax.export import onnx as onnx_export
    from fgtbt_jax.models.fgtbt import build_model, init_variables

    rss0 = _current_rss()
    config = config_from_spec(spec)
    config.model.fft = "dft"
    if spec["dtype"] != "float32":
        return _case(spec, error="onnxruntime: float32 only")
    model = build_model(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0), config.img_size)
    fn = function.inference_fn(
        model, variables, with_flip=spec["mode"] == "eval_flip", decode=True, refine="none"
    )
    images = synthetic_batch(spec["batch"], config.img_size, config.heatmap_size)["image"]
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

    def run_step():
        return session.run(None, {"images": images})

    times = _timed_loop(run_step, lambda out: out, spec["warmup"], spec["steps"])
    return _case(
        spec,
        step_seconds=times,
        compile_seconds=compile_seconds,
        peak_rss_delta_bytes=_peak_rss() - rss0,
        device="cpu",
        backend_versions={"onnxruntime": ort.__version__},
    )


def _worker(spec: dict) -> dict:
    if spec["framework"] == "onnxruntime":
        return run_onnxruntime_case(spec)
    if spec["framework"] == "matmul":
        return measure_jax_matmul_peak(spec.get("size", 4096))
    if spec["framework"] == "jax":
        return run_jax_case(spec)
    return run_torch_case(spec)


def _run_subprocess(spec: dict, timeout: float | None) -> dict:
    """Runs one case in a fresh Python process; returns its row (or an ``error`` row)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), f"--worker={json.dumps(spec)}"]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return _case(spec, error=f"timed out after {timeout:.0f} s")
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCHMARK_RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        return _case(spec, error=f"exit {proc.returncode}: {tail}")
    row = json.loads(lines[-1][len("BENCHMARK_RESULT ") :])
    if isinstance(row, dict) and "framework" in row:
        row["wall_seconds"] = wall
    return row


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


_CONFIG = config_flags.DEFINE_config_file(
    "config",
    f"{ROOT / 'configs' / 'fgtbt.py'}:release",
    "Config file and preset, e.g. configs/fgtbt.py:release; any field can be overridden with "
    "--config.FIELD=VALUE (--config.model.dtype=bfloat16, --config.model.kernels=xla, "
    "--config.model.remat=True).",
)
_BATCH = flags.DEFINE_integer("batch", None, "Default: 4 × data.batch_per_dataset.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per case.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_MODES = flags.DEFINE_list("modes", list(MODES), f"Subset of {','.join(MODES)}.")
_DEVICES = flags.DEFINE_integer("devices", None, "JAX devices (default: all).")
_FRAMEWORKS = flags.DEFINE_list(
    "frameworks", None, f"Subset of {','.join(FRAMEWORKS)} (overrides the flags below)."
)
_COMPARE_TORCH = flags.DEFINE_boolean("compare-torch", False, "Also time PyTorch eager.")
_TORCH_COMPILE = flags.DEFINE_boolean("torch-compile", False, "Also time torch.compile.")
_TORCH_COMPILE_TIMEOUT = flags.DEFINE_float(
    "torch-compile-timeout", 1800.0, "Seconds allowed per torch.compile case (with compiling)."
)
_MATMUL_SIZE = flags.DEFINE_integer("matmul-size", 4096, "Side of the peak-GEMM probe.")
_NO_MATMUL_PEAK = flags.DEFINE_boolean("no-matmul-peak", False, "Skip the peak-GEMM probe.")
_JSON = flags.DEFINE_string("json", None, "Write the result rows here.")
_REPORT = flags.DEFINE_string("report", None, "Only print the table of a saved --json file.")
_WORKER = flags.DEFINE_string("worker", None, "Internal: run one case (a JSON spec) and exit.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]} (config overrides: --config.X=Y)")
    if _WORKER.value is not None:
        row = _worker(json.loads(_WORKER.value))
        print("BENCHMARK_RESULT " + json.dumps(row), flush=True)
        return

    if _REPORT.value is not None:
        rows = json.loads(pathlib.Path(_REPORT.value).read_text())
        print(
            markdown_table(rows, next((r["matmul_peak"] for r in rows if "matmul_peak" in r), None))
        )
        return

    modes = _MODES.value
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise app.UsageError(f"--modes: unknown mode(s) {bad}; choose from {MODES}")
    config = _CONFIG.value
    batch = _BATCH.value or 4 * int(config.data.batch_per_dataset)
    if _FRAMEWORKS.value:
        frameworks = _FRAMEWORKS.value
        bad = [f for f in frameworks if f not in FRAMEWORKS]
        if bad:
            raise app.UsageError(
                f"--frameworks: unknown framework(s) {bad}; choose from {FRAMEWORKS}"
            )
    else:
        frameworks = ["jax"]
        if _COMPARE_TORCH.value:
            frameworks.append("torch-eager")
        if _TORCH_COMPILE.value:
            frameworks.append("torch-compile")
    base = {
        "config_json": config.to_json(),
        "preset": config.preset,
        "img_size": int(config.img_size),
        "batch": batch,
        "dtype": config.model.dtype,
        "devices": _DEVICES.value,
        "threads": os.cpu_count(),
        "steps": _STEPS.value,
        "warmup": _WARMUP.value,
        "remat": bool(config.model.remat),
    }

    peak = None
    if not _NO_MATMUL_PEAK.value:
        peak = _run_subprocess({"framework": "matmul", "size": _MATMUL_SIZE.value}, None)
        print(f"matmul peak: {peak}", file=sys.stderr, flush=True)
        if "flops_per_sec" not in peak:
            peak = None

    rows = []
    for mode in modes:
        for fw in frameworks:
            spec = dict(base, framework=fw, mode=mode)
            timeout = _TORCH_COMPILE_TIMEOUT.value if fw == "torch-compile" else None
            row = _run_subprocess(spec, timeout)
            if fw == "jax" and row.get("flops_per_image") and peak and row.get("images_per_sec"):
                row["matmul_peak_flops_per_sec"] = peak["flops_per_sec"]
                row["mfu"] = row["flops_per_image"] * row["images_per_sec"] / peak["flops_per_sec"]
            else:
                row.setdefault("mfu", None)
            if peak:
                row["matmul_peak"] = peak
            rows.append(row)
            keys = ("framework", "mode", "kernels", "images_per_sec", "compile_seconds", "error")
            summary = {k: row.get(k) for k in keys}
            print(f"case: {summary}", file=sys.stderr, flush=True)
            if _JSON.value:  # keep partial results of long runs
                _write_json(_JSON.value, rows)

    print(markdown_table(rows, peak))
    if _JSON.value:
        _write_json(_JSON.value, rows)


def _write_json(path: str, rows: list[dict]) -> None:
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
