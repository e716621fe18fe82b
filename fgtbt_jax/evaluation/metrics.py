"""The landmark metrics on the host (SPEC §5): NME, FR, AUC, CED, both protocols.

Two protocols, always labelled in reports:

* ``reference``: the published code's — the error is measured against the *quantized* targets
  (annotation → heatmap index space, truncated to integers, mapped back) and normalised with
  distances between those quantized points.
* ``standard``: against the original annotations, normalised with the original points.

NME of an image = mean over its points of ‖pred − gt‖ / d (d per dataset, ``landmarks.json``
``nme_normalization_zero_based``; for a scheme dataset its declared ``normalization``, see
docs/schemes.md); FR@0.1 = images whose inter-pupil NME exceeds 0.1 (as the
reference counts it); AUC@0.1 = area under the cumulative error distribution of the
inter-ocular NME from 0 to 0.1, divided by 0.1.

Several processes (``jax.distributed``): each evaluates its own share of the batches
(:func:`accumulate`); :meth:`Accumulator.gathered` then collects every process's per-image
errors, in the single-process order, so the metrics are exactly those of one process.
"""

from __future__ import annotations

import collections
import functools
import itertools
import pickle
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fgtbt_jax import landmarks, schemes, transforms
from fgtbt_jax.evaluation import decoding

PROTOCOLS: tuple[str, ...] = ("reference", "standard")
FULL = "full"


def normalization_distances(
    points_xy: np.ndarray,
    dataset: str,
    box_size: float | None = None,
    scheme: schemes.Scheme | None = None,
) -> tuple[np.float32, np.float32]:
    """(inter-ocular, inter-pupil) distances of one image's (K, 2) points in dataset order.

    Computed in float32 like the reference. AFLW's inter-ocular distance is the annotation's
    ``box_size`` (required for AFLW). A scheme dataset (``scheme`` given) uses its declared
    normalization: the primary distance (``inter_ocular``, else ``box``) and ``inter_pupil``
    where declared, else the primary one again.
    """
    p = np.asarray(points_xy, np.float32)
    k = scheme.num_points if scheme is not None else landmarks.num_landmarks(dataset)
    if p.shape != (k, 2):
        raise ValueError(f"{dataset}: expected ({k}, 2) points, got {p.shape}")
    if scheme is not None:
        io = ip = scheme.nme_normalizer(p[None])[0]
        if "inter_pupil" in scheme.normalization:
            ip = scheme.nme_normalizer(p[None], "inter_pupil")[0]
        return np.float32(io), np.float32(ip)
    dist = np.linalg.norm
    if dataset == "300W":
        io = dist(p[36] - p[45])
        ip = dist(np.mean(p[36:42], axis=0) - np.mean(p[42:48], axis=0))
    elif dataset == "WFLW":
        io, ip = dist(p[60] - p[72]), dist(p[96] - p[97])
    elif dataset == "COFW":
        io, ip = dist(p[8] - p[9]), dist(p[16] - p[17])
    else:  # AFLW
        if box_size is None or not np.isfinite(box_size) or box_size <= 0:
            raise ValueError(
                f"AFLW needs a positive box_size for its normalization, got {box_size}"
            )
        io, ip = np.float32(box_size), dist(p[7] - p[10])
    return np.float32(io), np.float32(ip)


def nme_per_image(
    pred_xy: np.ndarray,
    gt_xy: np.ndarray,
    dataset: str,
    box_size: float | None = None,
    mask: np.ndarray | None = None,
    scheme: schemes.Scheme | None = None,
) -> tuple[float, float]:
    """(inter-ocular, inter-pupil) NME of one image; (K, 2) points in the dataset's order.

    The distances are normalised with ``gt_xy`` (the reference's ``sum / (d · K)`` in float32).
    ``mask`` (K,) bool leaves unannotated points out of the mean (all True = the reference).
    ``scheme``: the declaration of a scheme dataset (see :func:`normalization_distances`).
    """
    pred = np.asarray(pred_xy, np.float32)
    gt = np.asarray(gt_xy, np.float32)
    io, ip = normalization_distances(gt, dataset, box_size, scheme)
    err = np.linalg.norm(pred - gt, axis=1)
    if mask is not None:
        mask = np.asarray(mask, bool)
        err = err[mask]
    total, n = np.sum(err), np.float32(err.shape[0])
    return float(total / (io * n)), float(total / (ip * n))


