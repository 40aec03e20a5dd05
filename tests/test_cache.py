"""Cached entries: the one-value encoding, what may be stored, and both stores."""

from __future__ import annotations

import os
import zlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from proxy.backends.link import RedisLink
from proxy.backends.stores import (
    CacheStore,
    FallbackCacheStore,
    MemoryCacheStore,
    RedisCacheStore,
)
from proxy.core.entry import CachedResponse, is_cacheable
from proxy.testing.e2e import FakeClock

JSON_HEADERS = (("Content-Type", "application/json"),)
CSV_HEADERS = (
    ("Content-Type", "text/csv; charset=utf-8"),
    ("Content-Disposition", 'attachment; filename="customer_credits.csv"'),
)
T0 = 1_700_000_000.0


def entry(
    body: bytes = b'{"rows": []}', *, stored_at: float = T0, ttl: float = 300
) -> CachedResponse:
    """A 200 JSON entry stored at `stored_at`, fresh for `ttl` seconds."""
    return CachedResponse(200, JSON_HEADERS, body, stored_at, stored_at + ttl)


def packed(flag: bytes, meta: bytes, payload: bytes) -> bytes:
    """A value in the entry layout, with hand-made (possibly broken) metadata."""
    return b"TP1" + flag + len(meta).to_bytes(4, "big") + meta + payload


# --- CachedResponse ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b"", b"{}", b"x" * 1023, b"customer.id,amount\n" * 5000, os.urandom(50_000)],
    ids=["empty", "tiny", "just-under-threshold", "large-csv", "large-random"],
)
def test_encode_decode_round_trip(body: bytes) -> None:
    original = CachedResponse(200, CSV_HEADERS, body, T0 + 0.25, T0 + 300.25)
    decoded = CachedResponse.decode(original.encode())
    assert decoded == original
    assert decoded is not None
    assert decoded.headers == CSV_HEADERS
    assert decoded.content_type == "text/csv; charset=utf-8"
    assert decoded.stored_at == T0 + 0.25
    assert decoded.fresh_until == T0 + 300.25


def test_small_bodies_are_stored_raw_even_when_compressible() -> None:
    body = b"a" * 1000
    encoded = entry(body).encode()
    assert encoded.endswith(body)
    assert encoded[3:4] == b"r"


def test_large_compressible_bodies_are_compressed() -> None:
    body = b'{"customer": {"id": 1234, "name": "Amelia Smith"}, "amount": 500}\n' * 2000
    encoded = entry(body).encode()
    assert encoded[3:4] == b"z"
    assert len(encoded) < len(body) // 5
    assert zlib.decompress(encoded[8 + int.from_bytes(encoded[4:8], "big") :]) == body
    decoded = CachedResponse.decode(encoded)
    assert decoded is not None and decoded.body == body


def test_large_incompressible_bodies_stay_raw() -> None:
    body = os.urandom(20_000)
    encoded = entry(body).encode()
    assert encoded[3:4] == b"r"
    assert encoded.endswith(body)
    assert len(encoded) < len(body) + 200


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"TP1",
        b"TP1r",
        b"XX1r\x00\x00\x00\x02{}",
        b"TP1r\x00\x00\x00\x02[]body",
        b"TP1r\x00\x00\x00\x05{}",
        packed(b"z", b'{"s":200,"h":[],"t":1,"f":2}', b"not zlib"),
        packed(b"r", b'{"s":200,"h":[],"t":1,"x":2}', b"body"),
        packed(b"r", b'{"s":200,"h":[["a"]],"t":1,"f":2}', b"body"),
        packed(b"r", b'{"s":"x","h":[],"t":1,"f":2}', b"body"),
        packed(b"r", b'{"s":200,"h":[],"t":1,"f":2', b"body"),
        b"\x80\x04\x95 a pickle, say",
        b"TP2" + entry().encode()[3:],  # a well-formed value of another format version
    ],
)
def test_decode_rejects_anything_else(data: bytes) -> None:
    assert CachedResponse.decode(data) is None


