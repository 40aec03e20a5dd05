"""The command: install what is missing, start everything, run the rounds, write the results."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from .procs import (
    REPORT_PATH,
    ROOT,
    Ceiling,
    Mock,
    Nginx,
    Ours,
    Redis,
    Varnish,
    http_get,
    nginx_binary,
    varnish_binary,
)
from .report import evaluate, render, summarise
from .scenarios import HOT_QUERY, SCENARIOS, Context, Metrics, Target

__all__ = ["main"]

BENCH = Path(__file__).resolve().parent
_PACKAGES = (
    ("redis-server", "redis-server"),
    ("nginx", "nginx"),
    ("varnishd", "varnish"),
    ("wrk", "wrk"),
)
# Who runs which scenario: the peers and the ceiling only serve the hot hit.
HOT_TARGETS = ("ours", "ours_log", "nginx", "varnish", "ceiling")
PAIR_TARGETS = ("ours", "nginx")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.py",
        description="teamup-proxy and NGINX proxy_cache, same machine, same run, A/B rounds.",
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every scenario (3)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each wrk run (10)")
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="SCENARIO",
        help=f"run only these ({', '.join(SCENARIOS)}); repeat or comma-separate",
    )
    parser.add_argument("--workers", type=int, default=2, help="workers of each server (2)")
    parser.add_argument("--connections", type=int, default=50, help="wrk connections (50)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (2)")
    parser.add_argument("--burst", type=int, default=200, help="cold-collapse requests (200)")
    parser.add_argument("--miss-requests", type=int, default=200, help="miss requests (200)")
    parser.add_argument("--mix-requests", type=int, default=20_000, help="mix requests (20000)")
    parser.add_argument("--mix-concurrency", type=int, default=32, help="mix concurrency (32)")
    parser.add_argument("--site-visits", type=int, default=3000, help="website-mix visits (3000)")
    parser.add_argument(
        "--site-concurrency", type=int, default=32, help="website-mix concurrency (32)"
    )
    parser.add_argument("--latency", type=float, default=0.08, help="mock latency, s (0.08)")
    parser.add_argument("--seed", type=int, default=20240601, help="seed of the mix")
    parser.add_argument(
        "--out", type=Path, default=BENCH / "out", help="where results.json goes (bench/out)"
    )
    parser.add_argument(
        "--results-md",
        type=Path,
        default=BENCH / "RESULTS.md",
        help="the report (bench/RESULTS.md)",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never apt-get; fail if a tool is missing"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the temp dir (configs, logs) after the run"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for item in args.only for name in item.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(
            f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    args.scenarios = [name for name in SCENARIOS if not chosen or name in chosen]
    if args.rounds < 1 or args.duration <= 0:
        parser.error("--rounds must be ≥ 1 and --duration > 0")
    return args


def _found(binary: str) -> bool:
    if binary == "nginx":
        return nginx_binary() is not None
    if binary == "varnishd":
        return varnish_binary() is not None
    return shutil.which(binary) is not None


def _needed(scenarios: Sequence[str]) -> list[tuple[str, str]]:
    """The tools the chosen scenarios use (Varnish serves the hot hit only)."""
    wanted = {"redis-server", "nginx"}
    if {"hot", "hotread"} & set(scenarios):
        wanted.add("wrk")
    if "hot" in scenarios:
        wanted.add("varnishd")
    return [(binary, package) for binary, package in _PACKAGES if binary in wanted]


def ensure_tools(allow_install: bool, scenarios: Sequence[str] = tuple(SCENARIOS)) -> None:
    """apt-get the missing tools when root on Debian/Ubuntu; otherwise say what to install."""
    needed = _needed(scenarios)
    missing = [package for binary, package in needed if not _found(binary)]
    if not missing:
        return
    command = f"apt-get install -y {' '.join(missing)}"
    if not allow_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise SystemExit(
            f"bench: missing {', '.join(missing)}. Install them first, e.g. `sudo apt-get update "
            f"&& sudo {command}` (the bench installs them itself only when run as root)."
        )
    print(f"bench: installing {', '.join(missing)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    still = [package for binary, package in needed if not _found(binary)]
    if still:
        raise SystemExit(f"bench: apt-get did not provide {', '.join(still)}")


def _output(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return (done.stdout + done.stderr).strip()


def machine_facts() -> dict[str, str]:
    """nproc, CPU, kernel and the versions of everything measured."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = "unknown"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 2**20:.1f} GiB"
    redis_version = re.search(r"v=(\S+)", _output(["redis-server", "--version"]))
    nginx_version = re.search(r"nginx/(\S+)", _output([nginx_binary() or "nginx", "-v"]))
    wrk_version = re.search(r"wrk (\S+)", _output(["wrk", "-v"]))
    import aiohttp

    return {
        "nproc": str(os.cpu_count()),
        "CPU": cpu,
        "memory": memory,
        "kernel": platform.release(),
        "OS": _os_name(),
        "Python": platform.python_version(),
        "redis-server": redis_version.group(1) if redis_version else "unknown",
        "nginx": nginx_version.group(1) if nginx_version else "unknown",
        "wrk": wrk_version.group(1) if wrk_version else "unknown",
        "aiohttp (proxy and clients)": aiohttp.__version__,
    }


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def _load() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def _commit() -> str:
    text = _output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return (text or "unknown") + ("+local changes" if dirty else "")


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    python = os.path.relpath(sys.executable, Path.cwd())
    python = python if not python.startswith("..") else sys.executable
    script = os.path.relpath(BENCH / "run.py", Path.cwd())
    return shlex.join([python, script, *args])


