"""Wiring: `create_app` builds every piece in a cleanup context; `observe` wraps every route."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, cast

import redis.asyncio as aioredis
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp.web_urldispatcher import UrlMappingMatchInfo

from ..backends import keys
from ..backends.bus import Bus
from ..backends.flight import RedisLease
from ..backends.generations import Generations
from ..backends.idempotency import IdempotencyStore
from ..backends.limiters import FallbackLimiter, MemoryLimiter, RedisLimiter, split
from ..backends.link import REDIS_ERRORS, AnyRedis, RedisLink, connect_bus, connect_redis
from ..backends.pipelining import AutoPipelineRedis
from ..backends.reservations import RedisReserver, ReservingLimiter
from ..backends.stores import FallbackCacheStore, MemoryCacheStore, RedisCacheStore
from ..core.bodies import BodyPool
from ..core.operations import API_PREFIX, Operations, Router, load_operations
from ..logs import ACCESS, ACCESS_MIDDLE
from ..metrics import METRICS, Metrics
from ..service import ReadService
from ..settings import Settings
from ..upstream.client import UpstreamClient
from ..upstream.guard import UpstreamGuard
from ..writes import WriteService
from .auth import ClientDirectory
from .errors import error_response
from .handlers import (
    LOG,
    REQUEST_ID,
    STATE,
    ProxyState,
    circuit,
    healthz,
    protected_metrics,
    purge,
    read,
    readyz,
)
from .hot import HotHits
from .openapi import openapi_context, openapi_handler
from .sending import PacedResponse, Sending
from .writes import expect_continue

__all__ = ["SETTINGS", "create_app"]

SETTINGS = web.AppKey("settings", Settings)
KEY_PREFIX = keys.PREFIX
# The L1 holds only hot entries for about a second: a few dozen MiB covers any hot set.
L1_BYTES = 32 * 1024 * 1024
# A caller's id is kept only when it cannot be read as a path, a URL or markup upstream.
_REQUEST_ID = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
# Every route, once: its path (as aiohttp's canonical form) and the metrics label. Every
# documented operation is behind the one `/api/v2/` resource (see `_Api`).
_ROUTES = {
    "/api/v2/{operation}": "read",
    "/admin/cache": "admin",
    "/admin/cache/{report}": "admin",
    "/admin/cache/{report}/{data:data}": "admin",
    "/admin/circuit": "admin",
    "/healthz": "health",
    "/readyz": "health",
    "/metrics": "metrics",
    "/openapi.json": "docs",
}

log = logging.getLogger("teamup_proxy")
access_log = logging.getLogger("teamup_proxy.access")


_ID_PREFIX = secrets.token_hex(6)
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    """A process-unique random prefix and a counter: unique, and cheaper than uuid4 per request."""
    return f"{_ID_PREFIX}{next(_id_counter):010x}"


@web.middleware
async def observe(
    request: web.Request, handler: Handler, route: str | None = None
) -> web.StreamResponse:
    """Request id, JSON errors for 404/405/500, one access-log line and the request metrics."""
    started = time.perf_counter()
    incoming = request.headers.get("X-Request-ID", "")
    request_id = incoming if incoming and _REQUEST_ID.match(incoming) else _new_request_id()
    request[REQUEST_ID] = request_id
    fields: dict[str, object] = {}
    request[LOG] = fields
    response: web.StreamResponse
    try:
        response = await handler(request)
    except asyncio.CancelledError:
        # The caller hung up (logged as 499, NGINX's "client closed request"); the cancel goes on.
        access_log.info(
            "request",
            extra={
                "request_id": request_id,
                "client": fields.get("client"),
                "upstream": fields.get("upstream"),
                "provider": fields.get("provider"),
                "method": request.method,
                "path": request.path,
                "report": fields.get("report"),
                "cache": "gone",
                "total_ms": round((time.perf_counter() - started) * 1000, 2),
                "status": 499,
            },
        )
        raise
    except web.HTTPMethodNotAllowed as exc:
        response = error_response(
            405,
            "method_not_allowed",
            f'Method "{request.method}" not allowed.',
            headers={"Allow": ", ".join(sorted(exc.allowed_methods))},
        )
    except web.HTTPNotFound:
        response = error_response(404, "not_found", "Not found.")
    except web.HTTPException as exc:
        response = error_response(exc.status, "http_error", exc.reason)
    except Exception:
        log.exception("unhandled error", extra={"request_id": request_id})
        response = error_response(500, "internal_error", "The proxy failed to answer.")
    response.headers["X-Request-ID"] = request_id
    response.headers["Server"] = "teamup-proxy"
    if type(response) is web.Response and request.method != "HEAD":
        # Every answer, not only reports (`/openapi.json` is 0.75 MB), is written with the
        # write timeout: a caller that reads nothing is cut off instead of held for good.
        response = _paced(request, response, request_id)
    elapsed = time.perf_counter() - started
    if route is None:
        resource = request.match_info.route.resource
        route = _ROUTES.get(resource.canonical, "other") if resource is not None else "other"
    elif route == "read":  # a report says so (its handler knows which operation it was)
        route = str(fields.get("route", "read"))
    report = str(fields.get("report", "none"))
    request.app[METRICS].count_request(
        route,
        report,
        response.status,
        str(fields.get("cache", "none")),
        elapsed,
        str(fields.get("upstream", "none")),
        str(fields.get("provider", "none")),
    )
    if route not in ("health", "metrics", "docs") and access_log.isEnabledFor(logging.INFO):
        total_ms = round(elapsed * 1000, 2)
        lane = ACCESS.lane()
        middle = fields.get(ACCESS_MIDDLE)
        if lane is not None and isinstance(middle, bytes):  # a hot hit: made once per question
            lane.write(ACCESS.hot_line(request_id, middle, total_ms, response.status))
        else:
            extra = {
                "request_id": request_id,
                "client": fields.get("client"),
                "upstream": fields.get("upstream"),
                "provider": fields.get("provider"),
                "method": request.method,
                "path": request.path,
                "report": fields.get("report"),
                "key": fields.get("key"),
                "cache": fields.get("cache"),
                "upstream_status": fields.get("upstream_status"),
                "upstream_ms": fields.get("upstream_ms"),
                "queued_ms": fields.get("queued_ms"),
                "total_ms": total_ms,
                "status": response.status,
            }
            if lane is not None:  # the same JSON line, without a LogRecord or a handler
                lane.write(ACCESS.line(extra))
            else:
                access_log.info("request", extra=extra)
    return response


def _paced(request: web.Request, response: web.Response, request_id: str) -> web.StreamResponse:
    """`response` as a `PacedResponse` (same status, headers and body), once the app is up."""
    state = request.app.get(STATE)
    body = response.body
    if state is None or not isinstance(body, bytes):
        return response
    return PacedResponse(
        request,
        status=response.status,
        body=body,
        headers=response.headers,
        sending=state.sending,
        request_id=request_id,
    )


def create_app(
    settings: Settings,
    *,
    redis_client: AnyRedis | None = None,
    upstream: UpstreamClient | None = None,
    clock: Callable[[], float] = time.time,
    metrics: Metrics | None = None,
    document: Operations | None = None,
) -> web.Application:
    """The proxy as an aiohttp app; Redis, stores and the upstream pool open in `cleanup_ctx`.

    `redis_client` overrides `PROXY_REDIS_URL` (tests pass fakeredis); `clock` is the wall
    clock used for freshness, so tests move time instead of sleeping; `document` replaces the
    shipped operation document (tests pass a small one).
    """
    app = web.Application(client_max_size=64 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = metrics or Metrics()

    async def resources(app: web.Application) -> AsyncIterator[None]:
        m = app[METRICS]
        client = redis_client
        if client is None and settings.redis_url is not None:
            client = connect_redis(
                settings.redis_url,
                timeout=settings.redis_timeout,
                max_connections=settings.redis_max_connections,
            )

        memory = MemoryCacheStore(
            settings.cache_memory_entries, clock=clock, max_bytes=settings.cache_memory_bytes
        )

        def on_change(up: bool) -> None:
            m.redis_fallback.set(0 if up else 1)
            if up:  # what was cached meanwhile may have missed a purge: Redis is the truth again
                memory.clear_now()

        def on_writes(refused: bool) -> None:
            m.redis_writes_refused.set(1 if refused else 0)
            if not refused:  # as after an outage: Redis is the truth again
                memory.clear_now()

        link = RedisLink(
            client,
            retry_interval=settings.redis_retry_interval,
            timeout=settings.redis_timeout,
            on_change=on_change,
            on_error=lambda op: m.redis_errors.labels(op).inc(),
            on_writes=on_writes,
        )
        # The hot path's commands (GET, the GCRA script) batch per loop turn on a single server.
        hot: AnyRedis | None = client
        if settings.redis_autopipeline and isinstance(client, aioredis.Redis):
            hot = cast(AnyRedis, AutoPipelineRedis(client))
        # Large bodies in use, one copy each; those being written within a per-worker budget.
        bodies = BodyPool(settings.client_write_buffer_bytes, m.client_write_buffer.set)
        sending = Sending(
            bodies, settings.client_write_timeout, m.client_write_timeouts, m.client_write_refusals
        )
        store = FallbackCacheStore(
            link, RedisCacheStore(hot, KEY_PREFIX, bodies) if hot is not None else None, memory
        )
        # While Redis is down every worker of every replica counts on its own: each gets the
        # rate and the burst divided by all of them (see FallbackLimiter), so an outage cannot
        # multiply traffic.
        replicas = settings.replicas_hint * settings.processes if client is not None else 1

        share = functools.partial(split, processes=replicas)

        # How long every process takes to notice that Redis is back (a health ping per interval).
        settle = 2 * settings.redis_retry_interval + settings.redis_timeout
        redis_limiter = RedisLimiter(hot, keys.LIMITER_PREFIX) if hot is not None else None
        limiter = FallbackLimiter(link, redis_limiter, MemoryLimiter(), share, settle=settle)
        client_limiter = ReservingLimiter(
            link,
            RedisReserver(hot, keys.LIMITER_PREFIX) if hot is not None else None,
            limiter,
            lifetime=settings.rate_limit_reservation,
        )
        budget_limiter = FallbackLimiter(link, redis_limiter, MemoryLimiter(), share, settle=settle)
        # One guard per credential: its own budget (Redis key per upstream name; the outage
        # share is split per budget), fair queue and circuit.
        guards = {
            each.name: UpstreamGuard(
                link,
                budget_limiter,
                each.budget,
                KEY_PREFIX,
                default_wait=settings.upstream_circuit_default,
                max_wait=settings.upstream_circuit_max,
                clock=clock,
                client=hot,
                queue_timeout=settings.upstream_queue_timeout,
                metrics=m,
                name=each.name,
            )
            for each in settings.upstream_list
        }
        guard = guards[settings.default_upstream.name]
        l1 = (
            MemoryCacheStore(4096, clock=clock, max_bytes=L1_BYTES)
            if settings.cache_l1_ttl > 0 and client is not None
            else None
        )
        leases = RedisLease(
            link,
            KEY_PREFIX,
            lease_ms=settings.lease_ms,
            wait_timeout=settings.lease_wait,
            client=hot,
        )
        up = upstream or UpstreamClient(settings)
        clients = {settings.default_upstream.name: up}
        for each in settings.upstream_list[1:]:
            clients[each.name] = UpstreamClient(settings, each)
        await asyncio.gather(*(one.start() for one in clients.values()))
        if client is not None:
            try:
                await client.ping()
            except REDIS_ERRORS as exc:
                link.failed(exc, "startup")
            link.start()  # pings every PROXY_REDIS_RETRY_INTERVAL from now on, traffic or not
        documented = document or load_operations()
        auth = settings.auth_endpoints_enabled
        operations = documented.routed(reports=settings.enabled_reports, auth=auth)
        # What the router knows: the routed reads and every documented write; `auth/*` only
        # when switched on.
        writes = documented.writes(auth=auth, reports=settings.enabled_reports)
        visible = documented.where(
            lambda op: op.operation_id in operations or op.operation_id in writes
        )
        generations = Generations(
            link, client, KEY_PREFIX, interval=settings.generation_check_interval
        )
        service = ReadService(
            settings,
            store=store,
            l1=l1,
            leases=leases,
            guard=guard,
            upstream=up,
            limiter=limiter,
            client_limiter=client_limiter,
            metrics=m,
            operations=operations,
            clock=clock,
            batched_writes=isinstance(hot, AutoPipelineRedis),
            generations=generations,
            guards=guards,
            upstreams=clients,
        )
        write_service = WriteService(
            settings,
            guard=guard,
            upstream=up,
            generations=generations,
            idempotency=IdempotencyStore(
                link,
                client,
                KEY_PREFIX,
                ttl=settings.idempotency_ttl,
                # An in-flight mark outlives the longest a write can take, then frees the key.
                flight_ttl=settings.upstream_queue_timeout
                + settings.upstream_timeout
                + settings.generation_check_interval
                + 5,
            ),
            metrics=m,
            operations=writes,
            lane=service.lane,
        )
        directory = ClientDirectory(settings.clients)
        state = ProxyState(
            settings=settings,
            directory=directory,
            link=link,
            service=service,
            operations=operations,
            router=Router(visible),
            sending=sending,
            reports=operations.reports(),
            writes=write_service,
        )
        state.hot = HotHits(settings, directory, service, state.queries, sending)
        bus = None
        if client is not None:
            bus = _events(settings, client, link, service, l1, state, (limiter, budget_limiter))
            service.bus = bus
            for each_guard in guards.values():
                each_guard.bus = bus

            async def before_up() -> None:
                await service.reapply_purges()
                wait = await limiter.plan_return()
                budget_limiter.switch_in(wait)
                # Every process, even one that never left Redis, switches at that moment.
                await bus.tell({"kind": "limits-switch", "in": wait})

            link.before_up = before_up
            bus.start()
            if link.up:  # the L1 is on only while subscribed: usually a millisecond from now
                await bus.wait_live(max(1.0, settings.redis_timeout * 10))
        app[STATE] = state
        state.ready = True
        log.info(
            "proxy ready",
            extra={"event": "ready", "redis": link.status, "upstream": settings.upstream_url},
        )
        flusher = asyncio.ensure_future(_flush_metrics_every_second(m))
        try:
            yield
        finally:
            flusher.cancel()
            m.flush()
            state.ready = False
            await write_service.close()
            await service.close()
            await client_limiter.close()
            for one in clients.values():
                await one.close()
            if bus is not None:
                await bus.close()
            await link.stop()
            if redis_client is None:
                await link.close()
                # A client made on an explicit pool leaves that pool open on `aclose`.
                pool = getattr(client, "connection_pool", None)
                if pool is not None:
                    await pool.disconnect()

    app.cleanup_ctx.append(resources)
    app.cleanup_ctx.append(openapi_context)  # after `resources`: it needs the operations
    # One resource for every operation: the handler's router (built from the document) finds
    # the operation and validates the path parameters; TeamUp's URL comes from the document,
    # never from the caller's path. One route keeps aiohttp's lookup as short as it was.
    api = _Api("/api/v2/{operation}")
    app.router.register_resource(api)
    api.add_route(hdrs.METH_ANY, observed(read, "read"), expect_handler=expect_continue)
    for path, label in _ROUTES.items():
        if label == "read":
            continue
        if path == "/admin/circuit":
            app.router.add_get(path, observed(circuit, label))
            app.router.add_delete(path, observed(circuit, label))
        elif label == "admin":
            app.router.add_delete(path, observed(purge, label))
    app.router.add_get("/healthz", observed(healthz, "health"))
    app.router.add_get("/readyz", observed(readyz, "health"))
    app.router.add_get("/metrics", observed(protected_metrics, "metrics"))
    app.router.add_get("/openapi.json", observed(openapi_handler, "docs"))
    _add_fallback_routes(app)
    return app


def _events(
    settings: Settings,
    client: AnyRedis,
    link: RedisLink,
    service: ReadService,
    l1: MemoryCacheStore | None,
    state: ProxyState,
    limiters: tuple[FallbackLimiter, ...],
) -> Bus:
    """The events channel, wired: purges, the circuit and writes-refused from every process;
    the L1 (and the hot memo) used only while subscribed, dropped whole when it is lost."""
    service.l1 = None
    lost_once = False

    def on_event(event: dict[str, object]) -> None:
        kind = event.get("kind")
        if kind == "purge":
            service.apply(event)
        elif kind in ("circuit-open", "circuit-closed"):
            for guard in service.guards.values():
                guard.apply(event)  # each takes only its own upstream's
        elif kind == "limits-switch":
            wait = event.get("in")
            if isinstance(wait, int | float) and 0 <= wait <= 60:
                for each in limiters:
                    each.switch_in(float(wait))
        elif kind == "writes-refused":
            reason = event.get("reason")
            link.refuse_writes(str(reason)[:64], "told", told=True)

    bus_client = connect_bus(client, settings.redis_url, timeout=settings.redis_timeout)
    server: list[object] = [None]  # the run_id of the Redis server subscribed to

    async def learn_server() -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            server[0] = (await bus_client.info("server")).get("run_id")

    async def confirm_lost() -> None:
        """The subscription broke: off Redis at once if Redis is gone or is another server
        now (restarted: its buckets are lost); a mere lost connection changes nothing."""
        try:
            async with asyncio.timeout(max(0.5, settings.redis_timeout * 5)):
                now = (await bus_client.info("server")).get("run_id")
            if server[0] is not None and now == server[0]:
                return
            reason = "redis restarted"
        except REDIS_ERRORS as exc:
            reason = type(exc).__name__
        link.failed(ConnectionError(f"events channel lost: {reason}"), "bus")

    def on_lost() -> None:
        nonlocal lost_once
        lost_once = True
        # The subscription breaks at once when Redis dies: every process leaves it together
        # (the limits go to their shares), not each at its next failed call or ping.
        _spawn(confirm_lost())
        service.l1 = None
        if l1 is not None:
            l1.clear_now()
        if state.hot is not None:
            state.hot.forget()

    def on_live() -> None:
        _spawn(learn_server())
        if l1 is not None:
            l1.clear_now()
            service.l1 = l1
        if lost_once:  # events may have been missed meanwhile
            for guard in service.guards.values():
                guard.recheck()

    bus = Bus(
        bus_client,
        KEY_PREFIX + "events",
        on_event=on_event,
        on_lost=on_lost,
        on_live=on_live,
        retry=min(0.1, settings.redis_retry_interval),
    )

    def on_refused(reason: str) -> None:
        event: dict[str, object] = {"kind": "writes-refused", "reason": reason}
        _spawn(_tell_quietly(bus, event))

    link.on_refused = on_refused
    return bus


_background: set[asyncio.Future[None]] = set()


def _spawn(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` in the background, keeping a reference until it is done."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


async def _tell_quietly(bus: Bus, event: dict[str, object]) -> None:
    with contextlib.suppress(*REDIS_ERRORS):
        await bus.tell(event)


async def _flush_metrics_every_second(metrics: Metrics) -> None:
    """Per-request counts are tallied in process; a scrape sees them at most a second late."""
    while True:
        await asyncio.sleep(1.0)
        metrics.flush()


def observed(handler: Handler, route: str) -> Handler:
    """`handler` inside `observe`, with its metrics label. Not a middleware: aiohttp's
    middleware chain (and the `current_app` fix-up it adds) costs about 5 µs per request, a
    sixth of a hot hit."""
    return functools.partial(observe, handler=handler, route=route)


def _add_fallback_routes(app: web.Application) -> None:
    """What aiohttp would answer with its own 404/405 pages, as routes `observe` wraps: any
    other method on a known path is a 405, any other path a 404 (both in TeamUp's shape)."""
    for resource in list(app.router.resources()):
        allowed = {route.method for route in resource} - {hdrs.METH_ANY}
        if not allowed:
            continue

        async def not_allowed(request: web.Request, allowed: set[str] = allowed) -> web.Response:
            raise web.HTTPMethodNotAllowed(request.method, allowed)

        app.router.add_route(hdrs.METH_ANY, resource.canonical, observed(not_allowed, "other"))

    async def not_found(request: web.Request) -> web.Response:
        raise web.HTTPNotFound()

    anything = _Anything("/{path}")
    app.router.register_resource(anything)
    route = anything.add_route(hdrs.METH_ANY, observed(not_found, "other"))
    # A target with no path at all (`CONNECT host:443`) is never looked up among the
    # resources; the router asks its "matched sub-app" resources first, for every request.
    first = getattr(app.router, "_matched_sub_app_resources", None)
    if isinstance(first, list):
        first.append(_NoPath(route))
    else:  # pragma: no cover - another aiohttp: a middleware does it, at its cost
        app.middlewares.append(functools.partial(_no_path_middleware, route=route))


class _Api(web.DynamicResource):
    """Every path under `/api/v2/` (the doubled-slash form too); the handler routes it."""

    def _match(self, path: str) -> dict[str, str] | None:
        return {"operation": path} if path.startswith(API_PREFIX) else None


class _Anything(web.DynamicResource):
    """Every path, even one that is not one (`OPTIONS *`), so that what no route takes still
    gets `observe`'s 404 in TeamUp's shape."""

    def _match(self, path: str) -> dict[str, str] | None:
        return {"path": path}


class _NoPath:
    """Resolves only targets without a path (about 0.2 µs for every other request)."""

    def __init__(self, route: web.ResourceRoute) -> None:
        self.route = route

    async def resolve(self, request: web.Request) -> tuple[UrlMappingMatchInfo | None, set[str]]:
        if request.rel_url.path_safe:
            return None, set()
        return UrlMappingMatchInfo({"path": ""}, self.route), {hdrs.METH_ANY}


@web.middleware
async def _no_path_middleware(
    request: web.Request, handler: Handler, route: web.ResourceRoute
) -> web.StreamResponse:
    if not request.rel_url.path_safe:
        return await route.handler(request)
    return await handler(request)
