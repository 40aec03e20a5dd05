"""A caller's limit without a Redis round trip per request: reserved batches, spent locally.

Each process reserves a small batch of a client's capacity in one script call
(`lua/gcra_reserve.lua`, the maths of `core.gcra.gcra_reserve`) and spends it locally, request by
request, for at most `lifetime` seconds; what is left then lapses, unspent.

Why the total stays exact. Let S be the shared tat, H the units held unspent by all processes
together, T the interval, and Q = S - T·H. Spending a held unit raises Q by T, a unit that
lapses raises it too, and time leaves it alone: Q never falls. A reservation at Redis time t
adds a deposit to S so that afterwards Q ≥ t + lifetime; the key also keeps that horizon, so
the next reservation only pays for the time since (the deposit is max(0, lifetime - T -
(horizon - t)), about one lifetime of backlog in all for a steady stream of reservations, not
one per reservation). Every held unit is spent before its reservation's t + lifetime (the
deadline counts from before the script call was sent, on the local monotonic clock), so while
anything is held, Q ≥ now. Then the admissions themselves, at the moments they are spent, are a
sequence GCRA would have admitted (its own tat stays ≤ Q, and S - now ≤ the period): no window
holds more than the rate allows, summed over every process of every replica
(`test_spent_reservations_never_exceed_the_rate` checks it on random schedules). Lapsed units
are not given back: taking them off S later could undo capacity that a full bucket had already
absorbed, which that test found.

The cost is bounded under-admission: while reservations go on, the deposit keeps about
`lifetime x rate` units of the burst out of reach (a `lifetime / period` share of it), and the
units a process holds when its traffic for that client stops lapse: at most one batch per
process (never more than a 64th of the limit), back in the bucket after batch x T seconds.

The batch adapts to demand: it is what this process served of that client in the last
`lifetime` seconds, capped by `max_batch` and a 64th of the limit, and 1 — the plain
per-request script, exact request by request — for any limit under 128 per period and for any
client this process sees rarely. `RateLimit` headers from a local unit report the shared
remainder at the reservation plus the units still held here: at most one lifetime old, blind
to what other processes spent since, and low by at most the deposit.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..core.gcra import EPSILON, Rate, RateDecision, Reservation
from . import keys
from .limiters import FallbackLimiter
from .link import REDIS_ERRORS, AnyRedis, RedisLink
from .scripts import load_script

__all__ = ["RedisReserver", "ReservingLimiter"]

# A reservation never takes more than this share of a limit, so limits under 2 x this stay
# per request and one process cannot hold a visible part of a client's burst.
_SHARE = 64


class RedisReserver:
    """`gcra_reserve` in Redis: one atomic script call, Redis TIME as the shared clock."""

    def __init__(self, client: AnyRedis, prefix: str) -> None:
        self._prefix = prefix
        self._script = client.register_script(load_script("gcra_reserve"))

    async def reserve(
        self, key: str, rate: Rate, want: int, lifetime: float, *, hold_all: bool = False
    ) -> Reservation:
        """Take up to `want` units, to be spent within `lifetime` (see `gcra_reserve`)."""
        args = [rate.period * 1000, rate.limit, want, EPSILON * 1000, lifetime * 1000]
        args.append(1 if hold_all else 0)
        granted, remaining, reset_ms, retry_ms = await self._script(
            keys=[keys.limiter(self._prefix, key)], args=args
        )
        decision = RateDecision(
            int(granted) > 0,
            rate.limit,
            int(remaining),
            float(reset_ms) / 1000,
            float(retry_ms) / 1000,
        )
        return Reservation(int(granted), decision)


@dataclass(slots=True)
class _Held:
    """What one process holds of one client's capacity."""

    rate: Rate
    # Unspent units per reservation, oldest first: [units, deadline on the local clock].
    batches: collections.deque[list[float]] = field(default_factory=collections.deque)
    tokens: int = 0  # all of them together
    low: int = 0  # at or below this many, the next batch is fetched ahead of need
    # The shared bucket as the last reservation saw it, and when (local monotonic clock).
    remaining: int = 0
    reset_after: float = 0.0
    at: float = 0.0
    # Denied until then (local clock), after Redis said so.
    denied_until: float = 0.0
    retry_after: float = 0.0
    # Demand: requests seen since `since`.
    seen: int = 0
    since: float = 0.0
    demand: float = 0.0
    waiting: int = 0
    pending: asyncio.Future[None] | None = None


