"""Every worker tells the truth about Redis on `/readyz`, with or without traffic.

Two real workers (`serve --workers 2`, one port, SO_REUSEPORT): Redis stopped → every `/readyz`
says `down` within ~2 s without a single report request; Redis back → every worker says `ok`
within ~2 s, and a new question fetched once is a hit on both workers. `/readyz` is polled on a
fresh connection each time so the kernel spreads the polls over both workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer

from proxy.backends.link import RedisLink
from proxy.testing.e2e import REPORT, auth
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import RedisServer

pytestmark = pytest.mark.slow

RETRY_INTERVAL = 1.0  # the default PROXY_REDIS_RETRY_INTERVAL
WITHIN = 2.5
STREAK = 16  # consecutive answers: the chance that one worker never answered is 2**-15


@pytest.fixture
async def proxy(mock_server: TestServer, own_redis: RedisServer) -> AsyncIterator[ProxyProcess]:
    upstream = str(mock_server.make_url("")).rstrip("/")
    async with ProxyProcess(
        upstream, workers=2, redis_url=own_redis.url, redis_retry_interval=RETRY_INTERVAL
    ) as running:
        yield running


async def seconds_until_all(http: aiohttp.ClientSession, proxy: ProxyProcess, want: str) -> float:
    """Seconds until STREAK polls in a row say `checks.redis == want` (each one a 200)."""
    started = time.monotonic()
    streak = 0
    while streak < STREAK:
        assert time.monotonic() - started < 10, f"workers never all said redis={want}"
        async with http.get(f"{proxy.url}/readyz") as response:
            assert response.status == 200
            body = await response.json()
        if body["checks"]["redis"] == want:
            assert body["status"] == ("ok" if want == "ok" else "degraded"), body
            streak += 1
        else:
            streak = 0
            await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_every_worker_knows_redis_state_without_traffic(
    proxy: ProxyProcess, own_redis: RedisServer
) -> None:
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        assert await seconds_until_all(http, proxy, "ok") < WITHIN

        own_redis.stop()  # no report request from here on: only the health task can tell
        down_after = await seconds_until_all(http, proxy, "down")
        assert down_after < WITHIN, down_after

        own_redis.start()
        up_after = await seconds_until_all(http, proxy, "ok")
        assert up_after < WITHIN, up_after
        print(f"readiness: every worker down after {down_after:.2f} s, ok after {up_after:.2f} s")

        query = f"{proxy.url}{REPORT}?format=json&limit=7&offset=4242"
        async with http.get(query, headers=auth()) as first:
            assert first.status == 200
            assert "fwd=uri-miss" in first.headers["Cache-Status"]
        for _ in range(STREAK):  # both workers answer some of these: each one a Redis hit
            async with http.get(query, headers=auth()) as again:
                assert again.status == 200
                assert again.headers["Cache-Status"].startswith("teamup-proxy; hit"), again.headers[
                    "Cache-Status"
                ]


async def test_health_task_flips_both_ways(own_redis: RedisServer) -> None:
    """The link alone: down within one interval of Redis going away, up within one of it back."""
    changes: list[bool] = []
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=0.1, socket_connect_timeout=0.1)
    link = RedisLink(client, retry_interval=0.1, on_change=changes.append)
    link.start()
    try:
        await asyncio.sleep(0.25)
        assert link.status == "ok" and changes == []
        own_redis.stop()
        await asyncio.sleep(0.35)
        assert link.status == "down" and changes == [False]
        own_redis.start()
        await asyncio.sleep(0.35)
        assert link.status == "ok" and changes == [False, True]
    finally:
        await link.close()


async def test_a_busy_event_loop_does_not_make_redis_down_before_its_timeout(
    own_redis: RedisServer,
) -> None:
    """A worker's loop busy for longer than one health interval (hundreds of large answers
    being written) but within PROXY_REDIS_TIMEOUT: the ping still counts, Redis stays up and
    nothing is refetched from TeamUp for want of it."""
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=2, socket_connect_timeout=2)
    link = RedisLink(client, retry_interval=0.05, timeout=2)

    async def busy() -> None:
        # The loop does nothing else meanwhile: the ping's answer waits.
        time.sleep(0.3)  # noqa: ASYNC251 (blocking on purpose)

    try:
        await client.ping()  # connected
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(busy()))
        assert await link.check()
        assert link.status == "ok"
    finally:
        await client.aclose()


class SwallowingLink(RedisLink):
    """A health ping that swallows its task's cancel, as Python 3.11's `asyncio.timeout` can
    when the cancel lands as its own deadline passes (it comes out as TimeoutError)."""

    pinged = 0
    thrice = asyncio.Event()

    async def check(self) -> bool:
        self.pinged += 1
        if self.pinged == 3:
            self.thrice.set()
        try:
            await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            return False  # what the 3.11 race looks like from inside check()
        return True


async def test_stopping_the_health_task_ends_even_if_a_ping_swallowed_the_cancel(
    own_redis: RedisServer,
) -> None:
    """A process (or a test's teardown) that stops its link always gets past it: seen once as
    a whole CI run hung in a fixture's teardown, the health loop going on for ever."""
    client = aioredis.Redis.from_url(own_redis.url, socket_timeout=1, socket_connect_timeout=1)
    link = SwallowingLink(client, retry_interval=0.01)
    try:
        link.thrice = asyncio.Event()
        link.start()
        await asyncio.wait_for(link.thrice.wait(), 10)
        # Not wait_for(stop()): cancelling a stop that waits for ever would wait for ever too.
        done, _ = await asyncio.wait({asyncio.ensure_future(link.stop())}, timeout=10)
        assert done, "stop() did not end: the health loop outlived its cancel"
        pinged = link.pinged
        link.start()  # after stop, nothing starts it again (a late failure would)
        await asyncio.sleep(0.1)
        assert link.pinged == pinged
    finally:
        await client.aclose()
