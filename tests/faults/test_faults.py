"""Faults against real processes: `redis-server`, the mock TeamUp and `serve --workers 2`.

A bounded load (several clients, hot and cold queries, a fresh connection per request) runs
while one fault is switched on and off again. For every fault: no 200 differs from what the mock
answers for the same canonical query, no request outlives the timeouts, every other answer is
a clean JSON error with a sensible status, upstream calls stay inside the budget, and the proxy
recovers by itself. Each run's numbers go to `bench/out/faults.json` (and `faults.md`), which
`docs/reliability.md` quotes. The last tests drain the proxy with SIGTERM and then search every
byte it wrote for a credential.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import random
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from proxy.backends.keys import cache_key
from proxy.core.gcra import parse_rate
from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY, REPORT, TOKEN, auth
from proxy.testing.faults import (
    ERROR_STATUSES,
    MockProcess,
    Outcome,
    Truth,
    canonical,
    check_error_body,
    redis_dump,
    run_load,
    stats,
    worker_pids,
)
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

UPSTREAM_TIMEOUT = 1.0
FLIGHT_WAIT = 1.5
QUEUE_TIMEOUT = 0.5  # a miss may wait this long in the fair queue for a budget unit
BUDGET = parse_rate("80/second")
# The whole suite runs one proxy with these; short timeouts keep every fault cheap to watch.
PROXY_SETTINGS: dict[str, Any] = {
    "upstream_timeout": UPSTREAM_TIMEOUT,
    "upstream_queue_timeout": QUEUE_TIMEOUT,
    "redis_retry_interval": 0.2,
    "cache_ttl": 1,
    "cache_stale_ttl": 300,
    "upstream_rate_limit": str(BUDGET),
    "upstream_circuit_default": 2,
    "shutdown_timeout": 10,
}
LATENCY_BOUND = QUEUE_TIMEOUT + UPSTREAM_TIMEOUT + 1.0
CLIENTS = [auth(KEY), {"X-API-Key": OTHER_KEY}]
OUT = Path(__file__).resolve().parents[2] / "bench" / "out"
SECRETS = {
    "upstream token": TOKEN,
    "billing key": KEY,
    "crm key": OTHER_KEY,
    "admin key": ADMIN_KEY,
}

# Groups of spellings of one canonical question each; the load picks a group, then a spelling.
HOT: list[list[str]] = [
    ["format=json&limit=5", "limit=005&format=JSON", "format=json&limit=5&offset=0"],
    [
        "format=json&sort=-amount,created_at&limit=8",
        "sort=-amount&sort=created_at&format=json&limit=8",
        "sort[]=-AMOUNT&sort[]=created_at&limit=08&format=json",
    ],
    ["limit=10", "limit=10&format=csv", "format=CSV&limit=10&offset=0"],
    [
        "format=json&columns=customer.name,amount&created_at_gte=2024-01-01T00:00:00Z&limit=20",
        "columns=customer.name&columns=amount&format=json&limit=20"
        "&created_at_gte=2024-01-01T01:00:00%2B01:00",
    ],
    [
        "format=json&created_at_lte=2023-06-30T23:59:59Z&sort=memo&limit=15",
        "created_at_lte=2023-07-01T01:59:59%2B02:00&sort=MEMO&format=json&limit=15",
    ],
    ["format=json&page=3&page_size=7", "page_size=7&page=03&format=json"],
    ["format=json&id_gt=2500&limit=30", "id_gt=02500&limit=30&format=json"],
    ["created_at_gte=2023-03-01T00:00:00Z&limit=25&sort=-balance", "sort=-balance&limit=25"
     "&created_at_gte=2023-03-01T00:00:00.000Z"],
]  # fmt: skip


def cold_query(rng: random.Random) -> str:
    """A question nobody asked before (with overwhelming likelihood): always a cache miss."""
    return (
        f"format=json&limit={rng.randint(1, 9)}&offset={rng.randrange(3000)}"
        f"&id_gt={rng.randrange(2000)}"
    )


def pick(rng: random.Random) -> str:
    """Three in four requests ask a hot question (cached, soon stale), one in four a cold one."""
    if rng.random() < 0.25:
        return cold_query(rng)
    return rng.choice(rng.choice(HOT))


@dataclass
class Stack:
    """The processes of the suite and what it has seen so far."""

    redis: RedisServer
    mock: MockProcess
    proxy: ProxyProcess
    truth: Truth
    seen: list[bytes] = field(default_factory=list)
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    rng: random.Random = field(default_factory=lambda: random.Random(20261125))

    def keep(self, outcomes: list[Outcome]) -> None:
        """Every response byte goes into the secrets check at the end."""
        for outcome in outcomes:
            self.seen.append(outcome.body)
            self.seen.append(repr(sorted(outcome.headers.items())).encode())


def write_report(records: dict[str, dict[str, Any]]) -> None:
    """`bench/out/faults.json` and a Markdown table of it, for docs/reliability.md."""
    if not records:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    document = {
        "generated": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": ".venv/bin/pytest tests/faults -q",
        "settings": {**PROXY_SETTINGS, "workers": 2, "load": "8 callers, ~150 req/s"},
        "faults": records,
    }
    (OUT / "faults.json").write_text(json.dumps(document, indent=2) + "\n")
    lines = [
        "| fault | requests | 200 (of which stale) | errors by status | upstream calls (budget) "
        "| max latency s | recovered after s |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, r in records.items():
        errors = ", ".join(f"{k}: {v}" for k, v in r["by_status"].items() if k != "200") or "-"
        recovered = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.2f}"
        lines.append(
            f"| {name} | {r['sent']} | {r['by_status'].get('200', 0)} ({r['stale_200']}) "
            f"| {errors} | {r['upstream_calls']} ({r['budget_bound']}) | {r['max_latency_s']:.2f} "
            f"| {recovered} |"
        )
    (OUT / "faults.md").write_text("\n".join(lines) + "\n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stack() -> AsyncIterator[Stack]:
    redis = RedisServer().start()
    mock = await MockProcess().start()
    proxy = ProxyProcess(mock.url, workers=2, redis_url=redis.url, **PROXY_SETTINGS)
    await proxy.start()
    running = Stack(redis, mock, proxy, Truth(mock))
    try:
        await running.truth.learn(group[0] for group in HOT)
        yield running
    finally:
        write_report(running.records)
        if proxy.process is not None and proxy.process.returncode is None:
            await running.proxy.stop(signal.SIGKILL)
        await mock.stop()
        redis.close()


async def get(url: str, query: str, headers: dict[str, str] | None = None) -> Outcome:
    """One request on a fresh connection."""
    started = time.monotonic()
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.get(f"{url}{REPORT}?{query}", headers=headers or auth()) as response,
    ):
        body = await response.read()
        return Outcome(
            query,
            started,
            time.monotonic() - started,
            response.status,
            response.content_type,
            body,
            dict(response.headers),
        )


async def until_ok(stack: Stack, within: float = 10.0) -> float | None:
    """Seconds until a never-asked question is answered 200 again (None: not within `within`)."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            outcome = await get(stack.proxy.url, cold_query(stack.rng))
            stack.keep([outcome])
            if outcome.status == 200:
                await stack.truth.check(outcome)
                return time.monotonic() - started
        await asyncio.sleep(0.1)
    return None


