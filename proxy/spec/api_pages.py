"""Read TeamUp's API reference pages (docs/upstream/api): one `ApiPage` per operation.

The pages are a flattened extraction: `Path Parametersid integerrequiredA unique…Query
Parametersexpand string[]A comma-separated…`. Each parameter is `name type[]required`, then
`Possible values: …` / `Default value: …`, then a description, with no delimiter between one
parameter and the next. `parse_api_page` walks that text element by element; the few places where
a description runs into the next name with no full stop are listed in `RUN_ONS` (any other such
place is an `ApiPageError`, so a new one cannot slip in silently). `scripts/extract-spec` builds
the document from these pages; `tests/spec_api.py` reads them again on its own to check it.
"""

from __future__ import annotations

import csv
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "API_DIR",
    "ApiPage",
    "ApiPageError",
    "ApiParam",
    "load_api_pages",
    "parse_api_page",
]

API_DIR = Path(__file__).resolve().parents[2] / "docs" / "upstream" / "api"

_REQUEST = re.compile(
    r"^(?P<method>GET|POST|PUT|PATCH|DELETE) https://goteamup\.com/api/v2/+(?P<path>\S*)$", re.M
)
_SECTION = re.compile(r"(?P<where>Path|Query|Header) Parameters")
_TYPES = "string|integer|number|double|boolean|date-time|date|email|uuid|uri|object"
_HEAD = re.compile(
    rf"(?P<name>[a-z][a-z0-9_]*|Team[Uu]p-[A-Za-z-]+) (?:(?P<type>{_TYPES})"
    r"(?P<array>\[\])?(?P<required>required)?|(?=[A-Z]))"
)
_DEFAULT = re.compile(r"Default value: (?:(?P<int>-?[0-9]+)|(?P<bool>true|false))?")
_BOUND = re.compile(r"(?P<op>[<>]=) (?P<number>-?[0-9]+)(?P<chars> characters)?")
_PATTERN = re.compile(r"Value must match regular expression (?P<pattern>\^.*?\$)")
_LIST = re.compile(r"\[(?P<items>[^\]]*)\]")
# A description's glued last word and the parameter name that really starts inside it.
RUN_ONS = {
    "active_registration_timelineapplicable_to_recurring_reservation": (
        "applicable_to_recurring_reservation"
    ),
}
# Characters after which a parameter name may start once a description has begun.
_NAME_AFTER = ".)\n]"


class ApiPageError(ValueError):
    """A page this parser cannot read; the message says where."""


@dataclass(frozen=True, slots=True)
class ApiParam:
    """One path, query or header parameter as the page states it (None: the page is silent)."""

    name: str
    where: str  # path | query | header
    type: str | None  # None: the page gives no type
    array: bool
    required: bool
    enum: tuple[str, ...] | None = None
    default: str | int | bool | None = None
    minimum: int | None = None
    maximum: int | None = None
    max_length: int | None = None
    min_items: int | None = None
    max_items: int | None = None
    pattern: str | None = None
    non_empty: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class ApiPage:
    """One operation as its page states it."""

    folder: str
    file: str
    method: str
    path: str  # `:id` style, single slash, starting /api/v2/
    kind: str
    title: str
    summary: str
    params: tuple[ApiParam, ...]
    permissions: tuple[str, ...]
    feature_gated: bool
    # Top-level fields of one answer object (of one list result) with their page types.
    fields: dict[str, str] = field(default_factory=dict)

    @property
    def stem(self) -> str:
        return self.file.removesuffix(".md").removeprefix("endpoints_")

    def param(self, name: str, where: str = "query") -> ApiParam | None:
        found = (p for p in self.params if p.name == name and p.where == where)
        return next(found, None)


def load_api_pages(directory: Path = API_DIR) -> list[ApiPage]:
    """Every operation of `endpoints.tsv`, in its order."""
    with (directory / "endpoints.tsv").open(encoding="utf-8", newline="") as index:
        rows = list(csv.DictReader(index, delimiter="\t"))
    return [
        parse_api_page(
            row["folder"],
            row["file"],
            row["kind"],
            (directory / row["folder"] / row["file"]).read_text(encoding="utf-8"),
        )
        for row in rows
    ]


def parse_api_page(folder: str, file: str, kind: str, text: str) -> ApiPage:
    where = f"{folder}/{file}"
    request = _REQUEST.search(text)
    if request is None:
        raise ApiPageError(f"{where}: no request line")
    path = "/api/v2/" + request["path"].lstrip("/")
    title = text.splitlines()[0].removeprefix("# ")
    summary_at = text.find("## Summary\n")
    summary = text[summary_at:].splitlines()[1].split(" | ")[0] if summary_at >= 0 else title
    head = text[request.end() : text.find("\n", request.end() + 1) + 1 + 2000]
    permissions = re.search(r"Must have one of the following permissions: (?P<p>[^\n]*)\.", head)
    gated = "The following condition must be met: is_feature_on" in head
    params = tuple(_params(where, text[request.end() :]))
    return ApiPage(
        folder=folder,
        file=file,
        method=request["method"],
        path=path,
        kind=kind,
        title=title,
        summary=html.unescape(summary),
        params=params,
        permissions=tuple(permissions["p"].split(", ")) if permissions else (),
        feature_gated=gated,
        fields=_fields(text, kind),
    )


