"""Every Redis key the proxy writes, in one place.

Entries, leases and failure notes of one cache key share a hash tag, so on Redis Cluster they
live in one slot (the lease release script touches two of them atomically).
"""

from __future__ import annotations

from ..core.contract import CanonicalQuery

__all__ = [
    "KEY_VERSION",
    "PREFIX",
    "cache_key",
    "circuit",
    "entries",
    "entry",
    "failure",
    "lease",
    "limiter",
    "operation_prefix",
    "probe",
]

PREFIX = "teamup-proxy:"
LIMITER_PREFIX = PREFIX + "rl:"
# Part of every cache key: bump it when the canonical encoding changes, and old entries are
# simply never read again (they expire on their own). v3: the operation id and the path
# parameters joined the key (v2 named a report).
KEY_VERSION = "v3"


def operation_prefix(operation_id: str) -> str:
    """What every cache key of one operation starts with (for purging one operation)."""
    return f"{KEY_VERSION}:{operation_id}:"


def cache_key(query: CanonicalQuery, variant: str = "") -> str:
    """`v3:<operationId>:<sha256>`: the operation, then the digest of its path parameters and
    canonical query; `variant` (a short tag of what else shapes the stored body, such as the
    public URL links are rewritten to) joins the digest when set."""
    digest = query.digest if not variant else f"{query.digest}.{variant}"
    return f"{KEY_VERSION}:{query.operation}:{digest}"


def entry(prefix: str, key: str) -> str:
    """One cached answer."""
    return f"{prefix}c:{{{key}}}"


def entries(prefix: str, operation_id: str | None = None) -> str:
    """A SCAN pattern for every entry, or every entry of one operation."""
    if operation_id is None:
        return f"{prefix}c:*"
    return f"{prefix}c:{{{operation_prefix(operation_id)}*"


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
