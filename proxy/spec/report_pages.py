"""Read TeamUp's report data pages, and compare what they say with proxy/spec/teamup.json.

The pages (docs/upstream/reports/*.md) are an extraction of TeamUp's developer documentation in
which every query parameter runs into the next: `created_at_gte date-timecreated_at_lte
date-timecustomers integer[]…`. `parse_page` splits that text into parameters (name, type,
array-ness, `Possible values`, `Default value`, `required`, description) and reads the report's
columns and, from the response's example row and schema text, the type of each column.
`gaps` lists every way the document departs from a page; `scripts/extract-spec` and
`tests/test_spec_pages.py` both use it, so the rules live here only (in the package, because
scripts import the package, never the tests).
"""

from __future__ import annotations

import html
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "COLUMN_TYPES",
    "Page",
    "PageError",
    "PageParam",
    "column_types",
    "gaps",
    "load_pages",
    "operation_for",
    "page_files",
    "parse_page",
    "path_for",
]

REPO = Path(__file__).resolve().parents[2]
PAGES_DIR = REPO / "docs" / "upstream" / "reports"
DOCUMENT = REPO / "proxy" / "spec" / "teamup.json"

COLUMN_TYPES = ("integer", "number", "string", "boolean", "date", "date-time", "object", "array")

_GET_LINE = re.compile(
    r"^GET https://goteamup\.com/api/v2//?reports/(?P<report>[a-z_.]+)/data$", re.M
)
_URL_LINE = re.compile(r"^\*\*URL:\*\* `/api/v2//?reports/(?P<report>[a-z_.]+)/data`$", re.M)
_CODE_PATH = re.compile(r'conn\.request\("GET", "/api/v2//?reports/(?P<report>[a-z_.]+)/data"')
_TYPES = "string|integer|number|boolean|date-time|date"
# A parameter starts with its name, a space and its type (`[]` for arrays), `required` glued on;
# a few parameters have no type, and then the description (a capital letter) follows the space.
_HEAD = re.compile(
    rf"(?P<name>[a-z][a-z0-9_]*) (?:(?P<type>{_TYPES})(?P<array>\[\])?(?P<required>required)?"
    r"|(?=[A-Z]))"
)
_POSSIBLE = "Possible values: "
# `Default value: csvid_gt integer…`: a text default runs into the next name, so it is read as
# the longest of the parameter's listed values that the text starts with.
_DEFAULT = re.compile(r"Default value: (?:(?P<int>-?[0-9]+)|(?P<bool>true|false))?")
_BOUND = re.compile(r"(?P<op>[<>]=) (?P<number>-?[0-9]+)")
_PATTERN = re.compile(r"Value must match regular expression (?P<pattern>\^.*?\$)")
_LIST = re.compile(r"\[(?P<items>[^\]]*)\]")
_WIDGET_NAME = re.compile(r" — query")
_DATE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z?")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class PageError(ValueError):
    """A page this parser cannot read; the message says where."""


@dataclass(frozen=True, slots=True)
class PageParam:
    """One query parameter as the page states it (None: the page says nothing)."""

    name: str
    type: str | None
    array: bool
    required: bool
    enum: tuple[str, ...] | None
    default: str | int | bool | None
    minimum: int | None
    maximum: int | None
    min_items: int | None
    max_items: int | None
    pattern: str | None
    non_empty: bool
    description: str


@dataclass(frozen=True, slots=True)
class Page:
    """One report data endpoint as its page states it."""

    file: str
    report: str
    grouped: bool
    title: str
    params: tuple[PageParam, ...]
    # The `columns` parameter's values; for a page without one, the keys of its example row.
    columns: tuple[str, ...]
    rows: Mapping[str, Any]
    rows_schema: str

    @property
    def path(self) -> str:
        return path_for(self.report)

    def param(self, name: str) -> PageParam | None:
        return next((param for param in self.params if param.name == name), None)

    def neutral(self) -> dict[str, Any]:
        """The page as plain data (what `extract-spec --dump` prints)."""
        return {
            "file": self.file,
            "path": self.path,
            "report": self.report,
            "grouped": self.grouped,
            "title": self.title,
            "params": [asdict(param) for param in self.params],
            "columns": list(self.columns),
            "column_types": column_types(self),
        }


def path_for(report: str) -> str:
    """The single-slash path of a report's data endpoint."""
    return f"/api/v2/reports/{report}/data"


def page_files(directory: Path = PAGES_DIR) -> list[Path]:
    """The endpoint pages of a directory (everything but README.md), sorted by name."""
    return sorted(path for path in directory.glob("*.md") if path.name != "README.md")


