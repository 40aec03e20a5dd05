"""TeamUp's API pages (docs/upstream/api) read again, apart from proxy/spec/api_pages.py, to check
proxy/spec/teamup.json against them.

The generator walks each page's parameter text element by element. This reading goes the other
way: it takes the parameter names the document states for an operation and cuts the page's text
at them, in order. The names are right only if the cuts tile the text exactly (every piece opens
with `name type`, nothing is left over, no piece holds another parameter's head after a full
stop) and each piece's `Possible values` / `Default value` are the document's schema.
"""

from __future__ import annotations

import csv
import html
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
API_DIR = REPO / "docs" / "upstream" / "api"

_REQUEST = re.compile(r"^(GET|POST|PUT|PATCH|DELETE) https://goteamup\.com/api/v2//?(\S*)$", re.M)
_SECTIONS = ("Path", "Query", "Header")
# What the page writes for a type, and the schema the document gives it.
_TYPES: dict[str, dict[str, str]] = {
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "double": {"type": "number"},
    "boolean": {"type": "boolean"},
    "string": {"type": "string"},
    "date": {"type": "string", "format": "date"},
    "date-time": {"type": "string", "format": "date-time"},
    "email": {"type": "string", "format": "email"},
}


@dataclass(frozen=True, slots=True)
class Row:
    """One line of endpoints.tsv."""

    method: str
    path: str
    folder: str
    file: str
    kind: str

    @property
    def template(self) -> str:
        return re.sub(r":(\w+)", r"{\1}", self.path)


def rows(directory: Path = API_DIR) -> list[Row]:
    with (directory / "endpoints.tsv").open(encoding="utf-8", newline="") as index:
        return [
            Row(line["method"], line["path"], line["folder"], line["file"], line["kind"])
            for line in csv.DictReader(index, delimiter="\t")
        ]


def page_text(row: Row, directory: Path = API_DIR) -> str:
    return (directory / row.folder / row.file).read_text(encoding="utf-8")


def request_line(text: str) -> tuple[str, str] | None:
    """(method, single-slash path) of the page's request line."""
    found = _REQUEST.search(text)
    return None if found is None else (found[1], "/api/v2/" + found[2])


def sections(text: str) -> dict[str, str]:
    """Each parameter section's text (`Path`, `Query`, `Header`), entities decoded."""
    found = _REQUEST.search(text)
    assert found is not None
    rest = text[found.end() :]
    stop = min(
        (at for at in (rest.find("\nResponses"), rest.find("\napplication/")) if at >= 0),
        default=len(rest),
    )
    rest = rest[:stop]
    marks = [
        (m.start(), m.end(), m[1]) for m in re.finditer(r"(Path|Query|Header) Parameters", rest)
    ]
    result: dict[str, str] = {}
    for index, (_, end, name) in enumerate(marks):
        upto = marks[index + 1][0] if index + 1 < len(marks) else len(rest)
        body = rest[end:upto]
        if name == "Header":
            body = body.split("\n", 1)[0]
        result[name] = html.unescape(body).strip("\n")
    return result


def _pieces(text: str, names: list[str]) -> Iterator[tuple[str, str] | str]:
    """Cut `text` at each name in turn; yield (name, piece) or a problem."""
    pos = 0
    for index, name in enumerate(names):
        if not text.startswith(name + " ", pos):
            yield f"{name!r} does not start at {text[pos : pos + 50]!r}"
            return
        following = names[index + 1] if index + 1 < len(names) else None
        if following is None:
            end = len(text)
        else:
            # The next name: the first place it starts, followed by a space (its type).
            end = _next_head(text, pos + len(name), following)
            if end < 0:
                yield f"{following!r} is not after {name!r}"
                return
        yield name, text[pos + len(name) + 1 : end]
        pos = end


