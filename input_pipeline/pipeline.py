"""tf.data training and evaluation pipelines over the prepared TFDS datasets (SPEC §4).

Training (:func:`make_train_iterator`): every global batch holds ``batch_per_dataset`` samples
of each dataset in the run's order (:func:`fgtbt_jax.schemes.run_datasets`: COFW, WFLW, 300W,
AFLW, then the scheme datasets of ``config.data.schemes``). Each dataset is an
independent, endless stream: its k-th sample is record ``perm(seed, dataset, epoch)[k mod N]``
of an epoch-wise random permutation, augmented with a generator seeded by (seed, dataset, k).
The whole stream is therefore a pure function of (seed, step) — no iterator state:

* determinism: same seed → same batches, whatever the number of parallel workers;
* resuming at ``start_step`` is O(1): the iterator simply starts at that step (no skipping);
* multi-host: process ``p`` of ``P`` takes samples ``p·B/P … (p+1)·B/P − 1`` of every
  dataset's ``B`` per step, so the union over processes is exactly the single-host batch.

Per sample (numpy/OpenCV inside ``tf.numpy_function``, run in parallel by tf.data): decode,
scale × U(scale_range), rotation U(±rotation_deg) with probability ``rotation_prob``, flip with
probability ``flip_prob`` (image mirrored, points ``x → W − x`` with the dataset's pair swap,
centre mirrored), one bilinear affine crop to ``img_size`` (``fgtbt_jax.transforms.crop_image``),
ImageNet normalisation; landmarks to integer heatmap coordinates at ``heatmap_size`` with the
reference convention (``transforms.heatmap_target_points``: WFLW float then truncation, the
others ``trunc(T·p) + 1``), scattered into the C unified slots of the run's
:class:`fgtbt_jax.schemes.UnifiedSet` (124 without schemes). ``dataset_id`` and the RNG streams
of a built-in dataset are ``landmarks.DATASET_ID`` (0..3) whatever the run; scheme datasets get
4, 5, … (``UnifiedSet.dataset_ids``). TensorFlow never sees an accelerator.

``config.data.sampling = "weighted"`` instead draws each of the global batch's slots from the
datasets with probabilities ``config.data.weights`` (records uniformly with replacement); a
process's share is sorted by dataset id.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import pathlib
import shutil
import threading
from collections.abc import Iterator, Sequence

import numpy as np
import tensorflow as tf

try:  # Keep TensorFlow (tf.data) off the accelerators: JAX owns them.
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialised by someone else; nothing to hide anymore
    pass

import tensorflow_datasets as tfds  # noqa: E402

from fgtbt_jax import errors, landmarks, paths, schemes, transforms  # noqa: E402
from input_pipeline import builders, demo, formats  # noqa: E402

MEAN = np.array(transforms.IMAGENET_MEAN, np.float32)
STD = np.array(transforms.IMAGENET_STD, np.float32)
# (256, 1, 3) float32: the normalised value of every uint8 level per channel (float64 math)
_NORM_LUT = (
    transforms.imagenet_normalize(np.arange(256.0)[:, None], dtype=np.float64)
    .astype(np.float32)
    .reshape(256, 1, 3)
)
_DEMO_VERSION = 1  # bump when the synthetic generator changes

EVAL_SUBSETS: dict[str, dict[str, tuple[tuple[str, ...], str | None]]] = {
    "COFW": {"full": (("test",), None)},
    "WFLW": {
        "full": (("test",), None),
        **{a: (("test",), a) for a in formats.WFLW_ATTRIBUTES},
    },
    "300W": {
        "full": (("test_common", "test_challenging"), None),
        "common": (("test_common",), None),
        "challenging": (("test_challenging",), None),
    },
    "AFLW": {"full": (("test",), None), "frontal": (("test_frontal",), None)},
    "pts_folder": {"full": (("data",), None)},
}


def list_eval_subsets(dataset: str) -> tuple[str, ...]:
    """Evaluation subsets of ``dataset`` (plus ``"train"``, always accepted); a scheme
    dataset has ``full`` only."""
    if dataset.lower() not in {d.lower() for d in EVAL_SUBSETS}:
        return ("full",)
    return tuple(EVAL_SUBSETS[builders.canonical_name(dataset)])


def normalize(image_u8: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB → float32 ImageNet-normalised ((x/255 − mean) / std)."""
    import cv2

    img = np.ascontiguousarray(image_u8, np.uint8)
    if img.ndim != 3 or img.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {img.shape}")
    return cv2.LUT(img, _NORM_LUT)  # one table look-up per value: ~5× faster than numpy


