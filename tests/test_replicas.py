"""Replicas as real processes on one Redis: collapsed misses, a crashed lease holder, restarts."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from aiohttp.test_utils import TestServer

from proxy.testing.e2e import KEY, OTHER_KEY, REPORT, auth
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess
from proxy.web.app import KEY_PREFIX

pytestmark = pytest.mark.slow

QUERY = "?format=json&limit=5"


StartReplica = Callable[..., Awaitable[ProxyProcess]]


@pytest.fixture
async def start_replica(mock_server: TestServer, redis_url: str) -> AsyncIterator[StartReplica]:
    """Start proxy processes in front of the mock, all on the session Redis; stop them after."""
    started: list[ProxyProcess] = []

    async def start(**extra: Any) -> ProxyProcess:
        replica = ProxyProcess(
            str(mock_server.make_url("")).rstrip("/"),
            redis_url=redis_url,
            rate_limit="1000/minute",
            upstream_rate_limit="1000/minute",
            log_level="WARNING",
            **extra,
        )
        started.append(replica)
        return await replica.start()

    yield start
    for replica in started:
        if replica.process is not None and replica.process.returncode is None:
            await replica.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        yield session


def params(headers: Mapping[str, str]) -> list[str]:
    """Cache-Status parameters after the cache name."""
    name, *rest = [part.strip() for part in headers["Cache-Status"].split(";")]
    assert name == "teamup-proxy"
    return rest


async def fetch(
    http: aiohttp.ClientSession, replica: ProxyProcess, key: str = KEY
) -> tuple[int, bytes, list[str]]:
    async with http.get(replica.url + REPORT + QUERY, headers=auth(key)) as response:
        return response.status, await response.read(), params(response.headers)


async def test_fifty_cold_requests_over_two_replicas_make_one_call(
    start_replica: StartReplica, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(start_replica(), start_replica())
    mock_state.faults.latency = 0.3
    results = await asyncio.gather(
        *(fetch(http, a if i % 2 else b, KEY if i % 3 else OTHER_KEY) for i in range(50))
    )
    assert mock_state.calls == 1
    assert [status for status, _, _ in results] == [200] * 50
    assert len({body for _, body, _ in results}) == 1
    leaders = [p for _, _, p in results if "stored" in p and "collapsed" not in p]
    assert len(leaders) == 1
    others = [p for _, _, p in results if p is not leaders[0]]
    assert all("collapsed" in p or p[0] == "hit" for p in others)
    # The replica that did not fetch waited for the other's entry instead of calling TeamUp.
    assert ["fwd=uri-miss", "collapsed"] in others


async def test_a_failed_fetch_is_shared_not_repeated_by_the_other_replica(
    start_replica: StartReplica, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(start_replica(), start_replica())
    mock_state.faults.latency = 0.3
    mock_state.faults.status = 500
    results = await asyncio.gather(*(fetch(http, a if i % 2 else b) for i in range(20)))
    assert [status for status, _, _ in results] == [502] * 20
    assert mock_state.calls == 1


async def test_a_killed_lease_holder_does_not_block_the_others(
    start_replica: StartReplica,
    mock_state: MockState,
    http: aiohttp.ClientSession,
    redis_url: str,
) -> None:
    # The lease and the wait follow the upstream timeout: 3 s and 2.5 s here.
    settings = {"upstream_timeout": "2"}
    a, b = await asyncio.gather(start_replica(**settings), start_replica(**settings))
    mock_state.faults.hang = True
    mock_state.faults.times = 1  # only the first call hangs
    holder = asyncio.create_task(fetch(http, a))
    for _ in range(1000):
        if mock_state.calls:
            break
        await asyncio.sleep(0.01)
    assert mock_state.calls == 1
    with redis.Redis.from_url(redis_url) as sync:
        assert sync.keys(f"{KEY_PREFIX}l:*") != []  # A holds the lease while TeamUp hangs
    await a.stop(signal.SIGKILL)  # a crash: no cleanup, no lease release
    with pytest.raises(aiohttp.ClientError):
        await holder

    status, body, cache = await asyncio.wait_for(fetch(http, b), 15)
    assert status == 200
    assert len(orjson.loads(body)["rows"]) == 5
    assert "stored" in cache
    assert mock_state.calls == 2
    with redis.Redis.from_url(redis_url) as sync:
        assert len(sync.keys(f"{KEY_PREFIX}c:*")) == 1
        for _ in range(100):  # the dead holder's lease ends by itself (3 s here)
            if not sync.keys(f"{KEY_PREFIX}l:*"):
                break
            await asyncio.sleep(0.05)
        assert sync.keys(f"{KEY_PREFIX}l:*") == []


async def test_hit_after_a_restart_is_served_from_redis(
    start_replica: StartReplica, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    first = await start_replica()
    status, body, cache = await fetch(http, first)
    assert status == 200 and "stored" in cache
    assert await first.stop() == 0

    second = await start_replica()
    status, again, cache = await fetch(http, second)
    assert status == 200
    assert cache[0] == "hit"
    assert again == body
    assert mock_state.calls == 1
