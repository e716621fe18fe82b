"""Landmark scheme declarations of custom datasets and the unified set derived from a run.

A scheme (one JSON file, docs/schemes.md) declares a dataset's points in its file order; each is
either the same physical point as a built-in dataset's point (``["300W", 36]``, mapped to that
point's unified channel of :mod:`fgtbt_jax.landmarks`) or a new point (``["new", "name"]``,
optionally ``{"init_from": ["300W", 27]}``). From the datasets of a run, :func:`derive` builds
the unified set: the 124 built-in channels first, then the new points of the run's schemes in
run order, with annotation masks, index maps, the flip permutation and the FMB weights.
:func:`extend_head` widens a 124-channel model's final layer to such a set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fgtbt_jax import errors, landmarks

NEW = "new"
NORMALIZATIONS = ("inter_ocular", "inter_pupil", "box")
# Parameters of the head's last layers whose last axis is the landmark channel.
HEAD_LEAVES: tuple[tuple[str, ...], ...] = (
    ("params", "decode_head", "conv2", "kernel"),
    ("params", "decode_head", "conv_seg", "kernel"),
    ("params", "decode_head", "conv_seg", "bias"),
)


class SchemeError(errors.Error, ValueError):
    """A scheme declaration or a run's dataset list is invalid (one-line message; a script
    reports it as ``error: …``)."""


@dataclasses.dataclass(frozen=True)
class Point:
    """One point of a scheme: ``dataset``/``index`` of a built-in point, or ``dataset == "new"``
    with ``name`` (and optionally ``init_from``, a built-in ``(dataset, index)``)."""

    dataset: str
    index: int = -1
    name: str = ""
    init_from: tuple[str, int] | None = None
    note: str = ""

    @property
    def is_new(self) -> bool:
        return self.dataset == NEW

    def describe(self) -> str:
        return f"new {self.name!r}" if self.is_new else f"{self.dataset} {self.index}"


@dataclasses.dataclass(frozen=True)
class Scheme:
    """A validated scheme declaration.

    ``normalization`` maps ``inter_ocular`` / ``inter_pupil`` to two sides, each a tuple of
    zero-based point indices whose mean is that side's position, and ``box`` to ``True``.
    """

    name: str
    points: tuple[Point, ...]
    flip_pairs: tuple[tuple[int, int], ...]
    normalization: Mapping[str, Any]
    source: str = "<scheme>"

    @property
    def num_points(self) -> int:
        return len(self.points)

    def flip_permutation(self) -> np.ndarray:
        """(K,) int32 p so that ``points_flipped = points[p]`` swaps the scheme's pairs."""
        perm = np.arange(self.num_points, dtype=np.int32)
        for a, b in self.flip_pairs:
            perm[a], perm[b] = b, a
        return perm

    def nme_normalizer(self, points: np.ndarray, kind: str | None = None) -> np.ndarray:
        """(N,) normalizing distances of (N, K, 2) ground-truth points.

        ``kind`` defaults to ``inter_ocular`` if declared, else ``box`` (sqrt of the width times
        the height of the points' bounding box).
        """
        kind = kind or ("inter_ocular" if "inter_ocular" in self.normalization else "box")
        if kind not in self.normalization:
            raise SchemeError(f"{self.source}: scheme {self.name} declares no {kind} normalization")
        points = np.asarray(points, np.float64)
        if kind == "box":
            size = points.max(axis=1) - points.min(axis=1)
            return np.sqrt(size[:, 0] * size[:, 1])
        a, b = (points[:, list(side)].mean(axis=1) for side in self.normalization[kind])
        return np.linalg.norm(a - b, axis=-1)


def _builtin_unified(dataset: str, index: int, where: str) -> int:
    if dataset not in landmarks.DATASET_ID:
        raise SchemeError(
            f"{where}: unknown dataset {dataset!r} (expected one of "
            f"{', '.join(landmarks.DATASETS)} or {NEW!r})"
        )
    k = landmarks.num_landmarks(dataset)
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < k:
        raise SchemeError(f"{where}: {dataset} has points 0..{k - 1}, got index {index!r}")
    return int(landmarks.unified_index(dataset)[index])


