"""GCRA: the pure maths, the in-memory limiter and the Redis Lua script, which must agree."""

from __future__ import annotations

import asyncio
import math

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from proxy.backends.limiters import Limiter, MemoryLimiter, RedisLimiter
from proxy.core.gcra import Rate, RateDecision, gcra, parse_rate
from proxy.testing.support import free_port

PER_MINUTE_10 = Rate(10, 60.0)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run(steps: list[tuple[float, int]], rate: Rate, tat: float | None = None) -> list[RateDecision]:
    """Fold gcra() over (now, cost) steps, keeping the stored tat as a store would."""
    decisions = []
    for now, cost in steps:
        new_tat, decision = gcra(tat, now, rate, cost)
        if new_tat is not None:
            tat = new_tat
        decisions.append(decision)
    return decisions


# --- pure GCRA ---------------------------------------------------------------------------


def test_burst_of_limit_then_denial() -> None:
    decisions = run([(0.0, 1)] * 11, PER_MINUTE_10)
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    assert all(d.limit == 10 for d in decisions)


def test_denial_returns_no_tat_and_changes_nothing() -> None:
    tat = 60.0  # ten hits at t=0
    new_tat, decision = gcra(tat, 0.0, PER_MINUTE_10)
    assert new_tat is None
    assert not decision.allowed
    assert decision.reset_after == 60.0


def test_refill_one_per_interval() -> None:
    tat = 60.0
    assert not gcra(tat, 5.999, PER_MINUTE_10)[1].allowed
    new_tat, decision = gcra(tat, 6.0, PER_MINUTE_10)
    assert decision.allowed
    assert decision.remaining == 0
    assert new_tat == 66.0
    assert not gcra(new_tat, 6.0, PER_MINUTE_10)[1].allowed


def test_retry_after_is_exact() -> None:
    tat = 60.0
    assert gcra(tat, 0.0, PER_MINUTE_10)[1].retry_after == 6.0
    assert gcra(tat, 2.5, PER_MINUTE_10)[1].retry_after == 3.5
    assert gcra(tat, 6.0, PER_MINUTE_10)[1].retry_after == 0.0


def test_remaining_after_partial_refill() -> None:
    tat = 60.0
    peeked = gcra(tat, 15.0, PER_MINUTE_10, 0)[1]  # 2.5 intervals have passed
    assert peeked.remaining == 2
    assert gcra(tat, 15.0, PER_MINUTE_10)[1].remaining == 1


def test_reset_after_is_time_until_full() -> None:
    assert gcra(None, 0.0, PER_MINUTE_10, 0)[1].reset_after == 0.0
    assert gcra(None, 0.0, PER_MINUTE_10)[1].reset_after == 6.0
    assert gcra(30.0, 10.0, PER_MINUTE_10)[1].reset_after == 26.0
    assert gcra(30.0, 45.0, PER_MINUTE_10, 0)[1].reset_after == 0.0


def test_tat_in_the_past_is_a_full_bucket() -> None:
    assert gcra(5.0, 100.0, PER_MINUTE_10, 0) == gcra(None, 100.0, PER_MINUTE_10, 0)
    new_tat, decision = gcra(5.0, 100.0, PER_MINUTE_10)
    assert new_tat == 106.0
    assert decision.remaining == 9


def test_cost_above_one() -> None:
    decisions = run([(0.0, 4), (0.0, 4), (0.0, 3), (0.0, 2), (0.0, 1)], PER_MINUTE_10)
    assert [d.allowed for d in decisions] == [True, True, False, True, False]
    assert [d.remaining for d in decisions] == [6, 2, 2, 0, 0]
    assert decisions[2].retry_after == 6.0
    assert decisions[4].retry_after == 6.0


def test_cost_equal_to_limit_fits_a_full_bucket() -> None:
    new_tat, decision = gcra(None, 0.0, PER_MINUTE_10, 10)
    assert decision.allowed
    assert new_tat == 60.0


