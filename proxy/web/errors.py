"""The proxy's own error answers, in TeamUp's error shape."""

from __future__ import annotations

import orjson
from aiohttp import web

__all__ = ["error_body", "error_response"]

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


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An aiohttp response carrying `error_body`."""
    return web.Response(
        status=status,
        body=error_body(status, code, message),
        content_type=JSON,
        headers=headers,
    )
