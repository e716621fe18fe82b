r"""Peak host memory of the trainer's evaluation (``Evaluator``) against the test-set size.

  python scripts/benchmark_eval_memory.py --sizes 200,2000 --workdir /tmp/eval_memory \
      --json benchmarks/eval_memory_cpu.json

For each size N: a synthetic WFLW test set of N records (``--faces`` faces rendered by
``input_pipeline.demo.write_official``, repeated in turn; prepared as TFDS ``official``) and,
in a fresh process, one ``Evaluator`` call (flip test) of the tiny network at ``--img_size``²
(random weights) on all of it; that process's peak resident set size (``ru_maxrss``) is
recorded. Evaluation streams the batches, so the peak should hardly grow with N (caching the
normalized float32 crops would add N × img_size² × 12 bytes).
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import resource
import subprocess
import sys
import time

from absl import flags

from fgtbt_jax import errors

ROOT = pathlib.Path(__file__).resolve().parents[1]

_SIZES = flags.DEFINE_list("sizes", ["200", "2000"], "Test-set sizes (images).")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/fgtbt_eval_memory", "Data folder.")
_IMG_SIZE = flags.DEFINE_integer("img_size", 480, "Network input size.")
_FACES = flags.DEFINE_integer("faces", 200, "Distinct rendered faces (repeated up to a size).")
_JSON = flags.DEFINE_string("json", None, "Write the rows here.")
_MEASURE = flags.DEFINE_integer("measure", 0, "Internal: evaluate the set of this size.")


def _config(size: int):
    from configs import fgtbt

    c = fgtbt.get_config("tiny")
    c.img_size, c.heatmap_size = _IMG_SIZE.value, _IMG_SIZE.value // 2
    c.data.source = "official"
    c.data.data_dir = str(pathlib.Path(_WORKDIR.value) / f"n{size}" / "tfds")
    return c


def prepare(size: int) -> None:
    """A WFLW-format test set of ``size`` records, prepared once: ``--faces`` rendered synthetic
    faces, repeated in turn (every record is still read, decoded and cropped on its own)."""
    from input_pipeline import builders, demo

    root = pathlib.Path(_WORKDIR.value) / f"n{size}"
    b = builders.get_builder("WFLW", root / "tfds", "official")
    if b.is_prepared() and b.info.splits["test"].num_examples == size:
        return
    demo.write_official(root / "raw", "WFLW", 4, min(size, _FACES.value))
    csv = root / "raw" / "face_landmarks_wflw_test.csv"
    header, *rows = csv.read_text().splitlines()
    csv.write_text("\n".join([header] + [rows[i % len(rows)] for i in range(size)]) + "\n")
    builders.prepare("WFLW", data_dir=root / "tfds", manual_dir=root / "raw", overwrite=True)


def measure(size: int) -> dict:
    """One evaluation of the ``size`` set in this process; its peak RSS."""
    import jax

    from fgtbt_jax.evaluation.evaluator import Evaluator
    from fgtbt_jax.models.fgtbt import build_model, init_variables

    config = _config(size)
    variables = init_variables(build_model(config.model), jax.random.PRNGKey(0), config.img_size)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out = Evaluator(config)(variables, ("WFLW",))
    seconds = time.perf_counter() - t0
    return {
        "images": size,
        "img_size": config.img_size,
        "batch_size": int(config.eval_batch_size),
        "flip_test": True,
        "nme_wflw": out["nme_WFLW"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_rss_before_eval_bytes": rss_before * 1024,
        "float32_crops_bytes": size * config.img_size**2 * 3 * 4,
        "eval_seconds": round(seconds, 1),
    }


def main(argv: list[str]) -> None:
    del argv
    if _MEASURE.value:
        print(json.dumps(measure(_MEASURE.value)), flush=True)
        return
    rows = []
    for size in map(int, _SIZES.value):
        prepare(size)
        cmd = [sys.executable, __file__, f"--measure={size}", f"--workdir={_WORKDIR.value}",
               f"--img_size={_IMG_SIZE.value}"]  # fmt: skip
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode:
            raise RuntimeError(f"measurement of {size} images failed:\n{r.stderr[-3000:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = rows[0]["peak_rss_bytes"]
    for row in rows:
        row["growth_vs_first_bytes"] = row["peak_rss_bytes"] - base
    if _JSON.value:
        import jax

        meta = {
            "machine": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "jax": jax.__version__,
            "network": "tiny preset, random weights",
            "dataset": f"synthetic WFLW test set, {_FACES.value} faces repeated, TFDS ArrayRecord",
        }
        path = pathlib.Path(_JSON.value)
        path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    errors.run(main)
