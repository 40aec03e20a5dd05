"""Hostile input: fuzzed query strings through the app, malformed HTTP over raw sockets against a
real `serve --workers 1`, slow clients, cache poisoning and unauthenticated reads of the cache."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import re
import string
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from yarl import URL

from proxy.core.contract import MAX_QUERY_BYTES
from proxy.testing.e2e import ADMIN_KEY, COLUMNS, KEY, OTHER_KEY, REPORT, TOKEN, auth
from proxy.testing.faults import (
    MockProcess,
    RawAnswer,
    Truth,
    canonical,
    check_error_body,
    raw_request,
)
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess
from tests.conftest import MakeProxy
from tests.query_oracle import expected_outcome

MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
NAMES = (
    "columns",
    "created_at_gte",
    "created_at_lte",
    "created_at_timeframe",
    "customers",
    "format",
    "id_gt",
    "limit",
    "offset",
    "page",
    "page_size",
    "sort",
)
# Characters a request target may carry unencoded in a query (RFC 3986 pchar, `/` and `?`),
# minus the two that structure it.
SAFE = string.ascii_letters + string.digits + "-._~!$'()*,;:@/?"
# Raw fragments that are hostile as bytes: broken escapes, invalid UTF-8, a lone surrogate,
# CR LF, NUL, U+2028, encoded structure characters.
RAW_FRAGMENTS = (
    "%",
    "%G1",
    "%4",
    "%%41",
    "%C3%28",
    "%ED%A0%80",
    "%FF",
    "%00",
    "%0D%0A",
    "%0d%0aSet-Cookie:%20a=1",
    "%E2%80%A8",
    "+",
    "%2B",
    "%26",
    "%3D",
    "%5B%5D",
    "[]",
    "%EF%BC%91",  # a fullwidth digit one
    "%D9%A1",  # an Arabic-Indic digit one
)
ALLOWED_UPSTREAM_HEADERS = {
    "host",
    "authorization",
    "accept",
    "accept-encoding",
    "user-agent",
    "x-request-id",
    "teamup-provider-id",
    "teamup-request-mode",
}


# --- Hypothesis: arbitrary query strings through the real app --------------------------------


@st.composite
def encoded(draw: st.DrawFn, text: str) -> str:
    """`text` percent-encoded character by character, or left raw where that is legal."""
    out = []
    for char in text:
        if char in SAFE and draw(st.booleans()):
            out.append(char)
        else:
            escaped = quote(char, safe="")
            out.append(escaped.lower() if draw(st.booleans()) else escaped)
    return "".join(out)


names = (
    st.sampled_from(NAMES)
    | st.sampled_from(NAMES).map(lambda n: n + "[]")
    | st.sampled_from(NAMES).map(str.upper)
    | st.text(max_size=10)
)
texts = (
    st.integers(-5, 150).map(str)
    | st.integers(0, 2**70).map(str)
    | st.sampled_from(["", "0", "007", "+1", "-1", "1e3", "1.0", " 1", "0x10", "\uff11"])
    | st.sampled_from(COLUMNS).map(lambda c: c if len(c) % 2 else c.upper())
    | st.sampled_from(["-amount", "-", "json", "JSON", "csv", "Csv", "xml", "customer_id,-memo"])
    | st.lists(st.integers(0, 10**6), max_size=5).map(lambda xs: ",".join(map(str, xs)))
    | st.datetimes().map(lambda d: d.isoformat() + "Z")
    | st.sampled_from(
        [
            "2024-02-30T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01",
            "9999-12-31T23:59:59-23:59",
            "0001-01-01T00:00:00+01:00",
            "2024-01-01T00:00:00.1234567Z",
            "2024-01-01T24:00:00Z",
        ]
    )
    | st.text(max_size=20)
)


def zero_padded(low: int, high: int) -> st.SearchStrategy[str]:
    return st.tuples(st.integers(low, high), st.sampled_from(["", "0", "00"])).map(
        lambda pair: pair[1] + str(pair[0])
    )


def column_lists(prefix: bool) -> st.SearchStrategy[str]:
    column = st.sampled_from(COLUMNS).map(lambda c: c if len(c) % 3 else c.upper())
    if prefix:
        column = st.tuples(st.sampled_from(["", "-"]), column).map("".join)
    return st.lists(column, min_size=1, max_size=4).map(",".join)


moments = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2030, 1, 1)).map(
    lambda d: d.isoformat() + ("Z" if d.microsecond % 2 else "+05:30")
)
# Values the contract accepts for each name (most of the time), so the fuzz reaches the cache
# and the mock too, not only the validator.
PLAUSIBLE: dict[str, st.SearchStrategy[str]] = {
    "columns": column_lists(prefix=False),
    "sort": column_lists(prefix=True),
    "created_at_gte": moments,
    "created_at_lte": moments,
    "created_at_timeframe": st.text(min_size=1, max_size=30),
    "customers": st.lists(st.integers(1, 10**6), min_size=1, max_size=5).map(
        lambda xs: ",".join(map(str, xs))
    ),
    "format": st.sampled_from(["json", "csv", "JSON", "Csv"]),
    "id_gt": zero_padded(0, 5000),
    "offset": zero_padded(0, 5000),
    "limit": zero_padded(1, 100),
    "page": zero_padded(1, 50),
    "page_size": zero_padded(0, 100),
}


@st.composite
def plausible_pair(draw: st.DrawFn) -> str:
    name = draw(st.sampled_from(NAMES))
    spelled = (
        name + "[]" if name in ("columns", "sort", "customers") and draw(st.booleans()) else name
    )
    return f"{draw(encoded(spelled))}={draw(encoded(draw(PLAUSIBLE[name])))}"


@st.composite
def hostile_pair(draw: st.DrawFn) -> str:
    name = draw(encoded(draw(names)))
    if draw(st.integers(0, 9)) == 0:
        return name
    value = draw(st.sampled_from(RAW_FRAGMENTS) | encoded(draw(texts)))
    return f"{name}={value}"


@st.composite
def query_strings(draw: st.DrawFn) -> str:
    """Mostly `name=value` pairs (plausible, odd spellings, junk), sometimes raw noise."""
    mode = draw(st.integers(0, 19))
    if mode == 0:
        return draw(st.text(alphabet=SAFE + "&=%+[]", max_size=80))
    if mode == 1:
        return "format=json&created_at_timeframe=" + "a" * draw(st.integers(4000, 4200))
    hostility = draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 1.0]))
    parts = [
        draw(hostile_pair() if draw(st.floats(0, 1)) < hostility else plausible_pair())
        for _ in range(draw(st.integers(0, 6)))
    ]
    return "&".join(parts)


@pytest.fixture
async def mock_http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def fuzz_proxy(make_proxy: MakeProxy) -> TestClient[web.Request, web.Application]:
    """One proxy app (embedded store) for every example of the fuzz test."""
    return await make_proxy()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(qs=query_strings())
async def test_fuzzed_query_strings_get_a_report_or_a_clean_error(
    fuzz_proxy: TestClient[web.Request, web.Application],
    mock_server: TestServer,
    mock_state: MockState,
    mock_http: aiohttp.ClientSession,
    qs: str,
) -> None:
    proxy = fuzz_proxy
    # What aiohttp will hand the handler, and what an oracle written apart from the contract
    # says about it (tests/query_oracle.py).
    decoded = URL.build(path=REPORT, query_string=qs, encoded=True).query
    expected = expected_outcome(decoded.items(), raw=qs)
    calls = mock_state.calls

    response = await proxy.get(URL(f"{REPORT}?{qs}", encoded=True), headers=auth())
    body = await response.read()
    event(f"status {response.status}")

    assert response.status < 500, body
    assert "Set-Cookie" not in response.headers
    if len(qs) > MAX_QUERY_BYTES:
        assert response.status == 414
        assert check_error_body(body, response.content_type)["code"] == "query_too_long"
        assert mock_state.calls == calls
    elif expected.canonical is not None:
        assert response.status == 200, body
        assert mock_state.calls - calls in (0, 1)
        if mock_state.calls > calls:  # what went upstream is the canonical query, nothing else
            assert mock_state.requests[-1].query_string == expected.canonical
        assert response.headers["X-Proxy-Canonical-Query"] == expected.canonical
        assert response.headers["Cache-Status"].startswith("teamup-proxy;")
        fmt = "json" if "format=json" in expected.canonical.split("&") else "csv"
        async with mock_http.get(
            URL(f"{mock_server.make_url(REPORT)}?{expected.canonical}", encoded=True),
            headers={"Authorization": f"Token {TOKEN}"},
        ) as truth:
            assert truth.status == 200
            want = await truth.read()
        if fmt == "json":
            assert response.content_type == "application/json"
            assert orjson.loads(body) == orjson.loads(want)
        else:
            assert response.content_type == "text/csv"
            assert body == want
    else:
        assert response.status == 400, body
        parsed = check_error_body(body, response.content_type)
        assert parsed["code"] == "parameter_invalid"
        assert set(parsed["field_errors"]) == expected.bad
        assert mock_state.calls == calls  # nothing invalid leaves the building


# --- raw sockets against a real `serve --workers 1` ------------------------------------------


@dataclass
class Served:
    mock: MockProcess
    proxy: ProxyProcess
    truth: Truth


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def served() -> AsyncIterator[Served]:
    mock = await MockProcess().start()
    proxy = ProxyProcess(mock.url, workers=1)
    await proxy.start()
    try:
        yield Served(mock, proxy, Truth(mock))
    finally:
        if proxy.process is not None and proxy.process.returncode is None:
            await proxy.stop()
        await mock.stop()


def request(target: str, *extra: str, host: str = "127.0.0.1", key: str | None = KEY) -> bytes:
    """A GET request as bytes; `extra` header lines are inserted verbatim (no CRLF added)."""
    lines = [f"GET {target} HTTP/1.1\r\n", f"Host: {host}\r\n"]
    if key is not None:
        lines.append(f"Authorization: Token {key}\r\n")
    lines.extend(extra)
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")


def report(n: int, fmt: str = "json") -> str:
    """A report target nobody else in this module asks for."""
    return f"{REPORT}?format={fmt}&limit=2&offset={n}"


BIG = "a" * 9000
RAW_CASES: dict[str, tuple[bytes, int]] = {
    # name: (bytes, the status it gets; 200: a legitimate report request, from upstream)
    "bare CR in a header value": (request(report(1), "X-Request-ID: abc\rInjected: 1\r\n"), 400),
    "bare LF in a header value": (request(report(2), "X-Request-ID: abc\nInjected: 1\r\n"), 400),
    "NUL in a header value": (request(report(3), "X-Request-ID: a\x00b\r\n"), 400),
    "obsolete line folding": (request(report(4), "X-Request-ID: abc\r\n folded\r\n"), 400),
    "CR LF in a header name": (request(report(5), "X-A\r\nB: c\r\n"), 400),
    "conflicting Content-Length": (
        request(report(6), "Content-Length: 0\r\n", "Content-Length: 5\r\n") + b"hello",
        400,
    ),
    "duplicate equal Content-Length": (
        request(report(7), "Content-Length: 0\r\n", "Content-Length: 0\r\n"),
        400,
    ),
    "negative Content-Length": (request(report(8), "Content-Length: -1\r\n"), 400),
    "Transfer-Encoding and Content-Length": (
        request(report(9), "Content-Length: 5\r\n", "Transfer-Encoding: chunked\r\n")
        + b"0\r\n\r\n",
        400,
    ),
    "smuggled second request (TE.CL)": (
        request(report(10), "Content-Length: 0\r\n", "Transfer-Encoding: chunked\r\n")
        + b"0\r\n\r\n"
        + request("/admin/cache", key=ADMIN_KEY).replace(b"GET", b"DELETE", 1),
        400,
    ),
    "Transfer-Encoding chunked, then identity": (
        request(report(11), "Transfer-Encoding: chunked, identity\r\n") + b"0\r\n\r\n",
        400,
    ),
    "header over 8 KiB": (request(report(12), f"X-Big: {BIG}\r\n"), 400),
    "request line over 8 KiB": (request(report(13) + "&x=" + BIG), 414),
    "200 headers": (request(report(14), *(f"X-H{i}: v\r\n" for i in range(200))), 400),
    "absolute-form to another host": (b"GET http://evil/ HTTP/1.1\r\nHost: evil\r\n\r\n", 404),
    "CONNECT": (b"CONNECT evil:443 HTTP/1.1\r\nHost: evil:443\r\n\r\n", 404),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404),
    "TLS handshake bytes": (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(60), 400),
    "non-ASCII bytes in the target": (
        request(report(15)).replace(b"format=json", b"format=\xff\xfejson"),
        400,
    ),
    "space in the target": (request(report(16) + " x"), 400),
    "dot segments": (request("/api/v2/reports/../reports/customer_credits/data?limit=1"), 404),
    "encoded dot segments": (
        request("/api/v2/reports/%2e%2e/reports/customer_credits/data?limit=1"),
        404,
    ),
    "encoded slash": (request("/api/v2/reports%2Fcustomer_credits/data?limit=1"), 404),
    "backslash path": (request("/api/v2/reports\\customer_credits\\data?limit=1"), 404),
    "path with a NUL escape": (request("/api/v2/reports/customer_credits/data%00?limit=1"), 404),
    "POST with a body": (
        request(REPORT, "Content-Length: 3\r\n").replace(b"GET", b"POST", 1) + b"abc",
        405,
    ),
    "X-HTTP-Method-Override to DELETE": (
        request("/admin/cache", "X-HTTP-Method-Override: DELETE\r\n", key=ADMIN_KEY),
        405,
    ),
    "query over 4 KiB": (request(f"{report(17)}&created_at_timeframe={'a' * 4100}"), 414),
    "query over 4 KiB, no key": (
        request(f"{report(18)}&created_at_timeframe={'a' * 4100}", key=None),
        414,
    ),
    "CR LF escaped into the query": (
        request(f"{REPORT}?format=json%0D%0ASet-Cookie:%20a=1&limit=1"),
        400,
    ),
    # Legitimate report requests in unusual clothes: a report, from the configured upstream.
    "absolute-form report": (request(f"http://evil{report(20)}", host="evil"), 200),
    "percent-encoded letter in the path": (
        request(f"/api/v2/reports/customer_credits/%64ata?format=json&limit=2&offset={21}"),
        200,
    ),
    "doubled slash path": (
        request(f"/api/v2//reports/customer_credits/data?format=json&limit=2&offset={22}"),
        200,
    ),
    "Host of another site": (request(report(23), host="evil.example"), 200),
    "HTTP/1.0": (request(report(24)).replace(b"HTTP/1.1", b"HTTP/1.0", 1), 200),
    "a chunked body on a GET": (
        request(report(25), "Transfer-Encoding: gzip, chunked\r\n") + b"3\r\nabc\r\n0\r\n\r\n",
        200,
    ),
}


# Cases the app itself refuses (JSON in TeamUp's shape); the others never reach it.
APP_REFUSED = {
    "request line over 8 KiB",
    "absolute-form to another host",
    "CONNECT",
    "OPTIONS *",
    "dot segments",
    "encoded dot segments",
    "encoded slash",
    "backslash path",
    "path with a NUL escape",
    "POST with a body",
    "X-HTTP-Method-Override to DELETE",
    "query over 4 KiB",
    "query over 4 KiB, no key",
    "CR LF escaped into the query",
}
APP_CODES = {
    400: "parameter_invalid",
    404: "not_found",
    405: "method_not_allowed",
    414: "query_too_long",
}


def check_raw_answer(answer: RawAnswer) -> None:
    """Whatever came back: no 5xx, no cookie, nothing injected, errors from the app are JSON."""
    assert answer.responses or answer.closed, answer.raw[:300]
    for status, headers, body in answer.responses:
        assert status < 500, answer.raw[:300]
        assert "set-cookie" not in headers
        assert "injected" not in headers
        if headers.get("content-type", "").startswith("application/json"):
            check_error_body(body, headers["content-type"]) if status >= 400 else orjson.loads(body)


@MODULE_LOOP
@pytest.mark.parametrize("name", list(RAW_CASES))
async def test_raw_request_is_handled(served: Served, name: str) -> None:
    data, expected = RAW_CASES[name]
    await served.mock.reset()
    answer = await raw_request(served.proxy.port, data, within=5)
    calls = await served.mock.calls()
    check_raw_answer(answer)
    # Every case gets an answer (a bare close would pass nothing off as handled), exactly one.
    assert [status for status, _h, _b in answer.responses] == [expected], answer.raw[:300]
    if expected != 200:
        assert calls == 0  # nothing reached TeamUp
        _status, headers, body = answer.responses[0]
        if headers.get("content-type", "").startswith("application/json"):
            # Refused by the app: TeamUp's shape, and the code that says why.
            code = check_error_body(body, headers["content-type"])["code"]
            assert code == APP_CODES[expected], (name, code)
        else:
            # Refused by the HTTP parser before the app: a 400, and the connection closed, so
            # nothing after the bad bytes can be read as a second request.
            assert expected == 400 and name not in APP_REFUSED, name
            assert answer.closed
        assert (name in APP_REFUSED) == headers.get("content-type", "").startswith(
            "application/json"
        )
        return
    # A report: exactly the mock's body for the canonical query, fetched from the configured
    # upstream (the mock saw the call, with its own Host), whatever the request line said.
    assert answer.status == 200, answer.raw[:300]
    assert calls == 1
    state = await served.mock.state()
    sent = {k.lower(): v for k, v in state["requests"][0]["headers"].items()}
    assert sent["host"] == f"127.0.0.1:{served.mock.port}"
    assert set(sent) <= ALLOWED_UPSTREAM_HEADERS
    query = state["requests"][0]["query_string"]
    content_type, body = await served.truth.get(canonical(query))
    assert answer.headers["content-type"].startswith(content_type)
    assert orjson.loads(answer.body) == orjson.loads(body)


@MODULE_LOOP
async def test_pipelined_requests_each_get_their_answer(served: Served) -> None:
    data = request(report(30)) + request(report(31, "csv")) + request("/healthz")
    answer = await raw_request(served.proxy.port, data, expect=3, linger=0)
    assert [status for status, _h, _b in answer.responses] == [200, 200, 200]
    assert answer.responses[1][1]["content-type"].startswith("text/csv")
    assert orjson.loads(answer.responses[2][2]) == {"status": "ok"}


@MODULE_LOOP
async def test_request_id_is_reflected_only_when_safe(served: Served) -> None:
    ok = await raw_request(served.proxy.port, request(report(32), "X-Request-ID: trace-42.a\r\n"))
    assert ok.headers["x-request-id"] == "trace-42.a"
    for hostile in ("abc%0d%0aSet-Cookie:%20a=1", "<script>", "a" * 200, "a b"):
        answer = await raw_request(
            served.proxy.port, request(report(33), f"X-Request-ID: {hostile}\r\n")
        )
        assert answer.status == 200
        assert answer.headers["x-request-id"] != hostile
        assert re.fullmatch(r"[A-Za-z0-9._:@/+=-]{1,128}", answer.headers["x-request-id"])


@MODULE_LOOP
async def test_a_valid_odd_character_is_forwarded_encoded(served: Served) -> None:
    """U+2028 inside free text is legal; it travels percent-encoded, never as a raw byte."""
    await served.mock.reset()
    answer = await raw_request(
        served.proxy.port,
        request(f"{REPORT}?format=json&limit=1&created_at_timeframe=a%E2%80%A8b"),
    )
    assert answer.status == 200
    assert answer.headers["x-proxy-canonical-query"].isascii()
    state = await served.mock.state()
    assert "created_at_timeframe=a%E2%80%A8b" in state["requests"][0]["query_string"]


# --- cache poisoning -----------------------------------------------------------------------

POISON: dict[str, dict[str, str]] = {
    "Accept-Encoding gzip": {"Accept-Encoding": "gzip"},
    "Accept-Encoding br only": {"Accept-Encoding": "br, *;q=0"},
    "X-Forwarded-Host": {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "http"},
    "X-Original-URL": {"X-Original-URL": "/api/v2/reports/customer_credits/data?limit=1"},
    "X-Rewrite-URL": {"X-Rewrite-URL": "/api/v2/reports/customer_credits/data?format=csv"},
    "Accept text/csv": {"Accept": "text/csv"},
    "Accept application/xml": {"Accept": "application/xml"},
    "Accept text/html": {"Accept": "text/html"},
    "Host": {"Host": "evil.example"},
    "Range": {"Range": "bytes=0-9"},
    "Cookie": {"Cookie": "session=attacker"},
    "Cache-Control no-cache": {"Cache-Control": "no-cache", "Pragma": "no-cache"},
    "X-HTTP-Method-Override": {"X-HTTP-Method-Override": "DELETE"},
    "Forwarded": {"Forwarded": "for=1.2.3.4;host=evil.example;proto=https"},
}


async def fetch(
    url: str, target: str, headers: dict[str, str]
) -> tuple[int, str, bytes, dict[str, str]]:
    async with (
        aiohttp.ClientSession(auto_decompress=False) as http,
        http.get(URL(f"{url}{target}", encoded=True), headers=headers) as response,
    ):
        return response.status, response.content_type, await response.read(), dict(response.headers)


@MODULE_LOOP
@pytest.mark.parametrize("fmt", ["json", "csv"])
@pytest.mark.parametrize("variant", list(POISON))
async def test_first_callers_headers_cannot_poison_the_entry(
    served: Served, variant: str, fmt: str
) -> None:
    target = report(100 + list(POISON).index(variant), fmt)
    await served.mock.reset()
    first = await fetch(served.proxy.url, target, {**auth(), **POISON[variant]})
    assert first[0] == 200
    assert "fwd=uri-miss" in first[3]["Cache-Status"]
    state = await served.mock.state()
    assert state["calls"] == 1
    sent = {k.lower(): v for k, v in state["requests"][0]["headers"].items()}
    assert set(sent) <= ALLOWED_UPSTREAM_HEADERS, sent
    assert "evil" not in repr(sent) and "attacker" not in repr(sent)

    later = await fetch(served.proxy.url, target, {"X-API-Key": OTHER_KEY})
    assert later[0] == 200
    assert later[3]["Cache-Status"].startswith("teamup-proxy; hit")
    assert "Content-Encoding" not in later[3]
    assert (await served.mock.calls()) == 1
    content_type, body = await served.truth.get(canonical(target.partition("?")[2]))
    for status, got_type, got_body, _headers in (first, later):
        assert status == 200
        assert got_type == content_type
        assert got_body == body


BAD_CALLERS: dict[str, dict[str, str]] = {
    "no credentials": {},
    "wrong key": {"Authorization": "Token not-a-key"},
    "key with a suffix": {"Authorization": f"Token {KEY}x"},
    "key as Basic": {"Authorization": "Basic " + base64.b64encode(f"{KEY}:".encode()).decode()},
    "Basic beside a good X-API-Key": {"Authorization": "Basic x", "X-API-Key": KEY},
    "the upstream token": {"Authorization": f"Token {TOKEN}"},
    "the admin key": {"X-API-Key": ADMIN_KEY},
    "empty Bearer": {"Authorization": "Bearer "},
    "cache-only request": {"Cache-Control": "only-if-cached"},
}


@MODULE_LOOP
@pytest.mark.parametrize("caller", list(BAD_CALLERS))
async def test_unauthenticated_callers_never_read_the_cache(served: Served, caller: str) -> None:
    target = report(200, "json")
    cached = await fetch(served.proxy.url, target, auth())
    assert cached[0] == 200
    for path in (target, target.replace("/v2/", "/v2//", 1)):
        status, content_type, body, headers = await fetch(
            served.proxy.url, path, BAD_CALLERS[caller]
        )
        assert status == 401
        assert check_error_body(body, content_type)["code"] == "not_authenticated"
        assert b"rows" not in body and b"column_headers" not in body
        assert "Cache-Status" not in headers and "Age" not in headers
        assert "X-Proxy-Canonical-Query" not in headers


# --- slow clients --------------------------------------------------------------------------


@MODULE_LOOP
async def test_slow_and_silent_clients_are_cut_off(served: Served) -> None:
    proxy = ProxyProcess(served.mock.url, workers=1, client_header_timeout=2)
    await proxy.start()
    try:
        trickle = request(report(300))
        started = time.monotonic()
        answers = await asyncio.gather(
            # One byte every 0.25 s: the whole request would take ~40 s.
            raw_request(proxy.port, [trickle[i : i + 1] for i in range(len(trickle))], delay=0.25,
                        within=6),
            raw_request(proxy.port, b"", within=6),  # connects, says nothing
            raw_request(proxy.port, f"GET {REPORT}\r\n".encode(), within=6),  # never finishes
        )  # fmt: skip
        elapsed = time.monotonic() - started
    finally:
        await proxy.stop()
    for answer in answers:
        assert answer.closed, "the proxy still holds the connection after 6 s"
        assert answer.status is None or 400 <= answer.status < 500
    assert elapsed < 6


# --- and nothing of it in the logs ---------------------------------------------------------


@MODULE_LOOP
async def test_logs_hold_no_credential_after_all_that(served: Served) -> None:
    """Keys in malformed header lines, parameter names, bad credentials: none of it is logged."""
    hostile = [
        request(report(400), f"X-Request-ID: {KEY}\x01\r\n"),
        request(f"{REPORT}?{KEY}=1&token={TOKEN}"),
        request(report(401)).replace(f"Token {KEY}".encode(), f"Token {KEY}\x7f".encode()),
        request(report(402), key=f"{KEY} {TOKEN}"),
    ]
    for data in hostile:
        check_raw_answer(await raw_request(served.proxy.port, data, linger=0.1))
    assert await served.proxy.stop() == 0
    logs = served.proxy.stderr
    assert b'"status":401' in logs and b'"status":404' in logs  # the access log was on
    for secret in (KEY, OTHER_KEY, ADMIN_KEY, TOKEN):
        assert secret.encode() not in logs, secret
