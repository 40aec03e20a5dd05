"""HTTP handlers: every routed read, admin purge and health — thin calls into the pieces behind
them."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from urllib.parse import unquote, unquote_to_bytes

import orjson
from aiohttp import web

from ..backends.link import RedisLink
from ..core.contract import MAX_QUERY_BYTES, CanonicalQuery, PathValue, QueryErrors
from ..core.gcra import Rate, RateDecision
from ..core.operations import BadPath, Operation, Operations, Router
from ..metrics import metrics_handler
from ..service import Caller, ReadService
from ..settings import PROVIDER_ID, Settings, Tenant, TenantRefused
from ..writes import WriteService
from .auth import ClientDirectory, presented_key
from .errors import JSON, error_response
from .hot import HotHits
from .sending import Sending, paced_response

__all__ = [
    "LOG",
    "REQUEST_ID",
    "STATE",
    "ProxyState",
    "circuit",
    "healthz",
    "protected_metrics",
    "purge",
    "read",
    "readyz",
    "resolve_tenant",
    "undecodable",
]

# The request header naming the provider a call is for, as TeamUp spells it.
PROVIDER_HEADER = "TeamUp-Provider-ID"


# A percent-escape of a byte above 0x7F: only these can make a query string invalid UTF-8.
_HIGH_BYTE = re.compile(r"%[89a-fA-F][0-9a-fA-F]")


def undecodable(raw: str) -> QueryErrors | None:
    """The parameters whose name or value is not UTF-8 once percent-decoded (`%FF`, the
    overlong `%C0%80`, an encoded surrogate), as a 400 like a lone surrogate gets; None if all
    are. (Decoding would make them U+FFFD, sharing an answer with a real `%EF%BF%BD`.)"""
    if not _HIGH_BYTE.search(raw):
        return None
    errors: dict[str, list[str]] = {}
    for pair in raw.split("&"):
        name, _, value = pair.partition("=")
        for part, what in ((name, "name"), (value, "value")):
            try:
                unquote_to_bytes(part.replace("+", " ")).decode("utf-8")
            except UnicodeDecodeError:
                shown = unquote(name.replace("+", " "), errors="replace")
                errors.setdefault(shown, []).append(f"The {what} is not valid UTF-8.")
                break
    return QueryErrors(errors) if errors else None


def with_undecodable(
    raw: str, parsed: CanonicalQuery | QueryErrors
) -> CanonicalQuery | QueryErrors:
    """`parsed`, unless `raw` is not UTF-8: then its errors too, all reported at once."""
    errors = undecodable(raw)
    if errors is None:
        return parsed
    if isinstance(parsed, QueryErrors):
        for name, messages in parsed.field_errors.items():
            errors.field_errors.setdefault(name, []).extend(messages)
    return errors


class ParsedQueries:
    """Recently parsed raw query strings: hot questions tend to arrive spelled the same way."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._data: dict[tuple[str, PathValue, str], tuple[CanonicalQuery | QueryErrors, str]] = {}

    def parse(
        self, operation: Operation, path: PathValue, request: web.Request
    ) -> tuple[CanonicalQuery | QueryErrors, str]:
        """The request's query parsed by the operation's contract (with its validated path
        parameters), and its canonical string ("" for errors)."""
        memo = (operation.operation_id, path, request.rel_url.raw_query_string)
        found = self._data.get(memo)
        if found is None:
            parsed = with_undecodable(memo[2], operation.contract.parse(request.query, path))
            canonical = "" if isinstance(parsed, QueryErrors) else parsed.canonical_string()
            found = (parsed, canonical)
            if len(self._data) >= self.size:
                self._data.clear()
            self._data[memo] = found
        return found


@dataclass
class ProxyState:
    """Everything a handler needs, built once per app in `create_app`'s cleanup context."""

    settings: Settings
    directory: ClientDirectory
    link: RedisLink
    service: ReadService
    operations: Operations  # the routed reads
    router: Router
    sending: Sending  # how answers are written (web/sending.py)
    reports: dict[str, Operation] = field(default_factory=dict)  # routed reports, by name
    queries: ParsedQueries = field(default_factory=ParsedQueries)
    hot: HotHits | None = None  # answers hot hits without the general path (web/hot.py)
    writes: WriteService | None = None  # the documented writes (proxy/writes.py)
    ready: bool = False
    draining: bool = False


