"""The commands as real processes: `serve` over TCP, `demo`, `hash-key`, bad settings."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from proxy.testing.e2e import KEY, REPORT, TOKEN, auth
from proxy.testing.mock import MockState
from proxy.testing.support import free_port, wait_for_port
from proxy.web.auth import hash_key

pytestmark = pytest.mark.slow
README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def proxy_env(**values: str) -> dict[str, str]:
    """The current environment without PROXY_* variables, plus `values`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env["PROXY_SECRETS_DIR"] = "/nonexistent"
    env.update(values)
    return env


async def start(*args: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def stop(process: asyncio.subprocess.Process) -> tuple[bytes, bytes]:
    if process.returncode is None:
        process.send_signal(signal.SIGTERM)
    return await asyncio.wait_for(process.communicate(), 20)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def test_serve_as_a_real_process(
    mock_server: TestServer, mock_state: MockState, http: aiohttp.ClientSession
) -> None:
    port = free_port()
    env = proxy_env(
        PROXY_UPSTREAM_URL=str(mock_server.make_url("")).rstrip("/"),
        PROXY_UPSTREAM_TOKEN=TOKEN,
        PROXY_CLIENTS=f'{{"billing": {{"key_sha256": "{hash_key(KEY)}"}}}}',
        PROXY_LOG_FORMAT="json",
    )
    process = await start(
        "serve", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", env=env
    )
    try:
        await asyncio.to_thread(wait_for_port, port, 20)
        url = f"http://127.0.0.1:{port}{REPORT}?format=json&limit=1"
        async with http.get(url, headers=auth()) as response:
            assert response.status == 200
            assert len((await response.json())["rows"]) == 1
        async with http.get(url, headers=auth()) as response:
            assert response.headers["Cache-Status"].startswith("teamup-proxy; hit")
        async with http.get(url) as response:
            assert response.status == 401
        assert mock_state.calls == 1
    finally:
        _out, err = await stop(process)
    assert process.returncode == 0
    logs = err.decode()
    assert '"event":"ready"' in logs.replace(" ", "")
    assert TOKEN not in logs and KEY not in logs


async def test_demo_prints_a_working_curl_line(http: aiohttp.ClientSession) -> None:
    # Port 0: the demo takes any free port and every line it prints names that port.
    process = await start("demo", "--port", "0", env=proxy_env())
    assert process.stdout is not None
    lines: list[str] = []
    try:
        while not any(line.startswith("Ctrl-C") for line in lines):
            line = await asyncio.wait_for(process.stdout.readline(), 20)
            assert line, "demo exited before printing its curl lines"
            lines.append(line.decode())
        ports = set(re.findall(r"http://127\.0\.0\.1:(\d+)", "".join(lines)))
        assert len(ports) == 1 and ports != {"0"}, ports
        (port,) = ports
        curls = [shlex.split(line.strip()) for line in lines if line.strip().startswith("curl")]
        # The list that pages is answered once the proxy routes lists (issue 19).
        lists = [argv for argv in curls if "/reports/" not in argv[-1]]
        assert [argv[-1] for argv in lists] == [
            f"http://127.0.0.1:{port}/api/v2/events?page_size=2"
        ]
        header = lists[0][lists[0].index("-H") + 1]
        name, _, value = header.partition(": ")
        async with http.get(lists[0][-1], headers={name: value}) as response:
            assert response.status == 200
            page = await response.json()
        assert page["next"].startswith("/api/v2/events?")  # back through the proxy
        async with http.get(f"http://127.0.0.1:{port}{page['next']}", headers={name: value}) as nxt:
            assert nxt.status == 200 and (await nxt.json())["previous"] is not None
        curls = [argv for argv in curls if "/reports/" in argv[-1]]
        bodies = []
        for argv in curls:
            header = argv[argv.index("-H") + 1]
            name, _, value = header.partition(": ")
            async with http.get(argv[-1], headers={name: value}) as response:
                assert response.status == 200
                bodies.append((await response.read(), response.headers["Cache-Status"]))
        assert len(curls) == 5  # three spellings of one credits question, two of a grouped one
        assert "prints keys and six curl lines" in README  # what `make demo` is said to print
        assert bodies[0][0] == bodies[1][0] == bodies[2][0]
        assert "stored" in bodies[0][1] and "hit" in bodies[1][1] and "hit" in bodies[2][1]
        assert bodies[3][0] == bodies[4][0] != bodies[0][0]
        assert "stored" in bodies[3][1] and "hit" in bodies[4][1]
    finally:
        await stop(process)
    assert process.returncode == 0


def test_hash_key_prints_the_digest() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "hash-key", "abc"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert done.stdout.strip() == hash_key("abc")
    piped = subprocess.run(
        [sys.executable, "-m", "proxy", "hash-key", "-"],
        input="abc\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert piped.stdout.strip() == hash_key("abc")


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"PROXY_CLIENTS": "{not json"}, "PROXY_CLIENTS"),
        ({"PROXY_CLIENTS": '{"a": {"key_sha256": "short"}}'}, "PROXY_CLIENTS"),
        (
            {"PROXY_CLIENTS": '{"a": {"key_sha256": "' + "a" * 64 + '", "rate": "9/fortnight"}}'},
            "PROXY_CLIENTS",
        ),
        ({"PROXY_RATE_LIMIT": "lots"}, "PROXY_RATE_LIMIT"),
        ({"PROXY_UPSTREAM_RATE_LIMIT": "0/minute"}, "PROXY_UPSTREAM_RATE_LIMIT"),
        ({"PROXY_UPSTREAM_URL": "ftp://x"}, "PROXY_UPSTREAM_URL"),
        ({"PROXY_UPSTREAM_TOKEN": ""}, "PROXY_UPSTREAM_TOKEN"),
        ({"PROXY_CACHE_TTL": "-1"}, "PROXY_CACHE_TTL"),
    ],
)
def test_bad_settings_stop_with_one_line(env: dict[str, str], named: str) -> None:
    values = {"PROXY_UPSTREAM_TOKEN": TOKEN, **env}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve", "--port", "0", "--workers", "1"],
        env=proxy_env(**values),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert named in lines[0]
    assert "Traceback" not in done.stderr
    assert TOKEN not in done.stderr + done.stdout


