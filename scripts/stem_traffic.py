r"""HBM traffic and FLOPs of the two full-resolution stems alone, compiled for one TPU chip.

  JAX_PLATFORMS=cpu python scripts/stem_traffic.py --json stem.json
  JAX_PLATFORMS=cpu python scripts/stem_traffic.py --tree /tmp/old --json stem_old.json

Compiles, for one chip of ``--target`` (through libtpu, no TPU needed), the train-mode forward
pass and parameter gradient of the release stems (``OverlapPatchEmbed`` of stage 1:
``patch_embed1``, 3 → 64 channels, and ``handcrafted_generator1``, 3 → 16; BN → ReLU → 1×1 →
BN → ReLU → 7×7/4 → BN → ReLU → 1×1 → LN) on ``--batch`` images of ``--size``², with the xla
ops, and prints the traffic model's totals (``fgtbt_jax/traffic.py``) and XLA's. Seconds, not
the minutes of a whole train step: how a stem lowering is compared before a release compile.
``--tree`` imports the library from another checkout (the version before a change).
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags

_TREE = flags.DEFINE_string("tree", None, "Checkout to import fgtbt_jax from (default: this one).")
_TARGET = flags.DEFINE_string("target", "tpu:v5e-4", "tpu:<slice>; one of its chips is used.")
_BATCH = flags.DEFINE_integer("batch", 4, "Images.")
_SIZE = flags.DEFINE_integer("size", 480, "Input height and width.")
_DTYPE = flags.DEFINE_string("dtype", "bfloat16", "Compute dtype.")
_JSON = flags.DEFINE_string("json", None, "Write the rows here.")
_TOP = flags.DEFINE_integer("top", 0, "Also print each stem's top instructions by HBM bytes.")
_STEM_FORM = flags.DEFINE_enum(
    "stem_form", "blocks", ["paper", "blocks"], "model.stem_form (a --tree before it: paper)."
)

STEMS = {"patch_embed1": 64, "handcrafted_generator1": 16}  # release widths: E₁, E₁/4


def main(argv: list[str]) -> None:
    del argv
    sys.path.insert(0, _TREE.value or str(pathlib.Path(__file__).resolve().parents[1]))
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from fgtbt_jax import compiled as compiled_figures
    from fgtbt_jax.models.backbone import OverlapPatchEmbed
    from fgtbt_jax.models.layers import Layers
    from fgtbt_jax.ops import xla
    from fgtbt_jax.train import aot

    library = pathlib.Path(sys.modules["fgtbt_jax"].__file__).parent
    print("fgtbt_jax from", library)
    dtype = jnp.dtype(_DTYPE.value)
    on = SingleDeviceSharding(aot.tpu_devices(aot.parse_target(_TARGET.value))[0])
    image = jax.ShapeDtypeStruct((_BATCH.value, _SIZE.value, _SIZE.value, 3), dtype, sharding=on)
    rows = []
    for name, features in STEMS.items():
        layers = Layers(ops=xla, dtype=dtype)
        if _STEM_FORM.value == "paper":  # also what a --tree without model.stem_form builds
            stem = OverlapPatchEmbed.of_stage(0, features, layers, name=name)
        else:
            stem = OverlapPatchEmbed.of_stage(0, features, layers, name=name, stem_form="blocks")
        variables = jax.eval_shape(
            lambda x, stem=stem: stem.init(jax.random.key(0), x, False), image
        )
        variables = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=on), variables
        )

        def loss(params, stats, x, stem=stem):
            (tokens, _, _), _ = stem.apply(
                {"params": params, "batch_stats": stats}, x, True, mutable=["batch_stats"]
            )
            return jnp.sum(tokens.astype(jnp.float32))

        step = jax.jit(jax.value_and_grad(loss))
        compiled = step.lower(variables["params"], variables["batch_stats"], image).compile()
        model = compiled_figures.traffic(compiled)
        row = {
            "stem": name,
            "features": features,
            "target": _TARGET.value,
            "batch": _BATCH.value,
            "size": _SIZE.value,
            "dtype": _DTYPE.value,
            "stem_form": _STEM_FORM.value,
            "library": str(library),
            **model.summary(),
            "xla_flops": compiled_figures.cost(compiled).get("flops"),
            "xla_bytes_accessed": compiled_figures.cost(compiled).get("bytes accessed"),
        }
        rows.append(row)
        print(
            f"{name}: HBM {row['hbm_bytes'] / 1e9:.3f} GB, on-chip "
            f"{row['on_chip_bytes'] / 1e9:.3f} GB, matmul {row['matmul_flops'] / 1e9:.2f} "
            f"GFLOP, XLA bytes accessed {row['xla_bytes_accessed'] / 1e9:.2f} GB"
        )
        for r in sorted(model.rows, key=lambda r: -r.hbm_bytes)[: _TOP.value]:
            print(f"  {r.hbm_bytes / 1e9:7.3f} GB  {r.opcode:12s} {r.name:24s} {r.op_name[-90:]}")
    if _JSON.value:
        pathlib.Path(_JSON.value).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    app.run(main)
