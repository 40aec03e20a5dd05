"""The large bodies a worker holds for its callers: one copy of each, and a budget for them."""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

__all__ = ["LARGE", "BodyPool"]

# Bodies from this size on are shared and counted; smaller ones cost less than the bookkeeping.
LARGE = 64 * 1024


class _Record:
    """One held body: who refers to it, and how many responses are writing it."""

    __slots__ = ("body", "payload", "users", "writers")

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.payload: bytes | None = None  # its compressed form in the store, when read from it
        self.users = 0
        self.writers = 0


class BodyPool:
    """One copy of each large body in use in this process; at most `budget` bytes being written.

    A body is held while an entry decoded from the store, or a response, refers to it. Equal
    bodies share one object, and a stored payload whose body is held is not decoded again: each
    hit read from Redis would otherwise decompress a copy of its own, and the hits of one
    auto-pipelined batch would all hold theirs at once (hundreds of MiB for 6 MB answers).

    The bodies that responses are writing, each counted once however many callers it goes to,
    take at most `budget` bytes; a response whose body would not fit waits for room. The only
    exception is an empty pool, so that a body larger than the budget is never starved.
    """

    def __init__(self, budget: int, on_change: Callable[[int], None] | None = None) -> None:
        self.budget = budget
        self.writing = 0  # bytes of the distinct bodies responses are writing
        self.waiting = 0  # bytes of the responses waiting for room
        self._records: dict[bytes, _Record] = {}
        # Compressed payload -> body. Looked up with a memoryview of the raw Redis value (equal
        # hashes and equality with bytes), so a held entry costs no slice copy either.
        self._payloads: dict[bytes | memoryview, bytes] = {}
        self._room: asyncio.Event | None = None
        self._on_change = on_change

    def decoded(self, payload: memoryview) -> bytes | None:
        """The held body decompressed from `payload` (a stored value's body part), if any."""
        return self._payloads.get(payload) if self._payloads else None

    def hold(self, body: bytes, owner: object, payload: bytes | memoryview | None = None) -> bytes:
        """The pool's copy of `body`, held until `owner` is garbage collected.

        `payload` is its compressed form in the store, so the next read of it finds this copy."""
        if len(body) < LARGE:
            return body
        record = self._records.get(body)
        if record is None:
            record = self._records[body] = _Record(body)
        if payload is not None and record.payload is None:
            record.payload = payload if isinstance(payload, bytes) else bytes(payload)
            self._payloads[record.payload] = record.body
        record.users += 1
        weakref.finalize(owner, self._let_go, record)
        return record.body

    def _let_go(self, record: _Record) -> None:
        record.users -= 1
        if record.users > 0:
            return
        if self._records.get(record.body) is record:
            del self._records[record.body]
        if record.payload is not None and self._payloads.get(record.payload) is record.body:
            del self._payloads[record.payload]

    def start_writing(self, body: bytes) -> bool:
        """Count `body` as being written, if it fits (a held body: see `hold`)."""
        record = self._records.get(body)
        if record is None:
            return True  # small: not counted
        if record.writers:
            record.writers += 1  # already counted: another caller of the same answer
            return True
        size = len(record.body)
        if self.writing and self.writing + size > self.budget:
            return False
        record.writers = 1
        self.writing += size
        if self._on_change is not None:
            self._on_change(self.writing)
        return True

    async def wait_to_write(self, body: bytes, within: float) -> bool:
        """`start_writing`, waiting up to `within` seconds for room; False when there was none.

        Waiting responses hold their bodies too: they may take at most `budget` bytes more,
        and a response past that is refused at once."""
        if self.start_writing(body):
            return True
        size = len(body)
        if self.waiting + size > self.budget:
            return False
        self.waiting += size
        try:
            async with asyncio.timeout(within):
                while not self.start_writing(body):
                    if self._room is None:
                        self._room = asyncio.Event()
                    await self._room.wait()
            return True
        except TimeoutError:
            return False
        finally:
            self.waiting -= size

    def done_writing(self, body: bytes) -> None:
        """One response started by `start_writing` has finished with `body` (sent or cut)."""
        record = self._records.get(body)
        if record is None or not record.writers:
            return
        record.writers -= 1
        if record.writers:
            return
        self.writing -= len(record.body)
        if self._on_change is not None:
            self._on_change(self.writing)
        room, self._room = self._room, None
        if room is not None:
            room.set()

    def __len__(self) -> int:
        return len(self._records)
