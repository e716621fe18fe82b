"""Paths of runs and scripts: local folders, ``gs://`` buckets and ``hf://`` Hub checkpoints.

Every path a run reads or writes goes through :func:`resolve` (an ``etils.epath.Path``: local
paths made absolute, ``gs://bucket/…`` kept as a URL that epath, orbax and tensorstore speak).
A URL of any other scheme is refused with a :class:`PathError` naming the flag, never turned
into a local folder (``./gs:/…``). Inputs that only work on local disk go through
:func:`local`, which refuses URLs at once. Checkpoint inputs also accept
``hf://owner/repo[/path/in/repo.pth][@revision]`` (:func:`checkpoint`): the file is fetched
through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE``, revision pinning). A TFDS
``data_dir`` on gs:// is read and written through a local staging folder (:func:`data_dir`).

gs:// goes through gcsfs where it is installed (the ``gcs`` extra; ``EPATH_USE_TF`` unset is
taken as false), else through TensorFlow's client. Object stores have no append and no rename:
:func:`write_bytes` / :func:`open_atomic` write a file whole or not at all (one object upload
on gs://, a temporary file moved into place on local disk).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import pathlib
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, BinaryIO

from fgtbt_jax import errors

if TYPE_CHECKING:
    from etils import epath

REMOTE_SCHEMES = ("gs",)
HUB_SCHEME = "hf"


class PathError(errors.Error, ValueError):
    """A path a flag or config field named cannot be used (the message names the flag)."""


def scheme(path: str | os.PathLike) -> str | None:
    """The URL scheme of ``path`` (``'gs'``), or None for a local path."""
    text = os.fspath(path)
    head, sep, _ = text.partition("://")
    return head.lower() if sep and head.isalnum() else None


def is_remote(path: str | os.PathLike) -> bool:
    return scheme(path) is not None


def _prefer_gcsfs() -> None:
    """epath through gcsfs rather than TensorFlow's GCS client where both are installed (the
    client the tests prove; docs/storage.md), unless ``EPATH_USE_TF`` says otherwise."""
    if importlib.util.find_spec("gcsfs") is not None:
        os.environ.setdefault("EPATH_USE_TF", "false")
    # epath decides "TensorFlow or not" once per process and caches it (functools.cache): a
    # gs:// path touched earlier (TFDS looks up gs://tfds-data) would pin TensorFlow's client.
    from etils.epath import gpath

    decided = getattr(gpath, "_is_tf_installed", None)
    if hasattr(decided, "cache_clear"):
        decided.cache_clear()


def resolve(path: str | os.PathLike, flag: str, *, hub: bool = False) -> epath.Path:
    """``path`` as an ``epath.Path``: local (absolute) or ``gs://``; anything else refused.

    ``flag`` names where the path came from (``--workdir``, ``config.init_checkpoint``) for the
    error. ``hub``: the caller resolves ``hf://`` itself (see :func:`checkpoint`).
    """
    from etils import epath

    s = scheme(path)
    if s is None:
        return epath.Path(os.path.abspath(os.fspath(path)))
    if s in REMOTE_SCHEMES or (hub and s == HUB_SCHEME):
        _prefer_gcsfs()
        return epath.Path(os.fspath(path))
    allowed = ", ".join(f"{x}://" for x in REMOTE_SCHEMES + ((HUB_SCHEME,) if hub else ()))
    raise PathError(
        f"{flag}: unsupported URL scheme {s}:// in {os.fspath(path)!r}; "
        f"use a local path or {allowed}"
    )


def check(path: str | os.PathLike | None, flag: str, *, hub: bool = False) -> None:
    """Refuses an unsupported path at start (before anything compiles); empty passes."""
    if path:
        resolve(path, flag, hub=hub)


def local(path: str | os.PathLike, flag: str, why: str) -> pathlib.Path:
    """A path that must be on local disk (``why``: what is read or written there)."""
    if is_remote(path):
        raise PathError(f"{flag}: {os.fspath(path)!r} must be a local path ({why})")
    return pathlib.Path(os.fspath(path)).absolute()


def data_dir(path: str | os.PathLike, flag: str, stage_dir: str | os.PathLike = "") -> pathlib.Path:
    """Where a TFDS ``data_dir`` is read and written on local disk: itself if local, else its
    staging folder (``stage_dir`` or a per-user cache; :mod:`fgtbt_jax.staging`)."""
    resolve(path, flag)  # an unsupported scheme is refused here
    if not is_remote(path):
        return pathlib.Path(os.fspath(path)).absolute()
    from fgtbt_jax import staging

    return staging.stage_dir(os.fspath(path), stage_dir)


def run_data_dir(data_config: Any) -> pathlib.Path | None:
    """:func:`data_dir` of a run's ``config.data`` (its ``data_dir`` and ``stage_dir``); None
    when ``data_dir`` is empty. Called at start, it refuses what the run cannot use."""
    if not data_config.get("data_dir"):
        return None
    return data_dir(data_config.data_dir, "config.data.data_dir", data_config.get("stage_dir", ""))


@contextlib.contextmanager
def open_atomic(path: str | os.PathLike | epath.Path) -> Iterator[BinaryIO]:
    """A binary file whose content appears at ``path`` whole, or not at all, on success.

    gs://: buffered in memory and uploaded as one object. Local: a temporary file beside
    ``path``, synced and moved into place.
    """
    if is_remote(path):
        buffer = io.BytesIO()
        yield buffer
        resolve(path, "path").write_bytes(buffer.getvalue())  # created when the upload ends
        return
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_bytes(path: str | os.PathLike | epath.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` so that it appears whole or not at all."""
    with open_atomic(path) as f:
        f.write(data)


