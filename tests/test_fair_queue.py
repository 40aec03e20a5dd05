"""The fair queue in front of the shared budget (#14), as callers and TeamUp see it.

Misses that find the budget spent wait their client's turn instead of failing; units go round
robin across clients (weighted); hopeless waits are refused up front; stale copies are answered
at once; a caller that hangs up gives its place back; replicas on one Redis never exceed the
budget together. "Never exceeded" is checked where it matters: call times at the mock.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import aiohttp
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from proxy.testing.e2e import KEY, OTHER_KEY, REPORT, FakeClock, auth
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess
from proxy.upstream.queue import BudgetQueue
from proxy.web.app import KEY_PREFIX
from proxy.web.auth import hash_key
from proxy.web.handlers import STATE
from tests.conftest import MakeProxy

HEAVY_KEY, LIGHT_KEY = "heavy-key-0a1b2c", "light-key-3d4e5f"


def limit_of(query_string: str) -> int:
    """The `limit` a recorded upstream request asked for (each test question has its own)."""
    found = re.search(r"(?:^|&)limit=(\d+)", query_string)
    assert found is not None, query_string
    return int(found.group(1))


def most_in_window(times: Sequence[float], window: float) -> int:
    """The most calls that fall in any half-open window of `window` seconds."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= window:
            start += 1
        best = max(best, end - start + 1)
    return best


def assert_within_budget(times: Sequence[float], per_second: int, burst: int) -> None:
    """GCRA with this rate and burst admits at most burst + ⌊w / interval⌋ calls in any window
    w; a window a little under one second absorbs the loopback's jitter."""
    window = 0.9
    bound = burst + math.floor(window * per_second)
    assert most_in_window(times, window) <= bound, sorted(times)
    if len(times) > 1:
        span = max(times) - min(times)
        assert len(times) <= burst + math.floor((span + 0.1) * per_second), sorted(times)


def cache_status(headers: Any) -> list[str]:
    return [part.strip() for part in headers.get("Cache-Status", "").split(";")]


Reply = tuple[int, dict[str, str], dict[str, Any]]


async def ask(http: aiohttp.ClientSession, url: str, limit: int, key: str) -> Reply:
    async with http.get(f"{url}{REPORT}?format=json&limit={limit}", headers=auth(key)) as reply:
        return reply.status, dict(reply.headers), orjson.loads(await reply.read())


async def ask_app(proxy: TestClient[Any, Any], limit: int, key: str = KEY) -> Reply:
    reply = await proxy.get(f"{REPORT}?format=json&limit={limit}", headers=auth(key))
    return reply.status, dict(reply.headers), orjson.loads(await reply.read())


async def until(check: Callable[[], bool | Awaitable[bool]], within: float = 10.0) -> None:
    """Poll `check` until it holds (bounded)."""
    for _ in range(int(within / 0.01)):
        result = check()
        if result if isinstance(result, bool) else await result:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached in time")


def queue_of(proxy: TestClient[Any, Any]) -> BudgetQueue:
    assert isinstance(proxy.server, TestServer)
    return proxy.server.app[STATE].service.guard.queue


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus exposition text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") or head == name:
            inside = head[len(name) :].strip("{}")
            got = ",".join(sorted(part for part in inside.split(",") if part))
            if got == wanted:
                return float(value)
    return 0.0


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


StartProxy = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def start_proxy(mock_server: TestServer) -> AsyncIterator[StartProxy]:
    """`teamup-proxy serve` processes in front of the (in-test) mock; stopped after the test."""
    started: list[ProxyProcess] = []

    async def start(**settings: Any) -> ProxyProcess:
        proxy = ProxyProcess(str(mock_server.make_url("")).rstrip("/"), **settings)
        started.append(proxy)
        return await proxy.start()

    yield start
    for proxy in started:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop()


# --- real processes ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_six_concurrent_misses_are_all_answered_at_the_budgets_pace(
    start_proxy: StartProxy, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(upstream_rate_limit="2/second", upstream_burst=1)
    replies = await asyncio.gather(*(ask(http, proxy.url, n, KEY) for n in range(1, 7)))
    assert [status for status, _, _ in replies] == [200] * 6
    queued = [headers for _, headers, _ in replies if "detail=queued" in cache_status(headers)]
    assert len(queued) == 5  # one found the burst's unit; five waited their turn
    assert all(re.fullmatch(r"queue;dur=[\d.]+", h["Server-Timing"]) for h in queued)
    times = [request.at for request in mock_state.requests]
    assert len(times) == 6
    assert_within_budget(times, per_second=2, burst=1)
    await proxy.stop()
    lines = [orjson.loads(line) for line in proxy.stderr.splitlines() if line.startswith(b"{")]
    access = [line for line in lines if line.get("logger") == "teamup_proxy.access"]
    assert sum(1 for line in access if (line.get("queued_ms") or 0) > 0) == 5


