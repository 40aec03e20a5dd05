"""The cache end to end: through the proxy app, in front of the mock TeamUp, counting its calls."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from multidict import MultiDict

from proxy.backends import keys
from proxy.backends.stores import RedisCacheStore
from proxy.core.contract import CanonicalQuery
from proxy.core.entry import CachedResponse
from proxy.service import REFRESH_BACKOFF
from proxy.settings import Settings
from proxy.testing.e2e import (
    ADMIN_KEY,
    FAST_LIMITS,
    KEY,
    OTHER_KEY,
    REPORT,
    FakeClock,
    auth,
    parse_query,
)
from proxy.testing.mock import MockState
from proxy.testing.support import RedisServer
from proxy.web.app import KEY_PREFIX
from tests.conftest import LogLines, MakeProxy

Proxy = TestClient[web.Request, web.Application]

Q = "?format=json&limit=3"
Q_RESPELLED = "?limit=003&format=JSON&offset=0"
Q_OTHER = "?format=json&limit=4"


def cache_key(query: str) -> str:
    """The canonical cache key of a `?...` query string."""
    parsed = parse_query(MultiDict(parse_qsl(query.lstrip("?"), keep_blank_values=True)))
    assert isinstance(parsed, CanonicalQuery)
    return keys.cache_key(parsed)


def entry_key(query: str) -> str:
    """The Redis key the proxy stores that query's entry under."""
    return f"{KEY_PREFIX}c:{{{cache_key(query)}}}"


def status_params(response: ClientResponse) -> list[str]:
    """The parameters of the proxy's Cache-Status member, after its name."""
    name, *params = [part.strip() for part in response.headers["Cache-Status"].split(";")]
    assert name == "teamup-proxy"
    return params


def is_stored_miss(response: ClientResponse) -> bool:
    params = status_params(response)
    return "fwd=uri-miss" in params and "stored" in params and "collapsed" not in params


async def get(proxy: Proxy, query: str = Q, **headers: str) -> ClientResponse:
    response = await proxy.get(REPORT + query, headers={**auth(), **headers})
    await response.read()
    return response


