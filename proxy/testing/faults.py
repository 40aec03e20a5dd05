"""Real processes and traffic for hostile-input and fault tests: the mock TeamUp as a
subprocess, raw HTTP over a socket, a bounded load generator
and ground truth fetched straight from the mock."""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import aiohttp
import orjson
import redis.asyncio as aioredis
from multidict import MultiDict

from proxy.core.contract import CanonicalQuery
from proxy.core.entry import CachedResponse

from .e2e import REPORT, TOKEN, parse_query
from .support import free_port, wait_for_port

__all__ = [
    "ERROR_STATUSES",
    "MockProcess",
    "Outcome",
    "RawAnswer",
    "Truth",
    "canonical",
    "check_error_body",
    "raw_request",
    "redis_dump",
    "run_load",
    "stats",
    "worker_pids",
]

# What the proxy may answer a valid, authenticated report request with while something fails.
ERROR_STATUSES = frozenset({429, 502, 503, 504})


class MockProcess:
    """`python -m proxy.testing.mock` on a free port, controlled over its `/_mock/*` API."""

    def __init__(
        self,
        token: str = TOKEN,
        *,
        latency: float = 0.0,
        providers: Sequence[str] | None = None,
        tenants: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        self.port = free_port()
        self.token = token
        self.latency = latency
        self.providers = providers  # what `token` may act for (--providers)
        self.tenants = tenants  # more credentials (--tenants): "tenant0", "tenant1", ...
        self.process: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> MockProcess:
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy.testing.mock",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--token",
            self.token,
            "--latency",
            str(self.latency),
            *(() if self.providers is None else ("--providers", ",".join(self.providers))),
            *(() if self.tenants is None else ("--tenants", _tenants_json(self.tenants))),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )
        await asyncio.to_thread(wait_for_port, self.port, 30)
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self

    @property
    def http(self) -> aiohttp.ClientSession:
        assert self._http is not None, "MockProcess.start() was not awaited"
        return self._http

    async def state(self) -> dict[str, Any]:
        """Calls and recorded requests."""
        async with self.http.get(f"{self.url}/_mock/state") as response:
            assert response.status == 200
            data: dict[str, Any] = await response.json()
            return data

    async def calls(self) -> int:
        """Report requests the mock has received since the last reset."""
        return int((await self.state())["calls"])

    async def calls_by(self, credential: str | None = None, provider: str | None = None) -> int:
        """Calls of a credential label ("default", "tenant0", ...) and/or for a provider (None:
        any) since the last reset."""
        return sum(
            1
            for r in (await self.state())["requests"]
            if (credential is None or r["credential"] == credential)
            and (provider is None or r["provider"] == provider)
        )

    async def faults(self, **values: Any) -> None:
        """Replace every fault switch (omitted ones take their defaults)."""
        async with self.http.put(f"{self.url}/_mock/faults", json=values) as response:
            assert response.status == 200, await response.text()

    async def reset(self) -> None:
        """Forget calls and requests; faults back to the defaults."""
        async with self.http.post(f"{self.url}/_mock/reset") as response:
            assert response.status == 204

    async def fetch(self, query: str, fmt: str) -> tuple[int, str, bytes]:
        """Ask the mock directly, with the credential, as the proxy would."""
        accept = "application/json" if fmt == "json" else "text/csv"
        url = f"{self.url}{REPORT}" + (f"?{query}" if query else "")
        headers = {"Authorization": f"Token {self.token}", "Accept": accept}
        async with self.http.get(url, headers=headers) as response:
            return response.status, response.content_type, await response.read()

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 10)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


def _tenants_json(tenants: Mapping[str, Sequence[str]]) -> str:
    return orjson.dumps({token: list(ids) for token, ids in tenants.items()}).decode()


# --- raw HTTP ---------------------------------------------------------------------------------


@dataclass
class RawAnswer:
    """The responses read back from one raw connection, and whether the server closed it."""

    responses: list[tuple[int, dict[str, str], bytes]]
    closed: bool
    raw: bytes

    @property
    def status(self) -> int | None:
        return self.responses[0][0] if self.responses else None

    @property
    def headers(self) -> dict[str, str]:
        return self.responses[0][1] if self.responses else {}

    @property
    def body(self) -> bytes:
        return self.responses[0][2] if self.responses else b""


