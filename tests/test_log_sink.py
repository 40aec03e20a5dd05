"""Logging never blocks the loop: a stderr pipe nobody reads costs log lines, never answers."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import aiohttp
from aiohttp.test_utils import TestServer

from proxy.logs import JsonFormatter, LineHandler, LineWriter
from proxy.testing.e2e import REPORT, auth
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import wait_for_port
from tests.test_serve import metric_sum

SHUTDOWN_TIMEOUT = 2.0
LOG_FLUSH_TIMEOUT = 1.0
# What `serve` may take after SIGTERM: the drain (no delay, SHUTDOWN_TIMEOUT), the supervisor's
# 2 s grace before it kills a worker, the log flush, and room for a loaded machine.
EXIT_BOUND = SHUTDOWN_TIMEOUT + 2.0 + LOG_FLUSH_TIMEOUT + 5.0
# A header value with a control byte: aiohttp refuses the request and logs an ERROR.
BAD_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: proxy\r\nX-Note: a\x01b\r\n\r\n"


def start_unread(proxy: ProxyProcess) -> subprocess.Popen[bytes]:
    """`proxy`'s command with stderr a pipe nobody reads (until the test does, at the end)."""
    command = [sys.executable, "-m", "proxy", "serve", "--host", "127.0.0.1"]
    command += ["--port", str(proxy.port), "--workers", str(proxy.workers)]
    process = subprocess.Popen(
        command,
        env=proxy.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    wait_for_port(proxy.port, 30)
    return process


def group_members(pgid: int) -> list[int]:
    """Processes of process group `pgid` that are not zombies."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


async def live_group(pgid: int, settle: float = 3.0) -> list[int]:
    """Processes of group `pgid` still there `settle` seconds from now at the latest (a process
    whose parent just exited may take a moment to finish its own exit)."""
    for _ in range(int(settle / 0.05)):
        if not group_members(pgid):
            break
        await asyncio.sleep(0.05)
    return group_members(pgid)


async def bad_request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(BAD_REQUEST)
        await writer.drain()
        return await asyncio.wait_for(reader.read(4096), 5)
    finally:
        writer.close()


async def test_a_full_stderr_pipe_costs_lines_not_answers_and_serve_still_exits(
    mock_server: TestServer, redis_url: str
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    proxy = ProxyProcess(
        upstream,
        workers=2,
        redis_url=redis_url,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        log_flush_timeout=LOG_FLUSH_TIMEOUT,
        log_queue_lines=200,
    )
    process = await asyncio.to_thread(start_unread, proxy)
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        connector = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:

            async def ask(n: int) -> int:
                async with http.get(f"{proxy.url}{REPORT}?limit={n % 20 + 1}", headers=auth()) as r:
                    await r.read()
                    return r.status

            # ~400 bytes of access log each: far more than the pipe (64 KiB) and both queues.
            for start in range(0, 3000, 100):
                statuses = await asyncio.gather(*(ask(n) for n in range(start, start + 100)))
                assert statuses == [200] * 100
            # ERROR lines (aiohttp's own) while the pipe is full: on main each one blocked the
            # event loop on the full pipe.
            for _ in range(6):
                assert (await bad_request(proxy.port)).startswith(b"HTTP/1.0 400")
            fresh = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=fresh, timeout=timeout) as one_off:
                for _ in range(20):  # fresh connections reach both workers
                    async with one_off.get(f"{proxy.url}/healthz") as response:
                        assert response.status == 200
                deadline = time.monotonic() + 5
                dropped = 0.0
                while dropped == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(0.3)
                    async with one_off.get(f"{proxy.url}/metrics") as response:
                        text = await response.text()
                    dropped = metric_sum(text, "teamup_proxy_log_lines_dropped_total")
                assert dropped > 0
        # SIGTERM with the pipe still full: the drain ends, the last lines are given up.
        began = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(process.wait, EXIT_BOUND)
        except subprocess.TimeoutExpired:
            code = None
        print(f"exit {time.monotonic() - began:.2f} s after SIGTERM; {dropped:g} lines dropped")
        assert code == 0, f"serve still running {EXIT_BOUND:g} s after SIGTERM"
        assert await live_group(process.pid) == []  # no worker outlived the supervisor
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        assert process.stderr is not None
        logs = process.stderr.read()
        process.stderr.close()
    # What did reach the pipe is whole lines of JSON.
    lines = logs.splitlines()
    assert lines
    for line in lines[:-1]:
        json.loads(line)


def test_dropped_lines_are_counted_and_reported_once_the_sink_takes_again() -> None:
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        writer = LineWriter(write, interval=0.005, max_lines=50)
        handler = LineHandler(writer)
        handler.setFormatter(JsonFormatter())
        writer.report = lambda n: f'{{"dropped":{n}}}\n'.encode()
        line = b"x" * 4000 + b"\n"
        for _ in range(1000):  # 4 MB into a 64 KiB pipe nobody reads: never waits
            writer.write(line)
        handler.handle(logging.makeLogRecord({"msg": "boom", "levelno": logging.ERROR}))
        assert writer.flush(timeout=0.2) is False  # the sink takes nothing: we give up
        assert writer.dropped > 800
        data = b""
        deadline = time.monotonic() + 5
        while b'"dropped"' not in data and time.monotonic() < deadline:
            try:
                data += os.read(read, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
        reports = [json.loads(x) for x in data.splitlines() if x.startswith(b'{"dropped"')]
        assert reports and reports[0]["dropped"] > 800
        assert sum(r["dropped"] for r in reports) <= writer.dropped
        writer.close(1.0)
    finally:
        os.close(read)
        os.close(write)


async def test_once_stderr_takes_lines_again_serve_says_how_many_it_dropped(
    mock_server: TestServer,
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    proxy = ProxyProcess(upstream, workers=1, log_queue_lines=50, log_flush_timeout=1)
    process = await asyncio.to_thread(start_unread, proxy)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for start in range(0, 600, 50):  # ~240 KB of access log into a 64 KiB pipe
                replies = [
                    http.get(f"{proxy.url}{REPORT}?limit={n % 9 + 1}", headers=auth())
                    for n in range(start, start + 50)
                ]
                for reply in await asyncio.gather(*replies):
                    assert reply.status == 200
                    reply.release()
            await asyncio.sleep(1.1)  # the counter is published every second
            async with http.get(f"{proxy.url}/metrics") as response:
                text = await response.text()
            dropped = metric_sum(text, "teamup_proxy_log_lines_dropped_total")
            assert dropped > 0
            assert process.stderr is not None
            read = await asyncio.to_thread(read_until, process.stderr, b"log_lines_dropped")
        reports = [
            json.loads(line)
            for line in read.splitlines()
            if line.startswith(b"{") and b'"log_lines_dropped"' in line
        ]
        assert reports and reports[0]["level"] == "warning"
        assert 0 < reports[0]["dropped"] <= dropped
        assert f"{reports[0]['dropped']} log lines dropped" in reports[0]["message"]
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, EXIT_BOUND) == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        if process.stderr is not None:
            process.stderr.close()


def read_until(stream: IO[bytes], marker: bytes, within: float = 10.0) -> bytes:
    """Read `stream` (a pipe) until `marker` has come by and its line is whole."""
    fd = stream.fileno()
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            chunk = b""
        data += chunk
        at = data.find(marker)
        if at >= 0 and b"\n" in data[at:]:
            return data
        if not chunk:
            time.sleep(0.02)
    return data
