"""The hot hit: a fresh L1 entry for a question asked before, with a reserved unit at hand.

`HotHits.answer` gives the same answer as the general read path (`handlers._read`) —
status, body, every header, the access-log fields and the metrics — without repeating per
request what only changes per question or per second: who a presented key belongs to, the
parsed query, the cache key, the static headers, and the `Cache-Status`/`Age` pair (which
changes once a second). Freshness is `core.decision.on_lookup`'s, the general path's own: only
its `HIT` is answered here. Anything else — an unknown question, a `Cache-Control` request
header, an L1 miss, no reserved unit — returns None, and the general path answers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from ..core.contract import MAX_QUERY_BYTES, CanonicalQuery, PathValue
from ..core.decision import Action, Policy, on_lookup
from ..core.entry import CachedResponse
from ..core.gcra import Rate
from ..core.operations import Operation
from ..logs import ACCESS, ACCESS_MIDDLE, json_bytes
from ..service import CACHE_NAME, ReadService
from ..settings import Settings, Tenant
from .auth import ClientDirectory, presented_key
from .sending import Sending, paced_response

if TYPE_CHECKING:
    from multidict import CIMultiDictProxy

    from .handlers import ParsedQueries

__all__ = ["HotHits"]

# Questions remembered per process; past that the memo starts again (hot sets are small).
_MAX_QUESTIONS = 4096


@dataclass(slots=True)
class _Question:
    """One (operation, path, raw query, presented key) already answered once by the general
    path."""

    client: str
    upstream: str  # the credential and provider it is for (metrics, the access log)
    provider: str
    rate: Rate
    limit_key: str
    cache_key: str  # under `generation` of `collection`
    collection: str
    generation: int
    report: str  # the operation's label (metrics and the access log)
    route: str
    operation: str
    report_name: str | None
    cache_policy: Policy
    # The headers every answer to it carries, in the general path's order, minus the ones
    # that change per second (`Cache-Status`, `Age`) or per request (`RateLimit`).
    policy: str
    canonical: str
    canonical_query: CanonicalQuery
    # The entry these headers were built for, and until when their `Cache-Status: ttl=` and
    # `Age` stay what they say.
    log_path: str = ""
    log_middle: bytes = b""
    # (stored_at, fresh_until) of the entry they were made for: not the entry itself, which
    # this memo would otherwise keep alive (a body each) long after the L1 let it go.
    made_for: tuple[float, float] = (0.0, 0.0)
    until: float = 0.0
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)


def _middle(question: _Question, path: str) -> bytes:
    """The access-log fields of a hot hit between `request_id` and `total_ms`, as JSON."""
    fields = {
        "client": question.client,
        "upstream": question.upstream,
        "provider": question.provider,
        "method": "GET",
        "path": path,
        "report": question.report,
        "key": question.cache_key,
        "cache": "hit",
        "upstream_status": None,
        "upstream_ms": None,
        "queued_ms": None,
    }
    return json_bytes(fields)[1:-1]


class HotHits:
    """Hot hits answered from memory: see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        directory: ClientDirectory,
        service: ReadService,
        queries: ParsedQueries,
        sending: Sending,
    ) -> None:
        self.settings = settings
        self.sending = sending
        self.directory = directory
        self.service = service
        self.queries = queries
        self._questions: dict[tuple[str, PathValue, str, str, str | None], _Question] = {}

    def answer(
        self,
        request: web.Request,
        operation: Operation,
        path: PathValue,
        fields: dict[str, object],
        request_id: str,
    ) -> web.Response | None:
        """The response to a hot hit, or None when the general path must answer."""
        service = self.service
        l1 = service.l1
        if l1 is None:
            return None
        headers: CIMultiDictProxy[str] = request.headers
        if "Cache-Control" in headers:
            return None  # `no-cache` may mean a refetch: the general path decides
        raw = request.rel_url.raw_query_string
        # Remembered as `presented_key` reads it: `Authorization` whenever it is there (even
        # empty or without a scheme), else `X-API-Key`; the header's name is part of the memo,
        # so `X-API-Key: Token <key>` is never taken for `Authorization: Token <key>`.
        authorization = headers.get("Authorization")
        if authorization is not None:
            credential = "Authorization:" + authorization
        else:
            credential = "X-API-Key:" + headers.get("X-API-Key", "")
        # The provider header as sent: another spelling is another question (learned once).
        provider = headers.get("TeamUp-Provider-ID")
        memo = (operation.operation_id, path, raw, credential, provider)
        question = self._questions.get(memo)
        if question is None:
            question = self._learn(operation, path, raw, credential, provider, request)
            if question is None:
                return None
        # The generation view may be used only for a short while after it was read (see
        # backends/generations.py): past that, the general path reads it again.
        generation = service.generations.now(question.collection)
        if generation is None:
            return None
        if generation != question.generation:
            question.generation = generation
            question.cache_key = service.key_of(question.canonical_query, generation)
            question.log_path = ""  # the access line names the key
        entry = l1.get_now(question.cache_key)
        now = service.clock()
        if on_lookup(entry, now, question.cache_policy) is not Action.HIT:
            return None
        assert entry is not None
        spent = service.client_limiter.spend(question.limit_key, question.rate)
        if spent is None:
            return None
        if question.made_for != (entry.stored_at, entry.fresh_until) or now >= question.until:
            self._rebuild(question, entry, now)
        out = question.headers.copy()
        out["RateLimit"] = f'"client";r={spent[0]};t={math.ceil(spent[1])}'
        fields["report"] = question.report
        fields["route"] = question.route
        fields["client"] = question.client
        fields["upstream"] = question.upstream
        fields["provider"] = question.provider
        fields["cache"] = "hit"
        fields["key"] = question.cache_key
        fields["upstream_status"] = None
        fields["upstream_ms"] = None
        fields["queued_ms"] = None
        if ACCESS.handler is not None:  # the access line's fields, as JSON, once per path
            shown = request.path
            if question.log_path != shown:
                question.log_path, question.log_middle = shown, _middle(question, shown)
            fields[ACCESS_MIDDLE] = question.log_middle
        service.metrics.count_client(
            question.client, question.report, question.upstream, question.provider
        )
        return paced_response(
            request,
            status=entry.status,
            body=entry.body,
            headers=out,
            sending=self.sending,
            request_id=request_id,
        )

    def _learn(
        self,
        operation: Operation,
        path: PathValue,
        raw: str,
        credential: str,
        provider: str | None,
        request: web.Request,
    ) -> _Question | None:
        """What the general path would work out for this question, if it can be a hot hit."""
        if len(raw) > MAX_QUERY_BYTES:
            return None
        found = self.directory.identify(presented_key(request.headers))
        if found is None:
            return None  # unknown keys are never remembered
        name, config = found
        if not config.may_read(operation.segment, operation.report):
            return None
        tenant = self.settings.tenant(name, config, provider)
        if not isinstance(tenant, Tenant):
            return None  # the general path answers the refusal
        parsed, canonical = self.queries.parse(operation, path, request)  # the general path's
        if not isinstance(parsed, CanonicalQuery):
            return None
        if tenant.key is not None:
            parsed = dataclasses.replace(parsed, provider=tenant.key)
        rate = config.rate or self.settings.rate_limit
        collection = self.service.collection(parsed)
        if len(self._questions) >= _MAX_QUESTIONS:
            self._questions.clear()
        question = _Question(
            client=name,
            upstream=tenant.labels[0],
            provider=tenant.labels[1],
            rate=rate,
            limit_key=f"client:{name}",
            cache_key=self.service.key(parsed),
            collection=collection,
            generation=self.service.generations.last(collection),
            canonical_query=parsed,
            report=operation.label,
            route="report" if operation.report is not None else "read",
            operation=operation.operation_id,
            report_name=operation.report,
            cache_policy=self.service.policies[operation.operation_id],
            policy=f'"client";q={rate.limit};w={math.ceil(rate.period)}',
            canonical=canonical,
        )
        self._questions[(operation.operation_id, path, raw, credential, provider)] = question
        return question

    @staticmethod
    def _rebuild(question: _Question, entry: CachedResponse, now: float) -> None:
        """The headers as `ReadService._hit` writes them now, and how long they hold."""
        ttl, age = entry.ttl(now), entry.age(now)
        headers: CIMultiDict[str] = CIMultiDict(entry.header_map)
        headers["Cache-Status"] = f"{CACHE_NAME}; hit; ttl={ttl}"
        headers["Age"] = str(age)
        headers["RateLimit-Policy"] = question.policy
        headers["X-Proxy-Canonical-Query"] = question.canonical
        headers["X-Proxy-Operation"] = question.operation
        if question.report_name is not None:
            headers["X-Proxy-Report"] = question.report_name
        question.headers, question.made_for = headers, (entry.stored_at, entry.fresh_until)
        # ttl = floor(fresh_until - now) drops when fewer than `ttl` seconds are left;
        # age = int(now - stored_at) grows at the next whole second after stored_at.
        question.until = min(entry.fresh_until - ttl, entry.stored_at + age + 1)

    def forget(self) -> None:
        """Drop every remembered question (the invalidation channel was lost)."""
        self._questions.clear()