async def eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll an async check until it returns true (for background work, never for a TTL)."""
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# --- hits and misses -----------------------------------------------------------------------


async def test_hit_after_miss(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock, cache_ttl=300)
    miss = await get(proxy)
    assert miss.status == 200
    assert is_stored_miss(miss)
    assert miss.headers["Age"] == "0"

    clock.advance(10)
    hit = await get(proxy)
    assert hit.status == 200
    assert hit.headers["Cache-Status"] == "teamup-proxy; hit; ttl=290"
    assert hit.headers["Age"] == "10"
    assert await hit.read() == await miss.read()
    assert hit.headers["Content-Type"] == miss.headers["Content-Type"]
    assert len((await hit.json())["rows"]) == 3

    clock.advance(289.5)
    respelled = await get(proxy, Q_RESPELLED)
    assert respelled.headers["Cache-Status"] == "teamup-proxy; hit; ttl=0"
    assert respelled.headers["Age"] == "299"
    assert mock_state.calls == 1


async def test_entry_is_one_redis_value_living_fresh_plus_stale(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client, cache_ttl=120, cache_stale_ttl=600)
    assert (await get(proxy)).status == 200
    keys = [key async for key in redis_client.scan_iter(match=f"{KEY_PREFIX}c:*")]
    assert keys == [entry_key(Q).encode()]
    assert 710_000 < await redis_client.pttl(keys[0]) <= 720_000
    raw = await redis_client.get(keys[0])
    assert isinstance(raw, bytes)
    stored = CachedResponse.decode(raw)
    assert stored is not None
    assert stored.status == 200
    assert stored.fresh_until - stored.stored_at == 120
    assert stored.content_type.startswith("application/json")
    assert len((await (await get(proxy)).json())["rows"]) == 3
    assert mock_state.calls == 1
    assert [k async for k in redis_client.scan_iter(match=f"{KEY_PREFIX}l:*")] == []


async def test_large_bodies_are_compressed_in_redis_and_served_intact(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    query = "?format=json&limit=100"
    miss = await get(proxy, query)
    body = await miss.read()
    assert len(body) > 20_000
    raw = await redis_client.get(entry_key(query))
    assert isinstance(raw, bytes)
    assert len(raw) < len(body) // 3
    hit = await get(proxy, query)
    assert status_params(hit)[0] == "hit"
    assert await hit.read() == body
    assert len((await hit.json())["rows"]) == 100
    assert mock_state.calls == 1


async def test_a_caller_that_leaves_does_not_waste_the_fetch(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    mock_state.faults.latency = 0.3
    proxy = await make_proxy(redis_client=redis_client)
    with pytest.raises(TimeoutError):
        await proxy.get(REPORT + Q, headers=auth(), timeout=aiohttp.ClientTimeout(total=0.1))

    async def stored() -> bool:
        return bool(await redis_client.exists(entry_key(Q)))

    await eventually(stored)
    assert status_params(await get(proxy))[0] == "hit"
    assert mock_state.calls == 1


async def test_csv_answers_are_cached_with_their_headers(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    miss = await get(proxy, "?limit=2")
    hit = await get(proxy, "?limit=2&format=csv")
    assert is_stored_miss(miss)
    assert status_params(hit)[0] == "hit"
    assert hit.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in hit.headers["Content-Disposition"]
    assert await hit.read() == await miss.read()
    assert mock_state.calls == 1


async def test_embedded_store_without_redis(make_proxy: MakeProxy, mock_state: MockState) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock)
    assert is_stored_miss(await get(proxy))
    clock.advance(1)
    assert (await get(proxy)).headers["Cache-Status"] == "teamup-proxy; hit; ttl=299"
    assert mock_state.calls == 1


async def test_hit_after_a_proxy_restart_comes_from_redis(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    clock = FakeClock()
    first = await make_proxy(redis_url=redis_url, clock=clock)
    assert is_stored_miss(await get(first))
    await first.close()

    clock.advance(30)
    second = await make_proxy(redis_url=redis_url, clock=clock)
    hit = await get(second)
    assert hit.status == 200
    assert hit.headers["Cache-Status"] == "teamup-proxy; hit; ttl=270"
    assert hit.headers["Age"] == "30"
    assert mock_state.calls == 1


# --- single flight -------------------------------------------------------------------------


async def test_concurrent_identical_misses_make_one_call(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    mock_state.faults.latency = 0.3
    proxy = await make_proxy(redis_client=redis_client)
    responses = await asyncio.gather(*(get(proxy) for _ in range(50)))
    assert mock_state.calls == 1
    assert [r.status for r in responses] == [200] * 50
    assert len({await r.read() for r in responses}) == 1
    leaders = [r for r in responses if is_stored_miss(r)]
    assert len(leaders) == 1
    followers = [status_params(r) for r in responses if r is not leaders[0]]
    assert all("collapsed" in params or params[0] == "hit" for params in followers)
    assert sum("collapsed" in params for params in followers) >= 40


async def test_waits_for_the_entry_another_replica_is_fetching(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock)
    lease = f"{KEY_PREFIX}l:{{{cache_key(Q)}}}"
    await redis_client.set(lease, "other-replica", px=10_000)
    waiting = asyncio.create_task(get(proxy))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    assert mock_state.calls == 0

    body = b'{"total": 0, "column_headers": [], "rows": []}'
    other = CachedResponse(
        200, (("Content-Type", "application/json"),), body, clock(), clock() + 300
    )
    await RedisCacheStore(redis_client, KEY_PREFIX).set(cache_key(Q), other, 3900)
    response = await asyncio.wait_for(waiting, 5)
    assert response.status == 200
    assert await response.read() == body
    assert status_params(response) == ["fwd=uri-miss", "collapsed"]
    assert mock_state.calls == 0


async def test_fetches_itself_when_the_other_replica_gives_up(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    lease = f"{KEY_PREFIX}l:{{{cache_key(Q)}}}"
    await redis_client.set(lease, "other-replica", px=10_000)
    waiting = asyncio.create_task(get(proxy))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    await redis_client.delete(lease)  # its fetch failed (nothing stored), or it died
    response = await asyncio.wait_for(waiting, 5)
    assert response.status == 200
    assert is_stored_miss(response)
    assert mock_state.calls == 1
    assert await redis_client.exists(lease) == 0  # our own lease was released


async def test_wait_for_another_replica_is_bounded(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client, flight_wait_timeout=0.2)
    await redis_client.set(f"{KEY_PREFIX}l:{{{cache_key(Q)}}}", "stuck", px=60_000)
    started = time.monotonic()
    response = await get(proxy)
    assert response.status == 200
    assert time.monotonic() - started < 3
    assert mock_state.calls == 1


# --- stale answers -------------------------------------------------------------------------


async def test_stale_while_revalidate_refreshes_once(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock, cache_ttl=300)
    original = await get(proxy)
    clock.advance(310)
    mock_state.faults.latency = 0.3

    stale = await asyncio.gather(*(get(proxy) for _ in range(20)))
    for response in stale:
        assert response.status == 200
        assert response.headers["Cache-Status"] == "teamup-proxy; hit; fwd=stale; ttl=-10"
        assert response.headers["Age"] == "310"
        assert await response.read() == await original.read()
    more = await get(proxy)  # while the refresh is still running: stale, no second refresh
    assert status_params(more)[:2] == ["hit", "fwd=stale"]

    async def refreshed() -> bool:
        return status_params(await get(proxy)) == ["hit", "ttl=300"]

    await eventually(refreshed)
    assert mock_state.calls == 2
    fresh = await get(proxy)
    assert fresh.headers["Age"] == "0"
    assert mock_state.calls == 2


async def test_without_stale_while_revalidate_a_stale_entry_is_fetched_first(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        redis_client=redis_client, clock=clock, cache_stale_while_revalidate=False
    )
    await get(proxy)
    clock.advance(301)
    response = await get(proxy)
    assert response.status == 200
    assert "fwd=stale" not in status_params(response)
    assert "stored" in status_params(response)
    assert response.headers["Age"] == "0"
    assert mock_state.calls == 2
    assert (await get(proxy)).headers["Cache-Status"] == "teamup-proxy; hit; ttl=300"
    assert mock_state.calls == 2


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"status": 500}, "fwd-status=500"),
        ({"status": 503}, "fwd-status=503"),
        ({"status": 429, "retry_after": 30}, "fwd-status=429"),
        ({"hang": True}, "detail=timeout"),
        ({"drop": True}, "detail=unreachable"),
    ],
    ids=["500", "503", "429", "timeout", "connection-error"],
)
async def test_stale_is_served_when_upstream_fails(
    make_proxy: MakeProxy,
    mock_state: MockState,
    redis_client: aioredis.Redis,
    fault: dict[str, object],
    reason: str,
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        redis_client=redis_client,
        clock=clock,
        cache_stale_while_revalidate=False,
        upstream_timeout=0.2,
    )
    original = await get(proxy)
    clock.advance(400)
    for name, value in fault.items():
        setattr(mock_state.faults, name, value)
    response = await get(proxy)
    assert response.status == 200
    assert await response.read() == await original.read()
    assert response.headers["Cache-Status"] == (f"teamup-proxy; hit; fwd=stale; ttl=-100; {reason}")
    assert response.headers["Age"] == "400"
    assert mock_state.calls >= 2
    # The failure was not stored over the good entry.
    raw = await redis_client.get(entry_key(Q))
    assert isinstance(raw, bytes)
    kept = CachedResponse.decode(raw)
    assert kept is not None and kept.status == 200 and kept.body == await original.read()


async def test_after_upstream_429_stale_is_served_without_calling_again(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock)
    await get(proxy)
    clock.advance(301)
    mock_state.faults.status = 429
    mock_state.faults.retry_after = 60
    for _ in range(5):
        response = await get(proxy)
        assert response.status == 200
        assert status_params(response)[:2] == ["hit", "fwd=stale"]
        await asyncio.sleep(0.05)  # let a background refresh (if any) run
    assert mock_state.calls == 2  # the prime, then one 429; the circuit stops the rest
    ready = await proxy.get("/readyz")
    assert ready.status == 200
    assert (await ready.json())["checks"]["upstream"] == "circuit-open"


async def test_stale_is_served_when_the_budget_is_spent(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        redis_client=redis_client,
        clock=clock,
        upstream_rate_limit="1/hour",
        cache_stale_while_revalidate=False,
    )
    await get(proxy)
    clock.advance(301)
    response = await get(proxy)
    assert response.status == 200
    assert response.headers["Cache-Status"] == (
        "teamup-proxy; hit; fwd=stale; ttl=-1; detail=budget"
    )
    missing = await get(proxy, Q_OTHER)
    assert missing.status == 503
    assert "Retry-After" in missing.headers
    assert mock_state.calls == 1


async def test_stale_with_revalidate_on_upstream_500(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock)
    original = await get(proxy)
    clock.advance(305)
    mock_state.faults.status = 500

    async def refresh_failed() -> bool:
        response = await get(proxy)
        assert response.status == 200
        assert await response.read() == await original.read()
        assert response.headers["Cache-Status"] == "teamup-proxy; hit; fwd=stale; ttl=-5"
        return mock_state.calls >= 2

    await eventually(refresh_failed)
    assert (await redis_client.exists(entry_key(Q))) == 1
    calls = mock_state.calls
    for _ in range(10):  # while TeamUp fails, stale answers do not each cost a refresh
        assert (await get(proxy)).status == 200
    await asyncio.sleep(0.05)
    assert mock_state.calls == calls
    mock_state.faults.status = None
    clock.advance(REFRESH_BACKOFF)
    await eventually(lambda: _is_fresh_hit(proxy))


async def _is_fresh_hit(proxy: Proxy) -> bool:
    return status_params(await get(proxy))[0:2] == ["hit", "ttl=300"]


async def test_past_the_stale_window_an_entry_is_not_used(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(
        redis_client=redis_client, clock=clock, cache_ttl=300, cache_stale_ttl=600
    )
    await get(proxy)
    mock_state.faults.status = 500  # the background refresh at 899 s fails too
    clock.advance(899)
    assert status_params(await get(proxy))[:2] == ["hit", "fwd=stale"]
    clock.advance(2)  # 901 s: past fresh (300) plus stale (600)
    response = await get(proxy)
    assert response.status == 502, (response.headers["Cache-Status"], mock_state.calls)
    assert mock_state.calls >= 2


# --- what is never stored ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"status": 500}, 502),
        ({"status": 502}, 502),
        ({"status": 503}, 502),
        ({"status": 404}, 404),
        ({"status": 401}, 502),
        ({"hang": True}, 504),
        ({"drop": True}, 502),
    ],
    ids=["500", "502", "503", "404", "401", "timeout", "connection-error"],
)
async def test_errors_are_never_cached(
    make_proxy: MakeProxy,
    mock_state: MockState,
    redis_client: aioredis.Redis,
    fault: dict[str, object],
    status: int,
) -> None:
    proxy = await make_proxy(redis_client=redis_client, upstream_timeout=0.2)
    for name, value in fault.items():
        setattr(mock_state.faults, name, value)
    for _ in range(2):
        failed = await get(proxy)
        assert failed.status == status
        assert "stored" not in status_params(failed)
    assert await redis_client.exists(entry_key(Q)) == 0
    calls = mock_state.calls
    assert calls >= 2  # the second request asked again: nothing was kept
    mock_state.faults.status = None
    mock_state.faults.hang = mock_state.faults.drop = False
    good = await get(proxy)
    assert good.status == 200
    assert is_stored_miss(good)
    assert mock_state.calls == calls + 1


async def test_upstream_429_without_stale_is_503_and_not_cached(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    mock_state.faults.status = 429
    mock_state.faults.retry_after = 20
    response = await get(proxy)
    assert response.status == 503
    assert int(response.headers["Retry-After"]) >= 19
    assert (await response.json())["code"] == "upstream_rate_limited"
    again = await get(proxy)
    assert again.status == 503
    assert mock_state.calls == 1  # the circuit holds further calls back
    assert [k async for k in redis_client.scan_iter(match=f"{KEY_PREFIX}c:*")] == []


@pytest.mark.parametrize(
    ("headers", "set_cookie", "stored"),
    [
        ({"Cache-Control": "no-store"}, False, False),
        ({"Cache-Control": "private"}, False, False),
        ({"Cache-Control": "private, max-age=600"}, False, False),
        ({"Cache-Control": "max-age=600, No-Store"}, False, False),
        ({}, True, False),
        ({"Cache-Control": "public, max-age=600"}, False, True),
    ],
    ids=["no-store", "private", "private-max-age", "no-store-mixed-case", "set-cookie", "public"],
)
async def test_upstream_cache_directives_and_cookies(
    make_proxy: MakeProxy,
    mock_state: MockState,
    redis_client: aioredis.Redis,
    headers: dict[str, str],
    set_cookie: bool,
    stored: bool,
) -> None:
    mock_state.faults.extra_headers = headers
    mock_state.faults.set_cookie = set_cookie
    proxy = await make_proxy(redis_client=redis_client)
    first = await get(proxy)
    second = await get(proxy)
    assert first.status == second.status == 200
    assert "Set-Cookie" not in first.headers and "Set-Cookie" not in second.headers
    assert ("stored" in status_params(first)) is stored
    assert mock_state.calls == (1 if stored else 2)
    assert await redis_client.exists(entry_key(Q)) == int(stored)


async def test_bodies_over_the_size_cap_are_answered_but_not_stored(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    probe = await make_proxy(redis_client=redis_client, cache_ttl=0, cache_stale_ttl=0)
    small = len(await (await get(probe, "?format=json&limit=1")).read())
    large = len(await (await get(probe, "?format=json&limit=20")).read())
    assert small < large
    await probe.close()
    mock_state.reset()

    proxy = await make_proxy(redis_client=redis_client, cache_max_body_bytes=small)
    for _ in range(2):
        big = await get(proxy, "?format=json&limit=20")
        assert big.status == 200
        assert len(await big.read()) == large
        assert "stored" not in status_params(big)
    assert mock_state.calls == 2
    await get(proxy, "?format=json&limit=1")
    assert status_params(await get(proxy, "?format=json&limit=1"))[0] == "hit"
    assert mock_state.calls == 3


def test_size_cap_default_is_8_mib() -> None:
    assert Settings.model_fields["cache_max_body_bytes"].default == 8 * 1024 * 1024


# --- caller Cache-Control ------------------------------------------------------------------


async def test_caller_no_cache_is_ignored_by_default(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    await get(proxy)
    for value in ("no-cache", "no-cache, max-age=0", "No-Cache"):
        response = await get(proxy, **{"Cache-Control": value})
        assert status_params(response)[0] == "hit"
    assert mock_state.calls == 1


async def test_caller_no_cache_refetches_when_honoured(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock, honor_client_no_cache=True)
    await get(proxy)
    clock.advance(100)
    assert (await get(proxy)).headers["Cache-Status"] == "teamup-proxy; hit; ttl=200"
    response = await get(proxy, **{"Cache-Control": "no-cache"})
    assert response.status == 200
    params = status_params(response)
    assert "fwd=request" in params and "stored" in params
    assert response.headers["Age"] == "0"
    assert mock_state.calls == 2
    assert (await get(proxy)).headers["Cache-Status"] == "teamup-proxy; hit; ttl=300"
    assert mock_state.calls == 2


async def test_a_no_cache_request_waiting_on_another_replica_wants_a_newer_entry(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    """What was stored before the caller said no-cache will not do, even while another replica
    holds the lease: it waits for that replica's newer entry."""
    clock = FakeClock()
    proxy = await make_proxy(redis_client=redis_client, clock=clock, honor_client_no_cache=True)
    old = await get(proxy)
    clock.advance(100)
    await redis_client.set(f"{KEY_PREFIX}l:{{{cache_key(Q)}}}", "other-replica", px=10_000)
    waiting = asyncio.create_task(get(proxy, **{"Cache-Control": "no-cache"}))
    await asyncio.sleep(0.1)
    assert not waiting.done()  # the entry in Redis is older than the request
    body = b'{"total": 0, "column_headers": [], "rows": ["newer"]}'
    newer = CachedResponse(200, (("Content-Type", "application/json"),), body, clock() + 1, 1e10)
    await RedisCacheStore(redis_client, KEY_PREFIX).set(cache_key(Q), newer, 3900)
    response = await asyncio.wait_for(waiting, 5)
    assert await response.read() == body != await old.read()
    assert status_params(response) == ["fwd=request", "collapsed"]
    assert mock_state.calls == 1


