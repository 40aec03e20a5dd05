"""Chaos through real processes: `serve --workers N` replicas on one real Redis that is killed,
restarted, paused and filled, the mock TeamUp (a process) counting every call, and callers
whose every answer is recorded. Bounds come from the settings (GCRA: at most `burst + W /
interval` admissions in any window of W seconds), never from latency."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.core.gcra import Rate, parse_rate
from proxy.testing.e2e import ADMIN_KEY, REPORT
from proxy.testing.faults import MockProcess
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import RedisServer
from proxy.web.auth import hash_key

__all__ = [
    "CLIENTS",
    "OPS",
    "Answer",
    "Chaos",
    "check_windows",
    "worker_of",
]

# name -> (key, rate): small rates, so windows are short.
CLIENTS = {
    "alpha": ("chaos-alpha-key-0123456789", "60/minute"),
    "beta": ("chaos-beta-key-0123456789", "300/minute"),
    "gamma": ("chaos-gamma-key-0123456789", "1200/minute"),
}
ADMIN = {"Authorization": f"Token {ADMIN_KEY}"}
# A client whose limit never gets in the way (for tests about the cache, not limits).
OPS = {"X-API-Key": "chaos-ops-key-0123456789"}


def worker_of(response: aiohttp.ClientResponse) -> str:
    """Which worker answered: request ids start with a per-process random prefix."""
    return response.headers.get("X-Request-ID", "")[:12]


@dataclass
class Answer:
    """One request as the caller saw it."""

    client: str
    query: str
    sent: float
    received: float
    status: int
    body: bytes
    code: str | None = None
    cache: str = ""


def check_windows(times: list[tuple[float, float]], rate: Rate, slack: int = 0) -> list[str]:
    """Every window [sent_i, received_j] that surely holds more admissions than GCRA allows.

    `times` are (sent, received) of admitted requests: an admission happened in between, so
    requests wholly inside a window were surely admitted in it (the check never blames jitter).
    The bound is `burst + W / interval` (+ `slack`). Returns the violations, described.
    """
    spans = sorted(times)
    bad: list[str] = []
    for i, (start, _) in enumerate(spans):
        inside: list[float] = sorted(r for s, r in spans[i:] if s >= start)
        for count, end in enumerate(inside, 1):
            width = end - start
            allowed = rate.limit + width / rate.interval + slack
            if count > allowed + 1e-9:
                bad.append(f"{count} admissions in {width:.2f} s (allowed {allowed:.1f})")
                break
    return bad


@dataclass
class Chaos:
    """Redis, the mock and `replicas` proxies; `load` runs callers and records answers."""

    replicas: int = 2
    workers: int = 2
    budget: str = "60/minute"
    burst: int = 5
    settings: dict[str, Any] = field(default_factory=dict)
    redis: RedisServer = field(default_factory=RedisServer)
    mock: MockProcess = field(default_factory=MockProcess)
    proxies: list[ProxyProcess] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    http: aiohttp.ClientSession | None = None

    async def start(self) -> Chaos:
        await asyncio.to_thread(self.redis.start)
        await self.mock.start()
        clients = {
            name: {"key_sha256": hash_key(key), "rate": rate}
            for name, (key, rate) in CLIENTS.items()
        }
        clients["ops"] = {"key_sha256": hash_key(OPS["X-API-Key"]), "rate": "100000/second"}
        values: dict[str, Any] = {
            "redis_url": self.redis.url,
            "redis_retry_interval": 0.2,
            "clients": json.dumps(clients),
            "upstream_rate_limit": self.budget,
            "upstream_burst": self.burst,
            "upstream_queue_timeout": 0,
            "upstream_timeout": 5,
            "replicas_hint": self.replicas,
            "cache_ttl": 2,
            "cache_stale_ttl": 30,
            "log_level": "WARNING",
        }
        values.update(self.settings)
        self.proxies = [
            ProxyProcess(self.mock.url, workers=self.workers, **values)
            for _ in range(self.replicas)
        ]
        await asyncio.gather(*(p.start() for p in self.proxies))
        # A new connection per request: SO_REUSEPORT spreads them over the workers.
        self.http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True, limit=64),
            timeout=aiohttp.ClientTimeout(total=20),
        )
        await self.all_ready()
        return self

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()
        for proxy in self.proxies:
            if proxy.process is not None and proxy.process.returncode is None:
                await proxy.stop(signal.SIGKILL)
        await self.mock.stop()
        if self.redis.process is not None:
            with _suppress():
                os.kill(self.redis.process.pid, signal.SIGCONT)
        await asyncio.to_thread(self.redis.close)

    async def __aenter__(self) -> Chaos:
        try:
            return await self.start()
        except BaseException:
            await self.close()
            raise

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- faults ---------------------------------------------------------------------------

    async def kill_redis(self) -> None:
        await asyncio.to_thread(self.redis.stop)  # SIGKILL

    async def restart_redis(self) -> None:
        await asyncio.to_thread(self.redis.start)  # the same port, empty

    def pause_redis(self) -> None:
        assert self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGSTOP)

    def resume_redis(self) -> None:
        assert self.redis.process is not None
        os.kill(self.redis.process.pid, signal.SIGCONT)

    # --- talking to the proxies -----------------------------------------------------------

    async def get(
        self, path: str, headers: dict[str, str] | None = None, replica: int = 0
    ) -> tuple[aiohttp.ClientResponse, bytes]:
        assert self.http is not None
        async with self.http.get(self.proxies[replica].url + path, headers=headers) as response:
            return response, await response.read()

    async def delete(self, path: str, replica: int = 0) -> tuple[int, dict[str, Any]]:
        assert self.http is not None
        async with self.http.delete(self.proxies[replica].url + path, headers=ADMIN) as response:
            return response.status, await response.json()

    async def readiness(self, tries: int = 24) -> dict[str, set[str]]:
        """What each worker's `/readyz` says (redis check), over `tries` new connections per
        replica; worker -> the set of answers seen."""
        seen: dict[str, set[str]] = defaultdict(set)
        for replica in range(len(self.proxies)):
            for _ in range(tries):
                response, body = await self.get("/readyz", replica=replica)
                checks = json.loads(body).get("checks", {})
                seen[f"{replica}:{worker_of(response)}"].add(str(checks.get("redis")))
        return seen

    async def all_ready(self, within: float = 20.0) -> None:
        """Until every worker seen says `redis: ok` in a row of polls."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            seen = await self.readiness(8)
            if len(seen) >= self.replicas * self.workers and all(
                s == {"ok"} for s in seen.values()
            ):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"not every worker is back on Redis: {dict(seen)}")

    async def caller(self, name: str, until: float, queries: list[str], pace: float) -> None:
        key = CLIENTS[name][0]
        headers = {"X-API-Key": key}
        rng = random.Random(name)
        while time.monotonic() < until:
            # Mostly a hot handful (hits), else one of many (misses: TeamUp calls).
            query = rng.choice(queries[:4] if rng.random() < 0.6 else queries)
            sent = time.monotonic()
            try:
                response, body = await self.get(
                    f"{REPORT}?{query}", headers, replica=rng.randrange(len(self.proxies))
                )
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.answers.append(
                    Answer(name, query, sent, time.monotonic(), 0, repr(exc).encode())
                )
                continue
            code = None
            if response.status != 200:
                try:
                    code = json.loads(body).get("code")
                except ValueError:
                    code = "not-json"
            self.answers.append(
                Answer(
                    name,
                    query,
                    sent,
                    time.monotonic(),
                    response.status,
                    body,
                    code,
                    response.headers.get("Cache-Status", ""),
                )
            )
            await asyncio.sleep(pace * rng.random())

    async def load(self, seconds: float, *, callers: int = 2, pace: float = 0.1) -> None:
        """Every client, `callers` loops each, for `seconds`."""
        queries = [f"format=json&limit={n}" for n in range(1, 41)]
        until = time.monotonic() + seconds
        await asyncio.gather(
            *(self.caller(name, until, queries, pace) for name in CLIENTS for _ in range(callers))
        )

    # --- verdicts -------------------------------------------------------------------------

    async def upstream_calls(self) -> list[float]:
        """When each report call reached the mock (its clock: the wall clock)."""
        state = await self.mock.state()
        return sorted(float(r["at"]) for r in state["requests"])

    async def wrong_bodies(self) -> list[str]:
        """Every 200 compared with what the mock answers for that query."""
        truth: dict[str, bytes] = {}
        wrong = []
        for answer in self.answers:
            if answer.status != 200:
                continue
            if answer.query not in truth:
                status, _type, body = await self.mock.fetch(answer.query, "json")
                assert status == 200
                truth[answer.query] = body
            if json.loads(answer.body) != json.loads(truth[answer.query]):
                wrong.append(answer.query)
        return wrong

    def budget_violations(self, calls: list[float]) -> list[str]:
        """Upstream calls over the budget's GCRA bound in any window (+1: the delay between a
        unit being granted and the call reaching the mock differs from call to call)."""
        budget = parse_rate(self.budget).with_burst(self.burst)
        return check_windows([(t, t) for t in calls], budget, slack=1)

    def client_violations(self) -> dict[str, list[str]]:
        """Per client: admitted answers (anything but its own 429) over its GCRA bound."""
        found = {}
        for name, (_key, rate) in CLIENTS.items():
            admitted = [
                (a.sent, a.received)
                for a in self.answers
                if a.client == name and a.status not in (0, 429)
            ]
            bad = check_windows(admitted, parse_rate(rate))
            if bad:
                found[name] = bad[:3]
        return found

    def figures(self, calls: list[float]) -> dict[str, Any]:
        """The most admissions seen in any 1 s window and in the whole run (at most 60 s),
        beside what GCRA allows there: the budget's calls and each client's admissions."""

        def most(times: list[float], width: float) -> int:
            times = sorted(times)
            return max(
                (sum(1 for u in times[i:] if u <= t + width) for i, t in enumerate(times)),
                default=0,
            )

        out: dict[str, Any] = {"requests": len(self.answers)}
        budget = parse_rate(self.budget).with_burst(self.burst)
        rates = {"budget": budget} | {n: parse_rate(r) for n, (_k, r) in CLIENTS.items()}
        for name, rate in rates.items():
            if name == "budget":
                times = calls
            else:
                times = [
                    a.received
                    for a in self.answers
                    if a.client == name and a.status not in (0, 429)
                ]
            span = (max(times) - min(times)) if times else 0.0
            out[name] = {
                "1s": f"{most(times, 1.0)}/{rate.limit + 1 / rate.interval:g}",
                "run": f"{len(times)}/{rate.limit + span / rate.interval:.0f} in {span:.1f} s",
            }
        return out

    def statuses(self) -> dict[tuple[int, str | None], int]:
        counts: dict[tuple[int, str | None], int] = defaultdict(int)
        for answer in self.answers:
            counts[(answer.status, answer.code)] += 1
        return dict(counts)


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True
