"""`serve --workers 2` as a real process: one port, metrics over both workers, drain, logs."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.testing.e2e import KEY, REPORT, TOKEN, auth
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess

pytestmark = pytest.mark.slow

ACCESS_FIELDS = {
    "time",
    "request_id",
    "client",
    "method",
    "path",
    "key",
    "cache",
    "upstream_status",
    "upstream_ms",
    "total_ms",
    "status",
}


def metric_sum(text: str, name: str, **labels: str) -> float:
    """The sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        match = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(2))
    return total


async def test_two_workers_share_the_port_metrics_and_drain(
    mock_server: TestServer, mock_state: MockState, redis_url: str
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    proxy = ProxyProcess(upstream, workers=2, redis_url=redis_url, drain_delay=0.5)
    await proxy.start()
    try:
        # A fresh connection per request, so the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for n in range(1, 41):
                async with http.get(
                    f"{proxy.url}{REPORT}?limit={n % 10 + 1}", headers=auth()
                ) as response:
                    assert response.status == 200
            # Each worker tallies its counts and publishes them at least once a second.
            deadline = time.monotonic() + 5
            while True:
                async with http.get(f"{proxy.url}/metrics") as response:
                    text = await response.text()
                counted = metric_sum(text, "teamup_proxy_requests_total", route="report")
                if counted == 40 or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
            for _ in range(10):
                async with http.get(f"{proxy.url}/metrics") as response:
                    text = await response.text()
                assert metric_sum(text, "teamup_proxy_requests_total", route="report") == 40
                assert metric_sum(text, "teamup_proxy_upstream_requests_total") == 10
            assert mock_state.calls == 10

            mock_state.faults.latency = 1.5
            slow = [
                asyncio.ensure_future(
                    http.get(f"{proxy.url}{REPORT}?format=json&limit=1&offset={n}", headers=auth())
                )
                for n in range(1, 7)
            ]
            await asyncio.sleep(0.5)  # all six are in flight, waiting on the mock
            assert proxy.process is not None
            proxy.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            async with http.get(f"{proxy.url}/readyz") as response:
                assert response.status == 503
                assert (await response.json())["status"] == "draining"
            responses = await asyncio.gather(*slow)
            assert [r.status for r in responses] == [200] * 6
            for r in responses:
                assert len((await r.json())["rows"]) == 1
        code = await proxy.stop()
    finally:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop(signal.SIGKILL)
    assert code == 0
    logs = proxy.stderr.decode()
    assert TOKEN not in logs and KEY not in logs
    records = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    access = [r for r in records if r["logger"] == "teamup_proxy.access"]
    assert len(access) >= 46
    for record in access:
        assert ACCESS_FIELDS <= record.keys()
    report = next(r for r in access if r["path"] == REPORT and r["cache"] == "miss")
    assert report["client"] == "billing"
    assert report["upstream_status"] == 200
    assert report["key"].startswith("v3:customer_credits:")
    events = {r.get("event") for r in records}
    assert {"ready", "listening", "draining", "stopped"} <= events
    pids = {r["pid"] for r in records if r.get("event") == "listening"}
    assert len(pids) == 2


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [
        int(pid)
        for pid in children
        if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


async def test_a_killed_worker_is_replaced(mock_server: TestServer, redis_url: str) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    async with ProxyProcess(upstream, workers=2, redis_url=redis_url) as proxy:
        await asyncio.sleep(0.5)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{proxy.url}/healthz") as response:
                assert response.status == 200
        assert proxy.process is not None
        workers = worker_pids(proxy.process.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        await asyncio.sleep(2)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as http:
            for _ in range(10):
                async with http.get(f"{proxy.url}{REPORT}", headers=auth()) as response:
                    assert response.status == 200
        code = await proxy.stop()
    assert code == 0
    assert b"worker_restart" in proxy.stderr
