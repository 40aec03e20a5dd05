"""The query contract: validate the report's parameters and turn them into one canonical form."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal, TypeVar
from urllib.parse import quote

import orjson
from multidict import MultiMapping

__all__ = [
    "COLUMNS",
    "MAX_ARRAY_ITEMS",
    "MAX_QUERY_BYTES",
    "ArrayStyle",
    "CanonicalQuery",
    "QueryErrors",
    "Value",
    "parse_query",
]

MAX_QUERY_BYTES = 4096
MAX_ARRAY_ITEMS = 200

ArrayStyle = Literal["comma", "repeat"]
Value = str | int | tuple[str, ...] | tuple[int, ...]

_T = TypeVar("_T", int, str)

# Parameters without a documented maximum are still database ids or counts: nothing beyond a
# signed 64-bit integer can mean anything upstream, and the cap keeps the cache key encodable.
_INT_CEILING = 2**63 - 1
_MAX_TEXT_LENGTH = 100
_SHOWN_CHARS = 40

# The report's column keys (also what `sort` may name, with an optional "-").
COLUMNS = (
    "customer_id",
    "customer.id",
    "customer",
    "customer_name",
    "customer.name",
    "customer_email",
    "customer.email",
    "created_at",
    "amount",
    "balance",
    "memo",
)


@dataclass(frozen=True, slots=True)
class _Param:
    """One query parameter of the report: how its values are read and compared."""

    name: str
    kind: Literal["int", "datetime", "enum", "text"]
    array: bool = False
    ordered: bool = True
    default: str | int | None = None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    descending_prefix: bool = False
    max_length: int | None = None


_SCHEMA: dict[str, _Param] = {
    param.name: param
    for param in (
        _Param("columns", "enum", array=True, choices=COLUMNS),
        _Param("created_at_gte", "datetime"),
        _Param("created_at_lte", "datetime"),
        _Param("created_at_timeframe", "text", max_length=_MAX_TEXT_LENGTH),
        _Param("customers", "int", array=True, ordered=False, minimum=1),
        _Param("format", "enum", default="csv", choices=("csv", "json")),
        _Param("id_gt", "int", minimum=0),
        # The spec only caps limit at 100; a page of 0 rows answers nothing, so 1 is the floor.
        _Param("limit", "int", default=50, minimum=1, maximum=100),
        _Param("offset", "int", default=0, minimum=0),
        _Param("page", "int", minimum=1),
        _Param("page_size", "int", minimum=0, maximum=100),
        _Param("sort", "enum", array=True, choices=COLUMNS, descending_prefix=True),
    )
}

_DIGITS = re.compile(r"[0-9]+")
# C0 and C1 control characters, and lone surrogates (they cannot be encoded as UTF-8).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# Callers often forget to percent-encode the `+` of an offset, and a query string decodes `+`
# to a space, so a space in the sign's place is read as `+`.
_DATETIME = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})[Tt ]"
    r"(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2})"
    r"(?::(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]+))?)?"
    r"(?:(?P<zulu>[Zz])|(?P<sign>[-+ ])(?P<off_hour>[0-9]{2}):?(?P<off_minute>[0-9]{2}))?"
)
_DATETIME_FORMAT = "YYYY-MM-DDThh:mm[:ss[.uuuuuu]] followed by Z, +HH:MM or -HH:MM"


class _Invalid(Exception):
    """A value that breaks the contract; the arguments are the messages for the caller."""


@dataclass(frozen=True, slots=True)
class CanonicalQuery:
    """A valid query in canonical form: sorted by name, typed values, defaults dropped."""

    items: tuple[tuple[str, Value], ...]
    _key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        items = tuple(sorted(self.items, key=lambda item: item[0]))
        object.__setattr__(self, "items", items)
        encoded = orjson.dumps([[name, value] for name, value in items])
        object.__setattr__(self, "_key", "v1:" + hashlib.sha256(encoded).hexdigest())

    def canonical_string(self) -> str:
        """The canonical query string (comma arrays, percent-encoded, header-safe ASCII)."""
        return self.upstream_query("comma")

    def cache_key(self) -> str:
        """`v1:` and the SHA-256 of an unambiguous encoding of the typed values."""
        return self._key

    def upstream_query(self, style: ArrayStyle) -> str:
        """The query string for TeamUp, arrays as `name=a,b` (comma) or `name=a&name=b`."""
        if style not in ("comma", "repeat"):
            raise ValueError(f"unknown array style {style!r}")
        parts: list[str] = []
        for name, value in self.items:
            if not isinstance(value, tuple):
                parts.append(f"{name}={_encode(value)}")
            elif value and style == "comma":
                parts.append(f"{name}={','.join(_encode(item) for item in value)}")
            else:
                parts.extend(f"{name}={_encode(item)}" for item in value)
        return "&".join(parts)

    def get(self, name: str) -> Value | None:
        """The canonical value of one parameter, or None when absent (or at its default)."""
        for item_name, value in self.items:
            if item_name == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class QueryErrors:
    """Every parameter that broke the contract, with the reasons, in TeamUp's error shape."""

    field_errors: dict[str, list[str]]

    def body(self) -> dict[str, object]:
        """The 400 response body: code, type, a one-sentence message and the field errors."""
        names = ", ".join(_show(name) or '""' for name in self.field_errors)
        noun = "parameter" if len(self.field_errors) == 1 else "parameters"
        return {
            "code": "parameter_invalid",
            "type": "invalid_request_error",
            "message": f"Invalid query {noun}: {names}.",
            "field_errors": {name: list(messages) for name, messages in self.field_errors.items()},
        }