async def warm(stack: Stack) -> None:
    """Every hot question answered once (so it is cached, then stale, during the fault)."""
    for group in HOT:
        deadline = time.monotonic() + 10
        while True:
            outcome = await get(stack.proxy.url, group[0])
            stack.keep([outcome])
            if outcome.status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert outcome.status == 200, (group[0], outcome.status, outcome.body[:200])


async def problems_in(
    stack: Stack,
    outcomes: list[Outcome],
    *,
    latency_bound: float,
    allow_conn_errors: int,
) -> list[str]:
    """Every broken promise in the outcomes, as readable lines."""
    problems: list[str] = []
    conn_errors = 0
    for o in outcomes:
        if o.elapsed > latency_bound:
            problems.append(f"{o.elapsed:.2f}s > {latency_bound}s: {o.status} {o.query}")
        if o.status is None:
            conn_errors += 1
            continue
        if "X-Request-ID" not in o.headers:
            problems.append(f"no X-Request-ID: {o.status} {o.query}")
        try:
            if o.status == 200:
                await stack.truth.check(o)
            else:
                assert o.status in ERROR_STATUSES, f"status {o.status}"
                check_error_body(o.body, o.content_type)
                if o.status in (429, 503):
                    assert int(o.headers["Retry-After"]) >= 1
        except (AssertionError, KeyError, ValueError) as exc:
            problems.append(f"{o.status} {o.query}: {exc!r} {o.body[:200]!r}")
    if conn_errors > allow_conn_errors:
        problems.append(f"{conn_errors} connection errors (allowed {allow_conn_errors})")
    return problems


