"""The TeamUp client: HTTP only — credential, header allowlists, timeouts, one pooled session."""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import logging
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError
from defusedxml.ElementTree import fromstring as parse_xml
from yarl import URL

from ..core.failures import FailureKind, UpstreamFailure
from ..settings import Settings, Upstream

__all__ = [
    "PASS_RESPONSE_HEADERS",
    "UpstreamClient",
    "UpstreamResponse",
    "check_body",
    "credential_pattern",
    "is_text_header",
    "parse_retry_after",
]

# Response headers that describe the body; everything else (Set-Cookie, hop-by-hop, Server,
# upstream rate-limit and caching headers) stays behind the proxy.
PASS_RESPONSE_HEADERS = (
    "Content-Type",
    "Content-Disposition",
    "Content-Language",
    "ETag",
    "Last-Modified",
)
_ACCEPT = {"json": "application/json", "csv": "text/csv", "xml": "application/xml"}
# What TeamUp may label an XML answer with (DRF's XMLRenderer says application/xml).
_XML_TYPES = ("application/xml", "text/xml")
# Connections opened at start-up: a cold pool made the first burst of misses pay the handshakes.
_WARM_CONNECTIONS = 4
_DELTA = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,6})?")
# A Retry-After of more than a day is a broken upstream, not a plan: the default wait applies.
_ABSURD_WAIT = 86400.0
_PRINTABLE = re.compile(r"[\x20-\x7e]*")
_CHUNK = 64 * 1024
# Statuses the proxy reads a body for: the report, and TeamUp's own 4xx that are passed on.
_NOT_PASSED_4XX = (401, 403, 429)

log = logging.getLogger("teamup_proxy")

_JSON_SHORT = {'"': b'\\"', "\\": b"\\\\", "/": b"\\/", "\b": b"\\b", "\f": b"\\f"}
_JSON_SHORT |= {"\n": b"\\n", "\r": b"\\r", "\t": b"\\t"}
_XML_NAMED = {"&": b"&amp;", "<": b"&lt;", ">": b"&gt;", '"': b"&quot;", "'": b"&apos;"}


def _hex(value: int) -> bytes:
    """`value` in hex, either case, any number of leading zeros."""
    return b"0*" + b"".join(
        b"[" + d.lower().encode() + d.upper().encode() + b"]" if d.isalpha() else d.encode()
        for d in f"{value:x}"
    )


def _json_escape(code: int) -> bytes:
    return b"\\\\u" + b"".join(
        b"[" + d.encode() + d.upper().encode() + b"]" if d.isalpha() else d.encode()
        for d in f"{code:04x}"
    )


def credential_pattern(token: str) -> re.Pattern[bytes]:
    """Matches `token` in a body or header however each character is spelled: as itself, as a
    JSON string escape (`\\u0041`, a surrogate pair, `\\/`) or as an XML/HTML character
    reference (`&#x41;`, `&#65;`, `&amp;`), mixed freely. A JSON parser or an XML reader
    would hand the caller the token from any of them."""
    parts = []
    for char in token:
        code = ord(char)
        forms = [re.escape(char.encode("utf-8", "surrogatepass"))]
        if code < 0x10000:
            forms.append(_json_escape(code))
        else:
            high, low = 0xD800 + ((code - 0x10000) >> 10), 0xDC00 + ((code - 0x10000) & 0x3FF)
            forms.append(_json_escape(high) + _json_escape(low))
        if char in _JSON_SHORT:
            forms.append(re.escape(_JSON_SHORT[char]))
        forms.append(b"&#[xX]" + _hex(code) + b";")
        forms.append(b"&#0*" + str(code).encode() + b";")
        if char in _XML_NAMED:
            forms.append(re.escape(_XML_NAMED[char]))
        parts.append(b"(?:" + b"|".join(forms) + b")")
    return re.compile(b"".join(parts))


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """What TeamUp answered, reduced to what the proxy may pass on or store."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    elapsed: float
    cache_control: str
    set_cookie: bool
    retry_after: float | None
    retry_after_raw: str | None = None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` of delta-seconds or an HTTP-date (RFC 9110 section 10.2.3).

    None for anything the proxy should not believe: garbage, a negative or non-finite number, a
    date in the past, or more than a day (the caller then waits its default, capped).
    """
    if value is None:
        return None
    text = value.strip()
    if _DELTA.fullmatch(text):
        seconds = float(text)
    else:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return seconds if 0 < seconds <= _ABSURD_WAIT else None


