"""The mock TeamUp serves every GET of the document: per operation, a valid request answers 200
in the right shape, a bad parameter 400, a bad path value 404, no credential 401; lists page
through absolute `next` links to the last page; `format=xml` is well-formed XML.

Runs against proxy/spec/teamup.json; tests/fixtures/operations.json (a handful of operations in
the same format) shows that `document=` serves another document's reads.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from defusedxml import ElementTree

from proxy.testing.document import Operation, Param, operations
from proxy.testing.mock import MOCK_STATE, Faults, create_mock_app
from proxy.testing.objects import Catalog, to_xml

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
Client = TestClient[web.Request, web.Application]
Test = Callable[[Client, Operation], Awaitable[None]]
TOKEN = "s3cret"
AUTH = {"Authorization": f"Token {TOKEN}"}
FIXTURE = Path(__file__).parent / "fixtures" / "operations.json"
DOCUMENT: Path | None = None  # the packaged proxy/spec/teamup.json
OPERATIONS = operations(DOCUMENT)
CATALOG = Catalog(OPERATIONS, 7)  # a twin of the mock's (seed 7): names objects that exist
LISTS = [o for o in OPERATIONS if o.kind == "list"]
WITH_PATH = [o for o in OPERATIONS if o.path_params]
WITH_XML = [
    o for o in OPERATIONS if "format" in o.params and "xml" in (o.params["format"].enum or ())
]
WITH_FIELDS = [o for o in OPERATIONS if "fields" in o.params and len(o.fields) > 1]
WITH_EXPAND = [o for o in OPERATIONS if "expand" in o.params]
RETRIEVES_OF_LISTS = [
    o
    for o in OPERATIONS
    if o.kind == "retrieve"
    and len(o.path_params) == 1
    and o.path_params[0].kind == "integer"
    and any(other.path == o.collection for other in LISTS)
]


def by_id(operations: Sequence[Operation]) -> Callable[[Test], Test]:
    """Run a test once per operation, on the module's loop."""
    parametrize = pytest.mark.parametrize("operation", operations, ids=lambda o: o.operation_id)

    def mark(test: Test) -> Test:
        marked: Test = MODULE_LOOP(parametrize(test))
        return marked

    return mark


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mock() -> AsyncIterator[Client]:
    """One mock for the module (seed 7), serving the document under test."""
    async with TestClient(TestServer(create_mock_app(TOKEN, document=DOCUMENT))) as test_client:
        yield test_client


@pytest_asyncio.fixture(loop_scope="module")
async def client(mock: Client) -> AsyncIterator[Client]:
    """The module's mock, its calls and faults reset after each test."""
    yield mock
    mock.app[MOCK_STATE].reset()


def valid_value(param: Param) -> str:
    """A value TeamUp accepts for a parameter."""
    if param.enum:
        return param.enum[0]
    return {
        "integer": str(max(param.minimum or 1, 1)),
        "number": "1.5",
        "boolean": "true",
        "date": "2024-03-01",
        "date-time": "2024-03-01T09:00:00Z",
    }.get(param.kind, "abc")


def required_query(operation: Operation) -> dict[str, str]:
    return {p.name: valid_value(p) for p in operation.params.values() if p.required}


def invalid_value(param: Param) -> str | None:
    """A value TeamUp refuses for a parameter, where its type or bounds say one."""
    if param.kind in ("integer", "number"):
        if param.maximum is not None:
            return str(param.maximum + 1)
        return "abc"
    if param.enum:
        return "not-a-choice"
    return {"boolean": "maybe", "date": "2024-13-45", "date-time": "yesterday"}.get(param.kind)


async def get(client: Client, path: str, query: dict[str, str] | None = None, **kw: Any) -> Any:
    headers = kw.pop("headers", AUTH)
    response = await client.get(path, params=query, headers=headers, **kw)
    await response.read()
    return response


async def get_json(client: Client, path: str, query: dict[str, str] | None = None) -> Any:
    response = await get(client, path, query)
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


