"""The write handler: authenticate, authorise (`write` scopes), check the body (JSON, capped)
and the query, limit, then `WriteService`; one audit line and one metric per write."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time

import orjson
from aiohttp import web

from ..core.contract import MAX_QUERY_BYTES, PathValue, QueryErrors
from ..core.operations import Operation
from ..service import Caller
from ..writes import WriteAnswer, not_json
from .auth import presented_key
from .errors import error_response
from .handlers import LOG, REQUEST_ID, STATE, invalid_query, ratelimit_headers, resolve_tenant

__all__ = ["expect_continue", "write"]

audit = logging.getLogger("teamup_proxy.audit")
# The draft's sf-string (`"…"`, printable ASCII without `"` or `\`); a bare token is accepted
# too (what most clients send).
_KEY = re.compile(r'"([\x20\x21\x23-\x5b\x5d-\x7e]{1,255})"|([\x21\x23-\x7e]{1,255})')
_CHUNK = 64 * 1024


class _TooLarge(Exception):
    pass


async def _too_large(request: web.Request, limit: int) -> web.Response:
    """413, sent now; then the connection closes without reading the rest of the body."""
    response = error_response(
        413,
        "request_too_large",
        f"The request body is larger than {limit} bytes (PROXY_MAX_REQUEST_BODY_BYTES); "
        "it was not sent to TeamUp.",
        headers={
            "Connection": "close",
            "X-Request-ID": request[REQUEST_ID],
            "Server": "teamup-proxy",
        },
    )
    await response.prepare(request)
    await response.write_eof()
    # Written (the transport flushes it before closing); the rest of the body is never read.
    request.protocol.force_close()
    return response


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, read in chunks and abandoned as soon as it passes `limit` (chunked too)."""
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        parts.append(chunk)


def _refused_type(content_type: str) -> web.Response:
    return error_response(
        415,
        "unsupported_media_type",
        f"Writes take a JSON body (Content-Type: application/json), not {content_type[:60]!r}; "
        "it was not sent to TeamUp.",
    )


async def expect_continue(request: web.Request) -> None:
    """`Expect: 100-continue`: invite the body only when it could be taken (JSON, within the
    cap); else send nothing, and the handler's 413/415 is the final answer before any body."""
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=f"Unknown Expect: {request.headers['Expect']}")
    limit = request.app[STATE].settings.max_request_body_bytes
    declared = request.content_length
    if (declared is not None and declared > limit) or not_json(
        request.headers.get("Content-Type", "")
    ):
        return
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")


async def write(request: web.Request, operation: Operation, path: PathValue) -> web.Response:
    """One documented write (see the module docstring); never cached."""
    fields = request[LOG]
    fields["report"] = operation.label
    fields["route"] = "write"
    fields["cache"] = "write"
    started = time.perf_counter()
    client: str | None = None
    outcome = "refused"
    result: WriteAnswer | None = None
    status = 499  # the caller hung up before the answer
    try:
        response, client, result = await _write(request, operation, path)
        status = response.status
        if result is not None:
            outcome = result.outcome
        return response
    except asyncio.CancelledError:
        outcome = "gone"  # the caller hung up (sent or not: see WriteService.write)
        raise
    finally:
        state = request.app[STATE]
        known = fields.get("client")  # set as soon as the caller is identified
        client = client or (known if isinstance(known, str) else None)
        upstream_ms = result.answer.upstream_ms if result is not None else None
        state.service.metrics.writes.labels(client or "unknown", operation.label, outcome).inc()
        audit.info(
            "write",
            extra={
                "event": "write",
                "request_id": request[REQUEST_ID],
                "client": client,
                "upstream": fields.get("upstream"),
                "provider": fields.get("provider"),
                "method": request.method,
                "operation": operation.operation_id,
                "path": request.path,
                "status": status,
                "outcome": outcome,
                "upstream_status": result.answer.upstream_status if result else None,
                "upstream_ms": None if upstream_ms is None else round(upstream_ms, 2),
                "replayed": bool(result and result.replayed),
                "total_ms": round((time.perf_counter() - started) * 1000, 2),
            },
        )