def is_text_header(value: str) -> bool:
    """Whether a header value is printable ASCII (aiohttp hands other bytes over as str)."""
    return _PRINTABLE.fullmatch(value) is not None


class _Body:
    """The body as it arrives, decoded (gzip or deflate) chunk by chunk, never past `limit`."""

    def __init__(self, encoding: str, limit: int, elapsed: Callable[[], float]) -> None:
        coding = encoding.strip().lower()
        self._elapsed = elapsed
        self._z: Any = None
        if coding in ("gzip", "x-gzip"):
            self._z = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif coding == "deflate":
            self._z = zlib.decompressobj(zlib.MAX_WBITS)
        elif coding not in ("", "identity"):
            raise invalid("TeamUp sent a body in an encoding the proxy does not read", elapsed())
        self.limit = limit
        self.size = 0
        self._parts: list[bytes] = []

    def feed(self, data: bytes) -> None:
        if self._z is None:
            self._add(data)
            return
        try:
            while data:
                self._add(self._z.decompress(data, self.limit - self.size + 1))
                data = self._z.unconsumed_tail
        except zlib.error:
            raise invalid("TeamUp sent a corrupt compressed body", self._elapsed()) from None

    def finish(self) -> bytes:
        if self._z is not None:
            try:
                self._add(self._z.flush())
            except zlib.error:
                raise invalid("TeamUp sent a corrupt compressed body", self._elapsed()) from None
            if not self._z.eof:
                raise invalid("TeamUp sent a truncated compressed body", self._elapsed())
        body = b"".join(self._parts)
        self._parts.clear()
        return body

    def _add(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            self._parts.clear()
            raise UpstreamFailure(
                FailureKind.TOO_LARGE,
                502,
                f"TeamUp's answer is larger than the proxy accepts ({self.limit} bytes)",
                elapsed=self._elapsed(),
            )
        if data:
            self._parts.append(data)


def invalid(
    message: str, elapsed: float | None = None, status: int | None = None
) -> UpstreamFailure:
    """The failure for an answer that is not what the contract promises."""
    return UpstreamFailure(
        FailureKind.INVALID_RESPONSE, 502, message, upstream_status=status, elapsed=elapsed
    )


def check_body(fmt: str, content_type: str, body: bytes) -> str | None:
    """Why a 200's body is not the answer that was asked for (None when it is).

    XML is parsed with defusedxml: a DTD, an entity declaration or an external reference is
    refused rather than expanded (a billion-laughs body must cost nothing but the refusal).
    """
    expected = _ACCEPT.get(fmt, "text/csv")
    given = content_type.split(";")[0].strip().lower()
    if given != expected and not (expected in _XML_TYPES and given in _XML_TYPES):
        return f"TeamUp answered a {fmt} request with another content type"
    if expected == "application/xml":
        try:
            parse_xml(body, forbid_dtd=True)
        except DefusedXmlException:
            return "TeamUp answered with XML that declares entities or a DTD; refused"
        except (ParseError, ValueError):
            return "TeamUp answered with a body that is not well-formed XML"
        return None
    if expected == "application/json":
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError:
            return "TeamUp answered with a body that is not valid JSON"
        return None
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return "TeamUp answered with CSV that is not UTF-8 text"
    if "\0" in text or text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        return "TeamUp answered with a body that is not CSV"
    return None


class UpstreamClient:
    """One pooled `aiohttp.ClientSession` to TeamUp, with one credential (`upstream`; None: the
    default one) added to every call, and the provider each call is for."""

    def __init__(self, settings: Settings, upstream: Upstream | None = None) -> None:
        upstream = upstream or settings.default_upstream
        self.name = upstream.name
        self.base_url = settings.upstream_url
        self._headers = upstream.headers(settings.upstream_auth_scheme)
        self._token = upstream.token.get_secret_value()
        # A credential that acts for one provider sends its header on every call, also when
        # the question names none (keys name no provider while the proxy serves only one).
        self.sole = upstream.providers[0] if len(upstream.providers) == 1 else None
        # Every configured credential is refused in an answer, not only this one's: an answer
        # for one tenant must never hand a caller another tenant's credential either.
        tokens = [self._token] + [
            other.token.get_secret_value()
            for other in settings.upstream_list
            if other.token.get_secret_value() != self._token
        ]
        self._token_bytes = tuple(token.encode() for token in tokens)
        self._token_pattern = re.compile(
            b"|".join(b"(?:" + credential_pattern(token).pattern + b")" for token in tokens)
        )
        self._max_body = settings.upstream_max_body_bytes
        self._timeout = aiohttp.ClientTimeout(
            total=settings.upstream_timeout, connect=min(3.0, settings.upstream_timeout)
        )
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the pool and warm a few connections, so the first misses skip the handshake."""
        connector = aiohttp.TCPConnector(limit=100, keepalive_timeout=30, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            auto_decompress=False,  # decoded here, under the body cap (see `_Body`)
            cookie_jar=aiohttp.DummyCookieJar(),
            raise_for_status=False,
        )
        # aiohttp resends an idempotent request once when a kept-alive connection turns out to
        # be closed; that second TeamUp call would escape the budget. Our own retry is the one
        # for a failed connect, where nothing reached TeamUp.
        self._session._retry_connection = False
        await asyncio.gather(*(self._warm() for _ in range(_WARM_CONNECTIONS)))

    async def _warm(self) -> None:
        """One `HEAD /` (not the report: it costs no budget) to leave a kept-alive connection."""
        assert self._session is not None
        try:
            async with self._session.head(
                self.base_url + "/", timeout=aiohttp.ClientTimeout(total=2), allow_redirects=False
            ) as response:
                await response.read()
        except (aiohttp.ClientError, TimeoutError):
            pass

    async def close(self) -> None:
        """Close the pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(
        self,
        path: str,
        query_string: str,
        *,
        fmt: str,
        request_id: str,
        provider: str | None = None,
    ) -> UpstreamResponse:
        """GET one read's `path` (from the operation document, never from a caller);
        a failed connect is retried once, nothing else is."""
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        # Already percent-encoded by the query contract: yarl must send it byte for byte.
        url = URL(
            f"{self.base_url}{path}" + (f"?{query_string}" if query_string else ""),
            encoded=True,
        )
        headers = {
            **self._headers,
            "Accept": _ACCEPT.get(fmt, "text/csv"),
            "Accept-Encoding": "identity",
            "User-Agent": "teamup-proxy",
        }
        headers["X-Request-ID"] = request_id
        provider = provider if provider is not None else self.sole
        if provider is not None:
            headers["TeamUp-Provider-ID"] = provider
        started = time.perf_counter()
        for attempt in (1, 2):
            try:
                async with self._session.get(
                    url, headers=headers, allow_redirects=False
                ) as response:
                    try:
                        return await self._answer(response, fmt, started)
                    except BaseException:
                        response.close()  # half read or refused: never back to the pool
                        raise
            except TimeoutError:
                raise UpstreamFailure(
                    FailureKind.TIMEOUT,
                    504,
                    "TeamUp did not answer in time",
                    elapsed=time.perf_counter() - started,
                ) from None
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
                # Only a failed connect is retried: then nothing reached TeamUp.
                if attempt == 1 and isinstance(exc, aiohttp.ClientConnectorError):
                    continue
                raise UpstreamFailure(
                    FailureKind.UNREACHABLE,
                    502,
                    "TeamUp could not be reached",
                    elapsed=time.perf_counter() - started,
                ) from None
            except aiohttp.ClientError:
                raise UpstreamFailure(
                    FailureKind.UNREACHABLE,
                    502,
                    "TeamUp gave an answer the proxy could not read",
                    elapsed=time.perf_counter() - started,
                ) from None
        raise AssertionError("unreachable")  # pragma: no cover

    async def _answer(
        self, response: aiohttp.ClientResponse, fmt: str, started: float
    ) -> UpstreamResponse:
        """What TeamUp answered, refused unless it is what the contract lets the proxy pass on."""

        def elapsed() -> float:
            return time.perf_counter() - started

        status = response.status
        if not (status == 200 or 400 <= status <= 599):
            # 1xx/101, 204, 206, 3xx, 304, other 2xx: not an answer to a read.
            raise invalid(f"TeamUp answered {status}, not an answer to a read", elapsed(), status)
        body = b""
        if status == 200 or (status < 500 and status not in _NOT_PASSED_4XX):
            body = await self._read_body(response, elapsed)
        passed = []
        for name in PASS_RESPONSE_HEADERS:
            value = response.headers.get(name)
            if value is None:
                continue
            if self._carries_token(value.encode("utf-8", "surrogatepass")):
                raise self._echoed(f"header:{name}", status, elapsed())
            if is_text_header(value):
                passed.append((name, value))
            else:
                log.warning(
                    "TeamUp sent a header that is not text; dropped",
                    extra={"event": "upstream_header_dropped", "header": name},
                )
        if self._carries_token(body):
            raise self._echoed("body", status, elapsed())
        if status == 200:
            content_type = response.headers.get("Content-Type", "")
            problem = check_body(fmt, content_type, body)
            if problem is not None:
                log.warning(
                    "TeamUp's answer is not what was asked for; refused",
                    extra={"event": "upstream_invalid_response", "upstream_status": status},
                )
                raise invalid(problem, elapsed(), status)
        return UpstreamResponse(
            status=status,
            headers=tuple(passed),
            body=body,
            elapsed=elapsed(),
            cache_control=response.headers.get("Cache-Control", ""),
            set_cookie="Set-Cookie" in response.headers,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            retry_after_raw=response.headers.get("Retry-After"),
        )

    async def _read_body(
        self, response: aiohttp.ClientResponse, elapsed: Callable[[], float]
    ) -> bytes:
        """The body in chunks, decoded, abandoned as soon as it passes the cap."""
        encoding = response.headers.get("Content-Encoding", "")
        declared = response.content_length
        if not encoding and declared is not None and declared > self._max_body:
            raise UpstreamFailure(
                FailureKind.TOO_LARGE,
                502,
                f"TeamUp's answer is larger than the proxy accepts ({self._max_body} bytes)",
                elapsed=elapsed(),
            )
        reader = _Body(encoding, self._max_body, elapsed)
        async for chunk in response.content.iter_chunked(_CHUNK):
            reader.feed(chunk)
        return reader.finish()

    async def send(
        self,
        method: str,
        path: str,
        query_string: str,
        body: bytes,
        *,
        content_type: str | None,
        fmt: str,
        request_id: str,
        provider: str | None = None,
    ) -> UpstreamResponse:
        """Send one write, exactly once: never retried, not even after a failed connect.

        Raises UpstreamFailure: `unreachable` when nothing can have reached TeamUp (the
        connect failed), `outcome_unknown` when the request may have reached it and no answer
        came (a reset, a timeout)."""
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not awaited")
        url = URL(
            f"{self.base_url}{path}" + (f"?{query_string}" if query_string else ""),
            encoded=True,
        )
        headers = {
            **self._headers,
            "Accept": _ACCEPT.get(fmt, "application/json"),
            "Accept-Encoding": "identity",
            "User-Agent": "teamup-proxy",
            "X-Request-ID": request_id,
        }
        provider = provider if provider is not None else self.sole
        if provider is not None:
            headers["TeamUp-Provider-ID"] = provider
        if content_type:  # the one header of the caller's that reaches TeamUp
            headers["Content-Type"] = content_type
        started = time.perf_counter()

        def elapsed() -> float:
            return time.perf_counter() - started

        try:
            async with self._session.request(
                # No body: no payload at all (aiohttp would label b"" application/octet-stream).
                method,
                url,
                data=body or None,
                headers=headers,
                allow_redirects=False,
            ) as response:
                try:
                    return await self._write_answer(response, fmt, started)
                except BaseException:
                    response.close()
                    raise
        except aiohttp.ClientConnectorError:
            raise UpstreamFailure(
                FailureKind.UNREACHABLE,
                502,
                "TeamUp could not be reached; the write was NOT sent",
                elapsed=elapsed(),
            ) from None
        except TimeoutError:
            raise UpstreamFailure(
                FailureKind.OUTCOME_UNKNOWN,
                502,
                "TeamUp did not answer the write in time: it may or may not have been done. "
                "The proxy does not resend it; check before retrying.",
                elapsed=elapsed(),
            ) from None
        except aiohttp.ClientError:
            raise UpstreamFailure(
                FailureKind.OUTCOME_UNKNOWN,
                502,
                "The connection to TeamUp broke after the write was sent: it may or may not "
                "have been done. The proxy does not resend it; check before retrying.",
                elapsed=elapsed(),
            ) from None

    async def _write_answer(
        self, response: aiohttp.ClientResponse, fmt: str, started: float
    ) -> UpstreamResponse:
        """What TeamUp answered a write: 2xx and 4xx passed on (body capped, checked, never
        carrying the credential); anything else is the caller's 502 (the write was sent)."""

        def elapsed() -> float:
            return time.perf_counter() - started

        status = response.status
        if not (200 <= status <= 299 or 400 <= status <= 599) or status in (205, 206):
            raise invalid(f"TeamUp answered a write with {status}", elapsed(), status)
        body = b""
        if status != 204 and (status < 500 and status not in _NOT_PASSED_4XX):
            body = await self._read_body(response, elapsed)
        passed = []
        for name in (*PASS_RESPONSE_HEADERS, "Location"):
            value = response.headers.get(name)
            if value is None:
                continue
            if self._carries_token(value.encode("utf-8", "surrogatepass")):
                raise self._echoed(f"header:{name}", status, elapsed())
            if is_text_header(value):
                passed.append((name, value))
        if self._carries_token(body):
            raise self._echoed("body", status, elapsed())
        if 200 <= status <= 299 and body:
            problem = check_body(fmt, response.headers.get("Content-Type", ""), body)
            if problem is not None:
                raise invalid(problem, elapsed(), status)
        return UpstreamResponse(
            status=status,
            headers=tuple(passed),
            body=body,
            elapsed=elapsed(),
            cache_control="",
            set_cookie=False,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            retry_after_raw=response.headers.get("Retry-After"),
        )

    def _carries_token(self, data: bytes) -> bool:
        """The credential in `data`, raw or spelled with escapes (the pattern runs only when
        `data` holds a backslash or an ampersand: without either, only the raw token can)."""
        if any(token in data for token in self._token_bytes):
            return True
        if b"\\" not in data and b"&" not in data:
            return False
        return self._token_pattern.search(data) is not None

    def _echoed(self, where: str, status: int, elapsed: float) -> UpstreamFailure:
        log.error(
            "TeamUp echoed the proxy's credential in its answer; refused",
            extra={
                "event": "upstream_echoed_credential",
                "where": where,
                "upstream_status": status,
            },
        )
        return invalid("TeamUp's answer carried the proxy's credential; refused", elapsed, status)
