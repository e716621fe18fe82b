"""Synthetic faces whose 124 unified landmarks are known by construction (the bundled dataset).

A face is a set of parametric 3-D curves in a face frame (x right, y down, z toward the camera;
the temples are at x ≈ ±1): jaw, brows (upper and lower edge), eyelids, irises, nose bridge and
base, nostril wings, outer and inner lips. Each of the 124 unified landmarks is one of those
curves at a fixed parameter (:data:`SLOTS`), so the four datasets, which read their points
through ``landmarks.unified_index``, agree wherever they share a landmark. The picture is drawn
from the *same* curves (sampled densely, projected with the same pose), so the landmarks sit
exactly on the drawn features.

Variety: head pose (yaw/pitch/roll, orthographic projection of the 3-D curves), face shape,
expression (smile, open mouth, brow raise, eye openness, gaze), skin tone, hair, ears, neck and
clothes, glasses, make-up, directional and global lighting, blur and noise, background
clutter, and occluders (hands, objects, scarves, sunglasses) whose coverage sets the COFW
occlusion flags and the WFLW ``occlusion`` attribute.

Coordinate convention of the written annotations: continuous image coordinates in which pixel
``(row i, column j)`` covers ``[j, j+1) × [i, i+1)``, i.e. its centre is at ``index + 0.5``.
Under this convention the reference's training flip ``x → width − x`` of the points is the exact
mirror of ``image[:, ::-1]``.

Writing them as datasets is :mod:`input_pipeline.demo`'s job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fgtbt_jax import landmarks
from input_pipeline import formats

Curve = Callable[[np.ndarray], np.ndarray]  # s (n,) in [0, 1] → (n, 3) face-frame points


def _jaw_params() -> list[float]:
    """Jaw parameter of unified slots 0..48: WFLW's 33 points at k/32, 300W's 17 at k/16
    moved 1/128 toward the chin (so the two markups differ); both mirror-symmetric."""
    t = {}
    for k, u in enumerate(landmarks.unified_index("WFLW")[:33]):
        t[int(u)] = k / 32.0
    for k, u in enumerate(landmarks.unified_index("300W")[:17]):
        t.setdefault(int(u), k / 16.0 + np.sign(8 - k) / 128.0)
    assert sorted(t) == list(range(49))
    return [t[u] for u in range(49)]


# Each unified landmark = (curve name, parameter). Left/right follow the image (the face's
# right side is on the image's left). Right-side curves are mirror images of the left-side
# shapes, parameterised the same way (s = 0 at the outer end).
SLOTS: tuple[tuple[str, float], ...] = (
    # 0..48 jaw from the left temple through the chin (24) to the right temple
    *tuple(("jaw", t) for t in _jaw_params()),
    # 49..57 left brow: upper edge outer→inner, lower edge inner→outer
    ("brow_l_up", 0.0), ("brow_l_up", 0.25), ("brow_l_up", 0.5), ("brow_l_up", 0.75),
    ("brow_l_up", 1.0), ("brow_l_lo", 1.0), ("brow_l_lo", 0.75), ("brow_l_lo", 0.5),
    ("brow_l_lo", 0.25),
    # 58..66 right brow: upper edge inner→outer, lower edge outer→inner
    ("brow_r_up", 1.0), ("brow_r_up", 0.75), ("brow_r_up", 0.5), ("brow_r_up", 0.25),
    ("brow_r_up", 0.0), ("brow_r_lo", 0.25), ("brow_r_lo", 0.5), ("brow_r_lo", 0.75),
    ("brow_r_lo", 1.0),
    # 67..70 nose bridge top→tip, 71..75 nose base left→right, 76/77 nostril wings
    ("bridge", 0.0), ("bridge", 1 / 3), ("bridge", 2 / 3), ("bridge", 1.0),
    ("nose_base", 0.0), ("nose_base", 0.25), ("nose_base", 0.5), ("nose_base", 0.75),
    ("nose_base", 1.0), ("wing_l", 0.0), ("wing_r", 0.0),
    # 78..89 left eye: upper lid from the outer corner, lower lid from the inner corner
    ("eye_l_up", 0.0), ("eye_l_up", 0.25), ("eye_l_up", 1 / 3), ("eye_l_up", 0.5),
    ("eye_l_up", 0.75), ("eye_l_up", 2 / 3), ("eye_l_up", 1.0), ("eye_l_lo", 0.25),
    ("eye_l_lo", 1 / 3), ("eye_l_lo", 0.5), ("eye_l_lo", 2 / 3), ("eye_l_lo", 0.75),
    # 90..101 right eye: inner corner, upper lid toward the outer corner, lower lid back
    ("eye_r_up", 1.0), ("eye_r_up", 2 / 3), ("eye_r_up", 0.75), ("eye_r_up", 0.5),
    ("eye_r_up", 1 / 3), ("eye_r_up", 0.25), ("eye_r_up", 0.0), ("eye_r_lo", 0.75),
    ("eye_r_lo", 2 / 3), ("eye_r_lo", 0.5), ("eye_r_lo", 1 / 3), ("eye_r_lo", 0.25),
    # 102..108 outer upper lip left→right, 109..113 outer lower lip right→left
    ("lip_uo", 0.0), ("lip_uo", 1 / 6), ("lip_uo", 2 / 6), ("lip_uo", 0.5), ("lip_uo", 4 / 6),
    ("lip_uo", 5 / 6), ("lip_uo", 1.0), ("lip_lo", 5 / 6), ("lip_lo", 4 / 6), ("lip_lo", 0.5),
    ("lip_lo", 2 / 6), ("lip_lo", 1 / 6),
    # 114..121 inner lips: left corner, upper left→right, right corner, lower right→left
    ("lip_ui", 0.0), ("lip_ui", 0.25), ("lip_ui", 0.5), ("lip_ui", 0.75), ("lip_ui", 1.0),
    ("lip_li", 0.75), ("lip_li", 0.5), ("lip_li", 0.25),
    # 122/123 pupils
    ("iris_l", 0.0), ("iris_r", 0.0),
)  # fmt: skip
assert len(SLOTS) == landmarks.NUM_UNIFIED


@dataclasses.dataclass
class FaceParams:
    """Shape, expression and pose of one synthetic face (face-frame units, degrees)."""

    jaw_width: float = 0.95
    jaw_drop: float = 1.3
    jaw_power: float = 2.4
    temple_y: float = -0.3
    brow_y: float = -0.66
    brow_arch: float = 0.08
    brow_thick: float = 0.08
    brow_raise: tuple[float, float] = (0.0, 0.0)  # left, right
    eye_y: float = -0.36
    eye_sep: float = 0.42
    eye_w: float = 0.19
    eye_h: float = 0.1
    eye_open: tuple[float, float] = (1.0, 1.0)
    gaze: tuple[float, float] = (0.0, 0.0)  # image x (right +), y (down +), in [-1, 1]
    iris_r: float = 0.075
    nose_y: float = 0.14
    nose_w: float = 0.42
    nose_h: float = 0.3
    mouth_y: float = 0.58
    mouth_w: float = 0.36
    mouth_open: float = 0.0
    smile: float = 0.0
    lip_upper: float = 0.08
    lip_lower: float = 0.1
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0


def _z_face(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return 0.45 * (1.0 - 0.45 * x**2 - 0.12 * (y + 0.1) ** 2)


def _pts(x, y, z) -> np.ndarray:
    x, y, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(y, float), np.asarray(z, float))
    return np.stack([x, y, z], axis=-1)


def _mirror(curve: Curve) -> Curve:
    return lambda s: curve(s) * np.array([-1.0, 1.0, 1.0])


def _curves(p: FaceParams) -> dict[str, Curve]:
    """The parametric features of face ``p``; each maps s ∈ [0, 1] to (n, 3) points."""

    def jaw(s):
        th = np.pi * s
        c, sn = np.cos(th), np.sin(th)
        e = 2.0 / p.jaw_power
        x = -p.jaw_width * np.sign(c) * np.abs(c) ** e
        y = p.temple_y + p.jaw_drop * np.abs(sn) ** e
        return _pts(x, y, 0.35 * sn - 0.2)

    brow_outer = -(p.eye_sep + p.eye_w + 0.12)
    brow_inner = -0.13

    def brow(side: int, lower: bool) -> Curve:
        raise_ = p.brow_raise[side]

        def f(s):
            x = brow_outer + s * (brow_inner - brow_outer)
            y = p.brow_y - raise_ - p.brow_arch * np.sin(np.pi * (0.2 + 0.75 * s))
            if lower:
                y = y + p.brow_thick * (0.35 + 0.65 * s)
            return _pts(x, y, _z_face(x, y) + 0.03)

        return f

    def eye_corners(side: int):
        cx, cy = -p.eye_sep, p.eye_y
        outer = np.array([cx - p.eye_w, cy + 0.012])
        inner = np.array([cx + p.eye_w, cy])
        return outer, inner

    def eyelid(side: int, lower: bool) -> Curve:
        outer, inner = eye_corners(side)
        op = p.eye_open[side]

        def f(s):
            s = np.asarray(s, float)
            if lower:  # inner → outer
                xy = inner + s[:, None] * (outer - inner)
                xy[:, 1] += 0.45 * p.eye_h * (0.6 + 0.4 * op) * np.sin(np.pi * s) ** 0.9
            else:  # outer → inner
                xy = outer + s[:, None] * (inner - outer)
                xy[:, 1] -= p.eye_h * op * np.sin(np.pi * s**0.9) ** 0.8
            return _pts(xy[:, 0], xy[:, 1], _z_face(xy[:, 0], xy[:, 1]) - 0.02)

        return f

    def iris(side: int) -> Curve:
        gx = p.gaze[0] if side == 0 else -p.gaze[0]  # right-eye shapes are mirrored

        def f(s):
            op = p.eye_open[side]
            x = -p.eye_sep + gx * p.eye_w * 0.45
            y = p.eye_y - 0.27 * p.eye_h * op + p.gaze[1] * p.eye_h * 0.25 * op
            n = np.shape(s)[0]
            return _pts(np.full(n, x), np.full(n, y), _z_face(x, y))

        return f

    def bridge(s):
        y = (p.eye_y + 0.05) + s * (p.nose_y - p.eye_y - 0.05)
        x = np.zeros_like(s)
        return _pts(x, y, _z_face(x, y) + p.nose_h * s**1.3)

    def nose_base(s):
        t = 2.0 * s - 1.0
        x = t * 0.55 * p.nose_w
        y = p.nose_y + 0.06 + 0.04 * (1.0 - t**2)
        return _pts(x, y, _z_face(x, y) + p.nose_h * (0.45 - 0.25 * t**2))

    def wing(s):
        n = np.shape(s)[0]
        x, y = -0.7 * p.nose_w, p.nose_y + 0.01
        return _pts(np.full(n, x), np.full(n, y), _z_face(x, y) + 0.15 * p.nose_h)

    mw = p.mouth_w * (1.0 + 0.15 * p.smile)

    def lip_base(s):
        x = (2.0 * s - 1.0) * mw
        y = p.mouth_y - p.smile * 0.09 * (2.0 * s - 1.0) ** 2
        return x, y

    def opening(u):
        return 0.5 * p.mouth_open * np.sin(np.pi * np.clip(u, 0.0, 1.0)) ** 0.6

    inner_lo, inner_hi = 0.07, 0.93

    def lip_inner(upper: bool) -> Curve:
        def f(u):
            s = inner_lo + np.asarray(u, float) * (inner_hi - inner_lo)
            x, y = lip_base(s)
            if upper:
                y = y - opening(u) - 0.01 * np.sin(np.pi * u)
            else:
                y = y + opening(u)
            return _pts(x, y, _z_face(x, y) + 0.06)

        return f

    def lip_outer(upper: bool) -> Curve:
        def f(s):
            s = np.asarray(s, float)
            u = (s - inner_lo) / (inner_hi - inner_lo)
            x, y = lip_base(s)
            if upper:
                bow = 1.0 - 0.3 * np.exp(-(((s - 0.5) / 0.08) ** 2))
                y = y - opening(u) - 0.01 * np.sin(np.pi * np.clip(u, 0, 1))
                y = y - p.lip_upper * np.sin(np.pi * s) ** 0.7 * bow
            else:
                y = y + opening(u) + p.lip_lower * np.sin(np.pi * s) ** 0.7
            return _pts(x, y, _z_face(x, y) + 0.06)

        return f

    return {
        "jaw": jaw,
        "brow_l_up": brow(0, False),
        "brow_l_lo": brow(0, True),
        "brow_r_up": _mirror(brow(1, False)),
        "brow_r_lo": _mirror(brow(1, True)),
        "eye_l_up": eyelid(0, False),
        "eye_l_lo": eyelid(0, True),
        "eye_r_up": _mirror(eyelid(1, False)),
        "eye_r_lo": _mirror(eyelid(1, True)),
        "iris_l": iris(0),
        "iris_r": _mirror(iris(1)),
        "bridge": bridge,
        "nose_base": nose_base,
        "wing_l": wing,
        "wing_r": _mirror(wing),
        "lip_uo": lip_outer(True),
        "lip_lo": lip_outer(False),
        "lip_ui": lip_inner(True),
        "lip_li": lip_inner(False),
    }


def unified_points_3d(p: FaceParams) -> np.ndarray:
    """(124, 3) face-frame points of the unified landmarks (before pose)."""
    curves = _curves(p)
    out = np.empty((len(SLOTS), 3))
    for name, (idx, params) in _SLOT_GROUPS.items():
        out[idx] = curves[name](params)
    return out


def _slot_groups() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    groups: dict[str, list[tuple[int, float]]] = {}
    for i, (name, s) in enumerate(SLOTS):
        groups.setdefault(name, []).append((i, s))
    return {
        k: (np.array([i for i, _ in v]), np.array([s for _, s in v])) for k, v in groups.items()
    }


_SLOT_GROUPS = _slot_groups()


def _rotation(p: FaceParams) -> np.ndarray:
    y, x, z = np.deg2rad([p.yaw, p.pitch, p.roll])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    return rz @ rx @ ry


class _Projector:
    """Face frame → pixel-centre coordinates (x = column index, y = row index)."""

    def __init__(self, p: FaceParams, center_px: np.ndarray, unit_px: float):
        self.r = _rotation(p)
        self.c = np.asarray(center_px, float)
        self.f = float(unit_px)

    def __call__(self, pts3: np.ndarray) -> np.ndarray:
        return self.c + self.f * (pts3 @ self.r.T)[:, :2]


_DENSE = np.linspace(0.0, 1.0, 33)  # parameters at which curves are drawn

# ----------------------------------------------------------------------------------------------
# Drawing helpers (OpenCV, sub-pixel via fixed-point coordinates)

_SHIFT = 4


def _fx(pts: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(pts) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)


def _poly(img, pts, color, mask=None):
    import cv2

    cv2.fillPoly(img, [_fx(pts)], color, cv2.LINE_AA, _SHIFT)
    if mask is not None:
        cv2.fillPoly(mask, [_fx(pts)], 255, cv2.LINE_8, _SHIFT)


def _line(img, pts, color, thickness):
    import cv2

    cv2.polylines(img, [_fx(pts)], False, color, max(1, int(round(thickness))), cv2.LINE_AA, _SHIFT)


def _ellipse(img, center, axes, angle, color, mask=None):
    import cv2

    c = tuple(int(v) for v in np.round(np.asarray(center) * (1 << _SHIFT)))
    a = tuple(max(1, int(v)) for v in np.round(np.asarray(axes) * (1 << _SHIFT)))
    cv2.ellipse(img, c, a, float(angle), 0, 360, color, -1, cv2.LINE_AA, _SHIFT)
    if mask is not None:
        cv2.ellipse(mask, c, a, float(angle), 0, 360, 255, -1, cv2.LINE_8, _SHIFT)


def _col(c) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.round(c), 0, 255))


SKIN_TONES = np.array(
    [
        [255, 224, 196],
        [241, 194, 155],
        [224, 172, 125],
        [198, 134, 96],
        [160, 105, 66],
        [110, 70, 45],
        [80, 52, 36],
    ],
    float,
)


@dataclasses.dataclass
class Face:
    """One rendered face: RGB image, 124 unified points (annotation convention), flags."""

    image: np.ndarray  # (H, W, 3) uint8 RGB
    points: np.ndarray  # (124, 2) float64, pixel centre at index + 0.5
    occluded: np.ndarray  # (124,) bool
    params: FaceParams
    attributes: dict[str, bool]


def sample_params(rng: np.random.Generator, difficulty: str = "normal") -> FaceParams:
    """Random face shape, expression and pose. ``difficulty``: normal | hard | frontal."""
    hard = difficulty == "hard"
    if difficulty == "frontal":
        yaw, pitch, roll = rng.uniform(-12, 12), rng.uniform(-8, 8), rng.uniform(-10, 10)
    elif hard:
        yaw, pitch, roll = rng.uniform(-50, 50), rng.uniform(-25, 25), rng.uniform(-35, 35)
    else:
        yaw = float(np.clip(rng.normal(0, 16), -45, 45))
        pitch = float(np.clip(rng.normal(0, 8), -25, 25))
        roll = float(np.clip(rng.normal(0, 9), -30, 30))
    smile = rng.uniform(-0.3, 1.0) if rng.random() < (0.6 if hard else 0.4) else rng.normal(0, 0.1)
    mouth_open = rng.uniform(0.03, 0.3) if rng.random() < (0.5 if hard else 0.3) else 0.0
    eye_open = rng.uniform(0.35, 1.2)
    eye_open_r = eye_open if rng.random() > 0.08 else rng.uniform(0.15, 0.5)
    raise_ = rng.normal(0, 0.035)
    return FaceParams(
        jaw_width=rng.uniform(0.86, 1.02),
        jaw_drop=rng.uniform(1.15, 1.42),
        jaw_power=rng.uniform(2.0, 3.0),
        temple_y=rng.uniform(-0.36, -0.24),
        brow_y=rng.uniform(-0.72, -0.6),
        brow_arch=rng.uniform(0.03, 0.12),
        brow_thick=rng.uniform(0.05, 0.11),
        brow_raise=(raise_ + rng.normal(0, 0.01), raise_ + rng.normal(0, 0.01)),
        eye_y=rng.uniform(-0.4, -0.32),
        eye_sep=rng.uniform(0.38, 0.46),
        eye_w=rng.uniform(0.16, 0.21),
        eye_h=rng.uniform(0.08, 0.12),
        eye_open=(eye_open, eye_open_r),
        gaze=(rng.uniform(-1, 1), rng.uniform(-0.6, 0.6)),
        iris_r=rng.uniform(0.065, 0.085),
        nose_y=rng.uniform(0.08, 0.2),
        nose_w=rng.uniform(0.36, 0.5),
        nose_h=rng.uniform(0.2, 0.4),
        mouth_y=rng.uniform(0.52, 0.66),
        mouth_w=rng.uniform(0.3, 0.42),
        mouth_open=mouth_open,
        smile=float(smile),
        lip_upper=rng.uniform(0.05, 0.1),
        lip_lower=rng.uniform(0.07, 0.13),
        yaw=float(yaw),
        pitch=float(pitch),
        roll=float(roll),
    )


@dataclasses.dataclass
class _Scene:
    """One face being drawn: the picture (drawn on in place, step by step), the occluder mask,
    and what every step needs (random stream, pose/projection, skin colour)."""

    rng: np.random.Generator
    p: FaceParams
    unit: float  # pixels per face-frame unit
    proj: _Projector
    curves: dict[str, Curve]
    img: np.ndarray  # (H, W, 3) uint8 RGB
    occ_mask: np.ndarray  # (H, W) uint8, 255 where an occluder covers the face
    skin: np.ndarray  # (3,) float RGB

    def px(self, name: str, s=_DENSE) -> np.ndarray:
        """Curve ``name`` at parameters ``s``, in pixels."""
        return self.proj(self.curves[name](np.asarray(s, float)))


def _draw_background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(H, W, 3) uint8: a colour gradient with random clutter (rectangles, discs, lines)."""
    import cv2

    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    gdir = rng.normal(size=2)
    gdir /= np.linalg.norm(gdir) + 1e-9
    xx, yy = _pixel_grid(h, w)
    t = ((xx * gdir[0] + yy * gdir[1]) / max(h, w) + 0.5)[..., None]
    img = (c0.astype(np.float32) * (1 - t) + c1.astype(np.float32) * t).astype(np.uint8)
    for _ in range(int(rng.integers(4, 14))):
        col = _col(rng.uniform(0, 255, 3))
        kind = rng.integers(4)
        a = rng.uniform(0, [w, h])
        if kind == 0:
            b = a + rng.uniform(-0.4, 0.4, 2) * [w, h]
            cv2.rectangle(img, tuple(int(v) for v in a), tuple(int(v) for v in b), col, -1)
        elif kind == 1:
            cv2.circle(img, tuple(int(v) for v in a), int(rng.uniform(4, 0.2 * w)), col, -1)
        elif kind == 2:
            b = rng.uniform(0, [w, h])
            _line(img, np.stack([a, b]), col, rng.uniform(1, 5))
        else:
            _poly(img, a + rng.uniform(-0.25, 0.25, (3, 2)) * [w, h], col)
    return img


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(1, W) and (H, 1) float32 pixel offsets from the picture's centre."""
    xx = np.arange(w, dtype=np.float32)[None, :] - w / 2
    yy = np.arange(h, dtype=np.float32)[:, None] - h / 2
    return xx, yy


