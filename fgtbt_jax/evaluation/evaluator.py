"""The trainer's periodic evaluation: NME of the EMA weights on each dataset's test split."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from fgtbt_jax.evaluation import decoding, metrics
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.train import synthetic


def eval_batches(config: ml_collections.ConfigDict, datasets: tuple[str, ...]) -> list | None:
    """Evaluation batches (the :func:`metrics.evaluate` contract) or None if unavailable."""
    if config.data.source == "synthetic":
        cfg = ml_collections.ConfigDict(config.to_dict())
        cfg.data.datasets = datasets
        return synthetic.eval_batches(
            cfg, num_per_dataset=int(config.data.get("synthetic_eval_images", 16))
        )
    try:
        from input_pipeline import pipeline

        make = pipeline.make_eval_iterator
    except (ImportError, AttributeError):
        return None
    return [b for name in datasets for b in make(config, name)]


class Evaluator:
    """Flip-test NME of the EMA weights per dataset, for the trainer's periodic evaluation."""

    def __init__(self, config: ml_collections.ConfigDict, build: Callable = build_model) -> None:
        self.config = config
        # stat_groups=1: the eval batch is one CSAM group, as in the reference's evaluation.
        self.step = jax.jit(decoding.make_eval_step(build(config.model)))
        self._cache: dict[tuple[str, ...], list | None] = {}

    def __call__(self, variables: Any, datasets: tuple[str, ...]) -> dict[str, float] | None:
        if datasets not in self._cache:
            self._cache[datasets] = eval_batches(self.config, datasets)
        batches = self._cache[datasets]
        if not batches:
            logging.warning("no evaluation data for %s; skipping evaluation", datasets)
            return None
        report = metrics.evaluate(self.step, variables, batches)
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
