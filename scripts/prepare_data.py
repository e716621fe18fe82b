r"""Prepare one TFDS dataset from its official files (or the bundled synthetic set).

  python scripts/prepare_data.py --dataset wflw --manual_dir /data/WFLW --data_dir data/tfds
  python scripts/prepare_data.py --dataset pts_folder --manual_dir tests/fixtures/real_faces \
      --data_dir data/tfds
  python scripts/prepare_data.py --dataset demo --num_images 64 --data_dir data/tfds
  python scripts/prepare_data.py --dataset pts_folder --scheme my19.json --manual_dir DIR \
      --data_dir data/tfds

``--dataset``: wflw | 300w | cofw | aflw | pts_folder | demo. For ``demo`` the synthetic faces
are first written in the four official formats to ``--manual_dir`` (default
``<data_dir>/demo_raw``), then the four builders read them (builder config ``demo``). The
expected file layout of each dataset is printed by ``--help_layout``.

``--scheme FILE`` (with ``pts_folder``): the ``.pts`` files are in that landmark scheme
(docs/schemes.md); every file must have its point count, and the dataset is stored under the
scheme's name (``pts_folder/MY19``, ``builders.scheme_builder``). With a ``DIR/train``
subfolder, ``DIR/train`` and ``DIR/test`` are the splits ``train`` and ``test``; else the whole
folder is the split ``data``.

``--on_error=skip`` skips bad records (missing/unreadable image, wrong column count,
non-numeric or NaN values) and reports how many; the default stops at the first one with the
file and row. A failed run leaves no prepared dataset behind.

``--data_dir gs://BUCKET/tfds``: the dataset is prepared in a local staging folder
(``--stage_dir``, default ``~/.cache/fgtbt_jax/tfds/BUCKET/tfds``) and its folder uploaded to
the bucket (identical objects skipped); ``--manual_dir`` stays local (docs/storage.md).
"""

from __future__ import annotations

import os
import pathlib

from absl import app, flags

from fgtbt_jax import errors, landmarks, paths, schemes, staging

_DATASET = flags.DEFINE_enum(
    "dataset", None, ["wflw", "300w", "cofw", "aflw", "pts_folder", "demo"], "Dataset to prepare."
)
_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "Folder with the official files.")
_DATA_DIR = flags.DEFINE_string("data_dir", "data/tfds", "TFDS data_dir to write to (or gs://).")
_STAGE_DIR = flags.DEFINE_string(
    "stage_dir", "", "gs:// data_dir: local folder it is prepared in (default a per-user cache)."
)
_NUM_IMAGES = flags.DEFINE_integer("num_images", 64, "demo: training faces per dataset.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 0, "demo: fixed square picture size (0=random).")
_SCHEME = flags.DEFINE_string(
    "scheme", None, "pts_folder: the landmark scheme (JSON declaration) of the .pts files."
)
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "Bad-record policy.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an already prepared copy first.")
_HELP_LAYOUT = flags.DEFINE_bool("help_layout", False, "Print the expected file layouts.")


def main(argv):
    del argv
    from input_pipeline import builders

    if _HELP_LAYOUT.value:
        for name, cls in builders.BUILDERS.items():
            print(f"== {name} ({cls.name}) ==\n{cls.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return 0
    if _DATASET.value is None:
        raise app.UsageError("--dataset is required")
    if _SCHEME.value and _DATASET.value != "pts_folder":
        raise app.UsageError("--scheme goes with --dataset pts_folder")
    if _MANUAL_DIR.value:
        paths.local(_MANUAL_DIR.value, "--manual_dir", "the official files are read locally")
    data_dir = paths.data_dir(_DATA_DIR.value, "--data_dir", _STAGE_DIR.value)
    scheme = schemes.load_scheme(_SCHEME.value) if _SCHEME.value else None
    if _DATASET.value != "demo" and not _MANUAL_DIR.value:
        raise app.UsageError("--manual_dir is required")
    url = _DATA_DIR.value if paths.is_remote(_DATA_DIR.value) else None
    folders = _folders(data_dir, scheme) if url else []
    if url:  # prepared in the staging folder, then uploaded
        staging.sync(url, data_dir, folders, to_bucket=False)
    _prepare(data_dir, scheme)
    if url:
        staging.sync(url, data_dir, folders, to_bucket=True)
        print(f"uploaded {', '.join(folders)} to {url}")
    return 0


def _folders(data_dir: pathlib.Path, scheme: schemes.Scheme | None) -> list[str]:
    """The prepared dataset folders, relative to ``data_dir``."""
    from input_pipeline import builders

    if _DATASET.value == "demo":
        bs = [builders.get_builder(ds, data_dir, "demo") for ds in landmarks.DATASETS]
    elif scheme is not None:
        bs = [builders.scheme_builder(scheme, data_dir)]
    else:
        bs = [builders.get_builder(_DATASET.value, data_dir)]
    return [os.path.relpath(b.data_dir, data_dir) for b in bs]


def _prepare(data_dir: pathlib.Path, scheme: schemes.Scheme | None) -> None:
    from input_pipeline import builders, pipeline

    if _DATASET.value == "demo":
        size = _IMAGE_SIZE.value or None
        raw = pipeline.prepare_demo(
            data_dir, _NUM_IMAGES.value, raw_dir=_MANUAL_DIR.value, image_size=size
        )
        for ds in raw:
            b = builders.get_builder(ds, data_dir, "demo")
            splits = {k: v.num_examples for k, v in b.info.splits.items()}
            print(f"{ds}: demo files in {raw[ds]} -> {b.data_dir} {splits}")
        return
    b = builders.prepare(  # a bad file raises before anything is written
        _DATASET.value,
        data_dir=data_dir,
        manual_dir=_MANUAL_DIR.value,
        on_error=_ON_ERROR.value,
        overwrite=_OVERWRITE.value,
        scheme=scheme,
    )
    splits = {k: v.num_examples for k, v in b.info.splits.items()}
    print(f"{b.name}/{b.builder_config.name} -> {b.data_dir} {splits}")
    print(b.skip_log.summary())


if __name__ == "__main__":
    errors.run(main)
