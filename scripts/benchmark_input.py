r"""Measure the training input pipeline's throughput (images/s) for a config.

  python scripts/benchmark_input.py --config configs/fgtbt.py:release
  python scripts/benchmark_input.py --config configs/fgtbt.py:release --photo_size 800 \
      --config.data.batch_per_dataset=8 --output bench.json

Runs ``make_train_iterator`` (decode, augment, crop to ``config.img_size``, normalise, targets)
and reports images/s after a warm-up. With the default ``config.data.source="demo"`` it reads
the bundled synthetic set (160–256 px pictures, cheaper to decode than real photos);
``--photo_size N`` uses a synthetic set of N×N pictures instead (prepared once in
``--photo_data_dir``), closer to the decode cost of WFLW/300W photographs.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

from absl import app, flags
from ml_collections import config_flags

from fgtbt_jax import errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path:preset).")
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 50, "Timed batches.")
_WARMUP = flags.DEFINE_integer("warmup", 5, "Untimed batches first.")
_PHOTO_SIZE = flags.DEFINE_integer("photo_size", 0, "Synthetic N×N pictures (0 = default set).")
_PHOTO_DATA_DIR = flags.DEFINE_string(
    "photo_data_dir", "/tmp/fgtbt_bench_tfds", "data_dir for the --photo_size set."
)
_OUTPUT = flags.DEFINE_string("output", "benchmark_input.json", "JSON result file ('' = none).")


def main(argv):
    del argv
    from input_pipeline import sources

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config configs/fgtbt.py:release")
    with config.unlocked():
        if _PHOTO_SIZE.value:
            config.data.source = "demo"
            config.data.data_dir = f"{_PHOTO_DATA_DIR.value}_{_PHOTO_SIZE.value}"
            config.data.demo_image_size = (_PHOTO_SIZE.value, _PHOTO_SIZE.value)
    t0 = time.perf_counter()
    data = sources.create(config)
    it = data.train_iterator()
    batch = next(it)
    setup_s = time.perf_counter() - t0
    bsz = int(batch["image"].shape[0])
    for _ in range(_WARMUP.value):
        next(it)
    t0 = time.perf_counter()
    for _ in range(_NUM_BATCHES.value):
        batch = next(it)
    dt = time.perf_counter() - t0
    ips = _NUM_BATCHES.value * bsz / dt
    result = {
        "images_per_s": round(ips, 1),
        "batches_per_s": round(_NUM_BATCHES.value / dt, 2),
        "batch_size": bsz,
        "img_size": int(config.img_size),
        "heatmap_size": int(config.heatmap_size),
        "source": data.name,
        "photo_size": _PHOTO_SIZE.value or "160-256 (default demo)",
        "num_batches": _NUM_BATCHES.value,
        "setup_s": round(setup_s, 2),
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "command": " ".join(sys.argv),
    }
    print(
        f"input pipeline: {ips:.1f} images/s ({result['batches_per_s']} batches/s of {bsz}, "
        f"{config.img_size}² crops, {os.cpu_count()} CPUs)"
    )
    if _OUTPUT.value:
        pathlib.Path(_OUTPUT.value).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {_OUTPUT.value}")


if __name__ == "__main__":
    errors.run(main)
