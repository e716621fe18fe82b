"""Inference on photos: face detection and the crop → landmarks pipeline."""
