"""The operations, as data: one OpenAPI document (`proxy/spec/teamup.json`) → one `Operation`
per (method, path template), and a `Router` that turns a concrete path into an operation and
its validated path parameters.

Adding a TeamUp operation is an edit to that document (plus tests); nothing here names one.
Reports are operations with an `x-report` name (`Operations.reports`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from typing import Any
from urllib.parse import quote

import orjson

from .contract import Contract, PathValue, contract_from_operation

__all__ = [
    "API_PREFIX",
    "METHODS",
    "BadPath",
    "Operation",
    "Operations",
    "Route",
    "Router",
    "TtlClass",
    "load_document",
    "load_operations",
    "operations_from_document",
]

API_PREFIX = "/api/v2/"
METHODS = ("get", "post", "put", "patch", "delete")
_TEMPLATE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Characters a canonical path value may carry to TeamUp unencoded (RFC 3986 pchar minus `/`
# and `%`; the contract already refused both).
_PATH_SAFE = "-._~!$&'()*+,;=:@"


@dataclass(frozen=True, slots=True)
class TtlClass:
    """Seconds fresh, and seconds stale on top, for one class of data."""

    fresh: int
    stale: int


@dataclass(frozen=True, slots=True)
class Operation:
    """One documented TeamUp operation: method, path template, contract, cache class, area."""

    operation_id: str
    method: str  # upper case
    path: str  # `/api/v2/customers/{id}`
    area: str
    kind: str
    segment: str  # the first path segment after /api/v2/ (what `read` scopes name)
    ttl_class: str | None
    report: str | None  # the `x-report` name of a report data operation
    contract: Contract
    document: Mapping[str, Any] = field(repr=False, compare=False)

    @property
    def is_read(self) -> bool:
        return self.method == "GET"

    @property
    def label(self) -> str:
        """The name metrics and logs use: the report name for reports, else the operation id."""
        return self.report or self.operation_id

    @property
    def grouped(self) -> bool:
        return bool(self.document.get("x-grouped"))

    @property
    def doubled_path(self) -> str:
        """The path as TeamUp's docs print it (`/api/v2//customers/…`); the proxy routes both."""
        return self.path.replace("/v2/", "/v2//", 1)

    def upstream_path(self, values: PathValue) -> str:
        """The template filled with canonical path values (from the document, never the caller's
        spelling)."""
        if not values:
            return self.path
        found = dict(values)
        return _TEMPLATE_PARAM.sub(lambda m: quote(str(found[m[1]]), safe=_PATH_SAFE), self.path)


