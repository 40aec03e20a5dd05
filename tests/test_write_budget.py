"""PROXY_CLIENT_WRITE_BUFFER_BYTES: one copy of each large body, and a per-worker budget for the
bodies being written. The memory bound under 200 stalled callers of real `serve` workers is in
tests/test_hostile_upstream.py."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import time
from collections.abc import Callable

import orjson
import redis.asyncio as aioredis

from proxy.backends.stores import RedisCacheStore
from proxy.cli import set_sndbuf
from proxy.core.bodies import LARGE, BodyPool
from proxy.core.entry import CachedResponse
from proxy.testing.e2e import KEY, REPORT, auth
from proxy.web.app import KEY_PREFIX
from proxy.web.handlers import STATE
from tests.conftest import LogLines, MakeProxy
from tests.test_caching import cache_key
from tests.test_serve import metric_sum

MiB = 1024 * 1024


class Owner:
    """Something that holds a body (an entry, a response) until it is collected."""


def csv_body(rows: int, tag: int = 0) -> bytes:
    return b"".join(b"%08d,customer-%08d,%d\r\n" % (i, i, tag) for i in range(rows))


def test_a_stored_body_in_use_is_decoded_once_and_let_go_with_its_last_user() -> None:
    pool = BodyPool(64 * MiB)
    stored = CachedResponse(200, (("Content-Type", "text/csv"),), csv_body(20_000), 1.0, 2.0)
    value = stored.encode()
    assert len(value) < len(stored.body) // 4  # compressed: each read would decompress
    first = CachedResponse.decode(value, pool)
    again = CachedResponse.decode(bytes(bytearray(value)), pool)  # another read, its own bytes
    assert first is not None and again is not None
    assert first.body == stored.body
    assert again.body is first.body  # one copy in memory, however many hits hold it
    response = Owner()
    assert pool.hold(stored.body, response) is first.body  # equal bytes from elsewhere too
    assert len(pool) == 1
    raw = CachedResponse(200, (("Content-Type", "text/csv"),), os.urandom(LARGE), 1.0, 2.0)
    one, two = (CachedResponse.decode(raw.encode(), pool) for _ in range(2))  # stored raw
    assert one is not None and two is not None and one.body is two.body == raw.body
    del first, again, response, one, two
    gc.collect()
    assert len(pool) == 0  # nothing kept once nothing uses it
    assert pool.hold(b"small", Owner()) == b"small" and len(pool) == 0  # below LARGE: not pooled


async def test_bodies_being_written_stay_within_the_budget_and_the_rest_wait_or_are_refused() -> (
    None
):
    budget = 3 * MiB
    pool = BodyPool(budget)
    owner = Owner()
    one, two, three = (pool.hold(os.urandom(2 * MiB), owner) for _ in range(3))
    assert pool.start_writing(one)
    assert pool.start_writing(one)  # a second caller of the same answer costs nothing more
    assert pool.writing == 2 * MiB
    waiting = asyncio.ensure_future(pool.wait_to_write(two, within=30))
    await asyncio.sleep(0)
    assert not waiting.done() and pool.waiting == 2 * MiB
    # Waiting responses hold their bodies too: no more than the budget of them either.
    assert not await pool.wait_to_write(three, within=30)
    pool.done_writing(one)
    await asyncio.sleep(0)
    assert not waiting.done()  # the other caller of `one` is still being written to
    pool.done_writing(one)
    assert await waiting
    assert pool.writing == 2 * MiB and pool.waiting == 0
    assert not await pool.wait_to_write(three, within=0.01)  # no room came: refused
    assert pool.waiting == 0
    pool.done_writing(two)
    assert pool.writing == 0
    huge = pool.hold(os.urandom(budget + LARGE), owner)
    assert pool.start_writing(huge)  # larger than the budget, alone: never starved


def stalled(port: int, query: str) -> socket.socket:
    """A caller that asks and reads nothing (a 4 KiB receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET {REPORT}{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {KEY}\r\n\r\n".encode()
    )
    return sock


async def until(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)


async def test_a_full_budget_makes_a_new_answer_wait_then_refuses_past_it(
    make_proxy: MakeProxy, redis_client: aioredis.Redis, json_logs: LogLines
) -> None:
    proxy = await make_proxy(
        redis_client=redis_client,
        cache_l1_ttl=0,
        client_write_buffer_bytes=3 * MiB,
        client_write_timeout=1,
    )
    runner, port = proxy.server.runner, proxy.server.port
    assert runner is not None and port is not None
    for site in runner.sites:  # whatever the kernel's buffers, the stall is ours
        set_sndbuf(site, 64 * 1024)
    queries = ["?format=csv&limit=1", "?format=csv&limit=2", "?format=csv&limit=3"]
    bodies = [os.urandom(2 * MiB) for _ in queries]
    store = RedisCacheStore(redis_client, KEY_PREFIX)
    for query, body in zip(queries, bodies, strict=True):
        entry = CachedResponse(200, (("Content-Type", "text/csv"),), body, time.time(), 1e12)
        await store.set(cache_key(query), entry, 300)
    pool = proxy.app[STATE].sending.pool
    sock = stalled(port, queries[0])
    try:
        await until(lambda: pool.writing == 2 * MiB)
        second = asyncio.ensure_future(proxy.get(REPORT + queries[1], headers=auth()))
        await until(lambda: pool.waiting == 2 * MiB)  # no room: it waits for some
        third = await proxy.get(REPORT + queries[2], headers=auth())
        assert third.status == 503  # nor room to wait in: refused at once
        assert third.headers["Retry-After"] == "1"
        assert (await third.json())["code"] == "proxy_busy"
        assert "Cache-Status" not in third.headers and "ETag" not in third.headers
        answered = await second  # the stalled caller is cut at its write timeout: room
        assert answered.status == 200
        assert await answered.read() == bodies[1]
    finally:
        sock.close()
    await until(lambda: pool.writing == 0)
    metrics = await (await proxy.get("/metrics")).text()
    assert metric_sum(metrics, "teamup_proxy_client_write_budget_refusals_total") == 1
    assert metric_sum(metrics, "teamup_proxy_client_write_timeouts_total") == 1
    refused = [
        fields
        for fields in map(orjson.loads, json_logs.lines)
        if fields.get("event") == "client_write_budget"
    ]
    assert len(refused) == 1 and refused[0]["budget"] == 3 * MiB