# ----------------------------------------------------------------------------------------------
# Data access


def _scheme_of(dataset: str, config) -> schemes.Scheme | None:
    """The scheme of ``config.data.schemes`` named ``dataset``, None for other names."""
    if dataset.lower() in {d.lower() for d in (*landmarks.DATASETS, "pts_folder")}:
        return None
    return schemes.unified_set_of(config.data).schemes.get(dataset)


def _get_builder(dataset: str, config, variant: str):
    """The TFDS builder of ``dataset`` (``pts_folder`` and scheme datasets have no variants)."""
    scheme = _scheme_of(dataset, config)
    if scheme is not None:
        return builders.scheme_builder(scheme, config.data.data_dir, variant)
    name = builders.canonical_name(dataset)
    if name == "pts_folder":
        return builders.get_builder(name, config.data.data_dir)
    return builders.get_builder(name, config.data.data_dir, variant)


def _load_builder(dataset: str, config, variant: str):
    """The prepared TFDS builder of ``dataset`` (``variant``: demo | official)."""
    b = _get_builder(dataset, config, variant)
    if not b.is_prepared():
        scheme, data_dir = _scheme_of(dataset, config), config.data.data_dir
        name = dataset if scheme else builders.canonical_name(dataset)
        if scheme is not None and variant != "demo":
            how = f"scripts/prepare_data.py --dataset pts_folder --scheme {scheme.source} "
            how += "--manual_dir DIR"
        elif variant == "demo" or b.builder_config.name == "demo":
            how = "scripts/prepare_data.py --dataset demo"
        else:
            how = f"scripts/prepare_data.py --dataset {name.lower()} --manual_dir DIR"
        raise FileNotFoundError(
            f"{name} ({b.builder_config.name}) is not prepared in {data_dir!r}. Run {how} "
            f"--data_dir {data_dir} (or read the data through input_pipeline.sources.create, "
            "which prepares it; official files: set config.data.manual_dir)."
        )
    return b


def dataset_folders(config, datasets: Sequence[str], variant: str) -> list[str]:
    """The folders of ``datasets``' prepared copies, relative to ``config.data.data_dir`` (what
    a gs:// data_dir stages: :mod:`fgtbt_jax.staging`). ``variant=demo``: with the demo data."""
    if variant == "demo":
        datasets = (*landmarks.DATASETS, *schemes.unified_set_of(config.data).schemes, *datasets)
    root = os.fspath(config.data.data_dir)
    folders = (_get_builder(ds, config, variant).data_dir for ds in dict.fromkeys(datasets))
    return sorted({os.path.relpath(os.fspath(f), root) for f in folders})


def prepare_from_manual_dir(config, dataset: str, variant: str) -> None:
    """Prepares ``dataset`` from ``config.data.manual_dir`` (its ``<NAME>`` subfolder if there
    is one) unless it is prepared already or no manual_dir is set."""
    manual = config.data.manual_dir
    if not manual or _get_builder(dataset, config, variant).is_prepared():
        return
    scheme = _scheme_of(dataset, config)
    if scheme is not None and variant == "demo":
        return  # the demo faces (ensure_demo_data)
    name = dataset if scheme else builders.canonical_name(dataset)
    sub = pathlib.Path(manual) / name
    builders.prepare(
        name,
        data_dir=config.data.data_dir,
        manual_dir=sub if sub.is_dir() else manual,
        config=variant if scheme else None,
        scheme=scheme,
    )


class _Source:
    """Thread-safe random access to the concatenation of some splits of a prepared dataset."""

    def __init__(self, builder, splits: Sequence[str]):
        missing = [s for s in splits if s not in builder.info.splits]
        if missing:
            raise ValueError(
                f"{builder.name}/{builder.builder_config.name} has no split(s) {missing}; "
                f"available: {list(builder.info.splits)}"
            )
        try:
            self._parts = [
                builder.as_data_source(split=s, decoders={"image": tfds.decode.SkipDecoding()})
                for s in splits
            ]
        except NotImplementedError as e:
            raise ValueError(
                f"{builder.data_dir} was not prepared as ArrayRecord; re-run "
                "scripts/prepare_data.py (it writes array_record)."
            ) from e
        self._offsets = np.cumsum([0] + [len(p) for p in self._parts])
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __getitem__(self, i: int) -> dict:
        part = int(np.searchsorted(self._offsets, i, side="right") - 1)
        with self._lock:
            return self._parts[part][int(i - self._offsets[part])]


