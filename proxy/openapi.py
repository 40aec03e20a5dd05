"""`GET /openapi.json`: the proxy's OpenAPI document (upstream spec plus our headers, errors)."""

from __future__ import annotations

from importlib import resources

from aiohttp import web

__all__ = ["openapi_handler"]

_DOCUMENT = web.AppKey("openapi_document", bytes)


def load_document() -> bytes:
    """The document shipped inside the package."""
    return resources.files("proxy").joinpath("openapi.json").read_bytes()


async def openapi_handler(request: web.Request) -> web.Response:
    """Serve the document (read once per app)."""
    body = request.app.get(_DOCUMENT)
    if body is None:
        body = load_document()
        request.app[_DOCUMENT] = body
    return web.Response(body=body, content_type="application/json")
