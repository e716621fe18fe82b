"""Shared test fixtures: the reference data copied from ../shared/reference into tests/fixtures.

The test process has eight CPU devices (``jax_num_cpu_devices``, set here before any backend
starts) so that sharding tests run in-process on a mesh like a v5e-8's; everything else runs on
the first device as usual.
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

jax.config.update("jax_num_cpu_devices", 8)

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
REFERENCE = FIXTURES / "reference"
REAL_FACES = FIXTURES / "real_faces"


@pytest.fixture(scope="session")
def ref_dir() -> pathlib.Path:
    return REFERENCE


@pytest.fixture(scope="session")
def real_faces_dir() -> pathlib.Path:
    return REAL_FACES


@pytest.fixture(scope="session")
def ref_outputs() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "tiny_reference_outputs.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def ref_float64() -> dict[str, np.ndarray]:
    """The original implementation run entirely in float64 (README of the reference data)."""
    with np.load(REFERENCE / "tiny_reference_float64.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="session")
def eval_ref() -> dict[str, np.ndarray]:
    with np.load(REFERENCE / "eval_and_transform_reference.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def torch_two_threads():
    """PyTorch on two threads for a module's tests (the CI machine has two cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
