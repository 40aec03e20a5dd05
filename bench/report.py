"""Medians, targets and the Markdown of `bench/RESULTS.md`."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["ROWS", "TargetResult", "evaluate", "render", "summarise"]

Summary = dict[str, dict[str, dict[str, float]]]  # scenario -> target -> metric -> median
Rounds = list[dict[str, Any]]

# scenario -> (metric, label, decimals); the table shows each with ours, NGINX and ours/NGINX.
ROWS: dict[str, list[tuple[str, str, int]]] = {
    "hot": [
        ("req_per_s", "throughput (req/s)", 0),
        ("p50_ms", "latency p50 (ms)", 2),
        ("p90_ms", "latency p90 (ms)", 2),
        ("p99_ms", "latency p99 (ms)", 2),
        ("cpu_us_per_req", "CPU per request (µs, all server processes)", 1),
        ("cpu_us_per_req_redis", "… of which Redis (µs)", 1),
        ("redis_commands_per_1000", "Redis commands per 1,000 requests (ours)", 1),
        ("rss_mb_per_worker", "RSS per worker, max during the run (MB)", 1),
        ("workers", "workers", 0),
        ("body_bytes", "response body (bytes)", 0),
        ("errors", "errors (socket + non-2xx)", 0),
    ],
    "collapse": [
        ("upstream_calls", "upstream calls", 0),
        ("last_minus_upstream_ms", "last answer - upstream latency (ms)", 1),
        ("last_ms", "last answer (ms)", 1),
        ("p50_ms", "median answer (ms)", 1),
        ("first_ms", "first answer (ms)", 1),
        ("non_200", "non-200 answers", 0),
    ],
    "miss": [
        ("overhead_p50_ms", "overhead p50 (ms)", 2),
        ("overhead_p99_ms", "overhead p99 (ms)", 2),
        ("proxy_p50_ms", "through the proxy p50 (ms)", 2),
        ("proxy_p99_ms", "through the proxy p99 (ms)", 2),
        ("direct_p50_ms", "mock called directly p50 (ms)", 2),
        ("direct_p99_ms", "mock called directly p99 (ms)", 2),
        ("errors", "errors", 0),
    ],
    "mix": [
        ("upstream_per_1000", "upstream calls per 1,000 requests", 1),
        (
            "upstream_per_1000_without_refetched_errors",
            "… counting each failing spelling once",
            1,
        ),
        ("ideal_per_1000", "best possible for the cache key (distinct keys per 1,000)", 1),
        ("upstream_calls", "upstream calls", 0),
        ("errors", "errors (non-200 + client failures)", 0),
        ("status_4xx", "4xx answers", 0),
        ("status_5xx", "5xx answers", 0),
        ("req_per_s", "replay throughput (req/s, Python client)", 0),
    ],
    "footprint": [
        ("json_body_bytes", "JSON 100 rows: body (bytes)", 0),
        ("json_stored_bytes", "JSON 100 rows: stored value / cache file (bytes)", 0),
        ("json_entry_bytes", "JSON 100 rows: bytes per entry (Redis MEMORY USAGE / file)", 0),
        ("csv_body_bytes", "CSV 100 rows: body (bytes)", 0),
        ("csv_stored_bytes", "CSV 100 rows: stored value / cache file (bytes)", 0),
        ("csv_entry_bytes", "CSV 100 rows: bytes per entry (Redis MEMORY USAGE / file)", 0),
    ],
    "site": [
        ("upstream_per_1000", "upstream calls per 1,000 requests", 1),
        ("ideal_per_1000", "best possible for the cache key (distinct keys per 1,000)", 1),
        ("upstream_calls", "upstream calls", 0),
        ("requests", "requests (first requests + `next` followed)", 0),
        ("followed_next", "… of which `next` links followed", 0),
        ("distinct_targets", "distinct targets sent (path + query as spelled)", 0),
        ("leaked_links", "`next` links pointing at TeamUp, not the server", 0),
        ("errors", "errors (non-200 + client failures)", 0),
        ("req_per_s", "replay throughput (req/s, Python client)", 0),
    ],
    "hotread": [
        ("report_req_per_s", "report hot query (`hot`'s): throughput (req/s)", 0),
        ("list_req_per_s", "events list page: throughput (req/s)", 0),
        ("retrieve_req_per_s", "one event: throughput (req/s)", 0),
        ("report_p99_ms", "report hot query: p99 (ms)", 2),
        ("list_p99_ms", "events list page: p99 (ms)", 2),
        ("retrieve_p99_ms", "one event: p99 (ms)", 2),
        ("report_cpu_us_per_req", "report hot query: CPU per request (µs)", 1),
        ("list_cpu_us_per_req", "events list page: CPU per request (µs)", 1),
        ("retrieve_cpu_us_per_req", "one event: CPU per request (µs)", 1),
        ("report_redis_commands_per_1000", "report hot query: Redis commands per 1,000", 1),
        ("list_redis_commands_per_1000", "events list page: Redis commands per 1,000", 1),
        ("retrieve_redis_commands_per_1000", "one event: Redis commands per 1,000", 1),
        ("report_body_bytes", "report hot query: body (bytes)", 0),
        ("list_body_bytes", "events list page: body (bytes)", 0),
        ("retrieve_body_bytes", "one event: body (bytes)", 0),
        ("list_errors", "events list page: errors", 0),
        ("retrieve_errors", "one event: errors", 0),
    ],
}

# README's last full run: the report hot hit (ours, access log off) the new reads must keep.
REPORT_HOT_HIT_RPS = 34_204

TITLES = {
    "hot": "1. Hot hit — one cached query under wrk",
    "collapse": "2. Cold collapse — identical requests at once on an empty cache",
    "miss": "3. Miss overhead — distinct cold queries, proxy minus direct",
    "mix": "4. Realistic mix — Zipf replay of many spellings",
    "footprint": "5. Footprint — one cached 100-row page",
    "site": "6. Website mix — events list pages in many spellings, `next` followed, retrieves",
    "hotread": "7. Hot reads — a cached events list page and a cached event under wrk",
}


def summarise(rounds: Rounds) -> Summary:
    """The median of every metric across rounds."""
    values: dict[str, dict[str, dict[str, list[float]]]] = {}
    for record in rounds:
        for scenario, by_target in record["results"].items():
            for target, metrics in by_target.items():
                slot = values.setdefault(scenario, {}).setdefault(target, {})
                for metric, value in metrics.items():
                    slot.setdefault(metric, []).append(float(value))
    return {
        scenario: {
            target: {metric: statistics.median(vs) for metric, vs in metrics.items()}
            for target, metrics in by_target.items()
        }
        for scenario, by_target in values.items()
    }


@dataclass(frozen=True, slots=True)
class TargetResult:
    """One target from the brief: what was measured and whether it holds."""

    name: str
    measured: str
    passed: bool | None  # None: the scenario was not run


def _all(rounds: Rounds, scenario: str, target: str, metric: str) -> list[float]:
    return [
        float(r["results"][scenario][target][metric])
        for r in rounds
        if scenario in r["results"] and target in r["results"][scenario]
    ]


def evaluate(summary: Summary, rounds: Rounds) -> list[TargetResult]:
    """The targets, each judged on the medians (or on every round where that is stricter)."""

    def get(scenario: str, target: str, metric: str) -> float | None:
        return summary.get(scenario, {}).get(target, {}).get(metric)

    results: list[TargetResult] = []

    def judge(name: str, check: Callable[[], tuple[str, bool]], *needed: str) -> None:
        if any(scenario not in summary for scenario in needed):
            results.append(TargetResult(name, "not run", None))
        else:
            measured, passed = check()
            results.append(TargetResult(name, measured, passed))

    def hot_rps(target: str, floor: float) -> Callable[[], tuple[str, bool]]:
        def check() -> tuple[str, bool]:
            ours, ceiling = get("hot", target, "req_per_s"), get("hot", "ceiling", "req_per_s")
            nginx = get("hot", "nginx", "req_per_s") or 0.0
            ratio = (ours or 0) / (ceiling or 1)
            return (
                f"{ratio:.2f}x ({ours:.0f} vs {ceiling:.0f} req/s; "
                f"{(ours or 0) / (nginx or 1):.2f}x NGINX)",
                ratio >= floor,
            )

        return check

    def hot_p99() -> tuple[str, bool]:
        ours, ceiling = get("hot", "ours", "p99_ms"), get("hot", "ceiling", "p99_ms")
        ratio = (ours or 0) / (ceiling or 1)
        return f"{ratio:.2f}x ({ours:.2f} vs {ceiling:.2f} ms)", ratio <= 1.5

    def collapse_calls() -> tuple[str, bool]:
        calls = _all(rounds, "collapse", "ours", "upstream_calls")
        shown = ", ".join(f"{c:.0f}" for c in calls)
        return f"{shown} (per round; NGINX: {get('collapse', 'nginx', 'upstream_calls'):.0f})", all(
            c == 1 for c in calls
        )

    def collapse_time() -> tuple[str, bool]:
        extra = get("collapse", "ours", "last_minus_upstream_ms") or 0.0
        nginx = get("collapse", "nginx", "last_minus_upstream_ms") or 0.0
        return f"+{extra:.1f} ms (NGINX +{nginx:.1f} ms)", extra <= 20.0

    def mix_ratio() -> tuple[str, bool]:
        ours = get("mix", "ours", "upstream_per_1000") or 0.0
        nginx = get("mix", "nginx", "upstream_per_1000") or 0.0
        fair = get("mix", "nginx", "upstream_per_1000_without_refetched_errors") or 0.0
        ratio, fair_ratio = nginx / (ours or 1), fair / (ours or 1)
        return (
            f"{fair_ratio:.2f}x fewer counting NGINX's failing spellings once "
            f"({ratio:.2f}x as measured: {ours:.1f} vs {nginx:.1f} per 1,000)",
            fair_ratio >= 3.0,
        )

    def miss_p50() -> tuple[str, bool]:
        extra = get("miss", "ours", "overhead_p50_ms") or 0.0
        nginx = get("miss", "nginx", "overhead_p50_ms") or 0.0
        return f"{extra:.2f} ms (NGINX {nginx:.2f} ms)", extra <= 2.0

    def rss() -> tuple[str, bool]:
        worst = max(
            _all(rounds, "hot", "ours", "rss_mb_per_worker")
            + _all(rounds, "hot", "ours_log", "rss_mb_per_worker")
        )
        nginx = get("hot", "nginx", "rss_mb_per_worker") or 0.0
        return f"{worst:.1f} MB, worst round (NGINX {nginx:.1f} MB)", worst <= 80.0

    judge("Hot hit ≥ 0.8x the ceiling's req/s, access log off", hot_rps("ours", 0.8), "hot")
    judge("Hot-hit p99 ≤ 1.5x the ceiling's, access log off", hot_p99, "hot")
    judge("Hot hit ≥ 0.7x the ceiling's req/s, access log on", hot_rps("ours_log", 0.7), "hot")
    judge("Cold collapse: exactly 1 upstream call (every round)", collapse_calls, "collapse")
    judge("Cold collapse: last answer ≤ upstream latency + 20 ms", collapse_time, "collapse")
    judge("Realistic mix: ≥ 3x fewer upstream calls than NGINX", mix_ratio, "mix")

    def site_calls() -> tuple[str, bool]:
        ours = get("site", "ours", "upstream_per_1000") or 0.0
        nginx = get("site", "nginx", "upstream_per_1000") or 0.0
        leaked = (get("site", "ours", "leaked_links") or 0) + (
            get("site", "nginx", "leaked_links") or 0
        )
        errors = get("site", "ours", "errors") or 0
        return (
            f"{nginx / (ours or 1):.2f}x fewer ({ours:.1f} vs {nginx:.1f} per 1,000); "
            f"{leaked:.0f} links to TeamUp, {errors:.0f} errors (ours)",
            ours < nginx and leaked == 0 and errors == 0,
        )

    def read_hits() -> tuple[str, bool]:
        report = get("hotread", "ours", "report_req_per_s") or 0.0
        rows = [(label, get("hotread", "ours", f"{label}_req_per_s") or 0.0) for label in _READS]
        report_cpu = get("hotread", "ours", "report_cpu_us_per_req") or 0.0
        shown = "; ".join(
            f"{label} {rps:.0f} req/s ({rps / (report or 1):.2f}x the report's {report:.0f} "
            f"in the same run, {rps / REPORT_HOT_HIT_RPS:.2f}x README's {REPORT_HOT_HIT_RPS}), "
            f"CPU per request {(get('hotread', 'ours', f'{label}_cpu_us_per_req') or 0.0):.1f} "
            f"vs the report's {report_cpu:.1f} µs"
            for label, rps in rows
        )
        return shown, all(rps >= _SAME_RUN_FLOOR * report for _, rps in rows)

    judge("Miss overhead ≤ 2 ms at p50", miss_p50, "miss")
    judge(
        "Website mix: fewer upstream calls than NGINX, no link to TeamUp, no error",
        site_calls,
        "site",
    )
    judge(
        "Hot hit of an events list and of an event ≥ the report's hot hit (same run, "
        f"≥ {_SAME_RUN_FLOOR}x: wrk's run-to-run noise)",
        read_hits,
        "hotread",
    )
    judge("RSS per worker ≤ 80 MB", rss, "hot")
    return results


_READS = ("list", "retrieve")
_SAME_RUN_FLOOR = 0.95


def _number(value: float | None, decimals: int) -> str:
    if value is None:
        return "—"
    return f"{value:,.{decimals}f}"


def _ratio(ours: float | None, nginx: float | None) -> str:
    if ours is None or nginx is None or nginx == 0:
        return "—"
    return f"{ours / nginx:.2f}"


_HOT_COLUMNS = (
    ("ours", "ours, log off"),
    ("ours_log", "ours, log on"),
    ("nginx", "NGINX"),
    ("varnish", "Varnish"),
    ("ceiling", "ceiling"),
)


def _hot_table(
    hot: dict[str, dict[str, float]], rows: list[tuple[str, str, int]], knobs: dict[str, Any]
) -> list[str]:
    """The hot hit for every server, and ours against the ceiling and against NGINX."""
    head = " | ".join(label for _, label in _HOT_COLUMNS)
    lines = [f"### {TITLES['hot']}", "", _DESCRIPTIONS["hot"].format(**knobs), ""]
    lines += [f"| metric | {head} | ours/ceiling | ours/NGINX |", "|---|" + "--:|" * 7]
    for metric, label, decimals in rows:
        values = [hot.get(name, {}).get(metric) for name, _ in _HOT_COLUMNS]
        if all(v is None for v in values):
            continue
        cells = " | ".join(_number(v, decimals) for v in values)
        ours, nginx, ceiling = values[0], values[2], values[4]
        lines.append(f"| {label} | {cells} | {_ratio(ours, ceiling)} | {_ratio(ours, nginx)} |")
    return [*lines, ""]


def render(data: dict[str, Any], targets: Sequence[TargetResult]) -> str:
    """RESULTS.md."""
    summary: Summary = data["summary"]
    knobs = data["settings"]
    machine = data["machine"]
    lines = [
        "# Benchmark results: teamup-proxy, NGINX `proxy_cache`, Varnish and the aiohttp ceiling",
        "",
        f"Written by `bench/run.py` at {data['finished']} (UTC), commit `{data['commit']}`.",
        "Re-run with:",
        "",
        "```sh",
        data["command"],
        "```",
        "",
        f"Every number is the **median of {knobs['rounds']} round(s)**; each round runs every "
        "scenario against every server it names, alternating the order (forwards in odd rounds, "
        "backwards in even ones). The hot hit runs against ours (access log off and on), NGINX, "
        "Varnish and the ceiling (bare aiohttp + uvloop answering the same bytes as a constant, "
        "`bench/ceiling.py`); the other scenarios against ours and NGINX. Per-round values are "
        "in `bench/out/results.json`.",
        "",
    ]
    if data.get("warning"):
        lines += [f"> **{data['warning']}**", ""]
    lines += ["## Targets", "", "| target | measured | result |", "|---|---|---|"]
    for target in targets:
        verdict = {True: "pass", False: "**miss**", None: "not run"}[target.passed]
        lines.append(f"| {target.name} | {target.measured} | {verdict} |")
    lines.append("")
    if any(target.passed is False for target in targets):
        lines += [
            "Where a target is missed, [PROFILE.md](PROFILE.md) says what the profile shows and "
            "what the hit-path work changed, measured with this harness.",
            "",
        ]
    lines += ["## Results", ""]
    for scenario, rows in ROWS.items():
        if scenario not in summary:
            continue
        if scenario == "hot":
            lines += _hot_table(summary["hot"], rows, knobs)
            continue
        ours, nginx = summary[scenario].get("ours", {}), summary[scenario].get("nginx", {})
        lines += [f"### {TITLES[scenario]}", "", _DESCRIPTIONS[scenario].format(**knobs), ""]
        lines += ["| metric | ours | NGINX | ours/NGINX |", "|---|--:|--:|--:|"]
        for metric, label, decimals in rows:
            a, b = ours.get(metric), nginx.get(metric)
            if a is None and b is None:
                continue
            lines.append(
                f"| {label} | {_number(a, decimals)} | {_number(b, decimals)} | {_ratio(a, b)} |"
            )
        lines.append("")
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in machine.items()]
    lines += ["", "## Setup", ""]
    lines += [line.format(**knobs) for line in _SETUP]
    return "\n".join(lines) + "\n"


_DESCRIPTIONS = {
    "hot": (
        "`wrk -t{threads} -c{connections} -d{duration:g}s` on one query already in the cache "
        "(`?format=json&limit=10`). CPU per request is the utime+stime the server's processes "
        "used during the run (from `/proc`) divided by the requests answered; for ours that is "
        "the supervisor, its workers and Redis. RSS is the largest `VmRSS` any worker reached, "
        'sampled every 100 ms. "log on" is a second proxy with `PROXY_LOG_LEVEL=INFO` (the '
        "product default: one JSON access-log line per request, to a file)."
    ),
    "collapse": (
        "{burst} identical requests sent at once, on connections opened beforehand, for a query "
        "never asked before, on an empty cache (ours: Redis flushed; NGINX: restarted on a new "
        "cache directory). Upstream calls are what the mock counted; times run from the first "
        "byte sent to each complete answer. NGINX's `proxy_cache_lock` waiters look at the "
        "cache again every 500 ms, which is what its last answer shows."
    ),
    "miss": (
        "{miss_requests} distinct never-asked queries at concurrency {miss_concurrency}, timed "
        "one by one on warm connections (aiohttp), through the proxy and straight to the mock "
        "with the token; the overhead is the difference of the percentiles."
    ),
    "mix": (
        "{mix_requests:,} requests over five reports (customer_credits, customers, invoices, "
        "customers.grouped, attendances.grouped) at concurrency {mix_concurrency} (aiohttp), "
        "drawn Zipf-like (s = 1.1, seed {seed}) from 1,400 distinct questions (1,000 of "
        "customer_credits, 400 of the other four); each request comes from one of 5 "
        "simulated apps that spell queries their own way (parameter order; arrays repeated, "
        "comma-separated, `name[]=` or mixed; datetimes in `Z`, `+01:00`, `-05:00` or without "
        "seconds; `format=JSON`; defaults such as `limit=50`/`offset=0`/`format=csv` written or "
        "left off; zero-padded integers). Every spelling of a question was checked to give the "
        "same key under `proxy.query`. NGINX keys on `$request_uri` and forwards the spelling "
        "as sent; the mock answers `format=JSON` with 400, which NGINX does not cache, so each "
        "such request costs NGINX a call — the second row counts each failing spelling once, "
        "and the target is judged on that row."
    ),
    "site": (
        "{site_visits:,} visits at concurrency {site_concurrency} (aiohttp), seed {seed}: 55 % "
        "open an `/api/v2/events` list on page 1 and follow its `next` link 0-3 times (as "
        "answered: ours root-relative, NGINX's rewritten by `sub_filter`), 30 % read one event "
        "(`/api/v2/events/{{id}}`), 15 % one customer (`/api/v2/customers/{{id}}`); lists (60 "
        "distinct), events (600) and customers (300) drawn Zipf-like (s = 1.1). Five apps "
        "spell each question their own way (`bench/site.py`: parameter order; sets comma-"
        "separated, repeated, first-repeated-rest-comma, reordered; `page=1` written or not; "
        "the default `page_size=100` and `format=json` written or not; `starts_at_*` in `Z`, "
        "`+01:00`, `-05:00`, `+02:00`; the doubled slash `/api/v2//` TeamUp's docs print). "
        "Every spelling of a question was checked to give one key under the proxy's router and "
        "contracts. The best possible row counts distinct keys (ours) or distinct `$request_uri`s "
        "(NGINX) of what was actually sent, `next` links included. Ours caches events and "
        "customers in the `standard` TTL class (60 s fresh), NGINX 300 s: the run is shorter."
    ),
    "hotread": (
        "`wrk -t{threads} -c{connections} -d{duration:g}s` on one events list page "
        "(`/api/v2/events?fields=…&page_size=20&sort=start&status=active`, 8 fields) and one "
        "event (`/api/v2/events/135001`), each already in the cache; for ours also the report "
        "hot query of section 1, on the same instance in the same run, as the yardstick. Each "
        "read runs 3 times in rotating order (so that a neighbour's load falls on each alike); "
        "the table shows the medians. CPU per request as in section 1."
    ),
    "footprint": (
        "One 100-row page of each format fetched through each server. Ours: `STRLEN` and "
        "`MEMORY USAGE … SAMPLES 0` of the entry key `teamup-proxy:c:{{v1:<hex>}}` (body "
        "zlib-compressed when it pays); NGINX: the size of its cache file (header + body)."
    ),
}

_SETUP = [
    "- Mock TeamUp: `python -m proxy.testing.mock` with {latency_ms:g} ms latency per call, "
    "one process, shared by every server; calls counted through `/_mock/state`.",
    "- Ours: `python -m proxy serve --workers {workers}` (SO_REUSEPORT), its own `redis-server` "
    "on a free port, one client key, `PROXY_RATE_LIMIT` and `PROXY_UPSTREAM_RATE_LIMIT` set to "
    "1000000/second (the limiters run but never reject), `PROXY_CACHE_TTL=300`, "
    "`PROXY_LOG_LEVEL=WARNING`, every other setting at its default (L1 1 s, stale window 1 h, "
    'client limits from 50 ms reservations). "Ours, log on" is a second instance on the same '
    "Redis with `PROXY_LOG_LEVEL=INFO`, its access log going to a file.",
    "- NGINX: {workers} workers, `listen … reuseport`, upstream keepalive, `proxy_cache` with "
    "`proxy_cache_key $request_uri`, `proxy_cache_valid 200 300s`, `proxy_cache_lock on` "
    "(15 s, like our lease), `proxy_cache_use_stale … updating`, "
    '`proxy_cache_background_update on`, `proxy_set_header Authorization "Token …"`, '
    "`access_log off`; the full file is written by `bench/procs.py`.",
    "- Varnish (Debian's 7.1): `varnishd -F -j none -s malloc,256m -p thread_pools={workers}`, "
    "a VCL that keys on the URL, sets the TeamUp token and caches 200s for 300 s "
    "(`bench/procs.py`); Varnish has threads, not worker processes.",
    "- Ceiling: `bench/ceiling.py`, {workers} `SO_REUSEPORT` processes of bare aiohttp on uvloop, "
    "no middleware, no access log, answering the hot query's bytes (fetched once from the mock) "
    "as a constant: the least any aiohttp handler costs here.",
    "- Clients: `wrk` for the hot hit; Python (uvloop + aiohttp or raw sockets) for the rest, "
    "on the same machine, so client CPU competes with the servers on {nproc} cores.",
]
