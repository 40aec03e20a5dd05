"""Issue 20's reproductions through real processes, and the mixed chaos run (`make chaos`).

Each test starts its own redis-server, the mock TeamUp and `serve --workers 2` replicas; the
bounds asserted follow from the settings (GCRA), never from latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

import pytest

from proxy.testing.e2e import REPORT
from tests.chaos.harness import OPS, Chaos, worker_of
from tests.test_writes_refused import allow_writes, refuse_writes

pytestmark = pytest.mark.slow

ERRORS_ALLOWED = {(429, "rate_limited"), (503, "upstream_budget_exhausted")}


def assert_clean(chaos: Chaos) -> None:
    """No error but a caller's own limit and the budget; nothing unanswered."""
    others = {k: v for k, v in chaos.statuses().items() if k[0] != 200 and k not in ERRORS_ALLOWED}
    assert others == {}


async def test_a_redis_restart_keeps_the_budget_and_every_client_limit() -> None:
    """Issue 20, 1: kill -9 Redis, start it again on the same port, wait for every `/readyz`,
    then load: no worker flips to its fallbacks again (dead pooled connections are retried
    on a fresh one), and the budget and every client limit hold, summed over 2 replicas x 2
    workers."""
    async with Chaos() as chaos:
        await chaos.load(1.0)
        await chaos.kill_redis()
        await chaos.restart_redis()
        await chaos.all_ready()
        started = time.monotonic()
        await chaos.load(4.0)
        seen = await chaos.readiness()
        assert all(s == {"ok"} for s in seen.values()), seen  # never off Redis again
        calls = await chaos.upstream_calls()
        print("restart", json.dumps(chaos.figures(calls)))
        assert chaos.budget_violations(calls) == []
        assert chaos.client_violations() == {}
        assert await chaos.wrong_bodies() == []
        assert_clean(chaos)
        assert time.monotonic() - started < 60


async def test_an_outage_never_multiplies_the_budget() -> None:
    """Issue 20, 2: with Redis unreachable from the start and more workers than the budget's
    burst, the workers' shares together stay within the budget."""
    chaos = Chaos(replicas=1, workers=3, burst=2, settings={"cache_ttl": 0, "cache_stale_ttl": 0})
    async with chaos:
        chaos.pause_redis()  # accepting, never answering: every worker falls back
        await chaos.load(6.0, pace=0.01)
        chaos.resume_redis()
        calls = await chaos.upstream_calls()
        print("outage", json.dumps(chaos.figures(calls)))
        assert len(calls) >= 3  # the load did reach TeamUp
        assert chaos.budget_violations(calls) == []
        assert chaos.client_violations() == {}
        assert await chaos.wrong_bodies() == []
        assert_clean(chaos)


async def test_a_purge_while_redis_is_paused_says_so_and_never_comes_back() -> None:
    """Issue 20, 3: a purge that cannot reach Redis is a 503 with `"shared": false`; once
    Redis is back, no worker ever serves the purged entry again."""
    settings = {"cache_ttl": 300, "upstream_queue_timeout": 5}
    async with Chaos(replicas=1, settings=settings) as chaos:
        query = f"{REPORT}?format=json&limit=7"
        headers = OPS
        response, _ = await chaos.get(query, headers)
        assert response.status == 200
        assert await chaos.mock.calls() == 1
        chaos.pause_redis()
        try:
            status, body = await chaos.delete("/admin/cache/customer_credits")
        finally:
            chaos.resume_redis()
        assert status == 503
        assert body["shared"] is False
        await chaos.all_ready()
        # Every worker now: the purged entry is gone from Redis and from every process.
        for _ in range(10):
            response, _ = await chaos.get(query, headers)
            assert response.status == 200
        assert await chaos.mock.calls() == 2  # fetched again once, then a hit everywhere


async def test_after_a_purge_answers_no_worker_serves_the_purged_entry() -> None:
    """Issue 20, 3: with Redis healthy, every worker has dropped the entry (L1 included)
    before the purge answers."""
    async with Chaos(replicas=2, settings={"cache_ttl": 300, "cache_l1_ttl": 30}) as chaos:
        query = f"{REPORT}?format=json&limit=9"
        headers = OPS
        warm: set[str] = set()
        for i in range(80):  # an L1 copy in every worker
            response, _ = await chaos.get(query, headers, replica=i % 2)
            warm.add(f"{i % 2}:{worker_of(response)}")
            if len(warm) >= 4:
                break
        assert len(warm) == 4
        await asyncio.sleep(2.1)  # the old entry is now at least 2 s old
        purged_at = time.time()
        status, body = await chaos.delete("/admin/cache/customer_credits/data?format=json&limit=9")
        assert (status, body["shared"], body["purged"]) == (200, True, 1)
        for i in range(24):
            response, _ = await chaos.get(query, headers, replica=i % 2)
            assert response.status == 200
            # An entry stored after the purge is at most as old as the time since it.
            assert int(response.headers["Age"]) <= time.time() - purged_at + 1