async def metrics_text(stack: Stack) -> bytes:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{stack.proxy.url}/metrics") as response,
    ):
        return await response.read()


Action = Callable[[Stack], Awaitable[None]]


async def nothing(stack: Stack) -> None:
    return None


async def exercise(
    stack: Stack,
    name: str,
    inject: Action,
    clear: Action,
    *,
    fault_seconds: float = 2.0,
    settle: float = 1.0,
    latency_bound: float = LATENCY_BOUND,
    allow_conn_errors: int = 0,
    budget_factor: float = 1.0,
) -> dict[str, Any]:
    """Load before, during and after one fault; check and record it."""
    await stack.mock.reset()
    await warm(stack)
    calls_before = await stack.mock.calls()
    started = time.monotonic()
    load = asyncio.ensure_future(
        run_load(
            stack.proxy.url,
            pick,
            headers=CLIENTS,
            seconds=0.5 + fault_seconds + settle,
            seed=stack.rng.randrange(1 << 30),
        )
    )
    await asyncio.sleep(0.5)
    await inject(stack)
    await asyncio.sleep(fault_seconds)
    await clear(stack)
    recovery = asyncio.ensure_future(until_ok(stack))
    outcomes = await load
    calls = await stack.mock.calls() - calls_before
    window = time.monotonic() - started
    recovered_after = await recovery
    stack.keep(outcomes)
    stack.seen.append(await metrics_text(stack))

    problems = await problems_in(
        stack, outcomes, latency_bound=latency_bound, allow_conn_errors=allow_conn_errors
    )
    bound = BUDGET.limit + BUDGET.limit * window / BUDGET.period
    if calls > bound * budget_factor:
        problems.append(f"{calls} upstream calls in {window:.2f}s; budget allows {bound:.0f}")
    if recovered_after is None:
        problems.append("no 200 for a new question within 10 s after the fault cleared")
    summary = stats(outcomes)
    record = {
        "sent": summary.sent,
        "by_status": summary.by_status,
        "stale_200": sum(
            1 for o in outcomes if o.status == 200 and "fwd=stale" in o.headers["Cache-Status"]
        ),
        "upstream_calls": calls,
        "budget_bound": round(bound),
        "window_s": round(window, 2),
        "fault_s": fault_seconds,
        "max_latency_s": round(summary.max_latency, 3),
        "p99_latency_s": round(summary.p99_latency, 3),
        "recovery_s": None if recovered_after is None else round(recovered_after, 2),
        "problems": len(problems),
    }
    stack.records[name] = record
    assert not problems, "\n".join(problems[:20])
    return record


# --- the faults -----------------------------------------------------------------------------


async def upstream_500(stack: Stack) -> None:
    await stack.mock.faults(status=500)


async def upstream_429(stack: Stack) -> None:
    await stack.mock.faults(status=429, retry_after=2)


async def upstream_slow(stack: Stack) -> None:
    await stack.mock.faults(latency=UPSTREAM_TIMEOUT + 0.5)


async def upstream_hang(stack: Stack) -> None:
    await stack.mock.faults(hang=True)


async def upstream_drop(stack: Stack) -> None:
    await stack.mock.faults(drop=True)


async def upstream_ok(stack: Stack) -> None:
    await stack.mock.faults()


async def redis_kill(stack: Stack) -> None:
    stack.redis.stop()


async def redis_start(stack: Stack) -> None:
    stack.redis.start()


async def redis_pause(stack: Stack) -> None:
    client = aioredis.Redis.from_url(stack.redis.url)
    try:
        await client.client_pause(3000, all=True)
    finally:
        await client.aclose()


