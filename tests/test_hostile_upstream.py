"""A hostile TeamUp (tests/fake_upstream.py) against real `serve --workers 2` processes.

Retry-After that lies, bodies that never end, gzip bombs, answers that are not what was asked
for, the credential echoed back, headers that are not text, statuses that are not answers,
callers that never read. No fault may produce a 500, a hung caller, or an unbounded worker.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from multidict import CIMultiDict

from proxy.testing.e2e import ADMIN_KEY, KEY, REPORT, TOKEN, FakeClock, auth
from proxy.testing.faults import check_error_body
from proxy.testing.procs import ProxyProcess
from proxy.testing.support import RedisServer
from tests.conftest import MakeProxy
from tests.fake_upstream import CSV, ETAG, JSON_BODY, LAST_MODIFIED, FakeUpstream, gzip_bomb
from tests.test_serve import metric_sum, worker_pids

pytestmark = pytest.mark.slow
MODULE_LOOP = pytest.mark.asyncio(loop_scope="module")
MiB = 1024 * 1024
CAP = 4 * MiB  # PROXY_UPSTREAM_MAX_BODY_BYTES of the proxies under test
CIRCUIT_DEFAULT = 2.0
CIRCUIT_MAX = 5.0
RECHECK = 1.0  # proxy.upstream.guard.RECHECK_SECONDS
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=15)
_queries = itertools.count(1)


def fresh_query(fmt: str | None = None) -> str:
    """A query no other test asked (its own cache key)."""
    query = f"?offset={next(_queries)}"
    return query + (f"&format={fmt}" if fmt else "")


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    upstream = FakeUpstream().start()
    yield upstream
    upstream.stop()


@pytest.fixture(autouse=True)
def clean_fake(fake: FakeUpstream) -> Iterator[None]:
    fake.reset()
    yield
    fake.reset()


def hostile_settings(redis_url: str, **extra: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "upstream_max_body_bytes": CAP,
        "upstream_circuit_default": CIRCUIT_DEFAULT,
        "upstream_circuit_max": CIRCUIT_MAX,
        "upstream_timeout": 5,
        "cache_ttl": 1,
        "cache_stale_while_revalidate": "false",
    }
    values.update(extra)
    return values


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def proxy(fake: FakeUpstream, redis_server: RedisServer) -> AsyncIterator[ProxyProcess]:
    """Two workers in front of the fake: answers fresh for 1 s, stale served only on failure."""
    with redis_server.client() as client:
        client.flushall()
    process = ProxyProcess(fake.url, workers=2, **hostile_settings(redis_server.url))
    await process.start()
    pids = await both_workers(process)
    try:
        yield process
        print("module proxy VmHWM (MiB):", {pid: vm_kib(pid, "VmHWM") // 1024 for pid in pids})
    finally:
        if process.process is not None and process.process.returncode is None:
            await process.stop()
    assert TOKEN not in process.stderr.decode(errors="replace")


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A fresh connection per request, so the kernel spreads them over both workers."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=CLIENT_TIMEOUT) as session:
        yield session


async def until(check: Callable[[], bool], within: float = 5.0) -> None:
    """Poll until `check()` holds (for background work and log lines, never for a TTL)."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def both_workers(process: ProxyProcess) -> list[int]:
    """Wait until both workers listen; their pids."""
    await until(lambda: process.stderr.count(b'"event":"listening"') >= 2, 30)
    assert process.process is not None
    pids = worker_pids(process.process.pid)
    assert len(pids) == 2
    return pids


class Got:
    def __init__(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def worker(self) -> str:
        """Which worker answered: its request ids share a random per-process prefix."""
        return self.headers["X-Request-ID"][:12]

    def error(self) -> dict[str, Any]:
        return check_error_body(self.body, self.headers.get("Content-Type", ""))

    def leaks_token(self) -> bool:
        return TOKEN.encode() in self.body or any(TOKEN in v for v in self.headers.values())


async def get(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str] | None = None,
    client_timeout: aiohttp.ClientTimeout | None = None,
) -> Got:
    headers = headers if headers is not None else auth()
    async with http.get(url, headers=headers, timeout=client_timeout or http.timeout) as response:
        return Got(response.status, CIMultiDict(response.headers), await response.read())


