"""A port in use is one clear line naming it and the flag, exit 2, before any banner."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROXY_")}
    env.update(PROXY_SECRETS_DIR="/nonexistent", PROXY_UPSTREAM_TOKEN="x")
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, env=env, timeout=30
    )


def test_demo_on_a_taken_port(taken_port: int) -> None:
    done = run("demo", "--port", str(taken_port))
    assert done.returncode == 2
    assert done.stdout == ""  # no banner, no keys, no curl lines
    assert done.stderr.splitlines() == [
        f"teamup-proxy: port {taken_port} on 127.0.0.1 is not available (Address already in use);"
        " choose another with --port N (make demo PORT=N)"
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_on_a_taken_port(taken_port: int, workers: str) -> None:
    done = run("serve", "--host", "127.0.0.1", "--port", str(taken_port), "--workers", workers)
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert f"port {taken_port} on 127.0.0.1 is not available" in line
    assert "--port or PROXY_PORT" in line


def test_make_demo_takes_a_port() -> None:
    make = subprocess.run(
        ["make", "-n", "demo", "PORT=18181"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "teamup-proxy demo --port 18181" in make.stdout
