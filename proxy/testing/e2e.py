"""Helpers for end-to-end runs (tests and bench): settings pointing at a mock TeamUp, keys and a
movable clock."""

from __future__ import annotations

from typing import Any

from multidict import MultiMapping

from ..core.contract import CanonicalQuery, Contract, QueryErrors
from ..core.operations import load_operations
from ..settings import Settings
from ..web.auth import hash_key

__all__ = [
    "ADMIN_KEY",
    "COLUMNS",
    "CREDITS",
    "FAST_LIMITS",
    "KEY",
    "OTHER_KEY",
    "REPORT",
    "TOKEN",
    "FakeClock",
    "auth",
    "make_settings",
    "parse_query",
]

TOKEN = "upstream-SECRET-7f3a9c"
KEY = "billing-key-1b2c3d"
OTHER_KEY = "crm-key-4e5f6a"
ADMIN_KEY = "admin-key-9z8y7x"
REPORT = "/api/v2/reports/customer_credits/data"
# The first endpoint's contract: most end-to-end tests ask the customer credits report.
CREDITS: Contract = load_operations().reports()["customer_credits"].contract
COLUMNS = CREDITS.columns


def parse_query(raw: MultiMapping[str]) -> CanonicalQuery | QueryErrors:
    """The customer credits contract applied to a decoded query."""
    return CREDITS.parse(raw)


def auth(key: str = KEY) -> dict[str, str]:
    """The caller header for `key`."""
    return {"Authorization": f"Token {key}"}


def make_settings(upstream_url: str, **overrides: Any) -> Settings:
    """Settings for a proxy in front of `upstream_url`, with two clients and an admin key."""
    values: dict[str, Any] = {
        "upstream_url": upstream_url,
        "upstream_token": TOKEN,
        "clients": {
            "billing": {"key_sha256": hash_key(KEY), "rate": "1000/minute"},
            "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "1000/minute"},
        },
        "admin_key_sha256": hash_key(ADMIN_KEY),
        "upstream_rate_limit": "1000/minute",
        "upstream_burst": 1000,
        "upstream_timeout": 2,
        "cache_l1_ttl": 0,
    }
    values.update(overrides)
    if "upstreams" in overrides and "upstream_token" not in overrides:
        del values["upstream_token"]  # several credentials replace the single one
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


class FakeClock:
    """A wall clock that tests move by hand."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# Rates whose per-process share admits a request every few microseconds even from a full
# bucket (a Redis outage starts one): for tests about caching through faults, not limits.
FAST_LIMITS: dict[str, object] = {
    "clients": {"billing": {"key_sha256": hash_key(KEY), "rate": "100000/second"}},
    "upstream_rate_limit": "100000/second",
    "upstream_burst": 1000,
}
