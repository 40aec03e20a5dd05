"""Collection generations: one Redis hash, a number per collection, part of every read's cache
key. A write bumps its collections (one transaction, O(1) per write, no key scan); entries of
older generations are never read again and expire on their own.

Every process keeps the hash as it last read it (one `HGETALL` for every collection) and may
use that view for `interval` seconds from when the `HGETALL` was *sent*; a write waits
`interval` after its bump before answering. So once a write is answered, no worker of any
replica still uses a view from before its bump: any such view was requested before the bump
and expired `interval` after that (durations only: no shared clock is needed). Hot hits
answered from memory stay correct within the same bound, and the view costs one round trip
per process per `interval`, not one per request.

While Redis is unreachable the view is this process's own: bumps count locally and are pushed
to Redis (before it is read again) once it answers, so a write made meanwhile still makes
the entries from before it unreachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from . import keys
from .link import REDIS_ERRORS, AnyRedis, RedisLink
from .scripts import load_script

__all__ = ["Generations"]

log = logging.getLogger("teamup_proxy")


class Generations:
    """This process's view of the generation hash, and the bumps writes make to it."""

    def __init__(
        self,
        link: RedisLink,
        client: AnyRedis | None,
        prefix: str,
        *,
        interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.link = link
        self.client = client
        self.key = keys.generations(prefix)
        self.interval = interval
        self.clock = clock
        self._view: dict[str, int] = {}
        self._sent = float("-inf")  # when the HGETALL behind the view was sent
        self._pending: dict[str, int] = {}  # bumps Redis has not seen yet
        self._refresh: asyncio.Future[float] | None = None
        # One script adds and reads atomically, on a single server and on Cluster alike.
        self._script = client.register_script(load_script("generations")) if client else None

    def now(self, collection: str) -> int | None:
        """The collection's generation if the view may still be used (no I/O), else None."""
        if self.clock() < self._sent + self.interval or not self._redis:
            return self._view.get(collection, 0)
        return None

    def last(self, collection: str) -> int:
        """The collection's generation as this process saw it last (logs, an admin purge)."""
        return self._view.get(collection, 0)

    @property
    def _redis(self) -> bool:
        return self.client is not None and self.link.up

    async def get(self, collection: str) -> int:
        """The collection's generation, from a view at most `interval` old (or read after
        this call began)."""
        found = self.now(collection)
        if found is not None:
            return found
        asked = self.clock()
        while True:
            refresh = self._refresh
            # A refresh already done (its `_forget` callback not yet run) is never awaited
            # again: `shield` returns a done future without yielding, and when that refresh was
            # sent before this call and is older than `interval` (a slow HGETALL under load),
            # this loop would spin forever and the worker would stop answering.
            if refresh is None or refresh.done():
                refresh = self._refresh = asyncio.ensure_future(self._read())
                refresh.add_done_callback(self._forget)
            sent = await asyncio.shield(refresh)
            # A refresh sent before this call began will do only while still young.
            if sent >= asked or self.clock() < sent + self.interval or not self._redis:
                return self._view.get(collection, 0)

    def _forget(self, done: asyncio.Future[float]) -> None:
        if self._refresh is done:
            self._refresh = None

    async def _read(self) -> float:
        sent = self.clock()
        client = self.client
        if client is None or not self.link.up:
            return sent
        # Bumps made while Redis was away go first (while it refuses writes they wait: the
        # local view keeps them meanwhile).
        pending = dict(self._pending) if self.link.writable else {}
        try:
            if pending:
                raw = await self._run(pending)
            else:
                raw = _pairs(await client.hgetall(self.key))
        except REDIS_ERRORS as exc:
            self.link.failed(exc, "generations")
            return sent
        for name, count in pending.items():
            left = self._pending.get(name, 0) - count
            if left > 0:
                self._pending[name] = left
            else:
                self._pending.pop(name, None)
        view = dict(raw)
        # Never backwards: a bump this process made after the HGETALL was sent may be newer
        # (and a lost hash must not bring back entries of generations already left behind).
        for name, value in self._view.items():
            if view.get(name, 0) < value:
                view[name] = value
        self._view = view
        self._sent = max(self._sent, sent)
        return sent

    async def bump(self, collections: Iterable[str]) -> bool:
        """Add one to each collection's generation in Redis (one transaction); True when
        Redis took it. Without Redis the bump is this process's until Redis answers again."""
        names = tuple(dict.fromkeys(collections))
        if not names:
            return True
        client = self.client
        if client is not None and self.link.up:
            try:
                found = dict(await self._run(dict.fromkeys(names, 1)))
            except REDIS_ERRORS as exc:
                self.link.failed(exc, "generations")
            else:
                for name in names:
                    self._view[name] = max(self._view.get(name, 0), found.get(name, 0))
                return True
        for name in names:
            self._view[name] = self._view.get(name, 0) + 1
            self._pending[name] = self._pending.get(name, 0) + 1
        log.warning(
            "a write's invalidation is local to this process until Redis answers",
            extra={"event": "generation_local", "collections": list(names)},
        )
        return False

    async def _run(self, counts: dict[str, int]) -> list[tuple[str, int]]:
        """Add `counts` to the hash and read all of it, in one script call."""
        assert self._script is not None
        args: list[str | int] = []
        for name, count in counts.items():
            args.extend((name, count))
        flat = await self._script(keys=[self.key], args=args)
        return [(_text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]

    async def settle(self) -> None:
        """Wait until no process can still use a view from before the last bump (call after a
        bump, before the write is answered)."""
        if self.interval > 0 and self.client is not None:
            await asyncio.sleep(self.interval)


def _pairs(raw: Mapping[bytes | str, bytes | str]) -> list[tuple[str, int]]:
    return [(_text(k), int(v)) for k, v in raw.items()]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
