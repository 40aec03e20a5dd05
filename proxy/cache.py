"""Cached answers and where they live: Redis, or a bounded in-process LRU."""

from __future__ import annotations

import math
import struct
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson

from .redisconn import AnyRedis

__all__ = [
    "CacheStore",
    "CachedResponse",
    "MemoryCacheStore",
    "RedisCacheStore",
    "is_cacheable",
]

_MAGIC = b"TP1"
_RAW, _ZLIB = b"r", b"z"
_LEN = struct.Struct(">I")
# Below this size compression saves too little to pay for the CPU on every hit.
_COMPRESS_MIN = 1024
CACHEABLE_TYPES = ("application/json", "text/csv")


@dataclass(frozen=True, slots=True)
class CachedResponse:
    """One stored upstream answer: status, allowlisted headers, body and its freshness window."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    fresh_until: float
    header_map: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header_map", dict(self.headers))

    @property
    def content_type(self) -> str:
        """The upstream `Content-Type`."""
        return self.header_map.get("Content-Type", "application/octet-stream")

    def is_fresh(self, now: float) -> bool:
        """Whether the entry may be served without asking upstream."""
        return now < self.fresh_until

    def ttl(self, now: float) -> int:
        """Seconds of freshness left (negative once stale), as `Cache-Status: ttl=` wants."""
        remaining = self.fresh_until - now
        return math.floor(remaining) if remaining >= 0 else -math.ceil(-remaining)

    def age(self, now: float) -> int:
        """Whole seconds since the entry was fetched (the `Age` header)."""
        return max(0, int(now - self.stored_at))

    def encode(self) -> bytes:
        """One Redis value: metadata and body, the body compressed when that pays."""
        meta = orjson.dumps(
            {"s": self.status, "h": self.headers, "t": self.stored_at, "f": self.fresh_until}
        )
        flag, payload = _RAW, self.body
        if len(self.body) >= _COMPRESS_MIN:
            packed = zlib.compress(self.body, 6)
            if len(packed) < len(self.body) * 0.9:
                flag, payload = _ZLIB, packed
        return b"".join((_MAGIC, flag, _LEN.pack(len(meta)), meta, payload))

    @classmethod
    def decode(cls, data: bytes) -> CachedResponse | None:
        """The entry `encode` wrote, or None for anything else (an old format, corruption)."""
        if data[:3] != _MAGIC or len(data) < 8:
            return None
        try:
            flag = data[3:4]
            (meta_len,) = _LEN.unpack_from(data, 4)
            meta = orjson.loads(data[8 : 8 + meta_len])
            payload = data[8 + meta_len :]
            body = zlib.decompress(payload) if flag == _ZLIB else payload
            headers = tuple((str(k), str(v)) for k, v in meta["h"])
            return cls(int(meta["s"]), headers, body, float(meta["t"]), float(meta["f"]))
        except (ValueError, KeyError, TypeError, zlib.error, struct.error):
            return None


def is_cacheable(status: int, headers: dict[str, str], body_size: int, max_bytes: int) -> bool:
    """200 answers of JSON or CSV, under the size cap, that upstream lets a shared cache keep."""
    if status != 200 or body_size > max_bytes:
        return False
    if "Set-Cookie" in headers:
        return False
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type not in CACHEABLE_TYPES:
        return False
    directives = {
        part.split("=")[0].strip().lower() for part in headers.get("Cache-Control", "").split(",")
    }
    return not directives & {"no-store", "private"}


class CacheStore(Protocol):
    """Where entries live; `ttl` is the physical lifetime (fresh plus stale window)."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None: ...

    async def delete(self, key: str) -> bool: ...

    async def clear(self) -> int: ...


class MemoryCacheStore:
    """A bounded LRU in this process: the embedded store, the Redis-outage fallback and the L1.

    Bounded twice: by entries and by body bytes (one report page can be 40 KB or 8 MiB).
    """

    def __init__(
        self,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.time,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, CachedResponse]] = OrderedDict()
        self._bytes = 0

    def get_now(self, key: str) -> CachedResponse | None:
        """The entry, synchronously (the L1 path needs no await)."""
        item = self._data.get(key)
        if item is None:
            return None
        expires, entry = item
        if self._clock() >= expires:
            self._drop(key)
            return None
        self._data.move_to_end(key)
        return entry

    def set_now(self, key: str, entry: CachedResponse, ttl: float) -> None:
        """Store synchronously, evicting the least recently used entries beyond the bounds."""
        self._drop(key)
        if len(entry.body) > self.max_bytes:
            return
        self._data[key] = (self._clock() + ttl, entry)
        self._bytes += len(entry.body)
        while len(self._data) > self.max_entries or self._bytes > self.max_bytes:
            self._drop(next(iter(self._data)))

    def _drop(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self._bytes -= len(item[1].body)
        return True

    def clear_now(self) -> None:
        """Drop everything, synchronously."""
        self._data.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> CachedResponse | None:
        return self.get_now(key)

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None:
        self.set_now(key, entry, ttl)

    async def delete(self, key: str) -> bool:
        return self._drop(key)

    async def clear(self) -> int:
        count = len(self._data)
        self.clear_now()
        return count


class RedisCacheStore:
    """Entries as single Redis values under `prefix`; one GET per lookup."""

    def __init__(self, client: AnyRedis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def entry_key(self, key: str) -> str:
        """The Redis key of an entry (hash-tagged, so its lease shares the Cluster slot)."""
        return f"{self.prefix}c:{{{key}}}"

    async def get(self, key: str) -> CachedResponse | None:
        data = await self.client.get(self.entry_key(key))
        return None if not isinstance(data, bytes) else CachedResponse.decode(data)

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None:
        await self.client.set(self.entry_key(key), entry.encode(), px=max(1, int(ttl * 1000)))

    async def delete(self, key: str) -> bool:
        return bool(await self.client.unlink(self.entry_key(key)))

    async def clear(self) -> int:
        """Remove every entry with SCAN + UNLINK in batches (never KEYS, never a blocking DEL)."""
        removed = 0
        batch: list[bytes] = []
        async for name in self.client.scan_iter(match=f"{self.prefix}c:*", count=500):
            batch.append(name)
            if len(batch) >= 500:
                removed += await self.client.unlink(*batch)
                batch = []
        if batch:
            removed += await self.client.unlink(*batch)
        return removed
