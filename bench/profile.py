"""Profile one proxy worker on hot hits: py-spy while wrk runs, samples grouped by where they land.

`.venv/bin/python bench/profile.py [--seconds 10] [--log-level WARNING] [--connections 20]`
starts redis-server, the mock and `python -m proxy serve --workers 1`, warms the hot query,
runs `wrk` against it while `py-spy record --format raw` samples the worker, and prints the
share of samples per group (aiohttp's HTTP machinery, redis-py, the proxy's own code, logging,
metrics, the event loop waiting) and the top functions by own time. `pip install py-spy` first.
"""

from __future__ import annotations

import argparse
import collections
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__":  # run as a script: the repository root is not on the path yet
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import REPORT_PATH, Ceiling, Mock, Ours, Redis, Service, cpu_seconds, http_get
from bench.scenarios import HOT_QUERY

# (group, substring of a frame's file) in order: the first match of the innermost frame wins.
_GROUPS = (
    ("logging (formatting, handlers, writing)", ("logging/", "proxy/logs.py")),
    ("metrics (prometheus-client)", ("prometheus_client",)),
    ("redis-py and auto-pipelining", ("redis/", "pipelining.py")),
    ("proxy: limiter", ("reservations.py", "limiters.py")),
    ("proxy: handler, service, middleware", ("proxy/",)),
    ("aiohttp (parse, route, respond)", ("aiohttp/", "multidict", "yarl")),
    ("asyncio / uvloop machinery", ("asyncio/", "uvloop")),
)


def _group(frame: str) -> str:
    for name, needles in _GROUPS:
        if any(needle in frame for needle in needles):
            return name
    return "other"


def _wrk(url: str, headers: dict[str, str], args: argparse.Namespace) -> int:
    """Run wrk (one thread) against `url`; the requests it completed."""
    argv = ["wrk", "-t1", f"-c{args.connections}", f"-d{args.seconds:g}s", url]
    for name, value in headers.items():
        argv += ["-H", f"{name}: {value}"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    line = next(line for line in out.splitlines() if "requests in" in line)
    return int(line.split()[0])


def _measure(
    name: str, pids: list[int], url: str, headers: dict[str, str], args: argparse.Namespace
) -> None:
    """Requests per second and CPU per request of `pids` under wrk, without the profiler."""
    before = cpu_seconds(pids)
    count = _wrk(url, headers, args)
    cpu = cpu_seconds(pids) - before
    print(f"{name}: {count / args.seconds:.0f} req/s, {cpu / count * 1e6:.1f} µs CPU per request")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/profile.py")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--ceiling", action="store_true", help="then wrk the ceiling (1 worker)")
    parser.add_argument(
        "--code",
        type=Path,
        help="run the proxy from this checkout (e.g. `git archive` of a commit)",
    )
    args = parser.parse_args()
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    workdir = Path(tempfile.mkdtemp(prefix="teamup-profile-"))
    for sub in ("redis", "mock", "ours", "ceiling"):
        (workdir / sub).mkdir()
    token = "bench-upstream-" + secrets.token_hex(8)
    key = "bench-client-" + secrets.token_hex(8)
    redis = Redis(workdir / "redis")
    mock = Mock(workdir / "mock", token, 0.08, seed=7)
    ours = Ours(workdir / "ours", redis, mock, key, 1, log_level=args.log_level)
    started: list[Service] = []
    try:
        redis.start()
        started.append(redis)
        mock.start()
        started.append(mock)
        ours.start(args.code)
        started.append(ours)
        url = f"{ours.base}{REPORT_PATH}?{HOT_QUERY}"
        caller = {"Authorization": f"Token {key}"}
        for _ in range(3):
            http_get(url, caller)
        _measure("proxy", [ours.pid], url, caller, args)
        raw = workdir / "profile.txt"
        spy = subprocess.Popen(
            [
                py_spy,
                "record",
                "--pid",
                str(ours.pid),
                "--rate",
                str(args.rate),
                "--function",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--duration",
                str(int(args.seconds) + 1),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wrk(url, caller, args)
        spy.wait(60)
        if args.ceiling:
            _, headers, body = http_get(url, caller)
            ceiling = Ceiling(workdir / "ceiling", 1)
            ceiling.start_with(body, headers.get("Content-Type", "application/json"))
            started.append(ceiling)
            _measure(
                "ceiling", ceiling.worker_pids(), ceiling.base + url[len(ours.base) :], {}, args
            )
        groups: collections.Counter[str] = collections.Counter()
        own: collections.Counter[str] = collections.Counter()
        inclusive: collections.Counter[str] = collections.Counter()
        total = asleep = 0
        for line in raw.read_text().splitlines():
            stack, _, samples = line.rpartition(" ")
            frames = stack.split(";")
            n = int(samples)
            leaf = frames[-1]
            in_writer = any(f.startswith("LineWriter._run") for f in frames[-3:])
            # The log writer's thread, asleep (in `_run` itself or its Event's wait).
            if in_writer and (leaf.startswith("LineWriter._run") or leaf.startswith("wait ")):
                asleep += n
                continue
            total += n
            idle = "select" in leaf or ("run_forever" in leaf and len(frames) < 6)
            groups["event loop waiting (epoll)" if idle else _group(leaf)] += n
            own[leaf] += n
            for frame in set(frames):
                inclusive[frame] += n
        print(f"\n{total} samples ({asleep} more of the log writer's thread asleep, left out),")
        print("by where the innermost frame is:")
        for name, n in groups.most_common():
            print(f"  {n / total:6.1%}  {name}")
        print("\ntop functions by own time:")
        for name, n in own.most_common(args.top):
            print(f"  {n / total:6.1%}  {name}")
        print("\nthe proxy's own functions, inclusive of what they call:")
        mine = [(f, n) for f, n in inclusive.most_common() if "proxy/" in f or "logging" in f]
        for name, n in mine[: args.top]:
            print(f"  {n / total:6.1%}  {name}")
    finally:
        for service in reversed(started):
            service.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
