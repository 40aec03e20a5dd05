"""Every Redis key the proxy writes, in one place.

Entries, leases and failure notes of one cache key share a hash tag, so on Redis Cluster they
live in one slot (the lease release script touches two of them atomically).
"""

from __future__ import annotations

from ..core.contract import report_key_prefix

__all__ = ["PREFIX", "circuit", "entries", "entry", "failure", "lease", "limiter", "probe"]

PREFIX = "teamup-proxy:"
LIMITER_PREFIX = PREFIX + "rl:"


def entry(prefix: str, key: str) -> str:
    """One cached answer."""
    return f"{prefix}c:{{{key}}}"


def entries(prefix: str, report: str | None = None) -> str:
    """A SCAN pattern for every entry, or every entry of one report."""
    return f"{prefix}c:*" if report is None else f"{prefix}c:{{{report_key_prefix(report)}*"


def lease(prefix: str, key: str) -> str:
    """The cross-replica fetch lease of one cache key."""
    return f"{prefix}l:{{{key}}}"


def failure(prefix: str, key: str) -> str:
    """Where a failed lease holder leaves its failure for the replicas that waited on it."""
    return f"{prefix}f:{{{key}}}"


def limiter(prefix: str, name: str) -> str:
    """One GCRA bucket (`client:<name>`, `share:<name>`, `upstream`, `admin`)."""
    return f"{prefix}{name}"


def circuit(prefix: str) -> str:
    """The shared circuit opened by an upstream 429 (its PTTL is how long it stays open)."""
    return f"{prefix}circuit"


def probe(prefix: str) -> str:
    """A tiny key a worker writes (1 s lifetime) to learn that Redis takes writes again."""
    return f"{prefix}probe"
