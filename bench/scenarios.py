"""The scenarios; each runs against one target (ours or NGINX) and returns flat numbers."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import statistics
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import redis
import yarl

from .procs import (
    REPORT_PATH,
    Ceiling,
    Mock,
    Nginx,
    Ours,
    Redis,
    Varnish,
    cpu_seconds,
    http_get,
    rss_bytes,
)
from .questions import Replay, build_replay, canonical_key
from .site import HOT_LIST, HOT_RETRIEVE, SiteReplay, Visit, build_site, site_key

__all__ = ["HOT_QUERY", "SCENARIOS", "Context", "Metrics", "Target", "replay_site"]

Metrics = dict[str, float]
T = TypeVar("T")

HOT_QUERY = "format=json&limit=10"  # a ~4 KB JSON answer
_L1_TTL = 1.0  # PROXY_CACHE_L1_TTL's default: how long a worker may answer from its own memory
_NEVER = datetime(2030, 1, 1, tzinfo=UTC)


@dataclass
class Target:
    """One server under test, as the scenarios see it."""

    name: str
    server: Ours | Nginx | Varnish | Ceiling
    redis: Redis
    headers: dict[str, str]

    @property
    def base(self) -> str:
        return self.server.base

    def url(self, query: str) -> str:
        return f"{self.base}{REPORT_PATH}?{query}"

    def cpu_pids(self) -> list[int]:
        """Every process whose CPU a request costs (ours: supervisor, workers and Redis)."""
        pids = self.server.server_pids()
        return [*pids, self.redis.pid] if self.ours else pids

    @property
    def ours(self) -> bool:
        """teamup-proxy (with or without its access log), which has Redis behind it."""
        return isinstance(self.server, Ours)

    def make_cold(self) -> None:
        """An empty cache: ours flushes Redis and outwaits the in-process L1, NGINX restarts on
        a new cache directory."""
        if isinstance(self.server, Nginx):
            self.server.restart_cold()
            return
        redis.Redis(port=self.redis.port).flushdb()
        time.sleep(_L1_TTL + 0.25)

    def is_hit(self, headers: Mapping[str, str]) -> bool:
        if self.ours:
            return "hit" in headers.get("Cache-Status", "")
        if isinstance(self.server, Ceiling):
            return True  # it has nothing else to answer with
        return headers.get("X-Cache-Status", "") == "HIT"


@dataclass
class Context:
    """What every scenario may use: the mock, the knobs and a source of never-asked queries."""

    mock: Mock
    workdir: Path
    duration: float
    connections: int
    threads: int
    burst: int
    miss_requests: int
    miss_concurrency: int
    mix_requests: int
    mix_concurrency: int
    seed: int
    site_visits: int = 3000
    site_concurrency: int = 32
    _nonce: itertools.count[int] = field(default_factory=itertools.count)
    _replay: Replay | None = None
    _site: SiteReplay | None = None

    def fresh_query(self, base: str) -> str:
        """`base` plus a filter no request has used yet (a bound past all the data: same rows)."""
        moment = _NEVER + timedelta(seconds=next(self._nonce))
        return f"{base}&created_at_lte={moment.strftime('%Y-%m-%dT%H:%M:%SZ')}"

    def replay(self) -> Replay:
        if self._replay is None:
            self._replay = build_replay(self.mix_requests, self.seed, self.mock.seed)
        return self._replay

    def site(self) -> SiteReplay:
        if self._site is None:
            self._site = build_site(self.site_visits, self.seed)
        return self._site


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not everywhere
        return asyncio.run(coro)
    return uvloop.run(coro)


def _percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


# --- 1. hot hit ---------------------------------------------------------------------------


def hot_hit(ctx: Context, target: Target) -> Metrics:
    """wrk against one cached query: throughput, latency, CPU per request, RSS per worker."""
    return _wrk_hit(ctx, target, target.url(HOT_QUERY))


def _wrk_hit(ctx: Context, target: Target, url: str) -> Metrics:
    """wrk against one URL already in the target's cache."""
    status, headers, body = http_get(url, target.headers)
    status, headers, body = http_get(url, target.headers)
    if status != 200 or not target.is_hit(headers):
        raise RuntimeError(f"{target.name}: the hot query is not a cache hit ({status} {headers})")
    workers = target.server.worker_pids()
    pids = target.cpu_pids()
    script = Path(__file__).with_name("wrk_report.lua")
    argv = [shutil.which("wrk") or "wrk", f"-t{ctx.threads}", f"-c{ctx.connections}"]
    argv += [f"-d{ctx.duration:g}s", "--timeout", "5s", "-s", str(script)]
    for name, value in target.headers.items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    rss = dict.fromkeys(workers, 0)
    commands_before = _redis_commands(target) if target.ours else 0
    cpu_before = cpu_seconds(pids)
    redis_before = cpu_seconds([target.redis.pid])
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        while proc.poll() is None:
            for pid in workers:
                rss[pid] = max(rss[pid], rss_bytes(pid))
            time.sleep(0.1)
        out, err = proc.communicate()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    cpu = cpu_seconds(pids) - cpu_before
    redis_cpu = cpu_seconds([target.redis.pid]) - redis_before
    commands = (_redis_commands(target) - commands_before) if target.ours else 0
    report = next(
        (line for line in out.decode().splitlines() if line.startswith("BENCH_WRK_JSON ")), None
    )
    if proc.returncode != 0 or report is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-500:]}")
    wrk = json.loads(report.removeprefix("BENCH_WRK_JSON "))
    requests = max(1, wrk["requests"])
    errors = sum(wrk[k] for k in ("connect_errors", "read_errors", "write_errors", "timeouts"))
    return {
        "req_per_s": wrk["requests"] / (wrk["duration_us"] / 1e6),
        "p50_ms": wrk["p50_us"] / 1000,
        "p90_ms": wrk["p90_us"] / 1000,
        "p99_ms": wrk["p99_us"] / 1000,
        "cpu_us_per_req": cpu / requests * 1e6,
        "cpu_us_per_req_redis": (redis_cpu / requests * 1e6) if target.ours else 0.0,
        "redis_commands_per_1000": commands / requests * 1000,
        "rss_mb_per_worker": max(rss.values(), default=0) / 2**20,
        "workers": len(workers),
        "requests": wrk["requests"],
        "errors": errors + wrk["status_errors"],
        "body_bytes": len(body),
    }


