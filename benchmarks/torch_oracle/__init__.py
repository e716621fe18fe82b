"""An independent PyTorch FGTBT and training step, for cross-checks and the benchmark only.

Not part of the installed package: imported from the repository root (tests, scripts/benchmark.py).
"""
