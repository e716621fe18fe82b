"""The one data entry point: ``create(config)`` picks the source of ``config.data.source``.

This module is the only reader of ``config.data.source`` (MaxText's ``create_data_iterator``
pattern). Sources:

* ``"synthetic"`` — in-memory generated batches (:mod:`input_pipeline.synthetic`); no files,
  no TensorFlow. Evaluation: ``config.data.synthetic_eval_images`` held-out faces per dataset.
* ``"demo"``      — the bundled synthetic faces written in the official formats and prepared
  as TFDS datasets in ``config.data.data_dir`` (generated on first use).
* ``"official"``  — TFDS datasets prepared from the official files (``scripts/prepare_data.py``,
  or on first use from ``config.data.manual_dir``).

``create`` prepares what needs preparing — process 0 first, then a barrier, then the other
processes (a no-op where ``data_dir`` is shared; concurrent preparation of one TFDS directory
would corrupt it). A ``gs://`` data_dir is staged: each process copies the dataset folders it
reads to ``config.data.stage_dir`` (default a per-user cache) and reads them there; process 0
prepares what is missing there and uploads it before the barrier (:mod:`fgtbt_jax.staging`).
``create`` returns a :class:`Source` bound to this process's share of the data:

* :meth:`Source.train_iterator` — this process's rows of the global batches from a step on,
  seeded by ``config.seed`` (``image`` (B, S, S, 3) float32 NHWC normalised, ``coords``
  (B, C, 2) int32, ``mask`` (B, C) bool, ``dataset_id`` (B,) int32; C = the channels of the
  run's unified set, :func:`fgtbt_jax.schemes.unified_set_of`, 124 without schemes);
* :meth:`Source.eval_streams` — the trainer's evaluation sets (``metrics.accumulate``'s
  contract), one lazy stream per test set;
* :meth:`Source.eval_subsets` / :meth:`Source.eval_iterator` — every subset of a test set, for
  ``scripts/evaluate.py``.

The global batch size, :attr:`Source.global_batch`, comes from the config:
``config.data.batch_per_dataset`` rows of each dataset of ``config.data.datasets`` (built-in
ones and the scheme datasets of ``config.data.schemes``).
TensorFlow is imported only by the ``demo`` / ``official`` sources, when they are used.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from fgtbt_jax import errors, landmarks, paths
from input_pipeline import synthetic

SOURCES = ("synthetic", "demo", "official")


def global_batch_size(config: ml_collections.ConfigDict) -> int:
    """Rows of a global batch: ``batch_per_dataset`` × the number of datasets."""
    return len(synthetic.dataset_ids(config))


class Source(abc.ABC):
    """Training and evaluation data of one process (``process_index`` of ``process_count``)."""

    name: str

    def __init__(
        self, config: ml_collections.ConfigDict, process_index: int, process_count: int
    ) -> None:
        self.config = config
        self.process_index, self.process_count = int(process_index), int(process_count)

    @property
    def global_batch(self) -> int:
        """Rows of a global batch (all processes together)."""
        return global_batch_size(self.config)

    @abc.abstractmethod
    def prepare(self, datasets: Sequence[str]) -> None:
        """Makes ``datasets`` readable (called by :func:`create`; all processes, in turn)."""

    @abc.abstractmethod
    def train_iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Endless iterator over this process's rows of the global batches of steps
        ``start_step, start_step + 1, …`` (a pure function of ``config.seed`` and the step)."""

    @abc.abstractmethod
    def eval_subsets(self, dataset: str) -> tuple[str, ...]:
        """The evaluation subsets of ``dataset``, ``"full"`` first."""

    @abc.abstractmethod
    def eval_iterator(
        self, dataset: str, subset: str = "full", batch_size: int = 8
    ) -> Iterator[dict[str, Any]]:
        """This process's batches of one subset of a test set, each row with its ``index`` in
        the single-process order (``metrics.accumulate``'s contract)."""

    def eval_streams(
        self, datasets: Sequence[str], batch_size: int
    ) -> list[Iterable[dict[str, Any]]]:
        """The trainer's evaluation: one lazy stream per test set (its full subset).

        Nothing is read before iteration; every call reads the data again."""

        def stream(name: str) -> Iterator[dict[str, Any]]:
            yield from self.eval_iterator(name, "full", batch_size)

        return [stream(name) for name in datasets]