def load_pages(directory: Path = PAGES_DIR) -> list[Page]:
    return [
        parse_page(path.name, path.read_text(encoding="utf-8")) for path in page_files(directory)
    ]


def parse_page(file: str, text: str) -> Page:
    """Read one page; raise PageError when it does not hold together."""
    reports = {
        pattern.pattern: match["report"]
        for pattern in (_GET_LINE, _URL_LINE, _CODE_PATH)
        if (match := pattern.search(text)) is not None
    }
    get_line = _GET_LINE.search(text)
    if get_line is None:
        raise PageError(f"{file}: no `GET https://goteamup.com/api/v2//reports/…/data` line")
    report = get_line["report"]
    if set(reports.values()) != {report}:
        raise PageError(f"{file}: the page names more than one report: {sorted(reports.values())}")
    if file != report.replace(".grouped", "-grouped").replace("_", "-") + ".md":
        raise PageError(f"{file}: the file name does not match report {report!r}")
    title = text.splitlines()[0].removeprefix("# Endpoints_Reports ").removesuffix(" Get Data")

    start = text.index("Query Parameters", get_line.end()) + len("Query Parameters")
    end = text.index("\nResponses", start)
    params = tuple(_parse_params(file, html.unescape(text[start:end])))
    _check_widget(file, text, params)

    responses = text[end + 1 :].splitlines()[0]
    example_at = responses.find('{  "total"')
    schema_at = responses.find("rows undefined[]Array [")
    if example_at < 0 or schema_at < 0:
        raise PageError(f"{file}: no response example or rows schema")
    example, _ = json.JSONDecoder().raw_decode(responses[example_at:])
    rows = example["rows"][0]
    rows_schema = html.unescape(responses[schema_at:example_at])

    columns_param = next((param for param in params if param.name == "columns"), None)
    if columns_param is None:
        columns = tuple(rows)
    elif columns_param.enum is None:
        raise PageError(f"{file}: `columns` lists no values")
    else:
        columns = columns_param.enum
    return Page(
        file, report, report.endswith(".grouped"), title, params, columns, rows, rows_schema
    )


def _parse_params(file: str, text: str) -> Iterator[PageParam]:
    pos = 0
    while pos < len(text):
        head = _HEAD.match(text, pos)
        if head is None:
            raise PageError(f"{file}: no parameter at {text[pos : pos + 60]!r}")
        pos = head.end()
        fields: dict[str, Any] = {
            "enum": None,
            "default": None,
            "minimum": None,
            "maximum": None,
            "min_items": None,
            "max_items": None,
            "pattern": None,
            "non_empty": False,
        }
        array = head["array"] is not None
        description: list[str] = []
        while pos < len(text):
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if text.startswith(_POSSIBLE, pos):
                pos = _parse_possible(file, head["name"], array, text, pos + len(_POSSIBLE), fields)
            elif (default := _DEFAULT.match(text, pos)) is not None:
                fields["default"], pos = _read_default(file, head["name"], default, fields, text)
            elif text[pos].isupper():
                sentence_end = _description_end(text, pos)
                if sentence_end is None:
                    raise PageError(f"{file}: unterminated description at {text[pos : pos + 60]!r}")
                description.append(text[pos:sentence_end])
                pos = sentence_end
            else:
                break
        yield PageParam(
            name=head["name"],
            type=head["type"],
            array=array,
            required=head["required"] is not None,
            description=" ".join(description),
            **fields,
        )


def _read_default(
    file: str, name: str, default: re.Match[str], fields: Mapping[str, Any], text: str
) -> tuple[str | int | bool, int]:
    if default["int"] is not None:
        return int(default["int"]), default.end()
    if default["bool"] is not None:
        return default["bool"] == "true", default.end()
    for value in sorted(fields["enum"] or (), key=len, reverse=True):
        after = default.end() + len(value)
        if text.startswith(value, default.end()) and (
            after == len(text) or _HEAD.match(text, after)
        ):
            return value, after
    raise PageError(
        f"{file}: {name}: unreadable default at {text[default.end() : default.end() + 40]!r}"
    )


def _description_end(text: str, pos: int) -> int | None:
    """Where a description starting at `pos` ends: after a `.` that the next part follows."""
    for dot in re.finditer(r"\.", text[pos:]):
        after = pos + dot.end()
        if after == len(text) or _HEAD.match(text, after) or _DEFAULT.match(text, after):
            return after
    return None


