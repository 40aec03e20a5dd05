"""Logging: one JSON object per line (or plain text for humans), never a credential."""

from __future__ import annotations

import logging
import re
import sys
import time
import traceback
from typing import Any

import orjson

__all__ = ["JsonFormatter", "TextFormatter", "setup_logging"]

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
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
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


def setup_logging(level: str, fmt: str) -> None:
    """Route the proxy's and aiohttp's loggers to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's own access log would repeat ours without the fields that matter.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