def parse_query(raw: MultiMapping[str]) -> CanonicalQuery | QueryErrors:
    """Validate a decoded query (e.g. aiohttp's `request.query`) and canonicalise it."""
    errors: dict[str, list[str]] = {}
    grouped: dict[str, list[str]] = {}
    for key, text in raw.items():
        name = key.removesuffix("[]")
        param = _SCHEMA.get(name)
        if param is None or (name != key and not param.array):
            _add(errors, _SURROGATE.sub("\ufffd", key), "Unknown parameter.")
            continue
        grouped.setdefault(name, []).append(text)

    values: dict[str, Value] = {}
    moments: dict[str, datetime] = {}
    for name, texts in grouped.items():
        param = _SCHEMA[name]
        try:
            if param.array:
                values[name] = _parse_array(param, texts)
            elif len(texts) > 1:
                raise _Invalid("This parameter may be given only once.")
            elif param.kind == "datetime":
                moments[name] = _parse_datetime(_checked(texts[0]))
                values[name] = _format_datetime(moments[name])
            else:
                values[name] = _SCALAR_PARSERS[param.kind](param, _checked(texts[0]))
        except _Invalid as invalid:
            for message in invalid.args:
                _add(errors, name, message)

    start, end = moments.get("created_at_gte"), moments.get("created_at_lte")
    if start is not None and end is not None and start > end:
        _add(errors, "created_at_gte", "Must not be later than created_at_lte.")

    if errors:
        return QueryErrors(dict(sorted(errors.items())))
    return CanonicalQuery(
        tuple(
            (name, value)
            for name, value in values.items()
            if _SCHEMA[name].default is None or value != _SCHEMA[name].default
        )
    )


def _parse_array(param: _Param, texts: list[str]) -> Value:
    """Merge every spelling of an array parameter into its canonical tuple."""
    items = [item for text in texts for item in _checked(text).split(",")]
    if len(items) > MAX_ARRAY_ITEMS:
        raise _Invalid(f"Ensure this field has no more than {MAX_ARRAY_ITEMS} elements.")
    if param.kind == "int":
        numbers = _parse_items(param, items, _parse_int)
        return tuple(dict.fromkeys(numbers)) if param.ordered else tuple(sorted(set(numbers)))
    return tuple(dict.fromkeys(_parse_items(param, items, _parse_enum)))


def _parse_items(param: _Param, items: list[str], parse: Callable[[_Param, str], _T]) -> list[_T]:
    """Parse every item, reporting each distinct problem once."""
    parsed: list[_T] = []
    problems: dict[str, None] = {}
    for item in items:
        if not item:
            problems["This list may not contain empty items."] = None
            continue
        try:
            parsed.append(parse(param, item))
        except _Invalid as invalid:
            problems[str(invalid)] = None
    if problems:
        raise _Invalid(*problems)
    return parsed


