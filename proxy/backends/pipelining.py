"""Auto-pipelining: the Redis commands issued in one event-loop turn go out as one pipeline.

On a cache hit the proxy's Redis work is one small command (the caller's GCRA, or a GET), and
redis-py spends far more CPU per command on acquiring a pooled connection, writing and reading
than Redis does answering. Under concurrent load, batching every command issued in one loop turn
into one non-transactional pipeline amortises that cost over the batch.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript

__all__ = ["AutoPipelineRedis"]

_MAX_BATCH = 256


Call = tuple[str, tuple[Any, ...], dict[str, Any], "asyncio.Future[Any]"]


class AutoPipelineRedis:
    """The hot path's commands (`get`, `set`, `pttl`, `exists`, `evalsha`) batched per loop turn.

    A drop-in wherever the proxy takes a client for those commands; anything else passes
    through. Errors reach each caller as if it had sent its command alone, and commands issued
    in order in one turn run in that order (one connection, one pipeline).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self._pending: list[Call] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task[None]] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def register_script(self, script: str) -> AsyncScript:
        """A script whose EVALSHA goes through the pipeline."""
        return AsyncScript(self, script)  # type: ignore[arg-type]

    def get(self, name: str) -> asyncio.Future[Any]:
        return self._queue("get", name)

    def set(self, name: str, value: Any, **options: Any) -> asyncio.Future[Any]:
        return self._queue("set", name, value, **options)

    def pttl(self, name: str) -> asyncio.Future[Any]:
        return self._queue("pttl", name)

    def exists(self, *names: str) -> asyncio.Future[Any]:
        return self._queue("exists", *names)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> asyncio.Future[Any]:
        return self._queue("evalsha", sha, numkeys, *keys_and_args)

    async def script_load(self, script: str) -> Any:
        return await self.client.script_load(script)

    def _queue(self, method: str, *args: Any, **options: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((method, args, options, future))
        if len(self._pending) >= _MAX_BATCH:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    def _flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        task = asyncio.ensure_future(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[Call]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for method, args, options, _ in batch:
            getattr(pipe, method)(*args, **options)
        try:
            results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every caller gets the error
            for *_call, future in batch:
                if not future.done():
                    future.set_exception(exc)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        for (*_call, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):  # NOSCRIPT included: the Script object reloads it
                future.set_exception(result)
            else:
                future.set_result(result)

    async def aclose(self) -> None:
        """Wait for batches in flight, then close the client."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()
