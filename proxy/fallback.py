"""While Redis is away: the cache and the limiters carry on in this process (fail-open)."""

from __future__ import annotations

from collections.abc import Callable

from .cache import CachedResponse, MemoryCacheStore, RedisCacheStore
from .ratelimit import Limiter, MemoryLimiter, Rate, RateDecision, RedisLimiter
from .redisconn import REDIS_ERRORS, RedisLink

__all__ = ["FallbackCacheStore", "FallbackLimiter"]


class FallbackCacheStore:
    """Redis while it answers, the in-process LRU while it does not."""

    def __init__(
        self, link: RedisLink, redis: RedisCacheStore | None, memory: MemoryCacheStore
    ) -> None:
        self.link = link
        self.redis = redis
        self.memory = memory

    async def get(self, key: str) -> CachedResponse | None:
        if self.redis is not None and self.link.up:
            try:
                return await self.redis.get(key)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "cache_get")
        return self.memory.get_now(key)

    async def set(self, key: str, entry: CachedResponse, ttl: float) -> None:
        if self.redis is not None and self.link.up:
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

    async def clear(self) -> int:
        removed = await self.memory.clear()
        if self.redis is not None and self.link.up:
            try:
                removed += await self.redis.clear()
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "cache_clear")
        return removed


class FallbackLimiter:
    """The shared GCRA in Redis, or the same maths per process while Redis is down.

    `share` divides a rate while falling back: the global upstream budget split by the assumed
    replica count, so an outage cannot multiply what the company sends to TeamUp.
    """

    def __init__(
        self,
        link: RedisLink,
        redis: RedisLimiter | None,
        memory: MemoryLimiter,
        share: Callable[[Rate], Rate] = lambda rate: rate,
    ) -> None:
        self.link = link
        self.redis: Limiter | None = redis
        self.memory = memory
        self.share = share

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        if self.redis is not None and self.link.up:
            try:
                return await self.redis.hit(key, rate, cost)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "ratelimit")
        return await self.memory.hit(key, self.share(rate), cost)