async def test_a_closed_circuit_is_closed_on_every_worker_when_the_answer_returns() -> None:
    """Issue 20, 6: after `DELETE /admin/circuit` answers, no worker answers 503 any more."""
    async with Chaos(replicas=2, budget="600/minute", burst=50) as chaos:
        await chaos.mock.faults(status=429, retry_after=60, times=1)
        headers = OPS
        response, _ = await chaos.get(f"{REPORT}?format=json&limit=1", headers)
        assert response.status == 503
        for i in range(8):  # open on every worker of both replicas
            response, _ = await chaos.get(f"{REPORT}?format=json&limit={i + 2}", headers, i % 2)
            assert response.status == 503
        status, body = await chaos.delete("/admin/circuit", replica=1)
        assert (status, body["closed"], body["open"]) == (200, True, False)
        statuses = []
        for i in range(12):
            response, _ = await chaos.get(f"{REPORT}?format=json&limit={i + 20}", headers, i % 2)
            statuses.append(response.status)
        assert statuses == [200] * 12


async def test_every_worker_sees_redis_refusing_writes_even_when_idle() -> None:
    """Issue 20, 6: `/readyz` on every worker says `refusing-writes`, traffic or not."""
    async with Chaos(replicas=1) as chaos:
        await asyncio.to_thread(refuse_writes, chaos.redis, "oom")
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                seen = await chaos.readiness(8)
                if len(seen) == 2 and all(s == {"refusing-writes"} for s in seen.values()):
                    break
                await asyncio.sleep(0.1)
            assert len(seen) == 2 and all(s == {"refusing-writes"} for s in seen.values()), seen
        finally:
            await asyncio.to_thread(allow_writes, chaos.redis, "oom")
        await chaos.all_ready()


@pytest.mark.skipif(not os.environ.get("TEAMUP_CHAOS"), reason="the long run: make chaos")
async def test_mixed_load_through_kill_restart_pause_and_fill() -> None:
    """Three clients on 2 replicas x 2 workers while Redis is killed and restarted, paused,
    and filled: the budget and every client limit within GCRA in every window, no wrong
    body, no error but a limit's own."""
    async with Chaos() as chaos:

        async def faults() -> None:
            await asyncio.sleep(1.5)
            await chaos.kill_redis()
            await asyncio.sleep(1.5)
            await chaos.restart_redis()
            await asyncio.sleep(2.5)
            chaos.pause_redis()
            await asyncio.sleep(1.5)
            chaos.resume_redis()
            await asyncio.sleep(2.0)
            await asyncio.to_thread(refuse_writes, chaos.redis, "oom")
            await asyncio.sleep(2.0)
            await asyncio.to_thread(allow_writes, chaos.redis, "oom")

        await asyncio.gather(chaos.load(14.0), faults())
        await chaos.all_ready()
        calls = await chaos.upstream_calls()
        report = {
            "requests": len(chaos.answers),
            "statuses": {f"{s} {c or ''}".strip(): n for (s, c), n in chaos.statuses().items()},
            "upstream_calls": len(calls),
            "upstream_span_s": round(calls[-1] - calls[0], 2) if calls else 0,
            "wrong_bodies": len(await chaos.wrong_bodies()),
            "most_seen_over_allowed": chaos.figures(calls),
        }
        print(json.dumps(report))
        assert chaos.budget_violations(calls) == []
        assert chaos.client_violations() == {}
        assert await chaos.wrong_bodies() == []
        assert_clean(chaos)


async def test_a_lost_subscription_alone_does_not_take_a_worker_off_redis() -> None:
    """Issue 20, 1: the fallbacks only when Redis is really gone. The events subscription of
    every worker is cut (`CLIENT KILL TYPE pubsub`), Redis itself is fine: the workers drop
    their L1, subscribe again, and never leave Redis."""
    async with Chaos(replicas=1) as chaos:
        with chaos.redis.client() as sync:
            assert sync.client_kill_filter(_type="pubsub") == 2
        proxy = chaos.proxies[0]
        for _ in range(200):
            if proxy.stderr.count(b'"bus_lost"') >= 2:
                break
            await asyncio.sleep(0.05)
        assert proxy.stderr.count(b'"bus_lost"') == 2
        await chaos.all_ready()  # subscribed again, and a few hundred ms for any mistake to show
        assert b'"redis_down"' not in proxy.stderr
