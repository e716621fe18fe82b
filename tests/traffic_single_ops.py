"""Child process of tests/test_traffic.py: single-op programs compiled for one TPU v5e chip.

Prints one JSON object: per program, the traffic model's totals and per-instruction rows.
Runs in its own process because libtpu holds a machine-wide lock while it is loaded.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax.ops import xla
from fgtbt_jax.train import aot

NHWC = ("NHWC", "HWIO", "NHWC")


def conv(x: jax.Array, w: jax.Array, groups: int = 1) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=groups
    )


PROGRAMS = {
    "elementwise": (lambda x: jnp.tanh(x) * 2, [(4, 128, 128, 128)]),
    "elementwise_padded": (lambda x: jnp.tanh(x) * 2, [(4, 120, 120, 64)]),
    "matmul": (lambda a, b: a @ b, [(1024, 512), (512, 768)]),
    "conv": (conv, [(4, 128, 128, 128), (3, 3, 128, 128)]),
    "depthwise": (lambda x, w: conv(x, w, 128), [(4, 128, 128, 128), (3, 3, 1, 128)]),
    "transpose": (lambda x: x.T, [(1024, 2048)]),
    # Two one-hot batched matmuls, which XLA:TPU rewrites as convolutions over padded windows.
    "space_to_depth": (lambda x: xla.space_to_depth(x, 4), [(4, 96, 96, 3)]),
}


def main() -> None:
    device = aot.tpu_devices(aot.parse_target("tpu:v5e-4"))[0]
    on = SingleDeviceSharding(device)
    out = {}
    for name, (fn, shapes) in PROGRAMS.items():
        args = [jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=on) for s in shapes]
        compiled = jax.jit(fn).lower(*args).compile()
        model = compiled_figures.traffic(compiled)
        out[name] = {
            **model.summary(),
            "xla_bytes_accessed": compiled_figures.cost(compiled).get("bytes accessed"),
            "rows": [dataclasses.asdict(r) for r in model.rows],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
