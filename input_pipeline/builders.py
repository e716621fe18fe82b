"""TFDS builders (manual download) for COFW, WFLW, 300W, AFLW and a folder of ``.pts`` faces.

Each builder reads the official files (SPEC §4, see :mod:`input_pipeline.formats`) from
``manual_dir`` and writes ArrayRecord files (random access, used by the training pipeline for
deterministic, resumable order). Two builder configs share the code: ``official`` (the real
files) and ``demo`` (the bundled synthetic faces of :mod:`input_pipeline.demo`, written in the
same official formats). Examples keep the file's order (no shuffling at write time).

Features (all builders): ``image`` (encoded bytes as in the file; COFW arrays → PNG; formats
TensorFlow cannot decode → PNG), ``image_id`` (path relative to the image root, COFW
``<file>#<row>``), ``landmarks`` (K, 2) float64 as in the file, ``center`` (2,) float64,
``scale`` float64 (as in the file, *not* × 1.25), ``box_size`` float64 (AFLW's normaliser,
0 elsewhere), ``height``/``width`` int32. COFW adds ``occlusion`` (29,) bool; WFLW adds
``attributes`` (six bools, the ``face_landmarks_wflw_test_<attribute>.csv`` subsets).

Bad records raise :class:`input_pipeline.formats.AnnotationError` (file and row named) unless
the builder was made with ``on_error="skip"``; skipped records are counted in
``builder.skip_log`` and in the dataset's ``metadata.json``. TFDS generates into a temporary
``…incomplete…`` folder and renames it only on success, so a failed preparation leaves no
dataset that looks complete.
"""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Callable

import numpy as np
import tensorflow as tf

try:  # TensorFlow only reads/writes files here; keep it off the accelerators (JAX owns them).
    tf.config.set_visible_devices([], "GPU")
except RuntimeError:  # already initialised
    pass

import tensorflow_datasets as tfds  # noqa: E402
from etils import epath  # noqa: E402

from input_pipeline import formats  # noqa: E402

_VERSION = tfds.core.Version("1.0.0")
_CONFIGS = [
    tfds.core.BuilderConfig(name="official", description="The official files in manual_dir."),
    tfds.core.BuilderConfig(
        name="demo",
        description="Synthetic faces (input_pipeline.demo) written in the official format.",
    ),
]


def _f64(shape) -> tfds.features.Tensor:
    return tfds.features.Tensor(
        shape=shape, dtype=np.float64, encoding=tfds.features.Encoding.BYTES
    )


