"""`python bench/fairness.py`: two apps on one budget, fail-fast vs the fair queue (~55 s).

The load, the same for every setup: the budget is 10 calls/second (burst 5); the mock TeamUp
answers in 50 ms. App `flood` asks 240 new questions, 30 a second for 8 s (three times the
budget); app `quiet` asks 5 new questions, one every 1.5 s from 0.5 s. Every question is new,
so every one needs a TeamUp call. Per app: answered, failed, and the latency of the answered
ones; per setup: TeamUp calls and the most in any one second (the budget allows 10 + 5).
Setups: fail-fast (`PROXY_UPSTREAM_QUEUE_TIMEOUT=0`, the behaviour before the queue, first
come first served), the fair queue (timeout 5 s), and the fair queue on two replicas sharing
Redis: both apps spread over both, then the quiet app on only one of them.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import redis

from bench.procs import REPORT_PATH, Mock, Redis, Service, _child_env, http_get
from proxy.testing.support import free_port, wait_for_port
from proxy.web.auth import hash_key

TOKEN = "bench-upstream-token"
KEYS = {"flood": "flood-app-key", "quiet": "quiet-app-key"}
BUDGET, BURST = 10, 5
LATENCY = 0.05
FLOOD_RATE, FLOOD_SECONDS = 30, 8.0
QUIET_COUNT, QUIET_EVERY, QUIET_START = 5, 1.5, 0.5


class Proxy(Service):
    """One `teamup-proxy serve` process with the two apps."""

    def __init__(self, workdir: Path, name: str, mock: Mock, redis_url: str, timeout: float):
        super().__init__(name, workdir)
        self.port = free_port()
        clients = {
            app: {"key_sha256": hash_key(key), "rate": "100000/minute"} for app, key in KEYS.items()
        }
        self.env = _child_env(
            {
                "PROXY_UPSTREAM_URL": mock.base,
                "PROXY_UPSTREAM_TOKEN": TOKEN,
                "PROXY_REDIS_URL": redis_url,
                "PROXY_CLIENTS": json.dumps(clients),
                "PROXY_UPSTREAM_RATE_LIMIT": f"{BUDGET}/second",
                "PROXY_UPSTREAM_BURST": str(BURST),
                "PROXY_UPSTREAM_QUEUE_TIMEOUT": str(timeout),
                "PROXY_LOG_LEVEL": "WARNING",
                "PROXY_SECRETS_DIR": str(workdir / "no-secrets"),
            }
        )

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
        self.spawn([*argv, "--port", str(self.port), "--workers", "1"], self.env)
        wait_for_port(self.port, 30)


@dataclass
class AppResult:
    answered: int = 0
    failed: int = 0
    latencies: list[float] = field(default_factory=list)


def percentile(values: Sequence[float], pct: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered)))) - 1]


def most_in_one_second(times: Sequence[float]) -> int:
    ordered, best, start = sorted(times), 0, 0
    for end, at in enumerate(ordered):
        while at - ordered[start] >= 1.0:
            start += 1
        best = max(best, end - start + 1)
    return best


async def one(
    http: aiohttp.ClientSession, base: str, app: str, question: int, result: AppResult
) -> None:
    url = f"{base}{REPORT_PATH}?format=json&limit=10&offset={question}"
    started = time.monotonic()
    async with http.get(url, headers={"Authorization": f"Token {KEYS[app]}"}) as reply:
        await reply.read()
        if reply.status == 200:
            result.answered += 1
            result.latencies.append(time.monotonic() - started)
        else:
            result.failed += 1


async def load(
    bases: Sequence[str], first_question: int, quiet_everywhere: bool
) -> dict[str, AppResult]:
    results = {app: AppResult() for app in KEYS}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        tasks = []
        start = time.monotonic()
        schedule = [
            (n / FLOOD_RATE, "flood", n) for n in range(int(FLOOD_RATE * FLOOD_SECONDS))
        ] + [(QUIET_START + n * QUIET_EVERY, "quiet", 10_000 + n) for n in range(QUIET_COUNT)]
        for n, (at, app, question) in enumerate(sorted(schedule)):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            base = bases[n % len(bases)] if app == "flood" or quiet_everywhere else bases[0]
            tasks.append(
                asyncio.ensure_future(one(http, base, app, first_question + question, results[app]))
            )
        await asyncio.gather(*tasks)
    return results


def run_setup(
    label: str,
    workdir: Path,
    mock: Mock,
    redis_server: Redis,
    timeout: float,
    replicas: int,
    quiet_everywhere: bool,
) -> list[str]:
    redis.Redis(port=redis_server.port).flushdb()
    mock.reset()
    proxies = [
        Proxy(workdir, f"proxy-{sum(map(ord, label))}-{n}", mock, redis_server.url, timeout)
        for n in range(replicas)
    ]
    try:
        for proxy in proxies:
            proxy.start()
        first_question = sum(map(ord, label)) * 100_000
        results = asyncio.run(load([p.base for p in proxies], first_question, quiet_everywhere))
    finally:
        for proxy in proxies:
            proxy.stop()
    status, _, body = http_get(f"{mock.base}/_mock/state")
    assert status == 200
    times = [request["at"] for request in json.loads(body)["requests"]]
    rows = []
    for app, result in results.items():
        asked = result.answered + result.failed
        p50 = percentile(result.latencies, 50) * 1000
        p99 = percentile(result.latencies, 99) * 1000
        latency = "—" if not result.latencies else f"{p50:,.0f} / {p99:,.0f} ms"
        rows.append(
            f"| {label} | {app} | {result.answered} of {asked} | {result.failed} "
            f"| {latency} | "
            + (f"{len(times)} ({most_in_one_second(times)})" if app == "flood" else "")
            + " |"
        )
    return rows


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="teamup-fairness-"))
    redis_server = Redis(workdir)
    mock = Mock(workdir, TOKEN, LATENCY, seed=7)
    began = time.monotonic()
    try:
        redis_server.start()
        mock.start()
        rows = []
        for label, timeout, replicas, quiet_everywhere in (
            ("fail-fast (queue timeout 0) = first come, first served", 0.0, 1, True),
            ("fair queue (timeout 5 s)", 5.0, 1, True),
            ("fair queue, 2 replicas on one Redis (both apps over both)", 5.0, 2, True),
            ("fair queue, 2 replicas (flood over both, quiet on one)", 5.0, 2, False),
        ):
            rows += run_setup(
                label, workdir, mock, redis_server, timeout, replicas, quiet_everywhere
            )
    finally:
        mock.stop()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"budget {BUDGET}/second, burst {BURST}; flood: {int(FLOOD_RATE * FLOOD_SECONDS)} new "
        f"questions at {FLOOD_RATE}/s; quiet: {QUIET_COUNT}, one every {QUIET_EVERY} s; "
        f"TeamUp {LATENCY * 1000:.0f} ms; {time.monotonic() - began:.0f} s in all\n"
    )
    print(
        "| setup | app | answered | failed (503) | answer latency p50 / p99 "
        "| TeamUp calls (most in 1 s; budget allows 15) |"
    )
    print("|---|---|--:|--:|--:|--:|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
