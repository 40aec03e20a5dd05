"""The write driver: idempotency → budget (the fair queue) → send once → invalidate → answer.

A write is never cached, never coalesced with another and never resent by the proxy. What
the caller learns always says whether TeamUp may have done it: `not sent` (the proxy refused,
the budget or the circuit held it back, the connect failed), TeamUp's answer, or
`upstream_outcome_unknown` (sent, and the connection broke or timed out before an answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from .backends import keys
from .backends.generations import Generations
from .backends.idempotency import Claimed, Held, IdempotencyStore, Stored
from .core.contract import CanonicalQuery
from .core.errors import JSON, error_body
from .core.failures import FailureKind, UpstreamFailure
from .core.links import LinkRewriter
from .core.operations import Operation, Operations
from .metrics import Metrics
from .service import Answer, Caller, retry_after_header
from .settings import Settings
from .upstream.client import UpstreamClient, UpstreamResponse
from .upstream.guard import UpstreamGuard
from .upstream.queue import Turn

__all__ = ["WriteAnswer", "WriteService", "fingerprint", "not_json"]

log = logging.getLogger("teamup_proxy")
# Failures after which TeamUp may have done the write: its reads are invalidated all the same.
_MAYBE_DONE = (FailureKind.OUTCOME_UNKNOWN, FailureKind.TOO_LARGE, FailureKind.INVALID_RESPONSE)
_NOT_SENT = (FailureKind.BUDGET, FailureKind.CIRCUIT, FailureKind.UNREACHABLE)


@dataclass(slots=True)
class WriteAnswer:
    """The answer, and what the audit line and the metric record about it."""

    answer: Answer
    outcome: str  # 2xx/4xx/5xx, outcome_unknown, not_sent, replayed, conflict, mismatch
    sent: bool
    replayed: bool = False


def fingerprint(operation: Operation, query: CanonicalQuery, content_type: str, body: bytes) -> str:
    """What makes two requests with one Idempotency-Key the same request."""
    digest = hashlib.sha256()
    for part in (
        operation.operation_id,
        query.canonical_string(),
        repr(query.path),
        content_type,
        query.provider or "",
    ):
        digest.update(part.encode())
        digest.update(b"\0")
    digest.update(body)
    return digest.hexdigest()


def _error(status: int, code: str, message: str, retry_after: float | None = None) -> Answer:
    headers = {"Content-Type": JSON}
    if retry_after is not None:
        headers["Retry-After"] = retry_after_header(retry_after)
    return Answer(status, error_body(status, code, message), headers, "write")


class WriteService:
    """Sends writes to TeamUp exactly once (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        guard: UpstreamGuard,
        upstream: UpstreamClient,
        generations: Generations,
        idempotency: IdempotencyStore,
        metrics: Metrics,
        operations: Operations | None = None,
        lane: Callable[[str | None], tuple[UpstreamGuard, UpstreamClient]] | None = None,
    ) -> None:
        self.settings = settings
        self.operations = operations or Operations({})  # the routed writes
        self.guard = guard
        self.upstream = upstream
        # The guard and client of the credential serving a provider (ReadService.lane).
        self.lane = lane or self._only_lane
        self.generations = generations
        self.idempotency = idempotency
        self.metrics = metrics
        self.links = LinkRewriter(settings.upstream_url, settings.public_url)
        self._running: set[asyncio.Task[WriteAnswer]] = set()

    def _only_lane(self, provider: str | None) -> tuple[UpstreamGuard, UpstreamClient]:
        """Without a lane given: the one credential, and never for another's provider."""
        served = self.settings.upstream_of.get(provider) if provider is not None else None
        if served is not None and served.name != self.guard.name:
            raise LookupError(f"no lane for upstream {served.name!r}")
        return self.guard, self.upstream

    async def write(
        self,
        caller: Caller,
        operation: Operation,
        query: CanonicalQuery,
        body: bytes,
        content_type: str,
        request_id: str,
        token: str | None,
    ) -> WriteAnswer:
        """One write. Once it is being sent it runs to its end even if the caller hangs up: a
        write that reached TeamUp must have its answer kept (for a retry with its key) and its
        reads invalidated. One whose caller hung up while it still waited its turn for the
        budget is dropped, never sent (the caller saw no answer and may retry)."""
        sending = asyncio.Event()
        task = asyncio.ensure_future(
            self._write(caller, operation, query, body, content_type, request_id, token, sending)
        )
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not sending.is_set():
                task.cancel()
            raise

    async def close(self) -> None:
        """Let writes in flight finish (their callers may have gone; TeamUp has not)."""
        if self._running:
            await asyncio.wait(self._running, timeout=self.settings.upstream_timeout + 1)

    async def _write(
        self,
        caller: Caller,
        operation: Operation,
        query: CanonicalQuery,
        body: bytes,
        content_type: str,
        request_id: str,
        token: str | None,
        sending: asyncio.Event,
    ) -> WriteAnswer:
        claimed: Claimed | None = None
        if token is not None:
            print_ = fingerprint(operation, query, content_type, body)
            found = await self.idempotency.claim(caller.name, token, print_, query.provider)
            if isinstance(found, Stored):
                if found.fingerprint != print_:
                    return self._mismatch()
                headers = dict(found.headers)
                headers["Idempotent-Replayed"] = "true"
                replay = Answer(found.status, found.body, headers, "replayed")
                return WriteAnswer(replay, "replayed", False, replayed=True)
            if isinstance(found, Held):
                if found.fingerprint != print_:
                    return self._mismatch()
                since = found.since
                if since is not None and time.time() - since > self.idempotency.flight:
                    # Its proxy died while sending it: done or not, nobody knows; never again.
                    unknown = _error(
                        502,
                        FailureKind.OUTCOME_UNKNOWN.code,
                        "A request with this Idempotency-Key was being sent to TeamUp when its "
                        "proxy stopped: it may or may not have been done. It is not sent again; "
                        "check before retrying with a new key.",
                    )
                    return WriteAnswer(unknown, "outcome_unknown", False, replayed=True)
                conflict = _error(
                    409,
                    "idempotency_key_in_use",
                    "A request with this Idempotency-Key is still being processed; retry after "
                    "it has been answered.",
                )
                return WriteAnswer(conflict, "conflict", False)
            claimed = found
        try:
            result = await self._send(
                caller, operation, query, body, content_type, request_id, sending, claimed
            )
        except BaseException:
            # Not sent: the key is free again. Sent (a bug past that point): its "sending" mark
            # stays, and a repeat learns the outcome is unknown.
            if claimed is not None and not sending.is_set():
                await self.idempotency.release(claimed)
            raise
        if claimed is not None:
            if result.sent:
                answer = result.answer
                kept = tuple(
                    (k, v) for k, v in answer.headers.items() if k.lower() != "retry-after"
                )
                await self.idempotency.finish(
                    claimed, Stored(claimed.fingerprint, answer.status, kept, answer.body)
                )
            else:
                await self.idempotency.release(claimed)
        return result

    @staticmethod
    def _mismatch() -> WriteAnswer:
        answer = _error(
            422,
            "idempotency_key_reused",
            "This Idempotency-Key was used for another request (another body, path or query). "
            "Use a new key for a new request.",
        )
        return WriteAnswer(answer, "mismatch", False)

    async def _send(
        self,
        caller: Caller,
        operation: Operation,
        query: CanonicalQuery,
        body: bytes,
        content_type: str,
        request_id: str,
        sending: asyncio.Event,
        claimed: Claimed | None,
    ) -> WriteAnswer:
        fmt = query.get("format")
        fmt_name = fmt if isinstance(fmt, str) else "json"
        guard, upstream = self.lane(query.provider)
        labels = (guard.name, query.provider or upstream.sole or "none")
        try:
            # The write waits its client's turn for a unit of its credential's budget, like a
            # miss.
            await guard.acquire_slot(Turn(caller.name, caller.config.weight))
            sending.set()  # from here on it runs to its end, caller or not
            if claimed is not None:
                await self.idempotency.sending(claimed)
            response = await upstream.send(
                operation.method,
                operation.upstream_path(query.path),
                query.upstream_query(self.settings.upstream_array_style),
                body,
                content_type=content_type or None,
                fmt=fmt_name,
                request_id=request_id,
                provider=query.provider,
            )
        except UpstreamFailure as failure:
            return await self._failed(operation, failure, query.provider, labels)
        self.metrics.upstream_requests.labels(operation.label, str(response.status), *labels).inc()
        self.metrics.write_seconds.observe(response.elapsed)
        return await self._answered(operation, response, guard, query.provider)

    async def _failed(
        self,
        operation: Operation,
        failure: UpstreamFailure,
        provider: str | None,
        labels: tuple[str, str],
    ) -> WriteAnswer:
        self.metrics.upstream_requests.labels(operation.label, failure.kind, *labels).inc()
        if failure.kind in _NOT_SENT:
            message = f"The write was NOT sent to TeamUp: {failure.message}"
            if not message.endswith("."):
                message += "."
            if failure.kind is not FailureKind.UNREACHABLE:
                message += " Retry later."
            answer = _error(failure.status, failure.kind.code, message, failure.retry_after)
            return WriteAnswer(answer, "not_sent", False)
        if failure.kind in _MAYBE_DONE:
            await self._invalidate(operation, provider)
        message = failure.message
        if failure.kind in (FailureKind.TOO_LARGE, FailureKind.INVALID_RESPONSE):
            message += ". The write was sent: it may have been done; it is not resent."
        answer = _error(failure.status, failure.kind.code, message, failure.retry_after)
        if failure.elapsed is not None:
            answer.upstream_ms = failure.elapsed * 1000
        outcome = "outcome_unknown" if failure.kind is FailureKind.OUTCOME_UNKNOWN else "invalid"
        return WriteAnswer(answer, outcome, True)

    async def _answered(
        self,
        operation: Operation,
        response: UpstreamResponse,
        guard: UpstreamGuard,
        provider: str | None,
    ) -> WriteAnswer:
        status = response.status
        upstream_ms = response.elapsed * 1000
        if status == 429:
            wait = await guard.open_circuit(response.retry_after, raw=response.retry_after_raw)
            answer = _error(
                503,
                "upstream_rate_limited",
                "TeamUp refused the write (429, rate limited): it was not done. Retry later.",
                wait,
            )
            answer.upstream_status, answer.upstream_ms = status, upstream_ms
            return WriteAnswer(answer, "not_sent", False)
        if status in (401, 403):
            log.error(
                "TeamUp refused the proxy's credential; check PROXY_UPSTREAM_TOKEN",
                extra={
                    "event": "upstream_credential_refused",
                    "upstream_status": status,
                    "upstream": guard.name,
                },
            )
            answer = _error(
                502,
                "upstream_credential_rejected",
                "TeamUp refused the proxy's credential; the write was not done. Operators: "
                "check PROXY_UPSTREAM_TOKEN.",
            )
            answer.upstream_status, answer.upstream_ms = status, upstream_ms
            return WriteAnswer(answer, "not_sent", False)
        if status >= 500:
            answer = _error(
                502,
                "upstream_error",
                f"TeamUp answered the write with {status}. The proxy does not resend it; "
                "check whether it was done before retrying.",
            )
            answer.upstream_status, answer.upstream_ms = status, upstream_ms
            return WriteAnswer(answer, "5xx", True)
        if 200 <= status <= 299:
            await self._invalidate(operation, provider)
        body = self.links.rewrite(response.body) if status < 300 else response.body
        headers = dict(response.headers)
        if "Location" in headers:  # a created object's URL points at the proxy, as links do
            headers["Location"] = self.links.rewrite(headers["Location"].encode()).decode()
        if body and "Content-Type" not in headers:
            headers["Content-Type"] = JSON
        answer = Answer(status, body, headers, "write", status, upstream_ms)
        return WriteAnswer(answer, f"{status // 100}xx", True)

    async def _invalidate(self, operation: Operation, provider: str | None = None) -> None:
        """Bump the write's collections (the provider's own: another provider's reads stay),
        then wait until no worker can use a view from before."""
        if not operation.invalidates:
            return
        await self.generations.bump(
            tuple(keys.collection(name, provider) for name in operation.invalidates)
        )
        await self.generations.settle()


def not_json(content_type: str) -> bool:
    """Whether a request's Content-Type is not JSON (`application/json`, `…+json`)."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        return False
    return not (media.startswith("application/") and media.endswith("+json"))