def _block(text: str) -> str:
    """The parameters: from the first `… Parameters` up to the responses or the request body."""
    ends = [at for at in (text.find("\nResponses"), text.find("\napplication/")) if at >= 0]
    block = text[: min(ends)] if ends else text
    first = _SECTION.search(block)
    return html.unescape(block[first.start() :]) if first else ""


def _params(where: str, text: str) -> Iterator[ApiParam]:
    block = _block(text)
    parts = _SECTION.split(block)
    # parts: ['', 'Path', '<text>', 'Query', '<text>', ...]
    for section, body in zip(parts[1::2], parts[2::2], strict=True):
        if section == "Header":
            # The header parameters are the last on their line; body schemas follow it.
            body = body.split("\n", 1)[0]
        yield from _section(where, section.lower(), body.strip("\n"))


def _section(where: str, section: str, text: str) -> Iterator[ApiParam]:
    pos = 0
    while pos < len(text):
        head = _HEAD.match(text, pos)
        if head is None:
            raise ApiPageError(f"{where}: no parameter at {text[pos : pos + 60]!r}")
        pos = head.end()
        values: dict[str, object] = {}
        description: list[str] = []
        while pos < len(text):
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if pos >= len(text):
                break
            if text.startswith("Possible values: ", pos):
                pos = _possible(
                    where, head["name"], head["array"] is not None, text, pos + 17, values
                )
            elif (default := _DEFAULT.match(text, pos)) is not None:
                values["default"], pos = _default(where, head["name"], default, values, text)
            elif _HEAD.match(text, pos) and (description or not text[pos].isupper()):
                break
            elif not text[pos].isupper():
                raise ApiPageError(
                    f"{where}: {head['name']}: unreadable at {text[pos : pos + 60]!r}"
                )
            else:
                end = _description_end(where, text, pos)
                description.append(text[pos:end].strip())
                pos = end
        yield ApiParam(
            name=head["name"],
            where=section,
            type=head["type"],
            array=head["array"] is not None,
            required=head["required"] is not None or section == "path",
            description=" ".join(part for part in description if part),
            **values,  # type: ignore[arg-type]
        )


def _description_end(where: str, text: str, pos: int) -> int:
    """Where a description starting at `pos` ends: before the next parameter's name."""
    values = [
        at + 1
        for mark in (".Possible values: ", ".Default value: ")
        if (at := text.find(mark, pos)) >= 0
    ]
    for head in _HEAD.finditer(text, pos + 1):
        at = head.start()
        if values and min(values) <= at:
            return min(values)
        if text[at - 1] in _NAME_AFTER and _follows(text, head.end()):
            return at
        for glued, name in RUN_ONS.items():
            start = text.find(glued, pos)
            if start >= 0 and start + len(glued) == head.start("name") + len(head["name"]):
                return start + len(glued) - len(name)
    return min(values, default=len(text))


def _follows(text: str, at: int) -> bool:
    """Whether what follows a head is what follows a parameter head (not more prose)."""
    return at == len(text) or text[at] != " "


def _default(
    where: str, name: str, default: re.Match[str], values: dict[str, object], text: str
) -> tuple[str | int | bool, int]:
    if default["int"] is not None:
        return int(default["int"]), default.end()
    if default["bool"] is not None:
        return default["bool"] == "true", default.end()
    enum = values.get("enum")
    listed = enum if isinstance(enum, tuple) else ()
    for value in sorted(listed, key=len, reverse=True):
        after = default.end() + len(value)
        if text.startswith(value, default.end()) and (
            after == len(text) or _HEAD.match(text, after) or text[after].isupper()
        ):
            return str(value), after
    # A free default: up to the next head or the end.
    rest = text[default.end() :]
    head = _HEAD.search(rest)
    value = rest[: head.start()] if head else rest
    if not value:
        raise ApiPageError(f"{where}: {name}: unreadable default at {rest[:40]!r}")
    return value, default.end() + len(value)


def _possible(
    where: str, name: str, array: bool, text: str, pos: int, values: dict[str, object]
) -> int:
    """`Possible values: a, b and c`: each part a list, a bound, a pattern or non-empty."""
    while True:
        if text.startswith("non-empty", pos):
            values["non_empty"] = True
            pos += len("non-empty")
        elif (listed := _LIST.match(text, pos)) is not None:
            values["enum"] = tuple(item.strip() for item in listed["items"].split(","))
            pos = listed.end()
        elif (bound := _BOUND.match(text, pos)) is not None:
            number = int(bound["number"])
            if bound["chars"]:
                values["max_length"] = number
            else:
                key = ("min" if bound["op"] == ">=" else "max") + ("_items" if array else "imum")
                values[key] = number
            pos = bound.end()
        elif (pattern := _PATTERN.match(text, pos)) is not None:
            values["pattern"] = pattern["pattern"]
            pos = pattern.end()
        else:
            raise ApiPageError(f"{where}: {name}: unreadable values at {text[pos : pos + 60]!r}")
        separator = re.compile(r", | and ").match(text, pos)
        if separator is None:
            return pos
        pos = separator.end()