STATE = web.AppKey("state", ProxyState)
LOG = web.RequestKey("log", dict[str, object])  # access-log fields, filled by handlers
REQUEST_ID = web.RequestKey("request_id", str)
# `DELETE /admin/cache?<query>` predates every report but this one; it keeps meaning it.
LEGACY_PURGE_REPORT = "customer_credits"


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


async def read(request: web.Request) -> web.StreamResponse:
    """Any path under `/api/v2/`: the router finds the documented operation (404 for anything
    undocumented or a bad path parameter, 405 for another method), then authenticate,
    authorise, limit, validate, answer.

    Every answer of a routed operation names it in `X-Proxy-Operation` (and a report's in
    `X-Proxy-Report`).
    """
    state = request.app[STATE]
    route = state.router.match(request.rel_url.path_safe)
    if route is None:
        raise web.HTTPNotFound()
    if isinstance(route, BadPath):
        return error_response(404, "not_found", route.message())
    operation = route.operations.get(request.method)
    if operation is None:
        raise web.HTTPMethodNotAllowed(request.method, set(route.operations))
    if not operation.is_read:
        from .writes import write  # web/writes.py imports this module

        written = await write(request, operation, route.path)
        written.headers.setdefault("X-Proxy-Operation", operation.operation_id)
        return written
    hot = state.hot
    fast = (
        hot.answer(request, operation, route.path, request[LOG], request[REQUEST_ID])
        if hot is not None
        else None
    )
    if fast is not None:
        return fast
    response = await _read(request, operation, route.path)
    response.headers["X-Proxy-Operation"] = operation.operation_id
    if operation.report is not None:
        response.headers["X-Proxy-Report"] = operation.report
    return response


def resolve_tenant(request: web.Request, caller: Caller) -> Tenant | web.Response:
    """The provider and credential of an authenticated request (`TeamUp-Provider-ID`, else the
    client's first provider), or the 400/403 to answer instead (nothing is forwarded). Sets
    the access-log fields `upstream` and `provider`."""
    state = request.app[STATE]
    found = state.settings.tenant(caller.name, caller.config, request.headers.get(PROVIDER_HEADER))
    fields = request[LOG]
    if isinstance(found, TenantRefused):
        fields["cache"] = "rejected"
        if found.status == 400:  # TeamUp's validation shape, naming the header
            body = {
                "code": found.code,
                "type": "invalid_request_error",
                "message": found.message,
                "field_errors": {PROVIDER_HEADER: ["Must be a provider id: 1 to 18 digits."]},
            }
            return web.Response(status=400, body=orjson.dumps(body), content_type=JSON)
        return error_response(found.status, found.code, found.message)
    fields["upstream"], fields["provider"] = found.labels
    return found


def forbidden(client: str, operation: Operation) -> web.Response:
    """403 for a read outside the client's scopes (nothing is forwarded)."""
    if operation.report is not None and operation.segment == "reports":
        what = f"the {operation.report} report"
        setting = "`reports` / `read`"
    else:
        what = f"/api/v2/{operation.segment}"
        setting = "`read`"
    return error_response(
        403,
        "permission_denied",
        f"Client {client!r} may not read {what}. Operators: see {setting} in PROXY_CLIENTS.",
    )


async def _read(request: web.Request, operation: Operation, path: PathValue) -> web.Response:
    state = request.app[STATE]
    fields = request[LOG]
    fields["report"] = operation.label
    if operation.report is not None:
        fields["route"] = "report"
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
    tenant = resolve_tenant(request, caller)
    if isinstance(tenant, web.Response):
        return tenant
    if not caller.config.may_read(operation.segment, operation.report):
        fields["cache"] = "rejected"
        return forbidden(caller.name, operation)
    service = state.service
    service.metrics.count_client(caller.name, operation.label, *tenant.labels)
    parsed, canonical = state.queries.parse(operation, path, request)
    if tenant.key is not None and isinstance(parsed, CanonicalQuery):
        parsed = dataclasses.replace(parsed, provider=tenant.key)
    bypass = service.bypasses("no-cache" in request.headers.get("Cache-Control", "").lower())
    rate, decision, answer = await service.serve(caller, parsed, request[REQUEST_ID], bypass=bypass)
    fields["cache"] = answer.cache
    if isinstance(parsed, CanonicalQuery):
        fields["key"] = service.key(parsed)
    fields["upstream_status"] = answer.upstream_status
    fields["upstream_ms"] = None if answer.upstream_ms is None else round(answer.upstream_ms, 2)
    fields["queued_ms"] = answer.queued_ms
    headers = answer.headers
    headers.update(ratelimit_headers(rate, decision))
    if decision.allowed and isinstance(parsed, CanonicalQuery):
        headers["X-Proxy-Canonical-Query"] = canonical
    return paced_response(
        request,
        status=answer.status,
        body=answer.body,
        headers=headers,
        sending=state.sending,
        request_id=request[REQUEST_ID],
    )