# --- admin purge ---------------------------------------------------------------------------


async def test_purge_one_entry_and_everything(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    admin = auth(ADMIN_KEY)
    await get(proxy, Q)
    await get(proxy, Q_OTHER)
    assert mock_state.calls == 2

    one = await proxy.delete("/admin/cache" + Q_RESPELLED, headers=admin)
    assert one.status == 200
    body = await one.json()
    assert body["purged"] == 1
    assert body["canonical_query"] == "format=json&limit=3"
    assert is_stored_miss(await get(proxy, Q))
    assert status_params(await get(proxy, Q_OTHER))[0] == "hit"
    assert mock_state.calls == 3

    absent = await proxy.delete("/admin/cache?format=json&limit=9", headers=admin)
    assert (await absent.json())["purged"] == 0

    everything = await proxy.delete("/admin/cache", headers=admin)
    assert everything.status == 200
    assert (await everything.json()) == {"purged": 2, "shared": True}
    assert [k async for k in redis_client.scan_iter(match=f"{KEY_PREFIX}c:*")] == []
    assert is_stored_miss(await get(proxy, Q))
    assert is_stored_miss(await get(proxy, Q_OTHER))
    assert mock_state.calls == 5

    bad = await proxy.delete("/admin/cache?limit=abc", headers=admin)
    assert bad.status == 400


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (auth(KEY), 403),
        (auth(OTHER_KEY), 403),
        ({"X-API-Key": KEY}, 403),
        ({}, 401),
        (auth("not-a-key"), 401),
    ],
    ids=["caller", "other-caller", "caller-x-api-key", "none", "wrong"],
)
async def test_purge_needs_the_admin_key(
    make_proxy: MakeProxy,
    mock_state: MockState,
    redis_client: aioredis.Redis,
    headers: dict[str, str],
    status: int,
) -> None:
    proxy = await make_proxy(redis_client=redis_client)
    await get(proxy)
    for path in ("/admin/cache", "/admin/cache" + Q):
        response = await proxy.delete(path, headers=headers)
        assert response.status == status
    assert status_params(await get(proxy))[0] == "hit"
    assert mock_state.calls == 1