def _draw_behind_head(sc: _Scene) -> tuple[tuple[int, int, int], np.ndarray]:
    """Clothes, neck, the back of the hair and the ears; returns the hair colour and the
    forehead outline (face frame, (25, 3)) that the skin and the fringe are drawn to."""
    rng, p, unit, skin_dark = sc.rng, sc.p, sc.unit, sc.skin * 0.78
    cloth = _col(rng.uniform(0, 255, 3))
    jaw_px = sc.px("jaw")
    chin = sc.px("jaw", [0.5])[0]
    _ellipse(sc.img, chin + [0, 1.4 * unit], (1.9 * unit, 0.9 * unit), p.roll * 0.3, cloth)
    nl, nr = jaw_px[8], jaw_px[-9]
    neck = np.array([nl, nr, nr + [0.1 * unit, 1.5 * unit], nl + [-0.1 * unit, 1.5 * unit]])
    _poly(sc.img, neck, _col(skin_dark))
    hair_col = _col(rng.choice([[20, 15, 10], [60, 40, 25], [120, 80, 40], [200, 170, 110],
                                [90, 90, 90], [150, 60, 30]]) * rng.uniform(0.8, 1.2))  # fmt: skip
    phi = np.linspace(0, np.pi, 25)
    top = 1.0 + rng.uniform(0.0, 0.25)
    fh_y = p.temple_y - (p.temple_y - (p.brow_y - 0.55)) * np.sin(phi)
    forehead = _pts(p.jaw_width * np.cos(phi) * 1.02, fh_y, -0.1 + 0.4 * np.sin(phi))
    hair_back = _pts(
        1.15 * p.jaw_width * np.cos(phi),
        p.temple_y + 0.35 - (p.temple_y + 0.35 - (p.brow_y - 0.55 - top * 0.45)) * np.sin(phi),
        -0.3 + 0.2 * np.sin(phi),
    )
    if rng.random() < 0.85:
        _poly(sc.img, sc.proj(hair_back), hair_col)
    for side in (-1, 1):
        ear = sc.proj(_pts(side * (p.jaw_width + 0.04), p.eye_y + 0.18, -0.3)[None])[0]
        _ellipse(sc.img, ear, (0.12 * unit, 0.24 * unit), p.roll, _col(skin_dark))
    return hair_col, forehead


