"""Folders mirrored between a ``gs://`` bucket and a local staging folder.

Prepared TFDS datasets are ArrayRecord files, which array_record reads and writes on local disk
only (google/array_record#120), so a ``gs://`` data_dir is staged: :func:`download` copies the
dataset folders a run reads to local disk, :func:`upload` copies prepared ones to the bucket.

Both skip files that are already identical (same size and MD5 as the object's ``md5Hash``) and
move each file into place whole: a download goes to a temporary name beside the target and is
renamed, an upload is one object. An interrupted copy resumes where it stopped, a truncated
local file is fetched again, and processes sharing one staging folder at most download a file
twice (the renames are atomic). Goes through gcsfs (the ``gcs`` extra).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import pathlib
import shutil
import tempfile

from absl import logging

from fgtbt_jax import paths

LARGE_FILE = 64 << 20  # bytes: copies of larger files are logged one by one


@dataclasses.dataclass
class Copied:
    """What a :func:`download` or :func:`upload` did: files (and bytes) copied, files skipped."""

    files: int = 0
    bytes: int = 0
    skipped: int = 0

    def __str__(self) -> str:
        mib = self.bytes / 2**20
        return f"{self.files} files ({mib:.1f} MiB) copied, {self.skipped} up to date"


def default_stage_dir(url: str) -> pathlib.Path:
    """``$XDG_CACHE_HOME/fgtbt_jax/tfds/<bucket>/<path>`` (``~/.cache`` by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache, "fgtbt_jax", "tfds", *url.split("://", 1)[1].strip("/").split("/"))


def stage_dir(url: str, configured: str | os.PathLike = "") -> pathlib.Path:
    """The local staging folder of the ``gs://`` folder ``url`` (``configured`` if set)."""
    if configured:
        return paths.local(configured, "config.data.stage_dir", "the staged copy of data_dir")
    return default_stage_dir(url)


def _fs():
    try:
        import fsspec
        import gcsfs  # noqa: F401 - fsspec's "gs" protocol
    except ImportError as e:
        raise paths.PathError(
            "a gs:// data_dir is staged through gcsfs: pip install -e '.[gcs]'"
        ) from e
    paths.resolve("gs://bucket", "data_dir")  # the client settings epath uses
    return fsspec.filesystem("gs")


def _md5(path: pathlib.Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return base64.b64encode(h.digest()).decode()


def _same(local: pathlib.Path, info: dict) -> bool:
    """Whether ``local`` holds the object described by gcsfs's ``info``."""
    if not local.is_file() or local.stat().st_size != int(info["size"]):
        return False
    return not info.get("md5Hash") or _md5(local) == info["md5Hash"]


def _objects(fs, url: str) -> dict[str, dict]:
    """The objects under the folder ``url``: path relative to it → gcsfs info."""
    root = url.split("://", 1)[1].rstrip("/")
    found = fs.find(root, detail=True) if fs.exists(root) else {}
    return {
        name[len(root) + 1 :]: info
        for name, info in found.items()
        if info.get("type") != "directory" and name.startswith(root + "/")
    }


def download(url: str, local: str | os.PathLike) -> Copied:
    """Makes the folder ``local`` a copy of the ``gs://`` folder ``url`` (files that are not in
    the bucket are deleted; an absent ``url`` leaves no ``local`` folder)."""
    fs, local, done = _fs(), pathlib.Path(local), Copied()
    fs.invalidate_cache()
    objects = _objects(fs, url)
    if local.is_dir():
        for file in local.rglob("*"):
            rel = file.relative_to(local).as_posix()
            if file.is_file() and rel not in objects and not file.name.endswith(".part"):
                file.unlink(missing_ok=True)
        if not objects:
            shutil.rmtree(local, ignore_errors=True)
    for rel, info in sorted(objects.items()):
        target = local / rel
        if _same(target, info):
            done.skipped += 1
            continue
        size = int(info["size"])
        if size >= LARGE_FILE:
            logging.info("staging %s (%.0f MiB)", f"{url}/{rel}", size / 2**20)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
        os.close(fd)
        try:
            fs.get_file(info["name"], tmp)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        done.files, done.bytes = done.files + 1, done.bytes + size
    return done


def upload(local: str | os.PathLike, url: str) -> Copied:
    """Makes the ``gs://`` folder ``url`` a copy of the folder ``local`` (objects that are not
    in ``local`` are deleted, after the new ones are uploaded)."""
    fs, local, done = _fs(), pathlib.Path(local), Copied()
    fs.invalidate_cache()
    present = _objects(fs, url)
    files = sorted(p for p in local.rglob("*") if p.is_file() and not p.name.endswith(".part"))
    for file in files:
        rel = file.relative_to(local).as_posix()
        if rel in present and _same(file, present[rel]):
            done.skipped += 1
            continue
        size = file.stat().st_size
        if size >= LARGE_FILE:
            logging.info("uploading %s (%.0f MiB)", f"{url}/{rel}", size / 2**20)
        fs.put_file(os.fspath(file), f"{url.split('://', 1)[1].rstrip('/')}/{rel}")
        done.files, done.bytes = done.files + 1, done.bytes + size
    stale = set(present) - {f.relative_to(local).as_posix() for f in files}
    if stale:
        fs.rm([present[rel]["name"] for rel in sorted(stale)])
    return done


def sync(url: str, local: str | os.PathLike, folders: list[str], *, to_bucket: bool) -> None:
    """Mirrors the dataset ``folders`` (relative paths) between the ``gs://`` data_dir ``url``
    and its staging folder ``local``: from the bucket, or ``to_bucket``; logs what it copied."""
    for folder in folders:
        remote, here = f"{url.rstrip('/')}/{folder}", pathlib.Path(local, folder)
        if to_bucket:
            if here.is_dir():
                logging.info("uploaded %s -> %s: %s", here, remote, upload(here, remote))
        else:
            logging.info("staged %s -> %s: %s", remote, here, download(remote, here))
