"""Single-flight: one fetch per key in a process (futures), and across replicas (a lease)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..core.entry import CachedResponse
from . import keys
from .link import REDIS_ERRORS, AnyRedis, RedisLink
from .scripts import load_script
from .stores import CacheStore

__all__ = ["LOCAL_TOKEN", "VANISHED", "Failed", "LocalFlight", "RedisLease", "Vanished"]

T = TypeVar("T")
LOCAL_TOKEN = "local"

# Long enough for every waiter to see the note (they look every few polls); a later holder's
# release clears it, so a waiter never takes an older failure for its holder's.
_FAILURE_NOTE_MS = 1000


@dataclass(frozen=True, slots=True)
class Failed:
    """The lease holder's fetch failed; `payload` says how (the caller's own encoding)."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class Vanished:
    """The lease ended with neither an entry nor a failure note (a dead holder, a FLUSHALL)."""


VANISHED = Vanished()


class LocalFlight(Generic[T]):
    """Concurrent calls for one key share one run of the work; its result or error goes to all.

    The work runs in a task of its own, so a caller that disconnects cancels only its wait:
    the fetch finishes, is stored, and the other waiters still get it.
    """

    def __init__(self) -> None:
        self._running: dict[str, asyncio.Task[T]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._running

    async def run(self, key: str, work: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """The work's result, and whether this call joined one already running (collapsed)."""
        task = self._running.get(key)
        collapsed = task is not None
        if task is None:
            task = asyncio.ensure_future(work())
            self._running[key] = task
            task.add_done_callback(lambda _t: self._running.pop(key, None))
        return await asyncio.shield(task), collapsed


class RedisLease:
    """A short `SET NX PX` lease per key: one replica fetches, the others poll for the entry.

    Polling, not pub/sub: it works the same on a single server, Sentinel and Cluster, needs no
    extra connection or subscription to rebuild after an outage, and costs one GET per poll
    interval per waiting key per process (the in-process flight already collapsed the rest).
    """

    def __init__(
        self,
        link: RedisLink,
        prefix: str,
        *,
        lease_ms: int,
        wait_timeout: float,
        poll_interval: float = 0.005,
        client: AnyRedis | None = None,
    ) -> None:
        self.link = link
        self.client = client if client is not None else link.client
        self.prefix = prefix
        self.lease_ms = lease_ms
        self.wait_timeout = wait_timeout
        self.poll_interval = poll_interval
        self._release = (
            self.client.register_script(load_script("release_lease"))
            if self.client is not None
            else None
        )
        self._renew = (
            self.client.register_script(load_script("renew_lease"))
            if self.client is not None
            else None
        )

    def lease_key(self, key: str) -> str:
        """The lease's Redis key (hash-tagged into the entry's Cluster slot)."""
        return keys.lease(self.prefix, key)

    def failure_key(self, key: str) -> str:
        """Where a failed holder leaves its failure for the replicas that waited on it."""
        return keys.failure(self.prefix, key)

    async def acquire(self, key: str) -> str | None:
        """A token if this replica may fetch `key` now; None while another replica holds it."""
        if not self.link.writable or self.client is None:
            return LOCAL_TOKEN
        token = secrets.token_hex(8)
        try:
            won = await self.client.set(self.lease_key(key), token, nx=True, px=self.lease_ms)
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "lease")
            return LOCAL_TOKEN
        return token if won else None

    @contextlib.asynccontextmanager
    async def kept(self, key: str, token: str | None) -> AsyncIterator[None]:
        """Hold the lease for as long as the block runs: it is extended every third of its
        lifetime, so a live holder keeps it however long it queues, and a dead one loses it
        within one lifetime."""
        if token is None or token == LOCAL_TOKEN or self._renew is None:
            yield
            return
        renewer = asyncio.ensure_future(self._keep(key, token))
        try:
            yield
        finally:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await renewer

    async def _keep(self, key: str, token: str) -> None:
        assert self._renew is not None
        while True:
            await asyncio.sleep(self.lease_ms / 3000)
            if not self.link.writable:
                continue
            try:
                if not await self._renew(keys=[self.lease_key(key)], args=[token, self.lease_ms]):
                    return  # no longer ours (expired, or flushed): nothing left to keep
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "lease")

    async def release(self, key: str, token: str, failure: bytes | None = None) -> None:
        """Give the lease back if it is still ours, leaving `failure` for the waiters if any."""
        if token == LOCAL_TOKEN or not self.link.up or self._release is None:
            return
        try:
            await self._release(
                keys=[self.lease_key(key), self.failure_key(key)],
                args=[token, failure or b"", _FAILURE_NOTE_MS],
            )
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "lease")

    async def wait_for_entry(
        self, key: str, store: CacheStore, newer_than: float | None
    ) -> CachedResponse | Failed | Vanished | None:
        """Poll until another replica stores a newer entry or reports its failure.

        VANISHED when the lease ended with neither (the holder died, or a FLUSHALL took it);
        None when the wait timed out.
        """
        assert self.client is not None
        deadline = time.monotonic() + self.wait_timeout
        polls = 0
        while time.monotonic() < deadline and self.link.up:
            await asyncio.sleep(self.poll_interval)
            polls += 1
            entry = await store.get(key)
            if entry is not None and (newer_than is None or entry.stored_at > newer_than):
                return entry
            if polls % 4 == 0:
                try:
                    if not await self.client.exists(self.lease_key(key)):
                        # The holder finished without storing (a failure, or an answer that
                        # may not be stored) or died: one more look, then its failure note.
                        entry = await store.get(key)
                        if entry is not None and (
                            newer_than is None or entry.stored_at > newer_than
                        ):
                            return entry
                        note = await self.client.get(self.failure_key(key))
                        return Failed(note) if isinstance(note, bytes) else VANISHED
                except REDIS_ERRORS as exc:
                    self.link.failed(exc, "lease")
        return None