def _draw_skin(sc: _Scene, forehead: np.ndarray) -> np.ndarray:
    """The face's skin inside the hull of jaw and forehead, shaded by a random light; returns
    the light direction (3,)."""
    import cv2

    h, w = sc.img.shape[:2]
    face_outline = np.concatenate([sc.px("jaw"), sc.proj(forehead)], axis=0)
    hull = cv2.convexHull(face_outline.astype(np.float32)).reshape(-1, 2)
    light = sc.rng.normal(size=3)
    light[2] = abs(light[2]) + 0.6
    light /= np.linalg.norm(light)
    x0, y0 = np.clip(np.floor(hull.min(axis=0)).astype(int) - 2, 0, [w, h])
    x1, y1 = np.clip(np.ceil(hull.max(axis=0)).astype(int) + 2, 0, [w, h])
    if x1 > x0 and y1 > y0:  # shade inside the face's bounding box only
        face_mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
        _poly(face_mask, hull - [x0, y0], 255)
        fc = hull.mean(axis=0)
        rad = 0.5 * (hull.max(axis=0) - hull.min(axis=0)) + 1e-6
        nx = ((np.arange(x0, x1, dtype=np.float32) - fc[0]) / rad[0])[None, :]
        ny = ((np.arange(y0, y1, dtype=np.float32) - fc[1]) / rad[1])[:, None]
        nz = np.sqrt(np.clip(1.0 - 0.7 * (nx**2 + ny**2), 0.05, 1.0))
        shade = np.clip(0.55 + 0.55 * (nx * light[0] + ny * light[1] + nz * light[2]), 0.35, 1.25)
        skin_layer = sc.skin.astype(np.float32) * shade[..., None]
        m = face_mask[..., None].astype(np.float32) / 255.0
        roi = sc.img[y0:y1, x0:x1]
        sc.img[y0:y1, x0:x1] = (roi * (1 - m) + skin_layer * m).clip(0, 255).astype(np.uint8)
    return light


