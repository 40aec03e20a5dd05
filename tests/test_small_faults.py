"""Issue 20's small ones: each answer is the same whatever this process has seen before."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.testing.e2e import ADMIN_KEY, KEY, REPORT, TOKEN, make_settings
from proxy.testing.mock import MockState
from proxy.testing.procs import proxy_env
from proxy.web.auth import hash_key
from proxy.web.handlers import STATE
from tests.conftest import MakeProxy
from tests.test_fair_queue import HEAVY_KEY, LIGHT_KEY, ask_app, queue_of, until
from tests.test_serve import metric_sum

BUSY = {"billing": {"key_sha256": hash_key(KEY), "rate": "100000/minute"}}


@pytest.fixture
async def real_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


@pytest.mark.parametrize(
    ("learned", "asked"),
    [
        ({"Authorization": f"Token {KEY}"}, {"X-API-Key": f"Token {KEY}"}),
        ({"X-API-Key": KEY}, {"Authorization": KEY}),
        ({"X-API-Key": KEY}, {"Authorization": "", "X-API-Key": KEY}),
    ],
    ids=["x-api-key with a scheme", "authorization without one", "empty authorization"],
)
async def test_the_hot_memo_identifies_the_caller_as_the_general_path_does(
    make_proxy: MakeProxy,
    real_redis: aioredis.Redis,
    learned: dict[str, str],
    asked: dict[str, str],
) -> None:
    """Issue 20: `asked` was a 401 until the worker had answered the same question for the
    `learned` header form; then the hot memo, keyed on the raw value, answered it 200."""
    proxy = await make_proxy(clients=BUSY, cache_l1_ttl=30, redis_client=real_redis)
    query = REPORT + "?format=json&limit=3"
    assert (await proxy.get(query, headers=asked)).status == 401
    for _ in range(3):  # a miss, then hot hits
        assert (await proxy.get(query, headers=learned)).status == 200
    hot = proxy.app[STATE].hot
    assert hot is not None and len(hot._questions) == 1  # learned: the short path answers it
    for _ in range(3):
        refused = await proxy.get(query, headers=asked)
        assert refused.status == 401
        assert (await refused.json())["code"] == "not_authenticated"


def stalled_reader(port: int, path: str) -> socket.socket:
    """A caller that asks for `path` and reads nothing (a 4 KiB receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return sock


async def test_openapi_json_is_written_with_the_write_timeout(make_proxy: MakeProxy) -> None:
    """Issue 20: `/openapi.json` (0.75 MB) was written without the write timeout: callers that
    never read held their connection (and the answer) for good."""
    write_timeout = 1.0
    proxy = await make_proxy(client_write_timeout=write_timeout)
    document = await proxy.get("/openapi.json")
    assert document.status == 200 and len(await document.read()) > 256 * 1024
    port = proxy.server.port
    assert port is not None
    sockets = [stalled_reader(port, "/openapi.json") for _ in range(5)]
    try:
        cut = 0.0
        deadline = time.monotonic() + 10 * write_timeout + 5
        while cut < len(sockets) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            cut = metric_sum(
                await (await proxy.get("/metrics")).text(),
                "teamup_proxy_client_write_timeouts_total",
            )
        assert cut == len(sockets)
        for sock in sockets:  # reset: the caller learns the answer was given up
            sock.settimeout(5)
            with pytest.raises(ConnectionResetError):
                while sock.recv(1 << 20):
                    pass
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("created_at_timeframe=%FF", "created_at_timeframe"),
        ("created_at_timeframe=ab%C0%80", "created_at_timeframe"),
        ("created_at_timeframe=%ED%A0%80", "created_at_timeframe"),  # an encoded surrogate
        ("format%FF=json", "format\ufffd"),
    ],
)
async def test_a_query_that_is_not_utf8_is_a_400(
    make_proxy: MakeProxy, query: str, name: str
) -> None:
    """Issue 20: `%FF` silently became U+FFFD and shared an entry with a real `%EF%BF%BD`."""
    proxy = await make_proxy()
    for path in (REPORT, "/admin/cache"):
        method = proxy.get if path == REPORT else proxy.delete
        headers = {"Authorization": f"Token {KEY if path == REPORT else ADMIN_KEY}"}
        refused = await method(f"{path}?format=json&{query}", headers=headers)
        assert refused.status == 400
        body = await refused.json()
        assert body["code"] == "parameter_invalid"
        assert body["type"] == "invalid_request_error"
        assert list(body["field_errors"]) == [name]
        assert "not valid UTF-8" in body["field_errors"][name][0]


async def test_a_real_replacement_character_is_still_a_question(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    answer = await proxy.get(
        f"{REPORT}?format=json&created_at_timeframe=%EF%BF%BD", headers={"X-API-Key": KEY}
    )
    if answer.status == 400:
        assert "UTF-8" not in await answer.text()


def weighted(weight: int) -> dict[str, Any]:
    return {
        "heavy": {"key_sha256": hash_key(HEAVY_KEY), "rate": "1000/minute", "weight": weight},
        "light": {"key_sha256": hash_key(LIGHT_KEY), "rate": "1000/minute"},
    }


# 10 units a second, 1 s of queue timeout: the cap is the units of half a second, 5.
BUDGET: dict[str, Any] = {
    "upstream_rate_limit": "10/second",
    "upstream_burst": 1,
    "upstream_queue_timeout": 1,
}


def test_a_weight_that_would_starve_the_others_stops_serve_with_one_line() -> None:
    """Issue 20: a weight above timeout times rate made every other app's queued miss a 503; the
    settings allowed it. Now `serve` refuses to start, naming the client and the cap."""
    env = proxy_env(upstream_token=TOKEN, clients=json.dumps(weighted(6)), **BUDGET)
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", "0", "--workers", "1"],
        env=env,
        capture_output=True,
        timeout=30,  # on main it started serving: the test fails here
    )
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "PROXY_CLIENTS (heavy.weight): 6 is more than 5" in lines[0]
    assert (
        make_settings("http://127.0.0.1:1", clients=weighted(5), **BUDGET).max_client_weight() == 5
    )


async def test_at_the_cap_a_heavy_app_never_starves_a_light_one(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(clients=weighted(5), **BUDGET)
    queue = queue_of(proxy)
    heavy = [asyncio.ensure_future(ask_app(proxy, n, HEAVY_KEY)) for n in range(1, 13)]
    await until(lambda: len(queue) >= 8)
    light = await ask_app(proxy, 51, LIGHT_KEY)  # behind at most one turn of the heavy app
    assert light[0] == 200
    await asyncio.gather(*heavy)
