"""A real three-master Redis Cluster: cache, single-flight lease and limits work across slots."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from proxy.backends.flight import RedisLease
from proxy.backends.limiters import RedisLimiter
from proxy.backends.link import RedisLink, connect_redis
from proxy.backends.stores import RedisCacheStore
from proxy.core.entry import CachedResponse
from proxy.core.gcra import parse_rate
from proxy.testing.e2e import ADMIN_KEY, REPORT, auth
from proxy.testing.mock import MockState
from proxy.testing.support import RedisServer
from tests.conftest import MakeProxy

pytestmark = pytest.mark.slow


def _port_pair_free(port: int) -> bool:
    for candidate in (port, port + 10000):  # the cluster bus listens on port + 10000
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", candidate))
            except OSError:
                return False
    return True


def cluster_ports(count: int) -> list[int]:
    """Ports whose cluster-bus twins are free too."""
    ports: list[int] = []
    candidate = 21000 + (time.monotonic_ns() // 1000) % 20000
    while len(ports) < count:
        candidate += 1
        if candidate > 54000:
            candidate = 21000
        if _port_pair_free(candidate):
            ports.append(candidate)
    return ports


def create_cluster(nodes: list[RedisServer], *, replicas: int) -> None:
    """Start `nodes` and join them with `redis-cli --cluster create` (`replicas` per master)."""
    for node in nodes:
        node.start()
    cli = shutil.which("redis-cli")
    assert cli is not None
    subprocess.run(
        [
            cli,
            "--cluster",
            "create",
            *(f"127.0.0.1:{n.port}" for n in nodes),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )


class Cluster:
    """Three masters on loopback, slots assigned by `redis-cli --cluster create`."""

    def __init__(self) -> None:
        self.nodes = [
            RedisServer("--cluster-enabled", "yes", "--cluster-node-timeout", "2000")
            for _ in range(3)
        ]
        for node, port in zip(self.nodes, cluster_ports(3), strict=True):
            node.port = port
            node.extra = (*node.extra, "--cluster-config-file", f"{node.dir}/nodes.conf")

    def start(self) -> Cluster:
        create_cluster(self.nodes, replicas=0)
        cli = shutil.which("redis-cli")
        assert cli is not None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            # Every node must agree, not only the first one asked.
            infos = [
                subprocess.run(
                    [cli, "-p", str(node.port), "cluster", "info"],
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                for node in self.nodes
            ]
            if all("cluster_state:ok" in info for info in infos):
                return self
            time.sleep(0.1)
        raise TimeoutError("cluster did not reach state ok")

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def close(self) -> None:
        for node in self.nodes:
            node.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    running = Cluster().start()
    yield running
    running.close()


@pytest.fixture
async def client(cluster: Cluster) -> AsyncIterator[RedisCluster]:
    redis = connect_redis(cluster.url, timeout=1.0, max_connections=64)
    assert isinstance(redis, RedisCluster)
    await redis.initialize()
    await redis.flushall()
    yield redis
    await redis.aclose()


def entry(body: bytes, now: float = 1000.0) -> CachedResponse:
    return CachedResponse(200, (("Content-Type", "application/json"),), body, now, now + 60)


async def test_cache_store_and_purge_across_slots(client: RedisCluster) -> None:
    store = RedisCacheStore(client, "teamup-proxy:")
    keys = [f"v1:{i:064x}" for i in range(300)]
    for key in keys:
        await store.set(key, entry(key.encode()), 60)
    nodes = [client.get_node_from_key(store.entry_key(k)) for k in keys]
    nodes_used = {node.name for node in nodes if node is not None}
    assert len(nodes_used) == 3
    got = await store.get(keys[7])
    assert got is not None and got.body == keys[7].encode()
    await client.set("someone-else:key", "kept")
    assert await store.clear() == 300
    assert await store.get(keys[7]) is None
    assert await client.get("someone-else:key") == b"kept"


async def test_lease_lives_in_the_entry_slot(client: RedisCluster) -> None:
    link = RedisLink(client)
    store = RedisCacheStore(client, "teamup-proxy:")
    lease = RedisLease(link, "teamup-proxy:", lease_ms=5000, wait_timeout=2)
    key = "v1:" + "ab" * 32
    assert client.keyslot(lease.lease_key(key)) == client.keyslot(store.entry_key(key))
    token = await lease.acquire(key)
    assert token is not None
    assert await lease.acquire(key) is None
    waiter = asyncio.ensure_future(lease.wait_for_entry(key, store, None))
    await asyncio.sleep(0.05)
    await store.set(key, entry(b"fresh"), 60)
    found = await waiter
    assert isinstance(found, CachedResponse) and found.body == b"fresh"
    await lease.release(key, token)
    assert await lease.acquire(key) is not None


async def test_limiter_is_exact_on_a_cluster(client: RedisCluster) -> None:
    limiter = RedisLimiter(client, "teamup-proxy:rl:")
    rate = parse_rate("10/minute")
    decisions = await asyncio.gather(*(limiter.hit("client:billing", rate) for _ in range(50)))
    assert sum(d.allowed for d in decisions) == 10
    other = await asyncio.gather(*(limiter.hit("client:crm", rate) for _ in range(12)))
    assert sum(d.allowed for d in other) == 10


async def test_proxy_end_to_end_on_a_cluster(
    make_proxy: MakeProxy, mock_state: MockState, client: RedisCluster
) -> None:
    mock_state.faults.latency = 0.2
    proxy = await make_proxy(redis_client=client, upstream_rate_limit="5/minute")
    responses = await asyncio.gather(
        *(proxy.get(REPORT + "?format=json&limit=5", headers=auth()) for _ in range(30))
    )
    assert {r.status for r in responses} == {200}
    assert mock_state.calls == 1
    hit = await proxy.get(REPORT + "?limit=5&format=json", headers=auth())
    assert hit.headers["Cache-Status"].startswith("teamup-proxy; hit")
    purge = await proxy.delete("/admin/cache", headers=auth(ADMIN_KEY))
    assert (await purge.json())["purged"] == 1
    again = await proxy.get(REPORT + "?limit=5&format=json", headers=auth())
    assert "fwd=uri-miss" in again.headers["Cache-Status"]
    assert mock_state.calls == 2
    ready = await (await proxy.get("/readyz")).json()
    assert ready["checks"]["redis"] == "ok"