def _draw_brows(sc: _Scene, hair_col: tuple[int, int, int]) -> None:
    brow_col = _col(np.array(hair_col) * sc.rng.uniform(0.6, 1.0))
    for side in ("l", "r"):
        up, lo = sc.px(f"brow_{side}_up"), sc.px(f"brow_{side}_lo")
        _poly(sc.img, np.concatenate([up, lo[::-1]]), brow_col)


def _draw_eyes(sc: _Scene, makeup: bool) -> None:
    """Eyeshadow (make-up), sclera, iris (clipped to the lids), lid lines."""
    rng, h, w = sc.rng, *sc.img.shape[:2]
    iris_col = _col(rng.choice([[70, 45, 25], [40, 25, 15], [60, 100, 150], [70, 110, 70],
                                [110, 110, 120]]))  # fmt: skip
    shadow_col = _col(rng.uniform(40, 220, 3))
    for side in ("l", "r"):
        up, lo = sc.px(f"eye_{side}_up"), sc.px(f"eye_{side}_lo")
        lid = np.concatenate([up, lo])
        if makeup:
            over = np.concatenate([up, sc.px(f"brow_{side}_lo")[::-1]])
            layer = sc.img.copy()
            _poly(layer, over, shadow_col)
            sc.img = ((sc.img.astype(np.float32) + layer) / 2).astype(np.uint8)
        _poly(sc.img, lid, _col(np.array([235, 232, 225]) * rng.uniform(0.85, 1.0)))
        eye_mask = np.zeros((h, w), np.uint8)
        _poly(eye_mask, lid, 255)
        iris_c = sc.px(f"iris_{side}", [0.0])[0]
        layer = sc.img.copy()
        r_iris = sc.p.iris_r * sc.unit
        _ellipse(layer, iris_c, (r_iris, r_iris), 0, iris_col)
        _ellipse(layer, iris_c, (0.42 * r_iris, 0.42 * r_iris), 0, (10, 10, 10))
        glint = iris_c + np.array([0.5, -0.5]) * r_iris
        _ellipse(layer, glint, (0.12 * r_iris, 0.12 * r_iris), 0, (250,) * 3)
        sel = eye_mask > 0
        sc.img[sel] = layer[sel]
        _line(sc.img, up, (25, 20, 20), max(1.0, 0.035 * sc.unit))
        _line(sc.img, lo, _col(sc.skin * 0.5), max(1.0, 0.015 * sc.unit))


