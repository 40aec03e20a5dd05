"""The cache's decisions as a pure state machine over values (after hishel's `_core/_spec.py`).

Nothing here does I/O or reads a clock: `service.py` (the driver) looks the entry up, asks
`on_lookup` what to do, fetches when told to, asks `on_failure` what a failed fetch means and
`storable` whether (and for how long) an answer is kept. The hot path (`web/hot.py`) asks the
same `on_lookup` and answers only its `HIT`, so the two can never disagree about freshness.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .entry import CachedResponse, is_cacheable
from .failures import FailureKind

__all__ = ["Action", "Policy", "Store", "on_failure", "on_lookup", "storable", "usable"]


class Action(enum.Enum):
    """What to do with a question, given what the cache holds."""

    HIT = "hit"  # fresh: answer it
    STALE = "stale"  # answer the stale copy now and refresh it in the background
    FETCH = "fetch"  # ask upstream (collapsed with every other asker of the same key)
    STALE_ON_ERROR = "stale-on-error"  # the fetch failed: answer the stale copy
    FAIL = "fail"  # the fetch failed and nothing usable is cached: answer the failure


@dataclass(frozen=True, slots=True)
class Policy:
    """One operation's cache policy: lifetimes, and what a 404 of it is worth."""

    fresh: int
    stale: int
    stale_while_revalidate: bool = True
    not_found: int = 0  # seconds a 404 is kept (retrieves only; 0: never)

    @property
    def physical(self) -> int:
        """How long Redis keeps an entry: fresh, then the stale window."""
        return self.fresh + self.stale


@dataclass(frozen=True, slots=True)
class Store:
    """Keep an answer: fresh for `fresh` seconds, in Redis for `physical`."""

    fresh: int
    physical: int


def usable(entry: CachedResponse | None, now: float, policy: Policy) -> CachedResponse | None:
    """The entry, unless it is past its stale window by our clock (Redis expires entries on its
    own clock, so one may still be there)."""
    if entry is None:
        return None
    if entry.status != 200:
        # A kept 404 is never served stale: once it expires the id may well exist.
        return entry if now < entry.fresh_until else None
    return entry if now < entry.fresh_until + policy.stale else None


def on_lookup(
    entry: CachedResponse | None, now: float, policy: Policy, *, bypass: bool = False
) -> Action:
    """HIT when fresh; STALE when within the stale window and serving stale is on; else FETCH
    (a bypass always fetches)."""
    if entry is None or bypass:
        return Action.FETCH
    if now < entry.fresh_until:
        return Action.HIT
    if policy.stale_while_revalidate and usable(entry, now, policy) is not None:
        return Action.STALE
    return Action.FETCH


def on_failure(fallback: CachedResponse | None, kind: FailureKind) -> tuple[Action, bool]:
    """After a failed fetch: serve the stale copy if there is one (and whether to queue a
    background refresh, which only a spent budget warrants), else fail."""
    if fallback is None or fallback.status != 200:
        return Action.FAIL, False
    return Action.STALE_ON_ERROR, kind is FailureKind.BUDGET


def storable(
    status: int, headers: dict[str, str], size: int, max_bytes: int, policy: Policy
) -> Store | None:
    """Whether an upstream answer is kept, and for how long: cacheable 200s for the policy's
    lifetimes; a 404 (retrieves) for `not_found` seconds, with no stale window."""
    if status == 404 and policy.not_found > 0:
        if is_cacheable(200, headers, size, max_bytes):
            return Store(policy.not_found, policy.not_found)
        return None
    if policy.physical <= 0 or not is_cacheable(status, headers, size, max_bytes):
        return None
    return Store(policy.fresh, policy.physical)
