r"""Lowers the train, eval and flip-test eval steps and prints the SHA-256 of each StableHLO text.

  python scripts/lowered_programs.py --config configs/fgtbt.py:release --out_dir /tmp/hlo_main
  git worktree add /tmp/old <commit>
  python scripts/lowered_programs.py --tree /tmp/old --config configs/fgtbt.py:release \
      --out_dir /tmp/hlo_old

Nothing is compiled or computed (shapes only): the programs ``scripts/aot_compile.py`` compiles
for a TPU (``train.aot.train_step_and_args`` / ``eval_step_and_args``: the trainer's train step
and the evaluator's flip-test eval step, with their shardings), here for this machine's
devices, plus the eval step without the flip test on the same arguments. The batch is the
config's (``data.batch_per_dataset`` per dataset). Two versions of the library whose programs
hash alike compile to the same executables, so any speed difference between them is noise (how
docs/performance.md shows that the ``model.kernels`` switch did not change the CPU path). ``--tree``
imports the library from another checkout instead of this one.
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
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Also write <step>.mlir files here.")


def main(argv: list[str]) -> None:
    del argv
    sys.path.insert(0, _TREE.value or str(pathlib.Path(__file__).resolve().parents[1]))
    import jax

    from fgtbt_jax.evaluation import decoding
    from fgtbt_jax.models.fgtbt import build_model
    from fgtbt_jax.train import aot, sharding

    print("fgtbt_jax from", pathlib.Path(sys.modules["fgtbt_jax"].__file__).parent)
    config = _CONFIG.value
    mesh = sharding.make_mesh(None)
    train, train_args = aot.train_step_and_args(config, mesh)
    flip, eval_args = aot.eval_step_and_args(config, mesh)
    plain = jax.jit(
        decoding.make_eval_step(build_model(config.model), flip_test=False),
        in_shardings=jax.tree.map(lambda a: a.sharding, eval_args),
        out_shardings=sharding.data_sharding(mesh),  # as the flip-test step's
    )
    programs = {
        "train": train.lower(*train_args),
        "eval": plain.lower(*eval_args),
        "eval_flip": flip.lower(*eval_args),
    }
    for name, lowered in programs.items():
        text = lowered.as_text()
        print(f"{name}: sha256 {hashlib.sha256(text.encode()).hexdigest()} ({len(text)} chars)")
        if _OUT_DIR.value:
            out = pathlib.Path(_OUT_DIR.value)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"{name}.mlir").write_text(text)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    app.run(main)  # not fgtbt_jax.errors.run: fgtbt_jax must be imported from --tree, in main