def _draw_nose(sc: _Scene, light: np.ndarray) -> None:
    """Bridge shadow (on the side away from the light), base line, nostrils, tip highlight."""
    img, unit, skin = sc.img, sc.unit, sc.skin
    side_off = np.array([np.sign(light[0] + 1e-6) * -0.05 * unit, 0.0])
    _line(img, sc.px("bridge") + side_off, _col(skin * 0.7), max(1.0, 0.03 * unit))
    base = sc.px("nose_base")
    wl, wr = sc.px("wing_l", [0.0]), sc.px("wing_r", [0.0])
    _line(img, np.concatenate([wl, base, wr]), _col(skin * 0.55), max(1.0, 0.02 * unit))
    for s0, s1 in ((0.1, 0.4), (0.6, 0.9)):
        a, b = sc.px("nose_base", [s0])[0], sc.px("nose_base", [s1])[0]
        c = (a + b) / 2 - [0, 0.025 * unit]
        _ellipse(img, c, (0.4 * np.linalg.norm(b - a) + 0.5, 0.025 * unit + 0.5), sc.p.roll,
                 _col(skin * 0.3))  # fmt: skip
    tip = sc.px("bridge", [1.0])[0]
    _ellipse(img, tip - [0, 0.02 * unit], (0.05 * unit, 0.04 * unit), 0, _col(skin * 1.12))


