"""Redis topologies under failure, with real processes and a bounded load.

Sentinel: a master, one replica and three sentinels; the master is SIGKILLed mid-load and the
sentinels promote the replica. Cluster: three masters with a replica each; one master is
SIGKILLed mid-load and its replica takes over its slots. In both, `serve --workers 2` must
follow the new topology by itself, every 200 must be the mock's answer for its canonical
query, and once every worker is back on Redis a new question fetched once is a hit on both
workers. The numbers go to `bench/out/failover.json` (README's reliability table).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from proxy.testing.e2e import REPORT, auth
from proxy.testing.faults import MockProcess, Outcome, Truth, run_load
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import RedisServer, free_port, wait_for_port
from tests.test_cluster import cluster_ports, create_cluster

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

OUT = Path(__file__).resolve().parent.parent / "bench" / "out"
PROXY_SETTINGS: dict[str, Any] = {"redis_retry_interval": 0.2, "upstream_timeout": 2}
LOAD_SECONDS = 8.0
KILL_AT = 1.5
HOT = [f"format=json&limit={n}" for n in range(1, 9)]


def pick(rng: random.Random) -> str:
    """Mostly hot questions (hits), some never asked before (misses), in two spellings."""
    if rng.random() < 0.2:
        return f"format=json&limit={rng.randint(1, 9)}&offset={rng.randrange(5000)}"
    query = rng.choice(HOT)
    return query if rng.random() < 0.5 else query.replace("format=json", "format=JSON")


# --- Sentinel -----------------------------------------------------------------------------------


class SentinelSet:
    """A master, one replica and three sentinels (quorum 2), all on loopback."""

    def __init__(self) -> None:
        self.master = RedisServer()
        self.replica = RedisServer("--replicaof", "127.0.0.1", str(self.master.port))
        self.ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self) -> SentinelSet:
        self.master.start()
        self.replica.start()
        for port in self.ports:
            config = self.master.dir / f"sentinel-{port}.conf"
            config.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.master.dir}\n"
                f"sentinel monitor mymaster 127.0.0.1 {self.master.port} 2\n"
                "sentinel down-after-milliseconds mymaster 500\n"
                "sentinel failover-timeout mymaster 3000\n"
                "sentinel parallel-syncs mymaster 1\n"
            )
            self.processes.append(
                subprocess.Popen(
                    ["redis-server", str(config), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in self.ports:
            wait_for_port(port)
        # Every sentinel must know the replica and the two other sentinels before a failover.
        deadline = time.monotonic() + 30
        for port in self.ports:
            with redis.Redis(port=port) as probe:
                while True:
                    replicas = probe.sentinel_slaves("mymaster")
                    others = probe.sentinel_sentinels("mymaster")
                    if replicas and len(others) == 2:
                        break
                    assert time.monotonic() < deadline, "sentinels did not find each other"
                    time.sleep(0.1)
        return self

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.ports)
        return f"redis+sentinel://{hosts}/mymaster/0"

    def master_port(self) -> int:
        with redis.Redis(port=self.ports[0]) as probe:
            address = probe.sentinel_get_master_addr_by_name("mymaster")
        assert address is not None
        return int(address[1])

    def close(self) -> None:
        for process in self.processes:
            process.kill()
            process.wait()
        self.master.close()
        self.replica.close()


# --- Cluster ------------------------------------------------------------------------------------


class ReplicatedCluster:
    """Three masters with a replica each (six nodes), a short cluster-node-timeout."""

    def __init__(self) -> None:
        self.nodes = [
            # Validity factor 0: a replica always stands for election, however long ago it
            # last heard from its master (on a loaded machine that may be "too long").
            RedisServer(
                "--cluster-enabled",
                "yes",
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
            )
            for _ in range(6)
        ]
        for node, port in zip(self.nodes, cluster_ports(6), strict=True):
            node.port = port
            node.extra = (*node.extra, "--cluster-config-file", f"{node.dir}/nodes.conf")

    def start(self) -> ReplicatedCluster:
        create_cluster(self.nodes, replicas=1)
        deadline = time.monotonic() + 30
        while not self.healthy():
            assert time.monotonic() < deadline, "cluster did not reach state ok with 3 replicas"
            time.sleep(0.1)
        return self

    def nodes_info(self) -> dict[str, dict[str, Any]]:
        """`CLUSTER NODES` as a live node sees it: address -> flags, connected, ..."""
        live = next(n for n in self.nodes if n.process is not None)
        with redis.Redis(port=live.port, socket_timeout=0.5) as client:
            info: dict[str, dict[str, Any]] = client.execute_command("CLUSTER NODES")
        return info

    def healthy(self) -> bool:
        """Every node says ok, and three connected replicas serve three masters."""
        if not self.state_ok():
            return False
        rows = self.nodes_info().values()
        if len([r for r in rows if "slave" in r["flags"] and r["connected"]]) != 3:
            return False
        for node in self.nodes:  # every replica done with its first sync
            with redis.Redis(port=node.port, socket_timeout=0.5) as client:
                info = client.info("replication")
            if info["role"] == "slave" and info.get("master_link_status") != "up":
                return False
        return True

    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now (not failed)."""
        ports = {
            int(address.rsplit(":", 1)[1].split("@")[0])
            for address, row in self.nodes_info().items()
            if "master" in row["flags"] and "fail" not in row["flags"]
        }
        return [n for n in self.nodes if n.port in ports]

    def state_ok(self) -> bool:
        """Every live node says `cluster_state:ok`."""
        for node in self.nodes:
            if node.process is None:
                continue
            try:
                with redis.Redis(port=node.port, socket_timeout=0.5) as client:
                    if client.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                        return False
            except redis.RedisError:
                return False
        return True

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    def close(self) -> None:
        for node in self.nodes:
            node.close()