def _parse_responses(data: bytes) -> tuple[list[tuple[int, dict[str, str], bytes]], bytes]:
    """Complete HTTP/1.1 responses at the start of `data` (Content-Length bodies), and the rest."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return out, data
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            key = name.strip().lower()
            headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
        length = int(headers.get("content-length", "0"))
        if len(rest) < length:
            return out, data
        out.append((status, headers, rest[:length]))
        data = rest[length:]


async def raw_request(
    port: int,
    chunks: bytes | Sequence[bytes],
    *,
    delay: float = 0.0,
    expect: int = 1,
    within: float = 5.0,
    linger: float = 0.3,
) -> RawAnswer:
    """Send bytes (chunk by chunk, `delay` apart) and read until `expect` responses arrived and
    the server closed the connection (`linger` seconds of grace), or `within` seconds passed.
    Never raises for a reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parts = [chunks] if isinstance(chunks, bytes) else list(chunks)
    data = b""
    closed = False
    deadline = time.monotonic() + within

    async def read_some(wait: float) -> None:
        nonlocal data, closed
        try:
            chunk = await asyncio.wait_for(reader.read(65536), max(0.0, wait))
        except TimeoutError:
            return
        except (ConnectionError, OSError):
            closed = True
            return
        if chunk:
            data += chunk
        else:
            closed = True

    try:
        for i, part in enumerate(parts):
            if closed or time.monotonic() >= deadline:
                break
            try:
                writer.write(part)
                await writer.drain()
            except (ConnectionError, OSError):
                closed = True
                break
            if delay and i < len(parts) - 1:
                await read_some(delay)
        while not closed and time.monotonic() < deadline:
            responses, _rest = _parse_responses(data)
            if len(responses) >= expect:
                # One short look: did the server also close (it should after an error)?
                await read_some(min(linger, deadline - time.monotonic()))
                if not closed:
                    break
                continue
            await read_some(deadline - time.monotonic())
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
    responses, _rest = _parse_responses(data)
    return RawAnswer(responses, closed, data)


# --- checks ---------------------------------------------------------------------------------


def check_error_body(body: bytes, content_type: str) -> dict[str, Any]:
    """Assert TeamUp's error shape: `{code, type, message[, field_errors]}`; the parsed body."""
    assert content_type.split(";")[0].strip() == "application/json", content_type
    parsed = orjson.loads(body)
    assert isinstance(parsed, dict), parsed
    assert set(parsed) <= {"code", "type", "message", "field_errors"}, parsed
    assert isinstance(parsed.get("code"), str) and parsed["code"], parsed
    assert parsed.get("type") in ("invalid_request_error", "api_error"), parsed
    assert isinstance(parsed.get("message"), str) and parsed["message"], parsed
    if "field_errors" in parsed:
        errors = parsed["field_errors"]
        assert isinstance(errors, dict) and errors, parsed
        for messages in errors.values():
            assert isinstance(messages, list) and messages, parsed
            assert all(isinstance(m, str) for m in messages), parsed
    return parsed


def canonical(query: str) -> CanonicalQuery:
    """The canonical form of a valid report query string (the proxy's own contract)."""
    parsed = parse_query(MultiDict(parse_qsl(query, keep_blank_values=True)))
    assert isinstance(parsed, CanonicalQuery), (query, parsed)
    return parsed


def _fmt(query: CanonicalQuery) -> str:
    fmt = query.get("format")
    return fmt if isinstance(fmt, str) else "csv"


class Truth:
    """What the mock answers for a canonical query, fetched once, straight from the mock."""

    def __init__(self, mock: MockProcess) -> None:
        self.mock = mock
        self._known: dict[str, tuple[str, bytes]] = {}

    async def learn(self, queries: Iterable[str]) -> None:
        for query in queries:
            await self.get(canonical(query))

    async def get(self, query: CanonicalQuery) -> tuple[str, bytes]:
        """(content type, body) of the mock's 200 answer to the canonical query."""
        key = query.canonical_string()
        if key not in self._known:
            status, content_type, body = await self.mock.fetch(
                query.upstream_query("comma"), _fmt(query)
            )
            assert status == 200, (key, status, body[:200])
            self._known[key] = (content_type, body)
        return self._known[key]

    def __len__(self) -> int:
        return len(self._known)

    async def check(self, outcome: Outcome) -> None:
        """Assert a 200 carries exactly the mock's body for the request's canonical query."""
        query = canonical(outcome.query)
        assert outcome.headers.get("X-Proxy-Canonical-Query") == query.canonical_string()
        content_type, body = await self.get(query)
        assert outcome.content_type == content_type, (outcome.query, outcome.content_type)
        if content_type == "application/json":
            got, want = orjson.loads(outcome.body), orjson.loads(body)
            assert got["total"] == want["total"], outcome.query
            assert got["rows"] == want["rows"], outcome.query
            assert got == want, outcome.query
        else:
            assert outcome.body == body, outcome.query


