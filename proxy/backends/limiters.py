"""Keyed GCRA limiters: in memory, in Redis (one Lua script), and Redis-or-memory (fallback)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Protocol

from ..core.gcra import EPSILON, Rate, RateDecision, gcra
from . import keys
from .link import REDIS_ERRORS, AnyRedis, RedisLink
from .scripts import load_script

__all__ = ["FallbackLimiter", "Limiter", "MemoryLimiter", "RedisLimiter", "split"]


def split(rate: Rate, processes: int) -> Rate:
    """One process's share of `rate` among `processes` counting on their own: the rate and the
    burst divided. With more processes than the burst, one each at processes² / limit times
    the interval: the sum stays within the rate over any window of `processes` intervals."""
    if processes <= 1:
        return rate
    if rate.limit >= processes:
        limit = rate.limit // processes
        return Rate(limit, rate.interval * processes * limit)
    return Rate(1, rate.interval * processes * processes / rate.limit)


class Limiter(Protocol):
    """A keyed GCRA limiter."""

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """Spend `cost` from `key`'s bucket if it has room."""
        ...

    async def peek(self, key: str, rate: Rate) -> RateDecision:
        """The bucket's state now, changing nothing."""
        ...


class MemoryLimiter:
    """GCRA in process memory: the embedded store and the fallback while Redis is down."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, max_keys: int = 100_000
    ) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be ≥ 1")
        self._clock = clock
        self._max_keys = max_keys
        self._tats: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._tats)

    async def hit(
        self, key: str, rate: Rate, cost: int = 1, *, floor: float | None = None
    ) -> RateDecision:
        """Spend `cost` from `key`'s bucket if it has room (`floor`: its tat is at least that,
        on this limiter's clock)."""
        now = self._clock()
        tat = self._tats.get(key)
        if floor is not None and floor > now and (tat is None or tat < floor):
            tat = floor
        tat, decision = gcra(tat, now, rate, cost)
        if tat is not None:
            # Re-insert so the dict's order is least recently spent first.
            self._tats.pop(key, None)
            self._tats[key] = tat
            if len(self._tats) > self._max_keys:
                self._prune(now)
        return decision

    async def peek(self, key: str, rate: Rate) -> RateDecision:
        """The bucket's state now, changing nothing."""
        return gcra(self._tats.get(key), self._clock(), rate, 0)[1]

    def _prune(self, now: float) -> None:
        """Forget full buckets (no loss), then the least recently spent ones."""
        for key in [key for key, tat in self._tats.items() if tat <= now]:
            del self._tats[key]
        while len(self._tats) > self._max_keys:
            del self._tats[next(iter(self._tats))]


class RedisLimiter:
    """GCRA in Redis: one atomic Lua script per check, Redis TIME as the shared clock."""

    def __init__(self, client: AnyRedis, prefix: str) -> None:
        self._prefix = prefix
        self._script = client.register_script(load_script("gcra"))

    async def hit(self, key: str, rate: Rate, cost: int = 1, *, floor: float = 0.0) -> RateDecision:
        """Spend `cost` from `key`'s bucket if it has room (`floor`: seconds of backlog the
        bucket holds at least from now, kept in Redis)."""
        if cost < 0:
            raise ValueError(f"cost must be ≥ 0, got {cost}")
        args = [rate.period * 1000, rate.limit, cost, EPSILON * 1000]
        if floor > 0:
            args.append(floor * 1000)
        allowed, remaining, reset_ms, retry_ms = await self._script(
            keys=[keys.limiter(self._prefix, key)], args=args
        )
        retry_after = math.inf if cost > rate.limit else float(retry_ms) / 1000
        return RateDecision(
            bool(allowed), rate.limit, int(remaining), float(reset_ms) / 1000, retry_after
        )

    async def peek(self, key: str, rate: Rate) -> RateDecision:
        """The bucket's state now, changing nothing."""
        return await self.hit(key, rate, 0)


class FallbackLimiter:
    """The shared GCRA in Redis, or the same maths per process while Redis is down or refuses
    writes (the script's OOM/READONLY error is never taken for an allowed hit).

    Exact across both switches, summed over every process (the argument is in README,
    "Limits"):
    - off Redis each process runs `share(rate)`: the rate *and* the burst divided by the
      processes it assumes (`PROXY_REPLICAS_HINT` x workers), from a bucket that starts full
      when it leaves Redis (what Redis admitted just before is unknown: taken as the burst);
    - back on Redis, every process keeps limiting locally until one common moment (a Redis key
      set by the first process back, `settle` seconds later: enough for all to notice, and
      told to all over the events channel); from then on each Redis bucket starts full at that
      moment. No Redis admission overlaps a local one, none starts from a fresh burst.
    The steady rate goes on throughout; only the burst is withheld, for one period after each
    switch.
    """

    def __init__(
        self,
        link: RedisLink,
        redis: RedisLimiter | None,
        memory: MemoryLimiter,
        share: Callable[[Rate], Rate] = lambda rate: rate,
        *,
        settle: float = 0.0,
        switch_key: str = keys.limiter(keys.LIMITER_PREFIX, "switch"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.redis = redis
        self.memory = memory
        self.share = share
        self.settle = settle
        self.switch_key = switch_key
        self._clock = clock
        self.switch_at = -math.inf  # the common moment back on Redis (monotonic)

    @property
    def on_redis(self) -> bool:
        """Whether hits go to Redis now."""
        return self.redis is not None and self.link.writable and self._clock() >= self.switch_at

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        # While Redis refuses writes the script cannot record a hit: count here, with the share.
        if self.redis is not None and self.on_redis:
            floor = self.switch_at + rate.period - self._clock()
            try:
                return await self.redis.hit(key, rate, cost, floor=max(0.0, floor))
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "ratelimit")
        local = self.share(rate)
        since = self.link.down_since
        floor_at = since + local.period if math.isfinite(since) else None
        return await self.memory.hit(key, local, cost, floor=floor_at)

    async def plan_return(self) -> float:
        """Back on Redis: when (seconds from now) every process switches; limits stay local
        until then (raises a Redis error when Redis cannot say)."""
        if self.redis is None:
            return 0.0
        client = self.link.client
        assert client is not None
        ms = max(1, int(self.settle * 1000))
        await client.set(self.switch_key, b"1", px=ms, nx=True)
        left = await client.pttl(self.switch_key)
        wait = max(0.0, left / 1000) if isinstance(left, int) and left > 0 else 0.0
        self.switch_in(wait)
        return wait

    def switch_in(self, wait: float) -> None:
        """Limit locally for `wait` seconds more, then use Redis from full buckets."""
        now = self._clock()
        if self.on_redis:
            # On Redis still (told by another process): local from now, from full buckets.
            self.link.down_since = now
        self.switch_at = max(self.switch_at, now + wait)
