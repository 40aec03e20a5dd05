"""Caller keys to client names: SHA-256 digests compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping

from ..settings import ClientConfig

__all__ = ["ClientDirectory", "hash_key", "presented_key"]

_MAX_KEY_LENGTH = 512
# Only HTTP's optional whitespace is trimmed: `str.strip()` would also drop NBSP, U+3000 and
# other Unicode spaces, so a key with one appended would still authenticate.
_OWS = " \t"


def hash_key(key: str) -> str:
    """The hex SHA-256 of a caller key, as `PROXY_CLIENTS` stores it."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a caller presents: `Authorization: Token|Bearer <key>` or `X-API-Key: <key>`."""
    authorization = headers.get("Authorization")
    if authorization is not None:
        scheme, _, key = authorization.strip(_OWS).partition(" ")
        if scheme.lower() not in ("token", "bearer"):
            return None
        key = key.strip(_OWS)
    else:
        key = headers.get("X-API-Key", "").strip(_OWS)
    if not key or len(key) > _MAX_KEY_LENGTH:
        return None
    return key


class ClientDirectory:
    """Knows which digest belongs to which client; every lookup compares against all of them."""

    def __init__(self, clients: Mapping[str, ClientConfig]) -> None:
        self._entries = [
            (bytes.fromhex(config.key_sha256), name, config) for name, config in clients.items()
        ]

    def identify(self, key: str | None) -> tuple[str, ClientConfig] | None:
        """The (name, config) owning `key`, or None; timing does not depend on which one matched."""
        if key is None:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: tuple[str, ClientConfig] | None = None
        for expected, name, config in self._entries:
            if hmac.compare_digest(digest, expected):
                found = (name, config)
        return found

    def matches(self, key: str | None, key_sha256: str | None) -> bool:
        """Whether `key` hashes to `key_sha256` (the admin key check)."""
        if key is None or key_sha256 is None:
            return False
        return hmac.compare_digest(hash_key(key), key_sha256)
