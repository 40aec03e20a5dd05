"""The fake TeamUp: auth, columns, sort, filters, pages, csv/json, faults, control endpoints."""

from __future__ import annotations

import asyncio
import csv
import io
import itertools
import re
import subprocess
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.testing.mock import (
    MOCK_STATE,
    REPORT_PATH,
    Faults,
    MockState,
    RecordedRequest,
    create_mock_app,
)
from proxy.testing.support import free_port, wait_for_port

Client = TestClient[web.Request, web.Application]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Token {TOKEN}"}
AUTH_LINE = f"Authorization: Token {TOKEN}"
DEFAULT_KEYS = [
    "customer.id",
    "customer.name",
    "customer.email",
    "created_at",
    "amount",
    "balance",
    "memo",
]
MONEY_KEYS = {
    "decimal",
    "string",
    "iso_currency_code",
    "currency_symbol",
    "currency_symbol_position",
}


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    """A test client on a fresh mock (seed 7)."""
    return await aiohttp_client(create_mock_app(TOKEN))


def state_of(client: Client) -> MockState:
    """The mock's in-process state."""
    return client.app[MOCK_STATE]


async def report(client: Client, query: str = "", **headers: str) -> aiohttp.ClientResponse:
    """GET the report with the right token unless headers say otherwise."""
    response = await client.get(f"{REPORT_PATH}?{query}", headers={**AUTH, **headers})
    await response.read()
    return response


async def report_json(client: Client, query: str = "") -> dict[str, Any]:
    """The report as JSON, asserting a 200."""
    response = await report(client, f"format=json&{query}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


async def all_rows(client: Client, query: str = "") -> list[dict[str, Any]]:
    """Every row matching the query, paging through 100 at a time."""
    rows: list[dict[str, Any]] = []
    while True:
        body = await report_json(client, f"{query}&limit=100&offset={len(rows)}")
        rows += body["rows"]
        if len(rows) >= body["total"]:
            return rows


# --- auth ---------------------------------------------------------------------------------


async def test_missing_token_is_401_and_counted(client: Client) -> None:
    response = await client.get(REPORT_PATH)
    assert response.status == 401
    assert await response.json() == {"detail": "Invalid token."}
    assert response.headers["WWW-Authenticate"] == "Token"
    assert state_of(client).calls == 1


@pytest.mark.parametrize(
    "value", ["Token wrong", f"Bearer {TOKEN}", f"Token {TOKEN} extra", TOKEN, f"Token {TOKEN}x"]
)
async def test_wrong_credential_is_401(client: Client, value: str) -> None:
    response = await report(client, Authorization=value)
    assert response.status == 401
    assert await response.json() == {"detail": "Invalid token."}


@pytest.mark.parametrize("scheme", ["Token", "token", "TOKEN"])
async def test_right_token_any_scheme_case(client: Client, scheme: str) -> None:
    response = await report(client, Authorization=f"{scheme} {TOKEN}")
    assert response.status == 200


# --- shapes -------------------------------------------------------------------------------


async def test_csv_is_the_default(client: Client) -> None:
    response = await report(client)
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"] == 'attachment; filename="customer_credits.csv"'
    table = list(csv.reader(io.StringIO(await response.text())))
    assert table[0] == [
        "Customer ID",
        "Customer Name",
        "Customer Email",
        "Created At",
        "Amount",
        "Balance",
        "Memo",
    ]
    assert len(table) == 51
    body = await report_json(client)
    for line, row in zip(table[1:], body["rows"], strict=True):
        assert line == [
            str(row["customer"]["id"]),
            row["customer"]["name"],
            row["customer"]["email"],
            row["created_at"],
            row["amount"]["string"],
            row["balance"]["string"],
            row["memo"],
        ]


async def test_csv_quotes_awkward_values(client: Client) -> None:
    response = await report(client, "columns=memo&limit=100")
    text = await response.text()
    assert '"Refund, cancelled class"' in text
    assert '"Promotion: ""welcome"" bonus"' in text
    assert text.endswith("\r\n")


async def test_json_shape(client: Client) -> None:
    response = await report(client, "format=json")
    assert response.headers["Content-Type"] == "application/json"
    body = await response.json()
    assert set(body) == {"total", "column_headers", "rows"}
    assert body["total"] == 3000
    assert len(body["rows"]) == 50
    assert [h["key"] for h in body["column_headers"]] == DEFAULT_KEYS
    assert body["column_headers"][0] == {
        "label": "Customer ID",
        "key": "customer.id",
        "sortable": True,
        "holds_customer_id": True,
        "required": False,
    }
    row = body["rows"][0]
    assert set(row) == {"customer", "created_at", "amount", "balance", "memo"}
    assert set(row["customer"]) == {"id", "name", "email"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row["created_at"])
    for money in (row["amount"], row["balance"]):
        assert set(money) == MONEY_KEYS
        assert money["iso_currency_code"] == "gbp"
        assert money["currency_symbol"] == "£"
        assert money["currency_symbol_position"] == "before"
        assert money["string"].lstrip("-").startswith("£")


async def test_money_strings_match_decimals(client: Client) -> None:
    for row in await all_rows(client, "columns=amount,balance"):
        for money in (row["amount"], row["balance"]):
            decimal = money["decimal"]
            sign = "-" if decimal < 0 else ""
            expected = f"{sign}£{abs(decimal):.2f}".removesuffix(".00")
            assert money["string"] == expected
        assert row["balance"]["decimal"] >= 0


async def test_data_spans_the_documented_range(client: Client) -> None:
    rows = await all_rows(client, "columns=customer_id,created_at")
    assert len(rows) == 3000
    assert rows[0]["created_at"] >= "2023-01-01T00:00:00Z"
    assert rows[-1]["created_at"] <= "2024-12-31T23:59:59Z"
    assert [r["created_at"] for r in rows] == sorted(r["created_at"] for r in rows)
    assert 250 <= len({r["customer"]["id"] for r in rows}) <= 300


async def test_doubled_slash_path(client: Client) -> None:
    path = "/api/v2//reports/customer_credits/data?format=json&limit=3"
    response = await client.get(path, headers=AUTH)
    assert response.status == 200
    assert await response.json() == await report_json(client, "limit=3")


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "HEAD"])
async def test_only_get(client: Client, method: str) -> None:
    response = await client.request(method, REPORT_PATH, headers=AUTH)
    assert response.status == 405
    assert state_of(client).calls == 0