def failure_rate(nme: np.ndarray, threshold: float = 0.1) -> tuple[int, float]:
    """(count, fraction) of images whose NME exceeds ``threshold``."""
    nme = np.asarray(nme, np.float64)
    count = int(np.sum(nme > threshold))
    return count, (count / nme.size if nme.size else float("nan"))


def ced_curve(
    nme: np.ndarray, max_threshold: float = 0.1, num: int = 1001
) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative error distribution: thresholds (num,) in [0, max] and fraction with NME ≤ t."""
    nme = np.sort(np.asarray(nme, np.float64))
    thresholds = np.linspace(0.0, max_threshold, num)
    if nme.size == 0:
        return thresholds, np.full(num, np.nan)
    return thresholds, np.searchsorted(nme, thresholds, side="right") / nme.size


def auc(nme: np.ndarray, max_threshold: float = 0.1, num: int = 10001) -> float:
    """Area under the CED from 0 to ``max_threshold`` (trapezoids on a fine grid) / threshold."""
    t, f = ced_curve(nme, max_threshold, num)
    return float(np.trapezoid(f, t) / max_threshold)


def reference_targets(
    points_xy: np.ndarray, center_xy: np.ndarray, scale: float, heatmap_size: int, dataset: str
) -> np.ndarray:
    """The reference protocol's ground truth: annotation → integer heatmap centre → image.

    A scheme dataset (a name that is not built-in) truncates like 300W, COFW and AFLW."""
    integer = dataset not in landmarks.DATASET_ID or transforms.uses_integer_transform(dataset)
    q = transforms.heatmap_target_points(points_xy, center_xy, scale, heatmap_size, integer=integer)
    back = transforms.inverse_transform_points(q, center_xy, scale, heatmap_size, dtype=np.float32)
    return back.astype(np.float32)


def dataset_id_positions(unified: schemes.UnifiedSet) -> dict[int, int]:
    """``dataset_id`` → position in ``unified.datasets``, by the input pipeline's ids: a
    built-in dataset keeps ``landmarks.DATASET_ID`` (0..3) in any run, scheme datasets get 4,
    5, … in run order."""
    out, extra = {}, len(landmarks.DATASETS)
    for pos, name in enumerate(unified.datasets):
        if name in landmarks.DATASET_ID:
            out[landmarks.DATASET_ID[name]] = pos
        else:
            out[extra] = pos
            extra += 1
    return out


@functools.cache
def _builtin_set() -> schemes.UnifiedSet:
    """The four built-in datasets (ids = ``landmarks.DATASET_ID``), 124 channels."""
    return schemes.derive(landmarks.DATASETS)


_BARRIER_TIMEOUT_MS = 3_600_000
_CHUNK_BYTES = 1 << 20
_barriers = itertools.count()


def wait_for_processes(name: str) -> None:
    """Waits (up to an hour) until every process has arrived here; no-op on one process.

    Processes finish their shares at different times (a process may have one batch more, and
    compile its shape), and on CPU the first collective between processes gives up after 30 s
    (Gloo's rendezvous): this barrier of the ``jax.distributed`` coordination service aligns
    them first. All processes must call it, the same number of times.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the coordination client (as orbax uses it)

    tag = f"fgtbt_{name}_{next(_barriers)}"
    distributed.global_state.client.wait_at_barrier(tag, timeout_in_ms=_BARRIER_TIMEOUT_MS)


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's ``obj`` (picklable), in process order; ``[obj]`` on one process.

    Goes through the key-value store of the ``jax.distributed`` coordination service (pickled,
    in 1 MiB values), not through a device collective: no compilation, and no 30 s limit on
    how long the first process waits for the last. All processes must call it, the same
    number of times.
    """
    if jax.process_count() == 1:
        return [obj]
    from jax._src import distributed  # the coordination client (as orbax uses it)

    client = distributed.global_state.client
    tag = f"fgtbt_allgather_{next(_barriers)}"
    me = jax.process_index()
    payload = pickle.dumps(obj)
    chunks = [payload[i : i + _CHUNK_BYTES] for i in range(0, len(payload), _CHUNK_BYTES)]
    for k, chunk in enumerate(chunks):
        client.key_value_set_bytes(f"{tag}/{me}/{k}", chunk)
    client.key_value_set(f"{tag}/{me}/count", str(len(chunks)))  # last: the value is complete
    out = []
    for p in range(jax.process_count()):
        n = int(client.blocking_key_value_get(f"{tag}/{p}/count", _BARRIER_TIMEOUT_MS))
        parts = [
            client.blocking_key_value_get_bytes(f"{tag}/{p}/{k}", _BARRIER_TIMEOUT_MS)
            for k in range(n)
        ]
        out.append(pickle.loads(b"".join(parts)))
    wait_for_processes(tag)  # all have read: the values can go
    client.key_value_delete(f"{tag}/{me}")
    return out


def gather_cache(cache: dict) -> dict:
    """The union of every process's prediction cache (see :func:`accumulate`); a collective."""
    merged: dict = {}
    for part in allgather_objects(cache):
        merged.update(part)
    return merged


def _to_str(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.ndarray) and v.shape == ():
        return _to_str(v.item())
    return str(v)


class Accumulator:
    """Collects per-image errors batch by batch; :meth:`report` aggregates them.

    ``add`` takes decoded points (B, C, 2) in heatmap index space and the eval batch (see
    :func:`evaluate`); only the points of each image's own dataset are scored. ``unified``: the
    channel layout and the datasets (default: the four built-in ones, 124 channels);
    ``batch['dataset_id']`` is the input pipeline's id (:func:`dataset_id_positions`).
    ``scheme_list``: the declarations of its scheme datasets (their NME
    normalization). :meth:`for_data` builds both from ``config.data``. Each record
    keeps its place ``(stream, index)``: the stream (one per :meth:`start_stream`, i.e. per
    iterator given to :func:`accumulate`) and the batch's ``index`` of the row (its position in
    the single-process order of the stream), so :meth:`gathered` can restore that order.
    """

    def __init__(
        self,
        protocols: Sequence[str] = PROTOCOLS,
        unified: schemes.UnifiedSet | None = None,
        scheme_list: Sequence[schemes.Scheme] = (),
    ) -> None:
        for p in protocols:
            if p not in PROTOCOLS:
                raise ValueError(f"unknown protocol {p!r}; expected one of {PROTOCOLS}")
        self.protocols = tuple(protocols)
        self.unified = unified if unified is not None else _builtin_set()
        self.schemes = {s.name: s for s in scheme_list}
        missing = [
            d
            for d in self.unified.datasets
            if d not in landmarks.DATASET_ID and d not in self.schemes
        ]
        if missing:
            raise ValueError(f"no scheme declaration for dataset(s) {missing}")
        self._position = dataset_id_positions(self.unified)
        self.records: list[dict[str, Any]] = []
        self._stream = 0
        self._rows = 0  # rows seen in this stream: the index of batches without 'index'

    @classmethod
    def for_data(
        cls, data_config: Mapping[str, Any], protocols: Sequence[str] = PROTOCOLS
    ) -> Accumulator:
        """The accumulator of a run's ``config.data``: with scheme datasets in
        ``data.datasets``, the run's :func:`~fgtbt_jax.schemes.unified_set_of` (ids = run
        order) and the declarations of ``data.schemes``; else the built-in default."""
        if all(d in landmarks.DATASET_ID for d in data_config["datasets"]):
            return cls(protocols)
        loaded = [schemes.load_scheme(f) for f in data_config.get("schemes", ())]
        return cls(protocols, schemes.unified_set_of(data_config), loaded)

    def fresh(self) -> Accumulator:
        """An empty accumulator with the same protocols, layout and schemes."""
        return Accumulator(self.protocols, self.unified, tuple(self.schemes.values()))

    @property
    def flip(self) -> decoding.FlipLayout:
        """The channel flip of :func:`decoding.make_eval_step` for this layout (``"unified"``
        without scheme datasets: the built-in programs stay as they are)."""
        return self.unified.flip if self.schemes else "unified"

    def start_stream(self) -> None:
        """The following batches are a new stream (another test set or subset)."""
        self._stream += 1
        self._rows = 0

    def gathered(self) -> Accumulator:
        """All processes' records in the single-process order; ``self`` on one process.

        A collective (all processes call it). The order: by stream, then by the rows' ``index``
        (the records of a process are in its own order already)."""
        if jax.process_count() == 1:
            return self
        out = self.fresh()
        records = [r for part in allgather_objects(self.records) for r in part]
        out.records = sorted(records, key=lambda r: r["order"])  # stable
        return out

    def add(self, points_hm: np.ndarray, batch: Mapping[str, Any], heatmap_size: int) -> None:
        points_hm = np.asarray(points_hm, np.float32)
        ids = np.asarray(batch["dataset_id"]).reshape(-1)
        n, c = ids.shape[0], self.unified.num_channels
        if points_hm.shape != (n, c, 2):
            raise ValueError(f"points must be ({n}, {c}, 2), got {points_hm.shape}")
        valid = np.asarray(batch.get("valid", np.ones(n, bool)), bool).reshape(-1)
        unknown = set(ids[valid].tolist()) - set(self._position)
        if unknown:
            known = {i: self.unified.datasets[p] for i, p in self._position.items()}
            raise ValueError(f"dataset_id {sorted(unknown)} not in this evaluation's {known}")
        pos = np.array([self._position.get(int(i), 0) for i in ids], np.int64)  # padding: 0
        gts = np.asarray(batch["points"], np.float32)
        masks = np.asarray(batch.get("mask", self.unified.mask[pos]), bool)
        centers = np.asarray(batch["center"], np.float32)
        scales = np.asarray(batch["scale"], np.float32).reshape(-1)
        boxes = np.asarray(batch.get("box_size", np.full(n, np.nan)), np.float32).reshape(-1)
        image_ids = batch.get("image_id", [""] * n)
        index = np.asarray(batch.get("index", self._rows + np.arange(n)), np.int64).reshape(-1)
        self._rows += n
        subsets = batch.get("subset", [FULL] * n)
        if isinstance(subsets, str | bytes):
            subsets = [subsets] * n
        for b in range(n):
            if not valid[b]:
                continue
            ds = self.unified.datasets[pos[b]]
            if (masks[b] & ~self.unified.mask[pos[b]]).any():
                raise ValueError(
                    f"dataset_id {int(ids[b])} is {ds} here, but the batch annotates channels "
                    f"{ds} has not: the batches and the accumulator disagree on dataset ids"
                )
            scheme = self.schemes.get(ds)
            idx = self.unified.index_maps[pos[b]]
            mask = masks[b, idx]
            pred = transforms.inverse_transform_points(
                points_hm[b, idx], centers[b], scales[b], heatmap_size, dtype=np.float32
            ).astype(np.float32)
            rec: dict[str, Any] = {
                "dataset": ds,
                "image_id": _to_str(image_ids[b]),
                "subsets": [s for s in _to_str(subsets[b]).split("|") if s],
                "pred_xy": pred,
                "order": (self._stream, int(index[b])),
            }
            for protocol in self.protocols:
                if protocol == "reference":
                    gt = reference_targets(gts[b, idx], centers[b], scales[b], heatmap_size, ds)
                else:
                    gt = gts[b, idx]
                io, ip = nme_per_image(pred, gt, ds, boxes[b], None if mask.all() else mask, scheme)
                rec[protocol] = {"nme_inter_ocular": io, "nme_inter_pupil": ip}
            self.records.append(rec)

    def report(self, fr_threshold: float = 0.1, **meta: Any) -> dict[str, Any]:
        """``{'meta', 'metrics': {protocol: {dataset: {subset: {...}}}}, 'per_image': [...]}``."""
        groups: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
        for rec in self.records:
            for s in rec["subsets"]:
                groups[(rec["dataset"], s)].append(rec)
        order = {name: i for i, name in enumerate(self.unified.datasets)}
        keys = sorted(groups, key=lambda k: (order[k[0]], k[1] != FULL, k[1]))
        metrics: dict[str, Any] = {}
        for protocol in self.protocols:
            per_ds: dict[str, Any] = {}
            for ds, subset in keys:
                recs = groups[(ds, subset)]
                io = np.array([r[protocol]["nme_inter_ocular"] for r in recs])
                ip = np.array([r[protocol]["nme_inter_pupil"] for r in recs])
                fr_count, fr = failure_rate(ip, fr_threshold)
                fr_io_count, fr_io = failure_rate(io, fr_threshold)
                per_ds.setdefault(ds, {})[subset] = {
                    "protocol": protocol,
                    "count": len(recs),
                    "nme_inter_ocular": float(io.mean()),
                    "nme_inter_pupil": float(ip.mean()),
                    f"fr_{fr_threshold:g}": fr,
                    f"fr_{fr_threshold:g}_count": fr_count,
                    f"fr_{fr_threshold:g}_inter_ocular": fr_io,
                    f"fr_{fr_threshold:g}_inter_ocular_count": fr_io_count,
                    f"auc_{fr_threshold:g}": auc(io, fr_threshold),
                }
            metrics[protocol] = per_ds
        per_image = [
            {
                "dataset": r["dataset"],
                "image_id": r["image_id"],
                "subsets": "|".join(r["subsets"]),
                **{
                    f"{p}_{m}": r[p][m]
                    for p in self.protocols
                    for m in ("nme_inter_ocular", "nme_inter_pupil")
                },
            }
            for r in self.records
        ]
        meta = {
            "protocols": {
                "reference": "error vs the quantized heatmap-space targets mapped back "
                "(the published code)",
                "standard": "error vs the original annotations",
            },
            "fr_definition": f"fraction of images with inter-pupil NME > {fr_threshold:g}",
            "auc_definition": f"area under the inter-ocular CED on [0, {fr_threshold:g}] / "
            f"{fr_threshold:g}",
            "fr_threshold": fr_threshold,
            **meta,
        }
        return {"meta": meta, "metrics": metrics, "per_image": per_image}


def evaluate(
    eval_step: Callable[[Any, Mapping[str, Any]], Mapping[str, jax.Array]],
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    *,
    protocols: Sequence[str] = PROTOCOLS,
    fr_threshold: float = 0.1,
    progress: Callable[[int], None] | None = None,
    accumulator: Accumulator | None = None,
    cache: dict | None = None,
    **meta: Any,
) -> dict[str, Any]:
    """Runs ``eval_step`` over ``batches`` (:func:`accumulate`) and aggregates per dataset and
    subset: ``accumulator.gathered().report(fr_threshold, **meta)``.

    ``accumulator``: add to an existing :class:`Accumulator` (several iterators, one report).
    On several processes each passes its own share of the batches and this is a collective
    (all processes call it; every one gets the whole report).
    """
    acc = accumulator if accumulator is not None else Accumulator(protocols)
    accumulate(eval_step, variables, batches, acc, cache=cache, progress=progress)
    return acc.gathered().report(fr_threshold, **meta)


def accumulate(
    eval_step: Callable[[Any, Mapping[str, Any]], Mapping[str, jax.Array]],
    variables: Any,
    batches: Iterable[Mapping[str, Any]],
    accumulator: Accumulator,
    *,
    cache: dict | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Runs ``eval_step`` over ``batches`` (one stream) and adds the errors to ``accumulator``.

    Batch contract (numpy/jnp): ``image`` (B, S, S, 3) float32 normalized NHWC, ``dataset_id``
    (B,) int (:func:`dataset_id_positions`: ``landmarks.DATASET_ID`` for the built-in datasets,
    4, 5, … for scheme datasets), ``points`` (B, C, 2) float32 annotations in original image
    coordinates in unified slots (C = ``accumulator.unified.num_channels``, 124 by default),
    ``mask`` (B, C) bool, ``center`` (B, 2),
    ``scale`` (B,) (already ×1.25), ``box_size`` (B,) (AFLW's normalization), ``image_id``
    (B,); optional ``subset``: a str for the whole batch or (B,) str/bytes, ``"|"``-separated
    names of the groups the image is scored in (default ``"full"``; e.g. ``"full|challenging"``),
    ``valid`` (B,) bool to skip padding rows and ``index`` (B,) int, the rows' positions in the
    single-process order of the stream (default: the order seen here). Only ``image`` goes to
    ``eval_step``; the rest stays on the host. ``eval_step`` returns ``points`` (B, C, 2) in
    heatmap index space. The batches are consumed one at a time and not kept.

    ``cache``: dict ``(dataset_id, image_id) → (C, 2)`` points; a batch whose valid rows are
    all cached skips the network (subsets that repeat images of the full set), and new
    predictions are stored (on several processes, :func:`gather_cache` after the full set
    makes every process see all its predictions). The heatmap size is taken from the outputs
    (``S / 2`` when only cached points were used). Only the valid rows are sent through the
    network (padding would change the other images' outputs: the network's CSAM statistics
    span the batch).
    """
    acc = accumulator
    acc.start_stream()
    empty = np.zeros((acc.unified.num_channels, 2), np.float32)
    use_cache = cache is not None
    heatmap_size = None
    for i, batch in enumerate(batches):
        n = len(np.asarray(batch["dataset_id"]).reshape(-1))
        valid = np.asarray(batch.get("valid", np.ones(n, bool)), bool).reshape(-1)
        keys = [
            (int(d), _to_str(k))
            for d, k in zip(
                np.asarray(batch["dataset_id"]).reshape(-1),
                batch.get("image_id", [str(j) for j in range(n)]),
                strict=True,
            )
        ]
        if not valid.any():
            points = np.zeros((n, *empty.shape), np.float32)
        elif (
            use_cache
            and "image_id" in batch
            and all(k in cache for k, v in zip(keys, valid, strict=True) if v)
        ):
            points = np.stack([cache.get(k, empty) for k in keys])
        else:
            images = batch["image"]
            if not valid.all():  # padding rows would change the others' CSAM statistics
                images = np.asarray(images)[valid]
            out = eval_step(variables, {"image": images})
            points = np.zeros((n, *empty.shape), np.float32)
            points[valid] = np.asarray(out["points"])
            if "heatmaps" in out:
                heatmap_size = int(out["heatmaps"].shape[1])
            if use_cache and "image_id" in batch:
                for k, v, p in zip(keys, valid, points, strict=True):
                    if v:
                        cache[k] = p
        size = heatmap_size or int(np.shape(batch["image"])[1]) // 2
        acc.add(points, batch, size)
        if progress is not None:
            progress(i + 1)
