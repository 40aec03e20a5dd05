"""Collection generations (backends/generations.py) against fakeredis and a real redis-server:
a view may be used only for the interval after it was asked for, bumps are atomic and shared,
and a bump made while Redis is away still reaches it before it is read again."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from proxy.backends import keys
from proxy.backends.generations import Generations
from proxy.backends.link import RedisLink
from proxy.testing.e2e import FakeClock
from proxy.testing.support import RedisServer
from tests.test_cluster import client, cluster

__all__ = ["client", "cluster"]  # the Cluster fixtures, shared with test_cluster

PREFIX = "teamup-proxy:"


def worker(client: aioredis.Redis, clock: FakeClock, interval: float = 0.05) -> Generations:
    return Generations(RedisLink(client), client, PREFIX, interval=interval, clock=clock)


async def test_a_view_is_used_only_for_its_interval(redis_client: aioredis.Redis) -> None:
    clock = FakeClock(0.0)
    a, b = worker(redis_client, clock), worker(redis_client, clock)
    assert b.now("customers") is None  # never read: the general path must read it
    assert await b.get("customers") == 0
    assert b.now("customers") == 0  # young: no round trip
    assert await a.bump(["customers", "reports/customers"])
    assert await redis_client.hgetall(keys.generations(PREFIX)) == {
        b"customers": b"1",
        b"reports/customers": b"1",
    }
    assert await a.get("customers") == 1
    # Within the interval the other worker may still use its older view (the write has not
    # answered yet: it waits `interval` after its bump) ...
    clock.advance(0.049)
    assert b.now("customers") == 0
    # ... and past it, it may not: the next lookup reads the hash again.
    clock.advance(0.001)
    assert b.now("customers") is None
    assert await b.get("customers") == 1
    assert await b.get("events") == 0


async def test_interval_zero_reads_on_every_lookup(redis_client: aioredis.Redis) -> None:
    clock = FakeClock(0.0)
    a, b = worker(redis_client, clock, 0), worker(redis_client, clock, 0)
    assert await b.get("customers") == 0
    assert b.now("customers") is None
    await a.bump(["customers"])
    assert await b.get("customers") == 1


async def test_a_bump_while_redis_is_away_reaches_it_before_the_next_read(
    redis_client: aioredis.Redis,
) -> None:
    clock = FakeClock(0.0)
    link = RedisLink(redis_client, retry_interval=60)
    away = Generations(link, redis_client, PREFIX, interval=0.05, clock=clock)
    other = worker(redis_client, clock)
    await other.bump(["customers"])  # Redis: customers = 1
    assert await away.get("customers") == 1
    link.failed(ConnectionError("gone"), "test")
    assert not await away.bump(["customers"])  # local: this worker's keys move on at once
    assert away.now("customers") == 2
    assert await redis_client.hget(keys.generations(PREFIX), "customers") == b"1"
    assert await link.check()  # Redis answers again
    clock.advance(1)
    assert await away.get("customers") == 2  # the local bump was pushed first
    assert await redis_client.hget(keys.generations(PREFIX), "customers") == b"2"
    clock.advance(1)
    assert await other.get("customers") == 2
    await link.stop()


async def test_a_view_never_goes_back(redis_client: aioredis.Redis) -> None:
    clock = FakeClock(0.0)
    a = worker(redis_client, clock)
    await a.bump(["customers"])
    await a.bump(["customers"])
    await redis_client.delete(keys.generations(PREFIX))  # evicted, flushed
    clock.advance(1)
    # Entries of generation 0 or 1 may still be in Redis: never read them again.
    assert await a.get("customers") == 2


async def test_bumps_and_reads_on_a_cluster(client: RedisCluster) -> None:
    """One hash, one slot: the script adds and reads atomically on Redis Cluster too."""
    clock = FakeClock(0.0)
    a = Generations(RedisLink(client), client, PREFIX, interval=0.05, clock=clock)
    b = Generations(RedisLink(client), client, PREFIX, interval=0.05, clock=clock)
    assert await b.get("customers") == 0
    assert await a.bump(["customers", "reports/customers"])
    clock.advance(1)
    assert await b.get("customers") == 1
    assert await b.get("reports/customers") == 1


class SlowHash(aioredis.Redis):
    """A client whose HGETALL takes longer than the interval, and during which another
    request arrives: it is scheduled to run right after the read ends, before the read's
    done callbacks."""

    clock: FakeClock
    late: list[asyncio.Future[int]]
    spawn: Generations | None = None

    async def hgetall(self, name: Any) -> Any:
        found = await super().hgetall(name)
        self.clock.advance(1.0)  # the round trip outlived the interval
        if self.spawn is not None:
            self.late.append(asyncio.ensure_future(self.spawn.get("customers")))
            self.spawn = None
        return found


async def test_a_lookup_after_a_slow_read_reads_again_and_never_spins(
    redis_server: RedisServer,
) -> None:
    """A request that arrives as a slow read ends (view already too old, the read not yet
    forgotten) reads again. It used to loop on the finished read without ever yielding: the
    worker stopped answering anything (seen under 200 callers with 4 MiB socket buffers)."""
    calls = 0

    def clock() -> float:
        nonlocal calls
        calls += 1
        assert calls < 10_000, "Generations.get spins without yielding"
        return fake()

    fake = FakeClock(0.0)
    client = SlowHash.from_url(redis_server.url)
    assert isinstance(client, SlowHash)
    client.clock, client.late = fake, []
    gens = Generations(RedisLink(client), client, PREFIX, interval=0.05, clock=clock)
    try:
        client.spawn = gens
        assert await gens.get("customers") == 0
        assert len(client.late) == 1
        assert await asyncio.wait_for(client.late[0], 5) == 0
    finally:
        await client.aclose()
