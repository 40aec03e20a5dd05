"""Writes through a real `teamup-proxy serve --workers 2` (real HTTP, real Redis, the mock
TeamUp): who may write, sent exactly once, Idempotency-Key replays, the cache invalidated on
every worker, and bodies that never reach TeamUp."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.testing.e2e import KEY, OTHER_KEY, auth
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess
from proxy.testing.writes import MOCK_WRITES, MockWrites, WriteFaults
from proxy.web.auth import hash_key

pytestmark = pytest.mark.slow

CUSTOMER = "/api/v2/customers/377002"
CUSTOMERS = "/api/v2/customers"
JSON = {"Content-Type": "application/json"}


@pytest.fixture
async def proxy(mock_server: TestServer, redis_url: str) -> AsyncIterator[ProxyProcess]:
    """Two workers; billing may write customers, crm may write nothing."""
    clients = {
        "billing": {"key_sha256": hash_key(KEY), "rate": "10000/minute", "write": ["customers"]},
        "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "10000/minute"},
    }
    process = ProxyProcess(
        str(mock_server.make_url("")).rstrip("/"),
        workers=2,
        redis_url=redis_url,
        clients=orjson.dumps(clients).decode(),
        log_level="WARNING",
        cache_l1_ttl=5,
        upstream_timeout=2,
    )
    async with process:
        # The second worker may bind the port a moment after the first: wait until both
        # answer (bounded), so that "every worker" means two.
        seen: set[str] = set()
        for _ in range(200):
            _, _, headers = await call(process, "GET", "/healthz")
            seen.add(worker(headers))
            if len(seen) == 2:
                break
            await asyncio.sleep(0.05)
        assert len(seen) == 2, "the second worker never answered"
        yield process


@pytest.fixture
def writes(mock_server: TestServer) -> MockWrites:
    return mock_server.app[MOCK_WRITES]


async def call(
    proxy: ProxyProcess, method: str, path: str, body: bytes | None = None, **headers: str
) -> tuple[int, bytes, dict[str, str]]:
    """One request on a connection of its own (so the kernel spreads them over the workers)."""
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, proxy.url + path, data=body, headers=headers) as response,
    ):
        return response.status, await response.read(), dict(response.headers)


def worker(headers: dict[str, str]) -> str:
    """Which worker answered: each process's request ids have a prefix of their own."""
    return headers["X-Request-ID"][:12]


async def test_write_scopes_per_client(proxy: ProxyProcess, writes: MockWrites) -> None:
    body = b'{"first_name": "Ann"}'
    status, _, _ = await call(proxy, "PATCH", CUSTOMER, body, **auth(), **JSON)
    assert status == 200
    status, answer, _ = await call(proxy, "PATCH", CUSTOMER, body, **auth(OTHER_KEY), **JSON)
    assert status == 403 and orjson.loads(answer)["code"] == "permission_denied"
    assert len(writes.received) == 1


@pytest.mark.parametrize("fault", [{"status": 503}, {"drop": True}])
async def test_a_write_teamup_fails_reaches_it_exactly_once(
    proxy: ProxyProcess, writes: MockWrites, fault: dict[str, Any]
) -> None:
    writes.faults = WriteFaults(when="after", times=1, **fault)
    status, answer, _ = await call(proxy, "PATCH", CUSTOMER, b'{"a": 1}', **auth(), **JSON)
    assert status == 502
    expected = "upstream_error" if "status" in fault else "upstream_outcome_unknown"
    assert orjson.loads(answer)["code"] == expected
    await asyncio.sleep(0.3)  # nothing is resent later either
    assert len(writes.received) == 1


async def test_same_idempotency_key_twice_reaches_teamup_once(
    proxy: ProxyProcess, writes: MockWrites
) -> None:
    answers = []
    for _ in range(4):  # on connections of their own: both workers answer some
        answers.append(
            await call(
                proxy,
                "POST",
                CUSTOMERS,
                b'{"first_name": "Bo"}',
                **auth(),
                **JSON,
                **{"Idempotency-Key": '"signup-42"'},
            )
        )
    assert len(writes.received) == 1
    assert {(status, body) for status, body, _ in answers} == {(answers[0][0], answers[0][1])}
    assert answers[0][0] == 201
    assert "Idempotent-Replayed" not in answers[0][2]
    assert all(headers["Idempotent-Replayed"] == "true" for _, _, headers in answers[1:])


async def test_a_patch_makes_the_next_reads_come_from_teamup_on_every_worker(
    proxy: ProxyProcess, writes: MockWrites, mock_state: MockState
) -> None:
    async def read_all(path: str, times: int) -> set[str]:
        seen = set()
        bodies = set()
        for _ in range(times):
            status, body, headers = await call(proxy, "GET", path, None, **auth())
            assert status == 200
            seen.add(worker(headers))
            bodies.add(body)
        assert len(bodies) == 1, "every worker answers the same"
        return seen

    for path in (CUSTOMER, CUSTOMERS):
        assert len(await read_all(path, 16)) == 2, "both workers answered"
    calls = dict(mock_state.operation_calls)
    assert calls["customers_retrieve"] == 1 and calls["customers_list"] == 1
    status, _, _ = await call(proxy, "PATCH", CUSTOMER, b'{"first_name": "Zed"}', **auth(), **JSON)
    assert status == 200
    for path in (CUSTOMER, CUSTOMERS):
        assert len(await read_all(path, 16)) == 2, "both workers answered"
    # One more call each: the first read after the write went to TeamUp, the rest were hits
    # of that new answer, on both workers (none served the answer from before the write).
    assert mock_state.operation_calls["customers_retrieve"] == 2
    assert mock_state.operation_calls["customers_list"] == 2
    _, body, _ = await call(proxy, "GET", CUSTOMER, None, **auth())
    assert orjson.loads(body)["first_name"] == "Zed"
    _, listed, _ = await call(proxy, "GET", CUSTOMERS + "?ids=377002", None, **auth())
    assert orjson.loads(listed)["results"][0]["first_name"] == "Zed"


async def test_a_2_mib_body_and_a_text_body_never_reach_teamup(
    proxy: ProxyProcess, writes: MockWrites
) -> None:
    big = b'{"a": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    try:
        status, _, _ = await call(proxy, "PATCH", CUSTOMER, big, **auth(), **JSON)
        assert status == 413
    except aiohttp.ClientError:
        pass  # refused before it was all sent: the connection closed under the upload
    # With Expect: 100-continue the 413 always arrives (the body is never invited).
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(
        (
            f"PATCH {CUSTOMER} HTTP/1.1\r\nHost: p\r\nAuthorization: Token {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(big)}\r\n"
            "Expect: 100-continue\r\n\r\n"
        ).encode()
    )
    first = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    assert first.startswith(b"HTTP/1.1 413 ")
    status, answer, _ = await call(
        proxy, "PATCH", CUSTOMER, b"first_name=Zed", **auth(), **{"Content-Type": "text/plain"}
    )
    assert status == 415 and orjson.loads(answer)["code"] == "unsupported_media_type"
    assert len(writes.received) == 0