def _redis_commands(target: Target) -> int:
    """Commands Redis has run so far (`INFO commandstats`, all of them, this call's excepted)."""
    stats = redis.Redis(port=target.redis.port).info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info") - 1


# --- 2. cold collapse ---------------------------------------------------------------------


async def _burst(host: str, port: int, request: bytes, count: int) -> list[tuple[int, float]]:
    """Open `count` connections, then send one request on each at once: (status, seconds)."""
    conns = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(count)))
    await asyncio.sleep(0.3)  # let the server accept them all before the clock starts

    async def answer(reader: asyncio.StreamReader, started: float) -> tuple[int, float]:
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = None
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if length is None:
            await reader.read()  # Connection: close, so the body ends at EOF
        else:
            await reader.readexactly(length)
        return status, time.perf_counter() - started

    started = time.perf_counter()
    for _, writer in conns:
        writer.write(request)
    try:
        return await asyncio.gather(*(answer(reader, started) for reader, _ in conns))
    finally:
        for _, writer in conns:
            writer.close()


def cold_collapse(ctx: Context, target: Target) -> Metrics:
    """`burst` identical requests on an empty cache: upstream calls, time to the last answer."""
    target.make_cold()
    ctx.mock.reset()
    query = ctx.fresh_query("format=json&limit=50")
    headers = "".join(f"{name}: {value}\r\n" for name, value in target.headers.items())
    request = (
        f"GET {REPORT_PATH}?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n{headers}"
        "Connection: close\r\n\r\n"
    ).encode()
    results = _run(_burst("127.0.0.1", target.server.port, request, ctx.burst))
    time.sleep(0.3)
    times = [seconds for _, seconds in results]
    last = max(times) * 1000
    return {
        "upstream_calls": ctx.mock.calls(),
        "last_ms": last,
        "last_minus_upstream_ms": last - ctx.mock.latency * 1000,
        "first_ms": min(times) * 1000,
        "p50_ms": statistics.median(times) * 1000,
        "non_200": sum(1 for status, _ in results if status != 200),
    }