def _parse_possible(
    file: str, name: str, array: bool, text: str, pos: int, fields: dict[str, Any]
) -> int:
    """Read `Possible values: a, b and c`; each part is a list, a bound, a pattern or non-empty."""
    while True:
        if text.startswith("non-empty", pos):
            fields["non_empty"] = True
            pos += len("non-empty")
        elif (listed := _LIST.match(text, pos)) is not None:
            fields["enum"] = tuple(item.strip() for item in listed["items"].split(","))
            pos = listed.end()
        elif (bound := _BOUND.match(text, pos)) is not None:
            number = int(bound["number"])
            key = ("min" if bound["op"] == ">=" else "max") + ("_items" if array else "imum")
            fields[key] = number
            pos = bound.end()
        elif (pattern := _PATTERN.match(text, pos)) is not None:
            fields["pattern"] = pattern["pattern"]
            pos = pattern.end()
        else:
            raise PageError(f"{file}: {name}: unreadable values at {text[pos : pos + 60]!r}")
        separator = re.compile(r", | and ").match(text, pos)
        if separator is None:
            return pos
        pos = separator.end()


def _check_widget(file: str, text: str, params: Sequence[PageParam]) -> None:
    """The page's request widget lists `<name> — query` per parameter: first the required ones
    (`— queryrequired`), then, after `Show optional parameters`, the others, each in page order."""
    widget_at = text.find("Bearer TokenParameters")
    optional_at = text.find("Show optional parameters", widget_at)
    if widget_at < 0 or optional_at < 0:
        raise PageError(f"{file}: no request widget")
    for part, wanted in (
        (text[widget_at:optional_at], [param for param in params if param.required]),
        (text[optional_at:], [param for param in params if not param.required]),
    ):
        marks = list(_WIDGET_NAME.finditer(part))
        if len(marks) != len(wanted):
            raise PageError(f"{file}: the widget's parameters are not the {len(wanted)} parsed")
        for mark, param in zip(marks, wanted, strict=True):
            if not part[: mark.start()].endswith(param.name):
                raise PageError(f"{file}: the widget does not list {param.name!r} in its place")
            if part.startswith("required", mark.end()) != param.required:
                raise PageError(f"{file}: the widget disagrees on whether {param.name} is required")


# --- column types ---------------------------------------------------------------------------


def column_types(page: Page) -> dict[str, str]:
    """Each column's type, from the example row (and the rows schema text for numbers)."""
    return {column: _column_type(page, index) for index, column in enumerate(page.columns)}


def _column_type(page: Page, index: int) -> str:
    column = page.columns[index]
    found = _lookup(page.rows, column)
    if found is None:
        # `customer_name` beside `customer.name`, `membership_id` beside a longer dotted path.
        for dotted in _dotted_spellings(column):
            found = _lookup(page.rows, dotted)
            if found is not None:
                break
    if found is None and index + 1 < len(page.columns) and "." in page.columns[index + 1]:
        found = _lookup(page.rows, page.columns[index + 1])
    if found is None:
        return _type_from_name(column)
    leaf, value = found
    return _value_type(leaf, value, page.rows_schema)


def _lookup(rows: Mapping[str, Any], dotted: str) -> tuple[str, Any] | None:
    node: Any = rows
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return dotted.rsplit(".", 1)[-1], node


def _dotted_spellings(column: str) -> Iterator[str]:
    """`a_b_c` as `a.b_c`, `a_b.c`, `a.b.c` (at most six underscores are tried)."""
    parts = column.split("_")
    if len(parts) > 7:
        return
    for joins in itertools.product(("_", "."), repeat=len(parts) - 1):
        if "." in joins:
            yield parts[0] + "".join(
                join + part for join, part in zip(joins, parts[1:], strict=True)
            )


def _value_type(leaf: str, value: Any, schema: str) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return (
            "number" if f"{leaf}number" in schema and f"{leaf}integer" not in schema else "integer"
        )
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, str) and _DATE_TIME.fullmatch(value):
        return "date-time"
    if isinstance(value, str) and _DATE.fullmatch(value):
        return "date"
    return "string"


def _type_from_name(column: str) -> str:
    """A column the example row does not show: guess from its name."""
    last = column.rsplit(".", 1)[-1]
    if last in ("id", "pk") or last.endswith(("_id", "_pk", "_count")):
        return "integer"
    if last.startswith(("is_", "has_")):
        return "boolean"
    if last.endswith("_at"):
        return "date-time"
    if last.endswith("_date"):
        return "date"
    return "string"


# --- comparing a page with the document -----------------------------------------------------

_SCHEMA_TYPES: dict[str, dict[str, str]] = {
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "string": {"type": "string"},
    "boolean": {"type": "boolean"},
    "date": {"type": "string", "format": "date"},
    "date-time": {"type": "string", "format": "date-time"},
}
# Bound keywords of a schema, and whether a larger value is the stricter one.
_BOUNDS = {
    "minimum": True,
    "maximum": False,
    "minLength": True,
    "maxLength": False,
    "minItems": True,
    "maxItems": False,
}


