"""Redis by URL: TLS (`rediss://`) and Sentinel (`redis+sentinel://`), with real servers."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from proxy.testing.e2e import REPORT, auth
from proxy.testing.mock import MockState
from proxy.testing.support import RedisServer, free_port, wait_for_port
from tests.conftest import MakeProxy

pytestmark = pytest.mark.slow


def make_certificates(directory: Path) -> None:
    """A throw-away CA and a server certificate for 127.0.0.1."""

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    )
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    )


@pytest.fixture
def tls_redis() -> Iterator[tuple[RedisServer, int]]:
    server = RedisServer()
    make_certificates(server.dir)
    tls_port = free_port()
    server.extra = (
        "--tls-port",
        str(tls_port),
        "--tls-cert-file",
        str(server.dir / "server.crt"),
        "--tls-key-file",
        str(server.dir / "server.key"),
        "--tls-ca-cert-file",
        str(server.dir / "ca.crt"),
        "--tls-auth-clients",
        "no",
    )
    server.start()
    wait_for_port(tls_port)
    yield server, tls_port
    server.close()


async def test_rediss_url(
    make_proxy: MakeProxy, mock_state: MockState, tls_redis: tuple[RedisServer, int]
) -> None:
    server, tls_port = tls_redis
    url = f"rediss://127.0.0.1:{tls_port}/0?ssl_ca_certs={server.dir / 'ca.crt'}"
    proxy = await make_proxy(redis_url=url, redis_timeout=1.0)
    assert (await proxy.get(REPORT + "?limit=3", headers=auth())).status == 200
    hit = await proxy.get(REPORT + "?limit=3", headers=auth())
    assert hit.headers["Cache-Status"].startswith("teamup-proxy; hit")
    assert (await (await proxy.get("/readyz")).json())["checks"]["redis"] == "ok"
    assert mock_state.calls == 1
    with server.client() as plain:  # the same server, seen without TLS
        assert any(k.startswith(b"teamup-proxy:c:") for k in plain.scan_iter())


@pytest.fixture
def sentinel(redis_server: RedisServer) -> Iterator[int]:
    port = free_port()
    directory = Path(redis_server.dir)
    config = directory / f"sentinel-{port}.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\n"
        f"sentinel monitor mymaster 127.0.0.1 {redis_server.port} 1\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
    )
    process = subprocess.Popen(
        ["redis-server", str(config), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        probe = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while probe.sentinel_get_master_addr_by_name("mymaster") is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        probe.close()
        yield port
    finally:
        process.kill()
        process.wait()


async def test_sentinel_url(
    make_proxy: MakeProxy, mock_state: MockState, sentinel: int, redis_server: RedisServer
) -> None:
    with redis_server.client() as plain:
        plain.flushall()
    proxy = await make_proxy(redis_url=f"redis+sentinel://127.0.0.1:{sentinel}/mymaster/0")
    assert (await proxy.get(REPORT + "?limit=4", headers=auth())).status == 200
    hit = await proxy.get(REPORT + "?limit=4", headers=auth())
    assert hit.headers["Cache-Status"].startswith("teamup-proxy; hit")
    assert mock_state.calls == 1
    with redis_server.client() as plain:
        assert any(k.startswith(b"teamup-proxy:c:") for k in plain.scan_iter())