# --- 3. miss overhead ---------------------------------------------------------------------


async def _timed_gets(
    base: str, headers: Mapping[str, str], queries: Sequence[str], concurrency: int
) -> tuple[list[float], int]:
    """GET every query at `concurrency`, after warming the connections: (seconds each, errors)."""
    times: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers=dict(headers)) as session:

        async def get(query: str) -> float | None:
            url = yarl.URL(f"{base}{REPORT_PATH}?{query}", encoded=True)
            started = time.perf_counter()
            async with session.get(url) as response:
                await response.read()
                ok = response.status == 200
            return time.perf_counter() - started if ok else None

        warm, timed = queries[:concurrency], queries[concurrency:]
        await asyncio.gather(*(get(q) for q in warm))
        pending = iter(timed)

        async def worker() -> None:
            nonlocal errors
            for query in pending:
                try:
                    seconds = await get(query)
                except aiohttp.ClientError:
                    seconds = None
                if seconds is None:
                    errors += 1
                else:
                    times.append(seconds)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return times, errors


def miss_overhead(ctx: Context, target: Target) -> Metrics:
    """Distinct cold queries through the proxy, minus the same kind sent to the mock directly."""
    count = ctx.miss_requests + ctx.miss_concurrency
    shape = "format=json&limit=20"
    direct_queries = [ctx.fresh_query(shape) for _ in range(count)]
    proxy_queries = [ctx.fresh_query(shape) for _ in range(count)]
    token = {"Authorization": f"Token {ctx.mock.token}"}
    direct, direct_errors = _run(
        _timed_gets(ctx.mock.base, token, direct_queries, ctx.miss_concurrency)
    )
    proxied, proxy_errors = _run(
        _timed_gets(target.base, target.headers, proxy_queries, ctx.miss_concurrency)
    )
    if not direct or not proxied:
        raise RuntimeError(f"{target.name}: every miss request failed")
    ms = 1000.0
    return {
        "proxy_p50_ms": _percentile(proxied, 50) * ms,
        "proxy_p99_ms": _percentile(proxied, 99) * ms,
        "direct_p50_ms": _percentile(direct, 50) * ms,
        "direct_p99_ms": _percentile(direct, 99) * ms,
        "overhead_p50_ms": (_percentile(proxied, 50) - _percentile(direct, 50)) * ms,
        "overhead_p99_ms": (_percentile(proxied, 99) - _percentile(direct, 99)) * ms,
        "errors": proxy_errors + direct_errors,
        "requests": len(proxied) + proxy_errors,
    }


# --- 4. realistic mix ---------------------------------------------------------------------


@dataclass
class _MixTally:
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    bad_spellings: set[str] = field(default_factory=set)