def test_decode_rejects_a_truncated_compressed_entry() -> None:
    encoded = entry(b"abc" * 5000).encode()
    assert encoded[3:4] == b"z"
    assert CachedResponse.decode(encoded[:-10]) is None


def test_freshness_ttl_and_age() -> None:
    cached = entry(stored_at=T0, ttl=300)
    assert cached.is_fresh(T0)
    assert cached.is_fresh(T0 + 299.9)
    assert not cached.is_fresh(T0 + 300)
    assert cached.ttl(T0) == 300
    assert cached.ttl(T0 + 10) == 290
    assert cached.ttl(T0 + 10.5) == 289
    assert cached.ttl(T0 + 300) == 0
    assert cached.ttl(T0 + 300.5) == -1
    assert cached.ttl(T0 + 310) == -10
    assert cached.age(T0) == 0
    assert cached.age(T0 + 42.9) == 42
    assert cached.age(T0 - 5) == 0  # another replica's clock a little ahead: never negative


def test_content_type_default() -> None:
    assert CachedResponse(200, (), b"", T0, T0).content_type == "application/octet-stream"


# --- is_cacheable --------------------------------------------------------------------------

MAX = 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("status", "headers", "size", "expected"),
    [
        (200, {"Content-Type": "application/json"}, 100, True),
        (200, {"Content-Type": "text/csv; charset=utf-8"}, 100, True),
        (200, {"Content-Type": "Application/JSON; charset=utf-8"}, 100, True),
        (200, {"Content-Type": "application/json"}, MAX, True),
        (200, {"Content-Type": "application/json"}, MAX + 1, False),
        (200, {"Content-Type": "application/json", "Cache-Control": "public, max-age=60"}, 1, True),
        (200, {"Content-Type": "application/json", "Cache-Control": "no-cache"}, 1, True),
        (200, {"Content-Type": "text/html"}, 100, False),
        (200, {"Content-Type": "application/octet-stream"}, 100, False),
        (200, {}, 100, False),
        (200, {"Content-Type": "application/json", "Set-Cookie": "sessionid=abc"}, 100, False),
        (200, {"Content-Type": "application/json", "Cache-Control": "no-store"}, 100, False),
        (200, {"Content-Type": "application/json", "Cache-Control": "NO-STORE"}, 100, False),
        (200, {"Content-Type": "application/json", "Cache-Control": "private"}, 100, False),
        (
            200,
            {"Content-Type": "application/json", "Cache-Control": 'max-age=60, private="x"'},
            100,
            False,
        ),
        (201, {"Content-Type": "application/json"}, 100, False),
        (204, {"Content-Type": "application/json"}, 0, False),
        (304, {"Content-Type": "application/json"}, 0, False),
        (400, {"Content-Type": "application/json"}, 100, False),
        (404, {"Content-Type": "application/json"}, 100, False),
        (429, {"Content-Type": "application/json"}, 100, False),
        (500, {"Content-Type": "text/html"}, 100, False),
        (502, {"Content-Type": "application/json"}, 100, False),
    ],
)
def test_is_cacheable(status: int, headers: dict[str, str], size: int, expected: bool) -> None:
    assert is_cacheable(status, headers, size, MAX) is expected


def test_is_cacheable_uses_the_cap_it_is_given() -> None:
    headers = {"Content-Type": "application/json"}
    assert is_cacheable(200, headers, 100, 100)
    assert not is_cacheable(200, headers, 101, 100)


# --- MemoryCacheStore ----------------------------------------------------------------------


async def test_memory_store_round_trip_and_expiry() -> None:
    clock = FakeClock(T0)
    store = MemoryCacheStore(10, clock=clock)
    cached = entry()
    await store.set("k", cached, 60)
    assert await store.get("k") is cached
    clock.advance(59.9)
    assert await store.get("k") is cached
    clock.advance(0.1)
    assert await store.get("k") is None
    assert len(store) == 0
    assert await store.get("missing") is None


