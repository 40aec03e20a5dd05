"""Callers and budgets end to end: client GCRA, upstream shares, the global budget, the circuit."""

from __future__ import annotations

import asyncio
import bisect
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from proxy.core.gcra import gcra
from proxy.testing.e2e import KEY, OTHER_KEY, REPORT, FakeClock, auth, make_settings
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess
from proxy.web.auth import hash_key
from tests.conftest import MakeProxy


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def clients(billing: str, crm: str = "1000/minute", upstream_rate: str | None = None) -> object:
    billing_config: dict[str, str] = {"key_sha256": hash_key(KEY), "rate": billing}
    if upstream_rate is not None:
        billing_config["upstream_rate"] = upstream_rate
    return {"billing": billing_config, "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": crm}}


async def test_client_limit_headers_on_200_and_429(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(clients=clients("2/minute"))
    first = await proxy.get(REPORT, headers=auth())
    assert first.status == 200
    assert first.headers["RateLimit-Policy"] == '"client";q=2;w=60'
    assert first.headers["RateLimit"] == '"client";r=1;t=30'
    second = await proxy.get(REPORT, headers=auth())
    assert second.headers["RateLimit"] == '"client";r=0;t=60'
    third = await proxy.get(REPORT, headers=auth())
    assert third.status == 429
    body = await third.json()
    assert body["code"] == "rate_limited"
    assert body["type"] == "invalid_request_error"
    assert third.headers["Retry-After"] == "30"
    assert third.headers["RateLimit-Policy"] == '"client";q=2;w=60'
    assert re.fullmatch(r'"client";r=0;t=\d+', third.headers["RateLimit"])


async def test_a_limited_client_does_not_affect_another(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(clients=clients("1/minute", "5/minute"))
    assert (await proxy.get(REPORT, headers=auth())).status == 200
    assert (await proxy.get(REPORT, headers=auth())).status == 429
    for _ in range(5):
        assert (await proxy.get(REPORT, headers=auth(OTHER_KEY))).status == 200
    assert (await proxy.get(REPORT, headers=auth(OTHER_KEY))).status == 429


async def test_default_rate_applies_to_clients_without_one(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(
        clients={"billing": {"key_sha256": hash_key(KEY)}}, rate_limit="3/hour"
    )
    statuses = [(await proxy.get(REPORT, headers=auth())).status for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


async def test_exactly_n_admitted_under_concurrency_on_real_redis(
    make_proxy: MakeProxy, real_redis: aioredis.Redis
) -> None:
    proxy = await make_proxy(clients=clients("10/minute"), redis_client=real_redis)
    responses = await asyncio.gather(*(proxy.get(REPORT, headers=auth()) for _ in range(100)))
    statuses = [r.status for r in responses]
    assert statuses.count(200) == 10
    assert statuses.count(429) == 90


async def test_upstream_share_stops_misses_not_hits(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(clients=clients("1000/minute", upstream_rate="2/hour"))
    for limit in (1, 2):
        assert (await proxy.get(REPORT + f"?limit={limit}", headers=auth())).status == 200
    denied = await proxy.get(REPORT + "?limit=3", headers=auth())
    assert denied.status == 429
    assert (await denied.json())["code"] == "upstream_share_exceeded"
    assert int(denied.headers["Retry-After"]) > 0
    for _ in range(5):  # hits cost no share
        hit = await proxy.get(REPORT + "?limit=1", headers=auth())
        assert hit.status == 200
        assert hit.headers["Cache-Status"].startswith("teamup-proxy; hit")
    # another client's misses are not limited by billing's share
    assert (await proxy.get(REPORT + "?limit=3", headers=auth(OTHER_KEY))).status == 200
    assert mock_state.calls == 3


async def test_a_spent_share_serves_stale_rather_than_429(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        clients=clients("1000/minute", upstream_rate="1/hour"),
        cache_ttl=10,
        cache_stale_while_revalidate=False,
        clock=clock,
    )
    assert (await proxy.get(REPORT + "?limit=1", headers=auth())).status == 200
    clock.advance(11)
    stale = await proxy.get(REPORT + "?limit=1", headers=auth())
    assert stale.status == 200
    assert stale.headers["Cache-Status"] == (
        "teamup-proxy; hit; fwd=stale; ttl=-1; detail=upstream-share"
    )
    assert (await proxy.get(REPORT + "?limit=2", headers=auth())).status == 429  # nothing stale
    assert mock_state.calls == 1


async def test_global_budget_four_of_seven(make_proxy: MakeProxy, mock_state: MockState) -> None:
    proxy = await make_proxy(upstream_rate_limit="4/minute")
    responses = [await proxy.get(REPORT + f"?limit={n}", headers=auth()) for n in range(1, 8)]
    assert [r.status for r in responses] == [200] * 4 + [503] * 3
    assert mock_state.calls == 4
    for response in responses[4:]:
        body = await response.json()
        assert body["code"] == "upstream_budget_exhausted"
        assert int(response.headers["Retry-After"]) >= 1


async def test_collapsed_burst_costs_one_budget_unit(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    mock_state.faults.latency = 0.2
    proxy = await make_proxy(upstream_rate_limit="1/minute")
    responses = await asyncio.gather(*(proxy.get(REPORT, headers=auth()) for _ in range(20)))
    assert {r.status for r in responses} == {200}
    assert mock_state.calls == 1


async def test_budget_exhausted_serves_stale(make_proxy: MakeProxy, mock_state: MockState) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        upstream_rate_limit="2/minute",
        cache_ttl=10,
        cache_stale_while_revalidate=False,
        clock=clock,
    )
    assert (await proxy.get(REPORT + "?limit=1", headers=auth())).status == 200
    assert (await proxy.get(REPORT + "?limit=2", headers=auth())).status == 200
    clock.advance(11)
    stale = await proxy.get(REPORT + "?limit=1", headers=auth())
    assert stale.status == 200
    assert stale.headers["Cache-Status"] == "teamup-proxy; hit; fwd=stale; ttl=-1; detail=budget"
    assert (await proxy.get(REPORT + "?limit=3", headers=auth())).status == 503
    assert mock_state.calls == 2


async def test_upstream_429_opens_the_circuit(make_proxy: MakeProxy, mock_state: MockState) -> None:
    mock_state.faults.status = 429
    mock_state.faults.retry_after = 1
    mock_state.faults.times = 1
    proxy = await make_proxy()
    first = await proxy.get(REPORT + "?limit=1", headers=auth())
    assert first.status == 503
    assert (await first.json())["code"] == "upstream_rate_limited"
    assert first.headers["Retry-After"] == "1"
    second = await proxy.get(REPORT + "?limit=2", headers=auth())
    assert second.status == 503
    assert mock_state.calls == 1  # nothing sent while the circuit is open
    ready = await (await proxy.get("/readyz")).json()
    assert ready["checks"]["upstream"] == "circuit-open"
    assert ready["status"] == "degraded"
    deadline = time.monotonic() + 5
    while (await proxy.get(REPORT + "?limit=2", headers=auth())).status != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert mock_state.calls == 2


async def test_upstream_429_serves_stale(make_proxy: MakeProxy, mock_state: MockState) -> None:
    clock = FakeClock()
    proxy = await make_proxy(cache_ttl=10, cache_stale_while_revalidate=False, clock=clock)
    fresh = await proxy.get(REPORT + "?limit=1", headers=auth())
    clock.advance(30)
    mock_state.faults.status = 429
    mock_state.faults.retry_after = 60
    stale = await proxy.get(REPORT + "?limit=1", headers=auth())
    assert stale.status == 200
    assert await stale.read() == await fresh.read()
    assert stale.headers["Cache-Status"].startswith("teamup-proxy; hit; fwd=stale; ttl=-20")
    assert "fwd-status=429" in stale.headers["Cache-Status"]


@pytest.mark.slow
async def test_limits_and_circuit_hold_across_two_processes(
    mock_server: TestServer, mock_state: MockState, redis_url: str
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    settings: dict[str, Any] = {
        "redis_url": redis_url,
        "clients": f'{{"billing": {{"key_sha256": "{hash_key(KEY)}", "rate": "10/minute"}}}}',
    }
    async with (
        ProxyProcess(upstream, **settings) as a,
        ProxyProcess(upstream, **settings) as b,
        aiohttp.ClientSession() as http,
    ):

        async def get(base: str, query: str) -> aiohttp.ClientResponse:
            async with http.get(base + REPORT + query, headers=auth()) as response:
                await response.read()
                return response

        responses = await asyncio.gather(
            *(get((a.url, b.url)[i % 2], "?limit=1") for i in range(100))
        )
        statuses = [r.status for r in responses]
        assert statuses.count(200) == 10 and statuses.count(429) == 90

    async with aioredis.Redis.from_url(redis_url) as client:
        await client.flushall()  # the first half spent billing's 10/minute
    mock_state.reset()
    mock_state.faults.status = 429
    mock_state.faults.retry_after = 2
    mock_state.faults.times = 1
    settings["clients"] = f'{{"billing": {{"key_sha256": "{hash_key(KEY)}"}}}}'
    async with (
        ProxyProcess(upstream, **settings) as a,
        ProxyProcess(upstream, **settings) as b,
        aiohttp.ClientSession() as http,
    ):
        first = await get(a.url, "?limit=2")
        assert first.status == 503
        opened = time.monotonic()
        other = await get(b.url, "?limit=3")
        assert other.status == 503
        assert int(other.headers["Retry-After"]) in (1, 2)
        assert mock_state.calls == 1
        while (await get(b.url, "?limit=3")).status != 200:
            assert mock_state.calls == 1
            assert time.monotonic() - opened < 10
            await asyncio.sleep(0.1)
        assert time.monotonic() - opened >= 1.5
        assert mock_state.calls == 2


async def test_the_global_budget_bursts_only_upstream_burst(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    # Fail-fast (no queue), so that the 11th call finds the burst spent instead of waiting.
    proxy = await make_proxy(
        upstream_rate_limit="240/minute", upstream_burst=10, upstream_queue_timeout=0
    )
    responses = [await proxy.get(REPORT + f"?limit={n}", headers=auth()) for n in range(1, 31)]
    assert sum(r.status == 200 for r in responses) == 10
    assert mock_state.calls == 10


def test_no_minute_holds_more_than_rate_plus_burst() -> None:
    settings = make_settings("http://upstream", upstream_rate_limit="240/minute", upstream_burst=10)
    budget = settings.upstream_budget
    admitted: list[float] = []
    tat: float | None = None
    for step in range(180_000):  # a caller asking every millisecond for three minutes
        now = step / 1000
        new_tat, decision = gcra(tat, now, budget)
        if decision.allowed:
            tat = new_tat
            admitted.append(now)
    busiest = max(bisect.bisect_left(admitted, start + 60) - i for i, start in enumerate(admitted))
    assert 240 <= busiest <= 250  # TeamUp's documented limit, never more


async def test_joining_a_running_fetch_costs_no_upstream_share(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    mock_state.faults.latency = 0.2
    proxy = await make_proxy(clients=clients("1000/minute", upstream_rate="1/hour"))
    responses = await asyncio.gather(*(proxy.get(REPORT, headers=auth()) for _ in range(5)))
    assert [r.status for r in responses] == [200] * 5
    assert mock_state.calls == 1