def origin(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


def assert_links_on(value: Any, home: str) -> None:
    """Every URL in an answer that points at the API is absolute on the mock's own origin."""
    if isinstance(value, dict):
        for item in value.values():
            assert_links_on(item, home)
    elif isinstance(value, list):
        for item in value:
            assert_links_on(item, home)
    elif isinstance(value, str) and "/api/v2/" in value:
        assert value.startswith(f"{home}/api/v2/"), value


def assert_object(operation: Operation, item: Any) -> None:
    assert isinstance(item, dict)
    if operation.fields:
        assert list(item) == list(operation.fields)


# --- every operation --------------------------------------------------------------------------


def test_every_get_of_the_document_is_served() -> None:
    document = orjson.loads((Path(__file__).parents[1] / "proxy/spec/teamup.json").read_bytes())
    reads = {
        (path, item["get"]["operationId"])
        for path, item in document["paths"].items()
        if "get" in item and item["get"]["x-kind"] in ("list", "retrieve", "other")
    }
    assert {(o.path, o.operation_id) for o in OPERATIONS} == reads
    assert {o.kind for o in OPERATIONS} == {"list", "retrieve", "other"}


@MODULE_LOOP
async def test_another_document() -> None:
    app = create_mock_app(TOKEN, document=FIXTURE)
    async with TestClient(TestServer(app)) as fixture_client:
        served = await get(fixture_client, "/api/v2/checkins/settings")
        assert served.status == 200
        assert set(await served.json()) == {"enabled", "granularity"}
        absent = await get(fixture_client, "/api/v2/invoices")  # not in the fixture
        assert absent.status == 404
        report = await get(fixture_client, "/api/v2/reports/customers/data", {"format": "json"})
        assert report.status == 200  # the reports always come from the packaged document


@by_id(OPERATIONS)
async def test_valid_request(client: Client, operation: Operation) -> None:
    body = await get_json(client, CATALOG.example_path(operation), required_query(operation))
    if operation.kind == "list":
        assert list(body) == ["count", "next", "previous", "results"]
        assert body["previous"] is None
        assert len(body["results"]) == min(body["count"], 100)
        assert (body["next"] is None) == (body["count"] <= 100)
        for item in body["results"]:
            assert_object(operation, item)
    elif operation.array:
        assert isinstance(body, list)
        for item in body:
            assert_object(operation, item)
    else:
        assert_object(operation, body)
    assert_links_on(body, origin(client))
    assert client.app[MOCK_STATE].operation_calls == {operation.operation_id: 1}


@by_id(OPERATIONS)
async def test_double_slash_form(client: Client, operation: Operation) -> None:
    path = CATALOG.example_path(operation).replace("/api/v2/", "/api/v2//", 1)
    response = await get(client, path, required_query(operation))
    assert response.status == 200, await response.text()


@by_id(OPERATIONS)
async def test_bad_parameters(client: Client, operation: Operation) -> None:
    path = CATALOG.example_path(operation)
    base = required_query(operation)
    response = await get(client, path, {**base, "no_such_parameter": "1"})
    assert response.status == 400
    body = await response.json()
    assert body["code"] == "parameter_invalid"
    assert body["field_errors"] == {"no_such_parameter": ["Unknown parameter."]}
    for param in operation.params.values():
        bad = invalid_value(param)
        if bad is None:
            continue
        response = await get(client, path, {**base, param.name: bad})
        assert response.status == 400, (param.name, bad)
        assert list((await response.json())["field_errors"]) == [param.name]
    assert client.app[MOCK_STATE].calls == len(client.app[MOCK_STATE].requests)


@by_id(WITH_PATH)
async def test_bad_path_values(client: Client, operation: Operation) -> None:
    good = CATALOG.example(operation)
    query = required_query(operation)
    for position, param in enumerate(operation.path_params):
        bad = ["..", quote("a/b", safe=""), "a%25b"]
        if param.kind == "integer":
            bad += ["abc", "0", "-1", f"0{good[position]}", "999999999", "1.5"]
        elif param.enum:
            bad += ["not-a-choice"]
        else:
            pattern = param.pattern
            assert pattern is not None
            bad += [v for v in ("a.b", "a b", "a;b", "a:b", "a*b") if not pattern.search(v)]
        for value in bad:
            values = [*good[:position], value, *good[position + 1 :]]
            path = operation.path
            for name, filled in zip((p.name for p in operation.path_params), values, strict=True):
                path = path.replace(f"{{{name}}}", filled)
            response = await get(client, path, query)
            assert response.status == 404, (path, response.status)
            assert await response.json() == {"detail": "Not found."}


@by_id(OPERATIONS)
async def test_unauthenticated(client: Client, operation: Operation) -> None:
    path = CATALOG.example_path(operation)
    for headers in ({}, {"Authorization": "Token wrong"}, {"Authorization": f"Bearer {TOKEN}"}):
        response = await get(client, path, required_query(operation), headers=headers)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == "Token"
        assert await response.json() == {"detail": "Invalid token."}


@by_id(OPERATIONS)
async def test_faults(client: Client, operation: Operation) -> None:
    faults = client.app[MOCK_STATE].faults
    faults.status, faults.retry_after, faults.times = 429, 3, 1
    faults.extra_headers = {"X-Extra": "1"}
    path, query = CATALOG.example_path(operation), required_query(operation)
    throttled = await get(client, path, query)
    assert throttled.status == 429
    assert throttled.headers["Retry-After"] == "3"
    assert throttled.headers["X-Extra"] == "1"
    assert (await get(client, path, query)).status == 200
    assert faults == Faults(extra_headers={"X-Extra": "1"})


@MODULE_LOOP
async def test_drop_and_latency(client: Client) -> None:
    faults = client.app[MOCK_STATE].faults
    path = CATALOG.example_path(LISTS[0])
    faults.drop, faults.times = True, 1
    with pytest.raises(aiohttp.ClientError):
        await get(client, path)
    faults.latency = 0.01
    assert (await get(client, path)).status == 200
    assert client.app[MOCK_STATE].operation_calls == {LISTS[0].operation_id: 2}


# --- lists ------------------------------------------------------------------------------------


@by_id(LISTS)
async def test_paging_visits_every_item_once(client: Client, operation: Operation) -> None:
    path, query = CATALOG.example_path(operation), required_query(operation)
    first = await get_json(client, path, query)
    count = first["count"]
    page_size = operation.params.get("page_size")
    largest = 100 if page_size is None or page_size.maximum is None else page_size.maximum
    size = min(max(1, math.ceil(count / 4)), largest)
    home = origin(client)
    url: str | None = str(client.make_url(path).with_query({**query, "page_size": str(size)}))
    seen: list[bytes] = []
    pages = 0
    while url is not None:
        pages += 1
        assert url.startswith(f"{home}/api/v2/")
        parts = urlsplit(url)
        body = await get_json(client, parts.path + (f"?{parts.query}" if parts.query else ""))
        assert body["count"] == count
        assert 0 < len(body["results"]) <= size
        seen += [orjson.dumps(item.get("id", item)) for item in body["results"]]
        if pages == 1:
            assert body["previous"] is None
        else:
            before = parse_qs(urlsplit(body["previous"]).query)
            # page 1's link drops `page`, as Django REST framework's does
            assert before.get("page") == (None if pages == 2 else [str(pages - 1)])
            assert before["page_size"] == [str(size)]
        if body["next"] is not None:
            assert parse_qs(urlsplit(body["next"]).query)["page"] == [str(pages + 1)]
        url = body["next"]
    assert pages == max(1, math.ceil(count / size)) >= 2 or count <= 1
    assert len(seen) == count
    if "id" in operation.fields:
        assert len(set(seen)) == count


@by_id(LISTS)
async def test_page_bounds(client: Client, operation: Operation) -> None:
    path, query = CATALOG.example_path(operation), required_query(operation)
    count = (await get_json(client, path, query))["count"]
    beyond = await get(client, path, {**query, "page": str(count + 2)})
    assert beyond.status == 404
    assert await beyond.json() == {"detail": "Invalid page."}
    page_size = operation.params.get("page_size")
    if page_size is not None and page_size.maximum is not None:
        too_big = await get(client, path, {**query, "page_size": str(page_size.maximum + 1)})
        assert too_big.status == 400
        largest = await get_json(client, path, {**query, "page_size": str(page_size.maximum)})
        assert len(largest["results"]) == min(count, page_size.maximum)


@by_id(RETRIEVES_OF_LISTS)
async def test_retrieve_answers_the_listed_object(client: Client, operation: Operation) -> None:
    listing = next(o for o in LISTS if o.path == operation.collection)
    body = await get_json(client, listing.path, {"page": "2", "page_size": "1"})
    listed = body["results"][0]
    retrieved = await get_json(client, f"{operation.collection}/{listed['id']}")
    shared = set(listed) & set(retrieved)
    assert "id" in shared
    assert {k: listed[k] for k in shared} == {k: retrieved[k] for k in shared}
    missing = await get(client, f"{operation.collection}/999999999")
    assert missing.status == 404
    assert await missing.json() == {"detail": "Not found."}


# --- fields, expand, xml ----------------------------------------------------------------------


def one(body: Any) -> dict[str, Any]:
    item = body["results"][0] if isinstance(body, dict) and "results" in body else body
    item = item[0] if isinstance(item, list) else item
    assert isinstance(item, dict)
    return item


@by_id(WITH_FIELDS)
async def test_fields(client: Client, operation: Operation) -> None:
    wanted = list(operation.fields)[-2:]
    path, query = CATALOG.example_path(operation), required_query(operation)
    body = await get_json(client, path, {**query, "fields": ",".join(reversed(wanted))})
    assert list(one(body)) == wanted
    full = one(await get_json(client, path, query))
    assert one(body) == {k: full[k] for k in wanted}


@by_id(WITH_EXPAND)
async def test_expand(client: Client, operation: Operation) -> None:
    path, query = CATALOG.example_path(operation), required_query(operation)
    plain = one(await get_json(client, path, query))
    names = [n for n, t in operation.fields.items() if t in ("integer", "uri") and n != "id"]
    body = await get_json(client, path, {**query, "expand": ",".join(names)})
    expanded = one(body)
    assert list(expanded) == list(plain)
    for name in names:
        before, after = plain[name], expanded[name]
        if operation.fields[name] == "uri":
            assert isinstance(after, list)
            assert all(isinstance(item, dict) and "id" in item for item in after)
        elif CATALOG.is_reference(name):
            assert isinstance(after, dict)
            assert after["id"] == before
        else:
            assert after == before  # a plain number has nothing to expand


@by_id(WITH_XML)
async def test_xml(client: Client, operation: Operation) -> None:
    path, query = CATALOG.example_path(operation), required_query(operation)
    response = await get(client, path, {**query, "format": "xml"})
    assert response.status == 200, await response.text()
    assert response.content_type == "application/xml"
    root = ElementTree.fromstring(await response.read())
    assert root.tag == "root"
    body = await get_json(client, path, query)
    if operation.kind == "list":
        assert root.findtext("count") == str(body["count"])
        assert len(root.findall("results/list-item")) == len(body["results"])
        following = root.findtext("next") or None
        assert (following is None) == (body["next"] is None)
        if following is not None:
            assert parse_qs(urlsplit(following).query)["format"] == ["xml"]
    elif isinstance(body, dict):
        assert [child.tag for child in root] == list(body)


def test_xml_escapes_text() -> None:
    value = {"name": 'Tom & "Jerry" <b>', "tags": ["a<b", None, True], "odd key": 1}
    root = ElementTree.fromstring(to_xml(value))
    assert root.findtext("name") == 'Tom & "Jerry" <b>'
    assert [item.text for item in root.findall("tags/list-item")] == ["a<b", None, "true"]
    assert root.find("item").get("key") == "odd key"  # not a valid element name


@MODULE_LOOP
async def test_same_seed_same_objects() -> None:
    bodies = []
    operation = LISTS[0]
    path = CATALOG.example_path(operation)
    for seed in (7, 7, 8):
        app = create_mock_app(TOKEN, seed=seed, document=DOCUMENT)
        async with TestClient(TestServer(app)) as test_client:
            response = await test_client.get(path, headers=AUTH, params=required_query(operation))
            text = (await response.text()).replace(origin(test_client), "")
            bodies.append(text)
    assert bodies[0] == bodies[1]
    assert bodies[0] != bodies[2]