def _next_head(text: str, start: int, name: str) -> int:
    for found in re.finditer(re.escape(name) + " ", text[start:]):
        at = start + found.start()
        rest = text[at + len(name) + 1 :]
        if re.match(r"(string|integer|number|double|boolean|date-time|date|email)|[A-Z]", rest):
            return at
    return -1


def operation_problems(row: Row, text: str, operation: Mapping[str, Any]) -> list[str]:
    """Every way the operation departs from its page (parameters only)."""
    problems: list[str] = []
    params: list[Mapping[str, Any]] = operation.get("parameters", [])
    by_section = {
        "Path": [p for p in params if p["in"] == "path"],
        "Query": [p for p in params if p["in"] == "query"],
        "Header": [p for p in params if p["in"] == "header"],
    }
    texts = sections(text)
    for section in _SECTIONS:
        documented = by_section[section]
        body = texts.get(section, "")
        if not documented:
            if body:
                problems.append(f"{section}: the page has parameters, the document none")
            continue
        order = [p["name"] for p in documented]
        # The page lists path parameters in its own order; the document in path order.
        if section == "Path":
            order = sorted(order, key=lambda name: body.find(name + " "))
        by_name = {p["name"]: p for p in documented}
        consumed = 0
        for piece in _pieces(body, order):
            if isinstance(piece, str):
                problems.append(f"{section}: {piece}")
                break
            name, rest = piece
            consumed += 1
            problems.extend(
                f"{section} {name}: {gap}" for gap in _piece_gaps(rest, by_name[name], section)
            )
        if consumed != len(order):
            problems.append(f"{section}: only {consumed} of {len(order)} parameters found")
    return problems


_HEAD = re.compile(
    r"^(?P<type>string|integer|number|double|boolean|date-time|date|email)?"
    r"(?P<array>\[\])?(?P<required>required)?"
)


def _piece_gaps(rest: str, param: Mapping[str, Any], section: str) -> Iterator[str]:
    head = _HEAD.match(rest)
    assert head is not None
    schema: Mapping[str, Any] = param.get("schema", {})
    note = bool(param.get("x-note"))
    is_array = schema.get("type") == "array"
    item: Mapping[str, Any] = schema.get("items", {}) if is_array else schema
    body = rest[head.end() :]
    # A head in the description after a full stop is a parameter the document lacks.
    stray = re.search(
        r"\.([a-z][a-z0-9_]*) (string|integer|boolean|date-time|date)(\[\]|[A-Z])", body
    )
    if stray is not None:
        yield f"the page has a parameter {stray[1]!r} the document does not"
    page_type = head["type"]
    if section == "Path":
        if param.get("required") is not True:
            yield "a path parameter must be required"
        if page_type == "integer" and schema != {"type": "integer", "minimum": 1}:
            yield f"an integer id is {{type: integer, minimum: 1}}, not {dict(schema)}"
        if page_type == "string" and "pattern" not in schema and "enum" not in schema:
            yield "a string path parameter needs a pattern or values"
    if section == "Query":
        tightened_required = "required" in str(param.get("x-tightened", ""))
        if bool(head["required"]) != bool(param.get("required")) and not tightened_required:
            yield f"required is {bool(param.get('required'))}, the page: {bool(head['required'])}"
        if bool(head["array"]) and not is_array:
            yield "the page says an array"
        if is_array and not note and not head["array"]:
            yield "an array the page does not call one, and no x-note"
        if is_array:
            if param.get("style") != "form" or param.get("x-canonical") not in ("set", "ordered"):
                yield "an array needs style form and x-canonical set or ordered"
        if page_type is not None and not note:
            wanted = _TYPES[page_type]
            got = {key: item[key] for key in ("type", "format") if key in item}
            if got != wanted:
                yield f"type {got} is not the page's {page_type}"
    pattern = re.search(r"Value must match regular expression (\^.*?\$)", body)
    if pattern is not None:
        if item.get("pattern") != pattern[1]:
            yield f"pattern {item.get('pattern')!r} is not the page's {pattern[1]!r}"
        body = body[: pattern.start()] + "PATTERN" + body[pattern.end() :]
    values = re.search(r"Possible values: (.*?)(?=Default value: |$|[A-Z][a-z])", body, re.S)
    listed = re.match(r"(?:non-empty, )?\[([^\]]*)\]", values[1]) if values else None
    enum = item.get("enum")
    page_enum = [v.strip() for v in listed[1].split(",")] if listed else None
    if page_enum is None and enum is not None and section != "Path":
        yield f"enum {enum} is not on the page"
    if page_enum is not None and [str(v) for v in (enum or [])] != page_enum:
        yield f"enum {enum} is not the page's {page_enum}"
    stated: dict[str, int] = {}
    bounds = re.findall(r"([<>]=) (-?[0-9]+)( characters)?", values[1] if values else "")
    for op, number, chars in bounds:
        if chars:
            key, part = "maxLength", item
        elif is_array:
            key, part = ("minItems" if op == ">=" else "maxItems"), schema
        else:
            key, part = ("minimum" if op == ">=" else "maximum"), schema
        stated[key] = int(number)
        if part.get(key) != int(number):
            yield f"{key} {part.get(key)} is not the page's {number}"
    # A bound the page does not state is the document's own: x-tightened says why.
    for part in (schema, item) if is_array else (schema,):
        for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
            if key in part and key not in stated and not param.get("x-tightened"):
                if not (key == "minLength" and "non-empty" in body):
                    yield f"{key} {part[key]} is not on the page, and no x-tightened says why"
    default = re.search(r"Default value: (.*?)(?=[A-Z]|$)", body, re.S)
    if default is not None:
        if str(schema.get("default")).lower() != default[1].strip().lower():
            yield f"default {schema.get('default')!r} is not the page's {default[1]!r}"
    elif "default" in schema and not param.get("x-implicit"):
        yield f"default {schema['default']!r} is not on the page, and no x-implicit says why"