class ReservingLimiter:
    """A client's GCRA: local units when this process holds some, else one script call.

    Falls back to `fallback` (Redis-or-memory, per request) while Redis is down or when there is
    no Redis; `lifetime` ≤ 0 turns reservations off (every request is one script call). When a
    busy client's units run low (a quarter of the last batch), the next batch is reserved in
    the background (`hold_all`: no unit spent at once), so its requests rarely wait on Redis.
    """

    def __init__(
        self,
        link: RedisLink,
        reserver: RedisReserver | None,
        fallback: FallbackLimiter,
        *,
        lifetime: float,
        max_batch: int = 1024,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        self.link = link
        self.reserver = reserver
        self.fallback = fallback
        self.lifetime = lifetime
        self.max_batch = max_batch
        self.clock = clock
        self.max_keys = max_keys
        self.script_calls = 0  # reservations sent to Redis (tests and the bench read it)
        self.lapsed = 0  # reserved units that reached their deadline unspent
        self._held: dict[str, _Held] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def batches(self, rate: Rate) -> bool:
        """Whether a client with this rate is ever served from reservations."""
        return (
            self.reserver is not None
            and self.lifetime > 0
            and min(self.max_batch, rate.limit // _SHARE) >= 2
        )

    def spend(self, key: str, rate: Rate) -> tuple[int, float] | None:
        """Spend a held unit, without any I/O: (remaining, reset_after) for the `RateLimit`
        header, or None when this process holds none (then `hit` decides)."""
        held = self._held.get(key)
        if held is None or held.tokens <= 0 or held.rate != rate:
            return None
        now = self.clock()
        batches = held.batches
        while batches:
            first = batches[0]
            if now < first[1]:
                first[0] -= 1
                if first[0] <= 0:
                    batches.popleft()
                held.tokens -= 1
                held.seen += 1
                if held.tokens <= held.low and held.pending is None:
                    self._fetch_ahead(key, held, rate)
                reset = held.reset_after - (now - held.at)
                return min(rate.limit, held.remaining + held.tokens), reset if reset > 0 else 0.0
            # Past its deadline: these units lapse, never spent.
            lapsed = int(first[0])
            self.lapsed += lapsed
            held.tokens -= lapsed
            batches.popleft()
        return None

    def take_local(self, key: str, rate: Rate) -> RateDecision | None:
        """A decision from what this process holds, without any I/O; None when it must ask."""
        spent = self.spend(key, rate)
        if spent is not None:
            return RateDecision(True, rate.limit, spent[0], spent[1], 0.0)
        held = self._held.get(key)
        if held is None or held.rate != rate:
            return None
        held.seen += 1
        now = self.clock()
        if now < held.denied_until:
            waited = now - held.at
            return RateDecision(
                False,
                rate.limit,
                0,
                max(0.0, held.reset_after - waited),
                max(0.0, held.retry_after - waited),
            )
        return None

    async def hit(self, key: str, rate: Rate) -> RateDecision:
        """Spend one unit of `key`'s capacity, locally if this process holds one."""
        decision = self.take_local(key, rate)
        if decision is not None:
            return decision
        if not self.batches(rate) or not self.fallback.on_redis:
            return await self.fallback.hit(key, rate)
        held = self._held.get(key)
        if held is None or held.rate != rate:
            if len(self._held) >= self.max_keys:
                self._prune()
            held = self._held[key] = _Held(rate, since=self.clock(), seen=1)
        while held.pending is not None:
            # A batch is on its way for this client: share it rather than ask again.
            held.waiting += 1
            try:
                await asyncio.shield(held.pending)
            finally:
                held.waiting -= 1
            held.seen -= 1  # take_local counts the request again
            decision = self.take_local(key, rate)
            if decision is not None:
                return decision
        return await self._reserve(key, held, rate)

    def _want(self, held: _Held, rate: Rate, now: float) -> int:
        # Demand: this window's requests per second, or the last window's if that was more;
        # a window closes after one lifetime, so the batch follows a change within two.
        elapsed = now - held.since
        demand = held.seen / max(elapsed, 0.001)
        if elapsed >= self.lifetime:
            held.demand, held.seen, held.since = demand, 0, now
        demand = max(demand, held.demand)
        cap = min(self.max_batch, rate.limit // _SHARE)
        # Enough for the requests waiting on this reservation, too.
        return max(1, min(cap, max(math.ceil(demand * self.lifetime), held.waiting + 1)))

    def _keep(self, held: _Held, reservation: Reservation, now: float, units: int) -> None:
        """Hold `units` of a reservation sent at `now` until its deadline."""
        decision = reservation.decision
        held.remaining, held.reset_after, held.at = decision.remaining, decision.reset_after, now
        if units > 0:
            held.batches.append([units, now + self.lifetime])
            held.tokens += units
            held.low = units // 4
        if not decision.allowed and math.isfinite(decision.retry_after):
            # No one is admitted before then (others only push it later), so ask again only then.
            held.denied_until, held.retry_after = now + decision.retry_after, decision.retry_after

    async def _reserve(self, key: str, held: _Held, rate: Rate) -> RateDecision:
        assert self.reserver is not None
        now = self.clock()
        want = self._want(held, rate, now)
        future: asyncio.Future[None] | None = None
        if want > 1:  # others wait for a batch; single units go out side by side
            future = held.pending = asyncio.get_running_loop().create_future()
        self.script_calls += 1
        try:
            reservation = await self.reserver.reserve(key, rate, want, self.lifetime)
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "ratelimit")
            return await self.fallback.hit(key, rate)
        finally:
            if future is not None:
                held.pending = None
                future.set_result(None)
        self._keep(held, reservation, now, reservation.granted - 1)
        return reservation.decision

    def _fetch_ahead(self, key: str, held: _Held, rate: Rate) -> None:
        """Reserve the next batch in the background while units are still held."""
        if self.reserver is None or not self.fallback.on_redis:
            return
        held.pending = asyncio.get_running_loop().create_future()
        task = asyncio.ensure_future(self._fill(key, held, rate, held.pending))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fill(self, key: str, held: _Held, rate: Rate, future: asyncio.Future[None]) -> None:
        assert self.reserver is not None
        now = self.clock()
        want = max(2, self._want(held, rate, now))
        self.script_calls += 1
        try:
            reservation = await self.reserver.reserve(key, rate, want, self.lifetime, hold_all=True)
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "ratelimit")
            return
        finally:
            held.pending = None
            future.set_result(None)
        self._keep(held, reservation, now, reservation.granted)
        if reservation.granted == 0:
            held.low = -1  # no batch fits: ask again only when a request needs a unit

    async def close(self) -> None:
        """Wait for batches being fetched ahead (they hold a Redis connection), briefly."""
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=1)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def _prune(self) -> None:
        """Forget clients holding nothing, then (if still full) everything."""
        now = self.clock()
        idle = [
            k
            for k, h in self._held.items()
            if h.pending is None and all(deadline <= now for _, deadline in h.batches)
        ]
        for k in idle:
            del self._held[k]
        if len(self._held) >= self.max_keys:
            self._held = {k: h for k, h in self._held.items() if h.pending is not None}
