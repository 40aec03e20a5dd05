"""The query contract: validate one operation's parameters and turn them into one canonical form.

A `Contract` is built from the operation's OpenAPI object (`contract_from_operation`): the
parameter table is data, not code. `Contract.parse` returns a value or the errors, never raises;
`Contract.parse_path` does the same for the path parameters the router cut out of the path.
`in: header` parameters are the proxy's own business (it sends its configured ones) and are
ignored here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any, Literal, TypeVar
from urllib.parse import quote

import orjson
from multidict import MultiMapping

__all__ = [
    "MAX_ARRAY_ITEMS",
    "MAX_QUERY_BYTES",
    "ArrayStyle",
    "CanonicalQuery",
    "Contract",
    "Param",
    "PathParam",
    "PathValue",
    "QueryErrors",
    "Value",
    "contract_from_operation",
]

MAX_QUERY_BYTES = 4096
MAX_ARRAY_ITEMS = 200
ArrayStyle = Literal["comma", "repeat"]
Kind = Literal["int", "number", "bool", "date", "datetime", "enum", "text"]
Value = str | int | bool | tuple[str, ...] | tuple[int, ...]
PathValue = tuple[tuple[str, int | str], ...]

_T = TypeVar("_T", int, str)

# Parameters without a documented maximum are still database ids or counts: nothing beyond a
# signed 64-bit integer can mean anything upstream, and the cap keeps the cache key encodable.
INT_CEILING = 2**63 - 1
_SHOWN_CHARS = 40


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter of an endpoint: how its values are read and compared."""

    name: str
    kind: Kind
    array: bool = False
    ordered: bool = True
    default: str | int | bool | None = None
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    descending_prefix: bool = False
    max_length: int | None = None
    pattern: str | None = None
    required: bool = False
    min_items: int = 0
    max_items: int = MAX_ARRAY_ITEMS


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


_BOOLEANS = {"true": True, "1": True, "false": False, "0": False}
_DATE = re.compile(r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})")


class _Invalid(Exception):
    """A value that breaks the contract; the arguments are the messages for the caller."""


@dataclass(frozen=True, slots=True)
class CanonicalQuery:
    """A valid question to one operation in canonical form: its path parameters (in template
    order) and its query sorted by name, typed values, defaults dropped."""

    operation: str
    items: tuple[tuple[str, Value], ...]
    path: PathValue = ()
    # The TeamUp provider the question is asked for (`TeamUp-Provider-ID`; None: none named).
    # Part of the cache key (`backends.keys`), not of the digest.
    provider: str | None = None
    digest: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        items = tuple(sorted(self.items, key=lambda item: item[0]))
        object.__setattr__(self, "items", items)
        encoded = orjson.dumps(
            [[[name, value] for name, value in self.path], [[name, value] for name, value in items]]
        )
        object.__setattr__(self, "digest", hashlib.sha256(encoded).hexdigest())

    def canonical_string(self) -> str:
        """The canonical query string (comma arrays, percent-encoded, header-safe ASCII)."""
        return self.upstream_query("comma")

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


@dataclass(frozen=True, slots=True)
class PathParam:
    """One path parameter: an integer id (canonical without leading zeros), one of a few
    documented values, or a string matching its documented pattern."""

    name: str
    kind: Literal["int", "enum", "text"] = "text"
    minimum: int | None = None
    maximum: int | None = None
    choices: tuple[str, ...] = ()
    pattern: str = r"[A-Za-z0-9_-]{1,128}"

    def parse(self, raw: str) -> int | str | None:
        """The canonical value of one path segment (decoded but for `%2F` / `%25`), or None.

        A `%` left in it is refused outright: an encoded `/` must never reach TeamUp's router;
        `.`, `..` and control characters never either.
        """
        if not raw or "%" in raw or raw in (".", "..") or len(raw) > 256:
            return None
        if self.kind == "int":
            if not _DIGITS.fullmatch(raw):
                return None
            digits = raw.lstrip("0") or "0"
            ceiling = INT_CEILING if self.maximum is None else self.maximum
            if len(digits) > len(str(ceiling)) or int(digits) > ceiling:
                return None
            number = int(digits)
            if self.minimum is not None and number < self.minimum:
                return None
            return number
        if self.kind == "enum":
            folded = raw.lower() if raw.isascii() else raw
            return folded if folded in self.choices else None
        if _FORBIDDEN.search(raw) or re.fullmatch(self.pattern, raw, re.ASCII) is None:
            return None
        return raw

    def describe(self) -> str:
        """What a valid value looks like, for a 404's message."""
        if self.kind == "int":
            return "a positive integer" if (self.minimum or 0) >= 1 else "an integer"
        if self.kind == "enum":
            return "one of " + ", ".join(self.choices)
        return f"text matching {self.pattern}"