# --- the answer's fields --------------------------------------------------------------------

_EXAMPLE = re.compile(r"^```json\n(?P<body>\{  \".*?)\n```$", re.M | re.S)
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def _fields(text: str, kind: str) -> dict[str, str]:
    """The top-level fields of one answer object (of a list's first result): the XML example's
    (complete on most pages) in its order, typed by the JSON example where that shows them."""
    from_json = _json_fields(text)
    from_xml = _xml_fields(text)
    return {name: from_json.get(name, kind) for name, kind in from_xml.items()} | from_json


_TAG = re.compile(r"<(?P<close>/)?(?P<name>[A-Za-z_][A-Za-z0-9_.-]*)(?P<empty>/)?>")


def _xml_fields(text: str) -> dict[str, str]:
    responses = text.find("\nResponses")
    if responses < 0:
        return {}
    examples = text.find("\n## Example", responses)
    line = html.unescape(text[responses + 1 : examples if examples >= 0 else len(text)])
    root = line.find("<root>")
    if root < 0:
        return {}
    end = line.find("</root>", root)
    body = line[root + len("<root>") : end if end >= 0 else len(line)]
    if body.lstrip().startswith("<count>"):
        start = body.find("<results>")
        if start < 0:
            return {}
        stop = body.find("</results>", start)
        body = body[start + len("<results>") : stop if stop >= 0 else len(body)]
    fields: dict[str, str] = {}
    depth = 0
    opened: tuple[str, int] | None = None
    for tag in _TAG.finditer(body):
        name = tag["name"]
        if tag["empty"]:
            if depth == 0:
                fields.setdefault(name, "array")
        elif tag["close"]:
            depth -= 1
            if depth == 0 and opened is not None:
                inner = body[opened[1] : tag.start()]
                kind = "object" if _TAG.search(inner) else _text_type(inner.strip())
                fields[name] = "array" if name in fields else kind
                opened = None
        else:
            if depth == 0:
                opened = (name, tag.end())
            depth += 1
    return fields


def _text_type(value: str) -> str:
    if value in ("true", "false"):
        return "boolean"
    if re.fullmatch(r"-?[0-9]+", value):
        return "integer"
    if re.fullmatch(r"-?[0-9]+\.[0-9]+", value):
        return "number"
    if value.startswith(("http://", "https://")):
        return "uri"
    if _DATE_TIME.fullmatch(value):
        return "date-time"
    if _DATE.fullmatch(value):
        return "date"
    return "string"


def _json_fields(text: str) -> dict[str, str]:
    """The top-level fields of the page's first JSON example answer, read even where the page
    cuts it short."""
    at = text.find("## Example Request / Response JSON")
    example = _EXAMPLE.search(text, at) if at >= 0 else None
    if example is None:
        return {}
    body = example["body"]
    start = 0
    if body.startswith('{  "count"'):
        results = body.find('"results": [')
        if results < 0:
            return {}
        start = body.find("{", results)
        if start < 0:
            return {}
    return dict(_top_level(body, start))


def _top_level(body: str, start: int) -> Iterator[tuple[str, str]]:
    """(key, type) of the object opening at `start`, until it closes or the text ends."""
    depth = 0
    pos = start
    key_at = re.compile(r'\s*"(?P<key>[^"]+)":\s*')
    while pos < len(body):
        char = body[pos]
        if char in "{[":
            depth += 1
            pos += 1
        elif char in "}]":
            depth -= 1
            pos += 1
            if depth == 0:
                return
        elif char == '"':
            key = key_at.match(body, pos) if depth == 1 else None
            if key is not None:
                pos = key.end()
                yield key["key"], _value_type(body, pos)
            else:
                pos = body.index('"', pos + 1) + 1 if '"' in body[pos + 1 :] else len(body)
        else:
            pos += 1


def _value_type(body: str, pos: int) -> str:
    rest = body[pos : pos + 80]
    if rest.startswith("{"):
        return "object"
    if rest.startswith("["):
        return "array"
    if rest.startswith(("true", "false")):
        return "boolean"
    if rest.startswith("null"):
        return "null"
    if rest.startswith('"'):
        value = rest[1:].split('"', 1)[0]
        if value.startswith(("http://", "https://")):
            return "uri"
        if _DATE_TIME.fullmatch(value):
            return "date-time"
        if _DATE.fullmatch(value):
            return "date"
        return "string"
    number = re.match(r"-?[0-9]+(?P<fraction>\.[0-9]+)?", rest)
    if number is not None:
        return "number" if number["fraction"] else "integer"
    return "string"
