"""The trainer's periodic evaluation: NME of the EMA weights on each dataset's test split.

Streams: every evaluation reads the test sets again batch by batch (tf.data for the ``demo`` /
``official`` sources), so host memory does not grow with the test sets. On several processes
each evaluates its share of every test set and the per-image errors are gathered
(:meth:`metrics.Accumulator.gathered`): the metrics equal those of one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from fgtbt_jax.evaluation import decoding, metrics
from fgtbt_jax.models.fgtbt import build_model
from input_pipeline import sources


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

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        build: Callable = build_model,
        data: sources.Source | None = None,
    ) -> None:
        """``data``: the evaluation data (default: ``sources.create(config)``, prepared)."""
        self.config = config
        self.data = data if data is not None else sources.create(config)
        self.accumulator = metrics.Accumulator.for_data(config.data)  # scheme datasets' layout
        # stat_groups=1: the eval batch is one CSAM group, as in the reference's evaluation.
        model = build(config.model)
        self.step = jax.jit(decoding.make_eval_step(model, flip=self.accumulator.flip))

    def __call__(self, variables: Any, datasets: tuple[str, ...]) -> dict[str, float] | None:
        streams = self.data.eval_streams(datasets, int(self.config.eval_batch_size))
        variables = host_local(variables)
        acc = self.accumulator.fresh()
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