# ----------------------------------------------------------------------------------------------
# Per-sample processing


def _decode(ex: dict) -> np.ndarray:
    img = formats.decode_image(ex["image"])
    if img is None:
        raise ValueError(f"cannot decode image {ex['image_id']!r}")
    return img


def augment_params(rng: np.random.Generator, config) -> tuple[float, float, bool]:
    """(scale multiplier, rotation in degrees, flip) drawn as the reference does."""
    lo, hi = config.data.scale_range
    scale_mult = rng.uniform(lo, hi)
    rot = (
        rng.uniform(-config.data.rotation_deg, config.data.rotation_deg)
        if rng.random() < config.data.rotation_prob
        else 0.0
    )
    flip = bool(rng.random() < config.data.flip_prob)
    return float(scale_mult), float(rot), flip


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the samples of one dataset of a run fill the unified slots.

    ``index_map`` (K,) int32 unified channel of each point; ``mask`` (C,) bool; ``dataset_id``
    the batches' id (also the RNG stream); ``flip`` what ``transforms.fliplr_points`` takes
    (a built-in name or the :class:`fgtbt_jax.schemes.Scheme`).
    """

    name: str
    dataset_id: int
    index_map: np.ndarray
    mask: np.ndarray
    flip: str | schemes.Scheme


def run_layouts(unified: schemes.UnifiedSet) -> dict[str, Layout]:
    """The :class:`Layout` of every dataset of ``unified``, in run order."""
    return {
        name: Layout(
            name,
            int(unified.dataset_ids[d]),
            unified.index_maps[d],
            unified.mask[d],
            unified.schemes.get(name, name),
        )
        for d, name in enumerate(unified.datasets)
    }


@functools.cache
def _builtin_layouts() -> dict[str, Layout]:
    return run_layouts(schemes.derive(landmarks.DATASETS))


def train_example(
    image: np.ndarray,
    points: np.ndarray,
    center: np.ndarray,
    scale: float,
    dataset: str | Layout,
    *,
    scale_mult: float,
    rot_deg: float,
    flip: bool,
    img_size: int,
    heatmap_size: int,
) -> dict[str, np.ndarray]:
    """One augmented training sample (numpy; the geometry of the tf.data pipeline).

    image: (H, W, 3) uint8 RGB; points (K, 2) in the file's coordinates; ``scale`` as in the
    file (× 1.25 here); ``dataset``: a built-in name or a :class:`Layout` of the run. Returns
    'image' (S, S, 3) float32 normalised, 'coords' (C, 2) int32 heatmap targets (0 in
    unannotated slots), 'mask' (C,) bool, 'dataset_id' int32 (C = 124 for a built-in name).
    """
    layout = _builtin_layouts()[dataset] if isinstance(dataset, str) else dataset
    points = np.asarray(points, np.float64)
    center = np.array(center, np.float64)
    s = float(scale) * 1.25 * scale_mult
    if flip:
        import cv2

        width = image.shape[1]
        image = cv2.flip(image, 1)
        points = transforms.fliplr_points(points, width, layout.flip)
        center[0] = width - center[0]
    crop = transforms.crop_image(image, center, s, img_size, rot_deg)
    q = transforms.heatmap_target_points(
        points,
        center,
        s,
        heatmap_size,
        rot_deg,
        integer=transforms.uses_integer_transform(layout.flip),
    )
    coords = np.zeros((len(layout.mask), 2), np.int32)
    coords[layout.index_map] = q
    return {
        "image": normalize(crop),
        "coords": coords,
        "mask": layout.mask.copy(),
        "dataset_id": np.int32(layout.dataset_id),
    }


# ----------------------------------------------------------------------------------------------
# Training stream


def data_weights(config, datasets: Sequence[str]) -> np.ndarray:
    """``config.data.weights`` as one normalised weight per dataset of ``datasets`` (run order).

    Runs of built-in datasets only read four weights as those of COFW, WFLW, 300W, AFLW, or one
    per dataset in ``landmarks.DATASETS`` order (today's rule); runs with scheme datasets need
    one weight per dataset of ``config.data.datasets``, in its order.
    """
    w = np.asarray(config.data.weights, np.float64)
    builtin = {n.lower(): n for n in landmarks.DATASETS}
    given = [builtin.get(str(d).lower(), str(d)) for d in config.data.datasets]
    if set(datasets) <= set(landmarks.DATASETS):
        if len(w) == len(landmarks.DATASETS) and len(datasets) < len(w):
            w = w[[landmarks.DATASET_ID[d] for d in datasets]]
    elif len(w) == len(given):
        by_name = dict(zip(given, w, strict=True))
        w = np.array([by_name[d] for d in datasets])
    if len(w) != len(datasets):
        raise errors.ConfigError(
            f"config.data.weights {tuple(config.data.weights)} must have one entry per dataset "
            f"of config.data.datasets {tuple(given)}"
        )
    if np.any(w < 0) or w.sum() <= 0:
        raise errors.ConfigError(f"config.data.weights {config.data.weights} do not fit datasets")
    return w / w.sum()


class _TrainPlan:
    """Maps the per-process element counter to (dataset, record, augmentation seed)."""

    def __init__(self, config, sizes, seed, process_index, process_count):
        self.layouts = run_layouts(schemes.unified_set_of(config.data))
        self.datasets = list(self.layouts)
        self.sizes = sizes
        self.seed = int(seed)
        self.p, self.np_ = int(process_index), int(process_count)
        self.sampling = config.data.sampling
        bpd = int(config.data.batch_per_dataset)
        if self.sampling == "balanced":
            if bpd % self.np_:
                raise errors.ConfigError(
                    f"batch_per_dataset={bpd} must be divisible by process_count={self.np_} "
                    "(every process holds the same share of every dataset)"
                )
            self.global_b = bpd
            self.local_b = bpd // self.np_
            self.slots = [(d, j) for d in self.datasets for j in range(self.local_b)]
        elif self.sampling == "weighted":
            total = bpd * len(self.datasets)
            if total % self.np_:
                raise errors.ConfigError(
                    f"global batch {total} not divisible by {self.np_} processes"
                )
            self.weights = data_weights(config, self.datasets)
            self.global_b = total
            self.local_b = total // self.np_
            self.slots = [None] * self.local_b
        else:
            raise errors.ConfigError(
                f"config.data.sampling must be balanced|weighted, got {self.sampling}"
            )
        self.batch = len(self.slots)
        self._perms: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def _perm(self, d: str, epoch: int) -> np.ndarray:
        key = (d, epoch)
        with self._lock:
            perm = self._perms.get(key)
            if perm is None:
                rng = np.random.default_rng([self.seed, 1, self.layouts[d].dataset_id, epoch])
                perm = rng.permutation(self.sizes[d])
                self._perms[key] = perm
                while len(self._perms) > 16:
                    self._perms.popitem(last=False)
            return perm

    def element(self, i: int) -> tuple[str, int, np.random.Generator]:
        step, r = divmod(int(i), self.batch)
        if self.sampling == "balanced":
            d, j = self.slots[r]
            k = step * self.global_b + self.p * self.local_b + j
            epoch, pos = divmod(k, self.sizes[d])
            record = int(self._perm(d, epoch)[pos])
        else:
            draw = np.random.default_rng([self.seed, 3, step]).choice(
                len(self.datasets), size=self.global_b, p=self.weights
            )
            mine = np.arange(self.p * self.local_b, (self.p + 1) * self.local_b)
            mine = mine[np.argsort(draw[mine], kind="stable")]
            g = int(mine[r])
            d = self.datasets[int(draw[g])]
            k = step * self.global_b + g
            record = int(np.random.default_rng([self.seed, 4, k]).integers(self.sizes[d]))
        rng = np.random.default_rng([self.seed, 2, self.layouts[d].dataset_id, k])
        return d, record, rng


def make_train_iterator(
    config,
    *,
    variant: str,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    start_step: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """Endless iterator of this process's training batches (numpy).

    Yields 'image' (B, S, S, 3) float32 ImageNet-normalised NHWC (S = config.img_size),
    'coords' (B, C, 2) int32 heatmap targets at config.heatmap_size (0 where unannotated),
    'mask' (B, C) bool, 'dataset_id' (B,) int32; B = this process's share of the global
    batch, C = the channels of the run's unified set (124 without schemes). The batch at step
    t depends only on (seed, t): start at ``start_step`` to resume. ``variant``: the prepared
    TFDS builder config to read (demo | official; scheme datasets have one).
    """
    unified = schemes.unified_set_of(config.data)
    sources = {}
    for d in unified.datasets:
        builder = _load_builder(d, config, variant)
        split = "train" if "train" in builder.info.splits or d not in unified.schemes else "data"
        sources[d] = _Source(builder, [split])
    plan = _TrainPlan(
        config, {d: len(s) for d, s in sources.items()}, seed, process_index, process_count
    )
    channels = unified.num_channels
    img_size, hm_size = int(config.img_size), int(config.heatmap_size)
    _cv2_threads(config)

    def load(i):
        d, record, rng = plan.element(int(i))
        ex = sources[d][record]
        scale_mult, rot, flip = augment_params(rng, config)
        out = train_example(
            _decode(ex),
            ex["landmarks"],
            ex["center"],
            ex["scale"],
            plan.layouts[d],
            scale_mult=scale_mult,
            rot_deg=rot,
            flip=flip,
            img_size=img_size,
            heatmap_size=hm_size,
        )
        return out["image"], out["coords"], out["mask"], out["dataset_id"]

    def tf_load(i):
        image, coords, mask, ds_id = tf.numpy_function(
            load, [i], [tf.float32, tf.int32, tf.bool, tf.int32], stateful=False
        )
        image.set_shape((img_size, img_size, 3))
        coords.set_shape((channels, 2))
        mask.set_shape((channels,))
        ds_id.set_shape(())
        return {"image": image, "coords": coords, "mask": mask, "dataset_id": ds_id}

    start = int(start_step) * plan.batch
    ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
    ds = ds.map(tf_load, num_parallel_calls=_parallel(config), deterministic=True)
    ds = ds.batch(plan.batch, drop_remainder=True)
    ds = ds.prefetch(int(config.data.prefetch))
    ds = ds.with_options(_options(config))
    return iter(ds.as_numpy_iterator())


def _cv2_threads(config) -> None:
    import cv2

    # tf.data already runs one sample per core; OpenCV's own pool would oversubscribe.
    cv2.setNumThreads(int(config.data.cv2_threads))


def _parallel(config) -> int:
    n = int(config.data.num_parallel_calls)
    return tf.data.AUTOTUNE if n <= 0 else n


def _options(config) -> tf.data.Options:
    opts = tf.data.Options()
    opts.deterministic = True
    threads = int(config.data.threads)
    if threads > 0:
        opts.threading.private_threadpool_size = threads
    return opts


# ----------------------------------------------------------------------------------------------
# Evaluation stream


def _scheme_subsets(builder) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """A scheme dataset's subsets: its ``test`` split if it has one, else all its records."""
    return {"full": (("test",) if "test" in builder.info.splits else ("data",), None)}


def _eval_layout(config, dataset: str) -> Layout:
    """The :class:`Layout` of ``dataset`` in the run of ``config`` (with it added if absent)."""
    unified = schemes.unified_set_of(config.data)
    if dataset not in unified.datasets:
        data = {"datasets": (*unified.datasets, dataset), "schemes": config.data.get("schemes", ())}
        unified = schemes.unified_set_of(data)
    return run_layouts(unified)[dataset]


def _eval_indices(builder, dataset, subset) -> tuple[_Source, np.ndarray]:
    if subset == "train":
        splits, attr = ("train",) if "train" in builder.info.splits else ("data",), None
    else:
        table = EVAL_SUBSETS.get(dataset) or _scheme_subsets(builder)
        if subset not in table:
            raise errors.ConfigError(
                f"{dataset} has no eval subset {subset!r}; choose from {list(table)}"
            )
        splits, attr = table[subset]
    src = _Source(builder, splits)
    idx = np.arange(len(src))
    if attr is not None:
        idx = np.array([i for i in idx if src[int(i)]["attributes"][attr]], np.int64)
        if not len(idx):
            raise ValueError(f"{dataset} subset {subset!r} is empty (subset file missing?)")
    return src, idx


def make_eval_iterator(
    config,
    dataset: str,
    subset: str = "full",
    batch_size: int = 8,
    *,
    variant: str,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a test subset without augmentation (file order), padded to full batches.

    Yields 'image' (B, S, S, 3) float32 normalised, 'dataset_id' (B,) int32, 'points'
    (B, C, 2) float32 original-image annotation in the unified slots of the run (0 elsewhere;
    C = 124 without schemes), 'mask' (B, C) bool, 'center' (B, 2) float32, 'scale' (B,)
    float32 — the crop scale, already × 1.25 (the value ``transforms.get_transform``
    takes) —, 'box_size' (B,) float32 (AFLW's normaliser, else 0), 'image_id' (B,) str,
    'valid' (B,) bool (False for padding), 'index' (B,) int64, the record's position in the
    subset (-1 for padding).
    Several processes: the single-process batches are dealt round-robin (process ``p`` gets
    batches ``p, p + P, …``, each with the same records as on one process), and every process
    gets the same number of batches (padding batches where the batches do not divide evenly).
    ``dataset``: COFW | WFLW | 300W | AFLW | a scheme dataset of ``config.data.schemes`` (its
    ``test`` split, else all its records) (| pts_folder, read as 300W when it has 68 points).
    ``subset``: see :func:`list_eval_subsets`, or "train". ``variant``: demo | official.
    """
    name = dataset if _scheme_of(dataset, config) else builders.canonical_name(dataset)
    builder = _load_builder(name, config, variant)
    src, idx = _eval_indices(builder, name, subset)
    if name == "pts_folder":
        k = len(src[0]["landmarks"]) if len(src) else 0
        if k != 68:
            raise ValueError(f"pts_folder records have {k} points; only 68 (300W) is supported")
    layout = _eval_layout(config, "300W" if name == "pts_folder" else name)
    ds_id, uidx, mask = layout.dataset_id, layout.index_map, layout.mask
    channels = len(mask)
    img_size = int(config.img_size)
    bs = int(batch_size)
    _cv2_threads(config)
    # The single-process batches (positions in file order, the last one padded with -1) are
    # dealt round-robin, so every batch, and the network's batch statistics, is the same as
    # on one process; processes short of a batch get one of padding only.
    global_batches = math.ceil(len(idx) / bs)
    n_batches = math.ceil(global_batches / int(process_count))
    positions = np.full((n_batches * int(process_count), bs), -1, np.int64)
    positions.reshape(-1)[: len(idx)] = np.arange(len(idx))
    positions = positions[int(process_index) :: int(process_count)].reshape(-1)
    padded = np.full(positions.shape, -1, np.int64)
    padded[positions >= 0] = idx[positions[positions >= 0]]

    def load(i):
        i = int(i)
        if i < 0:
            return (
                np.zeros((img_size, img_size, 3), np.float32),
                np.zeros((channels, 2), np.float32),
                np.zeros(2, np.float32),
                np.float32(1.0),
                np.float32(0.0),
                b"",
                False,
            )
        ex = src[i]
        scale = float(ex["scale"]) * 1.25
        crop = transforms.crop_image(_decode(ex), ex["center"], scale, img_size, 0.0)
        pts = np.zeros((channels, 2), np.float32)
        pts[uidx] = ex["landmarks"]
        return (
            normalize(crop),
            pts,
            np.asarray(ex["center"], np.float32),
            np.float32(scale),
            np.float32(ex["box_size"]),
            ex["image_id"],
            True,
        )

    def tf_load(i):
        out = tf.numpy_function(
            load,
            [i],
            [tf.float32, tf.float32, tf.float32, tf.float32, tf.float32, tf.string, tf.bool],
            stateful=False,
        )
        image, pts, center, scale, box, image_id, valid = out
        image.set_shape((img_size, img_size, 3))
        pts.set_shape((channels, 2))
        center.set_shape((2,))
        for t in (scale, box, image_id, valid):
            t.set_shape(())
        return {
            "image": image,
            "points": pts,
            "center": center,
            "scale": scale,
            "box_size": box,
            "image_id": image_id,
            "valid": valid,
        }

    ds = tf.data.Dataset.from_tensor_slices(padded)
    ds = ds.map(tf_load, num_parallel_calls=_parallel(config), deterministic=True)
    ds = ds.batch(bs, drop_remainder=True).prefetch(int(config.data.prefetch))
    ds = ds.with_options(_options(config))

    def gen():
        for k, b in enumerate(ds.as_numpy_iterator()):
            n = len(b["valid"])
            b["index"] = positions[k * bs : (k + 1) * bs]
            b["image_id"] = np.array([s.decode("utf-8") for s in b["image_id"]], dtype=object)
            b["dataset_id"] = np.full(n, ds_id, np.int32)
            b["mask"] = np.broadcast_to(mask, (n, channels)).copy()
            b["mask"][~b["valid"]] = False
            yield b

    return gen()


def eval_size(config, dataset: str, subset: str = "full", *, variant: str) -> int:
    """Number of records (without padding) in an evaluation subset."""
    name = dataset if _scheme_of(dataset, config) else builders.canonical_name(dataset)
    return len(_eval_indices(_load_builder(name, config, variant), name, subset)[1])


# ----------------------------------------------------------------------------------------------
# The bundled synthetic dataset


def prepare_demo(
    data_dir: os.PathLike | str,
    num_images: int,
    *,
    raw_dir: os.PathLike | str | None = None,
    image_size: Sequence[int] | None = None,
    seed: int = 0,
    datasets: Sequence[str] = landmarks.DATASETS,
    scheme_datasets: Sequence[schemes.Scheme] = (),
) -> dict[str, pathlib.Path]:
    """Generate the synthetic faces in the official formats and prepare the ``demo`` datasets.

    ``num_images`` training faces per dataset (test sets: max(6, num_images // 4); 300W also
    a harder ``challenging`` half-size set). Raw files go to ``raw_dir/<DATASET>`` (default
    ``<data_dir>/demo_raw``). Datasets already prepared with the same settings are kept, others
    regenerated. ``scheme_datasets``: also the demo faces re-annotated in these schemes
    (:func:`input_pipeline.demo.write_scheme`, a ``.pts`` folder). Returns the raw folders.
    """
    data_dir = paths.local(data_dir, "data_dir", "stage a gs:// data_dir: paths.data_dir")
    raw_root = pathlib.Path(raw_dir) if raw_dir is not None else data_dir / "demo_raw"
    size = None if image_size is None else [int(v) for v in np.broadcast_to(image_size, 2)]
    sig = {"demo_version": _DEMO_VERSION, "num_images": int(num_images), "image_size": size,
           "seed": int(seed)}  # fmt: skip
    out = {}
    image_size = None if size is None else tuple(size)
    for ds in (*datasets, *scheme_datasets):
        scheme = None if isinstance(ds, str) else ds
        name = ds if scheme is None else scheme.name
        raw = raw_root / name
        out[name] = raw
        if scheme is None:
            b = builders.get_builder(ds, data_dir, "demo")
        else:
            b = builders.scheme_builder(scheme, data_dir, "demo")
        # a scheme's points are part of its demo data
        want = sig if scheme is None else {**sig, "points": [p.describe() for p in scheme.points]}
        if b.is_prepared() and dict(b.info.metadata).get("demo") == want:
            continue
        if b.is_prepared():
            shutil.rmtree(b.data_dir)
        if raw.exists():
            shutil.rmtree(raw)
        if scheme is None:
            demo.write_official(raw, ds, int(num_images), seed=int(seed), image_size=image_size)
        else:
            demo.write_scheme(raw, scheme, int(num_images), seed=int(seed), image_size=image_size)
        builders.prepare(
            name,
            data_dir=data_dir,
            manual_dir=raw,
            config="demo",
            metadata={"demo": want},
            scheme=scheme,
        )
    return out


def ensure_demo_data(config, *, datasets: Sequence[str] = landmarks.DATASETS) -> None:
    """Prepare the synthetic ``demo`` datasets in ``config.data.data_dir`` if missing.

    Settings: ``config.data.demo_num_images`` (training faces per dataset) and, read with
    defaults, ``demo_image_size`` (() = random 160–256 px) and ``demo_seed``. Prepared
    datasets with other settings are regenerated. The scheme datasets of the run get the demo
    faces re-annotated in their schemes. See :func:`prepare_demo`.
    """
    prepare_demo(
        config.data.data_dir,
        int(config.data.demo_num_images),
        image_size=tuple(config.data.demo_image_size) or None,
        seed=int(config.data.demo_seed),
        datasets=datasets,
        scheme_datasets=tuple(schemes.unified_set_of(config.data).schemes.values()),
    )
