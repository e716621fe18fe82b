"""Shared test fixtures: the reference data copied from ../shared/reference into tests/fixtures.

The test process runs JAX on the CPU (``JAX_PLATFORMS=cpu``, inherited by child processes) with
eight CPU devices (``jax_num_cpu_devices``, set here before any backend starts) so that sharding
tests run in-process on a mesh like a v5e-8's; everything else runs on the first device as usual.

The whole run shares one JAX persistent compilation cache in pytest's cache folder
(``.pytest_cache/d/jax_compilation_cache``), passed on to every child process through the
environment (which ``helpers.subprocess_env`` keeps): the suite compiles the same tiny-network
programs in many tests and processes (the train step of every ``train.py`` start, the evaluation
step, the forward of each parity test), and on two cores a hit saves up to a minute per compile.
A clean checkout starts with an empty cache; ``pytest --cache-clear`` empties it.

Every JAX process of the suite compiles with ``helpers.SUITE_XLA_FLAGS`` (XLA:CPU without LLVM
optimization and without the MLIR fusion emitters; added to any ``XLA_FLAGS`` of the
environment).

The suite runs on one pytest-xdist worker per core, at most four (``addopts`` in pyproject.toml,
:func:`pytest_xdist_auto_num_workers`), each test file on one worker; the workers share the
compilation cache. libtpu's machine-wide lock is off (``ALLOW_MULTIPLE_LIBTPU_LOAD``): the TPU
compiles of two workers may overlap, and none of them needs a chip.
"""

from __future__ import annotations

import os
import pathlib

import jax
import numpy as np
import pytest
from helpers import SUITE_XLA_FLAGS

# The suite runs on the CPU, also where libtpu (the `tpu` extra, for the AOT test) or a GPU
# plugin is installed: this process and every child it starts.
os.environ["JAX_PLATFORMS"] = "cpu"
if SUITE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), SUITE_XLA_FLAGS]))
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"

MAX_WORKERS = 4  # each worker holds a JAX CPU backend and compiles (1–3 GB resident)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))


CACHE_SETTINGS = (
    "jax_compilation_cache_dir",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_compilation_cache_max_size",
)


def pytest_configure(config: pytest.Config) -> None:
    if getattr(config, "cache", None) is None:  # -p no:cacheprovider: no cache folder
        return
    if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR wins
        cache = config.cache.mkdir("jax_compilation_cache")
        jax.config.update("jax_compilation_cache_dir", str(cache))
    # Cache every compile over 0.2 s (the default, 1 s, leaves out most of the suite's jits);
    # a size limit turns on JAX's file lock, so concurrent processes never read half a file.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_compilation_cache_max_size", 4 << 30)
    for name in CACHE_SETTINGS:  # for every child process too
        os.environ[name.upper()] = str(getattr(jax.config, name))


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


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """A real GCS server (fake-gcs-server on 127.0.0.1, see tests/gcs_server.py) for the
    session; this process's clients point at it (its ``env`` is for child processes)."""
    import gcs_server as server_module

    jax.devices()  # the backend starts before any storage client's threads do
    log = tmp_path_factory.mktemp("fake_gcs") / "server.log"
    with server_module.running(log) as server:
        before = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in before.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    """A new empty bucket on :func:`gcs_server`: ``gs://name``."""
    return gcs_server.new_bucket()


@pytest.fixture(scope="module")
def torch_two_threads():
    """PyTorch on two threads for a module's tests (the CI machine has two cores)."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