async def worker_kill(stack: Stack) -> None:
    assert stack.proxy.process is not None
    workers = worker_pids(stack.proxy.process.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)


FAULTS: list[tuple[str, Action, Action, dict[str, Any]]] = [
    ("baseline", nothing, nothing, {}),
    ("upstream 500", upstream_500, upstream_ok, {}),
    ("upstream 429 + Retry-After 2", upstream_429, upstream_ok, {}),
    ("upstream slow (1.5 s > 1 s timeout)", upstream_slow, upstream_ok, {}),
    ("upstream hangs", upstream_hang, upstream_ok, {}),
    # Known bug: aiohttp resends a GET whose connection dropped, so one budget unit can be two
    # calls (see test_one_budget_unit_is_one_upstream_call); the bound is doubled here only.
    ("upstream drops connections", upstream_drop, upstream_ok, {"budget_factor": 2.0}),
    ("redis killed, restarted", redis_kill, redis_start, {}),
    ("redis paused 3 s (CLIENT PAUSE)", redis_pause, nothing, {"fault_seconds": 3.0}),
    # In-flight requests of the killed worker lose their connection (at most one per caller);
    # the other worker may wait out the dead one's lease: flight wait + upstream timeout.
    (
        "one worker SIGKILLed",
        worker_kill,
        nothing,
        {"allow_conn_errors": 8, "latency_bound": FLIGHT_WAIT + UPSTREAM_TIMEOUT + 0.5},
    ),
]


@pytest.mark.parametrize(
    ("name", "inject", "clear", "options"), FAULTS, ids=[fault[0] for fault in FAULTS]
)
async def test_fault(
    stack: Stack, name: str, inject: Action, clear: Action, options: dict[str, Any]
) -> None:
    record = await exercise(stack, name, inject, clear, **options)
    assert record["sent"] > 100
    if name == "baseline":
        assert record["by_status"] == {"200": record["sent"]}


async def test_redis_back_means_ready_ok_again(stack: Stack) -> None:
    """After the Redis faults every worker reports Redis `ok` again, by itself."""
    deadline = time.monotonic() + 10
    streak = 0
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        while streak < 6 and time.monotonic() < deadline:
            async with http.get(f"{stack.proxy.url}/readyz") as response:
                body = await response.json()
            assert response.status == 200
            streak = streak + 1 if body["checks"]["redis"] == "ok" else 0
            await asyncio.sleep(0.05)
    assert streak >= 6


async def test_killed_worker_was_replaced(stack: Stack) -> None:
    assert stack.proxy.process is not None
    for _ in range(100):
        if len(worker_pids(stack.proxy.process.pid)) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(worker_pids(stack.proxy.process.pid)) == 2
    assert b"worker_restart" in stack.proxy.stderr


# --- known bugs, pinned -----------------------------------------------------------------------


async def test_budget_holds_while_redis_is_down(stack: Stack) -> None:
    """A per-minute budget, so the window's refill is negligible: a burst of never-asked
    questions may cost at most the budget, however many workers serve it."""
    budget = parse_rate("40/minute")
    redis = RedisServer().start()
    proxy = ProxyProcess(
        stack.mock.url,
        workers=2,
        redis_url=redis.url,
        upstream_timeout=UPSTREAM_TIMEOUT,
        upstream_queue_timeout=QUEUE_TIMEOUT,
        upstream_rate_limit=str(budget),
    )
    await proxy.start()
    try:
        redis.stop()
        # Both workers notice (their first Redis call fails), then the burst.
        await run_load(proxy.url, cold_query, headers=CLIENTS, tasks=4, max_requests=8, rate=0)
        before = await stack.mock.calls()
        started = time.monotonic()
        outcomes = await run_load(
            proxy.url,
            cold_query,
            headers=CLIENTS,
            tasks=16,
            max_requests=160,
            seconds=10,
            rate=0,
            seed=stack.rng.randrange(1 << 30),
        )
        window = time.monotonic() - started
        calls = await stack.mock.calls() - before
    finally:
        await proxy.stop()
        redis.close()
        stack.seen.append(proxy.stderr)
    stack.keep(outcomes)
    assert not await problems_in(stack, outcomes, latency_bound=LATENCY_BOUND, allow_conn_errors=0)
    bound = budget.limit + budget.limit * window / budget.period
    assert calls <= bound, f"{calls} upstream calls in {window:.2f}s; budget allows {bound:.0f}"


