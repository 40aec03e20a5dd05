"""Connecting to Redis (single, TLS, unix, Sentinel, Cluster) and tracking whether it is usable."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)

from . import keys

__all__ = [
    "REDIS_ERRORS",
    "WRITE_REFUSALS",
    "AnyRedis",
    "RedisLink",
    "connect_bus",
    "connect_redis",
]

AnyRedis: TypeAlias = "aioredis.Redis | RedisCluster"
# What a failed Redis call raises: the caller falls back to in-process state for that call.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
# Redis answers, but refuses writes: maxmemory reached under `noeviction`, or a read-only replica.
WRITE_REFUSALS: tuple[type[BaseException], ...] = (OutOfMemoryError, ReadOnlyError)

log = logging.getLogger("teamup_proxy")


def connect_redis(url: str, *, timeout: float, max_connections: int) -> AnyRedis:
    """A client for `url`, failing fast: short socket timeouts, and one retry on a fresh
    connection for a connection error only (a pooled connection to a Redis that restarted fails
    on first use; a timeout — a paused Redis — is never retried, so it costs one timeout).

    `redis://`, `rediss://`, `unix://` use a blocking pool, so a burst waits for a connection
    instead of failing with MaxConnectionsError; `redis+sentinel://h1:p1,h2:p2/service[/db]`
    asks the sentinels for the master; `redis+cluster://host:port` discovers a Redis Cluster.
    """
    no_retry = Retry(NoBackoff(), 0)
    # Reconnect once: the old socket went to a dead server, so the command never ran there.
    reconnect = Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))
    parts = urlsplit(url)
    if parts.scheme == "redis+cluster":
        return RedisCluster.from_url(
            url.replace("redis+cluster://", "redis://", 1),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max(max_connections, 1000),
            retry=no_retry,
        )
    if parts.scheme == "redis+sentinel":
        hosts = []
        for item in parts.netloc.rpartition("@")[2].split(","):
            host, _, port = item.rpartition(":")
            hosts.append((host or item, int(port) if host else 26379))
        path = [p for p in parts.path.split("/") if p]
        service = path[0] if path else "mymaster"
        db = int(path[1]) if len(path) > 1 else 0
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            hosts,
            socket_timeout=timeout,
            sentinel_kwargs={"socket_timeout": timeout, "password": password},
        )
        master: aioredis.Redis = sentinel.master_for(
            service,
            db=db,
            password=password,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=reconnect,
        )
        return master
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(1.0, timeout * 10),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=reconnect,
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)


def connect_bus(client: AnyRedis, url: str | None, *, timeout: float) -> aioredis.Redis:
    """The client the events channel subscribes and publishes with: the client itself (its
    subscription takes one connection of the pool), or on a Cluster a plain client to the node
    the URL names (Cluster pub/sub reaches every node)."""
    if isinstance(client, aioredis.Redis):
        return client
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
    }
    if url is not None:
        return aioredis.Redis.from_url(url.replace("redis+cluster://", "redis://", 1), **options)
    node = client.get_default_node()
    return aioredis.Redis(host=node.host, port=int(node.port), **options)


def _never_outlive_a_cancel() -> None:
    """Raise CancelledError if this task was asked to stop.

    On Python 3.11 a cancel that lands just as an `asyncio.timeout` deadline passes can come
    out of the `async with` as TimeoutError, which a ping takes for "Redis did not answer":
    a health loop would then go on for ever and `stop()` would wait for it for ever (seen as
    a test suite hung in a fixture's teardown)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class RedisLink:
    """Whether Redis is usable now, known by every process whether it has traffic or not.

    A health task pings Redis every `retry_interval`, always (not only while it is down): a
    worker with no traffic still learns within one interval that Redis went away or came back,
    so `/readyz` tells the truth on every worker. A failed call on the request path marks Redis
    down at once; from then on every caller skips it until a ping succeeds. That is what keeps a
    dead or paused Redis from adding its timeout to every request: only the requests already
    talking to it when it went away pay, the rest go straight to the fallbacks.
    """

    def __init__(
        self,
        client: AnyRedis | None,
        *,
        retry_interval: float = 1.0,
        timeout: float = 0.0,
        on_change: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_writes: Callable[[bool], None] | None = None,
    ) -> None:
        self.client = client
        self.retry_interval = retry_interval
        # A ping is bounded by one interval, or by the commands' own socket timeout
        # (PROXY_REDIS_TIMEOUT) when that is longer: a worker whose event loop is busy for a
        # moment (hundreds of large answers being written) must not call Redis down any sooner
        # than a command would, and refetch from TeamUp what Redis holds.
        self.ping_timeout = max(retry_interval, timeout, 0.05)
        self._down = False
        self._on_change = on_change
        self._on_error = on_error
        self._health: asyncio.Task[None] | None = None
        # The "writes refused" state: separate from down (reads still work), with its own probe.
        self._on_writes = on_writes
        self.writes_refused: str | None = None  # why, while Redis refuses writes
        self._write_probe: asyncio.Task[None] | None = None
        self._stopped = False  # after `stop`: no health task runs or starts again
        # When (time.monotonic) the process last went off Redis (or Redis refused writes): the
        # limiters' shares start full then (see `limiters.FallbackLimiter`).
        self.down_since = -math.inf
        # Awaited before the process goes back to Redis (purges done meanwhile are re-applied
        # there first); if it fails, Redis is not back yet.
        self.before_up: Callable[[], Awaitable[None]] | None = None
        # Called when this process finds that Redis refuses writes (the app tells the others).
        self.on_refused: Callable[[str], None] | None = None

    @property
    def embedded(self) -> bool:
        """No Redis configured: everything lives in this process."""
        return self.client is None

    @property
    def up(self) -> bool:
        """Redis is configured and was answering at last contact."""
        return self.client is not None and not self._down

    @property
    def status(self) -> str:
        """`ok`, `down` or `embedded`, as `/readyz` reports it."""
        if self.client is None:
            return "embedded"
        return "down" if self._down else ("refusing-writes" if self.writes_refused else "ok")

    @property
    def writable(self) -> bool:
        """Redis is up and takes writes: entries, leases and buckets may go there."""
        return self.up and self.writes_refused is None

    def start(self) -> None:
        """Start the health task (once; needs a running event loop)."""
        if self.client is not None and self._health is None and not self._stopped:
            self._health = asyncio.get_running_loop().create_task(self._watch())

    def failed(self, exc: BaseException, op: str) -> None:
        """Record a failed Redis call; the first one takes the process off Redis and logs.

        A command error (Redis answered, with an error) fails that one call over to the
        fallback; only an unreachable, paused or timing-out Redis takes the process off Redis.
        """
        if self._on_error is not None:
            self._on_error(op)
        if isinstance(exc, WRITE_REFUSALS):
            self._refuse_writes(exc, op)
        if self._down or self.client is None or isinstance(exc, ResponseError):
            return
        self._mark_down(exc, op)

    async def check(self) -> bool:
        """One health ping now (bounded by `ping_timeout`); updates the state. True: it answered.

        On a Cluster every primary must answer (a dead primary's slots are unusable until its
        replica is promoted); a Sentinel client asks the sentinels for the master on connect.
        """
        assert self.client is not None
        try:
            async with asyncio.timeout(self.ping_timeout):
                if isinstance(self.client, RedisCluster):
                    await self.client.ping(target_nodes=RedisCluster.PRIMARIES)
                else:
                    await self.client.ping()
            if self._down and self.before_up is not None:
                await self.before_up()
        except REDIS_ERRORS as exc:
            _never_outlive_a_cancel()  # a cancel that came out of the timeout as TimeoutError
            # Even a command error counts here (NOAUTH, LOADING): Redis cannot serve us.
            if not self._down:
                if self._on_error is not None:
                    self._on_error("health")
                self._mark_down(exc, "health")
            return False
        if self._down:
            self._down = False
            log.warning("redis reachable again", extra={"event": "redis_up"})
            if self._on_change is not None:
                self._on_change(True)
        elif self.writes_refused is None:
            await self._probe_writes()
        return True

    async def _probe_writes(self) -> None:
        """One tiny write per health tick: an idle process learns that Redis refuses writes
        (maxmemory under noeviction, a read-only replica) without waiting for a miss."""
        assert self.client is not None
        try:
            async with asyncio.timeout(self.ping_timeout):
                await self.client.set(keys.probe(keys.PREFIX), b"1", px=1000)
        except WRITE_REFUSALS as exc:
            self._refuse_writes(exc, "health")
        except REDIS_ERRORS:
            _never_outlive_a_cancel()
            # the next ping decides whether Redis is down

    def _mark_down(self, exc: BaseException, op: str) -> None:
        self._down = True
        self.down_since = time.monotonic()
        log.warning(
            "redis unreachable; serving from in-process fallbacks",
            extra={"event": "redis_down", "op": op, "error": type(exc).__name__},
        )
        if self._on_change is not None:
            self._on_change(False)
        self.start()  # a link that was never started still finds its way back

    async def _watch(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.retry_interval)
            await self.check()

    async def stop(self) -> None:
        """Stop the health task (and the write probe)."""
        self._stopped = True
        for task in (self._health, self._write_probe):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._health = self._write_probe = None

    def _refuse_writes(self, exc: BaseException, op: str) -> None:
        """Redis refused a write: writers go to the fallbacks until a probe write succeeds."""
        reason = (
            "read-only replica" if isinstance(exc, ReadOnlyError) else "out of memory (noeviction)"
        )
        self.refuse_writes(reason, op)

    def refuse_writes(self, reason: str, op: str, *, told: bool = False) -> None:
        """Enter the writes-refused state (`told`: another process saw it and said so)."""
        if self.writes_refused is not None or self.client is None:
            return
        self.writes_refused = reason
        self.down_since = time.monotonic()  # the limiters count here from now on
        log.warning(
            "redis refuses writes; caching and limits in process memory",
            extra={"event": "redis_writes_refused", "op": op, "reason": reason},
        )
        if self._on_writes is not None:
            self._on_writes(True)
        if self.on_refused is not None and not told:
            self.on_refused(reason)
        self._write_probe = asyncio.get_running_loop().create_task(self._wait_for_writes())

    async def _wait_for_writes(self) -> None:
        assert self.client is not None
        while not self._stopped:
            await asyncio.sleep(self.retry_interval)
            try:
                await self.client.set(keys.probe(keys.PREFIX), b"1", px=1000)
                if self.before_up is not None:
                    await self.before_up()
            except REDIS_ERRORS:
                _never_outlive_a_cancel()
                continue
            self.writes_refused = None
            log.warning("redis takes writes again", extra={"event": "redis_writes_ok"})
            if self._on_writes is not None:
                self._on_writes(False)
            return

    async def close(self) -> None:
        """Stop the health task and close the client's connections."""
        await self.stop()
        if self.client is not None:
            await self.client.aclose()
