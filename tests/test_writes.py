"""Writes through the proxy, in process against the mock TeamUp and a real redis-server:
routing, `write` scopes, body and query checks, sent once, Idempotency-Key, invalidation,
the budget, the audit line and the metric."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict

from proxy.backends import keys
from proxy.core.contract import CanonicalQuery
from proxy.core.operations import Operation, load_operations
from proxy.settings import ClientConfig
from proxy.testing.e2e import KEY, OTHER_KEY, auth
from proxy.testing.mock import MockState
from proxy.testing.support import RedisServer
from proxy.testing.writes import MOCK_WRITES, MockWrites, WriteFaults
from proxy.web.auth import hash_key
from proxy.web.handlers import STATE
from proxy.writes import fingerprint
from tests.conftest import LogLines, MakeProxy
from tests.test_caching import eventually

Proxy = TestClient[web.Request, web.Application]
CUSTOMER = "/api/v2/customers/377001"
CUSTOMERS = "/api/v2/customers"


def clients(
    billing_write: list[str] | None = None,
    crm_write: list[str] | None = None,
    rate: str = "1000/minute",
) -> Any:
    """billing may write what it is given (default customers and events), crm nothing."""
    return {
        "billing": {
            "key_sha256": hash_key(KEY),
            "rate": rate,
            "write": ["customers", "events"] if billing_write is None else billing_write,
        },
        "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "1000/minute", "write": crm_write or []},
    }


@pytest.fixture
def mock_writes(mock_server: TestServer) -> MockWrites:
    return mock_server.app[MOCK_WRITES]


@pytest.fixture
async def proxy(make_proxy: MakeProxy, redis_url: str) -> Proxy:
    return await make_proxy(redis_url=redis_url, clients=clients(), cache_l1_ttl=1.0)


def sent(mock_writes: MockWrites, operation: str | None = None) -> int:
    return sum(1 for w in mock_writes.received if operation in (None, w.operation))


async def patch(
    proxy: Proxy, body: bytes = b'{"first_name": "Zed"}', headers: dict[str, str] | None = None
) -> Any:
    response = await proxy.patch(
        CUSTOMER,
        data=body,
        headers={**auth(), "Content-Type": "application/json", **(headers or {})},
    )
    await response.read()
    return response


def example_path(op: Operation) -> str:
    """The operation's path with a valid value for each path parameter."""
    values = {}
    for param in op.contract.path_params:
        if param.kind == "int":
            values[param.name] = "1"
        elif param.kind == "enum":
            values[param.name] = param.choices[0]
        else:
            values[param.name] = next(v for v in ("abc", "1", "a-1") if param.parse(v) is not None)
    return op.path.format(**values)


async def test_every_documented_write_is_routed_to_its_operation(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites
) -> None:
    proxy = await make_proxy(redis_url=redis_url, clients=clients(billing_write=["*"]))
    writes = [op for op in load_operations().values() if not op.is_read and op.area != "auth"]
    assert len(writes) == 187
    for op in writes:
        body = b"" if op.method == "DELETE" else b"{}"
        headers = {**auth(), "Content-Type": "application/json"} if body else auth()
        response = await proxy.request(op.method, example_path(op), data=body, headers=headers)
        text = await response.text()
        assert response.status not in (405, 413, 415), (op.operation_id, response.status, text)
        assert response.headers.get("X-Proxy-Operation") == op.operation_id, (
            op,
            response.status,
            text,
        )
        received = mock_writes.received[-1]
        assert received.operation == op.operation_id
        # Only the caller's Content-Type reaches TeamUp, and only with a body.
        given = {k.lower(): v for k, v in received.headers.items()}
        assert given.get("content-type") == ("application/json" if body else None)
    assert sent(mock_writes) == len(writes)


