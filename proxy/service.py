"""The read driver: the I/O around `core.decision` — limit ∥ lookup → decide → flight → fetch →
store — for any routed read operation, and what to answer."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from .backends import keys
from .backends.bus import Bus
from .backends.flight import VANISHED, Failed, LocalFlight, RedisLease
from .backends.generations import Generations
from .backends.limiters import FallbackLimiter
from .backends.link import REDIS_ERRORS
from .backends.reservations import ReservingLimiter
from .backends.stores import CacheStore, FallbackCacheStore, MemoryCacheStore
from .core.contract import CanonicalQuery, QueryErrors
from .core.decision import Action, Policy, on_failure, on_lookup, storable, usable
from .core.entry import CachedResponse
from .core.errors import JSON, error_body
from .core.failures import FailureKind, UpstreamFailure
from .core.gcra import Rate, RateDecision
from .core.links import LinkRewriter
from .core.operations import Operations
from .metrics import Metrics
from .settings import ClientConfig, Settings
from .upstream.client import UpstreamClient
from .upstream.guard import UpstreamGuard
from .upstream.queue import Abandoned, Turn

__all__ = ["Answer", "Caller", "Fetched", "ReadService"]

log = logging.getLogger("teamup_proxy")
CACHE_NAME = "teamup-proxy"
# Seconds before a key whose background refresh failed is refreshed again.
REFRESH_BACKOFF = 5.0


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated client."""

    name: str
    config: ClientConfig


@dataclass(slots=True)
class Answer:
    """What the proxy answers, plus what the access log and metrics record about it."""

    status: int
    body: bytes
    headers: dict[str, str]
    cache: str
    upstream_status: int | None = None
    upstream_ms: float | None = None
    queued_ms: float | None = None


@dataclass(frozen=True, slots=True)
class Fetched:
    """The outcome of one fetch, shared by every request collapsed onto it."""

    entry: CachedResponse
    stored: bool
    collapsed: bool
    upstream_status: int | None
    upstream_ms: float | None
    queued_ms: float | None = None  # waited in the fair queue for a budget unit
    physical: int = 0  # seconds Redis keeps the entry (when stored)