class _FaceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared features / example generation. Subclasses define DATASET and the splits."""

    VERSION = _VERSION
    BUILDER_CONFIGS = _CONFIGS
    DATASET: str = ""
    NUM_POINTS: int | None = None
    # This file, given directly: TFDS's own lookup needs the `importlib_resources` backport.
    code_path = epath.Path(__file__)

    def __init__(self, *, on_error: str = "raise", file_format: str = "array_record", **kwargs):
        self.skip_log = formats.SkipLog(on_error)
        super().__init__(file_format=file_format, **kwargs)

    def _extra_features(self) -> dict:
        return {}

    def _info(self) -> tfds.core.DatasetInfo:
        k = self.NUM_POINTS
        feats = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "image_id": tfds.features.Text(),
            # float64 kept exactly (tf.train.Example floats are float32): raw-bytes encoding
            "landmarks": _f64((k, 2)),
            "center": _f64((2,)),
            "scale": _f64(()),
            "box_size": _f64(()),
            "height": tfds.features.Scalar(dtype=np.int32),
            "width": tfds.features.Scalar(dtype=np.int32),
            **self._extra_features(),
        }
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(feats),
            metadata=tfds.core.MetadataDict(),
            homepage="https://arxiv.org/abs/2601.12863",
            disable_shuffling=True,
        )

    def _manual(self, dl_manager) -> pathlib.Path:
        return pathlib.Path(os.fspath(dl_manager.manual_dir))

    def _features_of(self, rec: formats.FaceRecord) -> dict:
        return {}

    def _generate_examples(self, read: Callable[[formats.SkipLog], list], split: str):
        before = self.skip_log.count
        records = read(self.skip_log)
        n = 0
        for i, rec in enumerate(records):
            try:
                data, height, width = formats.load_image_bytes(rec)
            except formats.AnnotationError as e:
                self.skip_log.handle(e)
                continue
            n += 1
            yield (
                f"{i:09d}",
                {
                    "image": data,
                    "image_id": rec.image_id,
                    "landmarks": np.asarray(rec.landmarks, np.float64),
                    "center": np.asarray(rec.center, np.float64),
                    "scale": float(rec.scale),
                    "box_size": float(rec.box_size),
                    "height": height,
                    "width": width,
                    **self._features_of(rec),
                },
            )
        skipped = self.skip_log.skipped[before:]
        self.info.metadata[f"skipped_{split}"] = len(skipped)
        self.info.metadata[f"skipped_{split}_examples"] = [str(e) for e in skipped[:20]]
        if n == 0:
            raise formats.AnnotationError(
                "<split " + split + ">", 0, "no usable records (all skipped or empty)"
            )


def _instructions(text: str) -> str:
    return (
        text + "\nThen run: python scripts/prepare_data.py --dataset <name> --manual_dir DIR "
        "--data_dir DIR\n"
    )


class Cofw(_FaceBuilder):
    """COFW (29 points with occlusion flags) from the MATLAB v7.3 files."""

    name = "cofw"
    DATASET = "COFW"
    NUM_POINTS = 29
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "Place COFW_train_color.mat (variables IsTr, phisTr) and COFW_test_color.mat (IsT, "
        "phisT), MATLAB v7.3, in manual_dir."
    )

    def _extra_features(self):
        return {"occlusion": tfds.features.Tensor(shape=(29,), dtype=np.bool_)}

    def _features_of(self, rec):
        return {"occlusion": np.asarray(rec.occlusion, bool)}

    def _split_generators(self, dl_manager):
        d = self._manual(dl_manager)
        out = {}
        for split in ("train", "test"):
            path = d / f"COFW_{split}_color.mat"
            out[split] = self._generate_examples(
                lambda log, path=path, split=split: formats.read_cofw_mat(path, split, log),
                split,
            )
        return out


class Wflw(_FaceBuilder):
    """WFLW (98 points) from the CSV files, with the six attribute subsets of the test set."""

    name = "wflw"
    DATASET = "WFLW"
    NUM_POINTS = 98
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "Place face_landmarks_wflw_train.csv, face_landmarks_wflw_test.csv and the subset files "
        "face_landmarks_wflw_test_{largepose,expression,illumination,makeup,occlusion,blur}.csv "
        "in manual_dir, and the images under manual_dir/WFLW_images/ (or images/) so that "
        "<root>/<image_name> exists."
    )

    def _extra_features(self):
        return {
            "attributes": tfds.features.FeaturesDict(
                {a: tfds.features.Scalar(dtype=np.bool_) for a in formats.WFLW_ATTRIBUTES}
            )
        }

    def _features_of(self, rec):
        return {
            "attributes": {a: bool(rec.attributes.get(a, False)) for a in formats.WFLW_ATTRIBUTES}
        }

    def _split_generators(self, dl_manager):
        d = self._manual(dl_manager)
        roots = [d / "WFLW_images", d / "images", d]

        def train(log):
            return formats.read_wflw_csv(d / "face_landmarks_wflw_train.csv", roots, log)

        def test(log):
            recs = formats.read_wflw_csv(d / "face_landmarks_wflw_test.csv", roots, log)
            index = {_key(r): r for r in recs}
            found = []
            for attr in formats.WFLW_ATTRIBUTES:
                path = d / f"face_landmarks_wflw_test_{attr}.csv"
                if not path.exists():
                    continue
                found.append(attr)
                for sub in formats.read_wflw_csv(path, roots, log, check_images=False):
                    rec = index.get(_key(sub))
                    if rec is None:
                        log.handle(
                            formats.AnnotationError(
                                path, sub.row, "face not found in face_landmarks_wflw_test.csv"
                            )
                        )
                        continue
                    rec.attributes[attr] = True
            self.info.metadata["wflw_subset_files"] = found
            return recs

        return {
            "train": self._generate_examples(train, "train"),
            "test": self._generate_examples(test, "test"),
        }


def _key(rec: formats.FaceRecord) -> tuple:
    return (rec.image_id, tuple(np.round(np.asarray(rec.landmarks), 2).reshape(-1)))


class Face300w(_FaceBuilder):
    """300W (68 points) from the TSV files: train, common and challenging (iBUG) test sets."""

    name = "face300w"
    DATASET = "300W"
    NUM_POINTS = 68
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "Place train.tsv, test_common.tsv and test_ibug.tsv (columns: image path, 5-point "
        "string, 68-point string 'x1,y1,...', scale, center_w, center_h) in manual_dir, with the "
        "images at manual_dir/<image path> (backslashes are read as '/')."
    )

    def _split_generators(self, dl_manager):
        d = self._manual(dl_manager)
        roots = [d, d / "images"]
        files = {
            "train": "train.tsv",
            "test_common": "test_common.tsv",
            "test_challenging": "test_ibug.tsv",
        }
        return {
            split: self._generate_examples(
                lambda log, f=fname: formats.read_300w_tsv(d / f, roots, log), split
            )
            for split, fname in files.items()
        }


class Aflw(_FaceBuilder):
    """AFLW-19 from the CSV files (train, test = full, test_frontal if present)."""

    name = "aflw"
    DATASET = "AFLW"
    NUM_POINTS = 19
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "Place face_landmarks_aflw_train.csv, face_landmarks_aflw_test.csv (and optionally "
        "face_landmarks_aflw_test_frontal.csv) in manual_dir, with the images under "
        "manual_dir/images/ (or manual_dir/) so that <root>/<image_name> exists."
    )

    def _split_generators(self, dl_manager):
        d = self._manual(dl_manager)
        roots = [d / "images", d]
        files = {"train": "train", "test": "test", "test_frontal": "test_frontal"}
        out = {}
        for split, stem in files.items():
            path = d / f"face_landmarks_aflw_{stem}.csv"
            if split == "test_frontal" and not path.exists():
                continue
            out[split] = self._generate_examples(
                lambda log, path=path: formats.read_aflw_csv(path, roots, log), split
            )
        return out


class PtsFolder(_FaceBuilder):
    """A folder of images with iBUG ``.pts`` files beside them (one split, ``data``).

    Centre and scale come from the points' box (COFW rule). Any point count is accepted; with
    68 points the records can stand in for 300W.
    """

    name = "pts_folder"
    DATASET = "pts_folder"
    NUM_POINTS = None
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="default", description="Images + .pts from manual_dir.")
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(
        "Put images and same-named .pts files (iBUG format) anywhere under manual_dir."
    )

    def _split_generators(self, dl_manager):
        d = self._manual(dl_manager)
        return {
            "data": self._generate_examples(lambda log: formats.read_pts_folder(d, log), "data")
        }


BUILDERS: dict[str, type[_FaceBuilder]] = {
    "COFW": Cofw,
    "WFLW": Wflw,
    "300W": Face300w,
    "AFLW": Aflw,
    "pts_folder": PtsFolder,
}
_ALIASES = {
    "cofw": "COFW",
    "wflw": "WFLW",
    "300w": "300W",
    "aflw": "AFLW",
    "pts_folder": "pts_folder",
}


def canonical_name(dataset: str) -> str:
    """'wflw' / 'WFLW' → 'WFLW'; 'pts_folder' stays."""
    name = _ALIASES.get(dataset.lower())
    if name is None:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(_ALIASES)}")
    return name


def get_builder(
    dataset: str,
    data_dir: os.PathLike | str,
    config: str | None = None,
    *,
    on_error: str = "raise",
) -> _FaceBuilder:
    """The builder of ``dataset`` (e.g. 'WFLW') in ``data_dir``; ``config``: official | demo."""
    cls = BUILDERS[canonical_name(dataset)]
    if cls is PtsFolder:
        config = "default"
    return cls(data_dir=os.fspath(data_dir), config=config or "official", on_error=on_error)


def prepare(
    dataset: str,
    *,
    data_dir: os.PathLike | str,
    manual_dir: os.PathLike | str,
    config: str | None = None,
    on_error: str = "raise",
    overwrite: bool = False,
    metadata: dict | None = None,
    quiet: bool = True,
) -> _FaceBuilder:
    """Prepare one dataset from ``manual_dir`` (ArrayRecord). Returns the builder.

    ``overwrite`` deletes a prepared copy first. ``builder.skip_log`` lists skipped records.
    ``metadata`` is stored with the dataset (``builder.info.metadata``).
    """
    builder = get_builder(dataset, data_dir, config, on_error=on_error)
    if builder.is_prepared():
        if not overwrite:
            return builder
        shutil.rmtree(builder.data_dir)
        builder = get_builder(dataset, data_dir, config, on_error=on_error)
    manual = pathlib.Path(manual_dir)
    if not manual.is_dir():
        raise FileNotFoundError(
            f"manual_dir {manual} does not exist.\n{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}"
        )
    builder.info.metadata.update(metadata or {})
    if quiet:
        tfds.display_progress_bar(False)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual),
            compute_stats=tfds.download.ComputeStatsMode.SKIP,
        ),
        file_format="array_record",
    )
    return builder


__all__ = [
    "Aflw",
    "BUILDERS",
    "Cofw",
    "Face300w",
    "PtsFolder",
    "Wflw",
    "canonical_name",
    "get_builder",
    "prepare",
]