async def test_other_paths_404(client: Client) -> None:
    response = await client.get("/api/v2/reports/other/data", headers=AUTH)
    assert response.status == 404
    assert response.headers["Server"] == "mock-teamup"


# --- columns ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alias", "key"),
    [
        ("customer_id", "customer.id"),
        ("customer_name", "customer.name"),
        ("customer_email", "customer.email"),
    ],
)
async def test_column_aliases(client: Client, alias: str, key: str) -> None:
    by_alias = await report_json(client, f"columns={alias}")
    by_key = await report_json(client, f"columns={key}")
    assert by_alias == by_key
    assert [h["key"] for h in by_alias["column_headers"]] == [key]
    field_name = key.split(".")[1]
    assert all(set(row) == {"customer"} for row in by_alias["rows"])
    assert all(set(row["customer"]) == {field_name} for row in by_alias["rows"])


async def test_columns_keep_order_and_only_requested(client: Client) -> None:
    body = await report_json(client, "columns=memo,amount,customer_email")
    assert [h["key"] for h in body["column_headers"]] == ["memo", "amount", "customer.email"]
    assert [h["label"] for h in body["column_headers"]] == ["Memo", "Amount", "Customer Email"]
    assert all(set(row) == {"memo", "amount", "customer"} for row in body["rows"])


async def test_duplicate_columns_collapse(client: Client) -> None:
    body = await report_json(client, "columns=customer_id,customer.id,memo,memo")
    assert [h["key"] for h in body["column_headers"]] == ["customer.id", "memo"]


async def test_whole_customer_column(client: Client) -> None:
    body = await report_json(client, "columns=customer")
    assert body["column_headers"] == [
        {
            "label": "Customer",
            "key": "customer",
            "sortable": True,
            "holds_customer_id": True,
            "required": False,
        }
    ]
    full = await report_json(client, "columns=customer.id,customer.name,customer.email")
    assert body["rows"] == full["rows"]
    first = (await report_json(client, "columns=customer,amount&limit=1"))["rows"][0]
    response = await report(client, "columns=customer,amount&limit=1")
    header, line = list(csv.reader(io.StringIO(await response.text())))
    assert header == ["Customer", "Amount"]
    assert line == [first["customer"]["name"], first["amount"]["string"]]


# --- sort ---------------------------------------------------------------------------------


async def test_default_order_is_creation_order(client: Client) -> None:
    body = await report_json(client, "columns=created_at&limit=100")
    stamps = [row["created_at"] for row in body["rows"]]
    assert stamps == sorted(stamps)
    assert "sorted" not in body["column_headers"][0]