def write_text(path: str | os.PathLike | epath.Path, text: str) -> None:
    write_bytes(path, text.encode())


# ------------------------------------------------------------------------- Hugging Face Hub


def parse_hub(url: str) -> tuple[str, str | None, str | None]:
    """``hf://owner/repo[/path/in/repo][@revision]`` → ``(repo_id, filename, revision)``."""
    rest, _, revision = url[len(HUB_SCHEME) + 3 :].partition("@")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2:
        raise PathError(f"{url!r}: expected hf://owner/repo[/path/in/repo.pth][@revision]")
    filename = "/".join(parts[2:]) or None
    return f"{parts[0]}/{parts[1]}", filename, revision or None


def _hub_candidates(repo_id: str, revision: str | None) -> list[str]:
    """The ``.pth`` files of a Hub repository (the cached snapshot's when offline)."""
    import huggingface_hub as hub

    try:
        files = hub.list_repo_files(repo_id, revision=revision)
    except Exception:  # noqa: BLE001 - offline mode or no network: the cached snapshot
        try:
            snapshot = hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise FileNotFoundError(
                f"hf://{repo_id}: cannot list the repository and no cached snapshot ({e})"
            ) from e
        root = pathlib.Path(snapshot)
        files = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return sorted(f for f in files if f.endswith(".pth"))


def hub_file(url: str, flag: str) -> pathlib.Path:
    """The local (cached) copy of the checkpoint an ``hf://`` URL names.

    Without a file name the repository's single ``.pth`` is taken; several are listed in the
    error. ``HF_HUB_OFFLINE=1`` reads the Hub cache (``HF_HOME``) only.
    """
    try:
        import huggingface_hub as hub
    except ImportError as e:
        raise PathError(f"{flag}: {url} needs huggingface_hub: pip install -e '.[gcs]'") from e
    repo_id, filename, revision = parse_hub(url)
    if filename is None:
        candidates = _hub_candidates(repo_id, revision)
        if len(candidates) != 1:
            listed = ", ".join(candidates) or "none"
            raise FileNotFoundError(
                f"{flag}: {url} names no file and the repository has "
                f"{len(candidates)} .pth files ({listed}); name one: hf://{repo_id}/FILE.pth"
            )
        filename = candidates[0]
    try:
        return pathlib.Path(hub.hf_hub_download(repo_id, filename, revision=revision))
    except Exception as e:  # noqa: BLE001 - missing file, revision, repository or cache entry
        raise FileNotFoundError(f"{flag}: cannot fetch {url}: {type(e).__name__}: {e}") from e


def checkpoint(path: str | os.PathLike, flag: str) -> epath.Path:
    """A checkpoint input: local, ``gs://`` or ``hf://`` (fetched to the Hub cache)."""
    from etils import epath

    if scheme(path) == HUB_SCHEME:
        return epath.Path(hub_file(os.fspath(path), flag))
    return resolve(path, flag)
