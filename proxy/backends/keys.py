"""Every Redis key the proxy writes, in one place.

Entries, leases and failure notes of one cache key share a hash tag, so on Redis Cluster they
live in one slot (the lease release script touches two of them atomically).
"""

from __future__ import annotations

import hashlib

from ..core.contract import CanonicalQuery

__all__ = [
    "KEY_VERSION",
    "PREFIX",
    "budget",
    "cache_key",
    "circuit",
    "collection",
    "entries",
    "entry",
    "failure",
    "generations",
    "idempotency",
    "lease",
    "limiter",
    "matches",
    "operation_prefix",
    "probe",
]

PREFIX = "teamup-proxy:"
LIMITER_PREFIX = PREFIX + "rl:"
# Part of every cache key: bump it when the canonical encoding changes, and old entries are
# simply never read again (they expire on their own). v3: the operation id and the path
# parameters joined the key (v2 named a report).
KEY_VERSION = "v3"


def operation_prefix(operation_id: str, provider: str | None = None) -> str:
    """What every cache key of one operation (for one provider) starts with (for purging)."""
    base = f"{KEY_VERSION}:{operation_id}:"
    return base if provider is None else f"{base}p{provider}:"


def matches(key: str, operation_id: str | None, provider: str | None) -> bool:
    """Whether a cache key is one of an operation's and/or a provider's (both None: any)."""
    if operation_id is not None:
        return key.startswith(operation_prefix(operation_id, provider))
    if provider is not None:
        return key.startswith(f"{KEY_VERSION}:") and f":p{provider}:" in key
    return True


def cache_key(query: CanonicalQuery, variant: str = "", generation: int = 0) -> str:
    """`v3:<operationId>:[p<provider>:]<sha256>`: the operation, the provider the question is
    for (when one is named: two providers never share an entry, a lease or a failure note),
    then the digest of its path parameters and canonical query; `variant` (a short tag of what
    else shapes the stored body, such as the public URL links are rewritten to) joins the
    digest when set; `generation` (of the read's collection, bumped by every write that
    changes it) ends it as `:g<n>` once it is past 0, so that a write makes every older entry
    of the collection unreachable in O(1). The digest is hex, so `p` never starts it."""
    digest = query.digest if not variant else f"{query.digest}.{variant}"
    tenant = f"p{query.provider}:" if query.provider is not None else ""
    key = f"{KEY_VERSION}:{query.operation}:{tenant}{digest}"
    return key if not generation else f"{key}:g{generation}"


def collection(name: str, provider: str | None) -> str:
    """A collection's field in the generation hash: one generation per provider, so a write
    for one provider never invalidates another's reads."""
    return name if provider is None else f"p{provider}/{name}"


def generations(prefix: str) -> str:
    """One hash: a generation number per collection (`customers`, `reports/customers`, …).
    It has no TTL, so `volatile-*` eviction never takes it."""
    return f"{prefix}gen"


def idempotency(prefix: str, client: str, token: str, provider: str | None = None) -> str:
    """The stored answer (or in-flight mark) of one client's Idempotency-Key (per provider:
    one key sent for two providers is two writes); the token is hashed (any length, any bytes
    the header allows, never a key pattern)."""
    digest = hashlib.sha256(token.encode()).hexdigest()
    tenant = f"p{provider}:" if provider is not None else ""
    return f"{prefix}idem:{client}:{tenant}{digest}"


def entry(prefix: str, key: str) -> str:
    """One cached answer."""
    return f"{prefix}c:{{{key}}}"


def entries(prefix: str, operation_id: str | None = None, provider: str | None = None) -> str:
    """A SCAN pattern for every entry, or every entry of one operation and/or one provider."""
    if operation_id is not None:
        return f"{prefix}c:{{{operation_prefix(operation_id, provider)}*"
    if provider is not None:
        return f"{prefix}c:{{{KEY_VERSION}:*:p{provider}:*"
    return f"{prefix}c:*"


def lease(prefix: str, key: str) -> str:
    """The cross-replica fetch lease of one cache key."""
    return f"{prefix}l:{{{key}}}"


def failure(prefix: str, key: str) -> str:
    """Where a failed lease holder leaves its failure for the replicas that waited on it."""
    return f"{prefix}f:{{{key}}}"


def limiter(prefix: str, name: str) -> str:
    """One GCRA bucket (`client:<name>`, `share:<name>`, `upstream` for the default
    credential, `upstream:<name>` for another, `admin`)."""
    return f"{prefix}{name}"


def budget(upstream: str) -> str:
    """The limiter name of one credential's budget (`upstream` for `default`, as before)."""
    return "upstream" if upstream == "default" else f"upstream:{upstream}"


def circuit(prefix: str, upstream: str = "default") -> str:
    """The shared circuit of one credential, opened by an upstream 429 (its PTTL is how long
    it stays open); `circuit` for `default`, as before."""
    return f"{prefix}circuit" if upstream == "default" else f"{prefix}circuit:{upstream}"


def probe(prefix: str) -> str:
    """A tiny key a worker writes (1 s lifetime) to learn that Redis takes writes again."""
    return f"{prefix}probe"