async def _replay(
    base: str, headers: Mapping[str, str], queries: Sequence[str], concurrency: int
) -> _MixTally:
    tally = _MixTally()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    pending = iter(queries)
    async with aiohttp.ClientSession(
        connector=connector, headers=dict(headers), timeout=timeout
    ) as session:

        async def worker() -> None:
            for query in pending:
                # Another report's question is a whole target; customer_credits' a query string.
                target = query if query.startswith("/") else f"{REPORT_PATH}?{query}"
                url = yarl.URL(f"{base}{target}", encoded=True)
                try:
                    async with session.get(url) as response:
                        await response.read()
                        status = response.status
                except (aiohttp.ClientError, TimeoutError):
                    tally.failures += 1
                    continue
                tally.statuses[status] += 1
                if status != 200:
                    tally.bad_spellings.add(query)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def realistic_mix(ctx: Context, target: Target) -> Metrics:
    """A seeded Zipf replay of many spellings of ~1,000 questions: upstream calls per 1,000."""
    replay = ctx.replay()
    target.make_cold()
    ctx.mock.reset()
    started = time.perf_counter()
    tally = _run(_replay(target.base, target.headers, replay.query_strings, ctx.mix_concurrency))
    wall = time.perf_counter() - started
    time.sleep(0.3)
    calls = ctx.mock.calls()
    total = len(replay.query_strings)
    errors = tally.failures + sum(n for status, n in tally.statuses.items() if status != 200)
    # A 4xx from upstream is not cached (proxy_cache_valid 200), so each one was a call of its
    # own; keeping one call per distinct failing spelling shows what a cache of them would do.
    refetched = errors - tally.failures - len(tally.bad_spellings)
    ideal = replay.distinct_keys if target.name == "ours" else replay.distinct_spellings
    return {
        "requests": total,
        "upstream_calls": calls,
        "upstream_per_1000": calls / total * 1000,
        "upstream_per_1000_without_refetched_errors": (calls - refetched) / total * 1000,
        "ideal_per_1000": ideal / total * 1000,
        "errors": errors,
        "status_4xx": sum(n for s, n in tally.statuses.items() if 400 <= s < 500),
        "status_5xx": sum(n for s, n in tally.statuses.items() if s >= 500),
        "client_failures": tally.failures,
        "req_per_s": total / wall,
    }


# --- 5. footprint -------------------------------------------------------------------------


def footprint(ctx: Context, target: Target) -> Metrics:
    """Bytes one cached 100-row page costs: ours in Redis (`MEMORY USAGE`), NGINX on disk."""
    out: Metrics = {}
    client = redis.Redis(port=target.redis.port)
    for label, shape in (("json", "format=json&limit=100"), ("csv", "limit=100")):
        query = ctx.fresh_query(shape)
        status, _, body = http_get(target.url(query), target.headers)
        if status != 200:
            raise RuntimeError(f"{target.name}: footprint request answered {status}")
        time.sleep(0.1)  # NGINX renames its cache file into place after the last byte
        out[f"{label}_body_bytes"] = len(body)
        if isinstance(target.server, Nginx):
            stored = target.server.cache_file_size(f"{REPORT_PATH}?{query}")
            out[f"{label}_stored_bytes"] = stored
            out[f"{label}_entry_bytes"] = stored
        else:
            key = f"teamup-proxy:c:{{{canonical_key(query)}}}"
            usage = client.memory_usage(key, samples=0)
            if usage is None:
                raise RuntimeError(f"ours: no Redis entry {key} after a miss")
            out[f"{label}_stored_bytes"] = float(client.strlen(key))
            out[f"{label}_entry_bytes"] = float(usage)
    return out


# --- 6. website mix ------------------------------------------------------------------------


@dataclass
class _SiteTally:
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    leaked: int = 0  # `next` links that pointed anywhere but the server itself
    followed: int = 0
    sent: list[str] = field(default_factory=list)
    bad: set[str] = field(default_factory=set)