async def test_one_budget_unit_is_one_upstream_call(stack: Stack) -> None:
    await stack.mock.reset()
    await stack.mock.faults(drop=True)
    try:
        outcomes = [await get(stack.proxy.url, cold_query(stack.rng)) for _ in range(10)]
        calls = await stack.mock.calls()
    finally:
        await stack.mock.faults()
    stack.keep(outcomes)
    assert {o.status for o in outcomes} == {502}
    assert calls == 10


async def test_an_orphaned_lease_does_not_stall_requests(stack: Stack) -> None:
    """What a SIGKILLed worker leaves behind, with the default flight settings."""
    proxy = ProxyProcess(
        stack.mock.url,
        workers=1,
        redis_url=stack.redis.url.rsplit("/", 1)[0] + "/1",
        upstream_timeout=UPSTREAM_TIMEOUT,
        upstream_queue_timeout=QUEUE_TIMEOUT,
    )
    await proxy.start()
    client = aioredis.Redis.from_url(stack.redis.url.rsplit("/", 1)[0] + "/1")
    try:
        query = cold_query(stack.rng)
        key = cache_key(canonical(query))
        # Exactly the lease a worker takes before it fetches (flight.RedisLease), never released.
        await client.set(f"teamup-proxy:l:{{{key}}}", "crashed-holder", px=15_000)
        started = time.monotonic()
        try:
            outcome = await asyncio.wait_for(get(proxy.url, query), LATENCY_BOUND + 2)
        except TimeoutError:
            pytest.fail(f"no answer within {LATENCY_BOUND + 2:.0f} s")
        elapsed = time.monotonic() - started
    finally:
        await client.flushdb()
        await client.aclose()
        await proxy.stop(signal.SIGKILL)
        stack.seen.append(proxy.stderr)
    assert outcome.status == 200
    assert elapsed <= LATENCY_BOUND


# --- the end: drain, then look for secrets ------------------------------------------------


async def test_sigterm_finishes_in_flight_requests_and_exits_0(stack: Stack) -> None:
    await stack.mock.reset()
    stack.seen.append(await metrics_text(stack))
    await stack.mock.faults(latency=0.7)
    queries = [cold_query(stack.rng) for _ in range(10)]
    in_flight = [asyncio.ensure_future(get(stack.proxy.url, q)) for q in queries]
    for _ in range(250):
        if await stack.mock.calls() >= len(queries):
            break
        await asyncio.sleep(0.02)
    assert await stack.mock.calls() == len(queries)
    stopping = asyncio.ensure_future(stack.proxy.stop(signal.SIGTERM))
    outcomes = list(await asyncio.gather(*in_flight))
    code = await stopping
    await stack.mock.faults()  # the ground truth below comes from the mock, at full speed
    stack.keep(outcomes)
    assert [o.status for o in outcomes] == [200] * len(queries)
    for outcome in outcomes:
        await stack.truth.check(outcome)
    assert code == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(stack.proxy.url, queries[0])
    events = [
        orjson.loads(line).get("event")
        for line in stack.proxy.stderr.splitlines()
        if line.startswith(b"{")
    ]
    assert events.count("draining") >= 2 and events.count("stopped") >= 2


async def test_no_secret_in_anything_the_proxy_wrote(stack: Stack) -> None:
    if stack.proxy.process is not None and stack.proxy.process.returncode is None:
        await stack.proxy.stop(signal.SIGTERM)
    everything = b"\n".join([*stack.seen, stack.proxy.stderr, await redis_dump(stack.redis.url)])
    assert len(stack.proxy.stderr) > 10_000  # the access log of the whole suite is in there
    assert b"teamup-proxy:c:" in everything  # and so are cache entries
    leaked = [name for name, secret in SECRETS.items() if secret.encode() in everything]
    assert not leaked, f"found in what the proxy wrote: {leaked}"
