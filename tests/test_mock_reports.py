"""The fake TeamUp on every report of proxy/spec/teamup.json: the document read here with plain
JSON (not through the mock's loader), each endpoint asked for what its document entry promises."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

import proxy.spec
from proxy.testing.e2e import auth
from proxy.testing.mock import MOCK_STATE, MockState, create_mock_app
from tests.conftest import MakeProxy

Client = TestClient[web.Request, web.Application]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Token {TOKEN}"}
DOCUMENT: dict[str, Any] = json.loads(
    (Path(proxy.spec.__file__).parent / "teamup.json").read_text(encoding="utf-8")
)
OPERATIONS: dict[str, dict[str, Any]] = {
    item["get"]["x-report"]: item["get"]
    for item in DOCUMENT["paths"].values()
    if "x-report" in item.get("get", {})
}
PATHS = {
    op["x-report"]: path
    for path, item in DOCUMENT["paths"].items()
    for op in [item.get("get", {})]
    if "x-report" in op
}
REPORTS = sorted(OPERATIONS)
PLAIN = [report for report in REPORTS if not OPERATIONS[report]["x-grouped"]]
GROUPED = [report for report in REPORTS if OPERATIONS[report]["x-grouped"]]
DATE = re.compile(r"\d{4}-\d\d-\d\d")
DATE_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


def test_the_document_has_32_endpoints() -> None:
    assert len(REPORTS) == 32
    assert len(GROUPED) == 13


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_mock_app(TOKEN))


def params(report: str) -> dict[str, dict[str, Any]]:
    return {param["name"]: param for param in OPERATIONS[report]["parameters"]}


def aggregates(report: str) -> list[str]:
    """A grouped report's columns computed per group (as its page describes them)."""
    columns = OPERATIONS[report]["x-columns"]
    named = [c for c in columns if c == "count" or c.startswith(("average_", "total_"))]
    return named + [c for c in columns if c == "billed_price"]


def attribute(report: str) -> str:
    """A column a grouped report can group on: the first that is no aggregate."""
    return str(next(c for c in OPERATIONS[report]["x-columns"] if c not in aggregates(report)))


def grouping(report: str, *, wide: bool = False) -> str:
    """A valid `columns` for a grouped report: one attribute (every one, when wide) and the
    aggregates."""
    columns = OPERATIONS[report]["x-columns"]
    groups = [c for c in columns if c not in aggregates(report)] if wide else [attribute(report)]
    return ",".join([*groups, *aggregates(report)])


async def get(client: Client, report: str, query: str = "", **headers: str) -> Any:
    response = await client.get(f"{PATHS[report]}?{query}", headers={**AUTH, **headers})
    await response.read()
    return response


async def get_json(client: Client, report: str, query: str = "") -> dict[str, Any]:
    response = await get(client, report, f"format=json&{query}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def answered_as(column: str, key: str) -> bool:
    """Whether a requested column may come back under a header key: itself, or the dotted key
    it spells (`customer_id` → `customer.id`, `membership_id` → `….membership.id`)."""
    return key == column or (
        "." not in column and "." in key and column.endswith("_" + key.rsplit(".", 1)[-1])
    )


def walk(row: dict[str, Any], key: str) -> Iterator[Any]:
    """The value at a dotted key (none when a part is missing)."""
    node: Any = row
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    yield node


def typed(value: Any, kind: str) -> bool:
    if value is None:
        return True
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "date":
        return isinstance(value, str) and DATE.fullmatch(value) is not None
    if kind == "date-time":
        return isinstance(value, str) and DATE_TIME.fullmatch(value) is not None
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, str)


def check_rows(report: str, body: dict[str, Any], requested: list[str]) -> list[str]:
    """Assert the headers answer exactly the requested columns and every row holds each of them,
    typed as x-column-types says; return the header keys."""
    operation = OPERATIONS[report]
    keys = [header["key"] for header in body["column_headers"]]
    assert len(set(keys)) == len(keys)
    assert set(keys) <= set(operation["x-columns"])
    for column in requested:
        assert any(answered_as(column, key) for key in keys), (column, keys)
    for key in keys:
        assert any(answered_as(column, key) for column in requested), (key, requested)
    assert body["rows"], "no rows to check"
    for row in body["rows"]:
        assert set(row) == {key.split(".")[0] for key in keys}
        for key in keys:
            found = list(walk(row, key))
            assert found, (key, row)
            assert typed(found[0], operation["x-column-types"][key]), (key, found[0])
    return keys


# --- every endpoint answers ----------------------------------------------------------------


