"""A fault-injecting HTTP proxy on loopback, between an S3 client and an S3 server (moto).

Each request is forwarded whole (method, path and query, headers, body) and the
server's answer returned whole (status, headers, body), unless a fault is drawn for it:

- ``"503"``: answered ``503 SlowDown`` with S3's XML error body; never forwarded.
- ``"reset"``: the connection is reset (an RST, SO_LINGER 0) without an answer; never forwarded.
- ``"delay"``: forwarded after a pause.
- ``"lost"``: forwarded and applied by the server, then the connection is reset instead of
  answering: the client cannot tell it from ``"reset"`` and retries a write that happened.

``latency`` (seconds, 0 by default) is added to every request that is forwarded, before it is
forwarded: a fixed round-trip cost such as a remote S3 charges each request, which loopback hides
(benchmarks/io.py measures writes at 0, 10 and 50 ms).

With ``read_only`` set, every write (PUT, POST, DELETE) is answered ``403 AccessDenied`` and never
forwarded, as S3 answers credentials that may read a bucket but not write it.

Faults are drawn from a `random.Random` seeded by the proxy's seed, the request's method and
target (with hex tokens such as uuids and hashes left out: they differ from run to run), and how
many times that method and target were seen before: the order in which concurrent requests
arrive does not change which of them fail.  Standard library only.
"""

from __future__ import annotations

import http.client
import random
import re
import socket
import struct
import threading
import time
from collections import Counter, deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

KINDS = ("503", "reset", "delay", "lost")
# Headers about one connection, not the message: never passed through.
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade", "expect", "content-length"}
_TOKEN = re.compile(r"[0-9a-f]{8,}")
_SLOW_DOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
              b"<Message>Please reduce your request rate.</Message><RequestId>gradlake-fault</RequestId></Error>")
_ACCESS_DENIED = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
                  b"<Message>Access Denied</Message><RequestId>gradlake-read-only</RequestId></Error>")
_WRITES = ("PUT", "POST", "DELETE")


class FaultyS3Proxy:
    """An HTTP proxy to `upstream` on 127.0.0.1 that fails a fraction `fail` of requests, drawn from `kinds`.

    `fail` may be changed while it runs (``proxy.fail = 0`` ends the faults); `planned` lists faults
    for the next requests, in order, before any drawn at random (``proxy.planned.append("lost")``).
    `stats` counts the requests seen and the faults of each kind; `puts` counts, per object
    (``bucket/key``), the writes the server applied (PUT of an object or a copy, and completed
    multipart uploads).  `read_only` refuses every write with 403 AccessDenied (read-only credentials).
    `latency` adds that many seconds to every forwarded request (``fail=0, latency=0.01``: a 10 ms S3).
    """

    def __init__(self, upstream: str, seed: int = 0, fail: float = 0.1, kinds: tuple[str, ...] = ("503", "reset", "delay"),
                 delay: tuple[float, float] = (0.02, 0.2), latency: float = 0.0):
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"fault kinds {sorted(unknown) or kinds!r} are not known; use some of {KINDS}")
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream {upstream!r} must be an http:// URL with a host")
        self.upstream = (parts.hostname, parts.port or 80)
        self.seed, self.fail, self.kinds, self.delay = seed, fail, tuple(kinds), delay
        self.read_only = False
        self.latency = latency  # seconds added to every forwarded request; may be changed while it runs
        self.stats: Counter = Counter()
        self.puts: Counter = Counter()
        self.planned: deque[str] = deque()
        self._seen: Counter = Counter()
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        if self._server is None:
            raise RuntimeError("the proxy is not started; call start() first")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FaultyS3Proxy":
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:  # keep-alive connections would go on being served by their threads
            for conn in list(self._connections):
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._connections.clear()
        self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> "FaultyS3Proxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def draw(self, method: str, target: str) -> tuple[str | None, float]:
        """The fault for this request (None for none) and, for a delay, its length in seconds."""
        target = _TOKEN.sub("#", target)
        with self._lock:
            self.stats["requests"] += 1
            nth = self._seen[method, target]
            self._seen[method, target] += 1
            kind = self.planned.popleft() if self.planned else None
        if kind:
            return kind, self.delay[1] if kind == "delay" else 0.0
        rng = random.Random(f"{self.seed}:{method}:{target}:{nth}")
        if rng.random() >= self.fail:
            return None, 0.0
        kind = rng.choice(self.kinds)
        return kind, rng.uniform(*self.delay) if kind == "delay" else 0.0

    def count(self, *names: str) -> None:
        with self._lock:
            self.stats.update(names)

    def applied(self, method: str, target: str, status: int) -> None:
        """Count an object write the server answered with success."""
        path, _, query = target.partition("?")
        params = {p.split("=", 1)[0] for p in query.split("&") if p}
        whole = (method == "PUT" and "uploadId" not in params) or (method == "POST" and "uploadId" in params)
        object_key = path.lstrip("/").count("/") >= 1 and not path.endswith("/")
        if 200 <= status < 300 and whole and object_key and not params & {"tagging", "acl", "retention", "legal-hold"}:
            with self._lock:
                self.puts[unquote(path.lstrip("/"))] += 1


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        pass  # a client that gave up (or a reset of our own) is not news; real errors reach the client as 502


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, as an S3 server speaks
    owner: FaultyS3Proxy

    def setup(self) -> None:
        super().setup()
        with self.owner._lock:
            self.owner._connections.add(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:
            pass  # the socket was reset on purpose
        with self.owner._lock:
            self.owner._connections.discard(self.connection)

    def log_message(self, format, *args) -> None:
        pass  # quiet; and a request line or header is never written anywhere

    def _body(self) -> bytes | None:
        """The request body, de-chunked; None when the request has none."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            parts = []
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(parts)
                parts.append(self.rfile.read(size))
                self.rfile.readline()
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _abort(self) -> None:
        """Close the connection with an RST rather than a FIN: the client reads 'connection reset by peer'."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        # The socket really closes (and sends the RST) once its file objects are closed too.
        for f in (self.rfile, self.wfile, self.connection):
            try:
                f.close()
            except OSError:
                pass

    def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=60)
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    upstream.putheader(name, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            answer = upstream.getresponse()
            return answer.status, answer.reason, answer.getheaders(), answer.read()
        finally:
            upstream.close()

    def _error(self, status: int, reason: str, body: bytes) -> None:
        """Answer with S3's XML error body, without forwarding."""
        self.send_response_only(status, reason)
        for name, value in (("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                            ("x-amz-request-id", "gradlake-fault")):
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        body = self._body()  # read whole before any fault, so a kept-alive connection stays in step
        if self.owner.read_only and self.command in _WRITES:
            self.owner.count("refused")
            return self._error(403, "Forbidden", _ACCESS_DENIED)
        kind, pause = self.owner.draw(self.command, self.path)
        if kind:
            self.owner.count(kind)
        if kind == "503":
            return self._error(503, "Slow Down", _SLOW_DOWN)
        if kind == "reset":
            return self._abort()
        pause = (pause if kind == "delay" else 0.0) + self.owner.latency
        if pause:
            time.sleep(pause)
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError as err:
            status, reason, headers, payload = 502, "Bad Gateway", [], f"upstream failed: {err}".encode()
        self.owner.applied(self.command, self.path, status)
        if kind == "lost":
            return self._abort()
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD" or status in (204, 304):
            length = next((v for n, v in headers if n.lower() == "content-length"), None)
            if length is not None and status != 204:
                self.send_header("Content-Length", length)  # HEAD: the object's size, no body
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(payload)

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_OPTIONS = do_PATCH = _handle
