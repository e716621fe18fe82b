r"""Evaluates a checkpoint on the test sets (SPEC §5) and writes report.json / .md / ced.png.

  python scripts/evaluate.py --config configs/fgtbt.py:release --checkpoint fgtbt_b4.pth \
      --protocol both --out /tmp/fgtbt_eval
  python scripts/evaluate.py --config configs/fgtbt.py:reference_tiny \
      --checkpoint tests/fixtures/reference/tiny_checkpoint.pth --out /tmp/eval_tiny  # demo data

Data come from ``input_pipeline.sources`` (``config.data.source``: the bundled synthetic
"demo" set, the TFDS datasets prepared from the official files, or in-memory "synthetic"
faces). Every dataset of ``--datasets`` is scored on each of its subsets (``eval_subsets``:
WFLW's six attributes, 300W common / challenging / full, AFLW full / frontal); predictions of
the full set are reused for the subsets. Protocols: ``reference`` (the published code: error vs.
the quantized heatmap targets mapped back) and ``standard`` (vs. the original annotation).
The defaults (test-time flip, plain arg-max) are the reference's; ``--refine`` adds sub-pixel
decoding. Note: the network's CSAM statistics span the batch, so results depend slightly on
``--batch_size`` (padding rows are never sent through the network).

Several processes (``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``, or a
cluster ``jax.distributed.initialize()`` detects; run the same command on every process): each
evaluates every ``--batch_size`` batch dealt to it (the batches of one process, dealt
round-robin), the per-image errors are gathered, and the report equals the one-process report;
process 0 alone writes the files.
"""

from __future__ import annotations

import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

from fgtbt_jax import errors, landmarks, paths, schemes
from fgtbt_jax.evaluation import decoding, evaluator, metrics, reports
from fgtbt_jax.models.fgtbt import enable_x64_if_requested
from fgtbt_jax.train import sharding

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    str(ROOT / "configs" / "fgtbt.py") + ":release",
    "Config, e.g. configs/fgtbt.py:release",
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Release-layout .pth, state dict or orbax directory.", required=True
)
_OUT = flags.DEFINE_string("out", None, "Output directory for the report.", required=True)
_PROTOCOL = flags.DEFINE_enum("protocol", "both", ("reference", "standard", "both"), "Protocol(s).")
_DATASETS = flags.DEFINE_list("datasets", None, "Datasets (default: config.data.datasets).")
_SUBSETS = flags.DEFINE_list("subsets", None, "Subsets (default: all of each dataset).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Evaluation batch size.")
_REFINE = flags.DEFINE_enum("refine", "none", decoding.REFINEMENTS, "Heatmap decoding.")
_FLIP = flags.DEFINE_bool("flip", True, "Test-time horizontal flip.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 0, "Stop each subset after N batches (0: all).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    paths.check(_CHECKPOINT.value, "--checkpoint", hub=True)  # before anything compiles
    paths.check(_OUT.value, "--out")
    sharding.maybe_initialize_distributed()  # before any other JAX call
    import jax

    import fgtbt_jax
    from input_pipeline import sources

    config = _CONFIG.value
    paths.run_data_dir(config.data)  # gs://: staged to config.data.stage_dir
    enable_x64_if_requested(config.model)
    protocols = metrics.PROTOCOLS if _PROTOCOL.value == "both" else (_PROTOCOL.value,)
    datasets = _DATASETS.value or list(config.data.datasets)
    schemes.configure(config)  # the head follows the run's datasets
    acc = metrics.Accumulator.for_data(config.data, protocols)  # scheme datasets' layout
    known = (*landmarks.DATASETS, *acc.schemes)
    for ds in datasets:
        if ds not in known:
            raise app.UsageError(
                f"unknown dataset {ds!r}; choose from {known} (a scheme dataset needs its "
                "file in --config.data.schemes and its name in --config.data.datasets)"
            )
    process, processes = jax.process_index(), jax.process_count()
    lead = process == 0
    data = sources.create(config, datasets=datasets)
    model, variables = fgtbt_jax.load_pretrained(_CHECKPOINT.value, config, "--checkpoint")
    variables = evaluator.host_local(variables)
    predict = decoding.make_predict_fn(
        model, flip_test=_FLIP.value, refine=_REFINE.value, flip=acc.flip
    )
    cache: dict = {}
    t0 = time.time()
    for ds in datasets:
        subsets = list(data.eval_subsets(ds))
        if _SUBSETS.value:
            subsets = [s for s in subsets if s in _SUBSETS.value]
        subsets.sort(key=lambda s: s != metrics.FULL)  # full first: its predictions are reused
        for subset in subsets:
            it = data.eval_iterator(ds, subset, _BATCH.value)

            def tagged(it=it, subset=subset):
                for i, batch in enumerate(it):  # this process's batch i is batch i·P + p
                    if _MAX_BATCHES.value and i * processes + process >= _MAX_BATCHES.value:
                        break
                    yield {**batch, "subset": subset}

            def progress(i, ds=ds, subset=subset):
                if lead and (i == 1 or i % 20 == 0):
                    print(f"  {ds}/{subset}: batch {i} ({time.time() - t0:.0f} s)", flush=True)

            metrics.accumulate(predict, variables, tagged(), acc, cache=cache, progress=progress)
            if processes > 1 and subset == metrics.FULL:  # the subsets reuse all of it
                cache = metrics.gather_cache(cache)
            if lead:
                print(f"{ds}/{subset}: done ({time.time() - t0:.0f} s)", flush=True)
    report = acc.gathered().report(
        checkpoint=str(_CHECKPOINT.value),
        config=str(config.preset),
        img_size=int(config.img_size),
        heatmap_size=int(config.heatmap_size),
        refine=_REFINE.value,
        flip_test=_FLIP.value,
        batch_size=_BATCH.value,
        data_source=data.name,
    )
    if lead:  # every process has the whole report; one writes it
        written = reports.write_report(report, _OUT.value)
        print(reports.format_markdown(report))
        print("wrote " + ", ".join(str(p) for p in written.values()))


if __name__ == "__main__":
    errors.run(main)
