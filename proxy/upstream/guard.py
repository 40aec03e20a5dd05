"""The guard in front of TeamUp: the company-wide budget on the credential and the circuit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ..backends import keys
from ..backends.limiters import FallbackLimiter
from ..backends.link import REDIS_ERRORS, AnyRedis, RedisLink
from ..core.gcra import Rate, RateDecision

__all__ = ["UpstreamGuard"]

log = logging.getLogger("teamup_proxy")


class UpstreamGuard:
    """The company-wide budget on the credential, and the circuit opened by an upstream 429."""

    BUDGET_KEY = "upstream"

    def __init__(
        self,
        link: RedisLink,
        limiter: FallbackLimiter,
        rate: Rate,
        prefix: str,
        *,
        default_wait: float,
        clock: Callable[[], float] = time.time,
        client: AnyRedis | None = None,
    ) -> None:
        self.link = link
        self.client = client if client is not None else link.client
        self.limiter = limiter
        self.rate = rate
        self.circuit_key = keys.circuit(prefix)
        self.default_wait = default_wait
        self._clock = clock
        self._open_until = 0.0

    async def circuit_wait(self) -> float:
        """Seconds the circuit stays open (0 when closed), as every replica sees it."""
        local = self.open_locally_for()
        if local > 0:
            return local
        if not self.link.up or self.client is None:
            return 0.0
        try:
            pttl = await self.client.pttl(self.circuit_key)
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "circuit")
            return 0.0
        if pttl > 0:
            self._open_until = self._clock() + pttl / 1000
            return pttl / 1000
        return 0.0

    async def open_circuit(self, retry_after: float | None) -> float:
        """Stop every replica calling TeamUp for its `Retry-After` (or the default wait)."""
        wait = retry_after if retry_after and retry_after > 0 else self.default_wait
        self._open_until = max(self._open_until, self._clock() + wait)
        log.warning(
            "TeamUp answered 429; circuit open",
            extra={"event": "circuit_open", "wait_s": round(wait, 3)},
        )
        if self.link.up:
            assert self.link.client is not None
            try:
                ms = max(1, int(wait * 1000))
                # A shorter Retry-After from a concurrent 429 must not shorten the circuit.
                if not await self.link.client.set(self.circuit_key, "1", px=ms, nx=True):
                    await self.link.client.pexpire(self.circuit_key, ms, gt=True)
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "circuit")
        return wait

    async def take(self) -> RateDecision:
        """Spend one unit of the global budget, if one is left."""
        return await self.limiter.hit(self.BUDGET_KEY, self.rate)

    def open_locally_for(self) -> float:
        """Seconds this process already knows the circuit stays open (no round trip)."""
        return max(0.0, self._open_until - self._clock())