@pytest.mark.parametrize(("prefix", "order"), [("", "asc"), ("-", "desc")])
async def test_sort_one_key(client: Client, prefix: str, order: str) -> None:
    body = await report_json(client, f"columns=amount,memo&sort={prefix}amount&limit=100")
    values = [row["amount"]["decimal"] for row in body["rows"]]
    assert values == sorted(values, reverse=order == "desc")
    assert body["column_headers"][0]["sorted"] == {"order": order, "priority": 0}
    assert "sorted" not in body["column_headers"][1]
    everything = await all_rows(client, f"columns=amount&sort={prefix}amount")
    extreme = (min if order == "asc" else max)(r["amount"]["decimal"] for r in everything)
    assert values[0] == extreme


async def test_sort_multi_key_priority(client: Client) -> None:
    rows = await all_rows(client, "columns=customer_id,created_at&sort=customer_id,-created_at")
    keys = [(r["customer"]["id"], r["created_at"]) for r in rows]
    newest_first = sorted(keys, key=lambda k: k[1], reverse=True)
    assert keys == sorted(newest_first, key=lambda k: k[0])
    body = await report_json(
        client, "columns=created_at,customer.id&sort=customer_id,-created_at&limit=1"
    )
    assert body["column_headers"][0]["sorted"] == {"order": "desc", "priority": 1}
    assert body["column_headers"][1]["sorted"] == {"order": "asc", "priority": 0}


async def test_sort_by_column_not_shown(client: Client) -> None:
    body = await report_json(client, "columns=memo&sort=-balance&limit=100")
    assert all("sorted" not in h for h in body["column_headers"])
    shown = await report_json(client, "columns=balance&sort=-balance&limit=1")
    top = max(r["balance"]["decimal"] for r in await all_rows(client, "columns=balance"))
    assert shown["rows"][0]["balance"]["decimal"] == top


async def test_sort_ties_keep_creation_order(client: Client) -> None:
    rows = await all_rows(client, "columns=amount,created_at&sort=amount")
    for before, after in itertools.pairwise(rows):
        if before["amount"]["decimal"] == after["amount"]["decimal"]:
            assert before["created_at"] <= after["created_at"]


# --- filters ------------------------------------------------------------------------------


async def test_customers_filter_both_array_styles(client: Client) -> None:
    first = await report_json(client, "columns=customer_id&limit=10")
    ids = sorted({row["customer"]["id"] for row in first["rows"]})[:3]
    a, b, c = ids
    bodies = [
        await report_json(client, f"columns=customer_id&limit=100&customers={a},{b},{c}"),
        await report_json(
            client, f"columns=customer_id&limit=100&customers={a}&customers={b}&customers={c}"
        ),
        await report_json(client, f"columns=customer_id&limit=100&customers={c},{a}&customers={b}"),
        await report_json(client, f"columns=customer_id&limit=100&customers={a}%2C{b}%2C{c}"),
    ]
    assert all(body == bodies[0] for body in bodies)
    assert {row["customer"]["id"] for row in bodies[0]["rows"]} == {a, b, c}
    singles = [(await report_json(client, f"customers={i}"))["total"] for i in ids]
    assert bodies[0]["total"] == sum(singles)


async def test_customers_filter_unknown_id_is_empty(client: Client) -> None:
    body = await report_json(client, "customers=1")
    assert body["total"] == 0
    assert body["rows"] == []


async def test_created_at_bounds_are_inclusive(client: Client) -> None:
    rows = await all_rows(client, "columns=created_at")
    low, high = rows[100]["created_at"], rows[199]["created_at"]
    body = await report_json(
        client, f"columns=created_at&limit=100&created_at_gte={low}&created_at_lte={high}"
    )
    expected = [r for r in rows if low <= r["created_at"] <= high]
    assert body["total"] == len(expected)
    assert body["rows"] == expected[:100]


async def test_created_at_offsets_mean_the_same_instant(client: Client) -> None:
    in_utc = await report_json(client, "created_at_gte=2024-06-01T00:00:00Z")
    plus_one = await report_json(client, "created_at_gte=2024-06-01T01:00:00%2B01:00")
    fractional = await report_json(client, "created_at_gte=2024-06-01T00:00:00.000000%2B00:00")
    assert in_utc == plus_one == fractional
    assert 0 < in_utc["total"] < 3000
    assert all(r["created_at"] >= "2024-06-01T00:00:00Z" for r in in_utc["rows"])
    before = await report_json(client, "created_at_lte=2024-05-31T23:59:59Z")
    assert before["total"] + in_utc["total"] == 3000