def test_cost_above_limit_is_never_allowed() -> None:
    new_tat, decision = gcra(None, 0.0, PER_MINUTE_10, 11)
    assert new_tat is None
    assert not decision.allowed
    assert decision.remaining == 10
    assert decision.retry_after == math.inf
    assert decision.retry_after_header == "86400"


def test_cost_zero_is_a_peek() -> None:
    new_tat, decision = gcra(60.0, 0.0, PER_MINUTE_10, 0)
    assert new_tat is None
    assert decision.allowed
    assert decision.remaining == 0
    assert decision.retry_after == 0.0


def test_negative_cost_is_rejected() -> None:
    with pytest.raises(ValueError, match="cost"):
        gcra(None, 0.0, PER_MINUTE_10, -1)


@pytest.mark.parametrize("text", ["1/second", "3/second", "250/minute", "7/hour", "1/hour"])
def test_rates_per_second_minute_hour(text: str) -> None:
    rate = parse_rate(text)
    start = 123_456.789  # a monotonic-sized clock, so float error is realistic
    decisions = run([(start, 1)] * (rate.limit + 1), rate)
    assert [d.allowed for d in decisions] == [True] * rate.limit + [False]
    assert decisions[-1].retry_after == pytest.approx(rate.interval)
    assert decisions[-2].reset_after == pytest.approx(rate.period)
    tat = start + rate.period
    assert gcra(tat, start + rate.interval, rate)[1].allowed
    assert not gcra(tat, start + rate.interval * 0.999, rate)[1].allowed


@pytest.mark.parametrize(
    ("retry_after", "header"),
    [(0.0, "1"), (0.2, "1"), (1.0, "1"), (1.01, "2"), (5.999, "6"), (3600.0, "3600")],
)
def test_retry_after_header_rounds_up(retry_after: float, header: str) -> None:
    assert RateDecision(False, 10, 0, 60.0, retry_after).retry_after_header == header


def test_retry_after_header_when_allowed() -> None:
    assert RateDecision(True, 10, 3, 42.0, 0.0).retry_after_header == "0"


# --- MemoryLimiter -----------------------------------------------------------------------


