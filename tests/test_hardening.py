"""Issue #12, the smaller holes, each through real HTTP: forged text log lines, Unicode spaces
after a key, FLUSHALL during a collapsed fetch, /metrics behind a key, hostile request ids,
and a rate limit on purges."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from aiohttp import web
from aiohttp.test_utils import TestClient

from proxy.logs import TextFormatter
from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY, REPORT, auth
from proxy.testing.faults import check_error_body, raw_request
from proxy.testing.mock import MockState
from proxy.testing.procs import ProxyProcess
from proxy.web.auth import hash_key
from tests.conftest import LogLines, MakeProxy
from tests.test_caching import get, status_params

Proxy = TestClient[web.Request, web.Application]
Q = "?format=json&limit=3"


def raw_get(target: str, *headers: str) -> bytes:
    """A GET as bytes; `headers` are complete header lines, sent byte for byte (UTF-8)."""
    lines = [f"GET {target} HTTP/1.1\r\n", "Host: proxy\r\n", *headers, "\r\n"]
    return "".join(lines).encode("utf-8")


# --- (a) text logs: a control character in the path cannot forge a line --------------------


class TextLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(TextFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def text_logs() -> Iterator[TextLines]:
    handler = TextLines()
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


FORGED = "12:00:00 WARNING redis unreachable event=redis_down"


async def test_text_logs_escape_control_characters_in_the_path() -> None:
    """A real `serve` with PROXY_LOG_FORMAT=text: `%0a`, `%0d`, `%e2%80%a8` in the path."""
    target = "/x%0a" + FORGED.replace(" ", "%20") + "%0d%e2%80%a8%00%1b[31m"
    async with ProxyProcess("http://127.0.0.1:9", workers=1, log_format="text") as proxy:
        answer = await raw_request(proxy.port, raw_get(target), linger=0)
        assert answer.status == 404
        await proxy.stop()
    lines = proxy.stderr.decode().splitlines()  # splitlines also splits at U+2028 and \x1c-\x1e
    access = [line for line in lines if " request " in line]
    assert len(access) == 1, lines
    assert not any(line.startswith(FORGED) for line in lines)
    assert "\\n12:00:00" in access[0] and "\\r\\u2028\\u0000\\u001b[31m" in access[0]
    assert "status=404" in access[0]


async def test_text_log_values_cannot_forge_fields(
    make_proxy: MakeProxy, text_logs: TextLines
) -> None:
    proxy = await make_proxy()
    response = await proxy.get('/x%20status=200%20client="admin"')
    assert response.status == 404
    access = [line for line in text_logs.lines if " request " in line]
    assert len(access) == 1
    assert 'path="/x status\\=200' not in access[0]  # quoted, not split into fields
    assert re.search(r' path="/x status=200 client=\\"admin\\""', access[0]), access[0]
    assert access[0].count("status=") == 2 and access[0].endswith("status=404")


async def test_json_logs_escape_them_too(make_proxy: MakeProxy, json_logs: LogLines) -> None:
    proxy = await make_proxy()
    assert (await proxy.get("/x%0aforged%e2%80%a8line")).status == 404
    lines = [line for line in json_logs.lines if '"message":"request"' in line]
    assert len(lines) == 1 and len(lines[0].splitlines()) == 1
    assert "\\n" in lines[0] and "\\u2028" in lines[0]


# --- (b) a key is compared as sent, minus HTTP's spaces and tabs ---------------------------


@pytest.mark.parametrize(
    ("header", "status"),
    [
        (f"Authorization: Token {KEY}", 200),
        (f"Authorization: Token {KEY} \t", 200),  # optional whitespace is not part of a value
        (f"Authorization: \tBearer {KEY}", 200),
        (f"X-API-Key: {KEY}", 200),
        (f"Authorization: Token {KEY}\u00a0", 401),  # NBSP
        (f"Authorization: Token \u00a0{KEY}", 401),
        (f"Authorization: Bearer {KEY}\u3000", 401),  # ideographic space
        (f"X-API-Key: {KEY}\u2003", 401),  # em space
        (f"X-API-Key: \u00a0{KEY}", 401),
        (f"Authorization: Token {KEY}\u200b", 401),  # zero-width space
    ],
    ids=lambda v: v if isinstance(v, int) else repr(v.replace(KEY, "KEY")),
)
async def test_unicode_spaces_around_a_key_do_not_authenticate(
    make_proxy: MakeProxy, mock_state: MockState, header: str, status: int
) -> None:
    proxy = await make_proxy()
    assert proxy.server.port is not None
    answer = await raw_request(proxy.server.port, raw_get(REPORT + Q, header + "\r\n"), linger=0)
    assert answer.status == status, answer.raw[:300]
    assert mock_state.calls == (1 if status == 200 else 0)
    if status == 401:
        assert check_error_body(answer.body, "application/json")["code"] == "not_authenticated"


# --- (c) FLUSHALL during a collapsed fetch costs at most one extra upstream call ------------


async def test_flushall_during_a_collapsed_fetch_costs_one_extra_call_not_one_per_waiter(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    """Four apps (replicas) on one real Redis: one holds the lease, three wait on it."""
    replicas = [await make_proxy(redis_url=redis_url, redis_timeout=3) for _ in range(4)]
    mock_state.faults.latency = 0.6
    holder = asyncio.ensure_future(get(replicas[0], Q))
    for _ in range(200):
        if mock_state.calls == 1:
            break
        await asyncio.sleep(0.01)
    waiters = [asyncio.ensure_future(get(proxy, Q)) for proxy in replicas[1:]]
    await asyncio.sleep(0.15)  # every waiter is polling the holder's lease
    assert mock_state.calls == 1
    client = aioredis.Redis.from_url(redis_url)
    # The lease (and nothing else yet) is gone; writes then wait 300 ms while reads go on, so
    # every waiter sees the lease vanish before any of them can take it over: deterministic.
    flush = client.pipeline(transaction=True)
    flush.flushall()
    flush.client_pause(300, all=False)
    await flush.execute()
    await client.aclose()
    answers = await asyncio.gather(holder, *waiters)
    assert [a.status for a in answers] == [200] * 4
    # The holder's call, and one call by the waiter that took the vanished lease over; the
    # other two waited on that one's lease and got its entry.
    assert mock_state.calls == 2
    collapsed = [a for a in answers[1:] if "collapsed" in status_params(a)]
    assert len(collapsed) == 2
    bodies = {await a.read() for a in answers}
    assert len(bodies) == 1


# --- (d) /metrics behind a key --------------------------------------------------------------

METRICS_KEY = "metrics-key-5d6e7f"


async def test_metrics_are_open_without_a_metrics_key(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    await get(proxy)
    response = await proxy.get("/metrics")
    assert response.status == 200
    assert 'client="billing"' in await response.text()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": f"Bearer {METRICS_KEY}"}, 200),
        ({"Authorization": f"Token {METRICS_KEY}"}, 200),
        ({"X-API-Key": METRICS_KEY}, 200),
        ({}, 401),
        ({"Authorization": f"Basic {METRICS_KEY}"}, 401),
        ({"Authorization": f"Bearer {METRICS_KEY}x"}, 401),
        (auth(KEY), 401),  # a client key reads reports, not the client list
        (auth(ADMIN_KEY), 401),
    ],
    ids=["bearer", "token", "x-api-key", "none", "basic", "suffix", "client", "admin"],
)
async def test_metrics_need_the_metrics_key_when_one_is_set(
    make_proxy: MakeProxy, headers: dict[str, str], status: int
) -> None:
    proxy = await make_proxy(metrics_key_sha256=hash_key(METRICS_KEY))
    await get(proxy)
    response = await proxy.get("/metrics", headers=headers)
    assert response.status == status
    body = await response.read()
    if status == 200:
        assert b'teamup_proxy_client_requests_total{client="billing"' in body
    else:
        assert check_error_body(body, response.content_type)["code"] == "not_authenticated"
        assert b"billing" not in body
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    # The report route still takes only client keys.
    assert (await get(proxy, Q)).status == 200
    assert (await proxy.get(REPORT + Q, headers={"X-API-Key": METRICS_KEY})).status == 401


# --- (e) X-Request-ID: kept only when it is a plain token -----------------------------------


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("trace-42.a", True),
        ("0af7651916cd43dd8448eb211c80319c", True),
        ("svc:billing_7", True),
        ("../../etc/passwd", False),
        ("a..b", False),
        ("a/b", False),
        (".hidden", False),
        ("-flag", False),
        ("a" * 128, True),
        ("a" * 129, False),
        ("https://evil/x", False),
        ("a+b=c", False),
        ("a@b", False),
    ],
)
async def test_only_a_plain_request_id_is_kept_and_sent_upstream(
    make_proxy: MakeProxy, mock_state: MockState, incoming: str, kept: bool
) -> None:
    proxy = await make_proxy()
    response = await get(proxy, Q, **{"X-Request-ID": incoming})
    assert response.status == 200
    sent = mock_state.requests[-1].headers
    sent_id = next(v for k, v in sent.items() if k.lower() == "x-request-id")
    assert sent_id == response.headers["X-Request-ID"]
    assert (sent_id == incoming) is kept
    assert "/" not in sent_id and ".." not in sent_id


# --- (f) purges are rate limited per admin key ----------------------------------------------


async def test_purges_are_rate_limited(
    make_proxy: MakeProxy, mock_state: MockState, redis_client: aioredis.Redis
) -> None:
    proxy = await make_proxy(redis_client=redis_client, admin_rate_limit="3/minute")
    admin = auth(ADMIN_KEY)
    statuses = [(await proxy.delete("/admin/cache", headers=admin)).status for _ in range(3)]
    assert statuses == [200, 200, 200]
    await get(proxy, Q)
    refused = await proxy.delete("/admin/cache", headers=admin)
    assert refused.status == 429
    body = check_error_body(await refused.read(), refused.content_type)
    assert body["code"] == "rate_limited" and body["type"] == "invalid_request_error"
    assert 1 <= int(refused.headers["Retry-After"]) <= 20
    assert status_params(await get(proxy, Q))[0] == "hit"  # nothing was purged
    assert mock_state.calls == 1
    # One-key purges count against the same bucket; callers' reports are not affected.
    assert (await proxy.delete("/admin/cache" + Q, headers=admin)).status == 429
    assert (await get(proxy, Q, Authorization=f"Token {OTHER_KEY}")).status == 200
    # A wrong key is refused as before, and does not spend the admin's bucket.
    assert (await proxy.delete("/admin/cache", headers=auth("nope"))).status == 401


async def test_the_purge_limit_is_shared_by_replicas(make_proxy: MakeProxy, redis_url: str) -> None:
    one, two = [await make_proxy(redis_url=redis_url, admin_rate_limit="2/minute") for _ in "ab"]
    admin = auth(ADMIN_KEY)
    statuses = [(await p.delete("/admin/cache", headers=admin)).status for p in (one, two, one)]
    assert statuses == [200, 200, 429]
