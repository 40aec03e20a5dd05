"""`python bench/clients.py [--install]`: Redis clients on the proxy's hot-path workload.

Per request the proxy runs one GCRA script (`proxy/backends/lua/gcra.lua`) and, when its L1
misses, GETs one cached value (~3.5 KB, zlib-compressed JSON). This runs exactly that pair of
commands against a throw-away `redis-server`, from C concurrent tasks in ONE process on uvloop,
for each client in turn:

1. redis-py asyncio + hiredis, plain (`BlockingConnectionPool(max_connections=64)`);
2. the same client behind `proxy.backends.pipelining.AutoPipelineRedis` (what the proxy runs);
3. coredis 6.x (asyncio `coredis.Redis`);
4. valkey-glide 2.x (`glide.GlideClient`, a Rust core with its own multiplexing).

One op = the script + the GET. Reported per client: ops/s, p50/p99 of one op, CPU seconds of
this process per 1,000 ops (`getrusage`, all threads: glide's Rust threads count), CPU of
redis-server per 1,000 ops (`/proc`), and errors. Rounds alternate the client order; the table
shows medians. coredis and valkey-glide are not project dependencies: `--install` pip-installs
the missing ones into the running interpreter's environment, otherwise they are skipped.

Output: a markdown table on stdout and `bench/out/clients.json` (every round's numbers).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from proxy.testing.support import RedisServer

__all__ = ["main"]

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

RATE_KEY = "bench:clients:rl:caller"
VALUE_KEY = "bench:clients:c:{v1:hotpath}"
VALUE_TARGET = 3_500
# ARGV of GCRA_LUA as RedisLimiter.hit sends it (period_ms, limit, cost, eps_ms), for a rate of
# 10^9/second: the script does all its work (TIME, GET, SET PX) but never denies.
SCRIPT_ARGS = ("1000.0", "1000000000", "1", "0.001")

# (name, distribution to report, import name, pip requirement when it is missing)
CLIENTS: tuple[tuple[str, str, str, str | None], ...] = (
    ("redis-py", "redis", "redis", None),
    ("redis-py + AutoPipelineRedis", "redis", "redis", None),
    ("coredis", "coredis", "coredis", "coredis>=6,<7"),
    ("valkey-glide", "valkey-glide", "glide", "valkey-glide>=2,<3"),
)
_VERSIONS = ("redis", "hiredis", "uvloop", "anyio", "coredis", "valkey-glide")

# A client under test: an async context that yields one op (the script, then the GET).
Op = Callable[[], Awaitable[tuple[Any, Any]]]
ClientFactory = Callable[[int], contextlib.AbstractAsyncContextManager[Op]]


# ------------------------------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def _redis_py(port: int) -> AsyncIterator[Op]:
    import redis.asyncio as aioredis

    from proxy.backends.scripts import load_script

    GCRA_LUA = load_script("gcra")

    pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=port, max_connections=64)
    client = aioredis.Redis(connection_pool=pool)
    script = client.register_script(GCRA_LUA)
    keys, args = [RATE_KEY], list(SCRIPT_ARGS)

    async def op() -> tuple[Any, Any]:
        return await script(keys=keys, args=args), await client.get(VALUE_KEY)

    try:
        yield op
    finally:
        await client.aclose()
        await pool.aclose()


@contextlib.asynccontextmanager
async def _redis_py_autopipeline(port: int) -> AsyncIterator[Op]:
    import redis.asyncio as aioredis

    from proxy.backends.pipelining import AutoPipelineRedis
    from proxy.backends.scripts import load_script

    GCRA_LUA = load_script("gcra")

    pool = aioredis.BlockingConnectionPool(host="127.0.0.1", port=port, max_connections=64)
    wrapper = AutoPipelineRedis(aioredis.Redis(connection_pool=pool))
    # The proxy's way: RedisLimiter(AutoPipelineRedis(client), prefix) registers the script on
    # the wrapper, so its EVALSHA joins the loop turn's pipeline; so does RedisCacheStore's GET.
    script = wrapper.register_script(GCRA_LUA)
    keys, args = [RATE_KEY], list(SCRIPT_ARGS)

    async def op() -> tuple[Any, Any]:
        return await script(keys=keys, args=args), await wrapper.get(VALUE_KEY)

    try:
        yield op
    finally:
        await wrapper.aclose()
        await pool.aclose()


@contextlib.asynccontextmanager
async def _coredis(port: int) -> AsyncIterator[Op]:
    coredis: Any = importlib.import_module("coredis")

    from proxy.backends.scripts import load_script

    GCRA_LUA = load_script("gcra")

    # 6.x: the client must be entered; non-blocking commands are multiplexed over its pool.
    async with coredis.Redis(host="127.0.0.1", port=port, max_connections=64) as client:
        script = client.register_script(GCRA_LUA)
        keys, args = [RATE_KEY], list(SCRIPT_ARGS)

        async def op() -> tuple[Any, Any]:
            return await script(keys=keys, args=args), await client.get(VALUE_KEY)

        yield op


@contextlib.asynccontextmanager
async def _glide(port: int) -> AsyncIterator[Op]:
    glide: Any = importlib.import_module("glide")

    from proxy.backends.scripts import load_script

    GCRA_LUA = load_script("gcra")

    config = glide.GlideClientConfiguration(
        [glide.NodeAddress("127.0.0.1", port)],
        # The default is 250 ms; redis-py and coredis run here without a command timeout.
        request_timeout=5_000,
    )
    client = await glide.GlideClient.create(config)
    script = glide.Script(GCRA_LUA)
    keys, args = [RATE_KEY], list(SCRIPT_ARGS)

    async def op() -> tuple[Any, Any]:
        return (
            await client.invoke_script(script, keys=keys, args=args),
            await client.get(VALUE_KEY),
        )

    try:
        yield op
    finally:
        await client.close()


FACTORIES: dict[str, ClientFactory] = {
    "redis-py": _redis_py,
    "redis-py + AutoPipelineRedis": _redis_py_autopipeline,
    "coredis": _coredis,
    "valkey-glide": _glide,
}


# ------------------------------------------------------------------------------------- measure


@dataclass
class Run:
    """One client, one round."""

    client: str
    round: int
    ops: int = 0
    seconds: float = 0.0
    ops_per_s: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    cpu_s_per_1k: float = 0.0
    redis_cpu_s_per_1k: float = 0.0
    redis_commands_per_op: float = 0.0
    redis_commands: dict[str, int] = field(default_factory=dict)
    errors: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    first_errors: dict[str, str] = field(default_factory=dict)
    failed: str | None = None


class _State:
    __slots__ = ("errors", "first", "kinds", "latencies", "measuring", "stop")

    def __init__(self) -> None:
        self.measuring = False
        self.stop = False
        self.latencies: list[float] = []
        self.errors = 0
        self.kinds: dict[str, int] = {}
        self.first: dict[str, str] = {}

    def error(self, kind: str, message: str) -> None:
        if self.measuring:
            self.errors += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.first.setdefault(kind, message[:300])


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _command_calls(port: int) -> dict[str, int]:
    """Calls per command so far (`INFO commandstats`), to check what one op costs Redis."""
    import redis

    with redis.Redis(port=port) as sync:
        stats: dict[str, Any] = sync.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(entry["calls"]) for name, entry in stats.items()}


def _percentile(ordered: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return math.nan
    rank = max(1, min(len(ordered), math.ceil(pct / 100 * len(ordered))))
    return ordered[rank - 1]


async def _worker(op: Op, state: _State, value: bytes) -> None:
    clock = time.perf_counter
    while not state.stop:
        start = clock()
        try:
            decision, got = await op()
            elapsed = clock() - start
            if got != value or int(decision[0]) != 1:
                raise ValueError(f"script {decision!r}, GET {got!r:.60}")
        except Exception as exc:  # counted, and the loop goes on (a short pause: no hot spin)
            state.error(type(exc).__name__, str(exc))
            await asyncio.sleep(0.01)
            continue
        if state.measuring:
            state.latencies.append(elapsed)


async def _measure(
    factory: ClientFactory,
    port: int,
    redis_pid: int,
    value: bytes,
    run: Run,
    concurrency: int,
    seconds: float,
    warmup: float,
) -> None:
    from bench.procs import cpu_seconds

    state = _State()
    async with factory(port) as op:
        await op()  # connects (and loads the script) before any timing
        tasks = [asyncio.create_task(_worker(op, state, value)) for _ in range(concurrency)]
        try:
            await asyncio.sleep(warmup)
            calls0 = _command_calls(port)
            cpu0, redis0, t0 = _cpu_self(), cpu_seconds([redis_pid]), time.perf_counter()
            state.measuring = True
            await asyncio.sleep(seconds)
            state.measuring = False
            cpu1, redis1, t1 = _cpu_self(), cpu_seconds([redis_pid]), time.perf_counter()
            calls1 = _command_calls(port)
            state.stop = True
            _, pending = await asyncio.wait(tasks, timeout=10)
            for task in pending:
                task.cancel()
                state.errors += 1
                state.error("stuck", "a task did not finish its op within 10 s of the end")
            await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
    ops = len(state.latencies)
    ordered = sorted(state.latencies)
    run.ops, run.seconds = ops, t1 - t0
    run.ops_per_s = ops / run.seconds
    run.p50_ms = _percentile(ordered, 50) * 1000
    run.p99_ms = _percentile(ordered, 99) * 1000
    run.cpu_s_per_1k = (cpu1 - cpu0) / ops * 1000 if ops else math.nan
    run.redis_cpu_s_per_1k = (redis1 - redis0) / ops * 1000 if ops else math.nan
    commands = {k: n - calls0.get(k, 0) for k, n in calls1.items() if n != calls0.get(k, 0)}
    commands["info"] = commands.get("info", 0) - 1  # our own INFO before the window
    run.redis_commands = {k: n for k, n in sorted(commands.items()) if n}
    run.redis_commands_per_op = sum(run.redis_commands.values()) / ops if ops else math.nan
    run.errors, run.error_kinds, run.first_errors = state.errors, state.kinds, state.first


def _run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run on a fresh uvloop loop (the proxy's loop); plain asyncio when uvloop is missing."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not everywhere
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --------------------------------------------------------------------------------- environment


def cached_value(target: int = VALUE_TARGET) -> bytes:
    """A `CachedResponse.encode()` of a credits-report JSON page, about `target` bytes."""
    from proxy.core.entry import CachedResponse

    def encoded(rows: int) -> bytes:
        rng = random.Random(20240601)
        words = ("credit", "refund", "class pack", "membership", "promo", "adjustment", "gift")
        data = [
            {
                "id": 900_000 + i,
                "customer_id": rng.randrange(10_000, 99_999),
                "amount": f"{rng.randrange(1, 50_000) / 100:.2f}",
                "currency": "USD",
                "kind": rng.choice(words),
                "note": " ".join(rng.choice(words) for _ in range(rng.randrange(1, 6))),
                "created_at": f"2024-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d}T"
                f"{rng.randrange(24):02d}:{rng.randrange(60):02d}:{rng.randrange(60):02d}Z",
                "expires_at": None if rng.random() < 0.5 else "2025-12-31T23:59:59Z",
            }
            for i in range(rows)
        ]
        body = json.dumps({"data": data, "meta": {"count": rows, "limit": 50}}).encode()
        headers = (("Content-Type", "application/json"),)
        now = time.time()
        return CachedResponse(200, headers, body, now, now + 300).encode()

    rows = 1
    while len(encoded(rows)) < target:
        rows += 1
    return encoded(rows)


def _installed(import_name: str) -> bool:
    importlib.invalidate_caches()
    return importlib.util.find_spec(import_name) is not None


def install_missing() -> list[str]:
    """pip-install the optional clients that are missing; the command lines that ran."""
    missing = [req for _, _, mod, req in CLIENTS if req is not None and not _installed(mod)]
    if not missing:
        return []
    argv = [sys.executable, "-m", "pip", "install", *missing]
    print("+", shlex.join(argv), flush=True)
    subprocess.run(argv, check=True)
    importlib.invalidate_caches()
    return [shlex.join(argv)]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_info(dist: str) -> dict[str, Any] | None:
    """What the installed metadata says of who keeps a distribution."""
    try:
        meta = importlib.metadata.metadata(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
    fields = meta.json  # lower-case keys, lists for repeated fields
    keep = ("version", "author", "author_email", "maintainer", "maintainer_email", "home_page")
    info: dict[str, Any] = {key: fields[key] for key in keep if fields.get(key)}
    for key in ("project_url", "requires_python"):
        if fields.get(key):
            info[key] = fields[key]
    return info


def redis_server_version() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        return "not found"
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    return out.stdout.strip()


# ------------------------------------------------------------------------------------- report


def _median(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.median(finite) if finite else math.nan


def summarise(runs: Sequence[Run], skipped: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for name, dist, _, _ in CLIENTS:
        mine = [r for r in runs if r.client == name]
        if not mine and name not in skipped:
            continue  # left out by --only
        row: dict[str, Any] = {"client": name, "version": _version(dist)}
        if name in skipped:
            row["status"] = skipped[name]
        ok = [r for r in mine if r.failed is None]
        failed = [r for r in mine if r.failed is not None]
        if failed:
            row["status"] = f"failed in {len(failed)}/{len(mine)} rounds: {failed[0].failed}"
        if ok:
            row.update(
                rounds=len(ok),
                ops_per_s=_median([r.ops_per_s for r in ok]),
                p50_ms=_median([r.p50_ms for r in ok]),
                p99_ms=_median([r.p99_ms for r in ok]),
                cpu_s_per_1k=_median([r.cpu_s_per_1k for r in ok]),
                redis_cpu_s_per_1k=_median([r.redis_cpu_s_per_1k for r in ok]),
                redis_commands_per_op=_median([r.redis_commands_per_op for r in ok]),
                errors=sum(r.errors for r in ok),
            )
        rows.append(row)
    return rows


def render(rows: Sequence[dict[str, Any]]) -> str:
    lines = [
        "| client | version | ops/s | p50 ms | p99 ms | CPU s / 1k ops (this process) "
        "| redis-server CPU s / 1k ops | Redis cmds / op | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        version = row["version"] or "—"
        if "ops_per_s" not in row:
            lines.append(
                f"| {row['client']} | {version} | {row.get('status', '—')} |  |  |  |  |  |  |"
            )
            continue
        name = row["client"] + (f" ({row['status']})" if "status" in row else "")
        lines.append(
            f"| {name} | {version} | {row['ops_per_s']:,.0f} | {row['p50_ms']:.2f} "
            f"| {row['p99_ms']:.2f} | {row['cpu_s_per_1k']:.3f} "
            f"| {row['redis_cpu_s_per_1k']:.3f} | {row['redis_commands_per_op']:.2f} "
            f"| {row['errors']} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/clients.py",
        description="Redis clients on the proxy's hot path: GCRA EVALSHA + GET of a 3.5 KB value.",
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds (5)")
    parser.add_argument("--concurrency", type=int, default=50, help="concurrent tasks (50)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, order alternating (3)")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first (1)")
    parser.add_argument(
        "--install", action="store_true", help="pip-install coredis and valkey-glide if missing"
    )
    parser.add_argument(
        "--only", action="append", default=[], metavar="CLIENT", help="run only these clients"
    )
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "out" / "clients.json", help="JSON output"
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.concurrency < 1 or args.rounds < 1 or args.warmup < 0:
        parser.error("--seconds > 0, --concurrency ≥ 1, --rounds ≥ 1 and --warmup ≥ 0, please")
    names = [name for name, *_ in CLIENTS]
    for name in args.only:
        if name not in names:
            parser.error(f"--only {name!r}: not one of {names}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    args = parse_args(argv)
    from proxy.testing.support import RedisServer

    installs = install_missing() if args.install else []
    skipped: dict[str, str] = {}
    selected: list[str] = []
    for name, _, module, _ in CLIENTS:
        if args.only and name not in args.only:
            continue
        if not _installed(module):
            skipped[name] = "not installed (pass --install)"
            continue
        selected.append(name)

    versions = {dist: _version(dist) for dist in _VERSIONS}
    versions["python"] = platform.python_version()
    versions["redis-server"] = redis_server_version()
    print("versions:", ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()))
    packages = {d: package_info(d) for d in ("redis", "coredis", "valkey-glide")}
    for dist, info in packages.items():
        if info is not None:
            who = info.get("maintainer") or info.get("maintainer_email") or info.get("author")
            who = who or info.get("author_email") or "—"
            print(f"  {dist} {info['version']}: {who}")

    value = cached_value()
    server: RedisServer = RedisServer().start()
    runs: list[Run] = []
    started = datetime.now(UTC)
    load_before = os.getloadavg()
    try:
        assert server.process is not None
        with server.client() as sync:
            sync.set(VALUE_KEY, value)
        print(
            f"value: {len(value)} bytes; {args.concurrency} tasks x {args.seconds:g} s "
            f"(+{args.warmup:g} s warm-up), {args.rounds} rounds, redis on port {server.port}",
            flush=True,
        )
        for number in range(1, args.rounds + 1):
            order = selected if number % 2 == 1 else selected[::-1]
            for name in order:
                run = Run(name, number)
                try:
                    _run_loop(
                        _measure(
                            FACTORIES[name],
                            server.port,
                            server.process.pid,
                            value,
                            run,
                            args.concurrency,
                            args.seconds,
                            args.warmup,
                        )
                    )
                except Exception as exc:
                    run.failed = f"{type(exc).__name__}: {exc}"[:300]
                runs.append(run)
                if run.failed is not None:
                    print(f"  round {number} {name}: FAILED {run.failed}", flush=True)
                else:
                    print(
                        f"  round {number} {name}: {run.ops_per_s:,.0f} ops/s, "
                        f"p50 {run.p50_ms:.2f} ms, p99 {run.p99_ms:.2f} ms, "
                        f"{run.cpu_s_per_1k:.3f} CPU s/1k ops, errors {run.errors}"
                        + (f" {run.error_kinds}" if run.error_kinds else ""),
                        flush=True,
                    )
    finally:
        server.close()

    rows = summarise(runs, skipped)
    table = render(rows)
    print()
    print(table)
    argv_used = sys.argv[1:] if argv is None else list(argv)
    report = {
        "command": shlex.join([".venv/bin/python", "bench/clients.py", *argv_used]),
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_before": load_before,
            "load_after": os.getloadavg(),
            "note": "client process and redis-server share the same cores",
        },
        "config": {
            "seconds": args.seconds,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "value_bytes": len(value),
            "script_args": SCRIPT_ARGS,
        },
        "installs": installs,
        "versions": versions,
        "packages": packages,
        "summary": rows,
        "table": table,
        "runs": [asdict(r) for r in runs],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
