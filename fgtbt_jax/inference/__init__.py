"""Inference: face detection, the crop → landmarks pipeline, video tracking and smoothing."""
