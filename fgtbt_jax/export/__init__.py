"""Deployment export: the eval function as serialized StableHLO (``jax.export``) or ONNX.

``inference_fn`` builds the exported function; ``stablehlo`` and ``onnx`` serialize it. The
ONNX runtime side (no JAX needed) is :mod:`fgtbt_jax.inference.onnx_backend`.
"""