_WIDGET_MARK = re.compile(r" — (?P<where>path|query|header)(?P<required>required)?")


def widget_problems(text: str, params: list[Mapping[str, Any]]) -> list[str] | None:
    """The page's request widget (on 166 pages) lists `<name> — <in>` per parameter, the
    required ones (`— queryrequired`) before `Show optional parameters`: a third reading of the
    parameters, to hold against the document's. None: the page has no widget."""
    start = text.find("TokenParameters")
    end = text.find("Send API Request", start)
    if start < 0 or end < 0:
        return None
    region = html.unescape(text[start + len("TokenParameters") : end])
    optional_at = region.find("Show optional parameters")
    parts = (
        (region[:optional_at] if optional_at >= 0 else region, True),
        (region[optional_at:] if optional_at >= 0 else "", False),
    )
    problems: list[str] = []
    found: set[tuple[str, str, bool]] = set()
    names = sorted({str(p["name"]) for p in params}, key=len, reverse=True)
    for part, required in parts:
        for mark in _WIDGET_MARK.finditer(part):
            before = part[: mark.start()]
            name = next((name for name in names if before.endswith(name)), None)
            if name is None:
                problems.append(f"the widget lists {before[-30:]!r} — {mark['where']}, unknown")
                continue
            if bool(mark["required"]) != required:
                problems.append(f"the widget places {name} oddly")
            found.add((name, mark["where"], required))
    documented = {
        (str(p["name"]), str(p["in"]), bool(p.get("required")) and p["in"] in ("path", "query"))
        for p in params
    }
    # A requirement the document adds (x-tightened) is not the page's.
    documented = {
        (name, where, required and name not in _tightened_required(params))
        for name, where, required in documented
    }
    if found != documented:
        problems.append(
            f"the widget lists {sorted(found - documented)}, "
            f"the document {sorted(documented - found)}"
        )
    return problems


def _tightened_required(params: list[Mapping[str, Any]]) -> set[str]:
    return {str(p["name"]) for p in params if "required" in str(p.get("x-tightened", ""))}