async def admin(http: aiohttp.ClientSession, proxy_url: str, method: str) -> dict[str, Any]:
    async with http.request(method, f"{proxy_url}/admin/circuit", headers=auth(ADMIN_KEY)) as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body


async def spread(http: aiohttp.ClientSession, proxy: ProxyProcess, n: int = 16) -> list[Got]:
    """`n` requests for new keys, each on a new connection."""
    return [await get(http, proxy.url + REPORT + fresh_query()) for _ in range(n)]


# --- 1. Retry-After, capped, with Redis as the circuit's truth ------------------------------


def http_date_in(seconds: float) -> str:
    return email.utils.formatdate(time.time() + seconds, usegmt=True)


RETRY_AFTERS = {
    "absurd 999999": ("999999", CIRCUIT_DEFAULT, CIRCUIT_DEFAULT),
    "1e308": ("1e308", CIRCUIT_DEFAULT, CIRCUIT_DEFAULT),
    "negative": ("-5", CIRCUIT_DEFAULT, CIRCUIT_DEFAULT),
    "garbage": ("soon, please", CIRCUIT_DEFAULT, CIRCUIT_DEFAULT),
    "over the cap": ("3600", CIRCUIT_MAX, CIRCUIT_MAX),
    "HTTP-date": ("date+4", 2.9, 4.1),
}


