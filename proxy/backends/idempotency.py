"""Idempotency-Key records: per (client, key), an in-flight mark while the write is sent, then
the completed answer for `PROXY_IDEMPOTENCY_TTL` — in Redis, so every replica replays it.

Without Redis each process keeps its own (a retry that lands on another worker is not
recognised meanwhile; README says so).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from . import keys
from .link import REDIS_ERRORS, AnyRedis, RedisLink
from .scripts import load_script

__all__ = ["Claimed", "Held", "IdempotencyStore", "Stored"]


@dataclass(frozen=True, slots=True)
class Stored:
    """A completed answer kept for replay."""

    fingerprint: str
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def to_bytes(self) -> bytes:
        head = orjson.dumps({"f": self.fingerprint, "s": self.status, "h": self.headers})
        return b"D" + head + b"\n" + self.body

    @classmethod
    def from_bytes(cls, data: bytes) -> Stored:
        head, _, body = data[1:].partition(b"\n")
        meta = orjson.loads(head)
        headers = tuple((str(k), str(v)) for k, v in meta["h"])
        return cls(str(meta["f"]), int(meta["s"]), headers, body)


@dataclass(frozen=True, slots=True)
class Held:
    """Another request with this key is waiting for the budget (`since` None) or was being
    sent at wall-clock time `since` (if its proxy died meanwhile, the mark stays: whether
    TeamUp did it is unknown, and it must never be sent again)."""

    fingerprint: str
    since: float | None = None


@dataclass(slots=True)
class Claimed:
    """This request holds the key: `sending` just before it is sent, then `finish` (or
    `release`, if it never was)."""

    key: str
    mark: bytes
    fingerprint: str = ""


def _mark(fingerprint: str) -> bytes:
    return b"F" + orjson.dumps({"f": fingerprint, "n": secrets.token_hex(8)})


def _parse(data: bytes) -> Stored | Held:
    if data[:1] == b"D":
        return Stored.from_bytes(data)
    meta = orjson.loads(data[1:])
    since = meta.get("t") if data[:1] == b"S" else None
    return Held(str(meta["f"]), None if since is None else float(since))


class IdempotencyStore:
    """Claim, finish and release Idempotency-Keys, in Redis or (without it) in this process."""

    def __init__(
        self,
        link: RedisLink,
        client: AnyRedis | None,
        prefix: str,
        *,
        ttl: int,
        flight_ttl: float,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.link = link
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self.flight_ms = max(1000, int(flight_ttl * 1000))
        self.clock = clock
        self.wall = wall  # `since` of a mark another replica reads
        self.flight = flight_ttl
        self._memory: dict[str, tuple[float, bytes]] = {}
        self._begin = client.register_script(load_script("idempotency_begin")) if client else None
        self._release = (
            client.register_script(load_script("idempotency_release")) if client else None
        )

    async def claim(
        self, client: str, token: str, fingerprint: str, provider: str | None = None
    ) -> Claimed | Stored | Held:
        """Hold the key for this write, or what holds it already."""
        key = keys.idempotency(self.prefix, client, token, provider)
        mark = _mark(fingerprint)
        if self._begin is not None and self.link.up:
            try:
                reply = await self._begin(keys=[key], args=[mark, self.flight_ms])
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "idempotency")
            else:
                if int(reply[0]) == 1:
                    return Claimed(key, mark, fingerprint)
                return _parse(bytes(reply[1]))
        found = self._memory_get(key)
        if found is not None:
            return _parse(found)
        self._memory_set(key, mark, self.flight_ms / 1000)
        return Claimed(key, mark, fingerprint)

    async def sending(self, claimed: Claimed) -> None:
        """The write is about to be sent: from now on the mark outlives a proxy that dies (for
        the key's whole lifetime), so a repeat learns the outcome is unknown, never resends."""
        mark = b"S" + orjson.dumps(
            {"f": claimed.fingerprint, "n": secrets.token_hex(8), "t": self.wall()}
        )
        if self.client is not None and self.link.up:
            try:
                await self.client.set(claimed.key, mark, ex=self.ttl)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "idempotency")
            else:
                claimed.mark = mark
                return
        self._memory_set(claimed.key, mark, self.ttl)
        claimed.mark = mark

    async def finish(self, claimed: Claimed, answer: Stored) -> None:
        """Keep the completed answer for `ttl` seconds."""
        data = answer.to_bytes()
        if self.client is not None and self.link.up:
            try:
                await self.client.set(claimed.key, data, ex=self.ttl)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "idempotency")
            else:
                self._memory.pop(claimed.key, None)
                return
        self._memory_set(claimed.key, data, self.ttl)

    async def release(self, claimed: Claimed) -> None:
        """Give the key back: the write was not sent, so a retry with it may send it."""
        if self._release is not None and self.link.up:
            try:
                await self._release(keys=[claimed.key], args=[claimed.mark])
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "idempotency")
        found = self._memory.get(claimed.key)
        if found is not None and found[1] == claimed.mark:
            del self._memory[claimed.key]

    def _memory_get(self, key: str) -> bytes | None:
        found = self._memory.get(key)
        if found is None:
            return None
        if found[0] <= self.clock():
            del self._memory[key]
            return None
        return found[1]

    def _memory_set(self, key: str, data: bytes, ttl: float) -> None:
        if len(self._memory) >= 10_000:
            now = self.clock()
            for name in [k for k, (until, _) in self._memory.items() if until <= now]:
                del self._memory[name]
            if len(self._memory) >= 10_000:
                self._memory.pop(next(iter(self._memory)))
        self._memory[key] = (self.clock() + ttl, data)
