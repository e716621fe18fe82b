"""One Euro filter (Casiez, Roussel & Vogel, CHI 2012) for landmark trajectories.

An exponential smoother whose cutoff frequency rises with the signal's speed: at rest it
low-passes at ``min_cutoff`` Hz (jitter goes away), in motion at ``min_cutoff + beta·|ẋ|`` Hz
(lag goes away). ``ẋ`` is itself low-passed at ``d_cutoff`` Hz. All coordinates of an array are
filtered independently (elementwise), with one shared time stamp per sample.

Units: the cutoffs are in Hz of the sample time stamps (seconds), ``beta`` in 1 / (signal unit).
The tracker feeds landmarks divided by the face size (the side of the crop box, ``200·scale``),
so one ``beta`` suits faces of any size in pixels: ``|ẋ|`` is then in face sizes per second.
"""

from __future__ import annotations

import math

import numpy as np

# Defaults for landmarks in face-size units (docs/inference.md "Video" says how they were chosen).
MIN_CUTOFF = 1.0
BETA = 10.0
D_CUTOFF = 1.0


def _alpha(cutoff: np.ndarray | float, dt: float) -> np.ndarray | float:
    """Smoothing factor of a first-order low-pass with ``cutoff`` Hz at time step ``dt`` s."""
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)


class OneEuroFilter:
    """Elementwise One Euro filter of arrays of a fixed shape (float64 state).

    ``f(x, t)`` returns the filtered ``x`` (same shape, float64) for a sample at time ``t``
    seconds; the first sample (and the first after :meth:`reset`) passes through unchanged.
    Samples with a time stamp not after the previous one are treated as 1 ms later.
    """

    def __init__(
        self, min_cutoff: float = MIN_CUTOFF, beta: float = BETA, d_cutoff: float = D_CUTOFF
    ) -> None:
        if not (min_cutoff > 0 and d_cutoff > 0 and beta >= 0):
            raise ValueError(
                f"One Euro filter needs min_cutoff > 0, d_cutoff > 0, beta >= 0; got "
                f"min_cutoff={min_cutoff}, d_cutoff={d_cutoff}, beta={beta}"
            )
        self.min_cutoff = float(min_cutoff)
        self.beta = float(beta)
        self.d_cutoff = float(d_cutoff)
        self.reset()

    def reset(self) -> None:
        """Forget the past: the next sample passes through unchanged."""
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    def __call__(self, x: np.ndarray, t: float) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if self._x is None:
            self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
            return x.copy()
        if x.shape != self._x.shape:
            raise ValueError(f"One Euro filter: shape changed from {self._x.shape} to {x.shape}")
        dt = max(float(t) - self._t, 1e-3)
        dx = (x - self._x) / dt
        self._dx = self._dx + _alpha(self.d_cutoff, dt) * (dx - self._dx)
        cutoff = self.min_cutoff + self.beta * np.abs(self._dx)
        self._x = self._x + _alpha(cutoff, dt) * (x - self._x)
        self._t = float(t)
        return self._x.copy()
