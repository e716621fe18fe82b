"""TensorFlow's own GCS client (``tf.io.gfile``: TensorBoard's writer, tf.data, TFDS's TF
backend) against fake-gcs-server, in a network and mount namespace of its own.

TF's client has a hard-coded endpoint (``https://www.googleapis.com``, reads from
``https://storage.googleapis.com``) and no emulator setting, so this module, run as
``unshare -n -m python tests/tf_gcs.py DUMP -- COMMAND...`` (root; ``unshare -r -n -m`` in a
user namespace otherwise), builds the world it expects:

* an empty network namespace with only the loopback up (nothing leaves the machine);
* a hosts file mapping the Google names to 127.0.0.1, bind-mounted over ``/etc/hosts`` (the
  mount namespace keeps this from the rest of the machine);
* fake-gcs-server (tests/gcs_server.py) with a bucket, behind :class:`Proxy` on 127.0.0.1:443
  with a self-signed certificate for those names (trusted through ``CURL_CA_BUNDLE``).

The proxy normalizes what fake-gcs-server (Go's net/http) does not take from TF's libcurl:
the resumable-upload initiation (an empty POST) carries ``Transfer-Encoding: identity``, which
Go answers with 501 "Unsupported transfer encoding", and the upload itself (PUT) a chunked body
with a ``Content-Length`` beside it; every body is forwarded decoded, with its real
``Content-Length`` and no ``Transfer-Encoding``. The ``Host`` header is kept (fake-gcs-server
serves ``storage.googleapis.com/BUCKET/OBJECT`` reads by host), and the upload session's
``Location`` (``http://`` and that host) is rewritten to ``https://``, so the upload comes back
through the proxy. COMMAND runs with ``{bucket}`` in its arguments replaced
by the bucket's ``gs://name`` (also in ``BUCKET``), TF's test token, and gcsfs and tensorstore
pointed at fake-gcs-server directly (``gcs_server.FakeGcs.env``). Afterwards every object of
the bucket is copied into the local folder DUMP (by object name), and this process exits with
COMMAND's exit code.
"""

from __future__ import annotations

import http.client
import http.server
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import urllib.parse

import gcs_server

HOSTS = ("www.googleapis.com", "storage.googleapis.com", "oauth2.googleapis.com")


def unshare_prefix() -> list[str] | None:
    """The ``unshare`` command line that works here: ``-n -m`` (root), else ``-r -n -m`` (in a
    user namespace, where unprivileged ones are allowed); None when neither does."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "-n", "-m"], ["unshare", "-r", "-n", "-m"]):
        if subprocess.run([*prefix, "true"], capture_output=True, check=False).returncode == 0:
            return prefix
    return None


def command(prefix: list[str], dump: pathlib.Path, cmd: list[str]) -> list[str]:
    """``cmd`` run in its own namespaces against a fresh bucket (see the module docstring)."""
    return [*prefix, sys.executable, __file__, str(dump), "--", *cmd]


def _read_body(handler: http.server.BaseHTTPRequestHandler) -> bytes:
    """The request body, chunked transfer encoding decoded."""
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        chunks = []
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while handler.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(chunks)
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
    return handler.rfile.read(int(handler.headers.get("Content-Length", 0) or 0))


class Proxy(http.server.ThreadingHTTPServer):
    """Forwards every request to fake-gcs-server at ``upstream`` (``host:port``)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], upstream: str) -> None:
        self.upstream = upstream
        super().__init__(address, _Handler)

    def location(self, url: str) -> str:
        """An upload-session URL from fake-gcs-server (``http://`` + the request's host, or its
        own address) as the TLS endpoint, so that the upload comes back through here."""
        parts = urllib.parse.urlsplit(url)
        host = HOSTS[0] if parts.netloc == self.upstream else parts.netloc
        return parts._replace(scheme="https", netloc=host).geturl() if host in HOSTS else url


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: Proxy

    def _forward(self) -> None:
        body = _read_body(self)
        skip = {"transfer-encoding", "content-length", "connection", "expect"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        headers["Content-Length"] = str(len(body))
        conn = http.client.HTTPConnection(self.server.upstream, timeout=120)
        try:
            conn.request(self.command, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        self.send_response(response.status, response.reason)
        for k, v in response.getheaders():
            if k.lower() in ("transfer-encoding", "content-length", "connection"):
                continue
            if k.lower() == "location":
                v = self.server.location(v)
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        if os.environ.get("TF_GCS_PROXY_LOG"):
            sys.stderr.write(f"proxy: {format % args}\n")


def _certificate(folder: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    names = ",".join(f"DNS:{h}" for h in HOSTS)
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-subj", f"/CN={HOSTS[0]}", "-addext", f"subjectAltName={names}"]
        + ["-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key


def main(dump: pathlib.Path, cmd: list[str]) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        hosts = folder / "hosts"
        hosts.write_text("127.0.0.1 localhost " + " ".join(HOSTS) + "\n")
        subprocess.run(["mount", "--bind", str(hosts), "/etc/hosts"], check=True)
        cert, key = _certificate(folder)
        with gcs_server.running(folder / "fake_gcs.log") as server:
            upstream = f"127.0.0.1:{server.port}"
            tls = Proxy(("127.0.0.1", 443), upstream)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            tls.socket = context.wrap_socket(tls.socket, server_side=True)
            threading.Thread(target=tls.serve_forever, daemon=True).start()
            bucket = server.new_bucket()
            # gcsfs and tensorstore reach the emulator directly, TensorFlow through the proxy.
            env = {**os.environ, **server.env}
            env.update(
                BUCKET=bucket,
                CURL_CA_BUNDLE=str(cert),
                GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
                GCE_METADATA_HOST="127.0.0.1:1",
                NO_GCE_CHECK="True",
            )
            cmd = [a.replace("{bucket}", bucket) for a in cmd]
            code = subprocess.run(cmd, env=env, check=False).returncode
            names = server.objects(bucket)
            folders = {n.rsplit("/", i)[0] for n in names for i in range(1, n.count("/") + 1)}
            for name in names:
                if name in folders or name.endswith("/"):
                    continue  # a folder's placeholder object
                target = dump / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(server.read(f"{bucket}/{name}"))
            tls.shutdown()
            tls.server_close()
    return code


if __name__ == "__main__":
    sep = sys.argv.index("--")
    sys.exit(main(pathlib.Path(sys.argv[1]), sys.argv[sep + 1 :]))
