"""Connecting to Redis (single, TLS, unix, Sentinel, Cluster) and tracking whether it is usable."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TypeAlias
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

__all__ = ["REDIS_ERRORS", "AnyRedis", "RedisLink", "connect_redis"]

AnyRedis: TypeAlias = "aioredis.Redis | RedisCluster"
# What a failed Redis call raises: the caller falls back to in-process state for that call.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

log = logging.getLogger("teamup_proxy")


def connect_redis(url: str, *, timeout: float, max_connections: int) -> AnyRedis:
    """A client for `url`, failing fast: short socket timeouts and no retries on the request path.

    `redis://`, `rediss://`, `unix://` use a blocking pool, so a burst waits for a connection
    instead of failing with MaxConnectionsError; `redis+sentinel://h1:p1,h2:p2/service[/db]`
    asks the sentinels for the master; `redis+cluster://host:port` discovers a Redis Cluster.
    """
    no_retry = Retry(NoBackoff(), 0)
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
            retry=no_retry,
        )
        return master
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=max(1.0, timeout * 10),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=no_retry,
        health_check_interval=0,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisLink:
    """Whether Redis is usable now: after one failure every caller skips it until a probe succeeds.

    That is what keeps a dead or paused Redis from adding its timeout to every request: only the
    requests already talking to it when it went away pay, the rest go straight to the fallbacks.
    """

    def __init__(
        self,
        client: AnyRedis | None,
        *,
        retry_interval: float = 1.0,
        on_change: Callable[[bool], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        self.client = client
        self.retry_interval = retry_interval
        self._down = False
        self._on_change = on_change
        self._on_error = on_error
        self._probe: asyncio.Task[None] | None = None

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
        return "embedded" if self.client is None else ("down" if self._down else "ok")

    def failed(self, exc: BaseException, op: str) -> None:
        """Record a failed Redis call; the first one logs and starts the background probe.

        A command error (Redis answered, with an error) fails that one call over to the
        fallback; only an unreachable, paused or timing-out Redis takes the process off Redis.
        """
        if self._on_error is not None:
            self._on_error(op)
        if self._down or self.client is None or isinstance(exc, ResponseError):
            return
        self._down = True
        log.warning(
            "redis unreachable; serving from in-process fallbacks",
            extra={"event": "redis_down", "op": op, "error": type(exc).__name__},
        )
        if self._on_change is not None:
            self._on_change(False)
        self._probe = asyncio.get_running_loop().create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        assert self.client is not None
        while True:
            await asyncio.sleep(self.retry_interval)
            try:
                await self.client.ping()
            except REDIS_ERRORS:
                continue
            self._down = False
            log.warning("redis reachable again", extra={"event": "redis_up"})
            if self._on_change is not None:
                self._on_change(True)
            return

    async def close(self) -> None:
        """Stop probing and close the client's connections."""
        if self._probe is not None:
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                pass
        if self.client is not None:
            await self.client.aclose()