async def replay_site(
    base: str, headers: Mapping[str, str], visits: Sequence[Visit], concurrency: int
) -> _SiteTally:
    """Every visit: its first request, then up to `follow` `next` links, as a browser would."""
    tally = _SiteTally()
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    pending = iter(visits)
    async with aiohttp.ClientSession(
        connector=connector, headers=dict(headers), timeout=timeout
    ) as session:

        async def worker() -> None:
            for visit in pending:
                target, left = visit.target, visit.follow
                while True:
                    url = yarl.URL(f"{base}{target}", encoded=True)
                    try:
                        async with session.get(url) as response:
                            body = await response.read()
                            status = response.status
                    except (aiohttp.ClientError, TimeoutError):
                        tally.failures += 1
                        break
                    tally.sent.append(target)
                    tally.statuses[status] += 1
                    if status != 200:
                        tally.bad.add(target)
                        break
                    if left == 0:
                        break
                    link = json.loads(body).get("next")
                    if not isinstance(link, str):
                        break  # the last page
                    if link.startswith(base + "/"):
                        link = link[len(base) :]
                    if not link.startswith("/"):
                        tally.leaked += 1  # a browser would now call TeamUp itself
                        break
                    target, left = link, left - 1
                    tally.followed += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tally


def website_mix(ctx: Context, target: Target) -> Metrics:
    """A seeded website load over events lists (following `next`) and retrieves by id."""
    site = ctx.site()
    target.make_cold()
    ctx.mock.reset()
    started = time.perf_counter()
    tally = _run(replay_site(target.base, target.headers, site.visits, ctx.site_concurrency))
    wall = time.perf_counter() - started
    time.sleep(0.3)
    calls = ctx.mock.calls()
    total = max(1, len(tally.sent))
    ideal = len({site_key(t) for t in tally.sent}) if target.ours else len(set(tally.sent))
    errors = tally.failures + sum(n for status, n in tally.statuses.items() if status != 200)
    return {
        "requests": len(tally.sent),
        "visits": len(site.visits),
        "followed_next": tally.followed,
        "leaked_links": tally.leaked,
        "upstream_calls": calls,
        "upstream_per_1000": calls / total * 1000,
        "ideal_per_1000": ideal / total * 1000,
        "distinct_targets": len(set(tally.sent)),
        "errors": errors,
        "status_4xx": sum(n for s, n in tally.statuses.items() if 400 <= s < 500),
        "status_5xx": sum(n for s, n in tally.statuses.items() if s >= 500),
        "client_failures": tally.failures,
        "req_per_s": len(tally.sent) / wall,
    }


# --- 7. hot reads -------------------------------------------------------------------------


_HOT_READ_REPEATS = 3
_HOT_READ_METRICS = (
    "req_per_s",
    "p50_ms",
    "p99_ms",
    "cpu_us_per_req",
    "redis_commands_per_1000",
    "body_bytes",
    "errors",
)


def hot_reads(ctx: Context, target: Target) -> Metrics:
    """wrk on a cached events list page and a cached event (ours: and the report's hot query, in
    the same run, as the yardstick), each `_HOT_READ_REPEATS` times in rotating order: medians."""
    reads = [("list", HOT_LIST), ("retrieve", HOT_RETRIEVE)]
    if target.ours:
        reads.insert(0, ("report", f"{REPORT_PATH}?{HOT_QUERY}"))
    runs: dict[str, list[Metrics]] = {label: [] for label, _ in reads}
    for repeat in range(_HOT_READ_REPEATS):
        # Rotated, so that a neighbour's load on a shared machine falls on each read alike.
        for label, path in reads[repeat % len(reads) :] + reads[: repeat % len(reads)]:
            runs[label].append(_wrk_hit(ctx, target, f"{target.base}{path}"))
    return {
        f"{label}_{name}": statistics.median(run[name] for run in done)
        for label, done in runs.items()
        for name in _HOT_READ_METRICS
    }


SCENARIOS: dict[str, Callable[[Context, Target], Metrics]] = {
    "hot": hot_hit,
    "collapse": cold_collapse,
    "miss": miss_overhead,
    "mix": realistic_mix,
    "footprint": footprint,
    "site": website_mix,
    "hotread": hot_reads,
}