async def test_id_gt(client: Client) -> None:
    assert (await report_json(client, "id_gt=2990"))["total"] == 10
    assert (await report_json(client, "id_gt=0"))["total"] == 3000
    assert (await report_json(client, "id_gt=3000"))["total"] == 0
    after = await report_json(client, "id_gt=10&limit=5")
    skipped = await report_json(client, "offset=10&limit=5")
    assert after["rows"] == skipped["rows"]


async def test_created_at_timeframe_and_unknown_params_are_ignored(client: Client) -> None:
    plain = await report_json(client, "limit=5")
    assert plain == await report_json(client, "limit=5&created_at_timeframe=last_month")
    assert plain == await report_json(client, "limit=5&foo=bar&columns%5B%5D=memo")


# --- paging -------------------------------------------------------------------------------


async def test_limit_and_offset(client: Client) -> None:
    rows = await all_rows(client, "columns=created_at")
    body = await report_json(client, "columns=created_at&limit=100&offset=2950")
    assert body["total"] == 3000
    assert body["rows"] == rows[2950:]
    assert (await report_json(client, "offset=5000"))["rows"] == []
    assert (await report_json(client, "limit=0"))["rows"] == []
    assert len((await report_json(client, "limit=010"))["rows"]) == 10


async def test_page_and_page_size(client: Client) -> None:
    by_offset = await report_json(client, "offset=40&limit=20")
    assert by_offset == await report_json(client, "page=3&page_size=20")
    assert by_offset == await report_json(client, "page=3&limit=20")
    assert by_offset == await report_json(client, "page_size=20&page=3&offset=7&limit=99")
    assert await report_json(client, "page_size=20") == await report_json(client, "limit=20")
    assert await report_json(client, "page=2") == await report_json(client, "offset=50")
    assert (await report_json(client, "page_size=0"))["rows"] == []


# --- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("limit=-1", "limit"),
        ("limit=%2B5", "limit"),
        ("limit=", "limit"),
        ("offset=-1", "offset"),
        ("page=0", "page"),
        ("page_size=101", "page_size"),
        ("format=xml", "format"),
        ("format=JSON", "format"),
        ("format=", "format"),
        ("columns=nope", "columns"),
        ("columns=memo,", "columns"),
        ("sort=nope", "sort"),
        ("sort=", "sort"),
        ("sort=-", "sort"),
        ("customers=1,x", "customers"),
        ("id_gt=1.5", "id_gt"),
        ("created_at_gte=yesterday", "created_at_gte"),
        ("created_at_lte=2024-01-01T00:00:00", "created_at_lte"),
        ("created_at_lte=2024-01-01", "created_at_lte"),
    ],
)
async def test_bad_values_are_400(client: Client, query: str, name: str) -> None:
    response = await report(client, query)
    assert response.status == 400
    body = await response.json()
    assert body["code"] == "parameter_invalid"
    assert body["type"] == "invalid_request_error"
    assert name in body["message"]
    assert list(body["field_errors"]) == [name]
    assert all(isinstance(m, str) and m for m in body["field_errors"][name])


async def test_every_bad_parameter_is_reported(client: Client) -> None:
    response = await report(client, "limit=500&sort=x&format=json")
    body = await response.json()
    assert body["field_errors"] == {
        "sort": ['"x" is not a valid choice.'],
        "limit": ["Ensure this value is less than or equal to 100."],
    }
    assert body["message"] == "Invalid values for parameters: sort, limit."


async def test_auth_is_checked_before_parameters(client: Client) -> None:
    response = await report(client, "limit=500", Authorization="Token nope")
    assert response.status == 401


# --- faults -------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 429, 401, 403])
async def test_status_fault(client: Client, status: int) -> None:
    state_of(client).faults.status = status
    response = await report(client)
    assert response.status == status
    assert "Retry-After" not in response.headers
    assert state_of(client).calls == 1
    assert state_of(client).faults.status == status


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after(client: Client, status: int) -> None:
    state_of(client).faults.status = status
    state_of(client).faults.retry_after = 7
    response = await report(client)
    assert response.status == status
    assert response.headers["Retry-After"] == "7"


async def test_retry_after_only_on_429_and_503(client: Client) -> None:
    state_of(client).faults.status = 500
    state_of(client).faults.retry_after = 7
    assert "Retry-After" not in (await report(client)).headers


