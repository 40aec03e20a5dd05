"""A real Prometheus scrapes `serve --workers 2`; every dashboard expression returns data.

Debian's `prometheus` and `promtool` (`.ci/run` installs them); the test skips only where the
binaries are absent.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY, REPORT, auth
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import free_port, wait_for_port
from proxy.web.auth import hash_key

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        shutil.which("prometheus") is None or shutil.which("promtool") is None,
        reason="Debian's prometheus is not installed (.ci/run installs it)",
    ),
]

DASHBOARD = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "teamup-proxy.json"
# What Grafana would put in for the dashboard's variables.
RATE_INTERVAL = "1m"


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard, in panel order."""
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "expr" and isinstance(value, str):
                    found.append(value)
                else:
                    walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text(encoding="utf-8")))
    return found


def substitute(expr: str) -> str:
    """Grafana's variables: intervals become 1m, every other `$var` matches all (`=~".*"`)."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__interval", RATE_INTERVAL)
    expr = re.sub(r'(\w+)=~"\$\{?\w+\}?"', r'\1=~".*"', expr)
    expr = re.sub(r'(\w+)="\$\{?\w+\}?"', r'\1=~".*"', expr)
    assert "$" not in expr, f"a variable the test does not know: {expr}"
    return expr


def test_substitute() -> None:
    got = substitute('sum(rate(x{job=~"$job", client="${client}"}[$__rate_interval]))')
    assert got == 'sum(rate(x{job=~".*", client=~".*"}[1m]))'


class Prometheus:
    """`prometheus` on a free port with a tmp storage dir, scraping `target` every second."""

    def __init__(self, target: str) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="teamup-prometheus-"))
        (self.dir / "prometheus.yml").write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: teamup-proxy\n"
            f"    static_configs:\n      - targets: ['{target}']\n"
        )
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Prometheus:
        binary = shutil.which("prometheus")
        assert binary is not None
        self._log = (self.dir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
            ],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )
        wait_for_port(self.port, 30)
        return self

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def proxy(mock_server: TestServer, redis_url: str) -> AsyncIterator[ProxyProcess]:
    upstream = str(mock_server.make_url("")).rstrip("/")
    clients = {
        "billing": {"key_sha256": hash_key(KEY), "rate": "10000/minute"},
        "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "5/minute"},  # for 429s
    }
    async with ProxyProcess(
        upstream, workers=2, redis_url=redis_url, clients=json.dumps(clients)
    ) as running:
        yield running


async def load(proxy: ProxyProcess) -> dict[int, int]:
    """A few hundred requests: misses then hits, a purge, 400s, 401s, 429s. Counts by status."""
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(force_close=True)  # both workers answer
    async with aiohttp.ClientSession(connector=connector) as http:

        async def get(query: str, headers: dict[str, str]) -> None:
            async with http.get(f"{proxy.url}{REPORT}?{query}", headers=headers) as response:
                await response.read()
                statuses[response.status] = statuses.get(response.status, 0) + 1

        for round_ in range(10):
            await asyncio.gather(
                *(get(f"format=json&limit={n}", auth()) for n in range(1, 26)),
                get("limit=abc", auth()),
                get("limit=1", {}),
                get(f"limit={round_ + 1}", auth(OTHER_KEY)),
            )
        async with http.delete(f"{proxy.url}/admin/cache", headers=auth(ADMIN_KEY)) as response:
            assert response.status == 200
    return statuses


async def test_prometheus_scrapes_every_dashboard_panel(proxy: ProxyProcess) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{proxy.url}/metrics") as response:
            exposition = await response.read()
    checked = await asyncio.to_thread(
        subprocess.run,
        ["promtool", "check", "metrics"],
        input=exposition,
        capture_output=True,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == b"", checked.stdout + checked.stderr

    prometheus = await asyncio.to_thread(Prometheus(f"127.0.0.1:{proxy.port}").start)
    try:
        async with aiohttp.ClientSession() as http:

            async def query(expr: str) -> list[dict[str, Any]]:
                params = {"query": expr}
                async with http.get(f"{prometheus.url}/api/v1/query", params=params) as response:
                    body = await response.json()
                assert body["status"] == "success", (expr, body)
                result: list[dict[str, Any]] = body["data"]["result"]
                return result

            # A first scrape before the load, so rates have a "before".
            for _ in range(150):  # ready (its storage is open), then one scrape done
                async with http.get(f"{prometheus.url}/-/ready") as response:
                    ready = response.status == 200
                if ready and await query('up{job="teamup-proxy"} == 1'):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("Prometheus never scraped the proxy")
            statuses = await load(proxy)
            assert {200, 400, 401, 429} <= set(statuses), statuses
            assert sum(statuses.values()) >= 250

            empty: list[str] = []
            for expr in dashboard_exprs():
                promql = substitute(expr)
                for _ in range(20):  # up to ~10 s for the samples to arrive
                    if result := await query(promql):
                        break
                    await asyncio.sleep(0.5)
                if not result:
                    empty.append(promql)
            assert empty == [], "panels without data:\n" + "\n".join(empty)
    finally:
        prometheus.close()