async def test_a_write_is_allowed_to_one_client_and_refused_to_another(
    proxy: Proxy, mock_writes: MockWrites
) -> None:
    allowed = await patch(proxy)
    assert allowed.status == 200, await allowed.text()
    assert (await allowed.json())["first_name"] == "Zed"
    assert allowed.headers["X-Proxy-Operation"] == "customers_partial_update"
    refused = await patch(proxy, headers=auth(OTHER_KEY))
    assert refused.status == 403
    body = await refused.json()
    assert body["code"] == "permission_denied" and "write" in body["message"]
    assert sent(mock_writes) == 1


async def test_undocumented_method_is_405_and_nothing_is_sent(
    proxy: Proxy, mock_writes: MockWrites
) -> None:
    response = await proxy.delete(CUSTOMERS, headers=auth())
    assert response.status == 405
    assert "POST" in response.headers["Allow"]
    assert sent(mock_writes) == 0


async def test_the_body_is_forwarded_byte_for_byte_with_only_content_type(
    proxy: Proxy, mock_writes: MockWrites
) -> None:
    body = b'{ "first_name" :  "Zo\\u00eb",\n "x": [1,2] }'
    response = await patch(proxy, body, {"X-Custom": "nope", "Cookie": "a=b"})
    assert response.status == 200
    (received,) = mock_writes.received
    assert received.body.encode("latin-1") == body
    headers = {k.lower(): v for k, v in received.headers.items()}
    assert "x-custom" not in headers and "cookie" not in headers
    assert headers["content-type"] == "application/json"
    assert headers["authorization"] != auth()["Authorization"]


async def raw_exchange(proxy: Proxy, head: str, body: bytes = b"") -> bytes:
    """Send a request head and (part of) a body over one socket, send nothing more, and read
    the proxy's answer. (Data the proxy never reads would make its close a reset, which can
    destroy the answer in flight: what `Expect: 100-continue` is for.)"""
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(head.encode() + body)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(4096), 5)
    writer.close()
    return answer


def head(method: str, path: str, extra: str) -> str:
    return (
        f"{method} {path} HTTP/1.1\r\nHost: proxy\r\nAuthorization: Token {KEY}\r\n"
        f"Content-Type: application/json\r\n{extra}\r\n"
    )


async def test_not_json_and_too_large_never_reach_teamup(
    proxy: Proxy, mock_writes: MockWrites
) -> None:
    text = await proxy.patch(
        CUSTOMER, data=b"first_name=Zed", headers={**auth(), "Content-Type": "text/plain"}
    )
    assert text.status == 415
    assert (await text.json())["code"] == "unsupported_media_type"
    invalid = await patch(proxy, b"{not json")
    assert invalid.status == 400
    two_mib = 2 * 1024 * 1024
    # Refused on its Content-Length alone.
    declared = await raw_exchange(proxy, head("PATCH", CUSTOMER, f"Content-Length: {two_mib}\r\n"))
    assert declared.startswith(b"HTTP/1.1 413 ")
    # With `Expect: 100-continue` the body is never invited.
    expect = await raw_exchange(
        proxy,
        head("PATCH", CUSTOMER, f"Content-Length: {two_mib}\r\nExpect: 100-continue\r\n"),
    )
    assert expect.startswith(b"HTTP/1.1 413 ")
    assert sent(mock_writes) == 0


async def test_a_chunked_body_past_the_cap_is_refused(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites
) -> None:
    proxy = await make_proxy(redis_url=redis_url, clients=clients(), max_request_body_bytes=1000)
    chunk = b"x" * 400
    # Three chunks (1200 bytes) and no end: refused once past the cap, the rest never awaited.
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(3))
    answer = await raw_exchange(
        proxy, head("PATCH", CUSTOMER, "Transfer-Encoding: chunked\r\n"), framed
    )
    assert answer.startswith(b"HTTP/1.1 413 ")
    # Within the cap, the same framing is a write.
    small = b'b\r\n{"a": "bc"}\r\n0\r\n\r\n'
    ok = await raw_exchange(proxy, head("PATCH", CUSTOMER, "Transfer-Encoding: chunked\r\n"), small)
    assert ok.startswith(b"HTTP/1.1 200 ")
    assert sent(mock_writes) == 1


