"""Auto-pipelining: concurrent commands share one round trip and still get their own answers."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from proxy.backends.limiters import RedisLimiter
from proxy.backends.pipelining import AutoPipelineRedis
from proxy.core.gcra import parse_rate
from proxy.testing.support import RedisServer


async def test_concurrent_gets_answer_each_caller(redis_client: aioredis.Redis) -> None:
    for i in range(50):
        await redis_client.set(f"k{i}", f"v{i}")
    pipelined = AutoPipelineRedis(redis_client)
    values = await asyncio.gather(*(pipelined.get(f"k{i}") for i in range(60)))
    assert values == [f"v{i}".encode() for i in range(50)] + [None] * 10


async def test_limiter_through_the_pipeline_stays_exact(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(AutoPipelineRedis(redis_client), "rl:")  # type: ignore[arg-type]
    rate = parse_rate("10/minute")
    decisions = await asyncio.gather(*(limiter.hit("c", rate) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 10


async def test_a_flushed_script_is_loaded_again(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(AutoPipelineRedis(redis_client), "rl:")  # type: ignore[arg-type]
    rate = parse_rate("5/minute")
    assert (await limiter.hit("c", rate)).allowed
    await redis_client.script_flush()
    assert (await limiter.hit("c", rate)).remaining == 3


async def test_a_command_error_reaches_only_its_caller(redis_client: aioredis.Redis) -> None:
    await redis_client.set("ok", "1")
    pipelined = AutoPipelineRedis(redis_client)
    results = await asyncio.gather(
        pipelined.get("ok"),
        pipelined.evalsha("0" * 40, 0),
        pipelined.get("ok"),
        return_exceptions=True,
    )
    assert results[0] == b"1" and results[2] == b"1"
    assert isinstance(results[1], ResponseError)


async def test_a_dead_server_fails_every_caller_fast(own_redis: RedisServer) -> None:
    client = aioredis.Redis(
        port=own_redis.port,
        socket_timeout=0.2,
        socket_connect_timeout=0.2,
        retry=Retry(NoBackoff(), 0),
    )
    pipelined = AutoPipelineRedis(client)
    assert await pipelined.get("x") is None
    own_redis.stop()
    results = await asyncio.gather(*(pipelined.get("x") for _ in range(5)), return_exceptions=True)
    # The error the fallbacks catch (REDIS_ERRORS), at once, for every caller of the batch.
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    with pytest.raises(RedisConnectionError, match=r"Connect call failed|Connection refused"):
        await pipelined.get("x")
    await pipelined.aclose()


async def test_set_pttl_exists_answer_like_the_plain_client(redis_client: aioredis.Redis) -> None:
    pipelined = AutoPipelineRedis(redis_client)
    won, lost = await asyncio.gather(
        pipelined.set("lease", "a", nx=True, px=5000), pipelined.set("lease", "b", nx=True)
    )
    assert (won, lost) == (True, None)  # in the order issued, as redis-py answers them
    ttl, there, missing = await asyncio.gather(
        pipelined.pttl("lease"), pipelined.exists("lease"), pipelined.exists("nothing")
    )
    assert 0 < ttl <= 5000 and (there, missing) == (1, 0)
    assert await redis_client.get("lease") == b"a"
