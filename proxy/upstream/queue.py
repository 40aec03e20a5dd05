"""The fair queue in front of the shared budget: a miss that finds no unit waits for one.

Per process. While nobody waits, a miss tries the budget itself (one round trip, as before).
Once someone waits, every new miss queues behind its own client and one dispatcher task hands
out units: it sleeps until the budget's GCRA says the next unit frees up, takes it (the shared
Redis budget stays the one truth, so replicas and workers never exceed it together) and gives
it to the next client in weighted round robin (`core.fairness`). Across processes the budget
goes to whichever dispatcher asks first once a unit frees up: roughly evenly between the
processes that have waiters, and fairly between clients inside each (README, "Fair queue").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ..core.failures import FailureKind, UpstreamFailure
from ..core.fairness import FairScheduler
from ..core.gcra import RateDecision
from ..metrics import Metrics

__all__ = ["Abandoned", "BudgetQueue", "Slot", "Turn"]

log = logging.getLogger("teamup_proxy")
# The circuit's wait, and a unit of the budget when the circuit is closed (None while open).
Attempt = Callable[[], Awaitable[tuple[float, RateDecision | None]]]
# Sleep a little past the moment the GCRA names, so the retry is not a hair too early.
_MARGIN = 0.002


@dataclass(frozen=True, slots=True)
class Turn:
    """Whose budget unit a fetch waits for."""

    client: str
    weight: int = 1
    # False: fail at once when no unit is free (the caller has a stale copy to answer with).
    wait: bool = True
    # Set for a foreground fetch: `abandon(key)` takes it out of the queue once every caller
    # waiting on it has gone (a background refresh has no caller and keeps its place).
    key: str | None = None


@dataclass(frozen=True, slots=True)
class Slot:
    """A unit of the budget, and how long the fetch waited in the queue for it."""

    decision: RateDecision
    queued: float = 0.0

    @property
    def queued_ms(self) -> float | None:
        """Milliseconds queued, None when a unit was free at once."""
        return None if self.queued <= 0 else round(self.queued * 1000, 2)


class Abandoned(Exception):
    """Every caller of a queued fetch went away before its turn: no unit was spent."""


class _Waiter:
    __slots__ = ("client", "deadline", "future", "key", "since")

    def __init__(self, turn: Turn, since: float, deadline: float) -> None:
        self.client = turn.client
        self.key = turn.key
        self.since = since
        self.deadline = deadline
        self.future: asyncio.Future[RateDecision] = asyncio.get_running_loop().create_future()


def budget_spent(retry_after: float) -> UpstreamFailure:
    """The answer when no unit can be had in time."""
    return UpstreamFailure(
        FailureKind.BUDGET,
        503,
        "The shared TeamUp budget is spent for now; retry later",
        retry_after=retry_after,
    )


def circuit_open(wait: float) -> UpstreamFailure:
    """The answer while TeamUp's 429 keeps the circuit open."""
    return UpstreamFailure(
        FailureKind.CIRCUIT,
        503,
        "TeamUp asked the proxy to slow down; no calls until it allows them again",
        retry_after=wait,
    )


