"""Plain helpers shared by several test modules (import as ``from helpers import …``)."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from fgtbt_jax import landmarks
from fgtbt_jax.train import aot

ROOT = pathlib.Path(__file__).parents[1]

# XLA flags of every JAX process of the suite (this one: tests/conftest.py; children:
# subprocess_env). The suite's cost is compiling small programs that then run for milliseconds:
# XLA:CPU without LLVM's optimization of the generated kernels (about 70 % of the CPU time) and
# with its elemental IR emitter instead of the MLIR fusion emitters (a cold `train.py` start of
# the tiny preset: user CPU 134 → 90 s); results differ by float32 rounding at most (contracted
# multiply-adds, another loop order in reductions). Processes that compile for TPU keep XLA's
# defaults (``subprocess_env(xla_flags="")``): libtpu reads XLA_FLAGS too, compiled slower with
# the first flag (the tiny train step: 98 → 120 s) and the traffic tests assert the bytes of its
# default programs.
SUITE_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"

# The architecture of ../shared/reference/tiny_checkpoint.pth
# (benchmarks.torch_oracle.fgtbt.FGTBTTorch).
TINY_TORCH = dict(
    embed_dims=(16, 32, 64, 128),
    num_heads=(1, 2, 4, 8),
    depths=(2, 1, 2, 1),
    sr_ratios=(8, 4, 2, 1),
    decoder_dim=64,
)

# Every (model.kernels, model.decoder_form) pair: both decoder forms on both op paths. The first
# of each op path is what decoder_form="auto" picks with it ("fused").
OP_PATHS_AND_FORMS = (("cpu", "fused"), ("cpu", "paper"), ("xla", "fused"), ("xla", "paper"))
# The pairs "auto" does not pick (the paper form on both op paths): the float64 train step (a
# minute of compile per pair) runs these, the float32 one the "auto" pairs, so every pair's
# gradients are held to the reference somewhere.
PAPER_OP_PATHS_AND_FORMS = (("cpu", "paper"), ("xla", "paper"))


def op_path_id(pair: tuple[str, str]) -> str:
    return f"kernels={pair[0]}-decoder={pair[1]}"


def reference_batch(ref_outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The reference train batch (COFW, WFLW, 300W, AFLW, one each) in unified form: ``image``
    (4, S, S, 3) NHWC, ``coords`` (4, 124, 2) int32, ``mask`` (4, 124) bool, ``dataset_id`` (4,)."""
    coords = np.zeros((4, landmarks.NUM_UNIFIED, 2), np.int32)
    mask = np.zeros((4, landmarks.NUM_UNIFIED), bool)
    for b, name in enumerate(landmarks.DATASETS):
        idx = landmarks.unified_index(name)
        coords[b, idx] = ref_outputs[f"train_target_coords_{name}"][0]
        mask[b, idx] = True
    return {
        "image": ref_outputs["input_nchw"].transpose(0, 2, 3, 1),
        "coords": coords,
        "mask": mask,
        "dataset_id": np.arange(4, dtype=np.int32),
    }


def tiny_torch_model(ref_dir: pathlib.Path, **kw):
    """PyTorch FGTBT with ``tiny_checkpoint.pth`` loaded strictly (``kw``: FGTBTTorch options)."""
    import torch

    from benchmarks.torch_oracle.fgtbt import FGTBTTorch
    from fgtbt_jax.porting.pth import load_pth

    sd = load_pth(ref_dir / "tiny_checkpoint.pth")["model"]["sd"]
    model = FGTBTTorch(**TINY_TORCH, **kw)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    return model


def torch_reference_batch(ref_outputs: dict[str, np.ndarray]) -> dict:
    """``reference_batch`` as torch tensors, image NCHW."""
    import torch

    batch = {k: torch.from_numpy(v) for k, v in reference_batch(ref_outputs).items()}
    batch["image"] = torch.from_numpy(ref_outputs["input_nchw"])
    return batch


# scripts/train.py on the tiny preset for two steps (synthetic data, a checkpoint per step, no
# evaluation): one train-step program that the suite's compilation cache shares between tests.
TINY_TWO_STEPS = [
    "--config.data.source=synthetic",
    "--config.data.batch_per_dataset=1",
    "--config.total_steps=2",
    "--config.log_every=1",
    "--config.checkpoint_every=1",
    "--config.eval_every=0",
]


def assert_trees_close(a, b) -> None:
    """Two trees of arrays equal: floats up to summation order (Adam normalises each step, so
    an element whose gradient is close to zero may move by a few percent of lr = 1e-3
    differently when the order changes), everything else exactly."""
    import jax

    for (path, x), y in zip(
        jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
    ):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(
                x, y, rtol=2e-5, atol=1e-4, err_msg=jax.tree_util.keystr(path)
            )
        else:
            np.testing.assert_array_equal(x, y, jax.tree_util.keystr(path))


