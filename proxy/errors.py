"""The proxy's own error answers, in TeamUp's error shape."""

from __future__ import annotations

import orjson
from aiohttp import web

__all__ = ["error_body", "error_response"]

JSON = "application/json"


def error_body(
    status: int, code: str, message: str, field_errors: dict[str, list[str]] | None = None
) -> bytes:
    """`{"code": ..., "type": ..., "message": ...[, "field_errors": ...]}` as JSON bytes."""
    body: dict[str, object] = {
        "code": code,
        "type": "invalid_request_error" if status < 500 else "api_error",
        "message": message,
    }
    if field_errors is not None:
        body["field_errors"] = field_errors
    return orjson.dumps(body)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    headers: dict[str, str] | None = None,
    field_errors: dict[str, list[str]] | None = None,
) -> web.Response:
    """An aiohttp response carrying `error_body`."""
    return web.Response(
        status=status,
        body=error_body(status, code, message, field_errors),
        content_type=JSON,
        headers=headers,
    )
