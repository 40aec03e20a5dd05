"""The proxy's own error bodies, in TeamUp's error shape (pure: the web layer wraps them)."""

from __future__ import annotations

import orjson

__all__ = ["JSON", "error_body"]

JSON = "application/json"


def error_body(status: int, code: str, message: str) -> bytes:
    """`{"code": ..., "type": ..., "message": ...}` as JSON bytes (400s come from the query)."""
    return orjson.dumps(
        {
            "code": code,
            "type": "invalid_request_error" if status < 500 else "api_error",
            "message": message,
        }
    )
