"""Prometheus metrics: one registry per app, aggregated across workers in multiprocess mode."""

from __future__ import annotations

import bisect
import os

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from .logs import dropped_lines

__all__ = ["Metrics", "metrics_handler", "multiprocess_dir"]

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Seconds a miss waits in the fair queue: up to PROXY_UPSTREAM_QUEUE_TIMEOUT (5 s by default).
_WAITS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 30)
_SIZES = (1e3, 4e3, 16e3, 64e3, 256e3, 1e6, 4e6, 16e6)


def multiprocess_dir() -> str | None:
    """The directory prometheus-client shares between worker processes, when set."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Every metric the proxy exports (README lists them)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._request_children: dict[tuple[str, str, int, str, str, str], Counter] = {}
        self._seconds_children: dict[str, Histogram] = {}
        self._client_children: dict[tuple[str, str, str, str], Counter] = {}
        # Tallies since the last flush: per label set, and per route one count per bucket
        # (the last bucket +Inf) followed by the sum of seconds.
        self._pending_requests: dict[tuple[str, str, int, str, str, str], int] = {}
        self._pending_seconds: dict[str, list[float]] = {}
        self._pending_clients: dict[tuple[str, str, str, str], int] = {}
        r = self.registry
        self.requests = Counter(
            "teamup_proxy_requests_total",
            "Answered requests by route, report, status, cache outcome, upstream and provider",
            ["route", "report", "status", "cache", "upstream", "provider"],
            registry=r,
        )
        self.client_requests = Counter(
            "teamup_proxy_client_requests_total",
            "Authenticated report requests by client, report, upstream and provider",
            ["client", "report", "upstream", "provider"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "teamup_proxy_request_duration_seconds",
            "Time to answer, by route",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.upstream_requests = Counter(
            "teamup_proxy_upstream_requests_total",
            "Calls to TeamUp by report and status (or timeout / unreachable / …), upstream "
            "(credential) and provider",
            ["report", "status", "upstream", "provider"],
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "teamup_proxy_upstream_duration_seconds",
            "Latency of calls to TeamUp, by upstream (credential)",
            ["upstream"],
            buckets=_LATENCY,
            registry=r,
        )
        self.rejections = Counter(
            "teamup_proxy_ratelimit_rejections_total",
            "Requests refused or served stale by a limit, by client, kind "
            "(client, upstream_share, budget, circuit) and upstream (credential)",
            ["client", "kind", "upstream"],
            registry=r,
        )
        self.budget_remaining = Gauge(
            "teamup_proxy_upstream_budget_remaining",
            "Units of the upstream's (credential's) budget left at its last call",
            ["upstream"],
            registry=r,
            multiprocess_mode="mostrecent",
        )
        self.redis_errors = Counter(
            "teamup_proxy_redis_errors_total",
            "Redis calls that failed, by operation",
            ["op"],
            registry=r,
        )
        self.redis_fallback = Gauge(
            "teamup_proxy_redis_fallback",
            "1 while this process serves from in-process fallbacks because Redis is down",
            registry=r,
            multiprocess_mode="max",
        )
        self.redis_writes_refused = Gauge(
            "teamup_proxy_redis_writes_refused",
            "1 while Redis answers but refuses writes (maxmemory with noeviction, read-only "
            "replica): entries and limits live in this process meanwhile",
            registry=r,
            multiprocess_mode="max",
        )
        self.cache_entry_bytes = Histogram(
            "teamup_proxy_cache_entry_bytes",
            "Body size of stored cache entries (before compression)",
            buckets=_SIZES,
            registry=r,
        )
        self.writes = Counter(
            "teamup_proxy_writes_total",
            "Writes by client, operation and outcome (sent: the TeamUp status class, 2xx, 4xx, "
            "5xx; outcome_unknown; not_sent; replayed; refused: the proxy's own 4xx)",
            ["client", "operation", "outcome"],
            registry=r,
        )
        self.write_seconds = Histogram(
            "teamup_proxy_write_upstream_seconds",
            "Latency of writes sent to TeamUp",
            buckets=_LATENCY,
            registry=r,
        )
        self.client_write_timeouts = Counter(
            "teamup_proxy_client_write_timeouts_total",
            "Answers abandoned because the caller read nothing for PROXY_CLIENT_WRITE_TIMEOUT",
            registry=r,
        )
        self.client_write_refusals = Counter(
            "teamup_proxy_client_write_budget_refusals_total",
            "Large answers refused with 503 because the worker's PROXY_CLIENT_WRITE_BUFFER_BYTES "
            "stayed full for PROXY_CLIENT_WRITE_TIMEOUT",
            registry=r,
        )
        self.client_write_buffer = Gauge(
            "teamup_proxy_client_write_buffer_bytes",
            "Bytes of large answer bodies being written to callers (each distinct body once), "
            "against PROXY_CLIENT_WRITE_BUFFER_BYTES per worker",
            registry=r,
            multiprocess_mode="livesum",
        )

        self.log_lines_dropped = Counter(
            "teamup_proxy_log_lines_dropped_total",
            "Log lines dropped because stderr took nothing and the log queue was full",
            registry=r,
        )
        self._dropped_seen = 0

        self.queue_length = Gauge(
            "teamup_proxy_upstream_queue_length",
            "Misses waiting in the fair queue for a unit of an upstream's budget, by client",
            ["client", "upstream"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_wait = Histogram(
            "teamup_proxy_upstream_queue_wait_seconds",
            "Time a miss waited in the fair queue before its upstream call, by client",
            ["client", "upstream"],
            buckets=_WAITS,
            registry=r,
        )
        self.queue_timeouts = Counter(
            "teamup_proxy_upstream_queue_timeouts_total",
            "Misses the fair queue could not serve within PROXY_UPSTREAM_QUEUE_TIMEOUT, by client "
            "and when (upfront: the budget's wait was already too long; waited: the time ran out)",
            ["client", "when", "upstream"],
            registry=r,
        )
        self.queue_abandoned = Counter(
            "teamup_proxy_upstream_queue_abandoned_total",
            "Queued misses whose callers all left before their turn (no budget unit spent)",
            ["client", "upstream"],
            registry=r,
        )

    def count_request(
        self,
        route: str,
        report: str,
        status: int,
        cache: str,
        seconds: float,
        upstream: str = "none",
        provider: str = "none",
    ) -> None:
        """Count one answer, in this process's tallies until the next `flush`.

        Per request that is two dict updates instead of two locked metric updates (and, in
        multiprocess mode, two writes to shared memory); `flush` runs at least every second
        (see `create_app`) and before every render. `report` is one of the document's report
        names or "none": a bounded label; so are `upstream` and `provider` (the configured
        ones, or "none").
        """
        key = (route, report, status, cache, upstream, provider)
        pending = self._pending_requests
        pending[key] = pending.get(key, 0) + 1
        tally = self._pending_seconds.get(route)
        if tally is None:
            tally = self._pending_seconds[route] = [0.0] * (len(_LATENCY) + 2)
        tally[bisect.bisect_left(_LATENCY, seconds)] += 1
        tally[-1] += seconds

    def count_client(
        self, client: str, report: str, upstream: str = "none", provider: str = "none"
    ) -> None:
        """Count one authenticated report request of `client` (tallied until `flush`)."""
        pending = self._pending_clients
        key = (client, report, upstream, provider)
        pending[key] = pending.get(key, 0) + 1

    def flush(self) -> None:
        """Move the tallies into the Prometheus metrics (labelled children cached)."""
        pending, self._pending_requests = self._pending_requests, {}
        for key, count in pending.items():
            child = self._request_children.get(key)
            if child is None:
                route, report, status, cache, upstream, provider = key
                child = self.requests.labels(route, report, str(status), cache, upstream, provider)
                self._request_children[key] = child
            child.inc(count)
        seconds, self._pending_seconds = self._pending_seconds, {}
        for route, tally in seconds.items():
            histogram = self._seconds_children.get(route)
            if histogram is None:
                histogram = self._seconds_children[route] = self.request_seconds.labels(route)
            _observe_many(histogram, tally)
        clients, self._pending_clients = self._pending_clients, {}
        for labels, count in clients.items():
            counter = self._client_children.get(labels)
            if counter is None:
                counter = self.client_requests.labels(*labels)
                self._client_children[labels] = counter
            counter.inc(count)
        dropped = dropped_lines()  # counted per process: add what this registry has not seen
        if dropped > self._dropped_seen:
            self.log_lines_dropped.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped

    def render(self) -> bytes:
        """The exposition text: every worker's values in multiprocess mode, else this app's."""
        self.flush()
        if multiprocess_dir() is not None:
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
            return generate_latest(registry)
        return generate_latest(self.registry)


def _observe_many(histogram: Histogram, tally: list[float]) -> None:
    """Add a tally of observations (counts per bucket, then their sum) to a histogram child.

    prometheus-client has no public call for that; its children keep one value per bucket
    (`_buckets`, not cumulative) and `_sum`. Should that change, replay the observations.
    """
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if buckets is None or total is None or len(buckets) != len(tally) - 1:
        count = int(sum(tally[:-1]))
        for _ in range(count):
            histogram.observe(tally[-1] / count)
        return
    for index, observed in enumerate(tally[:-1]):
        if observed:
            buckets[index].inc(observed)
    total.inc(tally[-1])


METRICS = web.AppKey("metrics", Metrics)


async def metrics_handler(request: web.Request) -> web.Response:
    """`GET /metrics` in the Prometheus text format."""
    body = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
