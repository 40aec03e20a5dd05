"""`python bench/soak.py [--seconds 300]`: a bounded mixed-load soak of `serve --workers 2`.

Starts a `redis-server`, the mock TeamUp and the proxy on free loopback ports, then sends a mix
for `--seconds` (hot and cold report questions in several spellings, two clients, some invalid
queries, some unauthenticated calls, an occasional purge). Every 200 is compared with what the
mock answers for the same canonical query. Worker RSS and open fds are sampled from /proc.

Passes when: no unexpected status (5xx, connection errors), no wrong body, worker RSS after the
warm-up stays within 10 % of its post-warm-up baseline, and no worker's fd count grows. Prints a
summary and writes `bench/out/soak.json`; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from proxy.testing.faults import Truth

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"
REPORT = "/api/v2/reports/customer_credits/data"
RSS_TOLERANCE = 0.10
FD_SLACK = 8  # in-flight client and pooled upstream connections come and go

HOT = [
    ["format=json&limit=5", "limit=005&format=JSON"],
    ["format=json&sort=-amount,created_at&limit=8",
     "sort=-amount&sort=created_at&format=json&limit=8"],
    ["limit=10", "format=CSV&limit=10&offset=0"],
    ["format=json&page=3&page_size=7", "page_size=7&page=03&format=json"],
    ["format=json&created_at_gte=2024-01-01T00:00:00Z&limit=50",
     "created_at_gte=2024-01-01T01:00:00%2B01:00&format=json&limit=50"],
    ["format=json&customers=1,2,3&columns=customer.name,amount", "customers=3&customers=2,1"
     "&columns[]=customer.name&columns[]=amount&format=json"],
]  # fmt: skip
INVALID = ["limit=0", "format=xml", "sort=nope", "created_at_gte=yesterday", "colour=blue"]


@dataclass
class Tally:
    """What the load saw (counters only: a long soak must not grow the load generator)."""

    by_status: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    wrong_bodies: int = 0
    latencies: list[float] = field(default_factory=list)

    def note(self, what: str) -> None:
        if len(self.unexpected) < 50:
            self.unexpected.append(what)


def cold_pool(size: int) -> list[str]:
    """A fixed set of less popular questions: misses at first, then refreshed as they expire."""
    rng = random.Random(7)
    return [
        f"format=json&limit={rng.randint(1, 20)}&offset={rng.randrange(3000)}" for _ in range(size)
    ]


def rss_and_fds(pid: int) -> tuple[int, int] | None:
    """(VmRSS in KiB, open fds) of a live process."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]), fds
    return None


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY
    from proxy.testing.faults import MockProcess, Truth, canonical, worker_pids
    from proxy.testing.procs import ProxyProcess
    from proxy.testing.support import RedisServer

    redis = RedisServer().start()
    mock = await MockProcess().start()
    proxy = ProxyProcess(
        mock.url,
        workers=2,
        redis_url=redis.url,
        cache_ttl=args.cache_ttl,
        cache_stale_ttl=120,
        upstream_timeout=2,
        upstream_rate_limit="200/second",
    )
    await proxy.start()
    truth = Truth(mock)
    cold = cold_pool(args.cold_keys)
    tally = Tally()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    deadline = started + args.seconds
    try:
        await truth.learn([*(g[0] for g in HOT), *cold])
        assert proxy.process is not None
        workers = worker_pids(proxy.process.pid)
        clients = [{"Authorization": f"Token {KEY}"}, {"X-API-Key": OTHER_KEY}]

        async def check(query: str, content_type: str, body: bytes) -> None:
            parsed = canonical(query)
            want_type, want = await truth.get(parsed)
            if want_type == "application/json":
                same = content_type == want_type and json.loads(body) == json.loads(want)
            else:
                same = content_type == want_type and body == want
            if not same:
                tally.wrong_bodies += 1
                tally.note(f"wrong body for {query}")

        async def caller(n: int, http: aiohttp.ClientSession) -> None:
            rng = random.Random(1000 + n)
            interval = args.tasks / args.rate
            while time.monotonic() < deadline:
                roll = rng.random()
                headers = clients[n % 2]
                expected = 200
                if roll < 0.6:
                    query = rng.choice(rng.choice(HOT))
                elif roll < 0.9:
                    query = rng.choice(cold)
                elif roll < 0.96:
                    query, expected = rng.choice(INVALID), 400
                else:
                    query, headers, expected = rng.choice(cold), {"X-API-Key": "nope"}, 401
                begun = time.monotonic()
                try:
                    async with http.get(f"{proxy.url}{REPORT}?{query}", headers=headers) as resp:
                        body = await resp.read()
                        status, content_type = resp.status, resp.content_type
                except (aiohttp.ClientError, TimeoutError) as exc:
                    tally.by_status[type(exc).__name__] += 1
                    tally.note(f"{type(exc).__name__} for {query}")
                    continue
                elapsed = time.monotonic() - begun
                tally.latencies.append(elapsed)
                tally.by_status[str(status)] += 1
                if status != expected:
                    tally.note(f"{status} (expected {expected}) for {query}: {body[:120]!r}")
                elif status == 200:
                    await check(query, content_type, body)
                await asyncio.sleep(max(0.0, interval - elapsed))

        async def purger(http: aiohttp.ClientSession) -> None:
            while time.monotonic() < deadline:
                await asyncio.sleep(args.purge_every)
                target = random.choice(cold)
                async with http.delete(
                    f"{proxy.url}/admin/cache?{target}",
                    headers={"Authorization": f"Token {ADMIN_KEY}"},
                ) as resp:
                    tally.by_status[f"purge {resp.status}"] += 1

        async def sampler() -> None:
            while time.monotonic() < deadline:
                point: dict[str, Any] = {"t": round(time.monotonic() - started, 1), "workers": {}}
                for pid in workers:
                    found = rss_and_fds(pid)
                    if found is not None:
                        point["workers"][str(pid)] = {"rss_kb": found[0], "fds": found[1]}
                samples.append(point)
                await asyncio.sleep(args.sample_every)

        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=15)
        ) as http:
            await asyncio.gather(
                sampler(), purger(http), *(caller(n, http) for n in range(args.tasks))
            )
        if proxy.process is not None:
            now = set(worker_pids(proxy.process.pid))
            if now != set(workers):
                tally.note(f"workers changed during the soak: {sorted(workers)} -> {sorted(now)}")
    finally:
        code = await proxy.stop()
        await mock.stop()
        redis.close()
    if code != 0:
        tally.note(f"proxy exited {code}")
    return evaluate(args, tally, samples, truth)