@dataclass(frozen=True, slots=True)
class Contract:
    """One operation's parameters, the `[low, high]` pairs that must be ordered, and its columns."""

    operation: str
    params: Mapping[str, Param]
    ranges: tuple[tuple[str, str], ...] = ()
    columns: tuple[str, ...] = ()
    path_params: tuple[PathParam, ...] = ()

    def parse_path(self, raw: tuple[str, ...]) -> PathValue | str:
        """The canonical path parameters of the raw segments, or the name of the first bad one."""
        values: list[tuple[str, int | str]] = []
        for param, text in zip(self.path_params, raw, strict=True):
            value = param.parse(text)
            if value is None:
                return param.name
            values.append((param.name, value))
        return tuple(values)

    def parse(self, raw: MultiMapping[str], path: PathValue = ()) -> CanonicalQuery | QueryErrors:
        """Validate a decoded query (e.g. aiohttp's `request.query`) and canonicalise it, with
        the operation's already validated path parameters."""
        schema = self.params
        errors: dict[str, list[str]] = {}
        grouped: dict[str, list[str]] = {}
        for key, text in raw.items():
            name = key.removesuffix("[]")
            param = schema.get(name)
            if param is None or (name != key and not param.array):
                _add(errors, _SURROGATE.sub("\ufffd", key), "Unknown parameter.")
                continue
            grouped.setdefault(name, []).append(text)

        values: dict[str, Value] = {}
        ordered: dict[str, date | datetime] = {}
        for name, texts in grouped.items():
            param = schema[name]
            try:
                if param.array:
                    values[name] = _parse_array(param, texts)
                elif len(texts) > 1:
                    raise _Invalid("This parameter may be given only once.")
                elif param.kind == "datetime":
                    moment = _parse_datetime(_checked(texts[0]))
                    ordered[name] = moment
                    values[name] = _format_datetime(moment)
                elif param.kind == "date":
                    day = _parse_date(_checked(texts[0]))
                    ordered[name] = day
                    values[name] = day.isoformat()
                else:
                    values[name] = _SCALAR_PARSERS[param.kind](param, _checked(texts[0]))
            except _Invalid as invalid:
                for message in invalid.args:
                    _add(errors, name, message)

        for name, param in schema.items():
            if param.required and name not in grouped:
                _add(errors, name, "This parameter is required.")
        for low, high in self.ranges:
            start, end = ordered.get(low), ordered.get(high)
            if start is not None and end is not None and start > end:
                _add(errors, low, f"Must not be later than {high}.")

        if errors:
            return QueryErrors(dict(sorted(errors.items())))
        return CanonicalQuery(
            self.operation,
            tuple(
                (name, value)
                for name, value in values.items()
                if schema[name].default is None or value != schema[name].default
            ),
            path,
        )


def contract_from_operation(
    operation: Mapping[str, Any], path_names: tuple[str, ...] = ()
) -> Contract:
    """The contract of one OpenAPI operation of `proxy/spec/teamup.json` (see its `x-` keys);
    `path_names` are the template's parameters in order (each needs an `in: path` object, or
    gets the safe default pattern)."""
    columns = tuple(operation.get("x-columns", ()))
    params = {
        spec["name"]: _param_from_spec(spec, columns)
        for spec in operation.get("parameters", ())
        if spec.get("in") == "query"
    }
    described = {
        str(spec["name"]): spec
        for spec in operation.get("parameters", ())
        if spec.get("in") == "path"
    }
    path_params = tuple(_path_param(name, described.get(name)) for name in path_names)
    ranges = tuple((str(low), str(high)) for low, high in operation.get("x-ranges", ()))
    for low, high in ranges:
        if low not in params or high not in params:
            raise ValueError(f"x-ranges names an unknown parameter: {low}, {high}")
    return Contract(str(operation["operationId"]), params, ranges, columns, path_params)