async def test_times_clears_the_fault(client: Client) -> None:
    faults = state_of(client).faults
    faults.status, faults.retry_after, faults.times = 503, 3, 2
    assert [(await report(client)).status for _ in range(3)] == [503, 503, 200]
    assert faults == Faults()
    assert state_of(client).calls == 3


async def test_times_keeps_latency_and_headers(client: Client) -> None:
    faults = state_of(client).faults
    faults.latency, faults.drop, faults.times = 0.01, True, 1
    faults.extra_headers = {"X-Keep": "1"}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await report(client)
    response = await report(client)
    assert response.status == 200
    assert response.headers["X-Keep"] == "1"
    assert faults == Faults(latency=0.01, extra_headers={"X-Keep": "1"})


async def test_latency_still_answers(client: Client) -> None:
    state_of(client).faults.latency = 0.05
    assert (await report(client)).status == 200


async def test_latency_from_create_mock_app() -> None:
    assert create_mock_app("t", latency=0.08)[MOCK_STATE].faults == Faults(latency=0.08)


async def test_hang_needs_the_client_timeout(client: Client) -> None:
    faults = state_of(client).faults
    faults.hang, faults.times = True, 1
    with pytest.raises(TimeoutError):
        await client.get(REPORT_PATH, headers=AUTH, timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await report(client)).status == 200
    assert state_of(client).calls == 2


async def test_shutdown_releases_hanging_requests() -> None:
    app = create_mock_app(TOKEN)
    app[MOCK_STATE].faults.hang = True
    arrived = asyncio.Event()

    @web.middleware
    async def note_arrival(request: web.Request, handler: Handler) -> web.StreamResponse:
        arrived.set()
        return await handler(request)

    app.middlewares.append(note_arrival)
    # A plain runner keeps aiohttp's default of not cancelling handlers when clients leave.
    runner = web.AppRunner(app, shutdown_timeout=60)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {REPORT_PATH} HTTP/1.1\r\nHost: x\r\n{AUTH_LINE}\r\n\r\n".encode())
    await arrived.wait()
    async with asyncio.timeout(10):
        await runner.cleanup()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()


async def test_drop_closes_without_answer(client: Client) -> None:
    state_of(client).faults.drop = True
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await report(client)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await report(client)
    assert state_of(client).calls == 2


async def test_set_cookie(client: Client) -> None:
    assert "Set-Cookie" not in (await report(client)).headers
    state_of(client).faults.set_cookie = True
    for query in ("", "limit=999"):
        response = await report(client, query)
        assert response.headers.getall("Set-Cookie") == ["sessionid=abc; HttpOnly"]


async def test_extra_headers_on_every_report_answer(client: Client) -> None:
    extra = {"Cache-Control": "private", "X-Upstream-Thing": "yes"}
    state_of(client).faults.extra_headers = extra
    for response in (
        await report(client),
        await report(client, "limit=999"),
        await report(client, Authorization="Token nope"),
    ):
        for name, value in extra.items():
            assert response.headers[name] == value


async def test_server_and_call_headers(client: Client) -> None:
    for n in (1, 2):
        response = await report(client)
        assert response.headers["Server"] == "mock-teamup"
        assert response.headers["X-Mock-Calls"] == str(n)
    unauthorised = await client.get(REPORT_PATH)
    assert unauthorised.headers["X-Mock-Calls"] == "3"
    control = await client.get("/_mock/state")
    assert control.headers["Server"] == "mock-teamup"
    assert control.headers["X-Mock-Calls"] == "3"


# --- recording and control endpoints ------------------------------------------------------


async def test_every_report_request_is_counted(client: Client) -> None:
    await report(client)
    await report(client, "limit=999")
    await report(client, Authorization="nope")
    state_of(client).faults.status = 500
    await report(client)
    assert state_of(client).calls == 4
    assert len(state_of(client).requests) == 4


async def test_requests_are_recorded_raw(client: Client) -> None:
    query = "customers=2,1&columns=memo&columns=amount&x=a+b%26c%3D&y=%C3%A9"
    headers = [("Authorization", AUTH["Authorization"]), ("X-Dup", "a"), ("X-Dup", "b")]
    response = await client.get(f"{REPORT_PATH}?{query}", headers=headers)
    assert response.status == 200
    recorded = state_of(client).requests[0]
    assert recorded.query_string == query
    assert recorded.headers["X-Dup"] == "a, b"
    assert recorded.headers["Authorization"] == AUTH["Authorization"]


