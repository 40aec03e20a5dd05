"""Writing report answers to callers that may not read them: paced writes, one copy per body."""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
import weakref
from collections.abc import Mapping

from aiohttp import web
from prometheus_client import Counter

__all__ = ["BodyPool", "PacedResponse"]

log = logging.getLogger("teamup_proxy")
# Bodies from this size on are written a chunk at a time and shared between the responses that
# send them: a stalled caller then holds a transport buffer, not its own copy of the answer.
LARGE = 64 * 1024
CHUNK = 64 * 1024
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, discards the queue


class BodyPool:
    """One copy of each large body that some response is still sending (equal bytes, one object).

    Every hit decodes its own copy of the entry; callers that read slowly would each keep one.
    """

    def __init__(self) -> None:
        self._bodies: dict[bytes, tuple[bytes, int]] = {}

    def share(self, body: bytes, owner: object) -> bytes:
        """The shared copy of `body`, held until `owner` is garbage collected."""
        if len(body) < LARGE:
            return body
        shared, users = self._bodies.get(body, (body, 0))
        self._bodies[shared] = (shared, users + 1)
        weakref.finalize(owner, self._release, shared)
        return shared

    def _release(self, body: bytes) -> None:
        shared, users = self._bodies.get(body, (body, 0))
        if users > 1:
            self._bodies[shared] = (shared, users - 1)
        else:
            self._bodies.pop(body, None)

    def __len__(self) -> int:
        return len(self._bodies)


POOL = BodyPool()


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


class PacedResponse(web.Response):
    """A response whose every write must make progress within `timeout`, or the connection ends."""

    def __init__(
        self,
        request: web.Request,
        *,
        status: int,
        body: bytes,
        headers: Mapping[str, str],
        timeout: float,
        counter: Counter,
        request_id: str,
    ) -> None:
        super().__init__(status=status, headers=headers)
        self.body = POOL.share(body, self)
        self._request = request
        self._timeout = timeout
        self._counter = counter
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
            await _delivered(self._request.transport, self._timeout)
        except TimeoutError:
            self._counter.inc()
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