# --- load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of the load: what was asked, when, and what came back (or how it failed)."""

    query: str
    started: float
    elapsed: float
    status: int | None
    content_type: str = ""
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None


@dataclass
class LoadStats:
    """Counts for a report table."""

    sent: int
    by_status: dict[str, int]
    max_latency: float
    p99_latency: float


def stats(outcomes: Sequence[Outcome]) -> LoadStats:
    counts = Counter(
        str(o.status) if o.status is not None else (o.error or "error") for o in outcomes
    )
    latencies = sorted(o.elapsed for o in outcomes)
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
    return LoadStats(len(outcomes), dict(sorted(counts.items())), max(latencies, default=0.0), p99)


async def run_load(
    base_url: str,
    pick: Callable[[random.Random], str],
    *,
    headers: dict[str, str] | Sequence[dict[str, str]],
    tasks: int = 8,
    max_requests: int = 2000,
    seconds: float = 3.0,
    rate: float = 150.0,
    request_timeout: float = 10.0,
    seed: int = 1,
    new_connections: bool = True,
) -> list[Outcome]:
    """`tasks` concurrent callers sending `pick(rng)` queries at about `rate` requests/second in
    all, until `max_requests` were sent or `seconds` passed. A fresh connection per request
    (by default) so the kernel spreads them over every worker. Caller `n` sends
    `headers[n % len(headers)]` when given several header sets (several clients)."""
    header_sets = [headers] if isinstance(headers, dict) else list(headers)
    outcomes: list[Outcome] = []
    claimed = 0
    deadline = time.monotonic() + seconds
    interval = tasks / rate if rate > 0 else 0.0
    connector = aiohttp.TCPConnector(force_close=new_connections, limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=request_timeout)
    ) as http:

        async def caller(n: int) -> None:
            nonlocal claimed
            rng = random.Random(seed * 1000 + n)
            sent_headers = header_sets[n % len(header_sets)]
            await asyncio.sleep(rng.random() * interval)
            while time.monotonic() < deadline and claimed < max_requests:
                claimed += 1
                query = pick(rng)
                started = time.monotonic()
                try:
                    async with http.get(
                        f"{base_url}{REPORT}?{query}", headers=sent_headers
                    ) as resp:
                        body = await resp.read()
                        outcome = Outcome(
                            query,
                            started,
                            time.monotonic() - started,
                            resp.status,
                            resp.content_type,
                            body,
                            dict(resp.headers),
                        )
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = Outcome(
                        query, started, time.monotonic() - started, None, error=type(exc).__name__
                    )
                outcomes.append(outcome)
                pause = interval - (time.monotonic() - started)
                if pause > 0:
                    await asyncio.sleep(pause)

        await asyncio.gather(*(caller(n) for n in range(tasks)))
    return outcomes


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    pids = []
    for pid in children:
        with contextlib.suppress(OSError):
            if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(int(pid))
    return pids


# --- secrets --------------------------------------------------------------------------------


async def redis_dump(url: str) -> bytes:
    """Every value in Redis (SCAN + GET, cache entries decoded, other types DUMPed)."""
    client = aioredis.Redis.from_url(url)
    out: list[bytes] = []
    try:
        async for name in client.scan_iter(count=500):
            out.append(name)
            kind = await client.type(name)
            if kind == b"string":
                value = await client.get(name)
                if not isinstance(value, bytes):
                    continue
                out.append(value)
                entry = CachedResponse.decode(value)
                if entry is not None:
                    out.append(entry.body)
                    out.append(orjson.dumps(entry.headers))
            else:
                dumped = await client.dump(name)
                if isinstance(dumped, bytes):
                    out.append(dumped)
    finally:
        await client.aclose()
    return b"\n".join(out)