def _draw_mouth(sc: _Scene, makeup: bool) -> bool:
    """Lips (lipstick with make-up, or sometimes), the open mouth's cavity and teeth or the
    closed mouth's line; returns whether the face wears make-up."""
    rng, h, w = sc.rng, *sc.img.shape[:2]
    lip_col = sc.skin * np.array([0.85, 0.55, 0.55])
    if makeup or rng.random() < 0.1:
        lip_col = rng.choice([[190, 20, 40], [150, 20, 90], [220, 80, 110], [110, 20, 30]])
        makeup = True
    uo, lo = sc.px("lip_uo"), sc.px("lip_lo")
    _poly(sc.img, np.concatenate([uo, lo[::-1]]), _col(lip_col))
    if sc.p.mouth_open > 0.02:
        ui, li = sc.px("lip_ui"), sc.px("lip_li")
        cavity = np.concatenate([ui, li[::-1]])
        cav_mask = np.zeros((h, w), np.uint8)
        _poly(cav_mask, cavity, 255)
        layer = sc.img.copy()
        _poly(layer, cavity, (40, 10, 15))
        teeth = np.concatenate([ui, ui[::-1] + [0, 0.06 * sc.unit]])
        _poly(layer, teeth, (235, 235, 225))
        sel = cav_mask > 0
        sc.img[sel] = layer[sel]
    else:
        _line(sc.img, sc.px("lip_ui"), _col(np.array(lip_col) * 0.5), max(1.0, 0.015 * sc.unit))
    return makeup