def _not_admin(request: web.Request, action: str) -> web.Response | None:
    """The refusal for a caller without the admin key (None: it is the admin)."""
    state = request.app[STATE]
    admin_hash = state.settings.admin_key_sha256
    if admin_hash is None:
        return error_response(404, "not_found", "Not found. (Set PROXY_ADMIN_KEY_SHA256.)")
    key = presented_key(request.headers)
    if not state.directory.matches(key, admin_hash):
        if state.directory.identify(key) is not None:
            return error_response(403, "permission_denied", f"This key may not {action}.")
        return error_response(401, "not_authenticated", "The admin key is missing or wrong.")
    request[LOG]["client"] = "admin"
    return None


async def purge(request: web.Request) -> web.Response:
    """`DELETE /admin/cache[/<report>[/data]][?<query>]`: drop one canonical entry, every entry
    of one report, or everything.

    `/admin/cache` everything; `/admin/cache/<report>` that report's entries;
    `/admin/cache/<report>/data?<query>` the one entry of that query (mirrors the report URL);
    `/admin/cache?<query>` the customer_credits entry (the form from before every report).
    A `TeamUp-Provider-ID` header (or `?provider=<id>` on the first two forms) narrows any of
    them to that provider's entries; without one, the one-entry forms drop that question's
    entry for every provider served.
    """
    state = request.app[STATE]
    refused = _not_admin(request, "purge the cache")
    if refused is not None:
        return refused
    limited = await admin_limited(state)
    if limited is not None:
        return limited
    report = request.match_info.get("report")
    one_entry = request.match_info.get("data") is not None
    raw_provider = request.headers.get(PROVIDER_HEADER)
    if not one_entry and set(request.query) == {"provider"}:
        # `?provider=` narrows the broad forms: once, and not beside the header.
        if len(request.query) > 1 or raw_provider is not None:
            return error_response(
                400, "parameter_invalid", "Name the provider once: `?provider=` or the header."
            )
        raw_provider = request.query["provider"]
    elif report is None and request.rel_url.raw_query_string:
        report, one_entry = LEGACY_PURGE_REPORT, True
    elif report is not None and not one_entry and request.rel_url.raw_query_string:
        # Anything else would purge more than was asked (every provider's entries).
        return error_response(
            400,
            "parameter_invalid",
            "DELETE /admin/cache/<report or operation> takes only `?provider=<id>`; "
            "one entry is DELETE /admin/cache/<report>/data?<query>.",
        )
    provider = None
    if raw_provider is not None:
        if not PROVIDER_ID.fullmatch(raw_provider.strip(" \t")):
            return error_response(
                400, "parameter_invalid", "The provider must be a provider id (1-18 digits)."
            )
        provider = str(int(raw_provider.strip(" \t")))
    settings = state.settings
    if provider is not None and not settings.keyed_providers and provider in settings.upstream_of:
        provider = None  # the only provider served: keys do not name it, every entry is its
    body: dict[str, object]
    shared = True
    if report is None:
        removed, shared = await state.service.purge(provider=provider)
        body = {"purged": removed}
    else:
        operation = state.reports.get(report) or _by_id(state, report)
        if operation is None:
            return error_response(
                404, "not_found", f"No report or operation {report[:64]!r} is routed."
            )
        request[LOG]["report"] = operation.label
        if not one_entry:
            removed, shared = await state.service.purge(
                operation=operation.operation_id, provider=provider
            )
            body = {"purged": removed, "report": operation.label}
        else:
            raw = request.rel_url.raw_query_string
            parsed = with_undecodable(raw, operation.contract.parse(request.query))
            if isinstance(parsed, QueryErrors):
                return invalid_query(parsed)
            # Without a provider named: that question's entry for every provider served.
            named = [provider] if provider is not None or not settings.keyed_providers else []
            removed, shared = 0, True
            for each in named or [None, *sorted(settings.upstream_of)]:
                one, done = await state.service.purge(
                    state.service.key(dataclasses.replace(parsed, provider=each))
                )
                removed, shared = removed + one, shared and done
            body = {
                "purged": removed,
                "report": operation.label,
                "canonical_query": parsed.canonical_string(),
            }
    if provider is not None:
        body["provider"] = provider
    if state.link.embedded:
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    # Not shared: Redis is out of reach; only this worker dropped it (re-applied on its return).
    body["shared"] = shared
    return web.Response(
        body=orjson.dumps(body), status=200 if shared else 503, content_type="application/json"
    )


