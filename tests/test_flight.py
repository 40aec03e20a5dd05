"""Single-flight: in-process futures, and the cross-replica Redis lease (fakeredis and real)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from proxy.backends.flight import LOCAL_TOKEN, VANISHED, Failed, LocalFlight, RedisLease
from proxy.backends.link import RedisLink, connect_redis
from proxy.backends.stores import RedisCacheStore
from proxy.core.entry import CachedResponse
from proxy.testing.support import free_port

PREFIX = "flight-test:"
T0 = 1_700_000_000.0


def entry(stored_at: float = T0, body: bytes = b"{}") -> CachedResponse:
    return CachedResponse(
        200, (("Content-Type", "application/json"),), body, stored_at, stored_at + 300
    )


# --- LocalFlight ---------------------------------------------------------------------------


async def test_concurrent_callers_share_one_run() -> None:
    flight: LocalFlight[int] = LocalFlight()
    runs = 0
    release = asyncio.Event()

    async def work() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        return 42

    callers = [asyncio.create_task(flight.run("k", work)) for _ in range(50)]
    await asyncio.sleep(0)
    assert "k" in flight
    release.set()
    results = await asyncio.gather(*callers)
    assert runs == 1
    assert [value for value, _ in results] == [42] * 50
    assert [collapsed for _, collapsed in results].count(False) == 1
    assert "k" not in flight


async def test_a_finished_flight_is_not_a_cache() -> None:
    flight: LocalFlight[int] = LocalFlight()
    runs = 0

    async def work() -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await flight.run("k", work) == (1, False)
    await asyncio.sleep(0)
    assert await flight.run("k", work) == (2, False)


async def test_different_keys_run_separately() -> None:
    flight: LocalFlight[str] = LocalFlight()
    release = asyncio.Event()

    async def work(name: str) -> str:
        await release.wait()
        return name

    a = asyncio.create_task(flight.run("a", lambda: work("a")))
    b = asyncio.create_task(flight.run("b", lambda: work("b")))
    await asyncio.sleep(0)
    release.set()
    assert await a == ("a", False)
    assert await b == ("b", False)


async def test_an_error_goes_to_every_caller_and_is_not_remembered() -> None:
    flight: LocalFlight[int] = LocalFlight()
    runs = 0
    release = asyncio.Event()

    async def failing() -> int:
        nonlocal runs
        runs += 1
        await release.wait()
        raise ValueError("upstream broke")

    callers = [asyncio.create_task(flight.run("k", failing)) for _ in range(10)]
    await asyncio.sleep(0)
    release.set()
    results = await asyncio.gather(*callers, return_exceptions=True)
    assert runs == 1
    assert all(isinstance(r, ValueError) and str(r) == "upstream broke" for r in results)
    await asyncio.sleep(0)

    async def working() -> int:
        return 7

    assert await flight.run("k", working) == (7, False)


async def test_a_cancelled_caller_does_not_cancel_the_work() -> None:
    flight: LocalFlight[str] = LocalFlight()
    release = asyncio.Event()
    finished: list[str] = []

    async def work() -> str:
        await release.wait()
        finished.append("done")
        return "result"

    first = asyncio.create_task(flight.run("k", work))
    second = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert "k" in flight
    release.set()
    assert await second == ("result", True)
    assert finished == ["done"]


async def test_the_work_finishes_even_when_its_only_caller_leaves() -> None:
    flight: LocalFlight[str] = LocalFlight()
    release = asyncio.Event()
    finished = asyncio.Event()

    async def work() -> str:
        await release.wait()
        finished.set()
        return "stored"

    caller = asyncio.create_task(flight.run("k", work))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    # A caller arriving meanwhile joins the work still running.
    late = asyncio.create_task(flight.run("k", work))
    release.set()
    await asyncio.wait_for(finished.wait(), 2)
    assert await late == ("stored", True)


# --- RedisLease (fakeredis and a real redis-server) ----------------------------------------


@pytest.fixture
async def link(redis_client: aioredis.Redis) -> AsyncIterator[RedisLink]:
    yield RedisLink(redis_client, retry_interval=0.05)


def lease(link: RedisLink, *, lease_ms: int = 10_000, wait_timeout: float = 5.0) -> RedisLease:
    return RedisLease(link, PREFIX, lease_ms=lease_ms, wait_timeout=wait_timeout)


async def test_acquire_is_exclusive_and_expires(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    leases = lease(link, lease_ms=10_000)
    token = await leases.acquire("v1:k")
    assert token is not None and token != LOCAL_TOKEN
    assert await leases.acquire("v1:k") is None
    assert await lease(link).acquire("v1:k") is None  # another replica, same Redis
    assert leases.lease_key("v1:k") == "flight-test:l:{v1:k}"
    assert await redis_client.get(leases.lease_key("v1:k")) == token.encode()
    pttl = await redis_client.pttl(leases.lease_key("v1:k"))
    assert 9_000 < pttl <= 10_000  # a crashed holder's lease goes away by itself
    other = await leases.acquire("v1:other")
    assert other is not None and other != token


async def test_release_frees_the_key(link: RedisLink, redis_client: aioredis.Redis) -> None:
    leases = lease(link)
    token = await leases.acquire("k")
    assert token is not None
    await leases.release("k", token)
    assert await redis_client.exists(leases.lease_key("k")) == 0
    assert await leases.acquire("k") is not None


async def test_release_only_removes_our_own_lease(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    leases = lease(link)
    old = await leases.acquire("k")
    assert old is not None
    # Our lease ran out (simulated: it is gone) and another replica took the key.
    await redis_client.delete(leases.lease_key("k"))
    new = await lease(link).acquire("k")
    assert new is not None and new != old
    await leases.release("k", old)
    assert await redis_client.get(leases.lease_key("k")) == new.encode()
    await leases.release("k", "not-a-token")
    assert await redis_client.get(leases.lease_key("k")) == new.encode()
    await leases.release("k", new)
    assert await redis_client.exists(leases.lease_key("k")) == 0


async def test_wait_for_entry_returns_what_the_holder_stores(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    store = RedisCacheStore(redis_client, PREFIX)
    holder, waiter = lease(link), lease(link)
    assert await holder.acquire("k") is not None
    waiting = asyncio.create_task(waiter.wait_for_entry("k", store, None))
    await asyncio.sleep(0.03)
    assert not waiting.done()
    await store.set("k", entry(), 60)
    got = await asyncio.wait_for(waiting, 2)
    assert got == entry()


async def test_wait_for_entry_wants_one_newer_than_the_stale_copy(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    store = RedisCacheStore(redis_client, PREFIX)
    await store.set("k", entry(T0), 60)
    holder, waiter = lease(link), lease(link)
    assert await holder.acquire("k") is not None
    waiting = asyncio.create_task(waiter.wait_for_entry("k", store, newer_than=T0))
    await asyncio.sleep(0.03)
    assert not waiting.done()
    await store.set("k", entry(T0 + 5, b'{"new": 1}'), 60)
    got = await asyncio.wait_for(waiting, 2)
    assert isinstance(got, CachedResponse)
    assert got.stored_at == T0 + 5 and got.body == b'{"new": 1}'


async def test_wait_for_entry_gives_up_when_the_lease_ends_without_an_entry(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    store = RedisCacheStore(redis_client, PREFIX)
    holder, waiter = lease(link), lease(link, wait_timeout=10)
    token = await holder.acquire("k")
    assert token is not None
    waiting = asyncio.create_task(waiter.wait_for_entry("k", store, None))
    await asyncio.sleep(0.03)
    assert not waiting.done()
    started = time.monotonic()
    await holder.release("k", token)  # the holder stored nothing and left no note
    assert await asyncio.wait_for(waiting, 2) is VANISHED
    assert time.monotonic() - started < 1  # noticed long before the wait timeout


async def test_a_failed_holder_hands_its_failure_to_the_waiters(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    store = RedisCacheStore(redis_client, PREFIX)
    holder, waiter = lease(link), lease(link, wait_timeout=10)
    token = await holder.acquire("k")
    assert token is not None
    waiting = asyncio.create_task(waiter.wait_for_entry("k", store, None))
    await asyncio.sleep(0.03)
    await holder.release("k", token, b"upstream said 500")
    assert await asyncio.wait_for(waiting, 2) == Failed(b"upstream said 500")
    assert 0 < await redis_client.pttl(holder.failure_key("k")) <= 1000
    assert await holder.acquire("k") is not None  # the lease itself is free again


async def test_a_later_success_clears_an_earlier_failure_note(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    holder = lease(link)
    first = await holder.acquire("k")
    assert first is not None
    await holder.release("k", first, b"upstream said 500")
    second = await holder.acquire("k")
    assert second is not None
    await holder.release("k", second)  # this fetch succeeded (stored or not)
    assert await redis_client.exists(holder.failure_key("k")) == 0


async def test_wait_for_entry_gives_up_when_the_holder_vanishes(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    store = RedisCacheStore(redis_client, PREFIX)
    holder, waiter = lease(link), lease(link, wait_timeout=10)
    assert await holder.acquire("k") is not None
    waiting = asyncio.create_task(waiter.wait_for_entry("k", store, None))
    await asyncio.sleep(0.03)
    await redis_client.delete(holder.lease_key("k"))  # what expiry does to a crashed holder
    assert await asyncio.wait_for(waiting, 2) is VANISHED


async def test_wait_for_entry_is_bounded_by_its_timeout(
    link: RedisLink, redis_client: aioredis.Redis
) -> None:
    store = RedisCacheStore(redis_client, PREFIX)
    holder, waiter = lease(link), lease(link, wait_timeout=0.1)
    assert await holder.acquire("k") is not None
    assert await asyncio.wait_for(waiter.wait_for_entry("k", store, None), 2) is None
    assert await redis_client.exists(holder.lease_key("k")) == 1


async def test_without_redis_every_caller_fetches_locally() -> None:
    client = connect_redis(f"redis://127.0.0.1:{free_port()}/0", timeout=0.1, max_connections=4)
    link = RedisLink(client, retry_interval=0.05)
    try:
        leases = lease(link)
        started = time.monotonic()
        assert await leases.acquire("k") == LOCAL_TOKEN
        assert not link.up and link.status == "down"
        assert await leases.acquire("k") == LOCAL_TOKEN  # straight away, no second timeout
        await leases.release("k", LOCAL_TOKEN)
        assert time.monotonic() - started < 2
    finally:
        await link.close()


async def test_a_kept_lease_outlives_its_lifetime_and_a_dead_holders_does_not(
    redis_client: aioredis.Redis,
) -> None:
    link = RedisLink(redis_client, retry_interval=1)
    leases = lease(link, lease_ms=300)
    token = await leases.acquire("kept")
    assert token is not None
    async with leases.kept("kept", token):
        await asyncio.sleep(0.9)  # three lifetimes: a holder still queueing keeps it
        assert await redis_client.get(leases.lease_key("kept")) == token.encode()
    await leases.release("kept", token)
    assert await redis_client.exists(leases.lease_key("kept")) == 0
    dead = await leases.acquire("dead")  # acquired, never kept: like a holder that crashed
    assert dead is not None
    await asyncio.sleep(0.45)
    assert await redis_client.exists(leases.lease_key("dead")) == 0
    other = await leases.acquire("dead")
    assert other is not None and other != dead