async def test_purge_is_off_without_an_admin_key(
    make_proxy: MakeProxy, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client, admin_key_sha256=None)
    assert (await proxy.delete("/admin/cache", headers=auth(ADMIN_KEY))).status == 404


# --- bursts and Redis outages --------------------------------------------------------------


async def test_a_burst_of_500_requests_never_gets_a_5xx(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    mock_state.faults.latency = 0.3
    # The 500 clients, the proxy and the mock share this test's one event loop: on a loaded
    # machine a turn of it can outlast the default 100 ms Redis timeout, which then (rightly)
    # fails over to the in-process store and refetches, and that is not what this test is
    # about. With timeouts no starved loop reaches, every answer must still come from one call
    # per query through a pool of 16 connections, and no Redis call may fail.
    proxy = await make_proxy(
        redis_url=redis_url, redis_max_connections=16, redis_timeout=5, upstream_timeout=10
    )
    queries = [f"?format=json&limit={n}" for n in range(1, 6)]
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int) -> int:
            key = KEY if i % 2 else OTHER_KEY
            url = proxy.make_url(REPORT + queries[i % len(queries)])
            async with session.get(url, headers=auth(key)) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(500)))
    assert [s for s in statuses if s >= 500] == []
    assert set(statuses) == {200}
    assert mock_state.calls == len(queries)
    ready = await (await proxy.get("/readyz")).json()
    assert ready["checks"]["redis"] == "ok"
    metrics = await (await proxy.get("/metrics")).text()
    assert "teamup_proxy_redis_errors_total{" not in metrics