async def test_state_endpoint(client: Client) -> None:
    await client.get(f"{REPORT_PATH}?limit=1", headers={**AUTH, "Accept": "text/csv"})
    response = await client.get("/_mock/state")
    body = await response.json()
    assert body["calls"] == 1
    assert len(body["requests"]) == 1
    assert body["requests"][0]["query_string"] == "limit=1"
    assert body["requests"][0]["headers"]["Accept"] == "text/csv"
    assert set(body) == {"calls", "requests", "report_calls", "credential_calls", "provider_calls"}
    assert body["report_calls"] == {"customer_credits": 1}
    # The token's label, never the token; no TeamUp-Provider-ID sent: no provider.
    assert body["credential_calls"] == {"default": 1}
    assert body["provider_calls"] == {}
    assert body["requests"][0]["credential"] == "default"
    assert body["requests"][0]["provider"] is None
    assert body["requests"][0]["path"] == REPORT_PATH
    assert body["requests"][0]["report"] == "customer_credits"


async def test_put_faults_replaces(client: Client) -> None:
    faults = state_of(client).faults
    faults.set_cookie = True
    response = await client.put("/_mock/faults", json={"status": 503, "retry_after": 2})
    assert response.status == 200
    assert faults == Faults(status=503, retry_after=2)
    assert (await response.json())["status"] == 503
    answer = await report(client)
    assert answer.status == 503
    assert answer.headers["Retry-After"] == "2"
    await client.put("/_mock/faults", json={"extra_headers": {"X-A": "b"}, "latency": 0})
    assert faults == Faults(extra_headers={"X-A": "b"})


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"nope": 1}',
        b'{"status": "500"}',
        b'{"status": 200}',
        b'{"latency": -1}',
        b'{"hang": 1}',
        b'{"times": true}',
        b'{"extra_headers": {"X": 1}}',
    ],
)
async def test_put_faults_rejects_bad_bodies(client: Client, body: bytes) -> None:
    response = await client.put("/_mock/faults", data=body)
    assert response.status == 400
    assert "detail" in await response.json()
    assert state_of(client).faults == Faults()


async def test_reset_endpoint(client: Client) -> None:
    faults = state_of(client).faults
    faults.status = 500
    await report(client)
    response = await client.post("/_mock/reset")
    assert response.status == 204
    assert state_of(client).calls == 0
    assert state_of(client).requests == []
    assert state_of(client).faults is faults
    assert faults == Faults()
    assert (await report(client)).status == 200


def test_state_reset() -> None:
    state = MockState(token="t", faults=Faults(latency=1.0, hang=True), calls=3)
    state.requests.append(RecordedRequest(query_string="a=1", headers={}))
    state.reset()
    assert state == MockState(token="t", faults=Faults())


async def test_control_endpoints_are_not_report_calls(client: Client) -> None:
    await client.get("/_mock/state")
    await client.post("/_mock/reset")
    await client.put("/_mock/faults", json={})
    assert state_of(client).calls == 0


# --- determinism and the process ----------------------------------------------------------


async def test_same_seed_same_data(aiohttp_client: AiohttpClient) -> None:
    one = await aiohttp_client(create_mock_app("a"))
    two = await aiohttp_client(create_mock_app("b"))
    other = await aiohttp_client(create_mock_app("a", seed=8))
    query = f"{REPORT_PATH}?format=json&sort=-balance,memo&limit=100&offset=17"
    bodies = []
    for test_client, token in ((one, "a"), (two, "b"), (other, "a")):
        response = await test_client.get(query, headers={"Authorization": f"Token {token}"})
        bodies.append(await response.read())
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


def test_runs_as_a_module() -> None:
    port = free_port()
    command = [sys.executable, "-m", "proxy.testing.mock", "--port", str(port), "--token", "t"]
    repo = Path(__file__).resolve().parents[1]
    with subprocess.Popen(
        command, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    ) as process:
        try:
            wait_for_port(port)
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{REPORT_PATH}?format=json&limit=1",
                headers={"Authorization": "Token t"},
            )
            with urllib.request.urlopen(request, timeout=5) as response:
                assert response.status == 200
                assert response.headers["Server"] == "mock-teamup"
                assert response.read().startswith(b'{"total":3000,')
        finally:
            process.terminate()
            _, stderr = process.communicate(timeout=10)
    assert process.returncode == 0, stderr.decode()
