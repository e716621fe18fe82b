"""Runs an exported FGTBT ``.onnx`` with onnxruntime: numpy in, numpy out, no JAX imported."""

from __future__ import annotations

import os

import numpy as np

from fgtbt_jax import paths


class OnnxPredictor:
    """A model from ``scripts/export.py --format onnx``, with its metadata.

    ``predictor(images)``: images (B, S, S, 3) float32 ImageNet-normalized NHWC → dict of the
    model's outputs by name (``heatmaps``, or ``points`` (B, 124, 2) in heatmap index space and
    ``scores`` (B, 124)). ``metadata`` holds the export's ``fgtbt.*`` strings.
    """

    def __init__(self, path: str | os.PathLike, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.path = str(path)
        model: str | bytes = self.path
        if paths.is_remote(self.path):  # gs://: onnxruntime reads local files or bytes
            remote = paths.resolve(self.path, "model")
            if not remote.exists():
                raise FileNotFoundError(f"no ONNX model at {self.path}")
            model = remote.read_bytes()
        elif not os.path.isfile(self.path):
            raise FileNotFoundError(f"no ONNX model at {self.path}")
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)
        if "fgtbt.img_size" not in self.metadata:
            raise ValueError(f"{self.path} has no fgtbt.* metadata (not from scripts/export.py)")
        self.img_size = int(self.metadata["fgtbt.img_size"])
        self.heatmap_size = int(self.metadata["fgtbt.heatmap_size"])
        self.with_flip = self.metadata["fgtbt.with_flip"] == "true"
        self.decode = self.metadata["fgtbt.decode"] == "true"
        self.refine = self.metadata["fgtbt.refine"]
        # Normalization of the input: (rgb / 255 - mean) / std.
        self.mean = np.asarray(self.metadata["fgtbt.mean"].split(","), np.float32)
        self.std = np.asarray(self.metadata["fgtbt.std"].split(","), np.float32)
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        expected = (self.img_size, self.img_size, 3)
        if images.ndim != 4 or images.shape[1:] != expected or images.dtype != np.float32:
            raise ValueError(
                f"{self.path} takes float32 (B, {self.img_size}, {self.img_size}, 3) images, "
                f"got {images.dtype} {images.shape}"
            )
        outputs = self.session.run(self.output_names, {"images": images})
        return dict(zip(self.output_names, outputs, strict=True))
