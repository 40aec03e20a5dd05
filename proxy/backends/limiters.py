"""Keyed GCRA limiters: in memory, in Redis (one Lua script), and Redis-or-memory (fallback)."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Protocol

from ..core.gcra import EPSILON, Rate, RateDecision, gcra
from . import keys
from .link import REDIS_ERRORS, AnyRedis, RedisLink
from .scripts import load_script

__all__ = ["FallbackLimiter", "Limiter", "MemoryLimiter", "RedisLimiter"]


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

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """Spend `cost` from `key`'s bucket if it has room."""
        now = self._clock()
        tat, decision = gcra(self._tats.get(key), now, rate, cost)
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

    def charge(self, key: str, rate: Rate, cost: int) -> None:
        """Spend `cost` whether or not it fits (what was admitted elsewhere, counted here)."""
        now = self._clock()
        tat = self._tats.pop(key, now)
        self._tats[key] = max(tat, now) + cost * rate.interval
        if len(self._tats) > self._max_keys:
            self._prune(now)

    def backlog(self) -> list[tuple[str, float]]:
        """Every bucket with a backlog: (key, seconds)."""
        now = self._clock()
        return [(key, tat - now) for key, tat in self._tats.items() if tat > now]

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
        self._deposit = client.register_script(load_script("gcra_deposit"))

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """Spend `cost` from `key`'s bucket if it has room."""
        if cost < 0:
            raise ValueError(f"cost must be ≥ 0, got {cost}")
        args = [rate.period * 1000, rate.limit, cost, EPSILON * 1000]
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

    async def deposit(self, items: list[tuple[str, float]]) -> None:
        """Add `seconds` of backlog to each key's bucket."""
        await asyncio.gather(
            *(
                self._deposit(keys=[keys.limiter(self._prefix, key)], args=[seconds * 1000])
                for key, seconds in items
            )
        )


class FallbackLimiter:
    """The shared GCRA in Redis, or the same maths per process while Redis is down or refuses
    writes (the script's OOM/READONLY error is never taken for an allowed hit).

    Exact across the switch, summed over every process (the argument is in README, "Limits"):
    - off Redis each process runs `share(rate)`: the rate *and* the burst divided by the
      processes it assumes (`PROXY_REPLICAS_HINT` x workers);
    - on Redis each process also counts what Redis admitted for it in its own share bucket, so
      the sum of the share buckets is never below the shared one: leaving Redis, each process
      goes on from its own part instead of a fresh burst;
    - back on Redis, every process keeps limiting locally until one common moment (a Redis key
      set by the first process back: `settle` seconds later, enough for all to notice), then
      adds its share buckets' backlog to the shared ones and only then uses them: no Redis
      admission overlaps a local one, and none forgets one.
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
        self._local_until = 0.0  # back on Redis, limits stay local until then (monotonic)
        self._switch: asyncio.Task[None] | None = None
        self._ratio: dict[str, float] = {}  # key -> shared interval / share interval

    @property
    def on_redis(self) -> bool:
        """Whether hits go to Redis now."""
        return (
            self.redis is not None
            and self.link.writable
            and self._switch is None
            and self._clock() >= self._local_until
        )

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        # While Redis refuses writes the script cannot record a hit: count here, with the share.
        local = self.share(rate)
        if self.redis is not None and self.on_redis:
            try:
                decision = await self.redis.hit(key, rate, cost)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "ratelimit")
            else:
                if decision.allowed and cost > 0:
                    self.mirror(key, rate, cost)
                return decision
        self._ratio[key] = rate.interval / local.interval
        return await self.memory.hit(key, local, cost)

    def mirror(self, key: str, rate: Rate, cost: int) -> None:
        """Count `cost` units Redis admitted for this process in its share bucket."""
        local = self.share(rate)
        self._ratio[key] = rate.interval / local.interval
        self.memory.charge(key, local, cost)

    async def plan_return(self) -> None:
        """Back on Redis: limit locally until the common switch moment, then hand over."""
        if self.redis is None or (self._ratio == {} and not self.memory.backlog()):
            return
        client = self.link.client
        assert client is not None
        ms = max(1, int(self.settle * 1000))
        await client.set(self.switch_key, b"1", px=ms, nx=True)
        left = await client.pttl(self.switch_key)
        wait = max(0.0, left / 1000) if isinstance(left, int) and left > 0 else 0.0
        self._local_until = self._clock() + wait
        if self._switch is None:
            self._switch = asyncio.ensure_future(self._hand_over(wait))

    async def _hand_over(self, wait: float) -> None:
        try:
            await asyncio.sleep(wait)
            while self.redis is not None:
                items = [
                    (key, seconds * self._ratio.get(key, 1.0))
                    for key, seconds in self.memory.backlog()
                ]
                try:
                    await self.redis.deposit(items)
                    return
                except REDIS_ERRORS as exc:
                    self.link.failed(exc, "ratelimit")
                    await asyncio.sleep(self.link.retry_interval)
        finally:
            self._switch = None

    async def close(self) -> None:
        """Stop a hand-over in progress."""
        if self._switch is not None:
            self._switch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._switch