def test_missing_token_is_named() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "serve"],
        env=proxy_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert re.search(r"PROXY_UPSTREAM_TOKEN: is required", done.stderr)


@pytest.mark.parametrize(
    ("command", "port"),
    [("demo", "99999"), ("demo", "-1"), ("serve", "65536"), ("serve", "eighty")],
)
def test_a_bad_port_is_one_line_and_exit_2(command: str, port: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", command, "--port", port],
        env=proxy_env(PROXY_UPSTREAM_TOKEN=TOKEN),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stdout == ""  # no banner, no curl line naming a port it will not listen on
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "--port" in lines[0] and repr(port) in lines[0] and "1-65535" in lines[0]


async def test_serve_on_port_0_logs_the_port_it_listens_on(
    mock_server: TestServer, http: aiohttp.ClientSession
) -> None:
    env = proxy_env(
        PROXY_UPSTREAM_URL=str(mock_server.make_url("")).rstrip("/"),
        PROXY_UPSTREAM_TOKEN=TOKEN,
        PROXY_LOG_FORMAT="json",
    )
    argv = ("serve", "--host", "127.0.0.1", "--port", "0")
    process = await start(*argv, "--workers", "1", env=env)
    assert process.stderr is not None
    try:
        while True:
            line = await asyncio.wait_for(process.stderr.readline(), 20)
            assert line, "serve exited before logging where it listens"
            if b'"event":"listening"' in line:
                break
        port = json.loads(line)["port"]
        assert port != 0
        async with http.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
    finally:
        await stop(process)
    assert process.returncode == 0
    # Several workers each bind the port themselves: 0 would give each a different one.
    refused = await start(*argv, "--workers", "2", env=env)
    _out, err = await asyncio.wait_for(refused.communicate(), 20)
    assert refused.returncode == 2
    assert err.decode().strip().splitlines() == [
        "teamup-proxy: port 0 (any free port) needs one worker, not 2: "
        "add --workers 1 (PROXY_WORKERS=1) or name a port"
    ]