async def test_redis_outage_and_recovery(
    make_proxy: MakeProxy, mock_state: MockState, own_redis: RedisServer, json_logs: LogLines
) -> None:
    proxy = await make_proxy(redis_url=own_redis.url, redis_retry_interval=0.1, **FAST_LIMITS)
    ready = await proxy.get("/readyz")
    assert await ready.json() == {"status": "ok", "checks": {"redis": "ok", "upstream": "ok"}}
    assert is_stored_miss(await get(proxy, Q))
    with own_redis.client() as sync:
        assert sync.exists(entry_key(Q)) == 1

    # Redis dies while requests are in flight (their lease and their store are in Redis).
    q_flight = "?format=json&limit=7"
    mock_state.faults.latency = 0.3
    in_flight = [asyncio.create_task(get(proxy, q_flight)) for _ in range(10)]
    for _ in range(500):
        if mock_state.calls == 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.to_thread(own_redis.stop)
    assert [r.status for r in await asyncio.gather(*in_flight)] == [200] * 10
    assert mock_state.calls == 2
    mock_state.faults.latency = 0

    answers = []
    for query in (Q, Q, Q_OTHER, Q_OTHER, Q, q_flight):
        started = time.monotonic()
        response = await get(proxy, query)
        assert time.monotonic() - started < 2
        assert response.status == 200
        answers.append(status_params(response)[0])
    # Cached meanwhile in this process: a miss each, then hits from the in-process store.
    assert answers == ["fwd=uri-miss", "hit", "fwd=uri-miss", "hit", "hit", "hit"]
    assert mock_state.calls == 4
    ready = await proxy.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {
        "status": "degraded",
        "checks": {"redis": "down", "upstream": "ok"},
    }
    downs = [r for r in json_logs.records() if r.get("event") == "redis_down"]
    assert len(downs) == 1

    await asyncio.to_thread(own_redis.start)

    async def redis_back() -> bool:
        body = await (await proxy.get("/readyz")).json()
        return bool(body == {"status": "ok", "checks": {"redis": "ok", "upstream": "ok"}})

    await eventually(redis_back)
    q_new = "?format=json&limit=5"
    assert is_stored_miss(await get(proxy, q_new))
    with own_redis.client() as sync:
        assert sync.exists(entry_key(q_new)) == 1
    # What was cached only in process memory during the outage is not trusted any more.
    assert is_stored_miss(await get(proxy, Q))
    with own_redis.client() as sync:
        assert sync.exists(entry_key(Q)) == 1
    assert status_params(await get(proxy, Q))[0] == "hit"
    assert mock_state.calls == 6
    assert any(r.get("event") == "redis_up" for r in json_logs.records())


