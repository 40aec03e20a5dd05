"""Two credentials behind two replicas: does a flood on one credential's budget slow the other's
callers? (issue 22)

Real processes on loopback: a `redis-server`, the mock TeamUp holding two credentials (north
acts for 101 and 102, south for 201; every answer 20 ms late, as TeamUp is never instant) and
two `teamup-proxy serve` replicas on that Redis. North's budget is 60/minute with a burst of 2
(a flood spends it at once and then waits in north's fair queue up to 5 s), south's is large.

1. baseline: 5 callers ask south 50 questions it never saw (every one a miss, one upstream call);
2. the same, with 40 callers flooding north with misses for provider 101 meanwhile.

Prints each phase's latency (p50, p95, max) for south's callers, what north's flood got and
how many calls each credential made. Run: `.venv/bin/python bench/tenants.py` (~20 s).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import aiohttp

from proxy.testing.e2e import KEY
from proxy.testing.faults import MockProcess
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import RedisServer
from proxy.web.auth import hash_key

NORTH, SOUTH = "bench-north-token", "bench-south-token"
LIST = "/api/v2/customers"


async def ask(
    http: aiohttp.ClientSession, base: str, query: str, provider: str
) -> tuple[int, float]:
    headers = {"Authorization": f"Token {KEY}", "TeamUp-Provider-ID": provider}
    started = time.perf_counter()
    async with http.get(f"{base}{LIST}?{query}", headers=headers) as response:
        await response.read()
        return response.status, time.perf_counter() - started


async def south_callers(
    http: aiohttp.ClientSession, bases: list[str], sizes: list[int]
) -> list[tuple[int, float]]:
    """5 callers, each asking its share of `sizes` (one distinct question each) in turn."""

    async def caller(mine: list[int]) -> list[tuple[int, float]]:
        return [await ask(http, bases[n % 2], f"page_size={n}", "201") for n in mine]

    shares = [sizes[i::5] for i in range(5)]
    return [r for part in await asyncio.gather(*(caller(s) for s in shares)) for r in part]


def summary(label: str, results: list[tuple[int, float]]) -> str:
    took = sorted(t * 1000 for _, t in results)
    p95 = took[max(0, int(len(took) * 0.95) - 1)]
    ok = sum(1 for status, _ in results if status == 200)
    return (
        f"| {label} | {len(results)} | {ok} | {statistics.median(took):.0f} ms | "
        f"{p95:.0f} ms | {took[-1]:.0f} ms |"
    )


async def main(flooders: int) -> None:
    redis = RedisServer().start()
    upstreams = {
        "north": {"token": NORTH, "providers": ["101", "102"], "rate": "60/minute", "burst": 2},
        "south": {"token": SOUTH, "providers": ["201"], "rate": "6000/minute", "burst": 100},
    }
    clients = {
        "billing": {
            "key_sha256": hash_key(KEY),
            "rate": "100000/second",
            "providers": ["101", "102", "201"],
        }
    }
    settings: dict[str, Any] = {
        "upstreams": json.dumps(upstreams),
        "clients": json.dumps(clients),
        "redis_url": redis.url,
        "upstream_queue_timeout": 5,
        "log_format": "json",
    }
    mock = MockProcess(NORTH, latency=0.02, providers=["101", "102"], tenants={SOUTH: ["201"]})
    await mock.start()
    replicas = [ProxyProcess(mock.url, **settings) for _ in range(2)]
    try:
        for replica in replicas:
            await replica.start()
        bases = [r.url for r in replicas]
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            # Warm-up (connections, each worker's first Redis round trips): other questions.
            for n in range(1, 11):
                await ask(http, bases[n % 2], f"page_size={n}&page=2", "201")
            baseline = await south_callers(http, bases, list(range(1, 51)))
            stop = asyncio.Event()
            flood: list[tuple[int, float]] = []

            async def flooder(i: int) -> None:
                n = 0
                while not stop.is_set():
                    n += 1
                    query = f"page_size={1 + (i * 997 + n) % 100}&page={1 + n}"
                    flood.append(await ask(http, bases[i % 2], query, "101"))

            tasks = [asyncio.ensure_future(flooder(i)) for i in range(flooders)]
            await asyncio.sleep(1.0)  # north's burst spent: its callers queue from here on
            during = await south_callers(http, bases, list(range(51, 101)))
            stop.set()
            await asyncio.gather(*tasks)
        north_calls = await mock.calls_by(credential="default")
        south_calls = await mock.calls_by(credential="tenant0")
    finally:
        for replica in replicas:
            await replica.stop()
        await mock.stop()
        redis.stop()
    print("| south's callers (5, every question a miss) | requests | 200 | p50 | p95 | max |")
    print("|---|--:|--:|--:|--:|--:|")
    print(summary("alone", baseline))
    print(summary(f"while {flooders} callers flood north (60/minute)", during))
    statuses = [status for status, _ in flood]
    print(
        f"\nnorth's flood: {len(flood)} requests, {statuses.count(200)} x 200, "
        f"{statuses.count(503)} x 503 (north's budget: refused once its queue could not "
        "serve them within 5 s); "
        f"upstream calls: north {north_calls}, south {south_calls} (10 of them the warm-up)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flooders", type=int, default=40)
    asyncio.run(main(parser.parse_args().flooders))
