"""Rates and the GCRA limiter (pure maths, Lua for Redis, the same maths in memory)."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster

__all__ = [
    "GCRA_LUA",
    "Limiter",
    "MemoryLimiter",
    "Rate",
    "RateDecision",
    "RedisLimiter",
    "gcra",
    "parse_rate",
]

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour)\s*$", re.IGNORECASE)
# Slack in seconds so that N/period with an inexact interval (1/3 s) still admits exactly N.
_EPSILON = 1e-6
# Cap for the never-admissible case (cost > limit), whose retry_after is infinite.
_MAX_RETRY_AFTER = 86_400.0


@dataclass(frozen=True, slots=True)
class Rate:
    """`limit` requests per `period` seconds: a burst of `limit`, then an even refill."""

    limit: int
    period: float

    @property
    def interval(self) -> float:
        """Seconds between two admissions at the steady rate (GCRA's emission interval)."""
        return self.period / self.limit

    def with_burst(self, burst: int) -> Rate:
        """The same steady rate with a burst of at most `burst` (GCRA's tolerance, in requests).

        A rate of N per period admits at most burst + N in any one period: with N as the burst
        that is almost 2N, which a hard upstream limit cannot take.
        """
        burst = max(1, min(burst, self.limit))
        return Rate(burst, self.interval * burst)

    def __str__(self) -> str:
        for name, seconds in _PERIODS.items():
            if seconds == self.period:
                return f"{self.limit}/{name}"
        return f"{self.limit}/{self.period:g}s"


def parse_rate(text: str) -> Rate:
    """Parse `N/second`, `N/minute` or `N/hour` (N ≥ 1)."""
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f"rate must look like '120/minute' (N/second|minute|hour), got {text!r}")
    limit = int(match.group(1))
    if limit < 1:
        raise ValueError("a rate needs at least 1 request per period")
    return Rate(limit, _PERIODS[match.group(2).lower()])


@dataclass(frozen=True, slots=True)
class RateDecision:
    """The outcome of one GCRA check, with what the rate-limit headers need."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float

    @property
    def retry_after_header(self) -> str:
        """`Retry-After` in whole seconds, rounded up; at least 1 when denied."""
        if self.allowed:
            return "0"
        return str(max(1, math.ceil(min(self.retry_after, _MAX_RETRY_AFTER))))


def gcra(
    tat: float | None, now: float, rate: Rate, cost: int = 1
) -> tuple[float | None, RateDecision]:
    """Apply GCRA to a stored theoretical arrival time: (tat to store or None, decision)."""
    if cost < 0:
        raise ValueError(f"cost must be ≥ 0, got {cost}")
    interval, period = rate.interval, rate.period
    # Work with the backlog `tat - now` rather than absolute times: the same shape as the Lua,
    # and small numbers keep the float error far below _EPSILON.
    level = 0.0 if tat is None else max(tat - now, 0.0)
    wanted = level + cost * interval
    allowed = cost <= rate.limit and wanted <= period + _EPSILON
    if allowed:
        level = wanted
    remaining = max(0, math.floor((period - level + _EPSILON) / interval))
    if allowed:
        retry_after = 0.0
    elif cost > rate.limit:
        retry_after = math.inf
    else:
        retry_after = wanted - period
    decision = RateDecision(allowed, rate.limit, remaining, level, retry_after)
    return (now + level if allowed and cost > 0 else None), decision


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

    def _prune(self, now: float) -> None:
        """Forget full buckets (no loss), then the least recently spent ones."""
        for key in [key for key, tat in self._tats.items() if tat <= now]:
            del self._tats[key]
        while len(self._tats) > self._max_keys:
            del self._tats[next(iter(self._tats))]


# Times in ms; the same maths as gcra(). Returns {allowed, remaining, reset_ms, retry_ms}
# with the floats as strings, since Redis truncates Lua numbers to integers.
GCRA_LUA = """
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local eps = tonumber(ARGV[4])
local interval = period / limit
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + tonumber(time[2]) / 1000
local tat = tonumber(redis.call('GET', KEYS[1]))
local level = 0
if tat and tat > now then
  level = tat - now
end
local wanted = level + cost * interval
local allowed = cost <= limit and wanted <= period + eps
local retry = 0
if allowed then
  level = wanted
  if cost > 0 then
    local ttl = math.max(1, math.ceil(level - eps))
    redis.call('SET', KEYS[1], string.format('%.17g', now + level), 'PX', ttl)
  end
else
  retry = wanted - period
end
local remaining = math.max(0, math.floor((period - level + eps) / interval))
return {allowed and 1 or 0, remaining, string.format('%.17g', level),
        string.format('%.17g', retry)}
"""


class RedisLimiter:
    """GCRA in Redis: one atomic Lua script per check, Redis TIME as the shared clock."""

    def __init__(self, client: Redis | RedisCluster, prefix: str) -> None:
        self._prefix = prefix
        self._script = client.register_script(GCRA_LUA)

    async def hit(self, key: str, rate: Rate, cost: int = 1) -> RateDecision:
        """Spend `cost` from `key`'s bucket if it has room."""
        if cost < 0:
            raise ValueError(f"cost must be ≥ 0, got {cost}")
        args = [rate.period * 1000, rate.limit, cost, _EPSILON * 1000]
        allowed, remaining, reset_ms, retry_ms = await self._script(
            keys=[f"{self._prefix}{key}"], args=args
        )
        retry_after = math.inf if cost > rate.limit else float(retry_ms) / 1000
        return RateDecision(
            bool(allowed), rate.limit, int(remaining), float(reset_ms) / 1000, retry_after
        )

    async def peek(self, key: str, rate: Rate) -> RateDecision:
        """The bucket's state now, changing nothing."""
        return await self.hit(key, rate, 0)