def _brief(name: str, metrics: Metrics) -> str:
    keys = {
        "hot": ("req_per_s", "p50_ms", "p99_ms", "cpu_us_per_req", "rss_mb_per_worker", "errors"),
        "collapse": ("upstream_calls", "last_minus_upstream_ms", "non_200"),
        "miss": ("overhead_p50_ms", "overhead_p99_ms", "errors"),
        "mix": ("upstream_per_1000", "upstream_per_1000_without_refetched_errors", "errors"),
        "footprint": ("json_body_bytes", "json_entry_bytes", "csv_body_bytes", "csv_entry_bytes"),
        "site": ("requests", "upstream_per_1000", "ideal_per_1000", "leaked_links", "errors"),
        "hotread": ("list_req_per_s", "retrieve_req_per_s", "list_errors", "retrieve_errors"),
    }[name]
    return " ".join(f"{key}={metrics[key]:.6g}" for key in keys)


def _raise_interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(
    args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack
) -> list[dict[str, Any]]:
    """Start the four servers, run the rounds, return one record per round."""
    token = "bench-upstream-" + secrets.token_hex(12)
    client_key = "bench-client-" + secrets.token_hex(12)
    for sub in ("redis", "mock", "ours", "ours_log", "nginx", "varnish", "ceiling"):
        (workdir / sub).mkdir()
    redis = Redis(workdir / "redis")
    mock = Mock(workdir / "mock", token, args.latency, seed=7)
    ours = Ours(workdir / "ours", redis, mock, client_key, args.workers)
    # The same proxy with its access log on (the product default), for the hot hit only.
    ours_log = Ours(
        workdir / "ours_log",
        redis,
        mock,
        client_key,
        args.workers,
        name="ours_log",
        log_level="INFO",
    )
    nginx = Nginx(workdir / "nginx", mock, args.workers)
    varnish = Varnish(workdir / "varnish", mock, args.workers)
    ceiling = Ceiling(workdir / "ceiling", args.workers)
    services: tuple[Redis | Mock | Ours | Nginx | Varnish | Ceiling, ...]
    # The second proxy, Varnish and the ceiling serve the hot hit only: not started without it.
    hot = "hot" in args.scenarios
    services = (redis, mock, ours, ours_log, nginx, varnish) if hot else (redis, mock, ours, nginx)
    for service in services:
        stack.callback(service.stop)
        print(f"bench: starting {service.name}", flush=True)
        service.start()
    # The ceiling answers the hot query's own bytes, as TeamUp (and so every cache) sends them.
    status, headers, body = http_get(
        f"{mock.base}{REPORT_PATH}?{HOT_QUERY}", {"Authorization": f"Token {token}"}
    )
    if status != 200:
        raise RuntimeError(f"the mock answered the hot query with {status}")
    if hot:
        stack.callback(ceiling.stop)
        print("bench: starting ceiling", flush=True)
        ceiling.start_with(body, headers.get("Content-Type", "application/json"))
        services = (*services, ceiling)
    caller = {"Authorization": f"Token {client_key}"}
    targets = {
        "ours": Target("ours", ours, redis, caller),
        "ours_log": Target("ours_log", ours_log, redis, caller),
        "nginx": Target("nginx", nginx, redis, caller),
        "varnish": Target("varnish", varnish, redis, caller),
        "ceiling": Target("ceiling", ceiling, redis, caller),
    }
    ctx = Context(
        mock=mock,
        workdir=workdir,
        duration=args.duration,
        connections=args.connections,
        threads=args.threads,
        burst=args.burst,
        miss_requests=args.miss_requests,
        miss_concurrency=4,
        mix_requests=args.mix_requests,
        mix_concurrency=args.mix_concurrency,
        seed=args.seed,
        site_visits=args.site_visits,
        site_concurrency=args.site_concurrency,
    )
    if "mix" in args.scenarios:
        replay = ctx.replay()
        print(
            f"bench: mix of {len(replay.query_strings)} requests, {replay.distinct_keys} distinct "
            f"questions asked in {replay.distinct_spellings} distinct spellings",
            flush=True,
        )
    if "site" in args.scenarios:
        site = ctx.site()
        print(
            f"bench: website mix of {len(site.visits)} visits over {site.list_questions} "
            "events lists (each spelled 5 ways), events and customers by id",
            flush=True,
        )
    records = []
    for index in range(args.rounds):
        forward = index % 2 == 0
        record: dict[str, Any] = {"round": index + 1, "order": [], "results": {}}
        for scenario in args.scenarios:
            names = HOT_TARGETS if scenario == "hot" else PAIR_TARGETS
            order = list(names) if forward else list(reversed(names))
            record["order"].append([scenario, order])
            for name in order:
                for alive in services:
                    alive.check_alive()
                metrics = SCENARIOS[scenario](ctx, targets[name])
                record["results"].setdefault(scenario, {})[name] = metrics
                print(
                    f"round {index + 1}/{args.rounds} {scenario:9} {name:8} "
                    f"{_brief(scenario, metrics)}",
                    flush=True,
                )
        records.append(record)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ensure_tools(allow_install=not args.no_install, scenarios=args.scenarios)
    command = _command(argv)
    started = datetime.now(UTC)
    load_before = _load()
    workdir = Path(tempfile.mkdtemp(prefix="teamup-bench-"))
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    failed = True
    stack = contextlib.ExitStack()
    try:
        rounds = run(args, workdir, stack)
        failed = False
    except KeyboardInterrupt:
        failed = False  # nothing to debug: the temp dir goes unless --keep
        print("\nbench: interrupted; stopping everything", file=sys.stderr, flush=True)
        return 130
    finally:
        # A second Ctrl-C must not leave servers behind.
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            stack.close()
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, previous)
        if failed or args.keep:
            print(f"bench: configs and server logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    summary = summarise(rounds)
    load_after = _load()
    machine = machine_facts()
    machine["load average (1/5/15 min) before → after"] = f"{load_before} → {load_after}"
    data: dict[str, Any] = {
        "command": command,
        "started": started.strftime("%Y-%m-%d %H:%M:%S"),
        "finished": datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
        "machine": machine,
        "settings": {
            "rounds": args.rounds,
            "duration": args.duration,
            "scenarios": args.scenarios,
            "workers": args.workers,
            "connections": args.connections,
            "threads": args.threads,
            "burst": args.burst,
            "miss_requests": args.miss_requests,
            "miss_concurrency": 4,
            "mix_requests": args.mix_requests,
            "mix_concurrency": args.mix_concurrency,
            "site_visits": args.site_visits,
            "site_concurrency": args.site_concurrency,
            "latency_ms": args.latency * 1000,
            "seed": args.seed,
            "nproc": os.cpu_count(),
        },
        "rounds": rounds,
        "summary": summary,
    }
    if args.rounds < 3 or args.duration < 10:
        data["warning"] = (
            f"Short run ({args.rounds} round(s), {args.duration:g} s per wrk run): fine for "
            "checking that everything works, too noisy to quote."
        )
    targets = evaluate(summary, rounds)
    data["targets"] = [
        {"name": t.name, "measured": t.measured, "passed": t.passed} for t in targets
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    args.results_md.write_text(render(data, targets))
    print(f"bench: wrote {args.results_md} and {args.out / 'results.json'}")
    for target in targets:
        verdict = {True: "pass", False: "MISS", None: "not run"}[target.passed]
        print(f"  {verdict:7} {target.name}: {target.measured}")
    return 0