@pytest.mark.parametrize("report", PLAIN)
async def test_default_columns_json_and_csv(client: Client, report: str) -> None:
    body = await get_json(client, report, "limit=20")
    assert body["total"] >= len(body["rows"]) == 20
    keys = check_rows(report, body, OPERATIONS[report]["x-default-columns"])
    response = await get(client, report, "limit=20")
    assert response.status == 200
    assert response.headers["Content-Type"] == "text/csv; charset=utf-8"
    assert response.headers["Content-Disposition"] == f'attachment; filename="{report}.csv"'
    table = list(csv.reader(io.StringIO(await response.text())))
    assert len(table) == 21
    assert table[0] == [header["label"] for header in body["column_headers"]]
    assert all(len(line) == len(keys) for line in table)


@pytest.mark.parametrize("report", PLAIN)
async def test_every_column_typed(client: Client, report: str) -> None:
    columns = OPERATIONS[report]["x-columns"]
    query = f"columns={','.join(columns)}&limit=30" if "columns" in params(report) else "limit=30"
    body = await get_json(client, report, query)
    check_rows(report, body, columns)


@pytest.mark.parametrize("report", [r for r in PLAIN if "columns" in params(r)])
async def test_some_columns_in_order(client: Client, report: str) -> None:
    columns = [c for c in OPERATIONS[report]["x-columns"] if "." in c or "_" not in c][-2:]
    body = await get_json(client, report, f"columns={columns[1]}&columns={columns[0]}&limit=5")
    assert [h["key"] for h in body["column_headers"]] == columns[::-1]
    check_rows(report, body, columns[::-1])


@pytest.mark.parametrize("report", GROUPED)
async def test_grouped_needs_columns(client: Client, report: str) -> None:
    for query in ("", "format=json", "columns="):
        response = await get(client, report, query)
        assert response.status == 400
        body = await response.json()
        assert body["code"] == "parameter_invalid"
        assert list(body["field_errors"]) == ["columns"]


@pytest.mark.parametrize("report", GROUPED)
async def test_grouped_groups_by_the_attribute(client: Client, report: str) -> None:
    group_on = attribute(report)
    body = await get_json(client, report, f"columns={grouping(report)}&limit=100")
    keys = check_rows(report, body, [group_on, *aggregates(report)])
    assert body["total"] >= len(body["rows"]) > 0
    values = [json.dumps(list(walk(row, keys[0]))) for row in body["rows"]]
    assert len(set(values)) == len(values), "one row per group"
    response = await get(client, report, f"columns={grouping(report)}&limit=100")
    table = list(csv.reader(io.StringIO(await response.text())))
    assert len(table) == len(body["rows"]) + 1


