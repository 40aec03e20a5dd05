"""The guard in front of TeamUp: the company-wide budget on the credential, its fair queue and
the circuit."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import orjson

from ..backends import keys
from ..backends.bus import Bus
from ..backends.limiters import FallbackLimiter
from ..backends.link import REDIS_ERRORS, AnyRedis, RedisLink
from ..core.gcra import Rate, RateDecision
from ..metrics import Metrics
from .queue import BudgetQueue, Slot, Turn

__all__ = ["UpstreamGuard"]

log = logging.getLogger("teamup_proxy")
# How long a worker trusts its copy of the shared circuit before asking Redis again.
RECHECK_SECONDS = 1.0


class UpstreamGuard:
    """The company-wide budget on one credential, and the circuit opened by an upstream 429
    for it (one guard per upstream: a 429 for one credential holds back that one only)."""

    BUDGET_KEY = "upstream"

    def __init__(
        self,
        link: RedisLink,
        limiter: FallbackLimiter,
        rate: Rate,
        prefix: str,
        *,
        default_wait: float,
        max_wait: float = 300.0,
        clock: Callable[[], float] = time.time,
        client: AnyRedis | None = None,
        queue_timeout: float = 0.0,
        metrics: Metrics | None = None,
        name: str = "default",
    ) -> None:
        self.name = name
        self.budget_key = keys.budget(name)
        self.link = link
        self.client = client if client is not None else link.client
        self.limiter = limiter
        self.rate = rate
        self.circuit_key = keys.circuit(prefix, name)
        self.max_wait = max_wait
        self.default_wait = min(default_wait, max_wait)
        self._clock = clock
        self._open_until = 0.0
        self._checked = -RECHECK_SECONDS  # time.monotonic() of the last PTTL read
        self._opener = f"{socket.gethostname()}:{os.getpid()}"
        self.queue = BudgetQueue(
            self.admit, rate.interval, queue_timeout, metrics=metrics, upstream=name
        )
        # The events channel: an open or closed circuit reaches every worker before the answer
        # that opened or closed it (None: no Redis, or tests without it).
        self.bus: Bus | None = None
        self.told = True  # whether the last open/close reached every process

    async def _tell(self, event: dict[str, Any]) -> bool:
        """Tell every process; False when the channel is not there or Redis failed."""
        if self.bus is None:
            return False
        try:
            await self.bus.tell(event)
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "circuit")
            return False
        return True

    def apply(self, event: dict[str, Any]) -> None:
        """An event from the channel: another process opened or closed this circuit."""
        if event.get("upstream", "default") != self.name:
            return  # another credential's circuit
        if event.get("kind") == "circuit-open":
            wait = event.get("wait")
            if isinstance(wait, int | float) and 0 < wait <= self.max_wait:
                self._open_until = max(self._open_until, self._clock() + wait)
                self._checked = time.monotonic()
        elif event.get("kind") == "circuit-closed":
            self._open_until = 0.0

    def recheck(self) -> None:
        """Ask Redis about the circuit at the next admission (an event may have been missed)."""
        self._checked = -RECHECK_SECONDS

    def _shared(self) -> bool:
        return self.link.up and self.client is not None

    async def circuit_wait(self) -> float:
        """Seconds the circuit stays open (0 when closed), as Redis says (locally while it is down).

        The local copy is only a cache of the key's PTTL: deleting the key closes the circuit.
        """
        if not self._shared():
            return self.open_locally_for()
        assert self.client is not None
        try:
            pttl = await self.client.pttl(self.circuit_key)
            if pttl == -1 and self.link.client is not None:
                # A key without expiry (not ours) would hold forever: bound it to the cap.
                await self.link.client.pexpire(self.circuit_key, int(self.max_wait * 1000))
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "circuit")
            return self.open_locally_for()
        self._checked = time.monotonic()
        # -2: no circuit; -1: bounded just now to the cap.
        seconds = self.max_wait if pttl == -1 else max(0, pttl) / 1000
        self._open_until = self._clock() + min(seconds, self.max_wait) if seconds > 0 else 0.0
        return self.open_locally_for()

    async def admit(self) -> tuple[float, RateDecision | None]:
        """The circuit's wait, and a unit of the budget when it is closed (None while open)."""
        local = self.open_locally_for()
        if local > 0:
            if not self._shared() or time.monotonic() - self._checked < RECHECK_SECONDS:
                return local, None
            wait = await self.circuit_wait()  # alone: an open circuit spends no budget
            return (wait, None) if wait > 0 else (0.0, await self.take())
        # One round trip for both (auto-pipelined). Only the first miss after another replica
        # opened the circuit spends a unit it then does not use.
        wait, decision = await asyncio.gather(self.circuit_wait(), self.take())
        return (wait, None) if wait > 0 else (0.0, decision)

    async def open_circuit(self, retry_after: float | None, *, raw: str | None = None) -> float:
        """Stop every replica calling TeamUp for its `Retry-After` (or the default), capped."""
        wait = retry_after if retry_after and retry_after > 0 else self.default_wait
        wait = min(wait, self.max_wait)
        self._open_until = max(self._open_until, self._clock() + wait)
        log.warning(
            "TeamUp answered 429; circuit open",
            extra={"event": "circuit_open", "wait_s": round(wait, 3), "upstream": self.name},
        )
        if self.link.up:
            assert self.link.client is not None
            opened_by = {
                "replica": self._opener,
                "upstream": self.name,
                "at": round(self._clock(), 3),
                "wait_s": round(wait, 3),
                "retry_after": None if raw is None else _printable(raw)[:64],
            }
            try:
                ms = max(1, int(wait * 1000))
                # A shorter Retry-After from a concurrent 429 must not shorten the circuit.
                if not await self.link.client.set(
                    self.circuit_key, orjson.dumps(opened_by), px=ms, nx=True
                ):
                    await self.link.client.pexpire(self.circuit_key, ms, gt=True)
                self._checked = time.monotonic()
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "circuit")
            else:
                await self._tell({"kind": "circuit-open", "wait": wait, "upstream": self.name})
        return wait

    async def describe(self) -> dict[str, Any]:
        """The circuit as `GET /admin/circuit` shows it."""
        state: dict[str, Any] = {"open": False, "retry_after": 0, "opened_by": None}
        if self._shared():
            assert self.link.client is not None
            try:
                raw, pttl = await asyncio.gather(
                    self.link.client.get(self.circuit_key), self.circuit_wait()
                )
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "circuit")
                raw, pttl = None, self.open_locally_for()
            try:
                opened_by = orjson.loads(raw) if raw is not None else None
            except orjson.JSONDecodeError:
                opened_by = None  # a value written by hand, or by an older version
            state["opened_by"] = opened_by if isinstance(opened_by, dict) else None
            wait = pttl
        else:
            wait = self.open_locally_for()
        state["open"] = wait > 0
        state["retry_after"] = round(wait, 3)
        state["shared"] = self._shared()
        state["max_s"] = self.max_wait
        state["upstream"] = self.name
        return state

    async def close_circuit(self) -> bool:
        """Close the circuit for every worker of every replica: each has been told before this
        returns (`told`), or Redis was not reachable (`told` False: this worker only).

        True (and a warning logged) only if it was open, here or in Redis."""
        was_open = self.open_locally_for() > 0
        self._open_until = 0.0
        self.told = self.link.embedded
        if self.link.up and self.link.client is not None:
            try:
                was_open = bool(await self.link.client.delete(self.circuit_key)) or was_open
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "circuit")
            else:
                self.told = await self._tell({"kind": "circuit-closed", "upstream": self.name})
        if was_open:
            log.warning(
                "circuit closed by an operator",
                extra={"event": "circuit_closed", "upstream": self.name},
            )
        return was_open

    async def acquire_slot(self, turn: Turn) -> Slot:
        """A unit of the budget for `turn`'s client: now, or after its turn in the fair queue.

        Raises UpstreamFailure (circuit open; budget spent for longer than the queue waits)."""
        return await self.queue.acquire(turn)

    async def take(self) -> RateDecision:
        """Spend one unit of this credential's budget, if one is left."""
        return await self.limiter.hit(self.budget_key, self.rate)

    def open_locally_for(self) -> float:
        """Seconds this process already knows the circuit stays open (no round trip)."""
        return min(self.max_wait, max(0.0, self._open_until - self._clock()))


def _printable(value: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in value)