def evaluate(
    args: argparse.Namespace, tally: Tally, samples: list[dict[str, Any]], truth: Truth
) -> dict[str, Any]:
    """Turn the tally and the /proc samples into the verdict."""
    warmup = max(10.0, args.seconds * args.warmup)
    after = [s for s in samples if s["t"] >= warmup]
    workers: dict[str, Any] = {}
    failures = list(tally.unexpected)
    for pid in sorted({pid for s in samples for pid in s["workers"]}):
        series = [(s["t"], s["workers"][pid]) for s in after if pid in s["workers"]]
        if len(series) < 4:
            failures.append(f"worker {pid}: too few samples after warm-up ({len(series)})")
            continue
        rss = [w["rss_kb"] for _t, w in series]
        fds = [w["fds"] for _t, w in series]
        third = max(1, len(series) // 3)
        baseline_rss = statistics.median(rss[:third])
        growth = max(rss) / baseline_rss - 1
        fd_growth = max(fds[-third:]) - max(fds[:third])
        workers[pid] = {
            "rss_kb_first": rss[0],
            "rss_kb_baseline": baseline_rss,
            "rss_kb_max": max(rss),
            "rss_kb_last": rss[-1],
            "rss_growth_pct": round(growth * 100, 2),
            "fds_first": fds[0],
            "fds_max": max(fds),
            "fds_last": fds[-1],
            "fd_growth": fd_growth,
        }
        if growth > RSS_TOLERANCE:
            failures.append(f"worker {pid}: RSS grew {growth:.1%} after warm-up")
        if fd_growth > FD_SLACK:
            failures.append(f"worker {pid}: open fds grew by {fd_growth}")
    latencies = sorted(tally.latencies)

    def pct(q: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * q))], 4)

    return {
        "seconds": args.seconds,
        "warmup_s": warmup,
        "settings": {
            "workers": 2,
            "tasks": args.tasks,
            "rate": args.rate,
            "cold_keys": args.cold_keys,
            "cache_ttl": args.cache_ttl,
        },
        "requests": sum(v for k, v in tally.by_status.items() if not k.startswith("purge")),
        "by_status": dict(sorted(tally.by_status.items())),
        "wrong_bodies": tally.wrong_bodies,
        "unexpected": tally.unexpected,
        "latency_s": {"p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0)} if latencies else {},
        "distinct_questions": len(truth),
        "workers": workers,
        "samples": samples,
        "failures": failures,
        "ok": not failures and tally.wrong_bodies == 0,
    }


def render(result: dict[str, Any]) -> str:
    lines = [
        f"soak: {result['seconds']:.0f} s, {result['requests']} requests, "
        f"{result['distinct_questions']} distinct questions, warm-up {result['warmup_s']:.0f} s",
        f"  statuses: {result['by_status']}",
        f"  wrong bodies: {result['wrong_bodies']}; latency {result['latency_s']}",
    ]
    for pid, w in result["workers"].items():
        lines.append(
            f"  worker {pid}: RSS {w['rss_kb_first'] / 1024:.1f} -> {w['rss_kb_last'] / 1024:.1f}"
            f" MiB (max {w['rss_kb_max'] / 1024:.1f}, {w['rss_growth_pct']:+.1f}% over baseline);"
            f" fds {w['fds_first']} -> {w['fds_last']} (max {w['fds_max']})"
        )
    lines.append("  PASS" if result["ok"] else "  FAIL: " + "; ".join(result["failures"][:10]))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/soak.py", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the run (300)")
    parser.add_argument("--rate", type=float, default=120.0, help="requests/second in all (120)")
    parser.add_argument("--tasks", type=int, default=6, help="concurrent callers (6)")
    parser.add_argument("--cold-keys", type=int, default=300, help="size of the cold pool (300)")
    parser.add_argument("--cache-ttl", type=int, default=5, help="PROXY_CACHE_TTL (5)")
    parser.add_argument("--purge-every", type=float, default=5.0, help="seconds between purges")
    parser.add_argument("--sample-every", type=float, default=2.0, help="seconds between samples")
    parser.add_argument(
        "--warmup", type=float, default=0.25, help="fraction of the run before the baseline"
    )
    args = parser.parse_args(argv)
    if args.seconds < 20:
        parser.error("--seconds must be at least 20 (warm-up plus enough samples)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(soak(args))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    print(render(result))
    print(f"  details: {OUT / 'soak.json'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    # Run as a script: the repository root (for `proxy` and `tests`) is not on the path yet.
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