def _parse_int(param: _Param, text: str) -> int:
    """ASCII digits only; leading zeros allowed; bounds from the schema."""
    if not _DIGITS.fullmatch(text):
        raise _Invalid("A valid integer is required.")
    digits = text.lstrip("0") or "0"
    ceiling = _INT_CEILING if param.maximum is None else param.maximum
    # Comparing lengths first keeps absurdly long digit strings away from int().
    if len(digits) > len(str(ceiling)) or int(digits) > ceiling:
        raise _Invalid(f"Ensure this value is less than or equal to {ceiling}.")
    number = int(digits)
    if param.minimum is not None and number < param.minimum:
        raise _Invalid(f"Ensure this value is greater than or equal to {param.minimum}.")
    return number


def _parse_enum(param: _Param, text: str) -> str:
    """One of the schema's choices, ASCII case folded, `-` allowed where it means descending."""
    folded = text.lower() if text.isascii() else text
    prefix = ""
    if param.descending_prefix and folded.startswith("-"):
        prefix, folded = "-", folded[1:]
    if folded not in param.choices:
        raise _Invalid(f'"{_show(text)}" is not a valid choice.')
    return prefix + folded


def _parse_text(param: _Param, text: str) -> str:
    """Free text, trimmed, never blank, at most `max_length` characters."""
    stripped = text.strip()
    if not stripped:
        raise _Invalid("This field may not be blank.")
    if param.max_length is not None and len(stripped) > param.max_length:
        raise _Invalid(f"Ensure this field has no more than {param.max_length} characters.")
    return stripped


def _parse_datetime(text: str) -> datetime:
    """An ISO 8601 date and time with an offset, as a naive UTC datetime."""
    match = _DATETIME.fullmatch(text)
    if match is None:
        raise _Invalid(f"Datetime has wrong format. Use {_DATETIME_FORMAT}.")
    if match["zulu"] is None and match["sign"] is None:
        raise _Invalid("Datetime needs a UTC offset or Z; without one it is ambiguous.")
    fraction = match["fraction"] or ""
    if fraction[6:].strip("0"):
        raise _Invalid("Datetime precision is limited to microseconds.")
    try:
        local = datetime(
            int(match["year"]),
            int(match["month"]),
            int(match["day"]),
            int(match["hour"]),
            int(match["minute"]),
            int(match["second"] or 0),
            int(fraction[:6].ljust(6, "0")),
        )
    except ValueError:
        raise _Invalid(f'"{_show(text)}" is not a valid date and time.') from None
    if match["sign"] is None:
        return local
    off_hour, off_minute = int(match["off_hour"]), int(match["off_minute"])
    if off_hour > 23 or off_minute > 59:
        raise _Invalid(f'"{_show(text)}" has an invalid UTC offset.')
    offset = timedelta(hours=off_hour, minutes=off_minute)
    try:
        return local + offset if match["sign"] == "-" else local - offset
    except OverflowError:
        raise _Invalid("Datetime is out of range once converted to UTC.") from None


def _format_datetime(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS[.ffffff]Z` with trailing fractional zeros dropped."""
    fraction = f".{moment.microsecond:06d}".rstrip("0").rstrip(".")
    return f"{moment.replace(microsecond=0).isoformat()}{fraction}Z"


_SCALAR_PARSERS: dict[str, Callable[[_Param, str], str | int]] = {
    "int": _parse_int,
    "enum": _parse_enum,
    "text": _parse_text,
}


def _checked(text: str) -> str:
    """The text itself, unless it holds control characters or lone surrogates."""
    if _FORBIDDEN.search(text):
        raise _Invalid("Control characters are not allowed.")
    if _SURROGATE.search(text):
        raise _Invalid("The value is not valid Unicode.")
    return text


def _encode(value: str | int) -> str:
    """Percent-encode one value; `:` stays readable, so datetimes do too."""
    return quote(str(value), safe=":")


def _show(text: str) -> str:
    """A caller's text, shortened and made encodable, for use inside a message."""
    text = _SURROGATE.sub("\ufffd", text)
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _add(errors: dict[str, list[str]], name: str, message: str) -> None:
    """Record one message for a parameter, once."""
    messages = errors.setdefault(name, [])
    if message not in messages:
        messages.append(message)