async def all_rows(client: Client, report: str, query: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    while True:
        body = await get_json(client, report, f"{query}&limit=100&offset={len(rows)}")
        rows += body["rows"]
        if len(rows) >= body["total"]:
            return rows


@pytest.mark.parametrize("report", [r for r in GROUPED if "count" in OPERATIONS[r]["x-columns"]])
async def test_grouped_counts_add_up_whatever_the_grouping(client: Client, report: str) -> None:
    attributes = [c for c in OPERATIONS[report]["x-columns"] if c not in aggregates(report)]
    totals = []
    for group_on in (attributes[0], attributes[-1]):
        rows = await all_rows(client, report, f"columns={group_on},count")
        totals.append(sum(int(row["count"]) for row in rows))
    whole = (await get_json(client, report, "columns=count"))["rows"]
    assert len(whole) == 1
    assert totals == [int(whole[0]["count"])] * 2


async def test_grouped_money_adds_up(client: Client) -> None:
    by_type = await get_json(client, "invoice_line_items.grouped", "columns=type,total_amount")
    whole = await get_json(client, "invoice_line_items.grouped", "columns=total_amount")
    cents = [round(row["total_amount"]["decimal"] * 100) for row in by_type["rows"]]
    assert len(cents) == by_type["total"] > 1
    assert [round(whole["rows"][0]["total_amount"]["decimal"] * 100)] == [sum(cents)]


# --- validation ----------------------------------------------------------------------------

BAD = {
    "integer": "abc",
    "number": "many",
    "boolean": "maybe",
    "date": "2024-02-30",
    "date-time": "2024-01-01T00:00:00",
    "enum": "not-a-choice",
    "pattern": "not matching",
}


def kind_of(param: dict[str, Any]) -> str:
    schema = param["schema"]
    item = schema.get("items", schema)
    if "enum" in item:
        return "enum"
    if "pattern" in item:
        return "pattern"
    return str(item.get("format", item["type"]))


def bad_cases() -> Iterator[tuple[str, str, str]]:
    """(report, parameter, bad value): the first parameter of each kind, scalar and array."""
    for report in REPORTS:
        seen: set[tuple[str, bool]] = set()
        for param in OPERATIONS[report]["parameters"]:
            kind, array = kind_of(param), param["schema"]["type"] == "array"
            if param["name"] == "columns" or kind not in BAD or (kind, array) in seen:
                continue
            seen.add((kind, array))
            value = BAD[kind]
            if array and kind == "integer":
                value = "1,x"
            yield report, param["name"], value


@pytest.mark.parametrize(("report", "name", "value"), list(bad_cases()))
async def test_bad_value_is_400_naming_it(
    client: Client, report: str, name: str, value: str
) -> None:
    grouped = f"columns={grouping(report)}&" if OPERATIONS[report]["x-grouped"] else ""
    response = await get(client, report, f"{grouped}{name}={value}")
    assert response.status == 400
    body = await response.json()
    assert body["code"] == "parameter_invalid"
    assert body["type"] == "invalid_request_error"
    assert name in body["message"]
    assert list(body["field_errors"]) == [name]
    assert all(isinstance(m, str) and m for m in body["field_errors"][name])


def good_cases() -> Iterator[tuple[str, str]]:
    """(report, query): a valid value for every parameter of every report, all at once."""
    good = {"integer": "3", "number": "1.5", "boolean": "true", "date": "2024-01-01"}
    good |= {"date-time": "2024-01-01T00:00:00Z", "pattern": "none"}
    for report in REPORTS:
        parts = []
        for param in OPERATIONS[report]["parameters"]:
            name, kind = param["name"], kind_of(param)
            if name in ("columns", "sort", "format", "limit", "offset", "page", "page_size"):
                continue
            item = param["schema"].get("items", param["schema"])
            value = item["enum"][0] if kind == "enum" else good.get(kind, "text")
            parts.append(f"{name}={value}")
        yield report, "&".join(parts)


@pytest.mark.parametrize(("report", "query"), list(good_cases()))
async def test_every_parameter_accepted(client: Client, report: str, query: str) -> None:
    grouped = f"columns={grouping(report)}&" if OPERATIONS[report]["x-grouped"] else ""
    response = await get(client, report, f"{grouped}{query}&format=json")
    assert response.status == 200, await response.text()


@pytest.mark.parametrize("report", REPORTS)
async def test_as_lenient_as_the_page(client: Client, report: str) -> None:
    """What the document marks x-tightened (the proxy's strictness) TeamUp accepts."""
    grouped = f"columns={grouping(report)}&" if OPERATIONS[report]["x-grouped"] else ""
    body = await get_json(client, report, f"{grouped}limit=0")
    assert body["rows"] == []
    texts = [
        p["name"]
        for p in OPERATIONS[report]["parameters"]
        if p["schema"].get("maxLength") and "maxLength" in p.get("x-tightened", "")
    ]
    for name in texts:
        await get_json(client, report, f"{grouped}{name}={'x' * 150}")
    response = await get(client, report, f"{grouped}limit=101")
    limit = params(report)["limit"]
    assert response.status == (200 if "maximum 100" in limit.get("x-tightened", "") else 400)


@pytest.mark.parametrize("report", REPORTS)
async def test_unknown_parameters_are_ignored(client: Client, report: str) -> None:
    grouped = f"columns={grouping(report)}&" if OPERATIONS[report]["x-grouped"] else ""
    plain = await get_json(client, report, f"{grouped}limit=5")
    assert plain == await get_json(client, report, f"{grouped}limit=5&foo=bar&x%5B%5D=1")


# --- paging and sort ------------------------------------------------------------------------


@pytest.mark.parametrize("report", REPORTS)
async def test_paging(client: Client, report: str) -> None:
    wide = grouping(report, wide=True)
    grouped = f"columns={wide}&" if OPERATIONS[report]["x-grouped"] else ""
    total = (await get_json(client, report, f"{grouped}limit=1"))["total"]
    size = min(5, total // 2)
    assert size >= 1
    both = await get_json(client, report, f"{grouped}limit={2 * size}")
    second = await get_json(client, report, f"{grouped}limit={size}&offset={size}")
    assert second["rows"] == both["rows"][size:]
    assert second["total"] == both["total"] == total
    assert second == await get_json(client, report, f"{grouped}page=2&page_size={size}")
    assert second == await get_json(client, report, f"{grouped}page=2&limit={size}")
    past = await get_json(client, report, f"{grouped}offset={total}")
    assert past["rows"] == []
    assert past["total"] == total
    default = await get_json(client, report, grouped)
    assert len(default["rows"]) == min(50, total)


def sortable(report: str) -> str:
    """A scalar column to sort a report by: an integer or a date-time one."""
    operation = OPERATIONS[report]
    if operation["x-grouped"]:
        return aggregates(report)[0] if "count" in operation["x-columns"] else "type"
    types = operation["x-column-types"]
    columns = operation["x-default-columns"] or operation["x-columns"]
    return str(next(c for c in columns if types[c] in ("integer", "date-time") and "_" not in c))


@pytest.mark.parametrize("report", REPORTS)
@pytest.mark.parametrize("prefix", ["", "-"])
async def test_sort(client: Client, report: str, prefix: str) -> None:
    key = sortable(report)
    query = f"columns={grouping(report)}" if OPERATIONS[report]["x-grouped"] else f"columns={key}"
    if "columns" not in params(report):
        query = ""
    rows = await all_rows(client, report, f"{query}&sort={prefix}{key}")
    values = [next(walk(row, key)) for row in rows]
    if OPERATIONS[report]["x-column-types"][key] == "string" and key == "count":
        values = [int(v) for v in values]
    assert len(set(map(str, values))) > 1
    assert values == sorted(values, reverse=prefix == "-")
    body = await get_json(client, report, f"{query}&sort={prefix}{key}&limit=1")
    header = next(h for h in body["column_headers"] if h["key"] == key)
    assert header["sorted"] == {"order": "desc" if prefix else "asc", "priority": 0}


async def test_sort_unknown_column_is_400(client: Client) -> None:
    response = await get(client, "customers", "sort=-nope")
    assert response.status == 400
    assert (await response.json())["field_errors"] == {"sort": ['"-nope" is not a valid choice.']}


# --- filters --------------------------------------------------------------------------------


async def test_ids_filter(client: Client) -> None:
    first = await get_json(client, "customers", "columns=id&limit=5")
    ids = [row["id"] for row in first["rows"]][1:4]
    for query in (",".join(map(str, ids)), "&ids=".join(map(str, ids[::-1]))):
        body = await get_json(client, "customers", f"columns=id&ids={query}")
        assert [row["id"] for row in body["rows"]] == ids
        assert body["total"] == 3


async def test_customers_filter_on_another_report(client: Client) -> None:
    some = await get_json(client, "attendances", "columns=customer.id&limit=3")
    wanted = {row["customer"]["id"] for row in some["rows"]}
    rows = await all_rows(
        client, "attendances", f"columns=customer_id&customers={','.join(map(str, wanted))}"
    )
    assert {row["customer"]["id"] for row in rows} == wanted
    assert len(rows) >= 3


async def test_created_at_range(client: Client) -> None:
    low, high = "2023-06-01T00:00:00Z", "2024-01-01T00:00:00%2B01:00"
    rows = await all_rows(client, "customers", f"columns=created_at&created_at_gte={low}")
    assert rows and all(row["created_at"] >= low for row in rows)
    inside = await all_rows(
        client, "customers", f"columns=created_at&created_at_gte={low}&created_at_lte={high}"
    )
    assert inside and all(low <= row["created_at"] <= "2023-12-31T23:00:00Z" for row in inside)
    assert len(inside) < len(rows) < 500


async def test_boolean_filter(client: Client) -> None:
    everyone = (await get_json(client, "customers", "columns=is_active"))["total"]
    for value, spelled in ((True, "true"), (False, "False")):
        rows = await all_rows(client, "customers", f"columns=is_active&is_active={spelled}")
        assert rows and all(row["is_active"] is value for row in rows)
    active = (await get_json(client, "customers", "is_active=1"))["total"]
    inactive = (await get_json(client, "customers", "is_active=0"))["total"]
    assert active + inactive == everyone


async def test_enum_filter_finds_rows(client: Client) -> None:
    param = params("attendances")["status"]
    choice = param["schema"]["items"]["enum"][0]
    rows = await all_rows(client, "attendances", f"columns=status&status={choice}")
    assert rows and all(row["status"] == choice for row in rows)


async def test_id_gt(client: Client) -> None:
    ten = await get_json(client, "classes", "columns=id&limit=10")
    after = await get_json(client, "classes", f"columns=id&limit=5&id_gt={ten['rows'][4]['id']}")
    assert after["rows"] == ten["rows"][5:]


async def test_one_customer_everywhere(client: Client) -> None:
    """An entity is the same in every report: a customer's name follows its id."""
    row = (await get_json(client, "attendances", "columns=customer&limit=1"))["rows"][0]
    customer = row["customer"]
    found = await get_json(client, "customers", f"columns=id,full_name,email&ids={customer['id']}")
    assert found["rows"] == [
        {"id": customer["id"], "full_name": customer["name"], "email": customer["email"]}
    ]


# --- auth, paths, faults, state -------------------------------------------------------------


@pytest.mark.parametrize("report", REPORTS)
async def test_auth_on_every_report(client: Client, report: str) -> None:
    response = await client.get(PATHS[report])
    assert response.status == 401
    assert await response.json() == {"detail": "Invalid token."}
    assert (await get(client, report, "limit=abc", Authorization="Token nope")).status == 401


@pytest.mark.parametrize("report", ["customers", "customers.grouped", "invoice_line_items"])
async def test_doubled_slash_path(client: Client, report: str) -> None:
    query = f"format=json&limit=3&{'columns=gender,count' if report.endswith('grouped') else ''}"
    single = await client.get(f"{PATHS[report]}?{query}", headers=AUTH)
    doubled = await client.get(f"{PATHS[report].replace('/v2/', '/v2//')}?{query}", headers=AUTH)
    assert doubled.status == single.status == 200
    assert await doubled.read() == await single.read()


@pytest.mark.parametrize(
    "path",
    ["/api/v2/reports/nope/data", "/api/v2/reports/customers", "/api/v2/reports/x.grouped/data"],
)
async def test_unknown_paths_404(client: Client, path: str) -> None:
    response = await client.get(path, headers=AUTH)
    assert response.status == 404
    assert await response.json() == {"detail": "Not found."}
    assert client.app[MOCK_STATE].calls == 0


async def test_fault_on_another_report(client: Client) -> None:
    faults = client.app[MOCK_STATE].faults
    faults.status, faults.retry_after, faults.times = 503, 4, 1
    first = await get(client, "customers.grouped", "columns=gender,count")
    assert first.status == 503
    assert first.headers["Retry-After"] == "4"
    assert (await get(client, "customers.grouped", "columns=gender,count")).status == 200
    faults.latency, faults.extra_headers = 0.01, {"X-Extra": "1"}
    assert (await get(client, "gift_cards")).headers["X-Extra"] == "1"


async def test_state_names_the_report(client: Client) -> None:
    await get(client, "customers")
    await client.get("/api/v2//reports/customers.grouped/data?columns=age", headers=AUTH)
    await get(client, "customers", "limit=abc")
    await get(client, "customer_credits")
    response = await client.get("/_mock/state")
    state = await response.json()
    assert state["calls"] == 4
    assert state["report_calls"] == {"customers": 2, "customers.grouped": 1, "customer_credits": 1}
    assert [(r["path"], r["report"]) for r in state["requests"]] == [
        ("/api/v2/reports/customers/data", "customers"),
        ("/api/v2//reports/customers.grouped/data", "customers.grouped"),
        ("/api/v2/reports/customers/data", "customers"),
        ("/api/v2/reports/customer_credits/data", "customer_credits"),
    ]
    await client.post("/_mock/reset")
    assert (await (await client.get("/_mock/state")).json())["report_calls"] == {}


async def test_same_seed_same_data(aiohttp_client: AiohttpClient) -> None:
    bodies = []
    for seed in (7, 7, 8):
        test_client = await aiohttp_client(create_mock_app(TOKEN, seed=seed))
        query = "format=json&sort=-created_at&limit=50&offset=3"
        response = await test_client.get(f"{PATHS['customers']}?{query}", headers=AUTH)
        bodies.append(await response.read())
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]


# --- behind the proxy -----------------------------------------------------------------------


@pytest.mark.parametrize(("report", "query"), list(good_cases()))
async def test_behind_the_proxy(
    make_proxy: MakeProxy, mock_state: MockState, report: str, query: str
) -> None:
    """The proxy's canonical form of a query setting every parameter is one the mock accepts, and
    the mock's answer is one the proxy passes on, in both formats."""
    proxy = await make_proxy()
    grouped = f"columns={grouping(report)}&" if OPERATIONS[report]["x-grouped"] else ""
    for fmt in ("json", "csv"):
        response = await proxy.get(f"{PATHS[report]}?{grouped}{query}&format={fmt}", headers=auth())
        assert response.status == 200, await response.text()
        assert response.headers["Content-Type"].startswith(
            "application/json" if fmt == "json" else "text/csv"
        )
    assert mock_state.report_calls == {report: 2}
    assert [r.report for r in mock_state.requests] == [report, report]