async def test_a_paused_redis_costs_a_short_timeout_not_a_hang(
    make_proxy: MakeProxy, mock_state: MockState, own_redis: RedisServer
) -> None:
    proxy = await make_proxy(redis_url=own_redis.url, redis_retry_interval=0.1, **FAST_LIMITS)
    assert is_stored_miss(await get(proxy, Q))
    assert own_redis.process is not None
    own_redis.process.send_signal(signal.SIGSTOP)  # alive, accepting, never answering
    try:
        for query in (Q, Q_OTHER, Q_OTHER):
            started = time.monotonic()
            response = await get(proxy, query)
            assert response.status == 200
            assert time.monotonic() - started < 2
        ready = await proxy.get("/readyz")
        assert ready.status == 200
        assert (await ready.json())["checks"]["redis"] == "down"
    finally:
        own_redis.process.send_signal(signal.SIGCONT)

    async def redis_back() -> bool:
        return bool((await (await proxy.get("/readyz")).json())["checks"]["redis"] == "ok")

    await eventually(redis_back)
    # No reply from before the pause is mistaken for a later command's.
    for query, rows in ((Q, 3), ("?format=json&limit=6", 6), ("?format=json&limit=6", 6)):
        response = await get(proxy, query)
        assert response.status == 200
        assert len((await response.json())["rows"]) == rows
    with own_redis.client() as sync:
        assert sync.exists(entry_key("?format=json&limit=6")) == 1


async def test_a_redis_command_error_is_not_an_outage(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    proxy = await make_proxy(redis_client=client)
    assert (await get(proxy)).status == 200
    # Someone else's value under our entry key: GET answers WRONGTYPE for that key only.
    key = entry_key(Q)
    await client.delete(key)
    await client.lpush(key, "not an entry")
    response = await get(proxy)
    assert response.status == 200
    ready = await (await proxy.get("/readyz")).json()
    assert ready["checks"]["redis"] == "ok"
    await client.aclose()
