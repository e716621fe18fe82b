"""The unified 124-landmark scheme and per-dataset metadata (SPEC §1, §3, §5).

Everything here is read from ``data/landmarks.json`` (a copy of the reference's
``landmarks.json``). Dataset names are the reference's: ``COFW``, ``WFLW``, ``300W``, ``AFLW``.
"""

from __future__ import annotations

import functools
import json
from importlib import resources

import numpy as np

NUM_UNIFIED = 124
# Order of the datasets inside a training batch (SPEC §4) and of dataset ids 0..3.
DATASETS: tuple[str, ...] = ("COFW", "WFLW", "300W", "AFLW")
DATASET_ID: dict[str, int] = {name: i for i, name in enumerate(DATASETS)}


@functools.cache
def _table() -> dict:
    with resources.files("fgtbt_jax").joinpath("data/landmarks.json").open() as f:
        return json.load(f)


def _check(dataset: str) -> str:
    if dataset not in DATASET_ID:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")
    return dataset


def num_landmarks(dataset: str) -> int:
    return int(_table()["datasets"][_check(dataset)]["num_landmarks"])


def unified_index(dataset: str) -> np.ndarray:
    """(K,) int32: unified channel of each of the dataset's K points."""
    return np.asarray(_table()["datasets"][_check(dataset)]["unified_index"], np.int32)


def flip_pairs(dataset: str) -> np.ndarray:
    """(P, 2) int32: zero-based symmetric point pairs swapped by a horizontal flip."""
    return np.asarray(_table()["datasets"][_check(dataset)]["flip_pairs_zero_based"], np.int32)


def flip_permutation(dataset: str) -> np.ndarray:
    """(K,) int32 permutation p so that ``points_flipped = points[p]`` swaps the pairs."""
    perm = np.arange(num_landmarks(dataset), dtype=np.int32)
    for a, b in flip_pairs(dataset):
        perm[a], perm[b] = b, a
    return perm


def occurrence_counts() -> np.ndarray:
    """(124,) int32: how many datasets annotate each unified landmark (1..4)."""
    return np.asarray(_table()["occurrence_count_per_unified_landmark"], np.int32)


def fmb_beta() -> float:
    return float(_table()["fmb_beta"])


def fmb_weights(beta: float | None = None, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """(124,) class-balanced weights w_j = (1 - β) / (1 - β^n_j) (SPEC §3), computed in float64
    and returned as ``dtype``."""
    beta = fmb_beta() if beta is None else beta
    n = occurrence_counts().astype(np.float64)
    return ((1.0 - beta) / (1.0 - beta**n)).astype(dtype)


def annotation_mask() -> np.ndarray:
    """(4, 124) bool: row d marks the unified channels dataset ``DATASETS[d]`` annotates."""
    mask = np.zeros((len(DATASETS), NUM_UNIFIED), bool)
    for d, name in enumerate(DATASETS):
        mask[d, unified_index(name)] = True
    return mask


def unified_flip_permutation() -> np.ndarray:
    """(124,) int32 channel permutation of the unified set that mirrors left and right.

    Built from the per-dataset pairs; channels no dataset pairs map to themselves.
    """
    perm = np.arange(NUM_UNIFIED, dtype=np.int32)
    for name in DATASETS:
        idx = unified_index(name)
        for a, b in flip_pairs(name):
            perm[idx[a]], perm[idx[b]] = idx[b], idx[a]
    return perm