def _parse_point(entry: Any, where: str) -> Point:
    if not isinstance(entry, list) or len(entry) not in (2, 3):
        raise SchemeError(
            f'{where}: expected ["DATASET", index] or ["new", "name", {{...}}], '
            f"got {json.dumps(entry)}"
        )
    if entry[0] != NEW:
        if len(entry) != 2:
            raise SchemeError(f"{where}: options are only for new points, got {json.dumps(entry)}")
        _builtin_unified(entry[0], entry[1], where)
        return Point(entry[0], entry[1])
    name = entry[1]
    if not isinstance(name, str) or not name:
        raise SchemeError(f"{where}: a new point needs a non-empty name, got {json.dumps(name)}")
    opts = entry[2] if len(entry) == 3 else {}
    if not isinstance(opts, dict) or set(opts) - {"init_from", "note"}:
        raise SchemeError(
            f'{where}: options must be an object with "init_from" and/or "note", '
            f"got {json.dumps(opts)}"
        )
    init_from = opts.get("init_from")
    if init_from is not None:
        if not isinstance(init_from, list) or len(init_from) != 2:
            raise SchemeError(
                f'{where}: init_from must be ["DATASET", index], got {json.dumps(init_from)}'
            )
        _builtin_unified(init_from[0], init_from[1], f"{where} init_from")
        init_from = (init_from[0], init_from[1])
    note = opts.get("note", "")
    if not isinstance(note, str):
        raise SchemeError(f"{where}: note must be a string, got {json.dumps(note)}")
    return Point(NEW, name=name, init_from=init_from, note=note)


def _index_list(side: Any, k: int, where: str) -> tuple[int, ...]:
    side = [side] if isinstance(side, int) and not isinstance(side, bool) else side
    if (
        not isinstance(side, list)
        or not side
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in side)
    ):
        raise SchemeError(
            f"{where}: a side is a point index or a non-empty list of indices, "
            f"got {json.dumps(side)}"
        )
    bad = [i for i in side if not 0 <= i < k]
    if bad:
        raise SchemeError(f"{where}: point index {bad[0]} out of range 0..{k - 1}")
    return tuple(side)


def _parse_normalization(norm: Any, k: int, where: str) -> dict[str, Any]:
    if not isinstance(norm, dict) or not norm or set(norm) - set(NORMALIZATIONS):
        raise SchemeError(
            f"{where}: expected an object with keys among {', '.join(NORMALIZATIONS)}"
            f", got {json.dumps(norm)}"
        )
    if "inter_ocular" not in norm and "box" not in norm:
        raise SchemeError(f"{where}: needs inter_ocular or box (the NME's normalizing distance)")
    out: dict[str, Any] = {}
    for key in ("inter_ocular", "inter_pupil"):
        if key in norm:
            sides = norm[key]
            if not isinstance(sides, list) or len(sides) != 2:
                raise SchemeError(
                    f"{where}.{key}: too few points: expected two sides "
                    f"[left, right], got {json.dumps(sides)}"
                )
            a, b = (_index_list(s, k, f"{where}.{key}") for s in sides)
            if set(a) == set(b):
                raise SchemeError(f"{where}.{key}: too few points: both sides are {list(a)}")
            out[key] = (a, b)
    if "box" in norm:
        if norm["box"] is not True:
            raise SchemeError(f"{where}.box: expected true, got {json.dumps(norm['box'])}")
        if k < 2:
            raise SchemeError(
                f"{where}.box: too few points: a box needs at least 2, scheme has {k}"
            )
        out["box"] = True
    return out


