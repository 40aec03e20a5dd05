"""An oracle for the customer_credits query contract, written apart from `proxy.core.contract`.

The fuzz tests compare the proxy's answers with this, not with `parse_query` itself: the rules
are restated from README's contract (names, kinds, bounds, defaults), and the checks are done a
different way (character sets instead of regexes, aware datetimes converted with `astimezone`
instead of offsets subtracted by hand), so a mistake in the contract shows up as a disagreement.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, unquote, unquote_to_bytes

__all__ = ["Expected", "expected_outcome"]

DIGITS = frozenset("0123456789")
CEILING = 2**63 - 1
COLUMN_NAMES = frozenset(
    "customer_id customer.id customer customer_name customer.name customer_email "
    "customer.email created_at amount balance memo".split()
)
# name: (kind, is an array, minimum, maximum, default)
RULES: dict[str, tuple[str, bool, int | None, int | None, str | int | None]] = {
    "columns": ("column", True, None, None, None),
    "sort": ("sort", True, None, None, None),
    "customers": ("id", True, 1, CEILING, None),
    "created_at_gte": ("moment", False, None, None, None),
    "created_at_lte": ("moment", False, None, None, None),
    "created_at_timeframe": ("text", False, None, None, None),
    "format": ("format", False, None, None, "csv"),
    "id_gt": ("id", False, 0, CEILING, None),
    "limit": ("id", False, 1, 100, 50),
    "offset": ("id", False, 0, CEILING, 0),
    "page": ("id", False, 1, CEILING, None),
    "page_size": ("id", False, 0, 100, None),
}
MOMENT = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)[Tt ](\d\d):(\d\d)(?::(\d\d)(?:\.(\d+))?)?(Z|z|[-+ ]\d\d:?\d\d)?",
    re.ASCII,
)


@dataclass(frozen=True)
class Expected:
    """What the proxy must do: answer with `canonical`, or refuse naming `bad`."""

    canonical: str | None
    bad: frozenset[str]


class Bad(Exception):
    pass


def _plain(text: str) -> str:
    if any(ord(c) < 32 or 127 <= ord(c) <= 159 or 0xD800 <= ord(c) <= 0xDFFF for c in text):
        raise Bad
    return text


def _number(text: str, low: int | None, high: int | None) -> int:
    if not text or not set(text) <= DIGITS:
        raise Bad
    value = int(text)
    if value > (high if high is not None else CEILING) or (low is not None and value < low):
        raise Bad
    return value


def _moment(text: str) -> dt.datetime:
    match = MOMENT.fullmatch(text)
    if match is None or match[8] is None:
        raise Bad
    year, month, day, hour, minute = (int(match[i]) for i in range(1, 6))
    second = int(match[6] or 0)
    fraction = match[7] or ""
    if set(fraction[6:]) - {"0"}:
        raise Bad
    zone = match[8]
    if zone in ("Z", "z"):
        offset = dt.timedelta(0)
    else:
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            raise Bad
        offset = dt.timedelta(hours=hours, minutes=minutes) * (-1 if zone[0] == "-" else 1)
    try:
        local = dt.datetime(
            year,
            month,
            day,
            hour,
            minute,
            second,
            int((fraction + "000000")[:6]),
            tzinfo=dt.timezone(offset),
        )
        return local.astimezone(dt.UTC)
    except (ValueError, OverflowError):
        raise Bad from None


def _show_moment(moment: dt.datetime) -> str:
    m = moment
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    if m.microsecond:
        text += f".{m.microsecond:06d}".rstrip("0")
    return text + "Z"


def _choice(text: str, sort: bool) -> str:
    descending = sort and text.startswith("-")
    body = text[1:] if descending else text
    folded = body.lower() if body.isascii() else body
    if folded not in COLUMN_NAMES:
        raise Bad
    return ("-" if descending else "") + folded


def _value(name: str, texts: list[str]) -> str | None:
    """The canonical `name=…` text of one parameter (None at its default); raises Bad."""
    kind, array, low, high, default = RULES[name]
    texts = [_plain(t) for t in texts]
    if array:
        items = [item for text in texts for item in text.split(",")]
        if len(items) > 200 or "" in items:
            raise Bad
        if kind == "id":
            numbers = sorted({_number(i, low, high) for i in items})
            return ",".join(map(str, numbers))
        chosen: list[str] = []
        for item in items:
            picked = _choice(item, kind == "sort")
            if picked not in chosen:
                chosen.append(picked)
        return ",".join(quote(c, safe="") for c in chosen)
    if len(texts) != 1:
        raise Bad
    text = texts[0]
    if kind == "id":
        number = _number(text, low, high)
        return None if number == default else str(number)
    if kind == "format":
        folded = text.lower() if text.isascii() else text
        if folded not in ("csv", "json"):
            raise Bad
        return None if folded == default else folded
    if kind == "text":
        trimmed = text.strip()
        if not trimmed or len(trimmed) > 100:
            raise Bad
        return quote(trimmed, safe=":")
    return quote(_show_moment(_moment(text)), safe=":")


def _not_utf8(raw: str) -> set[str]:
    """The names (decoded, bad bytes as U+FFFD) of the pairs of a raw query string whose name
    or value is not UTF-8 once percent-decoded."""
    bad = set()
    for pair in raw.split("&"):
        name, _, value = pair.partition("=")
        try:
            for part in (name, value):
                unquote_to_bytes(part.replace("+", " ")).decode("utf-8")
        except UnicodeDecodeError:
            bad.add(unquote(name.replace("+", " "), errors="replace"))
    return bad


def expected_outcome(pairs: Iterable[tuple[str, str]], raw: str | None = None) -> Expected:
    """The outcome for a decoded query, as (name, value) pairs in order; with the `raw` query
    string, pairs that are not UTF-8 are bad too (the proxy sees the raw string, the pairs do
    not show the bytes)."""
    bad: set[str] = set() if raw is None else _not_utf8(raw)
    grouped: dict[str, list[str]] = {}
    for key, text in pairs:
        name = key[:-2] if key.endswith("[]") else key
        if name not in RULES or (name != key and not RULES[name][1]):
            bad.add("".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in key))
            continue
        grouped.setdefault(name, []).append(text)
    parts: dict[str, str | None] = {}
    for name, texts in grouped.items():
        try:
            parts[name] = _value(name, texts)
        except Bad:
            bad.add(name)
    if "created_at_gte" in parts and "created_at_lte" in parts:
        start = _moment(grouped["created_at_gte"][0])
        if start > _moment(grouped["created_at_lte"][0]):
            bad.add("created_at_gte")
    if bad:
        return Expected(None, frozenset(bad))
    canonical = "&".join(f"{n}={v}" for n, v in sorted(parts.items()) if v is not None)
    return Expected(canonical, frozenset())