def _path_param(name: str, spec: Mapping[str, Any] | None) -> PathParam:
    """One path parameter from its OpenAPI object (or the safe default when undescribed)."""
    schema = spec.get("schema", {}) if spec is not None else {}
    if schema.get("type") == "integer":
        return PathParam(name, "int", schema.get("minimum"), schema.get("maximum"))
    if "enum" in schema:
        return PathParam(name, "enum", choices=tuple(str(c).lower() for c in schema["enum"]))
    pattern = schema.get("pattern")
    if not pattern:
        return PathParam(name)
    # Anchors are implied (fullmatch); the document writes them as JSON Schema does.
    pattern = str(pattern).removeprefix("^").removesuffix("$")
    re.compile(pattern)
    return PathParam(name, "text", pattern=pattern)


def _param_from_spec(spec: Mapping[str, Any], columns: tuple[str, ...]) -> Param:
    """One `Param` from an OpenAPI parameter object; anything not understood is an error."""
    name = str(spec["name"])
    schema = spec["schema"]
    array = schema.get("type") == "array"
    item = schema["items"] if array else schema
    if spec.get("x-sort"):
        kind: Kind = "enum"
        choices: tuple[str, ...] = columns
    else:
        kind, choices = _kind_of(name, item)
    if array and spec.get("x-canonical") not in ("set", "ordered"):
        raise ValueError(f"array parameter {name} needs x-canonical: set or ordered")
    default = schema.get("default")
    return Param(
        name,
        kind,
        array=array,
        ordered=not array or spec.get("x-canonical") == "ordered",
        default=default,
        minimum=item.get("minimum"),
        maximum=item.get("maximum"),
        choices=choices,
        descending_prefix=bool(spec.get("x-sort")),
        max_length=item.get("maxLength") if kind == "text" else None,
        pattern=item.get("pattern") if kind == "text" else None,
        required=bool(spec.get("required")),
        min_items=int(schema.get("minItems", 0)) if array else 0,
        max_items=int(schema.get("maxItems", MAX_ARRAY_ITEMS)) if array else MAX_ARRAY_ITEMS,
    )


def _kind_of(name: str, schema: Mapping[str, Any]) -> tuple[Kind, tuple[str, ...]]:
    kind = schema.get("type")
    if kind == "integer":
        return "int", ()
    if kind == "number":
        return "number", ()
    if kind == "boolean":
        return "bool", ()
    if kind == "string" and "enum" in schema:
        return "enum", tuple(str(choice) for choice in schema["enum"])
    if kind == "string" and schema.get("format") == "date":
        return "date", ()
    if kind == "string" and schema.get("format") == "date-time":
        return "datetime", ()
    if kind == "string":
        # Other formats (email, uri, …) are text to the proxy: TeamUp judges them.
        return "text", ()
    raise ValueError(f"parameter {name}: schema {dict(schema)} is not one the proxy understands")


def _parse_array(param: Param, texts: list[str]) -> Value:
    """Merge every spelling of an array parameter into its canonical tuple."""
    items = [item for text in texts for item in _checked(text).split(",")]
    if len(items) > param.max_items:
        raise _Invalid(f"Ensure this field has no more than {param.max_items} elements.")
    if param.kind == "int":
        numbers = _parse_items(param, items, _parse_int)
        return tuple(dict.fromkeys(numbers)) if param.ordered else tuple(sorted(set(numbers)))
    parse = _ITEM_PARSERS.get(param.kind)
    if parse is None:
        raise _Invalid("This parameter takes one value, not a list.")
    words = _parse_items(param, items, parse)
    unique = tuple(dict.fromkeys(words)) if param.ordered else tuple(sorted(set(words)))
    if len(unique) < param.min_items:
        raise _Invalid(f"Ensure this field has at least {param.min_items} elements.")
    return unique


def _parse_items(param: Param, items: list[str], parse: Callable[[Param, str], _T]) -> list[_T]:
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