def _check_flip_pairs(pairs: Any, points: Sequence[Point], where: str) -> tuple:
    k = len(points)
    if not isinstance(pairs, list):
        raise SchemeError(f"{where}: expected a list of [i, j] pairs, got {json.dumps(pairs)}")
    partner: dict[int, int] = {}
    out = []
    for n, pair in enumerate(pairs):
        w = f"{where}[{n}]"
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in pair)
        ):
            raise SchemeError(f"{w}: expected [i, j], got {json.dumps(pair)}")
        a, b = pair
        if not (0 <= a < k and 0 <= b < k) or a == b:
            raise SchemeError(f"{w}: {pair} must be two different points in 0..{k - 1}")
        for i in (a, b):
            if i in partner:
                raise SchemeError(f"{w}: point {i} is already paired with {partner[i]}")
        partner[a], partner[b] = b, a
        out.append((a, b))
    # Mapped points must mirror as their unified channels do.
    flip = landmarks.unified_flip_permutation()
    channel = {
        i: _builtin_unified(p.dataset, p.index, where) for i, p in enumerate(points) if not p.is_new
    }
    for i, c in channel.items():
        j = partner.get(i)
        if j is None:
            if flip[c] != c:
                raise SchemeError(
                    f"{where}: flip pair not symmetric: point {i} "
                    f"({points[i].describe()}) has a mirror point in the unified "
                    f"set but is not paired"
                )
        elif j in channel and flip[c] != channel[j]:
            raise SchemeError(
                f"{where}: flip pair not symmetric: [{i}, {j}] "
                f"({points[i].describe()}, {points[j].describe()}) are not mirror "
                "points in the unified set"
            )
        elif j not in channel:
            raise SchemeError(
                f"{where}: flip pair not symmetric: [{i}, {j}] pairs "
                f"{points[i].describe()} with a new point"
            )
    return tuple(out)


def parse_scheme(obj: Any, source: str = "<scheme>") -> Scheme:
    """Validates a decoded declaration (see docs/schemes.md); errors name ``source``."""
    if not isinstance(obj, dict):
        raise SchemeError(f"{source}: expected a JSON object")
    extra = set(obj) - {"name", "points", "flip_pairs", "normalization", "description"}
    if extra:
        raise SchemeError(f"{source}: unknown key {sorted(extra)[0]!r}")
    for key in ("name", "points", "flip_pairs", "normalization"):
        if key not in obj:
            raise SchemeError(f"{source}: missing key {key!r}")
    name = obj["name"]
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise SchemeError(f"{source}: name must be a non-empty string, got {json.dumps(name)}")
    if name in landmarks.DATASET_ID or name == NEW:
        raise SchemeError(f"{source}: name {name!r} is taken by a built-in dataset")
    entries = obj["points"]
    if not isinstance(entries, list) or not entries:
        raise SchemeError(f"{source}: points must be a non-empty list")
    points = [_parse_point(e, f"{source}: points[{i}]") for i, e in enumerate(entries)]
    seen: dict[Any, int] = {}
    for i, p in enumerate(points):
        key = ("new", p.name) if p.is_new else _builtin_unified(p.dataset, p.index, source)
        if key in seen:
            what = f"new point name {p.name!r}" if p.is_new else f"unified channel {key}"
            raise SchemeError(
                f"{source}: points[{i}] {p.describe()}: duplicate mapping, "
                f"{what} is already points[{seen[key]}]"
            )
        seen[key] = i
    pairs = _check_flip_pairs(obj["flip_pairs"], points, f"{source}: flip_pairs")
    norm = _parse_normalization(obj["normalization"], len(points), f"{source}: normalization")
    return Scheme(name, tuple(points), pairs, norm, source)