# --- the run ------------------------------------------------------------------------------------


async def readiness(proxy: ProxyProcess, polls: int = 12) -> Counter[str]:
    """`checks.redis` of `polls` answers on fresh connections (so both workers answer)."""
    seen: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        for _ in range(polls):
            async with http.get(f"{proxy.url}/readyz") as response:
                seen[(await response.json())["checks"]["redis"]] += 1
    return seen


async def hit_on_both_workers(proxy: ProxyProcess, query: str) -> None:
    """Fetched once, then a hit on every later fresh connection (whichever worker answers)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as http:
        async with http.get(f"{proxy.url}{REPORT}?{query}", headers=auth()) as first:
            assert first.status == 200
            assert "fwd=uri-miss" in first.headers["Cache-Status"]
        for _ in range(12):
            async with http.get(f"{proxy.url}{REPORT}?{query}", headers=auth()) as again:
                assert again.status == 200
                assert again.headers["Cache-Status"].startswith("teamup-proxy; hit"), again.headers[
                    "Cache-Status"
                ]


async def failover_run(
    name: str,
    url: str,
    kill: Callable[[], str],
    recovered: Callable[[], bool],
) -> dict[str, Any]:
    """Load on `serve --workers 2` over `url`; `kill()` at KILL_AT; check and measure."""
    mock = await MockProcess(latency=0.02).start()
    proxy = ProxyProcess(mock.url, workers=2, redis_url=url, **PROXY_SETTINGS)
    try:
        await proxy.start()
        truth = Truth(mock)
        assert (await readiness(proxy))["ok"] == 12
        load = asyncio.ensure_future(
            run_load(proxy.url, pick, headers=auth(), seconds=LOAD_SECONDS, rate=100, tasks=8)
        )
        await asyncio.sleep(KILL_AT)
        killed_at = time.monotonic()
        victim = await asyncio.to_thread(kill)
        # Downtime: until the topology has healed (promotion done), and until every worker of
        # the proxy is back on Redis (12 fresh-connection polls in a row say ok).
        healed_after: float | None = None
        back_after: float | None = None
        while time.monotonic() - killed_at < 30 and back_after is None:
            if healed_after is None and await asyncio.to_thread(recovered):
                healed_after = time.monotonic() - killed_at
            if healed_after is not None and (await readiness(proxy))["ok"] == 12:
                back_after = time.monotonic() - killed_at
            await asyncio.sleep(0.1)
        outcomes: list[Outcome] = await load
        wrong = []
        for outcome in outcomes:
            if outcome.status == 200:
                try:
                    await truth.check(outcome)
                except AssertionError as exc:
                    wrong.append(f"{outcome.query}: {exc}")
        by_status = Counter(str(o.status or o.error) for o in outcomes)
        during = [o for o in outcomes if o.started >= killed_at]
        record = {
            "what": name,
            "victim": victim,
            "requests": len(outcomes),
            "after_kill": len(during),
            "by_status": dict(by_status),
            "wrong_bodies": len(wrong),
            "max_latency_s": round(max(o.elapsed for o in outcomes), 3),
            "topology_healed_s": None if healed_after is None else round(healed_after, 2),
            "proxy_back_on_redis_s": None if back_after is None else round(back_after, 2),
        }
        save(record)
        assert wrong == []
        assert healed_after is not None, "the topology never healed"
        assert back_after is not None, "the proxy never went back to Redis on every worker"
        assert by_status == Counter({"200": len(outcomes)}), by_status
        assert len(during) > 100
        await hit_on_both_workers(proxy, f"format=json&limit=2&offset={random.randrange(9999)}")
        return record
    finally:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop()
        await mock.stop()


def save(record: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / "failover.json"
    document: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    document.setdefault("runs", {})[record["what"]] = {
        **record,
        "at": dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


@pytest.fixture(scope="module")
def sentinels() -> Iterator[SentinelSet]:
    running = SentinelSet()
    try:
        yield running.start()
    finally:
        running.close()


@pytest.fixture(scope="module")
def replicated_cluster() -> Iterator[ReplicatedCluster]:
    running = ReplicatedCluster()
    try:
        yield running.start()
    finally:
        running.close()


async def test_sentinel_master_killed_mid_load(sentinels: SentinelSet) -> None:
    old = sentinels.master_port()
    assert old == sentinels.master.port

    def kill() -> str:
        sentinels.master.stop()
        return f"master :{old}"

    def promoted() -> bool:
        return sentinels.master_port() == sentinels.replica.port

    record = await failover_run("sentinel: master SIGKILLed", sentinels.url, kill, promoted)
    with sentinels.replica.client() as new_master:
        assert any(k.startswith(b"teamup-proxy:c:") for k in new_master.scan_iter())
    assert record["proxy_back_on_redis_s"] is not None


async def test_cluster_master_killed_mid_load(replicated_cluster: ReplicatedCluster) -> None:
    masters = replicated_cluster.masters()
    assert len(masters) == 3
    # Not the node the URL names: the proxy must find the rest of the cluster from it.
    victim = next(n for n in masters if n is not replicated_cluster.nodes[0])

    def kill() -> str:
        port = victim.port
        victim.stop()
        return f"master :{port}"

    def healed() -> bool:  # its replica took over: three masters again, the victim not one
        masters = replicated_cluster.masters()
        return replicated_cluster.state_ok() and len(masters) == 3 and victim not in masters

    await failover_run("cluster: 1 of 3 masters SIGKILLed", replicated_cluster.url, kill, healed)