async def test_memory_limiter_burst_and_refill() -> None:
    clock = FakeClock()
    limiter: Limiter = MemoryLimiter(clock)
    decisions = [await limiter.hit("alice", PER_MINUTE_10) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert decisions[-1].retry_after == 6.0
    clock.advance(6.0)
    assert (await limiter.hit("alice", PER_MINUTE_10)).allowed
    assert not (await limiter.hit("alice", PER_MINUTE_10)).allowed


async def test_memory_limiter_keys_are_independent() -> None:
    limiter = MemoryLimiter(FakeClock())
    for _ in range(10):
        await limiter.hit("alice", PER_MINUTE_10)
    assert not (await limiter.hit("alice", PER_MINUTE_10)).allowed
    bob = await limiter.hit("bob", PER_MINUTE_10)
    assert bob.allowed
    assert bob.remaining == 9


async def test_memory_limiter_peek_changes_nothing() -> None:
    limiter = MemoryLimiter(FakeClock())
    assert (await limiter.peek("alice", PER_MINUTE_10)).remaining == 10
    assert len(limiter) == 0
    await limiter.hit("alice", PER_MINUTE_10, 3)
    first = await limiter.peek("alice", PER_MINUTE_10)
    assert first == await limiter.peek("alice", PER_MINUTE_10)
    assert first.remaining == 7
    assert (await limiter.hit("alice", PER_MINUTE_10)).remaining == 6


async def test_memory_limiter_drops_full_buckets_first_then_oldest() -> None:
    clock = FakeClock(0.0)
    limiter = MemoryLimiter(clock, max_keys=3)
    fast, slow = Rate(1, 1.0), Rate(1, 3600.0)
    await limiter.hit("a", fast)
    await limiter.hit("b", slow)
    await limiter.hit("c", slow)
    clock.advance(2.0)  # "a" is full again, so forgetting it loses nothing
    await limiter.hit("d", slow)
    assert len(limiter) == 3
    assert not (await limiter.hit("b", slow)).allowed
    assert not (await limiter.hit("c", slow)).allowed
    await limiter.hit("e", slow)  # nothing is full: the least recently spent ("b") goes
    assert len(limiter) == 3
    assert (await limiter.hit("b", slow)).allowed
    assert not (await limiter.hit("d", slow)).allowed


async def test_memory_limiter_denials_do_not_grow_it() -> None:
    limiter = MemoryLimiter(FakeClock())
    await limiter.hit("alice", PER_MINUTE_10, 11)
    await limiter.peek("bob", PER_MINUTE_10)
    assert len(limiter) == 0


def test_memory_limiter_needs_room_for_a_key() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        MemoryLimiter(max_keys=0)


# --- RedisLimiter (fakeredis and a real redis-server) ------------------------------------


async def test_redis_burst_then_denial(redis_client: aioredis.Redis) -> None:
    limiter: Limiter = RedisLimiter(redis_client, "rl:")
    rate = Rate(10, 3600.0)
    decisions = [await limiter.hit("alice", rate) for _ in range(11)]
    assert [d.allowed for d in decisions] == [True] * 10 + [False]
    assert [d.remaining for d in decisions] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    denied = decisions[-1]
    assert 0.0 < denied.retry_after <= 360.0
    assert 0.0 < denied.reset_after <= 3600.0
    assert decisions[0].retry_after == 0.0


# Long intervals, so the real clock's drift during the test cannot change a count.
@pytest.mark.parametrize("rate", [Rate(5, 3600.0), Rate(7, 3600.0)], ids=str)
async def test_redis_same_maths_as_pure_gcra(redis_client: aioredis.Redis, rate: Rate) -> None:
    limiter = RedisLimiter(redis_client, "rl:")
    costs = [1, 2, 0, 3, 1, 1, 6, 5, 2, 0]
    expected = run([(0.0, cost) for cost in costs], rate)
    got = [
        await (limiter.peek("k", rate) if cost == 0 else limiter.hit("k", rate, cost))
        for cost in costs
    ]
    assert [(d.allowed, d.remaining) for d in got] == [(d.allowed, d.remaining) for d in expected]
    assert all(d.retry_after == math.inf for d, c in zip(got, costs, strict=True) if c > rate.limit)


async def test_redis_keys_are_prefixed_and_independent(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(redis_client, "rl:client:")
    for _ in range(10):
        await limiter.hit("alice", PER_MINUTE_10)
    assert not (await limiter.hit("alice", PER_MINUTE_10)).allowed
    assert (await limiter.hit("bob", PER_MINUTE_10)).remaining == 9
    assert sorted(await redis_client.keys("*")) == [b"rl:client:alice", b"rl:client:bob"]
    stored = await redis_client.get("rl:client:alice")
    assert stored is not None
    seconds, micros = await redis_client.time()
    assert 0 < float(stored) - (seconds * 1000 + micros / 1000) <= 60_000


async def test_redis_peek_and_denial_write_nothing(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(redis_client, "rl:")
    assert (await limiter.peek("alice", PER_MINUTE_10)).remaining == 10
    assert not (await limiter.hit("alice", PER_MINUTE_10, 11)).allowed
    assert await redis_client.exists("rl:alice") == 0
    await limiter.hit("alice", PER_MINUTE_10, 4)
    assert (await limiter.peek("alice", PER_MINUTE_10)).remaining == 6
    assert (await limiter.peek("alice", PER_MINUTE_10)).remaining == 6


async def test_redis_keys_expire_when_full_again(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(redis_client, "rl:")
    await limiter.hit("alice", PER_MINUTE_10)
    assert 0 < await redis_client.pttl("rl:alice") <= 6_000
    for _ in range(10):
        await limiter.hit("alice", PER_MINUTE_10)
    assert 0 < await redis_client.pttl("rl:alice") <= 60_000
    assert 0 < await redis_client.ttl("rl:alice") <= 60


async def test_redis_exact_under_concurrency(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(redis_client, "rl:")
    decisions = await asyncio.gather(*(limiter.hit("busy", PER_MINUTE_10) for _ in range(100)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert sorted(d.remaining for d in allowed) == list(range(10))


async def test_redis_reloads_a_flushed_script(redis_client: aioredis.Redis) -> None:
    limiter = RedisLimiter(redis_client, "rl:")
    await limiter.hit("alice", PER_MINUTE_10)
    await redis_client.script_flush()
    assert (await limiter.hit("alice", PER_MINUTE_10)).remaining == 8


async def test_redis_errors_propagate() -> None:
    client = aioredis.Redis(port=free_port(), retry=Retry(NoBackoff(), 0))
    try:
        with pytest.raises(redis.exceptions.ConnectionError):
            await RedisLimiter(client, "rl:").hit("alice", PER_MINUTE_10)
    finally:
        await client.aclose()


# --- properties --------------------------------------------------------------------------

rates = st.builds(
    Rate, st.integers(min_value=1, max_value=20), st.sampled_from([1.0, 60.0, 3600.0])
)


@st.composite
def schedules(draw: st.DrawFn) -> tuple[Rate, list[tuple[float, int]]]:
    """A rate and (now, cost) steps: time moves by whole quarter-intervals or at random."""
    rate = draw(rates)
    quarter = st.integers(min_value=0, max_value=12).map(lambda k: k * rate.interval / 4)
    anywhere = st.floats(min_value=0.0, max_value=2 * rate.period)
    cost = st.integers(min_value=0, max_value=rate.limit + 1)
    increments = draw(st.lists(st.tuples(quarter | anywhere, cost), max_size=60))
    now, steps = 5_000.0, []
    for dt, c in increments:
        now += dt
        steps.append((now, c))
    return rate, steps


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_admissions_in_any_window_are_bounded(
    schedule: tuple[Rate, list[tuple[float, int]]],
) -> None:
    rate, steps = schedule
    decisions = run(steps, rate)
    admitted = [(now, cost) for (now, cost), d in zip(steps, decisions, strict=True) if d.allowed]
    for i, (start, _) in enumerate(admitted):
        spent = 0
        for end, cost in admitted[i:]:
            spent += cost
            bound = rate.limit + (end - start + 1e-6) / rate.interval
            assert spent <= bound + 1e-9


@settings(max_examples=300, deadline=None)
@given(schedules())
def test_remaining_is_what_can_be_spent_now(
    schedule: tuple[Rate, list[tuple[float, int]]],
) -> None:
    rate, steps = schedule
    tat: float | None = None
    for now, cost in steps:
        new_tat, decision = gcra(tat, now, rate, cost)
        assert 0 <= decision.remaining <= rate.limit
        assert 0.0 <= decision.reset_after <= rate.period + 1e-6
        assert decision.allowed == (decision.retry_after == 0.0)
        tat = tat if new_tat is None else new_tat
        probe = tat
        for _ in range(decision.remaining):
            probe, admitted = gcra(probe, now, rate)
            assert admitted.allowed
        assert not gcra(probe, now, rate)[1].allowed


@settings(max_examples=200, deadline=None)
@given(schedules())
async def test_memory_limiter_matches_pure_gcra(
    schedule: tuple[Rate, list[tuple[float, int]]],
) -> None:
    rate, steps = schedule
    clock = FakeClock()
    limiter = MemoryLimiter(clock)
    for (now, cost), expected in zip(steps, run(steps, rate), strict=True):
        clock.now = now
        got = await (limiter.peek("k", rate) if cost == 0 else limiter.hit("k", rate, cost))
        assert got == expected
