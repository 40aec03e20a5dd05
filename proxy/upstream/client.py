"""The TeamUp client: HTTP only — credential, header allowlists, timeouts, one pooled session."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass

import aiohttp
from yarl import URL

from ..core.failures import FailureKind, UpstreamFailure
from ..settings import Settings

__all__ = [
    "PASS_RESPONSE_HEADERS",
    "UpstreamClient",
    "UpstreamResponse",
    "parse_retry_after",
]

# Response headers that describe the body; everything else (Set-Cookie, hop-by-hop, Server,
# upstream rate-limit and caching headers) stays behind the proxy.
PASS_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Disposition",
    "Content-Language",
    "ETag",
    "Last-Modified",
)
_ACCEPT = {"json": "application/json", "csv": "text/csv"}
# Connections opened at start-up: a cold pool made the first burst of misses pay the handshakes.
_WARM_CONNECTIONS = 4

log = logging.getLogger("teamup_proxy")


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """What TeamUp answered, reduced to what the proxy may pass on or store."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    elapsed: float
    cache_control: str
    set_cookie: bool
    retry_after: float | None


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` given in seconds (HTTP dates are rare here and ignored)."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


class UpstreamClient:
    """One pooled `aiohttp.ClientSession` to TeamUp, with the credential added to every call."""

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.upstream_url
        self._headers = settings.upstream_headers
        self._timeout = aiohttp.ClientTimeout(
            total=settings.upstream_timeout, connect=min(3.0, settings.upstream_timeout)
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the pool and warm a few connections, so the first misses skip the handshake."""
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=30, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=True,
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        # aiohttp resends an idempotent request once when a kept-alive connection turns out to
        # be closed; that second TeamUp call would escape the budget. Our own retry is the one
        # for a failed connect, where nothing reached TeamUp.
        self._session._retry_connection = False
        await asyncio.gather(*(self._warm() for _ in range(_WARM_CONNECTIONS)))

    async def _warm(self) -> None:
        """One `HEAD /` (not the report: it costs no budget) to leave a kept-alive connection."""
        assert self._session is not None
        try:
            async with self._session.head(
                self.base_url + "/", timeout=aiohttp.ClientTimeout(total=2), allow_redirects=False
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError):
            pass

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(
        self, path: str, query_string: str, *, fmt: str, request_id: str
    ) -> UpstreamResponse:
        """GET one report's `path` (from the endpoint document, never from a caller);
        a failed connect is retried once, nothing else is."""
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        # Already percent-encoded by the query contract: yarl must send it byte for byte.
        url = URL(
            f"{self.base_url}{path}" + (f"?{query_string}" if query_string else ""),
            encoded=True,
        )
        headers = {
            **self._headers,
            "Accept": _ACCEPT.get(fmt, "text/csv"),
            "User-Agent": "teamup-proxy",
        }
        headers["X-Request-ID"] = request_id
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                async with self._session.get(
                    url, headers=headers, allow_redirects=False
                ) as response:
                    body = await response.read()
                    return UpstreamResponse(
                        status=response.status,
                        headers=tuple(
                            (name, response.headers[name])
                            for name in PASS_RESPONSE_HEADERS
                            if name in response.headers
                        ),
                        body=body,
                        elapsed=time.perf_counter() - started,
                        cache_control=response.headers.get("Cache-Control", ""),
                        set_cookie="Set-Cookie" in response.headers,
                        retry_after=parse_retry_after(response.headers.get("Retry-After")),
                    )
            except TimeoutError:
                raise UpstreamFailure(
                    FailureKind.TIMEOUT,
                    504,
                    "TeamUp did not answer in time",
                    elapsed=time.perf_counter() - started,
                ) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Only a failed connect is retried: then nothing reached TeamUp.
                if attempt == 1 and isinstance(exc, aiohttp.ClientConnectorError):
                    continue
                raise UpstreamFailure(
                    FailureKind.UNREACHABLE,
                    502,
                    "TeamUp could not be reached",
                    elapsed=time.perf_counter() - started,
                ) from None
            except aiohttp.ClientError:
                raise UpstreamFailure(
                    FailureKind.UNREACHABLE,
                    502,
                    "TeamUp gave an answer the proxy could not read",
                    elapsed=time.perf_counter() - started,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover
