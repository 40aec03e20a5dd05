"""Logging: one JSON object per line (or plain text for humans), never a credential."""

from __future__ import annotations

import atexit
import collections
import logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Any

import orjson

__all__ = [
    "ACCESS",
    "ACCESS_MIDDLE",
    "AccessLog",
    "JsonFormatter",
    "LineHandler",
    "LineWriter",
    "TextFormatter",
    "json_bytes",
    "setup_logging",
]

# Attributes every LogRecord has; anything else was passed in `extra=` and belongs in the line.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: any of them in a path
# or header value could end a text line early and forge the next one.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_NEEDS_QUOTES = re.compile(r'[\s"=\\]')


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(char) or f"\\u{ord(char):04x}"


def _text(value: object) -> str:
    """A value on one text line: controls escaped, quoted when it holds a space, `=` or `"`."""
    text = str(value)
    if _NEEDS_QUOTES.search(text) or _CONTROL.search(text):
        text = (
            '"' + _CONTROL.sub(_escape_char, text.replace("\\", "\\\\").replace('"', '\\"')) + '"'
        )
    return text


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """`{"time": ..., "level": ..., "logger": ..., "message": ..., <extra fields>}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _utc_stamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info and record.exc_info[0] is not None:
            # The type and where it was raised, never the message: a library's message may
            # quote a URL or a header value.
            line["error"] = record.exc_info[0].__name__
            frames = traceback.extract_tb(record.exc_info[2])[-5:]
            line["where"] = [f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno} {f.name}" for f in frames]
        text = orjson.dumps(line, default=str).decode()
        # JSON escapes every control character; U+2028/9 are legal raw in JSON but end a line
        # for some readers (Python's `splitlines`, JavaScript before ES2019).
        return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


class TextFormatter(logging.Formatter):
    """`time level message key=value ...` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = _fields(record)
        if record.exc_info and record.exc_info[0] is not None:
            frame = traceback.extract_tb(record.exc_info[2])[-1:]
            where = f" at {frame[0].filename.rsplit('/', 1)[-1]}:{frame[0].lineno}" if frame else ""
            fields["error"] = record.exc_info[0].__name__ + where
        extras = " ".join(f"{k}={_text(v)}" for k, v in fields.items() if v is not None)
        message = _CONTROL.sub(_escape_char, record.getMessage())
        return f"{stamp} {record.levelname:<7} {message} {extras}".rstrip()


class LineWriter:
    """Lines appended from any thread, written to a file descriptor by a thread of its own.

    The event loop never waits on a write (a slow terminal or a full pipe blocks only the
    writer thread); the writer wakes every `interval` seconds and writes everything queued in
    one call. `flush` writes what is queued now, from the calling thread.
    """

    def __init__(self, fd: int, interval: float = 0.02) -> None:
        self.fd = fd
        self.interval = interval
        self._queue: collections.deque[bytes] = collections.deque()
        self._lock = threading.Lock()  # one writer at a time, so lines keep their order
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one line (with its newline)."""
        self._queue.append(line)

    def flush(self) -> None:
        """Write every queued line now."""
        with self._lock:
            queue, lines = self._queue, []
            while queue:
                lines.append(queue.popleft())
            if lines:
                data = memoryview(b"".join(lines))
                try:
                    while data:
                        data = data[os.write(self.fd, data) :]
                except OSError:
                    pass  # nowhere to write (closed stderr): drop, as logging would

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            if self._queue:
                self.flush()


class LineHandler(logging.Handler):
    """A logging handler that formats in the caller and leaves the writing to a `LineWriter`.

    Records at ERROR and above are written at once, so a crash right after cannot lose them.
    """

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.write(line.encode("utf-8", "backslashreplace") + b"\n")
        if record.levelno >= logging.ERROR:
            self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()


_stamp = (-1, "")  # (second, its text): one object, so threads never see half of it


def _utc_stamp(created: float) -> str:
    """`JsonFormatter`'s time, with the date and time part made once per second."""
    global _stamp
    second = int(created)
    cached = _stamp
    if cached[0] != second:
        cached = _stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int((created - second) * 1000):03d}Z"


def json_bytes(value: object) -> bytes:
    """orjson's encoding as `JsonFormatter` writes it: U+2028/9 escaped too (legal raw in JSON,
    but they end a line for some readers)."""
    data = orjson.dumps(value, default=str)
    if b"\xe2\x80" in data:
        data = data.replace(b"\xe2\x80\xa8", b"\\u2028").replace(b"\xe2\x80\xa9", b"\\u2029")
    return data


class AccessLog:
    """The access log's own lane: one JSON line per request without a `LogRecord`.

    Used only while the line would go nowhere but the `LineHandler` that `setup_logging`
    installed (JSON format, no other handler, the access logger enabled for INFO); otherwise
    `lane()` is None and the line goes through `logging` as usual, so anything that listens
    to the logger (a test, a second handler) still sees every record.
    """

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self.handler: LineHandler | None = None
        # Everything between the time and the fields, as `JsonFormatter` writes it.
        self._head = b'","level":"info","logger":' + orjson.dumps(logger.name)
        self._head += b',"message":"request",'
        self._stamp = (-1, b"")  # (millisecond, its text)

    def lane(self) -> LineWriter | None:
        handler = self.handler
        if handler is None:
            return None
        root = logging.root
        logger = self.logger
        if (
            len(root.handlers) != 1
            or root.handlers[0] is not handler
            or logger.handlers
            or not logger.propagate
            or not logger.isEnabledFor(logging.INFO)
        ):
            return None
        parent = logger.parent
        while parent is not None and parent is not root:
            if parent.handlers or not parent.propagate:
                return None
            parent = parent.parent
        return handler.writer

    def hot_line(self, request_id: str, middle: bytes, total_ms: float, status: int) -> bytes:
        """`line` for fields known in advance: `middle` is the JSON of every field between
        `request_id` and `total_ms` (`HotHits` makes it once per question)."""
        return b"".join(
            (
                b'{"time":"',
                self._now(),
                self._head,
                b'"request_id":',
                json_bytes(request_id),
                b",",
                middle,
                b',"total_ms":',
                orjson.dumps(total_ms),
                b',"status":',
                str(status).encode(),
                b"}\n",
            )
        )

    def _now(self) -> bytes:
        now = time.time()
        millisecond = int(now * 1000)
        stamp = self._stamp
        if stamp[0] != millisecond:
            stamp = self._stamp = (millisecond, _utc_stamp(now).encode())
        return stamp[1]

    def line(self, fields: dict[str, Any]) -> bytes:
        """What `JsonFormatter` writes for `logger.info("request", extra=fields)`."""
        stamp = self._now()
        if not fields:
            return b"".join((b'{"time":"', stamp, self._head[:-1], b"}\n"))
        body = json_bytes(fields)
        return b"".join((b'{"time":"', stamp, self._head, body[1:], b"\n"))


ACCESS = AccessLog(logging.getLogger("teamup_proxy.access"))
# The key under which a handler leaves `AccessLog.hot_line`'s middle in the access-log fields.
ACCESS_MIDDLE = "access_middle"


def setup_logging(level: str, fmt: str) -> None:
    """Route the proxy's and aiohttp's loggers to stderr in the chosen format.

    Lines are written by a thread (`LineWriter`), never by the event loop; what is queued is
    written at exit and at least every 20 ms (ERROR and above at once).
    """
    writer = LineWriter(sys.stderr.fileno())
    atexit.register(writer.flush)
    handler = LineHandler(writer)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    ACCESS.handler = handler if fmt == "json" else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would repeat ours without the fields that matter.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
