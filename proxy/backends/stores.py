"""Where entries live: Redis, a bounded in-process LRU, and Redis-or-memory (fallback)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from ..core.bodies import BodyPool
from ..core.entry import CachedResponse
from . import keys
from .link import REDIS_ERRORS, AnyRedis, RedisLink

__all__ = ["CacheStore", "FallbackCacheStore", "MemoryCacheStore", "RedisCacheStore"]


class CacheStore(Protocol):
    """Where entries live; `ttl` is the physical lifetime (fresh plus stale window)."""

    async def get(self, key: str) -> CachedResponse | None: ...

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None: ...

    async def delete(self, key: str) -> bool: ...

    async def clear(self, operation: str | None = None, provider: str | None = None) -> int: ...


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

    def delete_now(self, key: str) -> bool:
        """Drop one entry, synchronously; whether it was there."""
        return self._drop(key)

    def _drop(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self._bytes -= len(item[1].body)
        return True

    def clear_now(self, operation: str | None = None, provider: str | None = None) -> int:
        """Drop everything (or every entry of one operation and/or provider), synchronously;
        how many went."""
        if operation is None and provider is None:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
            return count
        doomed = [key for key in self._data if keys.matches(key, operation, provider)]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> CachedResponse | None:
        return self.get_now(key)

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None:
        self.set_now(key, entry, ttl)

    async def delete(self, key: str) -> bool:
        return self._drop(key)

    async def clear(self, operation: str | None = None, provider: str | None = None) -> int:
        return self.clear_now(operation, provider)


class RedisCacheStore:
    """Entries as single Redis values under `prefix`; one GET per lookup."""

    def __init__(self, client: AnyRedis, prefix: str, bodies: BodyPool | None = None) -> None:
        self.client = client
        self.prefix = prefix
        self.bodies = bodies  # large bodies decoded once while in use (core/bodies.py)

    def entry_key(self, key: str) -> str:
        """The Redis key of an entry (hash-tagged, so its lease shares the Cluster slot)."""
        return keys.entry(self.prefix, key)

    async def get(self, key: str) -> CachedResponse | None:
        data = await self.client.get(self.entry_key(key))
        return None if not isinstance(data, bytes) else CachedResponse.decode(data, self.bodies)

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None:
        await self.client.set(self.entry_key(key), entry.encode(), px=max(1, int(ttl * 1000)))

    async def delete(self, key: str) -> bool:
        return bool(await self.client.unlink(self.entry_key(key)))

    async def clear(self, operation: str | None = None, provider: str | None = None) -> int:
        """Remove every entry (or one operation's, one provider's) with SCAN + UNLINK in
        batches (never KEYS, never a blocking DEL)."""
        removed = 0
        batch: list[bytes] = []
        pattern = keys.entries(self.prefix, operation, provider)
        async for name in self.client.scan_iter(match=pattern, count=500):
            batch.append(name)
            if len(batch) >= 500:
                removed += await self.client.unlink(*batch)
                batch = []
        if batch:
            removed += await self.client.unlink(*batch)
        return removed


class FallbackCacheStore:
    """Redis while it answers, the in-process LRU while it does not (or refuses writes)."""

    def __init__(
        self, link: RedisLink, redis: RedisCacheStore | None, memory: MemoryCacheStore
    ) -> None:
        self.link = link
        self.redis = redis
        self.memory = memory

    async def get(self, key: str) -> CachedResponse | None:
        if self.link.writes_refused is not None:
            # Entries stored while Redis refuses writes are here, and newer than Redis's.
            entry = self.memory.get_now(key)
            if entry is not None:
                return entry
        if self.redis is not None and self.link.up:
            try:
                return await self.redis.get(key)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "cache_get")
        return self.memory.get_now(key)

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None:
        if self.redis is not None and self.link.writable:
            try:
                await self.redis.set(key, entry, ttl)
                return
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "cache_set")
        self.memory.set_now(key, entry, ttl)

    async def delete(self, key: str) -> bool:
        removed = await self.memory.delete(key)
        if self.redis is not None and self.link.up:
            try:
                removed = await self.redis.delete(key) or removed
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "cache_delete")
        return removed

    async def clear(self, operation: str | None = None, provider: str | None = None) -> int:
        removed = await self.memory.clear(operation, provider)
        if self.redis is not None and self.link.up:
            try:
                removed += await self.redis.clear(operation, provider)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "cache_clear")
        return removed