async def test_memory_store_is_a_bounded_lru() -> None:
    store = MemoryCacheStore(3, clock=FakeClock(T0))
    for name in "abc":
        await store.set(name, entry(name.encode()), 60)
    assert await store.get("a") is not None  # a is now the most recently used
    await store.set("d", entry(b"d"), 60)
    assert len(store) == 3
    assert await store.get("b") is None
    assert {k for k in "acd" if store.get_now(k) is not None} == {"a", "c", "d"}
    await store.set("c", entry(b"c2"), 60)  # overwriting refreshes recency too
    await store.set("e", entry(b"e"), 60)
    assert store.get_now("a") is None
    got = store.get_now("c")
    assert got is not None and got.body == b"c2"
    assert store.get_now("d") is not None and store.get_now("e") is not None


async def test_memory_store_delete_and_clear() -> None:
    store = MemoryCacheStore(10, clock=FakeClock(T0))
    await store.set("a", entry(), 60)
    await store.set("b", entry(), 60)
    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert await store.get("a") is None
    await store.set("c", entry(), 60)
    assert await store.clear() == 2
    assert len(store) == 0
    assert await store.clear() == 0


async def check_store_protocol(store: CacheStore) -> None:
    """What every `CacheStore` promises, through the protocol alone (mypy checks the types)."""
    assert await store.get("v1:a") is None
    first = entry(b'{"rows": [1]}', stored_at=T0 + 1)
    await store.set("v1:a", first, 60)
    await store.set("v1:b", entry(b"b"), 60)
    got = await store.get("v1:a")
    assert got == first  # status, headers, body and both times survive the round trip
    await store.set("v1:a", entry(b"newer", stored_at=T0 + 2), 60)  # an overwrite wins
    got = await store.get("v1:a")
    assert got is not None and (got.body, got.stored_at) == (b"newer", T0 + 2)
    assert await store.delete("v1:a") is True
    assert await store.delete("v1:a") is False
    assert await store.get("v1:a") is None
    assert (await store.get("v1:b")) == entry(b"b")  # deleting one key leaves the others
    await store.set("v1:c", entry(b"c"), 60)
    assert await store.clear() == 2
    assert await store.get("v1:b") is None and await store.get("v1:c") is None
    assert await store.clear() == 0


@pytest.mark.parametrize("kind", ["memory", "redis", "fallback-up", "fallback-down"])
async def test_every_store_keeps_the_protocol(kind: str, redis_client: aioredis.Redis) -> None:
    memory = MemoryCacheStore(clock=FakeClock(T0))
    link = RedisLink(redis_client)
    store: CacheStore
    if kind == "memory":
        store = memory
    elif kind == "redis":
        store = RedisCacheStore(redis_client, PREFIX)
    else:
        store = FallbackCacheStore(link, RedisCacheStore(redis_client, PREFIX), memory)
        if kind == "fallback-down":
            link.failed(ConnectionError("gone"), "test")
    await check_store_protocol(store)
    if kind == "fallback-down":  # it all happened in process memory, none of it in Redis
        assert await redis_client.dbsize() == 0
    if kind in ("redis", "fallback-up"):
        assert len(memory) == 0  # and with Redis up, none of it in process memory
    await link.close()


# --- RedisCacheStore (fakeredis and a real redis-server) ------------------------------------

PREFIX = "test-proxy:"


@pytest.fixture
async def store(redis_client: aioredis.Redis) -> AsyncIterator[RedisCacheStore]:
    yield RedisCacheStore(redis_client, PREFIX)


