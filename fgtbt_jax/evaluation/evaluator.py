"""The trainer's periodic evaluation: NME of the EMA weights on each dataset's test split.

Streams: every evaluation reads the test sets again batch by batch (tf.data for the ``demo`` /
``official`` sources), so host memory does not grow with the test sets. On several processes
each evaluates its share of every test set and the per-image errors are gathered
(:meth:`metrics.Accumulator.gathered`): the metrics equal those of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from fgtbt_jax.evaluation import decoding, metrics
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.train import synthetic


def _synthetic_share(
    config: ml_collections.ConfigDict, datasets: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    """This process's batches of the synthetic evaluation set (dealt round-robin), each row
    with its ``index`` in the single-process order."""
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.data.datasets = datasets
    batches = synthetic.eval_batches(
        cfg,
        num_per_dataset=int(config.data.synthetic_eval_images),
        batch_size=int(config.eval_batch_size),
    )
    start = 0
    for i, batch in enumerate(batches):
        n = len(batch["dataset_id"])
        if i % jax.process_count() == jax.process_index():
            yield {**batch, "index": np.arange(start, start + n)}
        start += n


def eval_streams(
    config: ml_collections.ConfigDict, datasets: tuple[str, ...]
) -> list[Iterable[dict[str, Any]]] | None:
    """This process's share of the evaluation batches (the :func:`metrics.accumulate`
    contract), one lazy stream per test set, or None if no evaluation data are available.

    Nothing is read before iteration; every call reads the data again."""
    if config.data.source == "synthetic":
        return [_synthetic_share(config, datasets)]
    try:
        from input_pipeline import pipeline
    except ImportError:
        return None

    def stream(name: str) -> Iterator[dict[str, Any]]:
        yield from pipeline.make_eval_iterator(
            config,
            name,
            batch_size=int(config.eval_batch_size),
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    return [stream(name) for name in datasets]


def host_local(variables: Any) -> Any:
    """``variables`` usable by a computation on this process's devices alone.

    On one process: unchanged. On several: arrays spread over other processes' devices (the
    trainer's replicated or FSDP-sharded state) are gathered (a collective: all processes call
    it) and placed on this process's first device.
    """
    if jax.process_count() == 1:
        return variables
    from jax.experimental import multihost_utils

    leaves, treedef = jax.tree.flatten(variables)
    remote = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array)]
    remote = [i for i in remote if not leaves[i].is_fully_addressable]
    metrics.wait_for_processes("host_local")
    gathered = multihost_utils.process_allgather([leaves[i] for i in remote], tiled=True)
    for i, value in zip(remote, gathered, strict=True):
        leaves[i] = value
    return jax.device_put(jax.tree.unflatten(treedef, leaves), jax.local_devices()[0])


class Evaluator:
    """Flip-test NME of the EMA weights per dataset, for the trainer's periodic evaluation.

    Called on all processes (it holds collectives); each evaluates its share of the data.
    """

    def __init__(self, config: ml_collections.ConfigDict, build: Callable = build_model) -> None:
        self.config = config
        # stat_groups=1: the eval batch is one CSAM group, as in the reference's evaluation.
        self.step = jax.jit(decoding.make_eval_step(build(config.model)))

    def __call__(self, variables: Any, datasets: tuple[str, ...]) -> dict[str, float] | None:
        streams = eval_streams(self.config, datasets)
        if streams is None:
            logging.warning("no evaluation data for %s; skipping evaluation", datasets)
            return None
        variables = host_local(variables)
        acc = metrics.Accumulator()
        for stream in streams:
            metrics.accumulate(self.step, variables, stream, acc)
        report = acc.gathered().report()
        if not any(report["metrics"].values()):
            logging.warning("no evaluation data for %s; skipping evaluation", datasets)
            return None
        out = {}
        for protocol, per_ds in report["metrics"].items():
            for ds, per_subset in per_ds.items():
                for subset, m in per_subset.items():
                    prefix = f"{protocol}/{ds}/{subset}"
                    out[f"{prefix}/nme_inter_ocular"] = float(m["nme_inter_ocular"])
                    out[f"{prefix}/nme_inter_pupil"] = float(m["nme_inter_pupil"])
        # Checkpoint selection: the published protocol's inter-ocular NME on each full set.
        for ds in datasets:
            key = f"reference/{ds}/full/nme_inter_ocular"
            if key in out:
                out[f"nme_{ds}"] = out[key]
        return out
