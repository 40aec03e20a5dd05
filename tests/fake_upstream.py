"""A stdlib TeamUp that misbehaves on command: raw HTTP/1.1 over `socketserver` threads.

`aiohttp` would refuse to send most of what this sends (a 101 that never upgrades, bytes that are
not UTF-8 in a header, a body longer than memory, a gzip bomb), so the answers are written by hand.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache

__all__ = ["CSV", "ETAG", "JSON_BODY", "LAST_MODIFIED", "FakeUpstream", "Fault", "gzip_bomb"]

CSV = b"id,amount\r\n1,10\r\n2,20\r\n"
JSON_BODY = b'{"total": 2, "column_headers": [], "rows": [[1, 10], [2, 20]]}'
ETAG = '"v1-abc"'
LAST_MODIFIED = "Tue, 01 Dec 2026 07:00:00 GMT"
_FILLER = b"1234567890,abcdefghij,ABCDEFGHIJ,0987654321,klmnopqrst,KLMNOPQRST\r\n" * 1000


@cache
def gzip_bomb(decoded: int = 500 * 1024 * 1024) -> bytes:
    """`decoded` bytes of zeros, gzipped (500 MiB become about 500 KB)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"\0" * (1024 * 1024)
    parts = [packer.compress(block) for _ in range(decoded // len(block))]
    parts.append(packer.flush())
    return b"".join(parts)


@dataclass
class Fault:
    """What the next report requests get instead of the normal answer."""

    status: int = 200
    reason: str = "Whatever"
    # Raw header lines, written as given (bytes may be anything but CR/LF).
    headers: list[bytes] = field(default_factory=list)
    content_type: bytes | None = None  # default: what the request's Accept asked for
    body: bytes | None = None  # default: the normal report
    stream: int | None = None  # send this many filler bytes chunked (-1: never stop)
    declare_length: int | None = None  # a Content-Length header (with `stream`)
    no_body: bool = False  # the status line and headers only (101, 204, 304 …)
    hang: bool = False  # after the head, keep the connection open and silent
    drop: bool = False  # read the request, then close without a byte
    times: int | None = None  # apply to this many requests (None: every one)


class FakeUpstream:
    """The fake TeamUp on a loopback port; `calls` counts report requests, whatever was answered."""

    def __init__(self) -> None:
        self.calls = 0
        self.hung_up = 0  # answers the proxy hung up on (never reset)
        self.requests: list[dict[str, str]] = []
        self.fault: Fault | None = None
        self.normal_headers: list[bytes] = [
            b"ETag: " + ETAG.encode(),
            b"Last-Modified: " + LAST_MODIFIED.encode(),
            b"Cache-Control: public, max-age=600",
            b'Content-Disposition: attachment; filename="customer_credits.csv"',
        ]
        self._lock = threading.Lock()
        self._stop = threading.Event()
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake._handle(self.connection, self.rfile)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeUpstream:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()

    def set(self, **fault: object) -> None:
        """Misbehave from now on (`times` requests, or until `reset`)."""
        with self._lock:
            self.fault = Fault(**fault)  # type: ignore[arg-type]

    def reset(self) -> None:
        with self._lock:
            self.fault = None
            self.calls = 0
            self.requests.clear()

    def _next_fault(self, path: str) -> Fault | None:
        with self._lock:
            if not path.startswith("/api/"):
                return None
            self.calls += 1
            fault = self.fault
            if fault is not None and fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    self.fault = None
            return fault

    def _handle(self, sock: socket.socket, rfile: object) -> None:
        reader = rfile
        assert hasattr(reader, "readline")
        line = reader.readline(65536)
        if not line:
            return
        method, path, _version = line.decode("latin-1").split(" ", 2)
        headers: dict[str, str] = {}
        while True:
            raw = reader.readline(65536)
            if raw in (b"\r\n", b"\n", b""):
                break
            name, _, value = raw.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        fault = self._next_fault(path)
        if path.startswith("/api/"):
            with self._lock:
                self.requests.append({"path": path, **headers})
        try:
            if method == "HEAD" or not path.startswith("/api/"):
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                return
            self._answer(sock, fault, headers)
        except OSError:  # the proxy hung up, as it should on most faults
            with self._lock:
                self.hung_up += 1

    def _answer(self, sock: socket.socket, fault: Fault | None, request: dict[str, str]) -> None:
        if fault is not None and fault.drop:
            sock.shutdown(socket.SHUT_RDWR)
            return
        wants_json = "json" in request.get("accept", "")
        content_type = b"application/json" if wants_json else b"text/csv; charset=utf-8"
        body = JSON_BODY if wants_json else CSV
        status, reason = 200, "OK"
        extra = list(self.normal_headers)
        if fault is not None:
            status, reason = fault.status, fault.reason
            named = {line.split(b":")[0].strip().lower() for line in fault.headers}
            extra = [line for line in extra if line.split(b":")[0].lower() not in named]
            extra += fault.headers
            content_type = fault.content_type or content_type
            body = fault.body if fault.body is not None else body
        head = [f"HTTP/1.1 {status} {reason}".encode(), b"Content-Type: " + content_type]
        head.append(b"Connection: close")
        head += extra
        if fault is not None and (fault.no_body or fault.hang):
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
            if fault.hang:
                self._stop.wait(30)
            return
        if fault is not None and fault.stream is not None:
            if fault.declare_length is not None:
                head.append(b"Content-Length: %d" % fault.declare_length)
                chunks = self._filler(fault.stream)
                sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
                for chunk in chunks:
                    sock.sendall(chunk)
                return
            head.append(b"Transfer-Encoding: chunked")
            sock.sendall(b"\r\n".join(head) + b"\r\n\r\n")
            for chunk in self._filler(fault.stream):
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sock.sendall(b"0\r\n\r\n")
            return
        head.append(b"Content-Length: %d" % len(body))
        sock.sendall(b"\r\n".join(head) + b"\r\n\r\n" + body)

    def _filler(self, size: int) -> Iterator[bytes]:
        sent = 0
        while (size < 0 or sent < size) and not self._stop.is_set():
            chunk = _FILLER if size < 0 else _FILLER[: size - sent]
            sent += len(chunk)
            yield chunk
