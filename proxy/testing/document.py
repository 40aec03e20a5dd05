"""The mock's reading of proxy/spec/teamup.json: each report endpoint as TeamUp's pages state it,
and every other GET operation (lists, retrieves, other reads) with its parameters and x-fields.

Deliberately separate from proxy/core/contract.py (a mock that shares the code under test proves
nothing): both are built from the same document, each on its own. The mock is as lenient as
TeamUp, so the bounds a parameter's `x-tightened` names (the proxy's own strictness) are dropped
here, except that a grouped report's `columns` stay required (TeamUp cannot group by nothing).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import orjson

__all__ = ["Endpoint", "Operation", "Param", "endpoints", "operations"]

# `x-tightened` is `<bound> <value>: <why>; …`; the why may itself hold a `; `.
_TIGHTENED = re.compile(
    r"^(?P<items>items )?(?P<key>minimum|maximum|minLength|maxLength|minItems|maxItems|required)\b"
)


@dataclass(frozen=True, slots=True)
class Param:
    """One query parameter: its kind (of each item, for an array) and TeamUp's bounds."""

    name: str
    kind: str  # integer | number | boolean | date | date-time | string
    array: bool
    required: bool
    enum: tuple[str, ...] | None
    pattern: re.Pattern[str] | None
    minimum: int | None
    maximum: int | None
    min_length: int | None
    max_length: int | None
    min_items: int | None
    max_items: int | None
    default: Any
    sort: bool


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One report data endpoint: its columns, their types and its parameters."""

    report: str
    path: str
    grouped: bool
    columns: tuple[str, ...]  # x-columns: every spelling `columns` accepts
    types: Mapping[str, str]  # x-column-types
    default_columns: tuple[str, ...]
    ranges: tuple[tuple[str, str], ...]
    # In the order TeamUp reports their errors: columns, sort, other arrays, scalars, format.
    params: Mapping[str, Param]
    # Every spelling of a column → the key its values are answered under (`customer_id` →
    # `customer.id`); a key maps to itself.
    aliases: Mapping[str, str]
    operation_id: str = ""

    @property
    def keys(self) -> tuple[str, ...]:
        """The distinct column keys, in document order."""
        return tuple(dict.fromkeys(self.aliases[column] for column in self.columns))


def _relaxed(param: Mapping[str, Any]) -> tuple[set[str], set[str]]:
    """The bounds `x-tightened` names: on the schema, and on the items."""
    on_schema: set[str] = set()
    on_items: set[str] = set()
    for clause in str(param.get("x-tightened", "")).split("; "):
        match = _TIGHTENED.match(clause)
        if match is not None:
            (on_items if match["items"] else on_schema).add(match["key"])
    return on_schema, on_items


def _kind(schema: Mapping[str, Any]) -> str:
    kind = str(schema.get("type", "string"))
    if kind == "string" and schema.get("format") in ("date", "date-time"):
        return str(schema["format"])
    return kind


def _param(raw: Mapping[str, Any], grouped: bool) -> Param:
    name = str(raw["name"])
    schema: Mapping[str, Any] = raw.get("schema", {})
    array = schema.get("type") == "array"
    items: Mapping[str, Any] = schema.get("items", {}) if array else schema
    on_schema, on_items = _relaxed(raw)
    if grouped and name == "columns":
        on_schema -= {"required", "minItems"}
    value_bounds = on_items if array else on_schema

    def bound(where: Mapping[str, Any], key: str, relaxed: set[str]) -> int | None:
        value = where.get(key)
        return None if value is None or key in relaxed else int(value)

    enum = items.get("enum")
    return Param(
        name=name,
        kind=_kind(items),
        array=array,
        required=bool(raw.get("required", False)) and "required" not in on_schema,
        enum=None if enum is None else tuple(str(value) for value in enum),
        pattern=None if "pattern" not in items else re.compile(str(items["pattern"])),
        minimum=bound(items, "minimum", value_bounds),
        maximum=bound(items, "maximum", value_bounds),
        min_length=bound(items, "minLength", value_bounds),
        max_length=bound(items, "maxLength", value_bounds),
        min_items=bound(schema, "minItems", on_schema) if array else None,
        max_items=bound(schema, "maxItems", on_schema) if array else None,
        default=schema.get("default"),
        sort=bool(raw.get("x-sort", False)),
    )


def _order(param: Param) -> int:
    if param.name in ("columns", "format"):
        return 0 if param.name == "columns" else 4
    if param.sort:
        return 1
    return 2 if param.array else 3


def _aliases(columns: tuple[str, ...], types: Mapping[str, str]) -> dict[str, str]:
    """`a_b` answers as `a.b` when both are columns; `membership_id` as the dotted column just
    after it (`customer_membership.membership.id`) when that one ends in `.id` and has its type."""
    aliases = {column: column for column in columns}
    underscored = {column.replace(".", "_"): column for column in columns if "." in column}
    for index, column in enumerate(columns):
        if "." in column:
            continue
        twin = underscored.get(column)
        if twin is None and index + 1 < len(columns):
            after = columns[index + 1]
            leaf = after.rsplit(".", 1)[-1]
            if (
                "." in after
                and column.endswith(f"_{leaf}")
                and types.get(column) == types.get(after)
                and types.get(column) != "object"
            ):
                twin = after
        if twin is not None:
            aliases[column] = twin
    return aliases


def _endpoint(path: str, operation: Mapping[str, Any]) -> Endpoint:
    grouped = bool(operation.get("x-grouped", False))
    columns = tuple(str(column) for column in operation.get("x-columns", ()))
    types = {str(key): str(value) for key, value in operation.get("x-column-types", {}).items()}
    params = [_param(raw, grouped) for raw in operation.get("parameters", ())]
    ordered = sorted(params, key=_order)  # stable: document order within each group
    return Endpoint(
        report=str(operation["x-report"]),
        path=path,
        grouped=grouped,
        columns=columns,
        types=types,
        default_columns=tuple(str(c) for c in operation.get("x-default-columns", ())),
        ranges=tuple((str(low), str(high)) for low, high in operation.get("x-ranges", ())),
        params={param.name: param for param in ordered},
        aliases=_aliases(columns, types),
        operation_id=str(operation.get("operationId", "")),
    )


def _document(path: Path | None = None) -> Any:
    if path is not None:
        return orjson.loads(path.read_bytes())
    return orjson.loads(resources.files("proxy.spec").joinpath("teamup.json").read_bytes())


@functools.cache
def endpoints() -> Mapping[str, Endpoint]:
    """Every report data endpoint of the document, by report name (read once)."""
    document = _document()
    found: dict[str, Endpoint] = {}
    for path, item in document.get("paths", {}).items():
        operation = item.get("get")
        if operation is not None and operation.get("x-kind", "report-data") == "report-data":
            endpoint = _endpoint(str(path), operation)
            found[endpoint.report] = endpoint
    return found


# --- every other GET ------------------------------------------------------------------------

# Never admits `/`, `%`, or a `.`-only segment: the default for a string path parameter.
SAFE_SEGMENT = re.compile(r"^[A-Za-z0-9_-]+$")


@dataclass(frozen=True, slots=True)
class Operation:
    """One GET operation that is not a report: its path template, parameters and result fields."""

    operation_id: str
    kind: str  # list | retrieve | other (x-kind)
    area: str
    path: str  # the document's template, e.g. /api/v2/events/{id}
    path_params: tuple[Param, ...]  # in path order
    params: Mapping[str, Param]  # query parameters, in document order
    fields: Mapping[str, str]  # x-fields: top-level field -> type
    array: bool  # an `other` read answering a bare JSON array

    @property
    def collection(self) -> str:
        """The template of the collection its objects belong to: a retrieve's path without its
        last parameter (`/api/v2/events/{id}` -> `/api/v2/events`), else its own path."""
        path = self.path.rstrip("/")
        if self.kind == "retrieve" and path.endswith("}"):
            return path.rsplit("/", 1)[0]
        return path


def _path_param(raw: Mapping[str, Any]) -> Param:
    param = _param(raw, False)
    if param.kind == "integer" or param.enum is not None or param.pattern is not None:
        return param
    return dataclasses.replace(param, pattern=SAFE_SEGMENT)


def _operation(path: str, operation: Mapping[str, Any]) -> Operation:
    raw = [p for p in operation.get("parameters", ()) if isinstance(p, dict)]
    by_name = {str(p["name"]): p for p in raw if p.get("in") == "path"}
    names = re.findall(r"{([^}]+)}", path)
    path_params = tuple(
        _path_param(by_name.get(name, {"name": name, "in": "path", "required": True}))
        for name in names
    )
    query = [_param(p, False) for p in raw if p.get("in", "query") == "query"]
    schema: Any = (
        operation.get("responses", {})
        .get("200", {})
        .get("content", {})
        .get("application/json", {})
        .get("schema", {})
    )
    return Operation(
        operation_id=str(operation.get("operationId", "")),
        kind=str(operation.get("x-kind", "other")),
        area=str(operation.get("x-area", "")),
        path=path,
        path_params=path_params,
        params={param.name: param for param in query},
        fields={str(k): str(v) for k, v in operation.get("x-fields", {}).items()},
        array=isinstance(schema, dict) and schema.get("type") == "array",
    )


@functools.cache
def operations(path: Path | None = None) -> tuple[Operation, ...]:
    """Every GET of the document (the packaged one unless a path is given) that is not a report
    data endpoint, in document order (read once per path)."""
    found: list[Operation] = []
    for template, item in _document(path).get("paths", {}).items():
        operation = item.get("get") if isinstance(item, dict) else None
        if operation is None or "x-report" in operation:
            continue
        if operation.get("x-kind") in ("report-data", "report-export", "write"):
            continue
        found.append(_operation(str(template), operation))
    return tuple(found)