async def test_the_query_is_validated_like_a_read(proxy: Proxy, mock_writes: MockWrites) -> None:
    response = await proxy.patch(
        CUSTOMER + "?nope=1",
        data=b"{}",
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert "nope" in (await response.json())["field_errors"]
    bad_id = await proxy.patch(
        "/api/v2/customers/abc", data=b"{}", headers={**auth(), "Content-Type": "application/json"}
    )
    assert bad_id.status == 404
    assert sent(mock_writes) == 0


@pytest.mark.parametrize("fault", [{"status": 500}, {"drop": True}])
@pytest.mark.parametrize("when", ["before", "after"])
async def test_a_failed_write_reaches_teamup_exactly_once(
    proxy: Proxy, mock_writes: MockWrites, fault: dict[str, Any], when: str
) -> None:
    mock_writes.faults = WriteFaults(when=when, times=1, **fault)
    response = await patch(proxy)
    assert response.status == 502
    code = (await response.json())["code"]
    assert code == ("upstream_error" if "status" in fault else "upstream_outcome_unknown")
    assert sent(mock_writes) == 1


async def test_a_write_teamup_rate_limits_is_not_retried(
    proxy: Proxy, mock_writes: MockWrites, mock_state: MockState
) -> None:
    mock_writes.faults = WriteFaults(status=429, times=1)
    response = await patch(proxy)
    assert response.status == 503
    assert "not done" in (await response.json())["message"]
    assert sent(mock_writes) == 1


async def test_same_idempotency_key_is_sent_once_and_answered_the_same(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites
) -> None:
    proxy = await make_proxy(redis_url=redis_url, clients=clients(crm_write=["customers"]))
    first = await patch(proxy, headers={"Idempotency-Key": '"booking-1"'})
    second = await patch(proxy, headers={"Idempotency-Key": '"booking-1"'})
    assert first.status == second.status == 200
    assert await first.read() == await second.read()
    assert "Idempotent-Replayed" not in first.headers
    assert second.headers["Idempotent-Replayed"] == "true"
    assert sent(mock_writes) == 1
    other = await patch(
        proxy, b'{"first_name": "Other"}', headers={"Idempotency-Key": '"booking-1"'}
    )
    assert other.status == 422
    assert sent(mock_writes) == 1
    # Another client's key of the same name is its own.
    crm = await patch(proxy, headers={**auth(OTHER_KEY), "Idempotency-Key": '"booking-1"'})
    assert crm.status == 200 and "Idempotent-Replayed" not in crm.headers
    assert sent(mock_writes) == 2
    # A malformed key is refused before anything else.
    bad = await patch(proxy, headers={"Idempotency-Key": '"unterminated'})
    assert bad.status == 400 and (await bad.json())["code"] == "idempotency_key_invalid"
    assert sent(mock_writes) == 2


async def test_a_repeat_while_the_first_is_in_flight_is_409(
    proxy: Proxy, mock_writes: MockWrites, mock_state: MockState
) -> None:
    mock_state.faults.latency = 0.5
    first = asyncio.ensure_future(patch(proxy, headers={"Idempotency-Key": "k-409"}))
    await eventually(lambda: asyncio.sleep(0, sent(mock_writes) > 0))
    second = await patch(proxy, headers={"Idempotency-Key": "k-409"})
    assert second.status == 409
    assert (await first).status == 200
    assert sent(mock_writes) == 1


async def test_a_write_not_sent_frees_its_key(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites
) -> None:
    proxy = await make_proxy(
        redis_url=redis_url,
        clients=clients(),
        upstream_rate_limit="1/minute",
        upstream_burst=1,
        upstream_queue_timeout=0,
    )
    first = await patch(proxy)  # spends the only unit
    assert first.status == 200
    held = await patch(proxy, headers={"Idempotency-Key": "k-budget"})
    assert held.status == 503
    assert "NOT sent" in (await held.json())["message"]
    assert sent(mock_writes) == 1


async def test_a_patch_invalidates_the_retrieve_and_the_list(
    proxy: Proxy, mock_writes: MockWrites, mock_state: MockState
) -> None:
    for path in (CUSTOMER, CUSTOMERS):
        miss = await proxy.get(path, headers=auth())
        assert miss.status == 200
        hit = await proxy.get(path, headers=auth())
        assert "hit" in hit.headers["Cache-Status"]
    before = mock_state.operation_calls.copy()
    assert (await patch(proxy)).status == 200
    retrieve = await proxy.get(CUSTOMER, headers=auth())
    assert "fwd=uri-miss" in retrieve.headers["Cache-Status"]
    assert (await retrieve.json())["first_name"] == "Zed"
    listed = await proxy.get(CUSTOMERS, headers=auth())
    assert "fwd=uri-miss" in listed.headers["Cache-Status"]
    assert mock_state.operation_calls["customers_retrieve"] == before["customers_retrieve"] + 1
    # Another collection is untouched.
    venues = await proxy.get("/api/v2/venues", headers=auth())
    again = await proxy.get("/api/v2/venues", headers=auth())
    assert "hit" in again.headers["Cache-Status"] and venues.status == 200


async def test_a_failed_write_invalidates_nothing(proxy: Proxy, mock_writes: MockWrites) -> None:
    await proxy.get(CUSTOMER, headers=auth())
    mock_writes.faults = WriteFaults(status=400, times=1)
    assert (await patch(proxy)).status == 400
    hit = await proxy.get(CUSTOMER, headers=auth())
    assert "hit" in hit.headers["Cache-Status"]


async def test_audit_line_and_metric(
    proxy: Proxy, mock_writes: MockWrites, json_logs: LogLines
) -> None:
    await patch(proxy, headers={"Idempotency-Key": "k-audit"})
    await patch(proxy, headers={"Idempotency-Key": "k-audit"})
    await patch(proxy, headers=auth(OTHER_KEY))
    lines = [r for r in json_logs.records() if r.get("logger") == "teamup_proxy.audit"]
    assert [(r["client"], r["status"], r["replayed"]) for r in lines] == [
        ("billing", 200, False),
        ("billing", 200, True),
        ("crm", 403, False),
    ]
    first = lines[0]
    assert first["operation"] == "customers_partial_update" and first["method"] == "PATCH"
    assert first["path"] == CUSTOMER and first["upstream_ms"] is not None
    assert first["request_id"]
    text = json.dumps(lines)
    assert "Zed" not in text and KEY not in text
    metrics = await (await proxy.get("/metrics")).text()
    assert (
        'teamup_proxy_writes_total{client="billing",operation="customers_partial_update",'
        'outcome="2xx"} 1.0' in metrics
    )
    assert 'outcome="replayed"} 1.0' in metrics


async def test_a_write_whose_caller_hangs_up_while_queued_is_never_sent(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites, json_logs: LogLines
) -> None:
    proxy = await make_proxy(
        redis_url=redis_url,
        clients=clients(),
        upstream_rate_limit="1/minute",
        upstream_burst=1,
        upstream_queue_timeout=120,
    )
    assert (await patch(proxy)).status == 200  # spends the only unit for a minute
    queue = proxy.app[STATE].service.guard.queue
    waiting = asyncio.ensure_future(patch(proxy, headers={"Idempotency-Key": "k-gone"}))
    await eventually(lambda: asyncio.sleep(0, len(queue) == 1))
    waiting.cancel()  # the caller hangs up while its write waits for the budget
    await eventually(lambda: asyncio.sleep(0, len(queue) == 0))
    assert sent(mock_writes) == 1
    # Its key was given back: a retry is not a 409 (it queues again; the test stops there).
    retry = asyncio.ensure_future(patch(proxy, headers={"Idempotency-Key": "k-gone"}))
    await eventually(lambda: asyncio.sleep(0, len(queue) == 1))
    retry.cancel()
    await eventually(
        lambda: asyncio.sleep(
            0,
            any(
                r.get("logger") == "teamup_proxy.audit"
                and r["outcome"] == "gone"
                and r["client"] == "billing"
                and r["status"] == 499
                for r in json_logs.records()
            ),
        )
    )


async def test_writes_while_redis_is_down_and_after(
    make_proxy: MakeProxy, own_redis: RedisServer, mock_writes: MockWrites, mock_state: MockState
) -> None:
    """Redis away: a write is still sent once, its key replays in this process, and its own
    reads are invalidated here; Redis back: the bump reaches it before it is read again."""
    # A fast rate: off Redis a client's share starts spent (what Redis admitted is unknown).
    proxy = await make_proxy(
        redis_url=own_redis.url,
        clients=clients(rate="100000/second"),
        redis_retry_interval=0.1,
        cache_l1_ttl=1.0,
        upstream_rate_limit="100000/second",
        upstream_burst=1000,
    )
    assert (await proxy.get(CUSTOMER, headers=auth())).status == 200
    own_redis.stop()
    key = {"Idempotency-Key": "k-down"}
    first = await patch(proxy, headers=key)
    again = await patch(proxy, headers=key)
    assert first.status == again.status == 200
    assert again.headers["Idempotent-Replayed"] == "true"
    assert sent(mock_writes) == 1
    calls = mock_state.operation_calls["customers_retrieve"]
    after = await proxy.get(CUSTOMER, headers=auth())
    assert (await after.json())["first_name"] == "Zed"
    assert mock_state.operation_calls["customers_retrieve"] == calls + 1
    own_redis.start()

    async def generation_in_redis() -> bool:
        await proxy.get(CUSTOMERS, headers=auth())  # a lookup reads the hash (and pushes first)
        with own_redis.client() as sync:
            return bool(sync.hget("teamup-proxy:gen", "customers") == b"1")

    await eventually(generation_in_redis)


async def test_a_create_is_listed_and_retrievable_through_the_proxy(
    proxy: Proxy, mock_writes: MockWrites
) -> None:
    before = await (await proxy.get(CUSTOMERS, headers=auth())).json()
    created = await proxy.post(
        CUSTOMERS,
        data=b'{"first_name": "New", "last_name": "Customer"}',
        headers={**auth(), "Content-Type": "application/json"},
    )
    assert created.status == 201
    body = await created.json()
    # TeamUp's absolute Location points at the proxy (root-relative without PROXY_PUBLIC_URL).
    assert created.headers["Location"] == f"{CUSTOMERS}/{body['id']}"
    again = await proxy.get(created.headers["Location"], headers=auth())
    assert again.status == 200 and (await again.json())["first_name"] == "New"
    after = await (await proxy.get(CUSTOMERS, headers=auth())).json()
    assert after["count"] == before["count"] + 1


def test_write_scopes_are_checked_at_start_up() -> None:
    key = hash_key(KEY)
    assert ClientConfig.model_validate({"key_sha256": key}).write == ()  # default: no writes
    assert not ClientConfig.model_validate({"key_sha256": key}).may_write("customers")
    anything = ClientConfig.model_validate({"key_sha256": key, "write": ["*"]})
    assert anything.may_write("customers") and anything.may_write("events")
    booking = ClientConfig.model_validate({"key_sha256": key, "write": ["events"]})
    assert booking.may_write("events") and not booking.may_write("customers")
    with pytest.raises(ValueError, match="unknown path segment"):
        ClientConfig.model_validate({"key_sha256": key, "write": ["customer"]})


async def test_a_key_whose_proxy_died_while_sending_is_never_sent_again(
    proxy: Proxy, redis_url: str, mock_writes: MockWrites
) -> None:
    """A mark left by a proxy that died mid-send: the outcome is unknown, so a repeat with its
    key learns that (502 upstream_outcome_unknown) and nothing is sent."""
    operation = load_operations()["customers_partial_update"]
    query = operation.contract.parse(MultiDict(), (("id", 377001),))
    assert isinstance(query, CanonicalQuery)
    body = b'{"first_name": "Zed"}'
    mark = {"f": fingerprint(operation, query, "application/json", body), "n": "x", "t": 1.0}
    client = aioredis.Redis.from_url(redis_url)
    await client.set(keys.idempotency(keys.PREFIX, "billing", "k-died"), b"S" + orjson.dumps(mark))
    await client.aclose()
    response = await patch(proxy, body, headers={"Idempotency-Key": "k-died"})
    assert response.status == 502
    assert (await response.json())["code"] == "upstream_outcome_unknown"
    assert sent(mock_writes) == 0


async def test_report_exports_follow_the_routed_reports_and_the_reports_scope(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites
) -> None:
    limited = clients(billing_write=["reports"])
    limited["billing"]["reports"] = ["customers"]
    proxy = await make_proxy(
        redis_url=redis_url, clients=limited, reports_enabled="customers,invoices"
    )
    export = "/api/v2/reports/{}/export"
    headers = {**auth(), "Content-Type": "application/json"}
    allowed = await proxy.post(export.format("customers"), data=b"{}", headers=headers)
    assert allowed.status == 200
    assert allowed.headers["X-Proxy-Operation"] == "reports_customers_export_export_data"
    refused = await proxy.post(export.format("invoices"), data=b"{}", headers=headers)
    assert refused.status == 403
    off = await proxy.post(export.format("classes"), data=b"{}", headers=headers)
    assert off.status == 404
    assert sent(mock_writes) == 1


async def test_the_proxys_openapi_document_lists_the_writes(proxy: Proxy) -> None:
    document = await (await proxy.get("/openapi.json")).json()
    patch_op = document["paths"]["/api/v2/customers/{id}"]["patch"]
    assert patch_op["operationId"] == "customers_partial_update"
    assert "Idempotency-Key" in [p.get("name") for p in patch_op["parameters"]]
    assert "application/json" in patch_op["requestBody"]["content"]
    assert "`customers`" in patch_op["description"]
    methods = [
        method
        for path, item in document["paths"].items()
        for method in item
        if method != "get" and path.startswith("/api/v2/")
    ]
    writes = [op for op in load_operations().values() if not op.is_read and op.area != "auth"]
    assert len(methods) == 2 * len(writes)  # single and doubled slash
    assert not [p for p in document["paths"] if p.startswith("/api/v2/auth/")]


async def test_writes_wait_their_turn_for_the_shared_budget(
    make_proxy: MakeProxy, redis_url: str, mock_writes: MockWrites
) -> None:
    """No unit free: the write queues (fairly, like a miss) and is sent when one is, once."""
    proxy = await make_proxy(
        redis_url=redis_url,
        clients=clients(),
        upstream_rate_limit="4/second",
        upstream_burst=1,
        upstream_queue_timeout=5,
    )
    first, second = await asyncio.gather(patch(proxy), patch(proxy, b'{"first_name": "B"}'))
    assert first.status == second.status == 200
    assert sent(mock_writes) == 2
    metrics = await (await proxy.get("/metrics")).text()
    assert (
        'teamup_proxy_upstream_queue_wait_seconds_count{client="billing",upstream="default"} 1.0'
        in metrics
    )


async def test_expect_100_continue_invites_a_body_that_can_be_taken(
    proxy: Proxy, mock_writes: MockWrites
) -> None:
    response = await proxy.patch(
        CUSTOMER,
        data=b'{"first_name": "Eve"}',
        headers={**auth(), "Content-Type": "application/json"},
        expect100=True,
    )
    assert response.status == 200 and (await response.json())["first_name"] == "Eve"
    assert sent(mock_writes) == 1
