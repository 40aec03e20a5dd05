"""One truth across processes: purges, the circuit and writes-refused, told to every worker of
every replica over one Redis pub/sub channel, each event acknowledged.

Every process keeps one dedicated subscribed connection. `tell` publishes an event and waits
(at most `ack_timeout`) until every subscriber that received it has applied it and said so, so
the answer that caused the event is returned after every live worker has seen it. While a
process is not subscribed (Redis gone, the connection lost) it may miss events: `on_lost` is
called at once (the app drops its L1 and hot memo whole and stops using them) and `on_live`
when it is subscribed again (the app starts the L1 empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .link import REDIS_ERRORS

__all__ = ["Bus"]

log = logging.getLogger("teamup_proxy")
Event = dict[str, Any]
# What ends a subscription: Redis gone, and redis-py's "connection not set" after a failed connect.
_LOST: tuple[type[BaseException], ...] = (*REDIS_ERRORS, RuntimeError)
_NO_RETRY = Retry(NoBackoff(), 0)


class _Waiting:
    """The acknowledgements one published event is waiting for."""

    def __init__(self) -> None:
        self.acks = 0
        self.needed: int | None = None
        self.done = asyncio.Event()

    def check(self) -> None:
        if self.needed is not None and self.acks >= self.needed:
            self.done.set()


class Bus:
    """The events channel: `tell` to publish (and wait for acks), `on_event` to apply."""

    def __init__(
        self,
        client: aioredis.Redis,
        channel: str,
        *,
        on_event: Callable[[Event], None],
        on_lost: Callable[[], None],
        on_live: Callable[[], None],
        publisher: Any = None,
        ack_timeout: float = 0.1,
        retry: float = 0.1,
    ) -> None:
        self.client = client  # for the subscription (a dedicated connection)
        self.publisher = publisher if publisher is not None else client
        self.channel = channel
        self.on_event = on_event
        self.on_lost = on_lost
        self.on_live = on_live
        self.ack_timeout = ack_timeout
        self.retry = retry
        self.live = False
        self.received = 0  # events applied (tests read it)
        self._prefix = f"{os.getpid()}-{secrets.token_hex(4)}-"
        self._ids = itertools.count(1)
        self._waiting: dict[str, _Waiting] = {}
        self._task: asyncio.Task[None] | None = None
        self._pubsub: Any = None
        self._closing = False
        self._subscribed = asyncio.Event()

    def start(self) -> None:
        """Start listening (once; needs a running loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._listen())

    async def wait_live(self, seconds: float) -> bool:
        """Wait (at most `seconds`) until subscribed; True when it is."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._subscribed.wait()
        return self.live

    async def tell(self, event: Event) -> tuple[int, int]:
        """Publish `event` to every process (this one too) and wait for their acknowledgements,
        at most `ack_timeout`: (subscribers that received it, acknowledgements). Raises a Redis
        error when it could not be published."""
        event_id = self._prefix + str(next(self._ids))
        waiting = self._waiting[event_id] = _Waiting()
        try:
            receivers = int(
                await self.publisher.publish(self.channel, orjson.dumps({**event, "id": event_id}))
            )
            waiting.needed = receivers
            waiting.check()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.ack_timeout):
                    await waiting.done.wait()
            return receivers, waiting.acks
        finally:
            del self._waiting[event_id]

    async def _listen(self) -> None:
        while not self._closing:
            pubsub = self._pubsub = self.client.pubsub()
            connection: Any = None
            saved: Any = None
            try:
                await pubsub.subscribe(self.channel)
                # redis-py would reconnect a broken subscription silently (missing what was
                # published meanwhile): no retry on this connection, so a break is seen.
                connection = pubsub.connection
                if connection is not None:
                    saved, connection.retry = connection.retry, _NO_RETRY
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=False, timeout=None
                    )
                    if message is None:
                        continue
                    if message.get("type") == "subscribe":
                        self._set_live(True)
                    elif message.get("type") == "message":
                        await self._handle(message.get("data"))
            except asyncio.CancelledError:
                raise
            except _LOST:
                if self._closing:
                    return
                self._set_live(False)
            finally:
                if connection is not None and saved is not None:
                    connection.retry = saved  # the connection goes back to the pool
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(self.retry)

    def _set_live(self, live: bool) -> None:
        if live == self.live:
            return
        self.live = live
        if live:
            self._subscribed.set()
            self.on_live()
        else:
            self._subscribed.clear()
            log.warning(
                "invalidation channel lost; L1 off until it is back", extra={"event": "bus_lost"}
            )
            self.on_lost()

    async def _handle(self, data: object) -> None:
        try:
            event = orjson.loads(data) if isinstance(data, bytes | str) else None
        except orjson.JSONDecodeError:
            event = None
        if not isinstance(event, dict):
            return
        acked = event.get("ack")
        if isinstance(acked, str):
            waiting = self._waiting.get(acked)
            if waiting is not None:
                waiting.acks += 1
                waiting.check()
            return
        try:
            self.on_event(event)
        except Exception:
            log.exception("bus event failed", extra={"event": "bus_event_failed"})
        self.received += 1
        event_id = event.get("id")
        if isinstance(event_id, str):
            with contextlib.suppress(*REDIS_ERRORS):
                await self.publisher.publish(self.channel, orjson.dumps({"ack": event_id}))

    async def close(self) -> None:
        """Stop listening."""
        self._closing = True
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # redis-py may swallow a cancel that lands in a read with a timeout: then closing the
        # subscription's connection under it ends the read.
        _done, pending = await asyncio.wait([task], timeout=0.5)
        if pending and self._pubsub is not None:
            connection = getattr(self._pubsub, "connection", None)
            if connection is not None:
                with contextlib.suppress(Exception):
                    await connection.disconnect()
            await asyncio.wait([task], timeout=2)
        if not task.done():
            log.warning("invalidation channel did not stop", extra={"event": "bus_stuck"})
            return
        with contextlib.suppress(asyncio.CancelledError, *_LOST):
            await task