def _draw_fringe(sc: _Scene, hair_col: tuple[int, int, int], forehead: np.ndarray) -> None:
    """Sometimes a hair fringe (it may cover the brows: occlusion)."""
    rng, p = sc.rng, sc.p
    if rng.random() < 0.35:
        depth = rng.uniform(0.0, 0.3)
        xs = np.linspace(-p.jaw_width, p.jaw_width, 17)
        fringe_y = p.brow_y - 0.25 + depth + 0.05 * np.sin(xs * rng.uniform(3, 9))
        fringe = _pts(xs, fringe_y, _z_face(xs, fringe_y) + 0.05)
        cap = np.concatenate([sc.proj(fringe), sc.proj(forehead)])  # left→right, then back over
        _poly(sc.img, cap, hair_col, sc.occ_mask)


def _draw_glasses(sc: _Scene) -> None:
    """Sometimes glasses (thin rims: not an occlusion)."""
    if sc.rng.random() < 0.12:
        col = _col(sc.rng.uniform(0, 80, 3))
        ring = np.linspace(0, 2 * np.pi, 31)
        ring = np.stack([np.cos(ring), 0.7 * np.sin(ring)], 1) * 0.3 * sc.unit
        for side in ("l", "r"):
            ec = sc.px(f"iris_{side}", [0.0])[0]
            _line(sc.img, ec + ring, col, max(1.0, 0.03 * sc.unit))


def _draw_occluder(sc: _Scene) -> None:
    """One occluder (hand, object, scarf, sunglasses or a mask), drawn into ``occ_mask`` too."""
    rng, p, unit, img, occ = sc.rng, sc.p, sc.unit, sc.img, sc.occ_mask
    kind = rng.choice(["hand", "object", "scarf", "sunglasses", "mask"])
    col = _col(rng.uniform(0, 255, 3))
    uni = sc.proj(unified_points_3d(p))
    if kind == "hand":
        c = uni[rng.integers(124)] + rng.normal(0, 0.1 * unit, 2)
        _ellipse(img, c, (0.45 * unit, 0.3 * unit), rng.uniform(0, 180), _col(sc.skin), occ)
        for _ in range(4):
            ang = rng.uniform(0, 2 * np.pi)
            f0 = c + (0.2 * unit) * np.array([np.cos(ang), np.sin(ang)])
            _ellipse(img, f0, (0.35 * unit, 0.08 * unit), np.degrees(ang), _col(sc.skin * 0.95),
                     occ)  # fmt: skip
    elif kind == "object":
        c = uni[rng.integers(124)]
        half = rng.uniform(0.2, 0.5, 2) * unit
        corners = c + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]]) * half
        _poly(img, corners, col, occ)
    elif kind == "scarf":
        y0 = rng.uniform(p.nose_y + 0.1, p.mouth_y + 0.2)
        xs = np.linspace(-1.3, 1.3, 9)
        band = np.concatenate([
            _pts(xs, y0 + 0.05 * rng.normal(size=9), 0.5),
            _pts(xs[::-1], np.full(9, 2.0), 0.5),
        ])  # fmt: skip
        _poly(img, sc.proj(band), col, occ)
    elif kind == "sunglasses":
        for side in ("l", "r"):
            ec = sc.px(f"iris_{side}", [0.0])[0]
            _ellipse(img, ec, (0.3 * unit, 0.2 * unit), p.roll, (20, 20, 25), occ)
    else:  # mask over nose and mouth
        xs = np.linspace(-0.8, 0.8, 9)
        top_y = p.nose_y - 0.12
        band = np.concatenate([_pts(xs, np.full(9, top_y), 0.5), sc.curves["jaw"](
            np.linspace(0.8, 0.2, 13)) * [0.95, 1.02, 1]])  # fmt: skip
        _poly(img, sc.proj(band), col, occ)