def _parse_int(param: Param, text: str) -> int:
    """ASCII digits only; leading zeros allowed; bounds from the schema."""
    if not _DIGITS.fullmatch(text):
        raise _Invalid("A valid integer is required.")
    digits = text.lstrip("0") or "0"
    ceiling = INT_CEILING if param.maximum is None else param.maximum
    # Comparing lengths first keeps absurdly long digit strings away from int().
    if len(digits) > len(str(ceiling)) or int(digits) > ceiling:
        raise _Invalid(f"Ensure this value is less than or equal to {ceiling}.")
    number = int(digits)
    if param.minimum is not None and number < param.minimum:
        raise _Invalid(f"Ensure this value is greater than or equal to {param.minimum}.")
    return number


def _parse_enum(param: Param, text: str) -> str:
    """One of the schema's choices, ASCII case folded, `-` allowed where it means descending."""
    folded = text.lower() if text.isascii() else text
    prefix = ""
    if param.descending_prefix and folded.startswith("-"):
        prefix, folded = "-", folded[1:]
    if folded not in param.choices:
        raise _Invalid(f'"{_show(text)}" is not a valid choice.')
    return prefix + folded


def _parse_text(param: Param, text: str) -> str:
    """Free text, trimmed, never blank, at most `max_length` characters."""
    stripped = text.strip()
    if not stripped:
        raise _Invalid("This field may not be blank.")
    if param.max_length is not None and len(stripped) > param.max_length:
        raise _Invalid(f"Ensure this field has no more than {param.max_length} characters.")
    if param.pattern is not None and re.fullmatch(param.pattern, stripped, re.ASCII) is None:
        raise _Invalid(f'"{_show(text)}" does not match {param.pattern}.')
    return stripped


def _parse_bool(param: Param, text: str) -> bool:
    """`true`/`false` in any case, or `1`/`0`."""
    value = _BOOLEANS.get(text.lower()) if text.isascii() else None
    if value is None:
        raise _Invalid(f'"{_show(text)}" is not a valid boolean. Use true or false.')
    return value


def _parse_date(text: str) -> date:
    """`YYYY-MM-DD`, a real calendar date."""
    match = _DATE.fullmatch(text)
    if match is None:
        raise _Invalid("Date has wrong format. Use YYYY-MM-DD.")
    try:
        return date(int(match["year"]), int(match["month"]), int(match["day"]))
    except ValueError:
        raise _Invalid(f'"{_show(text)}" is not a valid date.') from None


def _date_item(param: Param, text: str) -> str:
    return _parse_date(text).isoformat()


def _datetime_item(param: Param, text: str) -> str:
    return _format_datetime(_parse_datetime(text))


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


def _parse_number(param: Param, text: str) -> str:
    """A decimal number, canonical: no exponent, no leading `+`, no trailing zeros."""
    if not _NUMBER.fullmatch(text):
        raise _Invalid("A valid number is required.")
    number = Decimal(text)
    if param.minimum is not None and number < param.minimum:
        raise _Invalid(f"Ensure this value is greater than or equal to {param.minimum}.")
    if param.maximum is not None and number > param.maximum:
        raise _Invalid(f"Ensure this value is less than or equal to {param.maximum}.")
    shown = format(number.normalize(), "f")
    return "0" if shown in ("-0", "0") else shown


_NUMBER = re.compile(r"-?[0-9]{1,18}(?:\.[0-9]{1,12})?")

_SCALAR_PARSERS: dict[str, Callable[[Param, str], str | int | bool]] = {
    "number": _parse_number,
    "int": _parse_int,
    "bool": _parse_bool,
    "enum": _parse_enum,
    "text": _parse_text,
}
# Item parsers for arrays of strings (integer arrays are parsed as numbers, see _parse_array).
_ITEM_PARSERS: dict[str, Callable[[Param, str], str]] = {
    "number": _parse_number,
    "enum": _parse_enum,
    "date": _date_item,
    "datetime": _datetime_item,
    "text": _parse_text,
}


def _checked(text: str) -> str:
    """The text itself, unless it holds control characters or lone surrogates."""
    if _FORBIDDEN.search(text):
        raise _Invalid("Control characters are not allowed.")
    if _SURROGATE.search(text):
        raise _Invalid("The value is not valid Unicode.")
    return text


def _encode(value: str | int | bool) -> str:
    """Percent-encode one value; `:` stays readable, so datetimes do too."""
    if isinstance(value, bool):
        return "true" if value else "false"
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
