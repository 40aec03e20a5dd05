"""The proxy's own error answers, in TeamUp's error shape."""

from __future__ import annotations

from aiohttp import web

from ..core.errors import JSON, error_body

__all__ = ["JSON", "error_body", "error_response"]


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
