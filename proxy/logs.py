"""Logging: one JSON object per line (or plain text for humans), never a credential."""

from __future__ import annotations

import atexit
import collections
import functools
import io
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
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
    "close_logging",
    "dropped_lines",
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

    The queue is bounded (`max_lines`): once it is full, for instance while stderr is a pipe
    nobody reads, a new line is dropped and counted (`dropped`), never waited for; the writer
    says how many were lost, at most once a second, as soon as it can write again
    (`report(n)` makes that line). Nothing but the writer thread ever calls write(2), so a
    blocked sink blocks only that (daemon) thread. It wakes every `interval` seconds, or at
    once on `wake()`, and writes everything queued in one call.
    """

    def __init__(
        self,
        fd: int,
        interval: float = 0.02,
        max_lines: int = 10_000,
        report: Callable[[int], bytes] | None = None,
    ) -> None:
        self.fd = fd
        self.interval = interval
        self.max_lines = max_lines
        self.report = report
        self.dropped = 0  # lines lost to a full queue since the start
        self._reported = 0
        self._last_report = 0.0
        self._queue: collections.deque[bytes] = collections.deque()
        self._drop_lock = threading.Lock()  # only around the count: never held across I/O
        self._wake = threading.Event()
        # Held only to read or change `_busy`, never while writing.
        self._state = threading.Condition(threading.Lock())
        self._busy = False  # the writer took lines off the queue and has not written them yet
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def write(self, line: bytes) -> None:
        """Queue one line (with its newline), or drop and count it when the queue is full."""
        if len(self._queue) >= self.max_lines:
            with self._drop_lock:
                self.dropped += 1
            return
        self._queue.append(line)

    def wake(self) -> None:
        """Have the writer write what is queued now rather than at its next tick."""
        self._wake.set()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until what is queued is written, at most `timeout` seconds (None: as long as
        it takes); True if it was. The writer thread does the writing, so a caller gives up
        on a sink that takes nothing instead of blocking in write(2)."""
        if threading.current_thread() is self._thread:
            return False
        if not self._thread.is_alive():  # closed and done: nobody would write it
            return not (self._queue or self._busy)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._state:
            while self._queue or self._busy:
                self._wake.set()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._state.wait(remaining if remaining is not None else 0.1)
        return True

    def close(self, timeout: float) -> bool:
        """The exit-time flush: at most `timeout` seconds, once; later calls return at once."""
        if self._closed:
            return not (self._queue or self._busy)
        self._closed = True
        return self.flush(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            if self._queue or self.dropped > self._reported:
                self._write_queued()
            elif self._closed:
                return

    def _write_queued(self) -> None:
        with self._state:
            self._busy = True
        queue, lines = self._queue, []
        dropped = self.dropped - self._reported
        now = time.monotonic()
        if dropped and self.report is not None and now - self._last_report >= 1.0:
            lines.append(self.report(dropped))
            self._reported += dropped
            self._last_report = now
        while queue:
            lines.append(queue.popleft())
        if lines:
            data = memoryview(b"".join(lines))
            try:
                while data:
                    data = data[os.write(self.fd, data) :]
            except OSError:
                pass  # nowhere to write (closed stderr): drop, as logging would
        with self._state:
            self._busy = False
            self._state.notify_all()


class LineHandler(logging.Handler):
    """A logging handler that formats in the caller and leaves the writing to a `LineWriter`.

    Records at ERROR and above wake the writer, so they are written within moments rather than
    at its next tick; nothing here ever waits for the sink.
    """

    def __init__(self, writer: LineWriter, flush_timeout: float = 0.0) -> None:
        super().__init__()
        self.writer = writer
        self.flush_timeout = flush_timeout

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.write(line.encode("utf-8", "backslashreplace") + b"\n")
        if record.levelno >= logging.ERROR:
            self.writer.wake()

    def flush(self) -> None:
        # `logging.shutdown` calls this at exit: a bounded wait, never a blocked write(2).
        self.writer.flush(self.flush_timeout)


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


_WRITER: LineWriter | None = None  # the process's, once `setup_logging` ran
_FLUSH_TIMEOUT = 1.0


class _QueuedStream(io.RawIOBase):
    """`sys.stderr`'s bytes, through the writer's queue (a warning or a traceback printed by a
    library must not block the loop either)."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.writer.write(bytes(data))
        return len(data)


def setup_logging(
    level: str, fmt: str, *, max_lines: int = 10_000, flush_timeout: float = 1.0
) -> LineWriter:
    """Route the proxy's and aiohttp's loggers, and `sys.stderr`, to stderr in the chosen format.

    Lines go through a bounded queue to a writer thread (`LineWriter`), never to write(2) from
    the event loop: written at least every 20 ms, at once for ERROR and above, dropped and
    counted once `max_lines` wait. At exit what is queued gets `flush_timeout` seconds to be
    written (`close_logging`), after which the process exits regardless.
    """
    global _WRITER, _FLUSH_TIMEOUT
    _FLUSH_TIMEOUT = flush_timeout
    writer = _WRITER
    if writer is None:
        writer = _WRITER = LineWriter(sys.stderr.fileno(), max_lines=max_lines)
        atexit.register(close_logging)
        sys.stderr = io.TextIOWrapper(
            io.BufferedWriter(_QueuedStream(writer)),
            encoding="utf-8",
            errors="backslashreplace",
            line_buffering=True,
        )
    writer.max_lines = max_lines
    handler = LineHandler(writer, flush_timeout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    writer.report = functools.partial(_dropped_line, handler)
    ACCESS.handler = handler if fmt == "json" else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would repeat ours without the fields that matter.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    return writer


def _dropped_line(handler: logging.Handler, count: int) -> bytes:
    record = logging.makeLogRecord(
        {
            "name": "teamup_proxy.logs",
            "levelno": logging.WARNING,
            "levelname": "WARNING",
            "msg": "%d log lines dropped: the log sink was full",
            "args": (count,),
            "event": "log_lines_dropped",
            "dropped": count,
        }
    )
    return handler.format(record).encode("utf-8", "backslashreplace") + b"\n"


def close_logging() -> bool:
    """Write what is queued, waiting at most the flush timeout `setup_logging` was given;
    False if the sink did not take it (the caller should then exit without further flushes)."""
    writer = _WRITER
    if writer is None:
        return True
    return writer.close(_FLUSH_TIMEOUT)


def dropped_lines() -> int:
    """Log lines this process dropped because its log queue was full (0 before setup)."""
    return 0 if _WRITER is None else _WRITER.dropped
