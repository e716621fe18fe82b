r"""Lowers the train, eval and flip-test eval steps and prints the SHA-256 of each StableHLO text.

  python scripts/lowered_programs.py --config configs/fgtbt.py:release --out_dir /tmp/hlo_main
  git worktree add /tmp/old <commit>
  python scripts/lowered_programs.py --tree /tmp/old --config configs/fgtbt.py:release \
      --out_dir /tmp/hlo_old

Nothing is compiled or computed (shapes only): the trainer's jitted train step (``train.state``
/ ``train.step``, data parallel over this machine's devices) and the evaluator's eval step
(``evaluation.decoding.make_eval_step``), batch ``--batch`` (default: one image per dataset),
lowered as ``train.py`` and ``benchmark.py`` lower them. Two versions of the library whose
programs hash alike compile to the same executables, so any speed difference between them is
noise (how README "Speed" shows that the ``model.kernels`` switch did not change the CPU path).
``--tree`` imports the library (and its ``configs/``) from another checkout instead of this one.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, e.g. configs/fgtbt.py:release"
)
_TREE = flags.DEFINE_string("tree", None, "Checkout to import fgtbt_jax from (default: this one).")
_BATCH = flags.DEFINE_integer("batch", 4, "Global batch of every step.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Also write <step>.mlir files here.")


def main(argv: list[str]) -> None:
    del argv
    sys.path.insert(0, _TREE.value or str(pathlib.Path(__file__).resolve().parents[1]))
    import jax
    import numpy as np

    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.models.fgtbt import build_model
    from fgtbt_jax.train import sharding
    from fgtbt_jax.train import state as train_state
    from fgtbt_jax.train import step as train_step

    print("fgtbt_jax from", pathlib.Path(sys.modules["fgtbt_jax"].__file__).parent)
    config, b = _CONFIG.value, _BATCH.value
    size = config.img_size
    mesh = sharding.make_mesh(None)
    model = build_model(config.model)
    tx, schedule = train_state.make_optimizer(config)
    init = train_state.init_fn(model, tx, size)
    state = jax.eval_shape(init, *train_state.seed_keys(int(config.seed)))
    shardings = train_state.state_sharding(state, mesh, bool(config.sharding.fsdp))
    batch = {
        "image": jax.ShapeDtypeStruct((b, size, size, 3), np.float32),
        "coords": jax.ShapeDtypeStruct((b, 124, 2), np.int32),
        "mask": jax.ShapeDtypeStruct((b, 124), np.bool_),
        "dataset_id": jax.ShapeDtypeStruct((b,), np.int32),
    }
    step = train_step.make_train_step(model, tx, schedule, config)
    programs = {"train": train_step.jit_train_step(step, shardings, mesh).lower(state, batch)}
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    images = {"image": batch["image"]}
    in_shardings = (sharding.replicated(mesh), sharding.data_sharding(mesh))
    for name, flip in (("eval", False), ("eval_flip", True)):
        fn = decoding.make_eval_step(model, flip_test=flip)
        programs[name] = jax.jit(fn, in_shardings=in_shardings).lower(variables, images)
    for name, lowered in programs.items():
        text = lowered.as_text()
        print(f"{name}: sha256 {hashlib.sha256(text.encode()).hexdigest()} ({len(text)} chars)")
        if _OUT_DIR.value:
            out = pathlib.Path(_OUT_DIR.value)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.mlir").write_text(text)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)
