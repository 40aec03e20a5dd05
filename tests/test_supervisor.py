"""The supervisor always ends: whatever dies or is signalled when, `serve` exits in bounded time."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.testing.procs import ProxyProcess
from tests.test_log_sink import live_group
from tests.test_serve import worker_pids

pytestmark = pytest.mark.slow

SHUTDOWN_TIMEOUT = 2.0
LOG_FLUSH_TIMEOUT = 1.0
# The supervisor kills a worker still running PROXY_DRAIN_DELAY (0) + PROXY_SHUTDOWN_TIMEOUT +
# 2 s after its SIGTERM; then its own log flush; and room for a loaded machine.
EXIT_BOUND = SHUTDOWN_TIMEOUT + 2.0 + LOG_FLUSH_TIMEOUT + 5.0


async def started(proxy: ProxyProcess) -> list[int]:
    """Start `proxy` and wait until both its workers answer; their pids."""
    await proxy.start()
    assert proxy.process is not None
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:
        for _ in range(200):
            if (
                len(worker_pids(proxy.process.pid)) == 2
                and proxy.stderr.count(b'"event":"listening"') == 2
            ):
                break
            await asyncio.sleep(0.05)
        async with http.get(f"{proxy.url}/healthz") as response:
            assert response.status == 200
    workers = worker_pids(proxy.process.pid)
    assert len(workers) == 2
    return workers


@pytest.mark.parametrize("delay", [0.0, 0.1, 0.35, 0.5, 1.0])
async def test_a_worker_killed_just_before_sigterm_never_outlives_serve(
    mock_server: TestServer, redis_url: str, delay: float
) -> None:
    """Issue 20: a worker SIGKILLed, the supervisor SIGTERMed `delay` s later; on main the
    replacement started after the relay never got the signal and `serve` waited forever."""
    upstream = str(mock_server.make_url("")).rstrip("/")
    proxy = ProxyProcess(
        upstream,
        workers=2,
        redis_url=redis_url,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        log_flush_timeout=LOG_FLUSH_TIMEOUT,
    )
    workers = await started(proxy)
    assert proxy.process is not None
    try:
        os.kill(workers[0], signal.SIGKILL)
        if delay:
            await asyncio.sleep(delay)
        began = time.monotonic()
        code = await proxy.stop(signal.SIGTERM, wait=EXIT_BOUND)
        print(f"delay {delay:g} s: exit {code} {time.monotonic() - began:.2f} s after SIGTERM")
        assert code == 0, proxy.stderr.decode()[-3000:]  # -9: the test killed it after EXIT_BOUND
        assert await live_group(proxy.process.pid) == []
    finally:
        if proxy.process.returncode is None:
            await proxy.stop(signal.SIGKILL)


async def test_a_worker_that_does_not_drain_is_killed_and_reported(
    mock_server: TestServer, redis_url: str
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    proxy = ProxyProcess(
        upstream,
        workers=2,
        redis_url=redis_url,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        log_flush_timeout=LOG_FLUSH_TIMEOUT,
    )
    workers = await started(proxy)
    assert proxy.process is not None
    try:
        os.kill(workers[1], signal.SIGSTOP)  # it can never handle its SIGTERM
        began = time.monotonic()
        code = await proxy.stop(signal.SIGTERM, wait=EXIT_BOUND)
        print(f"stopped worker: exit {code} {time.monotonic() - began:.2f} s after SIGTERM")
        assert code == 1  # not 0: a worker had to be killed (and -9 would be the test's kill)
        assert await live_group(proxy.process.pid) == []
    finally:
        if proxy.process.returncode is None:
            await proxy.stop(signal.SIGKILL)
    records = [json.loads(line) for line in proxy.stderr.splitlines() if line.startswith(b"{")]
    killed = [r for r in records if r.get("event") == "worker_killed"]
    assert [r["pid"] for r in killed] == [workers[1]]
    assert killed[0]["level"] == "error"
    stopped = {r["pid"] for r in records if r.get("event") == "stopped"}
    assert workers[0] in stopped and workers[1] not in stopped


async def test_workers_of_a_supervisor_killed_with_sigkill_drain_and_exit(
    mock_server: TestServer, redis_url: str
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    proxy = ProxyProcess(
        upstream,
        workers=2,
        redis_url=redis_url,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        log_flush_timeout=LOG_FLUSH_TIMEOUT,
    )
    workers = await started(proxy)
    assert proxy.process is not None
    try:
        os.kill(proxy.process.pid, signal.SIGKILL)  # the supervisor only, not its group
        assert await live_group(proxy.process.pid, settle=EXIT_BOUND) == []
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proxy._drain is not None:
            await proxy._drain
    records = [json.loads(line) for line in proxy.stderr.splitlines() if line.startswith(b"{")]
    gone = {r["pid"] for r in records if r.get("event") == "stopped"}
    assert gone == set(workers)  # each drained (logged `stopped`), none was just killed
