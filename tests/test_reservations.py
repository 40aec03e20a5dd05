"""Reserved batches of a client's GCRA: the maths, the Lua twin, and the limit they keep.

A busy client is served from units each process reserved in one script call; the total
admitted over every process must never exceed what GCRA admits, and a low rate stays exact
request by request.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from typing import Any, cast

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestServer
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.backends.limiters import FallbackLimiter, MemoryLimiter, RedisLimiter
from proxy.backends.link import AnyRedis, RedisLink
from proxy.backends.pipelining import AutoPipelineRedis
from proxy.backends.reservations import RedisReserver, ReservingLimiter
from proxy.core.gcra import Rate, gcra, gcra_reserve
from proxy.testing.e2e import KEY, REPORT, auth
from proxy.testing.procs import ProxyProcess
from proxy.web.auth import hash_key
from tests.conftest import MakeProxy

PER_HOUR_1000 = Rate(1000, 3600.0)


def conforms(times: list[float], rate: Rate) -> bool:
    """Whether admissions at these moments are ones GCRA itself would have admitted."""
    tat = None
    for now in sorted(times):
        new_tat, decision = gcra(tat, now, rate)
        if not decision.allowed:
            return False
        tat = new_tat
    return True


# --- the pure maths ----------------------------------------------------------------------


def test_a_batch_of_one_is_plain_gcra() -> None:
    rate = Rate(10, 60.0)
    state: tuple[float, float] | None = None
    plain: float | None = None
    for now in (0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 40.0):
        new_state, reservation = gcra_reserve(state, now, rate, 1, lifetime=0.5)
        plain_new, decision = gcra(plain, now, rate)
        assert reservation.decision == decision
        assert reservation.granted == (1 if decision.allowed else 0)
        state = new_state or state
        plain = plain_new if plain_new is not None else plain


def test_a_batch_takes_what_fits_plus_one_deposit() -> None:
    rate = Rate(100, 100.0)  # one per second
    state, reservation = gcra_reserve(None, 0.0, rate, 30, lifetime=5.0)
    assert reservation.granted == 30
    # 30 intervals, and a deposit that keeps the tat minus the 29 held units 5 s ahead.
    assert state == pytest.approx((34.0, 5.0))
    assert reservation.decision.remaining == 66
    # The horizon already covers this lifetime: no second deposit, all 66 left fit.
    state, reservation = gcra_reserve(state, 0.0, rate, 80, lifetime=5.0)
    assert reservation.granted == 66
    assert state is not None and state[0] == pytest.approx(100.0)
    _, reservation = gcra_reserve(state, 0.0, rate, 80, lifetime=5.0)
    assert (reservation.granted, reservation.decision.allowed) == (0, False)
    assert reservation.decision.retry_after == pytest.approx(1.0)


def test_a_later_reservation_pays_only_for_the_time_that_passed() -> None:
    rate = Rate(1000, 100.0)  # ten per second
    state, _ = gcra_reserve(None, 0.0, rate, 10, lifetime=2.0)
    assert state == pytest.approx((1.0 + 1.9, 2.0))  # 10 units, deposit 2 - 0.1
    state, _ = gcra_reserve(state, 0.5, rate, 10, lifetime=2.0)
    # Covered until 2.0 already: a deposit of 2.5 - 2.0 - 0.1 = 0.4 more.
    assert state == pytest.approx((2.9 + 1.0 + 0.4, 2.5))


def test_a_batch_fetched_ahead_pays_for_every_held_unit() -> None:
    rate = Rate(100, 100.0)
    state, reservation = gcra_reserve(None, 0.0, rate, 10, lifetime=5.0, hold_all=True)
    assert reservation.granted == 10
    assert state == pytest.approx((15.0, 5.0))  # the deposit is the whole lifetime
    state, _ = gcra_reserve(None, 0.0, rate, 99, lifetime=0.0)
    _, reservation = gcra_reserve(state, 0.0, rate, 10, lifetime=0.0, hold_all=True)
    assert reservation.granted == 0  # one unit fits, but a batch ahead is never one unit


def test_a_batch_that_does_not_fit_falls_back_to_one() -> None:
    rate = Rate(100, 100.0)
    state, _ = gcra_reserve(None, 0.0, rate, 98, lifetime=0.0)
    state, reservation = gcra_reserve(state, 0.0, rate, 10, lifetime=2.5)
    assert reservation.granted == 1  # 2 units + a 1.5 s deposit do not fit in the 2 s left
    assert state is not None and state[0] == pytest.approx(99.0)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        gcra_reserve(None, 0.0, Rate(1, 1.0), 0, lifetime=0.0)
    with pytest.raises(ValueError):
        gcra_reserve(None, 0.0, Rate(1, 1.0), 1, lifetime=-1.0)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(2, 400),
    period=st.sampled_from([1.0, 10.0, 60.0]),
    processes=st.integers(1, 4),
    lifetime_share=st.floats(0.001, 0.5),
    seed=st.integers(0, 2**32 - 1),
)
def test_spent_reservations_never_exceed_the_rate(
    limit: int, period: float, processes: int, lifetime_share: float, seed: int
) -> None:
    """Processes reserving batches (some fetched ahead, holding every unit) and spending them
    up to the lifetime later, in any order, letting what they hold lapse: the admissions, at
    the moments they were spent, are a sequence plain GCRA admits (no window holds more than
    the rate)."""
    rng = random.Random(seed)
    rate = Rate(limit, period)
    lifetime = period * lifetime_share
    state: tuple[float, float] | None = None
    held: list[list[float]] = [[] for _ in range(processes)]  # deadlines of held units
    admitted: list[float] = []
    now = 0.0
    for _ in range(300):
        now += rng.expovariate(1.0) * rate.interval * rng.choice([0.05, 0.5, 2.0])
        p = rng.randrange(processes)
        held[p] = alive = [d for d in held[p] if now < d]
        if alive and rng.random() < 0.8:
            held[p].pop(0)  # oldest first
            admitted.append(now)
            continue
        want = rng.randint(1, max(1, limit // 4))
        ahead = bool(alive) and rng.random() < 0.5  # a batch fetched ahead of need
        new_state, reservation = gcra_reserve(state, now, rate, want, lifetime, hold_all=ahead)
        state = new_state or state
        if reservation.granted and not ahead:
            admitted.append(now)
            held[p].extend([now + lifetime] * (reservation.granted - 1))
        elif ahead:
            held[p].extend([now + lifetime] * reservation.granted)
    assert conforms(admitted, rate)


# --- the Lua twin (fakeredis and a real redis-server) -------------------------------------


@pytest.mark.parametrize("rate", [Rate(500, 3600.0), Rate(70, 3600.0)], ids=str)
async def test_lua_same_maths_as_pure(redis_client: aioredis.Redis, rate: Rate) -> None:
    reserver = RedisReserver(redis_client, "rl:")
    steps = [(1, 0.0, False), (40, 200.0, False), (2, 0.0, True), (400, 100.0, False)]
    steps += [(100, 300.0, True), (1, 0.0, False), (9, 0.0, False), (1, 0.0, False)]
    steps += [(3, 50.0, True), (600, 0.0, False), (5, 10.0, True)]
    state: tuple[float, float] | None = None
    for want, lifetime, ahead in steps:
        # Long periods: the few ms this test takes cannot change a count.
        new_state, expected = gcra_reserve(state, 0.0, rate, want, lifetime, hold_all=ahead)
        state = new_state or state
        got = await reserver.reserve("k", rate, want, lifetime, hold_all=ahead)
        assert (got.granted, got.decision.allowed, got.decision.remaining) == (
            expected.granted,
            expected.decision.allowed,
            expected.decision.remaining,
        )
        assert got.decision.reset_after == pytest.approx(expected.decision.reset_after, abs=0.05)


async def test_lua_key_lives_as_long_as_the_backlog(redis_client: aioredis.Redis) -> None:
    reserver = RedisReserver(redis_client, "rl:")
    await reserver.reserve("k", Rate(100, 10.0), 20, lifetime=0.5)
    assert 2_000 < await redis_client.pttl("rl:k") <= 2_400  # 20 x 0.1 s + the 0.4 s deposit
    # The plain script reads the tat of a reserving key (and sees the backlog).
    peek = await RedisLimiter(redis_client, "rl:").peek("k", Rate(100, 10.0))
    assert peek.remaining == 100 - 24


# --- the limiter in one process, on a real redis-server -----------------------------------


def limiter_on(client: aioredis.Redis, lifetime: float = 0.05) -> ReservingLimiter:
    """As `create_app` builds it: the scripts on the auto-pipelined client."""
    link = RedisLink(client)
    hot = cast(AnyRedis, AutoPipelineRedis(client))
    fallback = FallbackLimiter(link, RedisLimiter(hot, "rl:"), MemoryLimiter())
    return ReservingLimiter(link, RedisReserver(hot, "rl:"), fallback, lifetime=lifetime)


async def script_calls(client: aioredis.Redis) -> int:
    """EVALSHA + EVAL calls Redis has run so far (`INFO commandstats`)."""
    stats = await client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


@pytest.fixture
async def real_redis(redis_url: str) -> Any:
    client = aioredis.Redis.from_url(redis_url)
    await client.config_resetstat()
    yield client
    await client.aclose()


async def test_a_busy_client_costs_far_fewer_script_calls_than_requests(
    real_redis: aioredis.Redis,
) -> None:
    limiter = limiter_on(real_redis)
    rate = Rate(10000, 60.0)
    decisions = []
    for _ in range(20):
        decisions += await asyncio.gather(*(limiter.hit("busy", rate) for _ in range(100)))
    assert all(d.allowed for d in decisions)
    # A batch fetched ahead in the background may still be on its way to Redis: every call
    # the limiter made reaches it, none is made twice.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    calls = await script_calls(real_redis)
    while calls != limiter.script_calls and loop.time() < deadline:
        await asyncio.sleep(0.01)
        calls = await script_calls(real_redis)
    assert calls == limiter.script_calls
    assert calls <= len(decisions) / 20  # 2,000 requests, at most 100 round trips
    # The headers stay truthful: what the shared bucket says is left, give or take the units
    # this process holds and the deposit.
    peek = await RedisLimiter(real_redis, "rl:").peek("busy", rate)
    assert peek.remaining <= 8000
    assert abs(decisions[-1].remaining - peek.remaining) <= 156 + 10
    await limiter.close()


async def test_a_low_rate_is_exact_request_by_request(real_redis: aioredis.Redis) -> None:
    limiter = limiter_on(real_redis)
    rate = Rate(10, 60.0)
    decisions = await asyncio.gather(*(limiter.hit("slow", rate) for _ in range(100)))
    assert sum(d.allowed for d in decisions) == 10
    assert sorted(d.remaining for d in decisions if d.allowed) == list(range(10))
    assert await script_calls(real_redis) == 100  # never batched: one script call each
    one_by_one = Rate(5, 60.0)
    assert [(await limiter.hit("five", one_by_one)).allowed for _ in range(6)] == [True] * 5 + [
        False
    ]


async def test_a_busy_client_gets_its_limit_and_not_one_more(real_redis: aioredis.Redis) -> None:
    limiter = limiter_on(real_redis)
    decisions = []
    for _ in range(30):  # 3,000 requests, 100 at a time
        wave = await asyncio.gather(*(limiter.hit("burst", PER_HOUR_1000) for _ in range(100)))
        decisions += wave
    admitted = sum(d.allowed for d in decisions)
    assert limiter.link.up  # every decision came from Redis or from units reserved there
    # Refill in the second or so this takes: under one unit (one per 3.6 s).
    assert admitted <= 1001
    # What was reserved and not admitted lapsed: a few units, not a share of the limit.
    assert admitted >= 1000 - 15 and limiter.lapsed <= 15
    assert await script_calls(real_redis) < 3000 / 5
    denied = [d for d in decisions if not d.allowed]
    assert denied and all(0 < d.retry_after <= 3.6 for d in denied)


async def test_units_held_past_their_deadline_are_never_spent(real_redis: aioredis.Redis) -> None:
    limiter = limiter_on(real_redis, lifetime=0.05)
    rate = Rate(6400, 3600.0)  # batches of up to 100
    admitted = 0
    for _ in range(3):
        decisions = await asyncio.gather(*(limiter.hit("idle", rate) for _ in range(60)))
        admitted += sum(d.allowed for d in decisions)
    held = limiter._held["idle"].tokens
    assert held > 0  # this process holds units it has not spent
    shared = RedisLimiter(real_redis, "rl:")
    assert (await shared.peek("idle", rate)).remaining <= rate.limit - admitted - held
    await asyncio.sleep(0.1)  # past their deadline
    before = limiter.script_calls
    assert (await limiter.hit("idle", rate)).allowed
    assert limiter.script_calls == before + 1  # asked Redis: the held units had lapsed
    assert limiter.lapsed == held
    # Under-admission, bounded: the lapsed units stay spent in Redis until the bucket refills.
    after = await shared.peek("idle", rate)
    assert after.remaining >= rate.limit - admitted - held - limiter._held["idle"].tokens - 2


# --- end to end ------------------------------------------------------------------------------


async def test_hot_hits_of_a_busy_client_skip_redis(
    make_proxy: MakeProxy, real_redis: aioredis.Redis
) -> None:
    clients = {"billing": {"key_sha256": hash_key(KEY), "rate": "100000/minute"}}
    proxy = await make_proxy(clients=clients, redis_client=real_redis)
    first = await proxy.get(REPORT, headers=auth())
    assert first.status == 200
    await real_redis.config_resetstat()
    statuses = []
    for _ in range(10):
        responses = await asyncio.gather(*(proxy.get(REPORT, headers=auth()) for _ in range(50)))
        statuses += [r.status for r in responses]
        assert all("hit" in r.headers["Cache-Status"] for r in responses)
        assert all(r.headers["RateLimit-Policy"] == '"client";q=100000;w=60' for r in responses)
    assert statuses == [200] * 500
    assert await script_calls(real_redis) <= 50


async def test_two_processes_never_exceed_the_rate_in_total(
    mock_server: TestServer, redis_url: str
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    config = f'{{"billing": {{"key_sha256": "{hash_key(KEY)}", "rate": "1000/hour"}}}}'
    async with aioredis.Redis.from_url(redis_url) as client:
        await client.config_resetstat()
        async with (
            ProxyProcess(upstream, redis_url=redis_url, clients=config) as a,
            ProxyProcess(upstream, redis_url=redis_url, clients=config) as b,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=40)) as http,
        ):

            async def get(base: str) -> int:
                async with http.get(base + REPORT + "?limit=1", headers=auth()) as response:
                    await response.read()
                    return response.status

            started = time.monotonic()
            statuses = await asyncio.gather(*(get((a.url, b.url)[i % 2]) for i in range(3000)))
            elapsed = time.monotonic() - started
        calls = await script_calls(client)
    admitted = statuses.count(200)
    # The burst of 1000, plus the refill (one unit per 3.6 s) while the requests ran.
    assert admitted <= 1000 + math.ceil(elapsed / 3.6)
    # Under-admission is bounded: at most one batch (a 64th of 1000) per process held at the end.
    assert admitted >= 1000 - 2 * math.ceil(1000 / 64)
    assert statuses.count(429) == 3000 - admitted
    assert calls < 3000 / 3  # plus the budget and cache scripts of the one miss
