"""The endpoints, as data: one OpenAPI document (`proxy/spec/teamup.json`) → one `Endpoint` each.

Adding a TeamUp report is an edit to that document (plus tests); nothing here names a report.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

from .contract import Contract, contract_from_operation

__all__ = ["Endpoint", "Endpoints", "load_document", "load_endpoints"]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One TeamUp report data endpoint: its path, its contract and its OpenAPI operation."""

    report: str
    path: str
    grouped: bool
    contract: Contract
    operation: Mapping[str, Any]

    @property
    def doubled_path(self) -> str:
        """The path as TeamUp's docs print it (`/api/v2//reports/…`); the proxy routes both."""
        return self.path.replace("/v2/", "/v2//", 1)


class Endpoints(Mapping[str, Endpoint]):
    """Every endpoint of the document, by report name (`customers`, `customers.grouped`, …)."""

    def __init__(self, endpoints: Mapping[str, Endpoint]) -> None:
        self._by_report = dict(sorted(endpoints.items()))

    def __getitem__(self, report: str) -> Endpoint:
        return self._by_report[report]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_report)

    def __len__(self) -> int:
        return len(self._by_report)

    def only(self, reports: frozenset[str] | None) -> Endpoints:
        """The endpoints named in `reports` (None: all of them)."""
        if reports is None:
            return self
        return Endpoints({name: ep for name, ep in self._by_report.items() if name in reports})


@functools.cache
def load_document() -> Mapping[str, Any]:
    """TeamUp's endpoints as OpenAPI 3.1, shipped inside the package (read once per process)."""
    data: Mapping[str, Any] = orjson.loads(
        resources.files("proxy.spec").joinpath("teamup.json").read_bytes()
    )
    return data


def endpoints_from_document(document: Mapping[str, Any]) -> Endpoints:
    """Build every endpoint's contract; a document the proxy cannot read fails at start-up."""
    found: dict[str, Endpoint] = {}
    for path, item in document["paths"].items():
        operation = item.get("get")
        # Only the report data operations are routed here; the others are documented only.
        if operation is None or operation.get("x-kind", "report-data") != "report-data":
            continue
        report = str(operation["x-report"])
        if path != f"/api/v2/reports/{report}/data":
            raise ValueError(f"{path}: the path must be /api/v2/reports/{report}/data")
        if report in found:
            raise ValueError(f"report {report} is described twice")
        found[report] = Endpoint(
            report,
            path,
            bool(operation.get("x-grouped")),
            contract_from_operation(operation),
            operation,
        )
    return Endpoints(found)


@functools.cache
def load_endpoints() -> Endpoints:
    """Every endpoint of the shipped document (built once per process)."""
    return endpoints_from_document(load_document())
