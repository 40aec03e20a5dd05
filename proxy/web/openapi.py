"""`GET /openapi.json`: the proxy's OpenAPI document (upstream spec plus our headers, errors)."""

from __future__ import annotations

import functools
from importlib import resources

from aiohttp import web

__all__ = ["openapi_handler"]


@functools.cache
def load_document() -> bytes:
    """The document shipped inside the package (read once per process)."""
    return resources.files("proxy.spec").joinpath("proxy-openapi.json").read_bytes()


async def openapi_handler(request: web.Request) -> web.Response:
    """Serve the document."""
    return web.Response(body=load_document(), content_type="application/json")