def retry_after_header(seconds: float) -> str:
    """Whole seconds, rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


async def _unless_abandoned(work: Callable[[], Awaitable[Fetched]]) -> Fetched:
    """The fetch; one the queue dropped (nobody awaits it) ends as a cancelled task, silently."""
    try:
        return await work()
    except Abandoned:
        raise asyncio.CancelledError from None


class ReadService:
    """Answers a validated read from the cache or from TeamUp, never both at once."""

    def __init__(
        self,
        settings: Settings,
        *,
        store: CacheStore,
        l1: MemoryCacheStore | None,
        leases: RedisLease,
        guard: UpstreamGuard,
        upstream: UpstreamClient,
        limiter: FallbackLimiter,
        metrics: Metrics,
        client_limiter: ReservingLimiter | None = None,
        operations: Operations,
        clock: Callable[[], float] = time.time,
        batched_writes: bool = False,
        generations: Generations | None = None,
        guards: Mapping[str, UpstreamGuard] | None = None,
        upstreams: Mapping[str, UpstreamClient] | None = None,
    ) -> None:
        self.settings = settings
        # One guard (budget, fair queue, circuit) and one client per credential; `guard` and
        # `upstream` are the default credential's.
        self.guards = dict(guards or {guard.name: guard})
        self.upstreams = dict(upstreams or {settings.default_upstream.name: upstream})
        # The collection generations writes bump (part of every key; backends/generations.py).
        self.generations = generations or Generations(
            limiter.link, None, keys.PREFIX, interval=settings.generation_check_interval
        )
        self.store = store
        self.l1 = l1
        self.leases = leases
        self.guard = guard
        self.upstream = upstream
        self.limiter = limiter
        # The caller's own limit: locally spent reservations of the shared GCRA when busy.
        self.client_limiter = client_limiter or ReservingLimiter(
            limiter.link, None, limiter, lifetime=0
        )
        self.metrics = metrics
        self.clock = clock
        self._flight: LocalFlight[Fetched] = LocalFlight()
        self._callers: dict[str, int] = {}  # callers waiting on each running fetch
        # True when the store and the leases share one auto-pipelined client (see _fetch_shared).
        self._batched_writes = batched_writes
        self._background: set[asyncio.Task[None]] = set()
        self._refresh_after: dict[str, float] = {}
        self._refreshing: set[str] = set()
        self.operations = operations
        # Purges: the events channel (set by the app), the ones done while Redis was out of
        # reach (re-applied on its return), and when each key/operation/everything was purged.
        self.bus: Bus | None = None
        self._pending_purges: list[tuple[str | None, str | None, str | None]] = []
        self._forgotten: dict[str, float] = {}
        self._forgot_all = -math.inf
        self._prefix_floors = False
        self.collections = {name: op.collection for name, op in operations.items()}
        # Each operation's policy, resolved once from the document and the settings.
        self.policies: dict[str, Policy] = {}
        for name, operation in operations.items():
            ttl = settings.operation_ttls(operation, operations.ttl_classes)
            self.policies[name] = Policy(
                ttl.fresh,
                ttl.stale,
                settings.cache_stale_while_revalidate,
                settings.not_found_ttl if operation.kind == "retrieve" else 0,
            )
        self.links = LinkRewriter(settings.upstream_url, settings.public_url)
        # Bodies are rewritten once, when stored; so the public base is part of the key, and a
        # changed PROXY_PUBLIC_URL never serves entries made for the old one.
        self._variant = (
            hashlib.sha256(settings.public_url.encode()).hexdigest()[:8]
            if settings.public_url
            else ""
        )

    def lane(self, provider: str | None) -> tuple[UpstreamGuard, UpstreamClient]:
        """The guard and the client of the credential that serves `provider`."""
        settings = self.settings
        upstream = settings.upstream_of.get(provider) if provider is not None else None
        name = (upstream or settings.default_upstream).name
        # Never another credential's lane: a missing one is a construction error, not a call
        # sent with the default credential.
        return self.guards[name], self.upstreams[name]

    def collection(self, query: CanonicalQuery) -> str:
        """The generation-hash field of a question's collection (per provider)."""
        return keys.collection(self.collections[query.operation], query.provider)

    def key(self, query: CanonicalQuery, generation: int | None = None) -> str:
        """The cache key of a canonical question (built in `backends.keys`) under its
        collection's generation (None: the one this process saw last)."""
        if generation is None:
            generation = self.generations.last(self.collection(query))
        return keys.cache_key(query, self._variant, generation)

    def key_of(self, query: CanonicalQuery, generation: int) -> str:
        """The cache key of a canonical question under a given generation."""
        return keys.cache_key(query, self._variant, generation)

    async def generation(self, query: CanonicalQuery) -> int:
        """The generation of a question's collection, from a view no older than allowed."""
        collection = self.collection(query)
        found = self.generations.now(collection)
        return found if found is not None else await self.generations.get(collection)

    async def serve(
        self,
        caller: Caller,
        parsed: CanonicalQuery | QueryErrors,
        request_id: str,
        *,
        bypass: bool = False,
    ) -> tuple[Rate, RateDecision, Answer]:
        """One read: the caller's limit alongside the lookup, then the answer.

        The limit and the cache lookup go out in one Redis round trip (auto-pipelining); an L1
        hit needs only the limit. A refused caller costs at most one wasted GET.
        """
        rate = caller.config.rate or self.settings.rate_limit
        limit_key = f"client:{caller.name}"
        answer = None
        cached = None
        limiter = self.client_limiter
        if isinstance(parsed, QueryErrors):
            decision = await limiter.hit(limit_key, rate)
        else:
            key = self.key(parsed, await self.generation(parsed))
            answer = None if bypass else self.l1_hit(key, self.policies[parsed.operation])
            if answer is not None:
                # A hot hit with a reserved unit at hand does no I/O at all.
                decision = limiter.take_local(limit_key, rate) or await limiter.hit(limit_key, rate)
            else:
                decision, cached = await asyncio.gather(
                    limiter.hit(limit_key, rate), self.store.get(key)
                )
        if not decision.allowed:
            provider = parsed.provider if isinstance(parsed, CanonicalQuery) else None
            upstream = self.lane(provider)[0].name
            self.metrics.rejections.labels(caller.name, "client", upstream).inc()
            rejected = self._error(
                429,
                "rate_limited",
                f"Client {caller.name!r} is over its rate of {rate}. Retry later.",
            )
            rejected.headers["Retry-After"] = decision.retry_after_header
            rejected.cache = "rejected"
            return rate, decision, rejected
        if isinstance(parsed, QueryErrors):
            invalid = Answer(400, orjson.dumps(parsed.body()), {"Content-Type": JSON}, "rejected")
            return rate, decision, invalid
        if answer is None:
            answer = await self.answer(caller, parsed, request_id, cached, bypass=bypass, key=key)
        return rate, decision, answer

    def bypasses(self, no_cache: bool) -> bool:
        """Whether a caller's `Cache-Control: no-cache` makes this request skip the cache."""
        return no_cache and self.settings.honor_client_no_cache

    def l1_hit(self, key: str, policy: Policy) -> Answer | None:
        """A hit answered from this process's L1 without any I/O, if the key is there and fresh."""
        if self.l1 is None:
            return None
        entry = self.l1.get_now(key)
        now = self.clock()
        if on_lookup(entry, now, policy) is Action.HIT:
            assert entry is not None
            return self._hit(entry, now)
        return None

    async def purge(
        self, key: str | None = None, *, operation: str | None = None, provider: str | None = None
    ) -> tuple[int, bool]:
        """Drop one entry, every entry of one operation (of one provider), every entry of one
        provider, or everything: (removed, shared).

        Shared: Redis dropped it and every process was told (each drops it from its L1, and
        from its in-process store, before acknowledging; see `backends.bus`). Not shared: Redis
        could not be reached; it is gone from this process only, and the purge is re-applied
        to Redis (and told to every process) before this process uses Redis again, so the
        entry never comes back once Redis does.
        """
        self.forget(key, operation, provider)
        store = self.store
        if not isinstance(store, FallbackCacheStore) or store.redis is None:
            removed = await (store.clear(operation, provider) if key is None else store.delete(key))
            return int(removed), True
        memory = store.memory
        removed = (
            memory.clear_now(operation, provider) if key is None else int(memory.delete_now(key))
        )
        if store.link.up:
            try:
                removed += await self._purge_shared(key, operation, provider)
                return removed, True
            except REDIS_ERRORS as exc:
                store.link.failed(exc, "purge")
        if len(self._pending_purges) >= 1000:
            self._pending_purges = [(None, None, None)]  # too many to keep: everything, once
        self._pending_purges.append((key, operation, provider))
        log.warning(
            "purge reached this process only; re-applied when Redis is back",
            extra={"event": "purge_pending", "operation": operation},
        )
        return removed, False

    async def _purge_shared(
        self, key: str | None, operation: str | None, provider: str | None = None
    ) -> int:
        """Drop it in Redis, then tell every process (raises a Redis error on failure)."""
        store = self.store
        assert isinstance(store, FallbackCacheStore) and store.redis is not None
        if key is None:
            removed = await store.redis.clear(operation, provider)
        else:
            removed = int(await store.redis.delete(key))
        if self.bus is not None:
            event = {"kind": "purge", "key": key, "operation": operation, "provider": provider}
            await self.bus.tell(event)
        return removed

    async def reapply_purges(self) -> None:
        """Before going back to Redis: the purges done here meanwhile, in Redis and everywhere
        (raises a Redis error if Redis cannot take them yet)."""
        while self._pending_purges:
            key, operation, provider = self._pending_purges[0]
            await self._purge_shared(key, operation, provider)
            self._pending_purges.pop(0)
            log.warning("purge re-applied in Redis", extra={"event": "purge_reapplied"})

    def forget(self, key: str | None, operation: str | None, provider: str | None = None) -> None:
        """Drop an entry (an operation's, a provider's, everything) from the L1, and never put
        back into the L1 an entry stored before now (a request that read it before the purge
        may finish after). A provider's purge keeps the L1 from taking back any older entry:
        its keys share no prefix, and the L1 holds only a second's worth anyway."""
        now = self.clock()
        if key is not None:
            if len(self._forgotten) >= 10_000:
                self._forgotten.clear()
                self._forgot_all = now
            self._forgotten[key] = now
        elif operation is not None:
            self._forgotten[keys.operation_prefix(operation, provider)] = now
            self._prefix_floors = True
        else:
            self._forgot_all = now
            self._forgotten.clear()
        if self.l1 is not None:
            if key is None:
                self.l1.clear_now(operation, provider)
            else:
                self.l1.delete_now(key)

    def apply(self, event: dict[str, object]) -> None:
        """A purge told by another process (or this one): from the L1 and the in-process store."""
        if event.get("kind") != "purge":
            return
        key, operation = event.get("key"), event.get("operation")
        provider = event.get("provider")
        key = key if isinstance(key, str) else None
        operation = operation if isinstance(operation, str) else None
        provider = provider if isinstance(provider, str) else None
        self.forget(key, operation, provider)
        store = self.store
        memory = store.memory if isinstance(store, FallbackCacheStore) else None
        if memory is not None:
            if key is None:
                memory.clear_now(operation, provider)
            else:
                memory.delete_now(key)

    def _forgotten_after(self, key: str, entry: CachedResponse) -> bool:
        """Whether `entry` was stored before a purge of `key` (so must not go into the L1)."""
        if entry.stored_at <= self._forgot_all:
            return True
        if not self._forgotten:
            return False
        at = self._forgotten.get(key)
        if at is not None and entry.stored_at <= at:
            return True
        if self._prefix_floors:
            for prefix, at in self._forgotten.items():
                if entry.stored_at <= at and key.startswith(prefix) and prefix.endswith(":"):
                    return True
        return False

    async def answer(
        self,
        caller: Caller,
        query: CanonicalQuery,
        request_id: str,
        cached: CachedResponse | None,
        *,
        bypass: bool = False,
        key: str | None = None,
    ) -> Answer:
        """The answer to one caller's query, given what `lookup` found for it (under `key`)."""
        key = key or self.key(query)
        now = self.clock()
        policy = self.policies[query.operation]
        action = on_lookup(cached, now, policy, bypass=bypass)
        fallback = usable(cached, now, policy)
        if action is Action.HIT:
            assert cached is not None
            self._remember(key, cached, now)
            return self._hit(cached, now)
        if action is Action.STALE:
            assert fallback is not None
            self._refresh_in_background(key, query, caller, request_id, fallback)
            return self._stale(fallback, now, None)

        share = caller.config.upstream_rate
        if share is not None and key not in self._flight:  # joining a running fetch is free
            decision = await self.limiter.hit(f"share:{caller.name}", share)
            if not decision.allowed:
                upstream = self.lane(query.provider)[0].name
                self.metrics.rejections.labels(caller.name, "upstream_share", upstream).inc()
                if on_failure(fallback, FailureKind.BUDGET)[0] is Action.STALE_ON_ERROR:
                    assert fallback is not None
                    return self._stale(fallback, now, "detail=upstream-share")
                return self._error(
                    429,
                    "upstream_share_exceeded",
                    f"Client {caller.name!r} has used its share of TeamUp calls; cached answers "
                    "are still served. Retry later.",
                    retry_after=decision.retry_after,
                )

        # Waiting on another replica's fetch, only an entry newer than what we found will do
        # (what we found may be past its stale window and still physically in Redis).
        newer_than = now if bypass else (cached.stored_at if cached is not None else None)
        # A caller with a stale copy never queues: it is answered now (below).
        turn = Turn(caller.name, caller.config.weight, wait=fallback is None, key=key)
        try:
            fetched, collapsed = await self._join(
                key,
                lambda: self._fetch_shared(key, query, request_id, newer_than, turn, wait=True),
                self.lane(query.provider)[0],
            )
        except UpstreamFailure as failure:
            if failure.kind in (FailureKind.BUDGET, FailureKind.CIRCUIT):
                upstream = self.lane(query.provider)[0].name
                self.metrics.rejections.labels(caller.name, failure.kind, upstream).inc()
            then, refresh = on_failure(fallback, failure.kind)
            if then is Action.STALE_ON_ERROR:
                assert fallback is not None
                reason = (
                    f"fwd-status={failure.upstream_status}"
                    if failure.upstream_status
                    else f"detail={failure.kind}"
                )
                answer = self._stale(fallback, self.clock(), reason)
                answer.upstream_status = failure.upstream_status
                if refresh:  # the refresh takes its turn in the queue
                    self._refresh_in_background(key, query, caller, request_id, fallback)
                return answer
            return self._failure(failure)
        return self._fetched(fetched, collapsed or fetched.collapsed, bypass)

    async def _join(
        self, key: str, work: Callable[[], Awaitable[Fetched]], guard: UpstreamGuard
    ) -> tuple[Fetched, bool]:
        """Run or join the fetch of `key`; when its last caller leaves while it still waits in
        the fair queue, it gives up its place (a fetch nobody awaits must not spend the budget)."""
        self._callers[key] = self._callers.get(key, 0) + 1
        try:
            while True:
                try:
                    return await self._flight.run(key, lambda: _unless_abandoned(work))
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # this caller hung up
                    # It joined a fetch whose callers had all just left: queue it again.
        finally:
            left = self._callers.pop(key) - 1
            if left:
                self._callers[key] = left
            else:
                guard.queue.abandon(key)

    async def close(self) -> None:
        """Let background refreshes finish briefly, then cancel what is left."""
        if self._background:
            _done, pending = await asyncio.wait(self._background, timeout=2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for guard in self.guards.values():
            await guard.queue.close()

    async def _fetch_shared(
        self,
        key: str,
        query: CanonicalQuery,
        request_id: str,
        newer_than: float | None,
        turn: Turn,
        *,
        wait: bool,
    ) -> Fetched:
        """Fetch under the cross-replica lease, or wait for the replica that holds it."""
        token = await self.leases.acquire(key)
        rounds = 0
        while token is None:
            if not wait:
                raise UpstreamFailure(
                    FailureKind.REFRESHING_ELSEWHERE, 503, "another replica is refreshing"
                )
            waited = await self.leases.wait_for_entry(key, self.store, newer_than)
            if isinstance(waited, Failed):
                # The holder's fetch failed: share its answer rather than repeat the call.
                raise UpstreamFailure.from_bytes(waited.payload)
            if isinstance(waited, CachedResponse):
                self._remember(key, waited, self.clock())
                return Fetched(waited, False, True, None, None)
            token = await self.leases.acquire(key)
            rounds += 1
            # The lease vanished with no entry (a FLUSHALL, a dead holder) and another waiter
            # took it over: wait on that one once more rather than fetch too. After a timeout,
            # or a second round, fetch anyway.
            if waited is not VANISHED or rounds >= 2:
                break
        if token is not None:
            # Looked up before another fetch of this key stored its entry and gave the lease
            # back (in this process or another): one more look before a second upstream call.
            found = await self._stored_since(key, newer_than)
            if found is not None:
                await self.leases.release(key, token)
                return Fetched(found, False, True, None, None)
        try:
            async with self.leases.kept(key, token):
                fetched = await self._fetch(key, query, request_id, turn)
        except UpstreamFailure as failure:
            if token is not None:
                await self.leases.release(key, token, failure.to_bytes())
            raise
        except BaseException:
            if token is not None:
                await self.leases.release(key, token)
            raise
        physical_ttl = fetched.physical
        if self._batched_writes and fetched.stored and token is not None:
            # Queued in this order in one loop turn, they go out as one pipeline, in order:
            # the entry is there before the waiters see the lease gone.
            await asyncio.gather(
                self.store.set(key, fetched.entry, physical_ttl),
                self.leases.release(key, token),
            )
        else:
            if fetched.stored:
                await self.store.set(key, fetched.entry, physical_ttl)
            if token is not None:
                await self.leases.release(key, token)
        if fetched.stored:
            self.metrics.cache_entry_bytes.observe(len(fetched.entry.body))
            self._remember(key, fetched.entry, self.clock())
        return fetched

    async def _fetch(self, key: str, query: CanonicalQuery, request_id: str, turn: Turn) -> Fetched:
        """One upstream call, once the circuit and the global budget allow it (stores nothing).

        Without a free unit the call waits its client's turn in the fair queue, or raises
        (circuit open, budget spent for longer than the queue waits)."""
        guard, upstream = self.lane(query.provider)
        slot = await guard.acquire_slot(turn)
        name, provider = guard.name, query.provider or upstream.sole or "none"
        self.metrics.budget_remaining.labels(name).set(slot.decision.remaining)
        operation = self.operations[query.operation]
        fmt = query.get("format")
        # A report without `format` is CSV; any other read without it is JSON (TeamUp's default).
        default_format = "csv" if operation.report is not None else "json"
        try:
            response = await upstream.fetch(
                operation.upstream_path(query.path),
                query.upstream_query(self.settings.upstream_array_style),
                fmt=fmt if isinstance(fmt, str) else default_format,
                request_id=request_id,
                provider=query.provider,
            )
        except UpstreamFailure as failure:
            self.metrics.upstream_requests.labels(
                operation.label, failure.kind, name, provider
            ).inc()
            if failure.elapsed is not None:
                self.metrics.upstream_seconds.labels(name).observe(failure.elapsed)
            raise
        self.metrics.upstream_requests.labels(
            operation.label, str(response.status), name, provider
        ).inc()
        self.metrics.upstream_seconds.labels(name).observe(response.elapsed)
        upstream_ms = response.elapsed * 1000
        if response.status == 429:
            wait = await guard.open_circuit(response.retry_after, raw=response.retry_after_raw)
            raise UpstreamFailure(
                FailureKind.RATE_LIMITED,
                503,
                "TeamUp is rate limiting the proxy; retry later",
                retry_after=wait,
                upstream_status=429,
                elapsed=response.elapsed,
            )
        if response.status in (401, 403):
            log.error(
                "TeamUp refused the proxy's credential; check PROXY_UPSTREAM_TOKEN / "
                "PROXY_UPSTREAMS",
                extra={
                    "event": "upstream_credential_refused",
                    "upstream_status": response.status,
                    "upstream": name,
                    "provider": provider,
                },
            )
            raise UpstreamFailure(
                FailureKind.CREDENTIAL,
                502,
                "TeamUp refused the proxy's credential. Operators: check PROXY_UPSTREAM_TOKEN "
                "(and PROXY_UPSTREAM_AUTH_SCHEME).",
                upstream_status=response.status,
                elapsed=response.elapsed,
            )
        if response.status >= 500:
            raise UpstreamFailure(
                FailureKind.UPSTREAM_ERROR,
                502,
                f"TeamUp answered {response.status}",
                upstream_status=response.status,
                elapsed=response.elapsed,
            )
        now = self.clock()
        headers = dict(response.headers)
        headers["Cache-Control"] = response.cache_control
        if response.set_cookie:
            headers["Set-Cookie"] = "1"
        keep = storable(
            response.status,
            headers,
            len(response.body),
            self.settings.cache_max_body_bytes,
            self.policies[query.operation],
        )
        # Rewritten once, here: every hit of the entry then serves links to the proxy as is.
        body = self.links.rewrite(response.body) if response.status == 200 else response.body
        entry = CachedResponse(
            response.status,
            response.headers,
            body,
            now,
            now + (keep.fresh if keep is not None else 0),
        )
        return Fetched(
            entry,
            keep is not None,
            False,
            response.status,
            upstream_ms,
            slot.queued_ms,
            keep.physical if keep is not None else 0,
        )

    def _refresh_in_background(
        self,
        key: str,
        query: CanonicalQuery,
        caller: Caller,
        request_id: str,
        stale: CachedResponse,
    ) -> None:
        if (
            key in self._flight
            or key in self._refreshing
            or self._refresh_after.get(key, 0.0) > self.clock()
        ):
            return
        task = asyncio.ensure_future(self._refresh(key, query, caller, request_id, stale))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh(
        self,
        key: str,
        query: CanonicalQuery,
        caller: Caller,
        request_id: str,
        stale: CachedResponse,
    ) -> None:
        share = caller.config.upstream_rate
        if (
            share is not None
            and not (await self.limiter.hit(f"share:{caller.name}", share)).allowed
        ):
            return
        # Not in `_flight`: a foreground request must never join a fetch that will not wait for
        # another replica. A foreground miss meanwhile waits on this refresh's lease instead.
        self._refreshing.add(key)
        try:
            turn = Turn(caller.name, caller.config.weight)
            await self._fetch_shared(key, query, request_id, stale.stored_at, turn, wait=False)
        except UpstreamFailure as failure:
            if failure.kind is not FailureKind.REFRESHING_ELSEWHERE:
                # While TeamUp fails, stale answers must not each cost a refresh attempt.
                wait = max(REFRESH_BACKOFF, failure.retry_after or 0.0)
                if len(self._refresh_after) > 10_000:
                    self._refresh_after.clear()
                self._refresh_after[key] = self.clock() + wait
            log.info(
                "background refresh skipped",
                extra={"event": "refresh_failed", "reason": failure.kind},
            )
        except Exception:
            log.exception("background refresh failed", extra={"event": "refresh_failed"})
        finally:
            self._refreshing.discard(key)

    async def _stored_since(self, key: str, newer_than: float | None) -> CachedResponse | None:
        """An entry for `key` stored after `newer_than` (any, when None) and not purged since."""
        entry = await self.store.get(key)
        if entry is None or (newer_than is not None and entry.stored_at <= newer_than):
            return None
        if self._forgotten_after(key, entry) or entry.fresh_until <= self.clock():
            return None
        self._remember(key, entry, self.clock())
        return entry

    def _remember(self, key: str, entry: CachedResponse, now: float) -> None:
        if self.l1 is not None and self.settings.cache_l1_ttl > 0:
            if self._forgotten_after(key, entry):
                return
            ttl = min(self.settings.cache_l1_ttl, entry.fresh_until - now)
            if ttl > 0:
                self.l1.set_now(key, entry, ttl)

    @staticmethod
    def _hit(entry: CachedResponse, now: float) -> Answer:
        headers = dict(entry.header_map)
        headers["Cache-Status"] = f"{CACHE_NAME}; hit; ttl={entry.ttl(now)}"
        headers["Age"] = str(entry.age(now))
        return Answer(entry.status, entry.body, headers, "hit")

    @staticmethod
    def _stale(entry: CachedResponse, now: float, reason: str | None) -> Answer:
        headers = dict(entry.header_map)
        status = f"{CACHE_NAME}; hit; fwd=stale; ttl={entry.ttl(now)}"
        headers["Cache-Status"] = f"{status}; {reason}" if reason else status
        headers["Age"] = str(entry.age(now))
        return Answer(entry.status, entry.body, headers, "stale")

    def _fetched(self, fetched: Fetched, collapsed: bool, bypass: bool) -> Answer:
        entry = fetched.entry
        parts = [CACHE_NAME, "fwd=request" if bypass else "fwd=uri-miss"]
        if fetched.upstream_status is not None:
            parts.append(f"fwd-status={fetched.upstream_status}")
        if fetched.stored:
            parts.append("stored")
        if collapsed:
            parts.append("collapsed")
        if fetched.queued_ms is not None:
            parts.append("detail=queued")
        headers = dict(entry.header_map)
        headers["Cache-Status"] = "; ".join(parts)
        if fetched.queued_ms is not None:
            headers["Server-Timing"] = f"queue;dur={fetched.queued_ms}"
        headers["Age"] = str(entry.age(self.clock()))
        outcome = "collapsed" if collapsed else ("bypass" if bypass else "miss")
        return Answer(
            entry.status,
            entry.body,
            headers,
            outcome,
            fetched.upstream_status,
            fetched.upstream_ms,
            fetched.queued_ms,
        )

    def _failure(self, failure: UpstreamFailure) -> Answer:
        code = failure.kind.code
        answer = self._error(failure.status, code, failure.message, failure.retry_after)
        answer.headers["Cache-Status"] = f"{CACHE_NAME}; fwd=uri-miss; detail={failure.kind}"
        answer.upstream_status = failure.upstream_status
        if failure.elapsed is not None:
            answer.upstream_ms = failure.elapsed * 1000
        return answer

    @staticmethod
    def _error(status: int, code: str, message: str, retry_after: float | None = None) -> Answer:
        headers = {"Content-Type": JSON}
        if retry_after is not None:
            headers["Retry-After"] = retry_after_header(retry_after)
        return Answer(status, error_body(status, code, message), headers, "error")