def operation_for(document: Mapping[str, Any], report: str) -> Mapping[str, Any] | None:
    operation: Mapping[str, Any] | None = (
        document.get("paths", {}).get(path_for(report), {}).get("get")
    )
    return operation


def gaps(page: Page, document: Mapping[str, Any]) -> list[str]:
    """Every way the document's operation for this page departs from what the page states."""
    operation = operation_for(document, page.report)
    where = f"{page.file} ({page.path})"
    if operation is None:
        return [f"{where}: no GET operation"]
    problems: list[str] = []
    expected = {
        "operationId": page.report.replace(".", "_"),
        "x-report": page.report,
        "x-grouped": page.grouped,
        "x-columns": list(page.columns),
        "x-column-types": column_types(page),
    }
    for key, value in expected.items():
        if operation.get(key) != value:
            problems.append(f"{where}: {key} is {operation.get(key)!r}, the page gives {value!r}")

    documented = {param["name"]: param for param in operation.get("parameters", [])}
    for name in sorted(set(documented) - {param.name for param in page.params}):
        problems.append(f"{where}: parameter {name!r} is not on the page")
    for param in page.params:
        doc_param = documented.get(param.name)
        if doc_param is None:
            problems.append(f"{where}: parameter {param.name!r} is missing")
        else:
            problems.extend(
                f"{where}: {param.name}: {gap}" for gap in _param_gaps(param, doc_param)
            )
    return problems


def _param_gaps(param: PageParam, doc: Mapping[str, Any]) -> Iterator[str]:
    schema: Mapping[str, Any] = doc.get("schema", {})
    tightened = bool(doc.get("x-tightened"))
    if doc.get("in") != "query":
        yield f"`in` is {doc.get('in')!r}, not 'query'"
    if param.description and doc.get("description") != param.description:
        yield f"description {doc.get('description')!r} is not the page's {param.description!r}"
    if not doc.get("description"):
        yield "no description"

    if doc.get("required", False) != param.required:
        if not (doc.get("required") and tightened):
            yield f"required is {doc.get('required', False)}, the page says {param.required}"

    if param.array != (schema.get("type") == "array"):
        yield f"array-ness: the page says {'an array' if param.array else 'a scalar'}"
        return
    item: Mapping[str, Any] = schema.get("items", {}) if param.array else schema
    if param.type is None:
        if not doc.get("x-note"):
            yield "the page gives no type, and no x-note says what was decided"
    else:
        wanted = _SCHEMA_TYPES[param.type]
        got = {key: item.get(key) for key in ("type", "format") if key in item}
        if got != wanted:
            yield f"type {got} is not the page's {param.type} ({wanted})"

    if param.array:
        if doc.get("style") != "form" or doc.get("explode") is not True:
            yield "an array needs style form and explode true"
        if doc.get("x-canonical") not in ("set", "ordered"):
            yield f"x-canonical is {doc.get('x-canonical')!r}, not set or ordered"
    elif "x-canonical" in doc:
        yield "x-canonical on a scalar"

    if item.get("enum") != (list(param.enum) if param.enum is not None else None):
        yield f"enum {item.get('enum')} is not the page's {param.enum}"
    if schema.get("default") != param.default or type(schema.get("default")) is not type(
        param.default
    ):
        yield f"default {schema.get('default')!r} is not the page's {param.default!r}"
    if item.get("pattern") != param.pattern:
        yield f"pattern {item.get('pattern')!r} is not the page's {param.pattern!r}"
    if param.non_empty and not (
        "enum" in item or "pattern" in item or item.get("minLength", 0) >= 1 or doc.get("x-sort")
    ):
        yield "the page says non-empty; the schema allows an empty string"

    # The page's bounds: an array's `>= n` counts items; a scalar's bounds its value.
    page_bounds: dict[str, int | None] = (
        {"minItems": param.min_items, "maxItems": param.max_items}
        if param.array
        else {"minimum": param.minimum, "maximum": param.maximum}
    )
    parts = [("", schema, page_bounds)] + ([("items ", item, {})] if param.array else [])
    for label, part, bounds in parts:
        for key, larger_is_stricter in _BOUNDS.items():
            page_value, doc_value = bounds.get(key), part.get(key)
            if doc_value == page_value:
                continue
            if doc_value is None:
                yield f"{label}{key}: the page says {page_value}, the document nothing"
            elif page_value is not None and (doc_value < page_value) == larger_is_stricter:
                yield f"{label}{key} {doc_value} is looser than the page's {page_value}"
            elif not tightened:
                yield f"{label}{key} {doc_value} is stricter than {page_value}, yet no x-tightened"
