"""The hot hit's short path and the cheap access log: the same answers, lines and counts."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.core.entry import CachedResponse
from proxy.logs import ACCESS, JsonFormatter, LineHandler, LineWriter
from proxy.testing.e2e import KEY, REPORT, FakeClock, auth
from proxy.web.auth import hash_key
from proxy.web.handlers import STATE
from proxy.web.sending import _has_room
from tests.conftest import LogLines, MakeProxy

LANE_OUTER = ("request_id", "total_ms", "status")
BUSY = {"billing": {"key_sha256": hash_key(KEY), "rate": "100000/minute"}}
# Headers that differ from one answer to the next whatever path answers.
PER_REQUEST = {"X-Request-ID", "RateLimit", "Date"}


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def stable(headers: Any) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k not in PER_REQUEST}


@pytest.mark.parametrize(
    "query",
    [
        REPORT + "?format=json&limit=3",
        "/api/v2/events?page_size=5&fields=name,id",  # a list
        "/api/v2//customers/377001?fields=id",  # a retrieve, at the doubled-slash path
    ],
)
async def test_a_hot_hit_answers_what_the_general_path_answers(
    make_proxy: MakeProxy, json_logs: LogLines, real_redis: aioredis.Redis, query: str
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clients=BUSY, clock=clock, cache_l1_ttl=30, redis_client=real_redis)
    state = proxy.app[STATE]
    assert state.hot is not None
    assert (await proxy.get(query, headers=auth())).status == 200  # the miss fills the L1
    hot = await proxy.get(query, headers=auth())
    assert len(state.hot._questions) == 1  # answered by the short path
    # A Cache-Control header (not no-cache) takes the general path to the same L1 entry.
    general = await proxy.get(query, headers={**auth(), "Cache-Control": "max-age=60"})
    assert hot.status == general.status == 200
    assert await hot.read() == await general.read()
    assert stable(hot.headers) == stable(general.headers)
    assert hot.headers["Cache-Status"].startswith("teamup-proxy; hit; ttl=")
    assert hot.headers["RateLimit"].startswith('"client";r=')
    access = [r for r in json_logs.records() if r["logger"] == "teamup_proxy.access"]
    hot_line, general_line = access[-2], access[-1]
    for line in (hot_line, general_line):
        line.pop("time"), line.pop("total_ms"), line.pop("request_id")
    assert hot_line == general_line
    assert hot_line["cache"] == "hit" and hot_line["client"] == "billing"


async def test_age_and_ttl_follow_the_clock_on_hot_hits(
    make_proxy: MakeProxy, real_redis: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        clients=BUSY, clock=clock, cache_l1_ttl=30, cache_ttl=300, redis_client=real_redis
    )
    query = REPORT + "?format=json&limit=4"
    await proxy.get(query, headers=auth())
    first = await proxy.get(query, headers=auth())
    assert (first.headers["Age"], first.headers["Cache-Status"]) == (
        "0",
        "teamup-proxy; hit; ttl=300",
    )
    clock.advance(2.5)
    later = await proxy.get(query, headers=auth())
    assert (later.headers["Age"], later.headers["Cache-Status"]) == (
        "2",
        "teamup-proxy; hit; ttl=297",
    )


async def test_hot_hits_keep_every_check(make_proxy: MakeProxy, real_redis: aioredis.Redis) -> None:
    clients = {
        **BUSY,
        "crm": {
            "key_sha256": hash_key("crm-key"),
            "rate": "100000/minute",
            "reports": ["customers"],
        },
    }
    proxy = await make_proxy(clients=clients, cache_l1_ttl=30, redis_client=real_redis)
    query = REPORT + "?format=json&limit=5"
    assert (await proxy.get(query, headers=auth())).status == 200
    assert (await proxy.get(query, headers=auth())).status == 200
    # Another key, a wrong key, no key and a client without this report: never the hot answer.
    assert (await proxy.get(query, headers=auth("crm-key"))).status == 403
    assert (await proxy.get(query, headers=auth("wrong"))).status == 401
    assert (await proxy.get(query)).status == 401
    assert (await proxy.get(query, headers=auth("wrong"))).status == 401
    bad = await proxy.get(REPORT + "?format=json&limit=5000", headers=auth())
    assert bad.status == 400


async def test_hot_hits_make_no_redis_call(make_proxy: MakeProxy, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        proxy = await make_proxy(clients=BUSY, redis_client=client, cache_l1_ttl=30)
        query = REPORT + "?format=json&limit=6"
        await asyncio.gather(*(proxy.get(query, headers=auth()) for _ in range(20)))
        await client.config_resetstat()
        for _ in range(5):
            answers = await asyncio.gather(*(proxy.get(query, headers=auth()) for _ in range(40)))
            assert all("hit" in a.headers["Cache-Status"] for a in answers)
        stats = await client.info("commandstats")
        # 200 hits: a few batch reservations, nothing else.
        calls = {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_config"}
        assert sum(calls.values()) <= 20, str(calls)
    finally:
        await client.aclose()


def test_the_access_lane_writes_what_the_json_formatter_writes() -> None:
    fields = {"request_id": "r1", "client": "billing", "path": '/a"b\\c/ü', "status": 200}
    fields |= {"upstream_ms": None, "total_ms": 1.25}
    record = logging.getLogger("teamup_proxy.access").makeRecord(
        "teamup_proxy.access", logging.INFO, __file__, 0, "request", (), None, extra=fields
    )
    formatted = json.loads(JsonFormatter().format(record))
    lane = json.loads(ACCESS.line(fields))
    assert lane.pop("time")[:10] == formatted.pop("time")[:10]
    assert lane == formatted


def test_a_hot_line_is_the_line_of_the_same_fields() -> None:
    fields: dict[str, Any] = {"request_id": "r-1", "client": "billing", "method": "GET"}
    fields["path"] = "/x/ü\\"
    fields |= {"report": "customers", "key": "v2:k", "cache": "hit", "upstream_status": None}
    fields |= {"upstream_ms": None, "total_ms": 0.42, "status": 200}
    middle = orjson.dumps({k: v for k, v in fields.items() if k not in LANE_OUTER})[1:-1]
    hot = json.loads(ACCESS.hot_line("r-1", middle, 0.42, 200))
    plain = json.loads(ACCESS.line(fields))
    assert hot.pop("time")[:16] == plain.pop("time")[:16]
    assert hot == plain and list(hot) == list(plain)


def test_the_access_lane_only_when_nothing_else_listens() -> None:
    read, write = os.pipe()
    try:
        handler = LineHandler(LineWriter(write))
        handler.setFormatter(JsonFormatter())
        root = logging.getLogger()
        saved, level, previous = root.handlers[:], root.level, ACCESS.handler
        root.handlers[:], ACCESS.handler = [handler], handler
        root.setLevel(logging.INFO)
        try:
            assert ACCESS.lane() is handler.writer
            listener = logging.NullHandler()
            root.addHandler(listener)
            assert ACCESS.lane() is None  # a second handler gets records, so no lane
            root.removeHandler(listener)
            root.setLevel(logging.WARNING)
            assert ACCESS.lane() is None  # nor when the access log is off
        finally:
            root.handlers[:], ACCESS.handler = saved, previous
            root.setLevel(level)
    finally:
        os.close(read)
        os.close(write)


def test_the_writer_keeps_every_line_in_order() -> None:
    read, write = os.pipe()
    try:
        writer = LineWriter(write, interval=0.001)
        for n in range(2000):
            writer.write(f"{n}\n".encode())
        writer.flush()
        data = b""
        while data.count(b"\n") < 2000:
            data += os.read(read, 65536)
        assert data.split() == [str(n).encode() for n in range(2000)]
    finally:
        os.close(read)
        os.close(write)


@pytest.mark.parametrize("level", [logging.ERROR, logging.CRITICAL])
def test_errors_are_written_at_once(level: int) -> None:
    read, write = os.pipe()
    try:
        handler = LineHandler(LineWriter(write, interval=3600))
        handler.setFormatter(JsonFormatter())
        record = logging.makeLogRecord({"msg": "boom", "levelno": level, "name": "x"})
        handler.handle(record)
        assert b"boom" in os.read(read, 65536)
    finally:
        os.close(read)
        os.close(write)


async def test_a_small_answer_skips_the_write_timer_only_while_it_fits() -> None:
    """`PacedResponse` writes a small answer without a timer only when the transport's buffer
    has room for all of it; once a caller stops reading and the buffer fills, the timer is back
    (and `client_write_timeout` cuts the caller off, as for large answers)."""
    accepted: asyncio.Future[asyncio.Transport] = asyncio.get_running_loop().create_future()

    class Server(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.set_result(transport)  # type: ignore[arg-type]

    server = await asyncio.get_running_loop().create_server(Server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)  # never reads
    transport = await accepted
    try:
        assert _has_room(transport, 4_800)
        for _ in range(10_000):  # the kernel's buffers fill, then the transport's
            transport.write(b"x" * 4_800)
            if not _has_room(transport, 4_800):
                break
        assert not _has_room(transport, 4_800)
        assert transport.get_write_buffer_size() > 0
    finally:
        transport.abort()
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
        server.close()
        await server.wait_closed()
    assert not _has_room(None, 10)


async def test_remembered_questions_keep_no_answer_alive(
    make_proxy: MakeProxy, real_redis: aioredis.Redis
) -> None:
    """The memo is per question and may hold thousands: it keeps headers, never a body (the L1
    decides how long a body lives in the process)."""
    proxy = await make_proxy(clients=BUSY, cache_l1_ttl=30, redis_client=real_redis)
    for limit in range(1, 6):
        query = REPORT + f"?format=json&limit={limit}"
        await proxy.get(query, headers=auth())
        assert (await proxy.get(query, headers=auth())).status == 200
    hot = proxy.app[STATE].hot
    assert hot is not None and len(hot._questions) == 5
    for question in hot._questions.values():
        held = [getattr(question, f.name) for f in dataclasses.fields(question)]
        assert not any(isinstance(value, CachedResponse) for value in held)
        assert all(len(value) < 1000 for value in held if isinstance(value, bytes))