def _by_id(state: ProxyState, name: str) -> Operation | None:
    """A routed read by operation id (purging a whole operation that is not a report)."""
    return state.operations.get(name)


async def circuit(request: web.Request) -> web.Response:
    """`GET /admin/circuit` shows the circuits (one per upstream credential); `DELETE` closes
    them everywhere. `?upstream=<name>` picks one; without it the default upstream's circuit
    is the top level of the answer (as with a single credential), every upstream's is under
    `upstreams`, and `DELETE` closes all of them."""
    state = request.app[STATE]
    refused = _not_admin(request, "manage the circuit")
    if refused is not None:
        return refused
    guards = state.service.guards
    wanted = request.query.get("upstream")
    if wanted is not None and wanted not in guards:
        return error_response(
            404, "not_found", f"No upstream {wanted[:40]!r}; known: {', '.join(guards)}."
        )
    chosen = [guards[wanted]] if wanted is not None else list(guards.values())
    status = 200
    each: dict[str, dict[str, object]] = {}
    for guard in chosen:
        if request.method == "DELETE":
            closed = await guard.close_circuit()
            each[guard.name] = {"closed": closed, **await guard.describe()}
            if not state.link.embedded and not guard.told:
                each[guard.name]["shared"] = False
                status = 503  # closed in this worker only: Redis is out of reach
        else:
            each[guard.name] = await guard.describe()
    top = wanted if wanted is not None else state.service.guard.name
    body: dict[str, object] = dict(each.get(top) or next(iter(each.values())))
    if request.method == "DELETE" and wanted is None:
        body["closed"] = any(bool(one.get("closed")) for one in each.values())
    body["upstreams"] = each
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def admin_limited(state: ProxyState) -> web.Response | None:
    """429 when the admin key is over `PROXY_ADMIN_RATE_LIMIT` (a purge costs Redis a SCAN)."""
    rate = state.settings.admin_rate_limit
    if not state.link.embedded and not state.service.limiter.on_redis:
        return None  # off Redis a purge costs no SCAN; a limit starting full would refuse it
    decision = await state.service.limiter.hit("admin", rate)
    if decision.allowed or not state.service.limiter.on_redis:
        return None
    return error_response(
        429,
        "rate_limited",
        f"The admin key is over its rate of {rate}. Retry later.",
        headers={"Retry-After": decision.retry_after_header},
    )


async def protected_metrics(request: web.Request) -> web.Response:
    """`GET /metrics`, behind `PROXY_METRICS_KEY_SHA256` when it is set (client names are in it)."""
    state = request.app[STATE]
    wanted = state.settings.metrics_key_sha256
    if wanted is not None and not state.directory.matches(presented_key(request.headers), wanted):
        return error_response(
            401,
            "not_authenticated",
            "The metrics key is missing or wrong. Send it as 'Authorization: Bearer <key>'.",
            headers={"WWW-Authenticate": 'Bearer realm="teamup-proxy metrics"'},
        )
    return await metrics_handler(request)


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
    upstreams = {
        name: "circuit-open" if await guard.circuit_wait() > 0 else "ok"
        for name, guard in state.service.guards.items()
    }
    # `upstream`: the default credential's (as with one); `upstreams`: each one's.
    circuit = upstreams.get(state.service.guard.name, "ok")
    opened = any(value != "ok" for value in upstreams.values())
    overall = "degraded" if redis in ("down", "refusing-writes") or opened else "ok"
    checks: dict[str, object] = {"redis": redis, "upstream": circuit}
    body: dict[str, object] = {"status": overall, "checks": checks}
    if len(upstreams) > 1:  # several credentials: each one's circuit
        body["upstreams"] = upstreams
    if state.link.writes_refused is not None:
        body["reasons"] = {"redis": state.link.writes_refused}
    return web.json_response(body)