class BudgetQueue:
    """Misses wait here, up to `timeout` seconds, for a unit of the budget; fair between clients."""

    def __init__(
        self,
        attempt: Attempt,
        interval: float,
        timeout: float,
        *,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        upstream: str = "default",
    ) -> None:
        self._attempt = attempt
        self.upstream = upstream  # the credential whose budget this queue hands out
        self.interval = interval
        self.timeout = timeout
        self._metrics = metrics
        self._clock = clock
        self._waiting: FairScheduler[_Waiter] = FairScheduler()
        self._by_key: dict[str, _Waiter] = {}
        self._dispatcher: asyncio.Task[None] | None = None
        # When the budget frees its next unit, as the last refusal said (this clock).
        self._next_free = 0.0
        # Until when the circuit is open, as the dispatcher last saw it (0: closed).
        self._circuit_until = 0.0
        self.wasted = 0  # units taken for a waiter that left meanwhile (nobody else waiting)

    def __len__(self) -> int:
        return len(self._waiting)

    def expected_wait(self, client: str, weight: int = 1) -> float:
        """The least a miss of `client` queued now would wait: until the next unit frees up,
        then one interval per unit handed out before its turn."""
        ahead = self._waiting.ahead(client, weight)
        return max(0.0, self._next_free - self._clock()) + ahead * self.interval

    async def acquire(self, turn: Turn) -> Slot:
        """A unit of the budget for `turn`, at once or after waiting its turn.

        Raises UpstreamFailure (budget, circuit, queue timeout) instead of waiting when the wait
        the budget already implies is longer than the timeout; `Abandoned` when `abandon`
        took the turn's key out of the queue.
        """
        if not self._waiting:
            wait, decision = await self._attempt()
            if wait > 0 or decision is None:
                raise circuit_open(wait)
            if decision.allowed:
                return Slot(decision)
            self._next_free = self._clock() + decision.retry_after
        elif self._circuit_until > self._clock():
            raise circuit_open(self._circuit_until - self._clock())
        if not turn.wait or self.timeout <= 0:
            raise budget_spent(self.expected_wait(turn.client, turn.weight))
        expected = self.expected_wait(turn.client, turn.weight)
        if expected > self.timeout:
            self._count_timeout(turn.client, "upfront")
            raise budget_spent(expected)
        now = self._clock()
        waiter = _Waiter(turn, now, now + self.timeout)
        self._waiting.push(turn.client, waiter, turn.weight)
        if turn.key is not None:
            self._by_key[turn.key] = waiter
        self._gauge(turn.client)
        if self._dispatcher is None:
            self._dispatcher = asyncio.ensure_future(self._dispatch())
        try:
            await asyncio.wait((waiter.future,), timeout=waiter.deadline - self._clock())
        except asyncio.CancelledError:
            self._leave(waiter)
            raise
        if not waiter.future.done():
            self._leave(waiter)
            self._count_timeout(turn.client, "waited")
            raise budget_spent(self.expected_wait(turn.client, turn.weight))
        if waiter.future.cancelled():
            raise Abandoned(turn.key)
        decision = waiter.future.result()  # a failure set by the dispatcher raises here
        queued = self._clock() - waiter.since
        if self._metrics is not None:
            self._metrics.queue_wait.labels(turn.client, self.upstream).observe(queued)
        return Slot(decision, queued)

    def abandon(self, key: str) -> bool:
        """Take the queued fetch of `key` out of the queue (every caller waiting on it left)."""
        waiter = self._by_key.get(key)
        if waiter is None or waiter.future.done():
            return False
        self._leave(waiter)
        waiter.future.cancel()
        if self._metrics is not None:
            self._metrics.queue_abandoned.labels(waiter.client, self.upstream).inc()
        return True

    async def close(self) -> None:
        """Stop the dispatcher; whoever still waits is told the budget is spent."""
        self._fail_waiting(lambda _w: True, budget_spent(self.interval))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)

    def _leave(self, waiter: _Waiter) -> None:
        """A waiter gives up its place; a unit it was handed a moment ago goes to the next."""
        if self._by_key.get(waiter.key or "") is waiter:
            del self._by_key[waiter.key or ""]
        if self._waiting.remove(waiter.client, waiter):
            self._gauge(waiter.client)
        elif waiter.future.done() and not waiter.future.cancelled():
            if waiter.future.exception() is None:
                self._grant(waiter.future.result())

    def _grant(self, decision: RateDecision) -> None:
        """Hand a unit to the next live waiter in fair order."""
        while (popped := self._waiting.pop()) is not None:
            client, waiter = popped
            self._gauge(client)
            if not waiter.future.done():
                waiter.future.set_result(decision)
                return
        self.wasted += 1

    def _fail_waiting(self, which: Callable[..., bool], failure: UpstreamFailure) -> None:
        for client, waiter in list(self._waiting.items()):
            if which(waiter) and self._waiting.remove(client, waiter):
                self._gauge(client)
                if not waiter.future.done():
                    waiter.future.set_exception(failure)

    async def _dispatch(self) -> None:
        try:
            while self._waiting:
                delay = self._next_free - self._clock()
                if delay > 0:
                    await asyncio.sleep(delay + _MARGIN)
                    continue
                wait, decision = await self._attempt()
                now = self._clock()
                if wait > 0 or decision is None:
                    # Nobody whose timeout ends before the circuit closes can be served. Look
                    # again within a second: an operator may close it sooner.
                    closes = self._circuit_until = now + wait
                    self._next_free = now + min(wait, 1.0)
                    self._fail_waiting(lambda w, t=closes: w.deadline < t, circuit_open(wait))
                    continue
                self._circuit_until = 0.0
                if decision.allowed:
                    self._grant(decision)
                else:
                    self._next_free = now + decision.retry_after
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("budget queue failed", extra={"event": "queue_failed"})
            self._fail_waiting(lambda _w: True, budget_spent(self.interval))
        finally:
            self._dispatcher = None

    def _gauge(self, client: str) -> None:
        if self._metrics is not None:
            self._metrics.queue_length.labels(client, self.upstream).set(
                self._waiting.length(client)
            )

    def _count_timeout(self, client: str, when: str) -> None:
        if self._metrics is not None:
            self._metrics.queue_timeouts.labels(client, when, self.upstream).inc()
