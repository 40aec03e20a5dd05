"""Writing report answers to callers that may not read them: paced writes, one copy per body,
and at most PROXY_CLIENT_WRITE_BUFFER_BYTES of bodies being written per worker."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import math
import socket
import struct
import termios
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.web_request import BaseRequest
from prometheus_client import Counter

from ..core.bodies import LARGE, BodyPool
from .errors import JSON, error_body

__all__ = ["BudgetedResponse", "PacedResponse", "Sending", "paced_response"]

log = logging.getLogger("teamup_proxy")
# Bodies from LARGE on are written a chunk at a time and shared between the responses that
# send them (BodyPool): a stalled caller then holds a transport buffer, not its own copy.
CHUNK = 64 * 1024
# What a refused answer keeps of its headers (the rest describe the answer it is not).
_KEPT = ("RateLimit", "RateLimit-Policy", "X-Proxy-Report")


@dataclass(frozen=True, slots=True)
class Sending:
    """How this worker writes report answers; one for every response."""

    pool: BodyPool
    timeout: float  # PROXY_CLIENT_WRITE_TIMEOUT
    timeouts: Counter  # callers cut off for reading nothing for `timeout`
    refusals: Counter  # answers refused: no room in the pool's budget for `timeout`


_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, discards the queue


# Room kept for the status line and headers when judging whether an answer fits.
_HEAD_ROOM = 8 * 1024


def _has_room(transport: asyncio.Transport | None, size: int) -> bool:
    """Whether `size` bytes and their headers fit in the transport's buffer without pausing.

    (uvloop's transports have the methods without subclassing `asyncio.WriteTransport`.)"""
    if transport is None or transport.is_closing():
        return False
    try:
        high = transport.get_write_buffer_limits()[1]
        return transport.get_write_buffer_size() + size + _HEAD_ROOM < high
    except (AttributeError, NotImplementedError):
        return False


def _unsent(fd: int) -> int:
    """Bytes the kernel still holds to send on socket `fd` (Linux's SIOCOUTQ); 0 if unknown."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except (OSError, AttributeError):
        return 0


async def _delivered(transport: asyncio.Transport | None, patience: float) -> None:
    """Wait while the kernel still sends the answer's tail, as long as the caller keeps reading.

    The kernel's send buffer grows to megabytes: a whole answer of that size "is written" at
    once, and only this watch can tell a caller that reads nothing (TimeoutError after
    `patience` seconds without progress)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    try:
        fd = sock.fileno() if sock is not None else -1
    except (OSError, ValueError):
        return
    if fd < 0:
        return
    loop = asyncio.get_running_loop()
    left, moved = _unsent(fd), loop.time()
    pause = 0.005
    while left > 0:
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.25, patience / 4)
        now, unsent = loop.time(), _unsent(fd)
        if unsent < left:
            left, moved = unsent, now
        elif now - moved >= patience:
            raise TimeoutError


def paced_response(
    request: web.Request,
    *,
    status: int,
    body: bytes,
    headers: Mapping[str, str],
    sending: Sending,
    request_id: str,
) -> PacedResponse:
    """The response for a report answer: a large body is also written within the budget."""
    kind = BudgetedResponse if len(body) >= LARGE else PacedResponse
    return kind(
        request, status=status, body=body, headers=headers, sending=sending, request_id=request_id
    )


class PacedResponse(web.Response):
    """A response whose every write must make progress within `timeout`, or the connection ends."""

    def __init__(
        self,
        request: web.Request,
        *,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        sending: Sending,
        request_id: str,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self.body = sending.pool.hold(body, self)
        self._request = request
        self._sending = sending
        self._timeout = sending.timeout
        self._request_id = request_id

    async def write_eof(self, data: bytes = b"") -> None:
        body = self.body
        size = len(body) if isinstance(body, bytes) else 0
        sent = 0
        try:
            if size < LARGE:
                if _has_room(self._request.transport, size):
                    # The whole answer fits under the transport's high-water mark: the write
                    # cannot wait, so it needs no timer (`asyncio.timeout` costs ~3 µs).
                    await super().write_eof(data)
                    return
                async with asyncio.timeout(self._timeout):
                    await super().write_eof(data)
                return
            assert isinstance(body, bytes)
            view = memoryview(body)
            for offset in range(0, size, CHUNK):
                # A write waits while the transport's buffer is over its high-water mark.
                async with asyncio.timeout(self._timeout):
                    await web.StreamResponse.write(self, view[offset : offset + CHUNK])
                sent = min(size, offset + CHUNK)
            async with asyncio.timeout(self._timeout):
                await web.StreamResponse.write_eof(self)
            self._written()
            await _delivered(self._request.transport, self._timeout)
        except TimeoutError:
            self._sending.timeouts.inc()
            log.warning(
                "the caller read nothing for the write timeout; connection closed",
                extra={
                    "event": "client_write_timeout",
                    "request_id": self._request_id,
                    "bytes_sent": sent,
                    "bytes_total": size,
                },
            )
            transport = self._request.transport
            if transport is not None:
                sock = transport.get_extra_info("socket")
                try:  # a reset, so the kernel drops what is queued too (no orphaned FIN-WAIT)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
                except (AttributeError, OSError):
                    pass
                transport.abort()
            raise ConnectionResetError("the caller stopped reading") from None

    def _written(self) -> None:
        """The whole body is in the kernel's hands (what is left is watching it go out)."""


class BudgetedResponse(PacedResponse):
    """A PacedResponse of a large body, written within the pool's budget (BodyPool): it waits
    for room up to the write timeout, else it is a 503. (Small answers skip this await.)"""

    _writing: bytes | None = None  # the body counted in the pool's budget

    async def prepare(self, request: BaseRequest) -> AbstractStreamWriter | None:
        body = self.body
        if isinstance(body, bytes) and self._writing is None and not self.prepared:
            pool = self._sending.pool
            if pool.start_writing(body) or await pool.wait_to_write(body, self._timeout):
                self._writing = body
            else:
                self._refuse(len(body))
        try:
            return await super().prepare(request)
        except BaseException:
            self._done_writing()
            raise

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await super().write_eof(data)
        finally:
            self._done_writing()

    def _written(self) -> None:
        self._done_writing()

    def _done_writing(self) -> None:
        if self._writing is not None:
            self._sending.pool.done_writing(self._writing)
            self._writing = None

    def _refuse(self, size: int) -> None:
        pool = self._sending.pool
        self._sending.refusals.inc()
        log.warning(
            "no room in PROXY_CLIENT_WRITE_BUFFER_BYTES for this answer within the write "
            "timeout; answered 503",
            extra={
                "event": "client_write_budget",
                "request_id": self._request_id,
                "bytes_total": size,
                "bytes_writing": pool.writing,
                "budget": pool.budget,
            },
        )
        kept = {name: self.headers[name] for name in _KEPT if name in self.headers}
        self.headers.clear()
        self.headers.update(kept)
        self.headers["Retry-After"] = str(math.ceil(self._timeout))
        self.set_status(503)
        self.content_type = JSON
        self.body = error_body(
            503, "proxy_busy", "The proxy is writing too many large answers; retry later."
        )
