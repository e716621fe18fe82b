r"""Exports the eval function as ONNX or serialized StableHLO, and verifies it in its runtime.

  python scripts/export.py --config configs/fgtbt.py:release --checkpoint fgtbt_b4.pth \
      --format onnx --with_flip --decode --batch 1 --out fgtbt_b4.onnx --verify
  python scripts/export.py --config configs/fgtbt.py:release --checkpoint ckpt/fgtbt_b4 \
      --format stablehlo --batch dynamic --out fgtbt_b4.shlo

Input: ``images`` (B, S, S, 3) float32 NHWC, RGB, ImageNet-normalized. Output: ``heatmaps``
(B, S/2, S/2, 124); with ``--decode`` ``points`` (B, 124, 2) (x, y) in heatmap index space and
``scores`` (B, 124). ``--config.model.csam_reduction=sample`` exports batch-independent
serving; the default (``batch``) is the reference behaviour. The ONNX model's metadata
(``fgtbt.*``) records all of this; the StableHLO file gets it in ``OUT.json``. ONNX needs the
exportable high-pass (``model.fft=dft``, set automatically, parity-tested against the FFT).
``--verify`` runs the artifact (onnxruntime / ``jax.export.deserialize``) at batch 1 and 3
against JAX and prints max |diff| / max |JAX| per output (``--verify_json`` writes them).
``--out`` and ``--verify_json`` may be ``gs://`` URLs; each file appears whole or not at all.
"""

from __future__ import annotations

import json
import pathlib
import time

from absl import app, flags
from ml_collections import config_flags

import fgtbt_jax
from fgtbt_jax import errors, paths, schemes
from fgtbt_jax.evaluation import decoding
from fgtbt_jax.export import function, stablehlo, verify

ROOT = pathlib.Path(__file__).resolve().parents[1]

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(ROOT / "configs" / "fgtbt.py") + ":release", "Config, e.g. :release"
)
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Release-layout .pth, state dict or orbax directory."
)
_RANDOM_INIT = flags.DEFINE_bool(
    "random_init", False, "No checkpoint: random parameters (config.seed), for verification runs."
)
_FORMAT = flags.DEFINE_enum("format", "onnx", ["onnx", "stablehlo"], "Artifact format.")
_BATCH = flags.DEFINE_string("batch", "dynamic", "Batch size, or 'dynamic'.")
_WITH_FLIP = flags.DEFINE_bool("with_flip", False, "Average with the mirrored input's maps.")
_DECODE = flags.DEFINE_bool("decode", False, "Output points and scores instead of heatmaps.")
_REFINE = flags.DEFINE_enum("refine", "dark", decoding.REFINEMENTS, "Decoding (with --decode).")
_OPSET = flags.DEFINE_integer("opset", 18, "ONNX opset (jax2onnx needs >= 18).")
_OUT = flags.DEFINE_string("out", None, "Output file.", required=True)
_VERIFY = flags.DEFINE_bool("verify", False, "Check the artifact against JAX (batch 1 and 3).")
_VERIFY_JSON = flags.DEFINE_string("verify_json", None, "Write the verification rows here.")


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    # Local, gs:// (or hf:// for the checkpoint); anything else fails here, before compiling.
    paths.check(_CHECKPOINT.value, "--checkpoint", hub=True)
    out = paths.resolve(_OUT.value, "--out")
    paths.check(_VERIFY_JSON.value, "--verify_json")
    if _FORMAT.value == "onnx" and config.model.fft != "dft":
        print("ONNX: using model.fft=dft (the FFT high-pass as real matmuls)")
        config.model.fft = "dft"
    batch = None if _BATCH.value == "dynamic" else int(_BATCH.value)
    if _FORMAT.value == "onnx" and _DECODE.value and batch is None:
        # jax2onnx 0.17 cannot lower the arg-max decoding's `%` on a symbolic dimension.
        raise app.UsageError("ONNX with --decode needs a fixed --batch (e.g. --batch 1)")
    size = int(config.img_size)
    if _RANDOM_INIT.value == bool(_CHECKPOINT.value):
        raise app.UsageError("give exactly one of --checkpoint and --random_init")
    unified = schemes.configure(config)  # the head follows --config.data.schemes
    if _RANDOM_INIT.value:
        import jax

        from fgtbt_jax.models.fgtbt import build_model, init_variables

        model = build_model(config.model)
        variables = init_variables(model, jax.random.PRNGKey(config.seed), size)
    else:
        model, variables = fgtbt_jax.load_pretrained(_CHECKPOINT.value, config, "--checkpoint")
    fn = function.inference_fn(
        model,
        variables,
        with_flip=_WITH_FLIP.value,
        decode=_DECODE.value,
        refine=_REFINE.value,
        channel_flip=unified.flip,
    )
    names = function.output_names(_DECODE.value)
    meta = function.metadata(
        config,
        with_flip=_WITH_FLIP.value,
        decode=_DECODE.value,
        refine=_REFINE.value,
        batch=_BATCH.value,
    )
    meta["fgtbt.fft"] = str(config.model.fft)
    meta["fgtbt.weights"] = "random init" if _RANDOM_INIT.value else str(_CHECKPOINT.value)
    t0 = time.time()
    if _FORMAT.value == "onnx":
        from fgtbt_jax.export import onnx as onnx_export
        from fgtbt_jax.inference.onnx_backend import OnnxPredictor

        proto = onnx_export.export(
            fn, size, batch, output_names=names, metadata=meta, opset=_OPSET.value
        )
        blob = proto.SerializeToString()
        paths.write_bytes(out, blob)  # each artifact whole or not at all, local or gs://
        predictor = OnnxPredictor(out) if _VERIFY.value else None  # read back from --out
        runtimes = {"onnxruntime": lambda x: [predictor(x)[n] for n in names]}
    else:
        blob = stablehlo.export(fn, size, batch).serialize()
        paths.write_bytes(out, blob)
        paths.write_text(f"{out}.json", json.dumps(meta, indent=1) + "\n")
        loaded = stablehlo.load(out) if _VERIFY.value else None
        runtimes = {"jax.export": lambda x: loaded.call(x)}
    print(f"wrote {out} ({len(blob) / 2**20:.1f} MiB) in {time.time() - t0:.1f} s")
    if _VERIFY.value:
        batches = (1, 3) if batch is None else (batch,)
        rows = verify.verify(fn, names, size, runtimes, batches)
        for r in rows:
            print(
                f"{r['runtime']} batch {r['batch']} {r['output']}: max |diff| "
                f"{r['max_abs_diff']:.3g} / max |JAX| {r['max_magnitude']:.3g}"
                f" = {r['relative']:.2e}"
            )
        if _VERIFY_JSON.value:
            record = {"config": config.preset, "format": _FORMAT.value, "metadata": meta}
            record["rows"] = rows
            paths.write_text(
                paths.resolve(_VERIFY_JSON.value, "--verify_json"),
                json.dumps(record, indent=1) + "\n",
            )


if __name__ == "__main__":
    errors.run(main)
