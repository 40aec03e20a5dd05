"""Every GET of the document through the proxy, end to end against the mock TeamUp: reachable
(but `auth/*`), cached under its own key (a miss, then a hit); lists followed through `next` to
their last page without touching TeamUp's host; read scopes; bad ids 404 and other methods 405
before anything is forwarded; TTL classes and their overrides; a retrieve's 404 kept briefly;
XML distrusted.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import fakeredis
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from defusedxml import ElementTree
from multidict import MultiDict

from proxy.backends import keys
from proxy.core.contract import CanonicalQuery
from proxy.core.operations import Route, Router, load_operations
from proxy.testing.document import Operation as MockOperation
from proxy.testing.document import operations as mock_operations
from proxy.testing.e2e import KEY, OTHER_KEY, TOKEN, FakeClock, auth
from proxy.testing.mock import MockState
from proxy.testing.objects import Catalog
from proxy.web.app import KEY_PREFIX
from proxy.web.auth import hash_key
from proxy.web.handlers import STATE
from tests.conftest import MakeProxy
from tests.fake_upstream import FakeUpstream

Proxy = TestClient[web.Request, web.Application]
DOCUMENT = load_operations()
MOCKED = [op for op in mock_operations() if op.area != "auth"]
CATALOG = Catalog(mock_operations(), 7)  # the mock's twin (seed 7): names objects that exist
ROUTER = Router(DOCUMENT.routed(reports=None, auth=True))


@pytest.fixture
def make_proxy(make_proxy: MakeProxy) -> MakeProxy:
    """The suite's proxy, waiting up to 10 s for TeamUp: the mock builds a list page when it is
    first asked (an 80 KB events page takes ~0.3 s on a quiet machine, several times that on
    a busy one), and nothing here is about timeouts: a miss must be stored, not a 504."""

    async def build(**overrides: Any) -> Any:
        overrides.setdefault("upstream_timeout", 10)
        return await make_proxy(**overrides)

    return build


def required_query(op: MockOperation) -> dict[str, str]:
    return {p.name: (p.enum[0] if p.enum else "1") for p in op.params.values() if p.required}


def key_of(path: str, query: dict[str, str]) -> str:
    """The cache key the proxy files a request under (worked out from the document)."""
    route = ROUTER.match(urlsplit(path).path)
    assert isinstance(route, Route)
    operation = route.operations["GET"]
    parsed = operation.contract.parse(MultiDict(query), route.path)
    assert isinstance(parsed, CanonicalQuery)
    return keys.cache_key(parsed)


async def read(proxy: Proxy, path: str, key: str = KEY, **params: str) -> tuple[int, Any, Any]:
    response = await proxy.get(path, params=params or None, headers=auth(key))
    body = await response.read()
    return response.status, response.headers, body


async def test_every_get_but_auth_is_reachable_and_cached_under_its_own_key(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    redis = fakeredis.FakeAsyncRedis()
    proxy = await make_proxy(redis_client=redis)
    assert len(MOCKED) + 32 == 162 - sum(op.area == "auth" for op in DOCUMENT.reads().values())
    seen: dict[str, str] = {}
    for op in MOCKED:
        path, query = CATALOG.example_path(op), required_query(op)
        status, headers, body = await read(proxy, path, **query)
        assert status == 200, (op.operation_id, path, body[:200])
        assert headers["X-Proxy-Operation"] == op.operation_id
        assert "fwd=uri-miss" in headers["Cache-Status"] and "stored" in headers["Cache-Status"]
        status, headers, again = await read(proxy, path, **query)
        assert status == 200 and again == body
        assert headers["Cache-Status"].startswith("teamup-proxy; hit"), op.operation_id
        key = key_of(path, query)
        assert key.startswith(f"v3:{op.operation_id}:")
        assert await redis.exists(f"{KEY_PREFIX}c:{{{key}}}"), op.operation_id
        assert key not in seen, (op.operation_id, seen.get(key))
        seen[key] = op.operation_id
    # One upstream call per operation: every second request was a hit.
    assert mock_state.operation_calls == {op.operation_id: 1 for op in MOCKED}


@pytest.mark.parametrize("public_url", [None, "https://teamup-proxy.internal/base"])
async def test_a_list_pages_through_the_proxy_to_its_last_page(
    make_proxy: MakeProxy, mock_state: MockState, public_url: str | None
) -> None:
    proxy = await make_proxy(public_url=public_url)
    base = public_url or ""
    url: str | None = f"{base}/api/v2/events?page_size=250"
    pages, ids = 0, []
    while url is not None:
        assert url.startswith(f"{base}/api/v2/events"), url
        response = await proxy.get(url.removeprefix(base), headers=auth())
        assert response.status == 200, await response.text()
        body = await response.json()
        text = await response.text()
        assert "127.0.0.1" not in text and "goteamup" not in text  # no upstream URL at all
        ids += [item["id"] for item in body["results"]]
        if pages:
            assert body["previous"] is not None and body["previous"].startswith(base + "/api/")
        url, pages = body["next"], pages + 1
    assert pages == 3 and len(ids) == len(set(ids)) == body["count"] == 600
    # Every page came from TeamUp once, through the proxy; following `next` again is all hits.
    assert mock_state.operation_calls == {"events_list": 3}
    response = await proxy.get("/api/v2/events?page=2&page_size=250", headers=auth())
    assert response.headers["Cache-Status"].startswith("teamup-proxy; hit")
    assert mock_state.operation_calls == {"events_list": 3}


async def test_xml_answers_have_their_links_rewritten_too(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(public_url="https://proxy.example")
    response = await proxy.get("/api/v2/customers?format=xml", headers=auth())
    assert response.status == 200 and response.content_type == "application/xml"
    root = ElementTree.fromstring(await response.read())
    assert root.findtext("next").startswith("https://proxy.example/api/v2/customers?")
    text = await response.text()
    assert "127.0.0.1" not in text


async def test_a_retrieve_by_id(make_proxy: MakeProxy, mock_state: MockState) -> None:
    proxy = await make_proxy()
    listed = await (await proxy.get("/api/v2/customers", headers=auth())).json()
    first = listed["results"][0]["id"]
    for spelled in (f"/api/v2/customers/{first}", f"/api/v2//customers/00{first}"):
        response = await proxy.get(spelled, headers=auth())
        assert response.status == 200
        assert (await response.json())["id"] == first
    assert mock_state.operation_calls == {"customers_list": 1, "customers_retrieve": 1}
    assert [r.path for r in mock_state.requests][-1] == f"/api/v2/customers/{first}"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/customers/abc",
        "/api/v2/customers/0",
        "/api/v2/customers/-1",
        "/api/v2/customers/1.5",
        "/api/v2/customers/%2e%2e",
        "/api/v2/customers/1%2F2",
        "/api/v2/customers/99999999999999999999999",
        "/api/v2/bulk_actions/a%2Fb",
        "/api/v2/bulk_actions/..",
        "/api/v2/nope",
        "/api/v2/customers/1/nope",
        "/api/v2/auth/check_account",
    ],
)
async def test_bad_path_parameters_and_undocumented_paths_are_404_never_forwarded(
    make_proxy: MakeProxy, mock_state: MockState, path: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(path, headers=auth())
    assert response.status == 404
    body = await response.json()
    assert body["code"] == "not_found" and body["type"] == "invalid_request_error"
    assert mock_state.calls == 0


async def test_other_methods_on_documented_paths_are_405(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    # The documented writes are routed too (issue 21): they are in `Allow`.
    for method, path, allow in [
        ("PUT", "/api/v2/customers", "GET, POST"),
        ("DELETE", "/api/v2/customers/1", "GET, PATCH, PUT"),
        ("HEAD", "/api/v2/events", "GET, POST"),
        ("GET", "/api/v2/reports/customer_credits/export", "POST"),
    ]:
        response = await proxy.request(method, path, headers=auth())
        assert response.status == 405, (method, path)
        assert response.headers["Allow"] == allow
    assert mock_state.calls == 0


async def test_auth_endpoints_only_when_an_operator_switches_them_on(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    off = await make_proxy()
    assert (await off.get("/api/v2/auth/check_account", headers=auth())).status == 404
    on = await make_proxy(auth_endpoints_enabled=True)
    auth_ops = [op for op in mock_operations() if op.area == "auth" and not op.path_params]
    assert auth_ops
    for op in auth_ops:
        response = await on.get(op.path, params=required_query(op), headers=auth())
        assert response.status == 200, (op.operation_id, await response.text())


def clients(**scopes: dict[str, Any]) -> dict[str, Any]:
    return {
        "billing": {
            "key_sha256": hash_key(KEY),
            "rate": "1000/minute",
            **scopes.get("billing", {}),
        },
        "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "1000/minute", **scopes.get("crm", {})},
    }


async def test_read_scopes_in_teamups_words(make_proxy: MakeProxy, mock_state: MockState) -> None:
    proxy = await make_proxy(
        clients=clients(
            billing={"read": ["customers", "reports"], "reports": ["customer_credits"]},
            crm={"read": ["*"]},
        )
    )
    assert (await read(proxy, "/api/v2/customers"))[0] == 200
    listed = await (await proxy.get("/api/v2/customers", headers=auth())).json()
    first = listed["results"][0]["id"]
    assert (await read(proxy, f"/api/v2/customers/{first}"))[0] == 200
    calls = mock_state.calls
    for path in ("/api/v2/events", "/api/v2/venues", "/api/v2/reports/customers/data"):
        status, _headers, body = await read(proxy, path, format="json")
        assert status == 403, path
        error = orjson.loads(body)
        assert error["code"] == "permission_denied" and "PROXY_CLIENTS" in error["message"]
    assert mock_state.calls == calls  # nothing forwarded
    status, _h, _b = await read(proxy, "/api/v2/reports/customer_credits/data", format="json")
    assert status == 200
    assert (await read(proxy, "/api/v2/events", key=OTHER_KEY))[0] == 200


async def test_ttl_classes_and_their_overrides(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(
        ttls={"events": {"fresh": 30}, "events_retrieve": {"fresh": 7}, "reference": {"stale": 5}},
        clock=FakeClock(),  # a still clock: the ttl a hit reports is the whole lifetime
    )

    def ttl(headers: Any) -> int:
        status = headers["Cache-Status"]
        return int(status.split("ttl=")[1].split(";")[0])

    assert (await read(proxy, "/api/v2/venues"))[0] == 200  # a miss, stored
    assert ttl((await read(proxy, "/api/v2/venues"))[1]) == 3600  # reference: an hour
    assert (await read(proxy, "/api/v2/customers"))[0] == 200  # a miss, stored
    assert ttl((await read(proxy, "/api/v2/customers"))[1]) == 60  # standard: a minute
    assert (await read(proxy, "/api/v2/events"))[0] == 200  # a miss, stored
    assert ttl((await read(proxy, "/api/v2/events"))[1]) == 30  # the segment's override
    events = await (await proxy.get("/api/v2/events", headers=auth())).json()
    one = f"/api/v2/events/{events['results'][0]['id']}"
    assert (await read(proxy, one))[0] == 200
    assert ttl((await read(proxy, one))[1]) == 7  # the operation's own, more specific
    policies = proxy.app[STATE].service.policies
    assert (policies["venues_list"].fresh, policies["venues_list"].stale) == (3600, 5)


async def test_a_retrieves_404_is_kept_briefly(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    clock = FakeClock()
    proxy = await make_proxy(clock=clock, not_found_ttl=5)
    for _ in range(3):
        status, headers, _body = await read(proxy, "/api/v2/customers/987654321")
        assert status == 404
    assert mock_state.operation_calls == {"customers_retrieve": 1}
    assert headers["Cache-Status"].startswith("teamup-proxy; hit")
    clock.advance(6)  # past PROXY_NOT_FOUND_TTL, and a 404 is never served stale
    assert (await read(proxy, "/api/v2/customers/987654321"))[0] == 404
    assert mock_state.operation_calls == {"customers_retrieve": 2}
    off = await make_proxy(not_found_ttl=0)
    await read(off, "/api/v2/customers/987654321")
    await read(off, "/api/v2/customers/987654321")
    assert mock_state.operation_calls == {"customers_retrieve": 4}


BOMB = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<root>&lol2;</root>"""


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (BOMB, b"application/xml"),
        (b"<root><count>1</count>", b"application/xml"),  # not well-formed
        (b'{"count": 1}', b"application/xml"),
        (b"<root>ok</root>", b"application/json"),  # asked for XML, got another type
    ],
)
async def test_xml_answers_are_distrusted(
    make_proxy: MakeProxy, body: bytes, content_type: bytes
) -> None:
    fake = FakeUpstream().start()
    try:
        fake.set(body=body, content_type=content_type)
        proxy = await make_proxy(upstream_url=fake.url)
        response = await proxy.get("/api/v2/customers?format=xml", headers=auth())
        assert response.status == 502
        assert (await response.json())["code"] == "upstream_invalid_response"
        assert fake.calls == 1
    finally:
        fake.stop()


async def test_an_xml_answer_that_echoes_the_credential_is_refused(make_proxy: MakeProxy) -> None:
    fake = FakeUpstream().start()
    try:
        fake.set(body=f"<root><t>{TOKEN}</t></root>".encode(), content_type=b"application/xml")
        proxy = await make_proxy(upstream_url=fake.url)
        response = await proxy.get("/api/v2/customers?format=xml", headers=auth())
        assert response.status == 502
        assert TOKEN not in await response.text()
    finally:
        fake.stop()
