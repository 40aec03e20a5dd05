"""Shared fixtures: one real redis-server per test session, fakeredis, and the pair of them."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import fakeredis
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.logs import JsonFormatter
from proxy.testing.e2e import TOKEN, make_settings
from proxy.testing.mock import MOCK_STATE, MockState, create_mock_app
from proxy.testing.support import RedisServer
from proxy.web.app import create_app


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real redis-server on a free port for the whole session (flushed per test by users)."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, emptied for this test."""
    with redis_server.client() as client:
        client.flushall()
    return redis_server.url


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which the test may stop and start."""
    server = RedisServer().start()
    yield server
    server.close()


@pytest.fixture(params=["fakeredis", "real"])
async def redis_client(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> AsyncIterator[aioredis.Redis]:
    """The same tests against fakeredis (fast, in memory) and a real redis-server."""
    client: aioredis.Redis
    if request.param == "fakeredis":
        client = fakeredis.FakeAsyncRedis()
    else:
        client = aioredis.Redis.from_url(redis_server.url)
    await client.flushall()
    yield client
    await client.aclose()


MakeProxy = Callable[..., Awaitable[TestClient[web.Request, web.Application]]]


@pytest.fixture
async def mock_server(aiohttp_server: AiohttpServer) -> TestServer:
    """A mock TeamUp on a free port, demanding `proxy.testing.e2e.TOKEN`."""
    return await aiohttp_server(create_mock_app(TOKEN))


@pytest.fixture
def mock_state(mock_server: TestServer) -> MockState:
    """Calls, recorded requests and fault switches of the mock."""
    return mock_server.app[MOCK_STATE]


@pytest.fixture
async def make_proxy(
    aiohttp_client: AiohttpClient, mock_server: TestServer
) -> AsyncIterator[MakeProxy]:
    """Build a proxy app in front of the mock: `await make_proxy(cache_ttl=5, clock=clock)`."""
    built: list[TestClient[web.Request, web.Application]] = []
    passed: list[Any] = []

    async def build(
        *, redis_client: Any = None, clock: Any = None, **overrides: Any
    ) -> TestClient[web.Request, web.Application]:
        upstream = overrides.pop("upstream_url", str(mock_server.make_url("")).rstrip("/"))
        settings = make_settings(upstream, **overrides)
        kwargs: dict[str, Any] = {"redis_client": redis_client}
        if clock is not None:
            kwargs["clock"] = clock
        proxy = await aiohttp_client(create_app(settings, **kwargs))
        built.append(proxy)
        if redis_client is not None:
            passed.append(redis_client)
        return proxy

    yield build
    # An app's health ping may reconnect a Redis client its test already closed: stop the apps
    # first, then close the clients they used, so no socket is left to the garbage collector.
    for proxy in built:
        await proxy.close()
    for client in passed:
        with contextlib.suppress(Exception):
            await client.aclose()


class LogLines(logging.Handler):
    """Every log record formatted as the proxy writes it in production (JSON lines)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines]


@pytest.fixture
def json_logs() -> Iterator[LogLines]:
    """The JSON log lines written during the test."""
    handler = LogLines()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old_level)