@pytest.mark.slow
async def test_a_flood_does_not_starve_a_quiet_app(
    start_proxy: StartProxy, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(upstream_rate_limit="4/second", upstream_queue_timeout=3)
    flood = [asyncio.ensure_future(ask(http, proxy.url, n, KEY)) for n in range(1, 41)]
    await until(lambda: len(mock_state.requests) >= 4)  # the burst went out; the rest queue
    quiet = await asyncio.gather(*(ask(http, proxy.url, n, OTHER_KEY) for n in range(51, 55)))
    flooded = await asyncio.gather(*flood)
    assert [status for status, _, _ in quiet] == [200] * 4
    answered = [status for status, _, _ in flooded].count(200)
    assert answered >= 4
    for status, headers, body in flooded:
        if status != 200:
            assert status == 503 and body["code"] == "upstream_budget_exhausted"
            assert int(headers["Retry-After"]) >= 1
    times = [request.at for request in mock_state.requests]
    assert len(times) == answered + 4
    assert_within_budget(times, per_second=4, burst=4)


@pytest.mark.slow
async def test_a_caller_that_hangs_up_gives_its_place_back(
    start_proxy: StartProxy, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(upstream_rate_limit="1/second", upstream_burst=1)
    assert (await ask(http, proxy.url, 1, KEY))[0] == 200  # spends the unit

    async def queue_length() -> float:
        async with http.get(proxy.url + "/metrics") as reply:
            text = await reply.text()
        return metric(
            text, "teamup_proxy_upstream_queue_length", client="billing", upstream="default"
        )

    gone = asyncio.ensure_future(ask(http, proxy.url, 2, KEY))
    await until(lambda: _at_least(queue_length(), 1))
    gone.cancel()  # the caller hangs up while its miss waits
    await asyncio.gather(gone, return_exceptions=True)
    await until(lambda: _at_most(queue_length(), 0))
    # The next miss gets the unit that question 2 would have spent, and question 2 never goes.
    status, _, _ = await ask(http, proxy.url, 3, KEY)
    assert status == 200
    assert [limit_of(r.query_string) for r in mock_state.requests] == [1, 3]
    async with http.get(proxy.url + "/metrics") as reply:
        text = await reply.text()
    assert (
        metric(
            text,
            "teamup_proxy_upstream_queue_abandoned_total",
            client="billing",
            upstream="default",
        )
        == 1
    )
    await proxy.stop()
    assert b"never retrieved" not in proxy.stderr  # the dropped fetch ends quietly


async def _at_least(value: Awaitable[float], bound: float) -> bool:
    return await value >= bound


async def _at_most(value: Awaitable[float], bound: float) -> bool:
    return await value <= bound


@pytest.mark.slow
async def test_two_replicas_on_one_redis_keep_the_budget_and_serve_both_apps(
    start_proxy: StartProxy, mock_state: MockState, http: aiohttp.ClientSession, redis_url: str
) -> None:
    a, b = await asyncio.gather(
        *(
            start_proxy(redis_url=redis_url, upstream_rate_limit="4/second", upstream_burst=2)
            for _ in range(2)
        )
    )
    flood = [
        asyncio.ensure_future(ask(http, (a if n % 2 else b).url, n, KEY)) for n in range(1, 41)
    ]
    await until(lambda: len(mock_state.requests) >= 2)
    quiet = await asyncio.gather(
        *(ask(http, (a if n % 2 else b).url, n, OTHER_KEY) for n in range(51, 55))
    )
    flooded = await asyncio.gather(*flood)
    assert [status for status, _, _ in quiet] == [200] * 4
    answered = [status for status, _, _ in flooded].count(200)
    assert answered >= 4
    times = [request.at for request in mock_state.requests]
    assert len(times) == answered + 4
    assert_within_budget(times, per_second=4, burst=2)


# --- in process -------------------------------------------------------------------------------


def weighted_clients() -> dict[str, Any]:
    return {
        "heavy": {"key_sha256": hash_key(HEAVY_KEY), "rate": "1000/minute", "weight": 3},
        "light": {"key_sha256": hash_key(LIGHT_KEY), "rate": "1000/minute"},
    }


async def test_a_weight_of_three_gets_three_units_per_round(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(
        clients=weighted_clients(), upstream_rate_limit="10/second", upstream_burst=1
    )
    queue = queue_of(proxy)
    heavy = [asyncio.ensure_future(ask_app(proxy, n, HEAVY_KEY)) for n in range(1, 17)]
    await until(lambda: len(queue) == 15)
    light = [asyncio.ensure_future(ask_app(proxy, n, LIGHT_KEY)) for n in range(51, 63)]
    await until(lambda: len(queue) + len(mock_state.requests) == 28)
    replies = await asyncio.gather(*heavy, *light)
    assert [status for status, _, _ in replies] == [200] * 28
    served = ["light" if limit_of(r.query_string) > 50 else "heavy" for r in mock_state.requests]
    first_light = served.index("light")
    # From the light client's first unit on, while both wait: 1 light, 3 heavy, 1 light, …
    assert served[first_light : first_light + 12] == (["light"] + ["heavy"] * 3) * 3


async def test_a_hopeless_wait_is_refused_at_once(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(upstream_rate_limit="1/minute", upstream_queue_timeout=5)
    assert (await ask_app(proxy, 1))[0] == 200
    status, headers, body = await ask_app(proxy, 2)
    assert status == 503 and body["code"] == "upstream_budget_exhausted"
    assert int(headers["Retry-After"]) >= 55  # the next unit frees in a minute: no point waiting
    assert mock_state.calls == 1
    text = await (await proxy.get("/metrics")).text()
    labels = {"client": "billing", "when": "upfront", "upstream": "default"}
    assert metric(text, "teamup_proxy_upstream_queue_timeouts_total", **labels) == 1


async def test_a_wait_that_runs_out_answers_503_with_retry_after(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        proxy = await make_proxy(
            redis_client=client,
            upstream_rate_limit="2/second",
            upstream_burst=1,
            upstream_queue_timeout=1,
        )
        assert (await ask_app(proxy, 1))[0] == 200
        waiting = asyncio.ensure_future(ask_app(proxy, 2))  # expects its unit in half a second
        await until(lambda: len(queue_of(proxy)) == 1)
        # Meanwhile other replicas spend the budget for the next 30 s.
        seconds, micros = await client.time()
        await client.set(f"{KEY_PREFIX}rl:upstream", seconds * 1000 + micros / 1000 + 30_000)
        status, headers, body = await waiting
        assert status == 503 and body["code"] == "upstream_budget_exhausted"
        assert int(headers["Retry-After"]) >= 20
        assert mock_state.calls == 1
        text = await (await proxy.get("/metrics")).text()
        labels = {"client": "billing", "when": "waited", "upstream": "default"}
        assert metric(text, "teamup_proxy_upstream_queue_timeouts_total", **labels) == 1
    finally:
        await client.aclose()


async def test_queue_timeout_zero_fails_fast_as_before(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(
        upstream_rate_limit="2/second", upstream_burst=1, upstream_queue_timeout=0
    )
    replies = await asyncio.gather(*(ask_app(proxy, n) for n in range(1, 4)))
    assert sorted(status for status, _, _ in replies) == [200, 503, 503]
    assert mock_state.calls == 1


async def test_a_stale_copy_is_answered_now_and_the_refresh_takes_its_turn(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        clock=clock,
        upstream_rate_limit="2/second",
        upstream_burst=1,
        cache_stale_while_revalidate=False,
    )
    assert (await ask_app(proxy, 1))[0] == 200  # stored, and the budget's unit is spent
    clock.advance(301)  # stale now
    status, headers, _ = await ask_app(proxy, 1)
    assert status == 200
    assert cache_status(headers)[1:3] == ["hit", "fwd=stale"]
    assert "detail=budget" in cache_status(headers)  # answered at once, not queued
    await until(lambda: mock_state.calls == 2)  # the refresh went when the next unit freed
    await until(lambda: len(queue_of(proxy)) == 0)
    status, headers, _ = await ask_app(proxy, 1)
    assert cache_status(headers)[1] == "hit" and "fwd=stale" not in cache_status(headers)


async def test_identical_queued_misses_share_one_call(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(upstream_rate_limit="2/second", upstream_burst=1)
    assert (await ask_app(proxy, 1))[0] == 200
    replies = await asyncio.gather(*(ask_app(proxy, 2, key) for key in (KEY, OTHER_KEY, KEY)))
    assert [status for status, _, _ in replies] == [200] * 3
    assert mock_state.calls == 2
    statuses = [cache_status(headers) for _, headers, _ in replies]
    assert all("detail=queued" in status for status in statuses)
    assert sum("collapsed" in status for status in statuses) == 2
    assert len({orjson.dumps(body) for _, _, body in replies}) == 1


async def test_waiters_that_cannot_outlast_an_opened_circuit_are_answered_at_once(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(upstream_rate_limit="2/second", upstream_burst=1)
    assert (await ask_app(proxy, 1))[0] == 200
    mock_state.faults.status, mock_state.faults.retry_after, mock_state.faults.times = 429, 30, 1
    first, second = await asyncio.gather(ask_app(proxy, 2), ask_app(proxy, 3))
    # One of them got the next unit and TeamUp's 429; the other was still queued and is told
    # when the circuit closes instead of waiting 5 s for nothing.
    for status, headers, body in (first, second):
        assert status == 503 and body["code"] == "upstream_rate_limited"
        assert int(headers["Retry-After"]) >= 20
    assert mock_state.calls == 2
    assert len(queue_of(proxy)) == 0