class Operations(Mapping[str, Operation]):
    """Every operation of the document, by operation id, and the TTL classes it names."""

    def __init__(
        self, operations: Mapping[str, Operation], ttl_classes: Mapping[str, TtlClass] | None = None
    ) -> None:
        self._by_id = dict(sorted(operations.items()))
        self.ttl_classes: Mapping[str, TtlClass] = dict(ttl_classes or {})

    def __getitem__(self, operation_id: str) -> Operation:
        return self._by_id[operation_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def reads(self) -> Operations:
        """The GET operations."""
        return self.where(lambda op: op.is_read)

    def reports(self) -> dict[str, Operation]:
        """The report data operations, by report name (`customers`, `customers.grouped`, …)."""
        return {op.report: op for op in self._by_id.values() if op.report is not None}

    def segments(self) -> frozenset[str]:
        """Every first path segment of the document (what `read` scopes may name)."""
        return frozenset(op.segment for op in self._by_id.values())

    def where(self, keep: Callable[[Operation], bool]) -> Operations:
        """The operations `keep(op)` is true for."""
        return Operations(
            {name: op for name, op in self._by_id.items() if keep(op)}, self.ttl_classes
        )

    def routed(self, *, reports: frozenset[str] | None, auth: bool) -> Operations:
        """The reads the proxy answers: every GET, but `auth/*` unless switched on, and only the
        reports named in `reports` (None: all of them)."""

        def keep(op: Operation) -> bool:
            if not op.is_read or (op.area == "auth" and not auth):
                return False
            return op.report is None or reports is None or op.report in reports

        return self.where(keep)


@dataclass(frozen=True, slots=True)
class Route:
    """A path that matched a documented template: its routed operations by method, and the
    canonical path parameters."""

    operations: Mapping[str, Operation]
    path: PathValue
    template: str


@dataclass(frozen=True, slots=True)
class BadPath:
    """A path that fits a documented template but for a path parameter (a 404, never sent)."""

    name: str
    expected: str

    def message(self) -> str:
        return f"Not found. The path parameter {self.name} must be {self.expected}."


@dataclass(frozen=True, slots=True)
class _Template:
    path: str
    # A literal segment, or the (prefix, suffix) around one parameter (`external_id:{id}`).
    parts: tuple[str | tuple[str, str], ...]
    literals: int  # literal characters: the more, the more specific
    operations: Mapping[str, Operation]  # routed, by method
    contract: Contract  # for the path parameters


def _part(segment: str) -> str | tuple[str, str]:
    found = _TEMPLATE_PARAM.search(segment)
    if found is None:
        return segment
    return segment[: found.start()], segment[found.end() :]


class Router:
    """Concrete path → `Route` | `BadPath` | None, for the single- and doubled-slash forms.

    Templates are bucketed by (segment count, first segment); among those that fit, the one with
    the most literal segments wins (`/customers/me` before `/customers/{id}`). `documented`
    paths without a routed method still match, so that another method gives 405, not 404.
    Results are memoised per raw path: hot paths are matched once.
    """

    def __init__(self, routed: Operations, documented: Operations | None = None) -> None:
        by_path: dict[str, dict[str, Operation]] = {}
        contracts: dict[str, Contract] = {}
        for op in (documented or routed).values():
            by_path.setdefault(op.path, {})
            contracts.setdefault(op.path, op.contract)
        for op in routed.values():
            by_path.setdefault(op.path, {})[op.method] = op
            contracts[op.path] = op.contract
        # Keyed by the first segment as written: a template cannot start with a parameter.
        self._buckets: dict[tuple[int, str], list[_Template]] = {}
        for path, operations in by_path.items():
            segments = path.removeprefix(API_PREFIX).split("/")
            parts = tuple(_part(s) for s in segments)
            literals = sum(len(p) + 1 if isinstance(p, str) else len(p[0] + p[1]) for p in parts)
            template = _Template(path, parts, literals, operations, contracts[path])
            self._buckets.setdefault((len(parts), segments[0]), []).append(template)
        for bucket in self._buckets.values():
            bucket.sort(key=lambda t: -t.literals)
        self._memo: dict[str, Route | BadPath | None] = {}

    def match(self, raw_path: str) -> Route | BadPath | None:
        """The route of a request path, percent-decoded but for `%2F` and `%25` (aiohttp's
        `path_safe`): an encoded `/` can never split a segment, and the `%` it keeps makes a
        path parameter invalid."""
        found = self._memo.get(raw_path, self)
        if found is not self:
            return found  # type: ignore[return-value]
        result = self._match(raw_path)
        if len(self._memo) >= 4096:
            self._memo.clear()
        self._memo[raw_path] = result
        return result

    def _match(self, raw_path: str) -> Route | BadPath | None:
        if raw_path.startswith("/api/v2//"):
            rest = raw_path[len("/api/v2//") :]
        elif raw_path.startswith(API_PREFIX):
            rest = raw_path[len(API_PREFIX) :]
        else:
            return None
        segments = rest.split("/")
        bad: BadPath | None = None
        for template in self._buckets.get((len(segments), segments[0]), ()):
            raw: list[str] = []
            for part, segment in zip(template.parts, segments, strict=True):
                if isinstance(part, str):
                    if part != segment:
                        break
                    continue
                prefix, suffix = part
                if not (segment.startswith(prefix) and segment.endswith(suffix)):
                    break
                raw.append(segment[len(prefix) : len(segment) - len(suffix)])
            else:
                values = template.contract.parse_path(tuple(raw))
                if isinstance(values, str):
                    if bad is None:
                        param = next(p for p in template.contract.path_params if p.name == values)
                        bad = BadPath(values, param.describe())
                    continue
                return Route(template.operations, values, template.path)
        return bad


def _ttl_classes(document: Mapping[str, Any]) -> dict[str, TtlClass]:
    classes = {}
    for name, spec in document.get("x-ttl-classes", {}).items():
        fresh, stale = int(spec["fresh"]), int(spec["stale"])
        if fresh < 0 or stale < 0:
            raise ValueError(f"x-ttl-classes.{name}: lifetimes must not be negative")
        classes[str(name)] = TtlClass(fresh, stale)
    return classes


def operations_from_document(document: Mapping[str, Any]) -> Operations:
    """Build every operation (and every read's contract); a document the proxy cannot read
    fails at start-up."""
    found: dict[str, Operation] = {}
    classes = _ttl_classes(document)
    reports: set[str] = set()
    for path, item in document["paths"].items():
        if not path.startswith(API_PREFIX) or "//" in path:
            raise ValueError(f"{path}: paths start with {API_PREFIX}, single slash")
        names = tuple(_TEMPLATE_PARAM.findall(path))
        segment = path.removeprefix(API_PREFIX).split("/")[0]
        for method in METHODS:
            spec = item.get(method)
            if spec is None:
                continue
            operation_id = str(spec["operationId"])
            if operation_id in found:
                raise ValueError(f"operationId {operation_id} is described twice")
            report = spec.get("x-report")
            if report is not None:
                report = str(report)
                if path != f"/api/v2/reports/{report}/data":
                    raise ValueError(f"{path}: the path must be /api/v2/reports/{report}/data")
                if report in reports:
                    raise ValueError(f"report {report} is described twice")
                reports.add(report)
            ttl_class = spec.get("x-ttl-class")
            if ttl_class is not None and ttl_class not in classes:
                raise ValueError(f"{operation_id}: unknown x-ttl-class {ttl_class}")
            area = str(spec.get("x-area") or ("reports" if report else segment))
            kind = str(spec.get("x-kind") or ("report-data" if report else method))
            found[operation_id] = Operation(
                operation_id,
                method.upper(),
                path,
                area,
                kind,
                segment,
                ttl_class,
                report,
                # A write's query is not read yet (issue 21): only its path parameters count.
                contract_from_operation(spec if method == "get" else _path_only(spec), names),
                spec,
            )
    return Operations(found, classes)


def _path_only(spec: Mapping[str, Any]) -> dict[str, Any]:
    parameters = [p for p in spec.get("parameters", ()) if p.get("in") == "path"]
    return {"operationId": spec["operationId"], "parameters": parameters}


@functools.cache
def load_document() -> Mapping[str, Any]:
    """TeamUp's operations as OpenAPI 3.1, shipped inside the package (read once per process)."""
    data: Mapping[str, Any] = orjson.loads(
        resources.files("proxy.spec").joinpath("teamup.json").read_bytes()
    )
    return data


@functools.cache
def load_operations() -> Operations:
    """Every operation of the shipped document (built once per process)."""
    return operations_from_document(load_document())