async def test_redis_store_round_trip_is_one_value_with_physical_ttl(
    store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    cached = entry(b"x,y\n1,2\n" * 500, ttl=300)
    await store.set("v1:abc", cached, 3900)
    assert await store.get("v1:abc") == cached
    assert await store.get("v1:other") is None
    keys = [key async for key in redis_client.scan_iter(match="*")]
    assert keys == [b"test-proxy:c:{v1:abc}"]
    assert await redis_client.type(keys[0]) == b"string"
    pttl = await redis_client.pttl(keys[0])
    assert 3_890_000 < pttl <= 3_900_000


async def test_redis_store_sub_second_ttl_is_kept_in_milliseconds(
    store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    await store.set("k", entry(), 0.25)
    assert 0 < await redis_client.pttl(store.entry_key("k")) <= 250
    await store.set("k", entry(), 0)
    assert await redis_client.pttl(store.entry_key("k")) in (0, 1, -2)


async def test_redis_store_ignores_foreign_values(
    store: RedisCacheStore, redis_client: aioredis.Redis
) -> None:
    await redis_client.set(store.entry_key("k"), b"not an entry")
    assert await store.get("k") is None
    await redis_client.set(store.entry_key("k"), b"TP1z" + bytes(4) + b"oops")
    assert await store.get("k") is None


async def test_redis_store_delete(store: RedisCacheStore) -> None:
    await store.set("a", entry(), 60)
    await store.set("b", entry(), 60)
    assert await store.delete("a") is True
    assert await store.delete("a") is False
    assert await store.get("a") is None
    assert await store.get("b") is not None


async def test_redis_store_clear_scans_in_batches_and_spares_other_keys(
    store: RedisCacheStore, redis_client: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    blob = entry().encode()
    async with redis_client.pipeline(transaction=False) as pipe:
        for i in range(1200):
            pipe.set(store.entry_key(f"v1:{i:04d}"), blob, px=600_000)
        for i in range(30):
            pipe.set(f"other-app:c:{{v1:{i}}}", b"keep")
            pipe.set(f"{PREFIX}l:{{v1:{i}}}", b"a lease")
            pipe.set(f"{PREFIX}rl:client:{i}", b"1")
        pipe.set("test-proxy:circuit", b"1")
        await pipe.execute()

    scans = 0
    unlinked: list[int] = []
    real_scan, real_unlink = redis_client.scan, redis_client.unlink

    async def counting_scan(*args: Any, **kwargs: Any) -> Any:
        nonlocal scans
        scans += 1
        return await real_scan(*args, **kwargs)

    async def counting_unlink(*names: Any) -> Any:
        unlinked.append(len(names))
        return await real_unlink(*names)

    async def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("clear must not use KEYS, DEL or FLUSH")

    monkeypatch.setattr(redis_client, "scan", counting_scan)
    monkeypatch.setattr(redis_client, "unlink", counting_unlink)
    for name in ("keys", "delete", "flushdb", "flushall"):
        monkeypatch.setattr(redis_client, name, forbidden)

    assert await store.clear() == 1200
    monkeypatch.undo()

    assert scans >= 2
    assert sum(unlinked) == 1200
    assert max(unlinked) <= 500
    assert await redis_client.dbsize() == 30 * 3 + 1
    assert [k async for k in redis_client.scan_iter(match=f"{PREFIX}c:*")] == []
    assert await redis_client.get("other-app:c:{v1:7}") == b"keep"
    assert await redis_client.get(f"{PREFIX}l:{{v1:7}}") == b"a lease"
    assert await store.clear() == 0


async def test_two_prefixes_do_not_see_each_other(redis_client: aioredis.Redis) -> None:
    one, two = RedisCacheStore(redis_client, "one:"), RedisCacheStore(redis_client, "two:")
    await one.set("k", entry(b"1"), 60)
    await two.set("k", entry(b"2"), 60)
    got = await two.get("k")
    assert got is not None and got.body == b"2"
    assert await one.clear() == 1
    assert await one.get("k") is None
    assert await two.get("k") is not None