def subprocess_env(*, xla_flags: str = SUITE_XLA_FLAGS, **extra: str) -> dict[str, str]:
    """The environment for a child Python process: CPU JAX, no inherited JAX / XLA settings or
    cluster variables (a child never joins a job by accident) except the test run's compilation
    cache (tests/conftest.py), ``xla_flags`` (:data:`SUITE_XLA_FLAGS`) as XLA_FLAGS, the
    project and tests/ importable, then ``extra`` (an ``XLA_FLAGS`` there adds to ``xla_flags``)."""
    cluster = ("JAX_", "XLA_", "SLURM_", "OMPI_", "TPU_", "MEGASCALE_")
    cache = ("JAX_COMPILATION_CACHE_", "JAX_PERSISTENT_CACHE_")
    env = {k: v for k, v in os.environ.items() if k.startswith(cache) or not k.startswith(cluster)}
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH")])
    )
    env["XLA_FLAGS"] = " ".join(filter(None, [xla_flags, extra.pop("XLA_FLAGS", "")]))
    env.update(extra)
    return env


def run_script(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """``python *args`` from the project root with ``subprocess_env(**env)``, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error_line(res, *needles: str) -> str:
    assert res.returncode == 1, res.stdout[-2000:] + res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), res.stderr[-3000:]
    for needle in needles:
        assert needle in res.stderr, res.stderr[-3000:]
    return last


needs_cuda_plugin = pytest.mark.skipif(
    not aot.cuda_plugin_installed(),
    reason="the CUDA plugin is not installed (pip install -e '.[gpu-aot]'); deviceless GPU "
    "compiles need it",
)


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_BLOCKING_RUNNER = """
import importlib.util, runpy, sys
BLOCKED = tuple(sys.argv[1].split(","))
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked in this test)")
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):  # "is it installed?" probes see it absent too
    return None if name.split(".")[0] in BLOCKED else _find_spec(name, package)
importlib.util.find_spec = find_spec
sys.argv = sys.argv[2:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("BLOCKED_MODULES_LOADED", loaded)
"""


def blocked_command(blocked: tuple[str, ...], script: str | os.PathLike, *args: str) -> list[str]:
    """A command running ``script`` with ``args`` where importing any of the ``blocked``
    top-level modules fails (as if not installed); it prints ``BLOCKED_MODULES_LOADED [...]``
    at exit, which must be ``[]``."""
    return [sys.executable, "-c", _BLOCKING_RUNNER, ",".join(blocked), str(script), *args]


def _tiny_loss_config():
    from configs import fgtbt

    return fgtbt.get_config("tiny").loss


# config.loss of the presets (the loss has no defaults of its own).
TINY_LOSS = _tiny_loss_config()


def distance_to_exact(
    grads: dict[str, np.ndarray], ref_float64: dict[str, np.ndarray]
) -> dict[str, float]:
    """Per non-zero gradient of the float64 file: max|got - exact| / max|exact|."""
    zero = set(ref_float64["grad_structurally_zero_names"].tolist())
    out = {}
    for key, exact in ref_float64.items():
        name = key.removeprefix("grad/")
        if key.startswith("grad/") and name not in zero:
            got = np.asarray(grads[name], np.float64)
            out[name] = float(np.abs(got - exact).max() / np.abs(exact).max())
    return out


DEMO_SCHEME = ROOT / "fgtbt_jax" / "data" / "schemes" / "demo_my19.json"


def write_pts_faces(
    folder: os.PathLike, num_faces: int, num_points: int, *, seed: int = 0, size: int = 64
) -> dict[str, np.ndarray]:
    """``num_faces`` small PNG pictures with a same-named ``.pts`` of ``num_points`` random
    points each in ``folder``; returns ``{image name: (num_points, 2) points}``."""
    import cv2

    from input_pipeline import formats

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(num_faces):
        name = f"face_{i:02d}.png"
        pts = np.round(rng.uniform(0.2 * size, 0.8 * size, (num_points, 2)), 2)
        cv2.imwrite(str(folder / name), rng.integers(0, 255, (size, size, 3), np.uint8))
        formats.write_pts(folder / f"face_{i:02d}.pts", pts)
        out[name] = pts
    return out


def wide_tiny_checkpoint(ref_dir: pathlib.Path, out: pathlib.Path):
    """The tiny reference checkpoint widened to the four datasets + the demo MY19 scheme
    (133 channels, :func:`fgtbt_jax.schemes.extend_head`), written to ``out`` (.pth).
    Returns ``(config, unified, variables)``; ``config`` lists MY19 and its scheme file."""
    from configs import fgtbt
    from fgtbt_jax import export_pth, load_pretrained, schemes

    config = fgtbt.get_config("reference_tiny")
    _, released = load_pretrained(ref_dir / "tiny_checkpoint.pth", config)
    my19 = schemes.load_scheme(DEMO_SCHEME)
    unified = schemes.derive((*landmarks.DATASETS, "MY19"), [my19])
    variables, _ = schemes.extend_head(released, unified, seed=0)
    config.model.num_landmarks = unified.num_channels
    config.data.datasets = unified.datasets
    config.data.schemes = (str(DEMO_SCHEME),)
    export_pth(variables, out, config)
    return config, unified, variables
