"""HTTP handlers: the report, admin purge and health — thin calls into the pieces behind them."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from ..backends.link import RedisLink
from ..core.contract import MAX_QUERY_BYTES, CanonicalQuery, QueryErrors, parse_query
from ..core.gcra import Rate, RateDecision
from ..service import Caller, ReportService
from ..settings import Settings
from .auth import ClientDirectory, presented_key
from .errors import JSON, error_response

__all__ = ["LOG", "REQUEST_ID", "STATE", "ProxyState", "healthz", "purge", "readyz", "report"]


class ParsedQueries:
    """Recently parsed raw query strings: hot questions tend to arrive spelled the same way."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._data: dict[str, tuple[CanonicalQuery | QueryErrors, str]] = {}

    def parse(self, request: web.Request) -> tuple[CanonicalQuery | QueryErrors, str]:
        """The request's query parsed, and its canonical string ("" for errors)."""
        raw = request.rel_url.raw_query_string
        found = self._data.get(raw)
        if found is None:
            parsed = parse_query(request.query)
            canonical = "" if isinstance(parsed, QueryErrors) else parsed.canonical_string()
            found = (parsed, canonical)
            if len(self._data) >= self.size:
                self._data.clear()
            self._data[raw] = found
        return found


@dataclass
class ProxyState:
    """Everything a handler needs, built once per app in `create_app`'s cleanup context."""

    settings: Settings
    directory: ClientDirectory
    link: RedisLink
    service: ReportService
    queries: ParsedQueries = field(default_factory=ParsedQueries)
    ready: bool = False
    draining: bool = False


STATE = web.AppKey("state", ProxyState)
LOG = web.RequestKey("log", dict[str, object])  # access-log fields, filled by handlers
REQUEST_ID = web.RequestKey("request_id", str)


def ratelimit_headers(rate: Rate, decision: RateDecision) -> dict[str, str]:
    """The IETF draft's `RateLimit-Policy` and `RateLimit` headers for a client decision."""
    return {
        "RateLimit-Policy": f'"client";q={rate.limit};w={math.ceil(rate.period)}',
        "RateLimit": f'"client";r={decision.remaining};t={math.ceil(decision.reset_after)}',
    }


def invalid_query(errors: QueryErrors, headers: dict[str, str] | None = None) -> web.Response:
    """400 in TeamUp's shape, naming every bad parameter."""
    return web.Response(
        status=400, body=orjson.dumps(errors.body()), content_type=JSON, headers=headers
    )


async def report(request: web.Request) -> web.StreamResponse:
    """`GET /api/v2/reports/customer_credits/data`: authenticate, limit, validate, answer."""
    state = request.app[STATE]
    fields = request[LOG]
    if len(request.rel_url.raw_query_string) > MAX_QUERY_BYTES:
        return error_response(
            414, "query_too_long", f"The query string is longer than {MAX_QUERY_BYTES} bytes."
        )
    found = state.directory.identify(presented_key(request.headers))
    if found is None:
        return error_response(
            401,
            "not_authenticated",
            "Authentication credentials were not provided or are not valid. Send your proxy "
            "key as 'Authorization: Token <key>', 'Authorization: Bearer <key>' or 'X-API-Key'.",
            headers={"WWW-Authenticate": 'Token realm="teamup-proxy"'},
        )
    caller = Caller(*found)
    fields["client"] = caller.name
    state.service.metrics.count_client(caller.name)

    rate = caller.config.rate or state.settings.rate_limit
    parsed, canonical = state.queries.parse(request)
    service = state.service
    bypass = service.bypasses("no-cache" in request.headers.get("Cache-Control", "").lower())
    answer = None
    cached = None
    if isinstance(parsed, QueryErrors):
        decision = await state.service.limiter.hit(f"client:{caller.name}", rate)
    else:
        key = parsed.cache_key()
        fields["key"] = key
        answer = None if bypass else service.l1_hit(key)
        if answer is not None:
            decision = await state.service.limiter.hit(f"client:{caller.name}", rate)
        else:
            # Both go out in one Redis round trip (auto-pipelining); a refused caller wastes a GET.
            decision, cached = await asyncio.gather(
                state.service.limiter.hit(f"client:{caller.name}", rate), service.lookup(key)
            )
    limit_headers = ratelimit_headers(rate, decision)
    if not decision.allowed:
        state.service.metrics.rejections.labels(caller.name, "client").inc()
        fields["cache"] = "rejected"
        return error_response(
            429,
            "rate_limited",
            f"Client {caller.name!r} is over its rate of {rate}. Retry later.",
            headers={**limit_headers, "Retry-After": decision.retry_after_header},
        )

    if isinstance(parsed, QueryErrors):
        fields["cache"] = "rejected"
        return invalid_query(parsed, limit_headers)
    if answer is None:
        answer = await service.answer(caller, parsed, request[REQUEST_ID], cached, bypass=bypass)
    fields["cache"] = answer.cache
    fields["upstream_status"] = answer.upstream_status
    fields["upstream_ms"] = None if answer.upstream_ms is None else round(answer.upstream_ms, 2)
    headers = answer.headers
    headers.update(limit_headers)
    headers["X-Proxy-Canonical-Query"] = canonical
    return web.Response(status=answer.status, body=answer.body, headers=headers)


async def purge(request: web.Request) -> web.Response:
    """`DELETE /admin/cache[?<report query>]`: drop one canonical entry, or everything."""
    state = request.app[STATE]
    admin_hash = state.settings.admin_key_sha256
    if admin_hash is None:
        return error_response(404, "not_found", "Not found. (Set PROXY_ADMIN_KEY_SHA256.)")
    key = presented_key(request.headers)
    if not state.directory.matches(key, admin_hash):
        if state.directory.identify(key) is not None:
            return error_response(403, "permission_denied", "This key may not purge the cache.")
        return error_response(401, "not_authenticated", "The admin key is missing or wrong.")
    request[LOG]["client"] = "admin"
    if request.rel_url.raw_query_string:
        parsed = parse_query(request.query)
        if isinstance(parsed, QueryErrors):
            return invalid_query(parsed)
        removed = await state.service.purge(parsed.cache_key())
        body = {"purged": removed, "canonical_query": parsed.canonical_string()}
    else:
        body = {"purged": await state.service.purge()}
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    """The process is alive."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 while the process can answer (naming what is degraded); 503 while starting/draining."""
    state = request.app.get(STATE)
    if state is None or not state.ready or state.draining:
        status = "draining" if state is not None and state.draining else "starting"
        return web.json_response({"status": status}, status=503)
    redis = state.link.status
    circuit = "circuit-open" if state.service.guard.open_locally_for() > 0 else "ok"
    overall = "degraded" if redis == "down" or circuit != "ok" else "ok"
    return web.json_response({"status": overall, "checks": {"redis": redis, "upstream": circuit}})