def load_scheme(path: str | os.PathLike) -> Scheme:
    """Reads and validates a scheme declaration file."""
    path = os.fspath(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except OSError as e:
        raise SchemeError(f"{path}: cannot read: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise SchemeError(f"{path}: not JSON: {e.msg} at line {e.lineno}") from None
    return parse_scheme(obj, path)


@dataclasses.dataclass(frozen=True)
class UnifiedSet:
    """The unified landmark set of a run.

    ``channels``: one name per channel (``"unified:j"`` for the 124 built-in ones, then
    ``"SCHEME:name"``); ``datasets``: the run's datasets (dataset id = position);
    ``index_maps[d]``: (K_d,) int32 unified channel of each of dataset d's points;
    ``mask``: (D, C) bool; ``flip``: (C,) int32 channel permutation; ``counts``: (C,) int32
    number of the run's datasets annotating each channel; ``init_from``: new channel ->
    built-in channel it is initialized from; ``schemes``: the run's scheme datasets by name.
    """

    datasets: tuple[str, ...]
    channels: tuple[str, ...]
    index_maps: tuple[np.ndarray, ...]
    mask: np.ndarray
    flip: np.ndarray
    counts: np.ndarray
    init_from: Mapping[int, int]
    schemes: Mapping[str, Scheme] = dataclasses.field(default_factory=dict)

    @property
    def num_channels(self) -> int:
        """The heatmap head size (``model.num_landmarks``)."""
        return len(self.channels)

    @property
    def dataset_ids(self) -> np.ndarray:
        """(D,) int32: each dataset's ``dataset_id`` in batches and its RNG stream id. A
        built-in dataset keeps ``landmarks.DATASET_ID`` (0..3) whatever the run, so its
        samples and ids are today's; scheme datasets get 4, 5, … in run order."""
        ids, extra = [], len(landmarks.DATASETS)
        for name in self.datasets:
            if name in landmarks.DATASET_ID:
                ids.append(landmarks.DATASET_ID[name])
            else:
                ids.append(extra)
                extra += 1
        return np.asarray(ids, np.int32)

    @property
    def num_ids(self) -> int:
        """Number of dataset ids (the FMB loss's ``num_datasets``): 4 + the scheme datasets."""
        return len(landmarks.DATASETS) + len(self.schemes)

    def id_names(self) -> tuple[str, ...]:
        """The dataset name of each id ``0..num_ids-1`` (``""`` for ids not in the run)."""
        names = [""] * self.num_ids
        for name, i in zip(self.datasets, self.dataset_ids, strict=True):
            names[i] = name
        return tuple(names)

    def position(self, name: str) -> int:
        """Index of dataset ``name`` in :attr:`datasets` (rows of :attr:`mask`)."""
        if name not in self.datasets:
            raise SchemeError(f"dataset {name!r} is not in this run ({', '.join(self.datasets)})")
        return self.datasets.index(name)

    def fmb_weights(self, beta: float | None = None, dtype: Any = np.float32) -> np.ndarray:
        """(C,) w_j = (1 - β) / (1 - β^n_j) over the run's datasets (SPEC §3), in float64 then
        ``dtype``; 0 for a channel no dataset of the run annotates (it never enters the loss)."""
        beta = landmarks.fmb_beta() if beta is None else beta
        n = self.counts.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            w = np.where(n > 0, (1.0 - beta) / (1.0 - beta**n), 0.0)
        return w.astype(dtype)


def derive(datasets: Sequence[str], schemes: Sequence[Scheme] = ()) -> UnifiedSet:
    """The unified set of a run over ``datasets`` (built-in names or names of ``schemes``)."""
    by_name: dict[str, Scheme] = {}
    for s in schemes:
        if s.name in by_name:
            raise SchemeError(
                f"{s.source}: scheme name {s.name!r} is also {by_name[s.name].source}"
            )
        by_name[s.name] = s
    if not datasets:
        raise SchemeError("a run needs at least one dataset")
    if len(set(datasets)) != len(datasets):
        raise SchemeError(f"dataset listed twice in {list(datasets)}")
    channels = [f"unified:{j}" for j in range(landmarks.NUM_UNIFIED)]
    flip = list(landmarks.unified_flip_permutation())
    index_maps, init_from, used = [], {}, {}
    for name in datasets:
        if name in landmarks.DATASET_ID:
            index_maps.append(landmarks.unified_index(name))
            continue
        if name not in by_name:
            raise SchemeError(
                f"unknown dataset {name!r}: not built-in "
                f"({', '.join(landmarks.DATASETS)}) and no scheme declares it"
            )
        scheme = by_name[name]
        used[name] = scheme
        idx = []
        for p in scheme.points:
            if p.is_new:
                c = len(channels)
                channels.append(f"{name}:{p.name}")
                flip.append(c)
                if p.init_from is not None:
                    init_from[c] = _builtin_unified(*p.init_from, scheme.source)
            else:
                c = _builtin_unified(p.dataset, p.index, scheme.source)
            idx.append(c)
        idx = np.asarray(idx, np.int32)
        for a, b in scheme.flip_pairs:  # new points; mapped pairs already agree (validated)
            flip[idx[a]], flip[idx[b]] = idx[b], idx[a]
        index_maps.append(idx)
    mask = np.zeros((len(datasets), len(channels)), bool)
    for d, idx in enumerate(index_maps):
        mask[d, idx] = True
    return UnifiedSet(
        datasets=tuple(datasets),
        channels=tuple(channels),
        index_maps=tuple(index_maps),
        mask=mask,
        flip=np.asarray(flip, np.int32),
        counts=mask.sum(axis=0).astype(np.int32),
        init_from=init_from,
        schemes=used,
    )


def run_datasets(datasets: Sequence[str]) -> tuple[str, ...]:
    """A run's dataset order (= dataset ids): the built-in ones in ``landmarks.DATASETS`` order,
    as the input pipeline orders them today, then the others in the given order."""
    builtin = [d for d in landmarks.DATASETS if d in datasets]
    return (*builtin, *(d for d in datasets if d not in landmarks.DATASET_ID))


def unified_set_of(data_config: Mapping[str, Any]) -> UnifiedSet:
    """The :class:`UnifiedSet` of ``config.data``: ``datasets`` and the scheme files of
    ``schemes`` (absent = none), datasets ordered by :func:`run_datasets`."""
    paths = tuple(data_config.get("schemes", ()))
    builtin = {name.lower(): name for name in landmarks.DATASETS}
    names = tuple(builtin.get(str(d).lower(), str(d)) for d in data_config["datasets"])
    return derive(run_datasets(names), [load_scheme(p) for p in paths])


_MIDPOINT = re.compile(r"midpoint of (\S+) (\d+) and (\d+)")


def place_new_points(points: np.ndarray, unified: UnifiedSet) -> np.ndarray:
    """(..., C, 2) positions of every channel of ``unified`` from (..., 124, 2) positions of
    the built-in channels, for data whose truth is known by construction (synthetic and demo
    faces). A new point whose note reads ``midpoint of 300W a and b`` is that midpoint; else
    it sits on its ``init_from`` point; else it cannot be placed (:class:`SchemeError`).
    """
    points = np.asarray(points)
    out = [points]
    for scheme in unified.schemes.values():
        for p in scheme.points:
            if not p.is_new:
                continue
            m = _MIDPOINT.search(p.note)
            if m:
                a = _builtin_unified(m[1], int(m[2]), f"{scheme.source}: {p.describe()} note")
                b = _builtin_unified(m[1], int(m[3]), f"{scheme.source}: {p.describe()} note")
                out.append(((points[..., a, :] + points[..., b, :]) / 2)[..., None, :])
            elif p.init_from is not None:
                c = _builtin_unified(*p.init_from, scheme.source)
                out.append(points[..., c : c + 1, :])
            else:
                raise SchemeError(
                    f"{scheme.source}: cannot place {p.describe()} on a synthetic face: give it "
                    'a note "midpoint of 300W a and b" or an init_from point'
                )
    return np.concatenate(out, axis=-2)


def configure(config: Any) -> UnifiedSet:
    """The run's :class:`UnifiedSet`; sets ``config.model.num_landmarks`` from it.

    The one place where the head size follows the data: ``model.num_landmarks`` left at 124
    (the default) becomes ``unified.num_channels``; any other value must equal it, else a
    :class:`SchemeError` names both flags. Idempotent.
    """
    unified = unified_set_of(config.data)
    k = int(config.model.num_landmarks)
    if k not in (landmarks.NUM_UNIFIED, unified.num_channels):
        raise SchemeError(
            f"--config.model.num_landmarks={k} disagrees with the {unified.num_channels} "
            f"channels of --config.data.datasets={list(config.data.datasets)} and "
            f"--config.data.schemes={list(config.data.get('schemes', ()))} "
            f"(124 built-in + new points); leave num_landmarks at 124 or set it to "
            f"{unified.num_channels}"
        )
    config.model.num_landmarks = unified.num_channels
    return unified


@dataclasses.dataclass
class ExtendReport:
    """What :func:`extend_head` did: ``kept`` channels copied unchanged, new channels drawn
    ``fresh`` or ``copied`` ((new channel name, source channel) pairs), per leaf."""

    kept: int
    fresh: list[str]
    copied: list[tuple[str, int]]
    leaves: list[str]

    def table(self) -> str:
        rows = [
            f"kept     {self.kept:5d}  channels (weights and meaning unchanged)",
            f"fresh    {len(self.fresh):5d}  (kernel lecun_normal, bias 0)",
            f"copied   {len(self.copied):5d}  (init_from an existing point)",
        ]
        rows += [f"  fresh  {n}" for n in self.fresh]
        rows += [f"  copied {n} <- unified:{c}" for n, c in self.copied]
        rows += [f"  leaf   {leaf}" for leaf in self.leaves]
        return "\n".join(rows)


def extend_head(
    variables: Mapping, unified: UnifiedSet, *, seed: int = 0
) -> tuple[dict, ExtendReport]:
    """A 124-channel model's variables widened to ``unified.num_channels`` heatmap channels.

    The head's last layers (:data:`HEAD_LEAVES`, channel last) keep their 124 channels; a new
    channel is drawn as the layer's initializer draws it (kernel ``lecun_normal`` over the
    layer's fan-in, seeded by ``seed``; bias 0), or copied from its ``init_from`` channel.
    Everything else is returned unchanged. The result fits ``FGTBT(num_landmarks=C)``.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(dict(variables)))
    n_old, n_new = landmarks.NUM_UNIFIED, unified.num_channels
    new = list(range(n_old, n_new))
    report = ExtendReport(
        kept=n_old,
        fresh=[unified.channels[c] for c in new if c not in unified.init_from],
        copied=[(unified.channels[c], unified.init_from[c]) for c in new if c in unified.init_from],
        leaves=[],
    )
    key = jax.random.key(seed)
    for path in HEAD_LEAVES:
        if path not in flat:
            continue
        old = jnp.asarray(flat[path])
        if old.shape[-1] != n_old:
            raise SchemeError(
                f"{'/'.join(path)} has {old.shape[-1]} channels, expected "
                f"{n_old} (a 124-channel checkpoint)"
            )
        key, sub = jax.random.split(key)
        shape = old.shape[:-1] + (n_new - n_old,)
        if not new:
            extra = old[..., :0]
        elif path[-1] == "kernel":
            extra = nn.initializers.lecun_normal()(sub, shape, old.dtype)
        else:
            extra = jnp.zeros(shape, old.dtype)
        for c, src in unified.init_from.items():
            extra = extra.at[..., c - n_old].set(old[..., src])
        flat[path] = jnp.concatenate([old, extra], axis=-1)
        report.leaves.append("/".join(path))
    return flax.traverse_util.unflatten_dict(flat), report
