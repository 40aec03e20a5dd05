"""Limits across a Redis outage (issue 20): the shares sum to the rate, a share starts full when
its process leaves Redis, and back on Redis every bucket starts full at the common moment."""

from __future__ import annotations

import math

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from proxy.backends.limiters import FallbackLimiter, MemoryLimiter, RedisLimiter, split
from proxy.backends.link import RedisLink
from proxy.core.gcra import Rate, gcra


def most_in_window(rate: Rate, processes: int, width: float) -> int:
    """Admissions `processes` greedy callers get from their shares in a window of `width`,
    each starting from an empty bucket (the worst case: all bursts at once)."""
    share = split(rate, processes)
    total = 0
    for _ in range(processes):
        tat, now = None, 0.0
        while now <= width:
            new, decision = gcra(tat, now, share)
            if decision.allowed:
                tat = new
                total += 1
            else:
                now += decision.retry_after + 1e-9
    return total


@given(
    limit=st.integers(1, 300),
    period=st.sampled_from([1.0, 60.0]),
    processes=st.integers(1, 24),
)
def test_the_shares_never_sum_above_the_rate(limit: int, period: float, processes: int) -> None:
    rate = Rate(limit, period)
    share = split(rate, processes)
    # The steady rates add up to at most the rate.
    assert processes / share.interval <= 1 / rate.interval + 1e-9
    if limit >= processes:  # the bursts too
        assert processes * share.limit <= limit


@pytest.mark.parametrize(("limit", "processes"), [(10, 2), (10, 4), (10, 12), (2, 3), (5, 4)])
def test_any_window_holds_what_gcra_allows(limit: int, processes: int) -> None:
    """Issue 20, 2: 12 workers and a burst of 10 made 288 calls in 60 s of 250 allowed."""
    rate = Rate(limit, limit * 0.25)  # a burst of `limit` at 240/minute
    for width in (rate.interval * max(processes, 1), 1.0, 60.0):
        if processes > limit and width < processes * rate.interval:
            continue  # more processes than the burst: bounded from k intervals on (README)
        allowed = limit + width / rate.interval
        assert most_in_window(rate, processes, width) <= allowed + 1e-9


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_share_starts_full_and_redis_starts_full_after_the_switch(
    redis_client: aioredis.Redis,
) -> None:
    clock = Clock()
    link = RedisLink(redis_client, retry_interval=0.1)
    rate = Rate(10, 10.0)  # a burst of 10, one per second
    limiter = FallbackLimiter(
        link,
        RedisLimiter(redis_client, "t:"),
        MemoryLimiter(clock=clock),
        lambda r: split(r, 2),
        settle=0.5,
        clock=clock,
    )
    # On Redis: the whole burst.
    assert [(await limiter.hit("k", rate)).allowed for _ in range(11)] == [True] * 10 + [False]
    # Off Redis: this process's share (5 at one per 2 s) starts full, not with a fresh burst.
    link.failed(ConnectionError("gone"), "test")
    link.down_since = clock.now
    assert not (await limiter.hit("k", rate)).allowed
    clock.now += 2.0
    assert (await limiter.hit("k", rate)).allowed
    assert not (await limiter.hit("k", rate)).allowed
    # Redis lost everything meanwhile; back, it waits for the common moment, then starts full.
    await redis_client.flushall()
    wait = await limiter.plan_return()
    assert 0 < wait <= 0.5
    assert await link.check()
    assert not limiter.on_redis  # still on the share until the common moment
    clock.now += wait
    assert limiter.on_redis
    decisions = [await limiter.hit("k", rate) for _ in range(3)]
    assert [d.allowed for d in decisions] == [False, False, False]  # no fresh burst
    assert math.isclose(decisions[0].retry_after, 1.0, abs_tol=0.05)
    await link.stop()