def _photograph(sc: _Scene, force: str | None) -> tuple[np.ndarray, bool, bool]:
    """Lighting (gain, tint, gradient), sometimes blur (Gaussian or motion), sensor noise.
    Returns the final (H, W, 3) uint8 image and the illumination and blur attributes."""
    import cv2

    rng, (h, w) = sc.rng, sc.img.shape[:2]
    gain = rng.uniform(0.45, 1.15) if force != "illumination" else rng.uniform(0.25, 0.45)
    tint = rng.uniform(0.85, 1.15, 3)
    gdir = rng.normal(size=2)
    gdir /= np.linalg.norm(gdir) + 1e-9
    strength = rng.uniform(0.0, 0.8) if force != "illumination" else 0.9
    xx, yy = _pixel_grid(h, w)
    field = 1.0 + strength * ((xx * gdir[0] + yy * gdir[1]) / max(h, w))
    out = sc.img.astype(np.float32) * ((gain * field)[..., None] * tint.astype(np.float32))
    illumination = bool(gain < 0.5 or strength > 0.7)
    blur = force == "blur" or rng.random() < 0.15
    if blur:
        if rng.random() < 0.5:
            out = cv2.GaussianBlur(out, (0, 0), rng.uniform(1.0, 2.2))
        else:
            k = int(rng.integers(5, 10))
            kernel = np.zeros((k, k), np.float32)
            kernel[k // 2] = 1.0 / k
            rot = cv2.getRotationMatrix2D(((k - 1) / 2, (k - 1) / 2), rng.uniform(0, 180), 1.0)
            kernel = cv2.warpAffine(kernel, rot, (k, k))
            out = cv2.filter2D(out, -1, kernel / max(kernel.sum(), 1e-6))
    out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(rng.uniform(1, 6))
    return np.clip(np.round(out), 0, 255).astype(np.uint8), illumination, bool(blur)


def render_face(
    rng: np.random.Generator,
    *,
    size: tuple[int, int] | None = None,
    difficulty: str = "normal",
    occluder_prob: float = 0.3,
    force: str | None = None,
    params: FaceParams | None = None,
) -> Face:
    """Draw one random face. ``size``: (height, width), default random in [160, 256].

    ``force``: a WFLW attribute (see ``formats.WFLW_ATTRIBUTES``) that this face must show.
    The steps below draw from ``rng`` in a fixed order: the same stream gives the same face.
    """
    if size is None:
        size = (int(rng.integers(160, 257)), int(rng.integers(160, 257)))
    h, w = size
    p = params or sample_params(rng, "hard" if force == "largepose" else difficulty)
    if force == "largepose" and params is None:
        p.yaw = float(rng.choice([-1, 1]) * rng.uniform(32, 50))
    if force == "expression" and params is None:
        p.mouth_open, p.smile = rng.uniform(0.14, 0.3), rng.uniform(0.6, 1.0)
    unit = rng.uniform(0.2, 0.28) * min(h, w)
    center = np.array([w / 2, h / 2]) + rng.uniform(-0.08, 0.08, 2) * np.array([w, h])
    center[1] += 0.1 * unit
    img = _draw_background(rng, h, w)
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.08, 3)
    sc = _Scene(rng, p, unit, _Projector(p, center, unit), _curves(p), img,
                np.zeros((h, w), np.uint8), skin)  # fmt: skip

    hair_col, forehead = _draw_behind_head(sc)
    light = _draw_skin(sc, forehead)
    makeup = force == "makeup" or rng.random() < 0.15
    _draw_brows(sc, hair_col)
    _draw_eyes(sc, makeup)
    _draw_nose(sc, light)
    makeup = _draw_mouth(sc, makeup)
    _draw_fringe(sc, hair_col, forehead)
    _draw_glasses(sc)
    if force == "occlusion" or rng.random() < occluder_prob:
        _draw_occluder(sc)
    image, illumination, blur = _photograph(sc, force)

    pts_px = sc.proj(unified_points_3d(p))
    ij = np.clip(np.round(pts_px).astype(int), [0, 0], [w - 1, h - 1])
    occluded = sc.occ_mask[ij[:, 1], ij[:, 0]] > 0
    attributes = dict.fromkeys(formats.WFLW_ATTRIBUTES, False)
    attributes["illumination"] = illumination
    attributes.update(
        largepose=bool(abs(p.yaw) > 30 or abs(p.pitch) > 20 or abs(p.roll) > 25),
        expression=bool(p.mouth_open > 0.12 or abs(p.smile) > 0.55),
        makeup=bool(makeup),
        occlusion=bool(occluded.any()),
        blur=blur,
    )
    return Face(image=image, points=pts_px + 0.5, occluded=occluded, params=p,
                attributes=attributes)  # fmt: skip