async def _write(
    request: web.Request, operation: Operation, path: PathValue
) -> tuple[web.Response, str | None, WriteAnswer | None]:
    state = request.app[STATE]
    settings = state.settings
    fields = request[LOG]
    if len(request.rel_url.raw_query_string) > MAX_QUERY_BYTES:
        refused = error_response(
            414, "query_too_long", f"The query string is longer than {MAX_QUERY_BYTES} bytes."
        )
        return refused, None, None
    found = state.directory.identify(presented_key(request.headers))
    if found is None:
        refused = error_response(
            401,
            "not_authenticated",
            "Authentication credentials were not provided or are not valid. Send your proxy "
            "key as 'Authorization: Token <key>', 'Authorization: Bearer <key>' or 'X-API-Key'.",
            headers={"WWW-Authenticate": 'Token realm="teamup-proxy"'},
        )
        return refused, None, None
    caller = Caller(*found)
    fields["client"] = caller.name
    tenant = resolve_tenant(request, caller)
    if isinstance(tenant, web.Response):
        return tenant, caller.name, None
    exported = operation.exported_report
    if not caller.config.may_write(operation.segment) or (
        exported is not None and not caller.config.may_read("reports", exported)
    ):
        refused = error_response(
            403,
            "permission_denied",
            f"Client {caller.name!r} may not write /api/v2/{operation.segment}"
            + (f" (export the {exported} report)" if exported else "")
            + ". Operators: see `write` (no writes unless listed) and `reports` in PROXY_CLIENTS.",
        )
        return refused, caller.name, None
    limit = settings.max_request_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit:
        return await _too_large(request, limit), caller.name, None
    # Only a body must be JSON: an empty one (a DELETE, an action) goes without a type.
    content_type = request.headers.get("Content-Type", "")
    if content_type and not_json(content_type) and declared != 0:
        return _refused_type(content_type), caller.name, None
    try:
        body = await _read_body(request, limit)
    except _TooLarge:
        return await _too_large(request, limit), caller.name, None
    if not body:
        content_type = ""
    elif not content_type or not_json(content_type):
        return _refused_type(content_type or "no Content-Type"), caller.name, None
    if body:
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            refused = error_response(
                400,
                "parse_error",
                "The request body is not valid JSON; it was not sent to TeamUp.",
            )
            return refused, caller.name, None
    token: str | None = None
    raw_key = request.headers.get("Idempotency-Key")
    if raw_key is not None:
        matched = _KEY.fullmatch(raw_key.strip())
        if matched is None:
            refused = error_response(
                400,
                "idempotency_key_invalid",
                'Idempotency-Key must be a string of 1 to 255 printable characters ("…").',
            )
            return refused, caller.name, None
        token = matched[1] or matched[2]
    parsed = operation.contract.parse(request.query, path)
    if isinstance(parsed, QueryErrors):
        return invalid_query(parsed), caller.name, None
    if tenant.key is not None:
        parsed = dataclasses.replace(parsed, provider=tenant.key)
    service = state.service
    rate = caller.config.rate or settings.rate_limit
    decision = await service.client_limiter.hit(f"client:{caller.name}", rate)
    if not decision.allowed:
        service.metrics.rejections.labels(caller.name, "client", tenant.upstream.name).inc()
        refused = error_response(
            429,
            "rate_limited",
            f"Client {caller.name!r} is over its rate of {rate}. The write was NOT sent; "
            "retry later.",
            headers={
                "Retry-After": decision.retry_after_header,
                **ratelimit_headers(rate, decision),
            },
        )
        return refused, caller.name, None
    assert state.writes is not None
    result = await state.writes.write(
        caller, operation, parsed, body, content_type, request[REQUEST_ID], token
    )
    answer = result.answer
    fields["upstream_status"] = answer.upstream_status
    fields["upstream_ms"] = None if answer.upstream_ms is None else round(answer.upstream_ms, 2)
    fields["cache"] = "replayed" if result.replayed else "write"
    headers = dict(answer.headers)
    headers.update(ratelimit_headers(rate, decision))
    headers["Cache-Status"] = "teamup-proxy; fwd=method" if result.sent else "teamup-proxy"
    headers["X-Proxy-Operation"] = operation.operation_id
    response = web.Response(status=answer.status, body=answer.body or None, headers=headers)
    return response, caller.name, result