@MODULE_LOOP
@pytest.mark.parametrize("case", list(RETRY_AFTERS))
async def test_retry_after_is_believed_only_within_the_cap_and_delete_closes_every_worker(
    case: str, fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    raw, low, high = RETRY_AFTERS[case]
    value = http_date_in(4) if raw == "date+4" else raw
    fake.set(status=429, reason="Too Many Requests", headers=[f"Retry-After: {value}".encode()])
    first = await get(http, proxy.url + REPORT + fresh_query())
    assert first.status == 503
    assert first.error()["code"] == "upstream_rate_limited"
    assert 1 <= int(first.headers["Retry-After"]) <= CIRCUIT_MAX

    state = await admin(http, proxy.url, "GET")
    assert state["open"] is True
    assert low - 0.5 <= state["retry_after"] <= high
    assert state["opened_by"]["retry_after"] == value
    assert state["opened_by"]["wait_s"] <= CIRCUIT_MAX

    held = await spread(http, proxy)
    assert {g.status for g in held} == {503}
    assert len({g.worker for g in held}) == 2  # both workers hold calls back
    assert fake.calls == 1  # nothing else reached TeamUp

    closed = await admin(http, proxy.url, "DELETE")
    assert closed["closed"] is True and closed["open"] is False
    fake.reset()  # TeamUp answers normally again
    await asyncio.sleep(RECHECK + 0.3)  # every worker re-reads the shared circuit by then
    after = await spread(http, proxy)
    assert [g.status for g in after] == [200] * len(after)
    assert len({g.worker for g in after}) == 2
    assert (await admin(http, proxy.url, "GET"))["open"] is False


@MODULE_LOOP
async def test_deleting_the_redis_key_closes_the_circuit_everywhere(
    fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    fake.set(status=429, reason="Too Many Requests", headers=[b"Retry-After: 5"])
    assert (await get(http, proxy.url + REPORT + fresh_query())).status == 503
    assert {g.status for g in await spread(http, proxy, 8)} == {503}
    with redis_server.client() as client:
        assert client.delete("teamup-proxy:circuit") == 1
    fake.reset()
    await asyncio.sleep(RECHECK + 0.3)  # well inside the 5 s the circuit would have lasted
    after = await spread(http, proxy)
    assert [g.status for g in after] == [200] * len(after)
    assert len({g.worker for g in after}) == 2


@MODULE_LOOP
async def test_a_circuit_key_without_expiry_is_bounded_by_the_cap(
    proxy: ProxyProcess, http: aiohttp.ClientSession, redis_server: RedisServer
) -> None:
    with redis_server.client() as client:
        client.set("teamup-proxy:circuit", b"set by hand")
        assert (await get(http, proxy.url + REPORT + fresh_query())).status == 503
        assert 0 < client.pttl("teamup-proxy:circuit") <= CIRCUIT_MAX * 1000
    state = await admin(http, proxy.url, "GET")
    assert state["open"] is True and state["retry_after"] <= CIRCUIT_MAX
    assert (await admin(http, proxy.url, "DELETE"))["closed"] is True
    await asyncio.sleep(RECHECK + 0.3)  # the other worker too, before the next test


@MODULE_LOOP
async def test_admin_circuit_wants_the_admin_key(
    proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    for method in ("GET", "DELETE"):
        async with http.request(method, f"{proxy.url}/admin/circuit") as r:
            assert r.status == 401
            check_error_body(await r.read(), r.headers["Content-Type"])
        async with http.request(method, f"{proxy.url}/admin/circuit", headers=auth(KEY)) as r:
            assert r.status == 403
            assert (await r.json())["code"] == "permission_denied"


async def test_without_redis_the_local_circuit_still_holds_capped(
    make_proxy: MakeProxy, fake: FakeUpstream
) -> None:
    proxy = await make_proxy(upstream_url=fake.url, upstream_circuit_max=CIRCUIT_MAX)
    fake.set(status=429, reason="Too Many Requests", headers=[b"Retry-After: 3600"], times=1)
    first = await proxy.get(REPORT + "?limit=1", headers=auth())
    assert first.status == 503
    assert int(first.headers["Retry-After"]) == CIRCUIT_MAX
    state = await (await proxy.get("/admin/circuit", headers=auth(ADMIN_KEY))).json()
    assert state["open"] is True and state["shared"] is False
    assert 0 < state["retry_after"] <= CIRCUIT_MAX
    assert (await proxy.get(REPORT + "?limit=2", headers=auth())).status == 503
    assert fake.calls == 1
    closed = await (await proxy.delete("/admin/circuit", headers=auth(ADMIN_KEY))).json()
    assert closed["closed"] is True
    assert (await proxy.get(REPORT + "?limit=2", headers=auth())).status == 200
    assert fake.calls == 2


# --- 2. Bounded bodies: a worker never holds more than the cap per call ---------------------


def vm_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


class RssSampler:
    """The largest VmRSS of each process, sampled every 10 ms while running."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.peak = dict.fromkeys(pids, 0)
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            for pid in self.pids:
                self.peak[pid] = max(self.peak[pid], vm_kib(pid, "VmRSS"))
            await asyncio.sleep(0.01)

    def __enter__(self) -> RssSampler:
        self._task = asyncio.ensure_future(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    @property
    def peak_mib(self) -> float:
        return max(self.peak.values()) / 1024


BODY_FAULTS: dict[str, dict[str, Any]] = {
    "200 MB with Content-Length": {"stream": 200 * MiB, "declare_length": 200 * MiB},
    "200 MB chunked": {"stream": 200 * MiB},
    "endless stream": {"stream": -1},
    "gzip bomb (500 MiB)": {"headers": [b"Content-Encoding: gzip"], "body": gzip_bomb()},
}
CONCURRENT = 5


@MODULE_LOOP
async def test_oversized_endless_and_compressed_bodies_are_cut_at_the_cap(
    fake: FakeUpstream, redis_server: RedisServer
) -> None:
    gzip_bomb()  # built before the measurement
    settings = hostile_settings(redis_server.url)
    async with ProxyProcess(fake.url, workers=2, **settings) as proxy:
        pids = await both_workers(proxy)
        rows = []
        hung_up = fake.hung_up
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=CLIENT_TIMEOUT) as http:
            for name, fault in BODY_FAULTS.items():
                fake.reset()
                fake.set(**fault)
                queries = [fresh_query() for _ in range(CONCURRENT)]
                with RssSampler(pids) as sampler:
                    got = await asyncio.gather(
                        *(get(http, proxy.url + REPORT + q) for q in queries)
                    )
                    again = await get(http, proxy.url + REPORT + queries[0])
                for answer in [*got, again]:
                    assert answer.status == 502, (name, answer.status, answer.body[:200])
                    assert answer.error()["code"] == "upstream_response_too_large"
                assert fake.calls == CONCURRENT + 1  # nothing was cached
                rows.append((name, CONCURRENT + 1, sampler.peak_mib))
            # The proxy hung up on every stream instead of draining it into the pool.
            await until(lambda: fake.hung_up - hung_up >= 3 * CONCURRENT)
            # And it still answers.
            fake.reset()
            assert (await get(http, proxy.url + REPORT + fresh_query())).status == 200
        peaks = {pid: vm_kib(pid, "VmHWM") / 1024 for pid in pids}
    bound = CAP * CONCURRENT / MiB + 100
    for name, requests, peak in rows:
        print(f"| {name} | {requests} | 0 | {peak:.0f} MiB |")
    print("VmHWM per worker (MiB):", {pid: round(v) for pid, v in peaks.items()})
    assert max(peaks.values()) < bound


# --- 3. Validated answers -----------------------------------------------------------------

# Every other character escaped, the others raw: `u\u0070s\u0074...` / `&#x75;p&#115;...`.
JSON_ESCAPED_TOKEN = "".join(
    f"\\u{ord(c):04x}" if n % 2 else c for n, c in enumerate(TOKEN)
).encode()
XML_ESCAPED_TOKEN = "".join(
    (f"&#x{ord(c):X};", f"&#{ord(c)};", c)[n % 3] for n, c in enumerate(TOKEN)
).encode()

INVALID: dict[str, tuple[str | None, dict[str, Any]]] = {
    "HTML as JSON": (
        "json",
        {"content_type": b"application/json", "body": b"<!DOCTYPE html><html>Login</html>"},
    ),
    "invalid JSON": ("json", {"body": b'{"total": 2, "rows": [[1, 10], '}),
    "HTML as CSV": (None, {"body": b"<html><body>Maintenance</body></html>"}),
    "CSV that is not UTF-8": (None, {"body": b"id,name\r\n1,\xff\xfe\r\n"}),
    "another content type": (None, {"content_type": b"text/html"}),
    "JSON for a CSV query": (None, {"content_type": b"application/json", "body": JSON_BODY}),
    "credential echoed in the body": (
        "json",
        {"body": b'{"rows": [], "debug": "Authorization: Token ' + TOKEN.encode() + b'"}'},
    ),
    # Issue 20: what a JSON parser or an XML reader turns back into the token.
    "credential echoed as JSON escapes": (
        "json",
        {"body": b'{"rows": [], "debug": "' + JSON_ESCAPED_TOKEN + b'"}'},
    ),
    "credential echoed as XML character references": (
        None,
        {"body": b"id,note\r\n1,<token>" + XML_ESCAPED_TOKEN + b"</token>\r\n"},
    ),
    "credential echoed in ETag": (None, {"headers": [b'ETag: "' + TOKEN.encode() + b'"']}),
    "credential echoed in Content-Disposition": (
        None,
        {"headers": [b'Content-Disposition: attachment; filename="' + TOKEN.encode() + b'.csv"']},
    ),
}


@MODULE_LOOP
@pytest.mark.parametrize("case", list(INVALID))
async def test_an_answer_that_is_not_what_was_asked_is_refused_never_cached_stale_served(
    case: str, fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    fmt, fault = INVALID[case]
    query = fresh_query(fmt)
    fake.set(**fault)
    for calls in (1, 2):  # the second request asks TeamUp again: nothing was stored
        refused = await get(http, proxy.url + REPORT + query)
        assert refused.status == 502
        assert refused.error()["code"] == "upstream_invalid_response"
        assert not refused.leaks_token()
        assert fake.calls == calls

    fake.reset()
    cached = fresh_query(fmt)
    good = await get(http, proxy.url + REPORT + cached)
    assert good.status == 200
    await asyncio.sleep(1.1)  # past the 1 s freshness
    fake.set(**fault)
    stale = await get(http, proxy.url + REPORT + cached)
    assert stale.status == 200
    assert stale.body == good.body
    assert "fwd=stale" in stale.headers["Cache-Status"]
    assert not stale.leaks_token()
    if "credential" in case:
        await until(lambda: b"upstream_echoed_credential" in proxy.stderr)
        assert TOKEN.encode() not in proxy.stderr


def deflated(data: bytes, wbits: int) -> bytes:
    packer = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return packer.compress(data) + packer.flush()


ENCODED: dict[str, tuple[bytes, bytes, int, str | None]] = {
    "gzip": (b"gzip", deflated(CSV, 16 + zlib.MAX_WBITS), 200, None),
    "deflate": (b"deflate", deflated(CSV, zlib.MAX_WBITS), 200, None),
    "truncated gzip": (
        b"gzip",
        deflated(CSV * 50, 16 + zlib.MAX_WBITS)[:-12],
        502,
        "upstream_invalid_response",
    ),
    "corrupt gzip": (b"gzip", b"\x1f\x8b\x08\x00garbage", 502, "upstream_invalid_response"),
    "br": (b"br", b"\x0b\x02\x80", 502, "upstream_invalid_response"),
    "gzip, gzip": (b"gzip, gzip", b"whatever", 502, "upstream_invalid_response"),
}


@MODULE_LOOP
@pytest.mark.parametrize("case", list(ENCODED))
async def test_compressed_answers_are_decoded_by_the_proxy_or_refused(
    case: str, fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    coding, body, status, code = ENCODED[case]
    fake.set(headers=[b"Content-Encoding: " + coding], body=body)
    got = await get(http, proxy.url + REPORT + fresh_query())
    assert got.status == status
    if code is None:
        assert got.body == CSV  # decoded: the caller never sees TeamUp's encoding
        assert "Content-Encoding" not in got.headers
    else:
        assert got.error()["code"] == code


@MODULE_LOOP
@pytest.mark.parametrize(
    "header",
    [
        b'Content-Disposition: attachment; filename="\xff\xfe.csv"',
        b'ETag: "\xc3\x28"',
        b"Content-Language: en\x7f",
    ],
)
async def test_a_header_that_is_not_text_is_dropped_and_the_answer_kept(
    header: bytes, fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    name = header.split(b":")[0].decode()
    query = fresh_query()
    fake.set(headers=[header])
    first = await get(http, proxy.url + REPORT + query)
    assert first.status == 200
    assert first.body == CSV
    assert name not in first.headers
    assert first.headers["Last-Modified"] == LAST_MODIFIED
    second = await get(http, proxy.url + REPORT + query)  # stored, and answered from the cache
    assert second.status == 200 and second.body == CSV
    assert name not in second.headers
    assert fake.calls == 1


NOT_ANSWERS: dict[str, dict[str, Any]] = {
    "101": {
        "status": 101,
        "reason": "Switching Protocols",
        "headers": [b"Upgrade: websocket", b"Connection: Upgrade"],
        "hang": True,
    },
    "204": {"status": 204, "reason": "No Content", "no_body": True},
    "206": {"status": 206, "reason": "Partial Content", "body": b"1,10\r\n"},
    "304": {"status": 304, "reason": "Not Modified", "no_body": True},
    "302": {"status": 302, "reason": "Found", "headers": [b"Location: http://127.0.0.1:9/"]},
    "201": {"status": 201, "reason": "Created"},
}


@MODULE_LOOP
@pytest.mark.parametrize("case", list(NOT_ANSWERS))
async def test_a_status_that_is_not_an_answer_is_a_502_and_never_hangs(
    case: str, fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    query = fresh_query()
    fake.set(**NOT_ANSWERS[case])
    for calls in (1, 2):
        got = await get(http, proxy.url + REPORT + query)  # CLIENT_TIMEOUT: a hang fails
        assert got.status == 502
        assert got.error()["code"] == "upstream_invalid_response"
        assert fake.calls == calls


@MODULE_LOOP
@pytest.mark.parametrize("status", [400, 404, 422])
async def test_teamups_own_4xx_pass_through_and_are_never_cached(
    status: int, fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    body = b'{"code": "not_found", "type": "invalid_request_error", "message": "No."}'
    fake.set(status=status, reason="Nope", content_type=b"application/json", body=body)
    query = fresh_query()
    for calls in (1, 2):
        got = await get(http, proxy.url + REPORT + query)
        assert got.status == status
        assert got.body == body
        assert fake.calls == calls


# --- 5. Callers that never read -----------------------------------------------------------

SLOW_READERS = 200
LARGE_BODY = b"".join(b"%08d,customer-%08d,12.50,GBP\r\n" % (i, i) for i in range(170_000))


def queued_by_proxy(port: int) -> int:
    """Bytes the kernel still queues to send from the proxy's sockets on `port`."""
    queued = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port:
                queued += int(fields[4].split(":")[0], 16)
    return queued


def warnings_of(stderr: bytes) -> list[str]:
    """The proxy's log lines other than INFO and the cut callers': what explains a refetch."""
    return [
        line.decode(errors="replace")[:300]
        for line in stderr.splitlines()
        if b'"level":"info"' not in line.replace(b" ", b"") and b"client_write_timeout" not in line
    ][:20]


def stalled_reader(port: int, query: str) -> socket.socket:
    """A caller that asks for the answer and reads nothing (a 4 KiB receive window)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        f"GET {REPORT}{query} HTTP/1.1\r\nHost: x\r\nAuthorization: Token {KEY}\r\n\r\n".encode()
    )
    return sock


WRITE_BUFFER = 16 * MiB  # PROXY_CLIENT_WRITE_BUFFER_BYTES of the proxy under test


@MODULE_LOOP
@pytest.mark.parametrize(
    "sndbuf",
    [
        64 * 1024,
        4 * MiB,
    ],
    ids=["sndbuf-64k", "sndbuf-4m"],
)
async def test_callers_that_never_read_are_cut_off_and_cost_bounded_memory(
    sndbuf: int, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    """Whatever the socket buffers (PROXY_CLIENT_SNDBUF_BYTES, small or large), a worker holds
    one copy of the answer, within PROXY_CLIENT_WRITE_BUFFER_BYTES."""
    assert len(LARGE_BODY) > 5 * MiB
    settings = hostile_settings(
        redis_server.url,
        upstream_max_body_bytes=8 * MiB,
        cache_ttl=300,
        cache_l1_ttl=0,
        client_write_timeout=2,
        client_write_buffer_bytes=WRITE_BUFFER,
        client_sndbuf_bytes=sndbuf,
        # 200 reads of a 6 MB entry at once take longer than 0.1 s; and with 4 MiB send buffers
        # (~800 MB written into the kernel at once) on a busy 2-core machine a health ping once
        # took over 2 s: Redis "down" for a moment, and a refetch from TeamUp.
        redis_timeout=5,
    )
    fake.set(body=LARGE_BODY)
    query = fresh_query()
    sockets: list[socket.socket] = []
    async with ProxyProcess(fake.url, workers=2, **settings) as proxy:
        pids = await both_workers(proxy)
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=CLIENT_TIMEOUT) as http:
            primed = await get(http, proxy.url + REPORT + query)
            assert primed.status == 200 and primed.body == LARGE_BODY
            try:
                with RssSampler(pids) as sampler:
                    for _ in range(SLOW_READERS):  # each a hit of its own (no L1 to share)
                        sockets.append(stalled_reader(proxy.port, query))
                        await asyncio.sleep(0.01)
                    # A caller that reads still gets the whole answer meanwhile.
                    # A generous bound: on a loaded machine the 200 resets may come first.
                    long = aiohttp.ClientTimeout(total=90)
                    reader = await get(http, proxy.url + REPORT + query, client_timeout=long)
                    assert reader.status == 200 and reader.body == LARGE_BODY
                    # The kernel's share: each stalled connection queues at most its send
                    # buffer (Linux doubles SO_SNDBUF for its bookkeeping), and one last write
                    # of up to a chunk may go past it.
                    in_kernel = queued_by_proxy(proxy.port)
                    assert in_kernel <= SLOW_READERS * (2 * sndbuf + 64 * 1024)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline:
                        async with http.get(f"{proxy.url}/metrics") as response:
                            text = await response.text()
                        cut = metric_sum(text, "teamup_proxy_client_write_timeouts_total")
                        if cut >= SLOW_READERS:
                            break
                        await asyncio.sleep(0.2)
                assert cut == SLOW_READERS
                # Reset, not closed: no proxy socket is left holding queued bytes in the kernel.
                await until(lambda: queued_by_proxy(proxy.port) == 0)
                sockets[0].settimeout(5)
                with pytest.raises(ConnectionResetError):
                    while sockets[0].recv(1 << 20):
                        pass
            finally:
                for sock in sockets:
                    sock.close()
            assert fake.calls == 1, warnings_of(proxy.stderr)
            peaks = {pid: vm_kib(pid, "VmHWM") / 1024 for pid in pids}
    events = [
        line
        for line in proxy.stderr.splitlines()
        if line.startswith(b"{") and orjson.loads(line).get("event") == "client_write_timeout"
    ]
    assert len(events) == SLOW_READERS
    print(f"| {SLOW_READERS} callers never read a cached 6.5 MB answer | {SLOW_READERS} | ", end="")
    print(
        f"{SLOW_READERS} cut | {sampler.peak_mib:.0f} MiB | SO_SNDBUF {sndbuf >> 10} KiB,",
        f"{in_kernel / MiB:.0f} MiB queued in the kernel |",
        {p: round(v) for p, v in peaks.items()},
    )
    # Each hit used to decode its own copy of the entry, and the hits of one auto-pipelined
    # batch held theirs at once: 465-651 MiB per worker. Now a worker holds one copy of each
    # body being written, within the budget, beside its own ~60 MiB.
    assert max(peaks.values()) < (WRITE_BUFFER + len(LARGE_BODY)) / MiB + 100


# --- 8. Tests that kill the mutants that survived -----------------------------------------


@MODULE_LOOP
async def test_upstream_cache_control_never_reaches_the_caller_validators_do(
    fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    query = fresh_query()
    for cache in ("fwd=uri-miss", "hit"):
        got = await get(http, proxy.url + REPORT + query)
        assert got.status == 200
        assert cache in got.headers["Cache-Status"]
        assert "Cache-Control" not in got.headers  # TeamUp sent `public, max-age=600`
        assert got.headers["ETag"] == ETAG
        assert got.headers["Last-Modified"] == LAST_MODIFIED
    assert fake.calls == 1
    assert fake.requests[0]["accept-encoding"] == "identity"


@MODULE_LOOP
async def test_a_connection_dropped_after_the_request_was_sent_is_not_retried(
    fake: FakeUpstream, proxy: ProxyProcess, http: aiohttp.ClientSession
) -> None:
    fake.set(drop=True)
    got = await get(http, proxy.url + REPORT + fresh_query())
    assert got.status == 502
    assert got.error()["code"] == "upstream_unreachable"
    await asyncio.sleep(0.3)
    assert fake.calls == 1  # the request reached TeamUp: a second one could cost twice


async def test_the_stale_window_ends_exactly_at_fresh_plus_stale_ttl(
    make_proxy: MakeProxy, mock_state: Any, redis_server: RedisServer
) -> None:
    clock = FakeClock()
    redis = aioredis.Redis.from_url(redis_server.url)
    await redis.flushall()
    try:
        proxy = await make_proxy(
            redis_client=redis,
            clock=clock,
            cache_ttl=10,
            cache_stale_ttl=20,
            cache_stale_while_revalidate=False,
        )
        fresh = await proxy.get(REPORT + "?limit=3", headers=auth())
        assert fresh.status == 200
        mock_state.faults.status = 500
        clock.advance(29.999)
        stale = await proxy.get(REPORT + "?limit=3", headers=auth())
        assert stale.status == 200 and "fwd=stale" in stale.headers["Cache-Status"]
        clock.advance(0.001)  # exactly fresh_until + stale TTL: no longer usable
        gone = await proxy.get(REPORT + "?limit=3", headers=auth())
        assert gone.status == 502
    finally:
        await redis.aclose()


async def test_a_refresh_refused_with_retry_after_30_waits_30_seconds_not_5(
    make_proxy: MakeProxy, fake: FakeUpstream, redis_server: RedisServer
) -> None:
    clock = FakeClock()
    redis = aioredis.Redis.from_url(redis_server.url)
    await redis.flushall()

    async def calls_reach(n: int) -> None:
        await until(lambda: fake.calls >= n, 3)
        await asyncio.sleep(0.1)  # the refresh records its backoff
        assert fake.calls == n

    try:
        proxy = await make_proxy(
            redis_client=redis, clock=clock, upstream_url=fake.url, cache_ttl=10
        )
        assert (await proxy.get(REPORT + "?limit=4", headers=auth())).status == 200
        clock.advance(11)
        fake.set(status=429, reason="Too Many Requests", headers=[b"Retry-After: 30"], times=1)
        stale = await proxy.get(REPORT + "?limit=4", headers=auth())
        assert "fwd=stale" in stale.headers["Cache-Status"]
        await calls_reach(2)  # the background refresh met the 429
        # The circuit is not what holds the next refresh back: close it.
        closed = await proxy.delete("/admin/circuit", headers=auth(ADMIN_KEY))
        assert (await closed.json())["closed"] is True
        clock.advance(6)
        assert (await proxy.get(REPORT + "?limit=4", headers=auth())).status == 200
        await calls_reach(2)  # 6 s after a `Retry-After: 30`: no refresh yet
        clock.advance(25)
        assert (await proxy.get(REPORT + "?limit=4", headers=auth())).status == 200
        await calls_reach(3)  # 31 s after: refreshed
    finally:
        await redis.aclose()
