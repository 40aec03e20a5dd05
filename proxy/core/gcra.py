"""Rates and GCRA (generic cell rate algorithm): pure maths, mirrored by `backends/lua/gcra.lua`."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

__all__ = ["EPSILON", "Rate", "RateDecision", "Reservation", "gcra", "gcra_reserve", "parse_rate"]

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour)\s*$", re.IGNORECASE)
# Slack in seconds so that N/period with an inexact interval (1/3 s) still admits exactly N.
EPSILON = 1e-6
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
    # and small numbers keep the float error far below EPSILON.
    level = 0.0 if tat is None else max(tat - now, 0.0)
    wanted = level + cost * interval
    allowed = cost <= rate.limit and wanted <= period + EPSILON
    if allowed:
        level = wanted
    remaining = max(0, math.floor((period - level + EPSILON) / interval))
    if allowed:
        retry_after = 0.0
    elif cost > rate.limit:
        retry_after = math.inf
    else:
        retry_after = wanted - period
    decision = RateDecision(allowed, rate.limit, remaining, level, retry_after)
    return (now + level if allowed and cost > 0 else None), decision


@dataclass(frozen=True, slots=True)
class Reservation:
    """The outcome of one `gcra_reserve`: how many units were granted, and the decision."""

    granted: int
    decision: RateDecision


def gcra_reserve(
    state: tuple[float, float] | None,
    now: float,
    rate: Rate,
    want: int,
    lifetime: float,
    *,
    hold_all: bool = False,
) -> tuple[tuple[float, float] | None, Reservation]:
    """Reserve up to `want` units at once: one for the request now, the rest to be spent within
    `lifetime` seconds. Mirrored by `backends/lua/gcra_reserve.lua`.

    `state` is (tat, horizon): GCRA's theoretical arrival time, and the latest moment until
    which units reserved so far may be spent. When `want` ≥ 2, as many units as fit (at most
    `want`, at least 2) are taken, plus a deposit: enough extra backlog that the tat, minus
    every unit still held anywhere, stays ahead of the new horizon `now + lifetime`
    (`backends/reservations.py` says why that keeps every late admission one GCRA itself would
    have made). The horizon of earlier reservations already
    covers part of that, so a steady stream of reservations pays about one lifetime in all, not
    one per reservation. When fewer than 2 fit, or `want` is 1, this is `gcra(tat, now, rate,
    1)`. With `hold_all` no unit is spent now (a batch fetched ahead of need): the deposit
    covers the one unit more that is held, and a single unit is never granted. Returns (the
    state to store, or None when nothing changed; the reservation).
    """
    if want < 1 or lifetime < 0:
        raise ValueError("want must be ≥ 1 and lifetime ≥ 0")
    interval, period = rate.interval, rate.period
    tat, horizon = state if state is not None else (now, now)
    level = max(tat - now, 0.0)
    covered = max(horizon - now, 0.0)
    granted = 0
    if want >= 2:
        deposit = max(0.0, lifetime - (0.0 if hold_all else interval) - covered)
        fits = math.floor((period + EPSILON - level - deposit) / interval)
        if fits >= 2:
            granted = min(want, fits)
            level += granted * interval + deposit
            covered = max(covered, lifetime)
    if granted == 0 and not hold_all and level + interval <= period + EPSILON:
        granted = 1
        level += interval
    retry_after = 0.0 if granted else level + interval - period
    remaining = max(0, math.floor((period - level + EPSILON) / interval))
    decision = RateDecision(granted > 0, rate.limit, remaining, level, retry_after)
    stored = (now + level, now + min(covered, level)) if granted else None
    return stored, Reservation(granted, decision)