class SyntheticSource(Source):
    """``config.data.source = "synthetic"``: :mod:`input_pipeline.synthetic` batches."""

    name = "synthetic"

    def prepare(self, datasets: Sequence[str]) -> None:
        pass  # nothing on disk

    def train_iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        return synthetic.make_train_iterator(
            self.config,
            seed=int(self.config.seed),
            process_index=self.process_index,
            process_count=self.process_count,
            start_step=int(start_step),
        )

    def eval_subsets(self, dataset: str) -> tuple[str, ...]:
        return ("full",)

    def eval_iterator(
        self, dataset: str, subset: str = "full", batch_size: int = 8
    ) -> Iterator[dict[str, Any]]:
        if subset != "full":
            raise ValueError(f"source 'synthetic' has only the subset 'full', got {subset!r}")
        return self._share((dataset,), batch_size)

    def eval_streams(
        self, datasets: Sequence[str], batch_size: int
    ) -> list[Iterable[dict[str, Any]]]:
        # One stream over all datasets: its batches mix datasets (as the network sees them).
        return [self._share(tuple(datasets), batch_size)]

    def _share(self, datasets: tuple[str, ...], batch_size: int) -> Iterator[dict[str, Any]]:
        """This process's batches of the evaluation set of ``datasets`` (dealt round-robin)."""
        cfg = ml_collections.ConfigDict(self.config.to_dict())
        cfg.data.datasets = datasets
        batches = synthetic.eval_batches(
            cfg,
            num_per_dataset=int(self.config.data.synthetic_eval_images),
            batch_size=int(batch_size),
        )
        start = 0
        for i, batch in enumerate(batches):
            n = len(batch["dataset_id"])
            if i % self.process_count == self.process_index:
                yield {**batch, "index": np.arange(start, start + n)}
            start += n


class TfdsSource(Source):
    """``config.data.source = "demo" | "official"``: the tf.data pipelines of
    :mod:`input_pipeline.pipeline` over TFDS datasets of that builder config."""

    def __init__(self, name: str, *args: Any) -> None:
        super().__init__(*args)
        self.name = name
        # A gs:// data_dir is read from (and prepared in) its local staging folder.
        data = self.config.data
        self.url = data.data_dir if paths.is_remote(data.data_dir) else None
        if self.url:
            local = paths.run_data_dir(data)
            self.config = ml_collections.ConfigDict(self.config.to_dict())
            self.config.data.data_dir = os.fspath(local)

    def prepare(self, datasets: Sequence[str]) -> None:
        from fgtbt_jax import staging
        from input_pipeline import pipeline

        folders = pipeline.dataset_folders(self.config, datasets, self.name) if self.url else []
        if self.url:
            staging.sync(self.url, self.config.data.data_dir, folders, to_bucket=False)
        if self.name == "demo":
            pipeline.ensure_demo_data(self.config)
        for dataset in datasets:
            if self.name == "official" or dataset not in landmarks.DATASETS:
                pipeline.prepare_from_manual_dir(self.config, dataset, self.name)
        if self.url and self.process_index == 0:  # before the barrier that lets others read
            staging.sync(self.url, self.config.data.data_dir, folders, to_bucket=True)

    def train_iterator(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        from input_pipeline import pipeline

        return pipeline.make_train_iterator(
            self.config,
            variant=self.name,
            seed=int(self.config.seed),
            process_index=self.process_index,
            process_count=self.process_count,
            start_step=int(start_step),
        )

    def eval_subsets(self, dataset: str) -> tuple[str, ...]:
        from input_pipeline import pipeline

        return pipeline.list_eval_subsets(dataset)

    def eval_iterator(
        self, dataset: str, subset: str = "full", batch_size: int = 8
    ) -> Iterator[dict[str, Any]]:
        from input_pipeline import pipeline

        return pipeline.make_eval_iterator(
            self.config,
            dataset,
            subset,
            int(batch_size),
            variant=self.name,
            process_index=self.process_index,
            process_count=self.process_count,
        )


def _barrier(name: str) -> None:
    from fgtbt_jax.evaluation import metrics

    metrics.wait_for_processes(name)


def create(
    config: ml_collections.ConfigDict,
    *,
    datasets: Sequence[str] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> Source:
    """The source of ``config.data.source``, its data prepared, for this process.

    ``datasets``: what to prepare (default ``config.data.datasets``). ``process_index`` /
    ``process_count`` default to JAX's; all processes must call ``create`` (the preparation
    holds a barrier).
    """
    source_name = config.data.source
    if source_name not in SOURCES:
        raise errors.ConfigError(
            f"config.data.source must be one of {SOURCES}, got {source_name!r}"
        )
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if source_name == "synthetic":
        source: Source = SyntheticSource(config, index, count)
    else:
        source = TfdsSource(source_name, config, index, count)
    if source.name != "synthetic":
        names = tuple(config.data.datasets if datasets is None else datasets)
        if index == 0:
            source.prepare(names)
        if count > 1:
            _barrier(f"prepare_{source.name}_data")
            if index > 0:
                source.prepare(names)
    return source
