"""A Redis that answers but refuses writes (maxmemory under `noeviction`, a read-only replica):
a visible degraded state, entries and limits in process memory meanwhile, then recovery."""

from __future__ import annotations

import re

import pytest
import redis.exceptions
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.backends import keys
from proxy.testing.e2e import FAST_LIMITS, KEY, OTHER_KEY, auth
from proxy.testing.mock import MockState
from proxy.testing.support import RedisServer, free_port
from proxy.web.auth import hash_key
from tests.conftest import LogLines, MakeProxy
from tests.test_caching import entry_key, eventually, get, is_stored_miss, status_params

Proxy = TestClient[web.Request, web.Application]
REASONS = {"oom": "out of memory (noeviction)", "replica": "read-only replica"}


def refuse_writes(server: RedisServer, how: str) -> None:
    """Make a real redis-server refuse writes the way production ones do."""
    with server.client() as sync:
        if how == "oom":
            pipe = sync.pipeline(transaction=False)
            for i in range(2000):
                pipe.set(f"filler:{i}", b"x" * 1000)
            pipe.execute()
            sync.config_set("maxmemory-policy", "noeviction")
            sync.config_set("maxmemory", "1mb")
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                sync.set("probe-by-the-test", 1)
        else:  # a replica of a master that is not there: keeps its data, serves reads
            sync.replicaof("127.0.0.1", free_port())


def allow_writes(server: RedisServer, how: str) -> None:
    with server.client() as sync:
        if how == "oom":
            sync.config_set("maxmemory", "0")
        else:
            sync.replicaof("NO", "ONE")


async def ready(proxy: Proxy) -> dict[str, object]:
    response = await proxy.get("/readyz")
    assert response.status == 200
    body: dict[str, object] = await response.json()
    return body


async def redis_errors(proxy: Proxy) -> dict[str, float]:
    text = await (await proxy.get("/metrics")).text()
    found = re.findall(r'^teamup_proxy_redis_errors_total\{op="(\w+)"\} (\S+)$', text, re.M)
    return {op: float(value) for op, value in found}


async def gauge(proxy: Proxy) -> str:
    text = await (await proxy.get("/metrics")).text()
    lines = [line for line in text.splitlines() if line.startswith("teamup_proxy_redis_writes_")]
    assert len(lines) == 1, lines
    return lines[0].split()[-1]


@pytest.mark.parametrize("how", ["oom", "replica"])
async def test_refused_writes_are_visible_served_from_memory_and_recover(
    make_proxy: MakeProxy,
    mock_state: MockState,
    own_redis: RedisServer,
    json_logs: LogLines,
    how: str,
) -> None:
    # A rate whose share, from a full bucket, still admits a request every few microseconds:
    # this test is about the cache while writes are refused, not about limits.
    proxy = await make_proxy(redis_url=own_redis.url, redis_retry_interval=0.1, **FAST_LIMITS)
    assert is_stored_miss(await get(proxy, "?format=json&limit=1"))
    assert await gauge(proxy) == "0.0"

    refuse_writes(own_redis, how)
    # The first write that Redis refuses flips the state; the answer is still a good miss.
    assert is_stored_miss(await get(proxy, "?format=json&limit=2"))
    assert await ready(proxy) == {
        "status": "degraded",
        "checks": {"redis": "refusing-writes", "upstream": "ok"},
        "reasons": {"redis": REASONS[how]},
    }
    assert await gauge(proxy) == "1.0"
    with own_redis.client() as sync:
        assert sync.exists(entry_key("?format=json&limit=2")) == 0

    errors = await redis_errors(proxy)
    # Entries live in this process meanwhile; what Redis already had is still read from it.
    for query in ("?format=json&limit=2", "?format=json&limit=1"):
        assert status_params(await get(proxy, query))[0] == "hit"
    assert is_stored_miss(await get(proxy, "?format=json&limit=3"))
    assert status_params(await get(proxy, "?format=json&limit=3"))[0] == "hit"
    assert mock_state.calls == 3
    # Writes no longer go to Redis at all: no refused write piles up in the error counter.
    assert await redis_errors(proxy) == errors
    refused = [r for r in json_logs.records() if r.get("event") == "redis_writes_refused"]
    assert len(refused) == 1  # once per transition, not once per refused write
    assert refused[0]["reason"] == REASONS[how] and refused[0]["level"] == "warning"

    allow_writes(own_redis, how)

    async def recovered() -> bool:
        return (await ready(proxy))["status"] == "ok"

    await eventually(recovered)
    assert await ready(proxy) == {"status": "ok", "checks": {"redis": "ok", "upstream": "ok"}}
    assert await gauge(proxy) == "0.0"
    assert [r["event"] for r in json_logs.records() if r.get("event", "").startswith("redis_")] == [
        "redis_writes_refused",
        "redis_writes_ok",
    ]
    # Redis is the truth again: a new miss is stored there, and what lived only in process
    # memory (it may have missed a purge) is fetched again and stored in Redis.
    assert is_stored_miss(await get(proxy, "?format=json&limit=4"))
    assert is_stored_miss(await get(proxy, "?format=json&limit=3"))
    with own_redis.client() as sync:
        assert sync.exists(entry_key("?format=json&limit=4")) == 1
        assert sync.exists(entry_key("?format=json&limit=3")) == 1
        assert sync.pttl(keys.probe(keys.PREFIX)) <= 1000  # the probe leaves nothing lasting
    assert mock_state.calls == 5


async def test_refused_writes_never_lift_the_budget_or_the_caller_limit(
    make_proxy: MakeProxy, mock_state: MockState, own_redis: RedisServer
) -> None:
    """The GCRA script's OOM error is not an allowed hit: each process counts on its own share
    (rate and burst split by PROXY_REPLICAS_HINT times workers), from a bucket that starts full
    (what Redis admitted just before is unknown), never from a fresh burst."""
    proxy = await make_proxy(
        redis_url=own_redis.url,
        redis_retry_interval=0.1,
        upstream_rate_limit="4/minute",
        upstream_burst=4,
        replicas_hint=2,
        workers=1,
        clients={
            "billing": {"key_sha256": hash_key(KEY), "rate": "10/minute"},
            "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "100000/second"},
        },
    )
    assert is_stored_miss(await get(proxy, "?format=json&limit=1"))
    refuse_writes(own_redis, "oom")
    # The caller's share is 10 // 2 = 5 per minute, one every 12 s, from a full bucket.
    answers = [await get(proxy, f"?format=json&limit={n}") for n in (2, 3)]
    assert [a.status for a in answers] == [429, 429]
    assert (await answers[-1].json())["code"] == "rate_limited"
    # The budget's share is 4 // 2 = 2 per minute, one every 30 s, from a full bucket too.
    refused = await get(proxy, "?format=json&limit=5", **auth(OTHER_KEY))
    assert refused.status == 503
    assert (await refused.json())["code"] == "upstream_budget_exhausted"
    assert int(refused.headers["Retry-After"]) >= 1
    assert mock_state.calls == 1
