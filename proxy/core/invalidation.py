"""What a write invalidates, as data: every read belongs to one collection (a generation
number in Redis that is part of its cache key), and every write names the collections it can
change (`x-invalidates` in the document, else the defaults below). Pure: no I/O.

A collection is a read's first path segment (`customers`: the lists, the retrieves and every
sub-resource under `/api/v2/customers/`), or `reports/<name>` for a report's data (the grouped
form shares its report's collection).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "EXTRA",
    "default_invalidates",
    "read_collection",
    "read_collections",
    "write_invalidates",
]

# Writes whose effect shows beyond their own segment (a booking changes attendance reads).
EXTRA: Mapping[str, tuple[str, ...]] = {
    "events": ("attendances", "course_session_attendances", "reports/attendances",
               "reports/classes", "reports/instructed_sessions", "reports/attendance_strikes"),
    "checkins": ("attendances", "events", "reports/attendances"),
    "customer_memberships": ("customers", "reports/customers"),
    "memberships": ("customer_memberships", "reports/customer_memberships"),
    "checkouts": ("invoices", "gift_cards", "customer_memberships", "reports/invoices",
                  "reports/invoice_line_items", "reports/gift_cards", "reports/customer_credits"),
}  # fmt: skip


def read_collection(segment: str, report: str | None) -> str:
    """The collection a read belongs to."""
    if report is not None:
        return f"reports/{report.split('.', 1)[0]}"
    return segment


def read_collections(paths: Mapping[str, Mapping[str, Any]]) -> frozenset[str]:
    """Every collection some read of an OpenAPI `paths` object belongs to."""
    found = set()
    for path, item in paths.items():
        spec = item.get("get")
        if isinstance(spec, Mapping):
            report = spec.get("x-report")
            segment = path.removeprefix("/api/v2/").split("/")[0]
            found.add(read_collection(segment, None if report is None else str(report)))
    return frozenset(found)


def _singular(segment: str) -> str:
    return segment[:-1] if segment.endswith("s") else segment


def default_invalidates(segment: str, kind: str, collections: Iterable[str]) -> tuple[str, ...]:
    """The collections a write under `segment` changes unless the document says otherwise:
    its own segment, the reports named after it (`customers` → `reports/customers`,
    `reports/customer_credits`, …) and `EXTRA` — those of `collections` (the document's read
    collections: a write under a segment nobody reads invalidates nothing). A report export
    changes nothing."""
    known = frozenset(collections)
    if kind == "report-export" or segment == "auth":
        return ()
    found = [segment]
    prefix = _singular(segment) + "_"
    for name in sorted(known):
        report = name.removeprefix("reports/")
        if name.startswith("reports/") and (report == segment or report.startswith(prefix)):
            found.append(name)
    found.extend(EXTRA.get(segment, ()))
    return tuple(name for name in dict.fromkeys(found) if name in known)


def write_invalidates(
    spec: Mapping[str, Any], segment: str, kind: str, collections: Iterable[str]
) -> tuple[str, ...]:
    """The operation's `x-invalidates` when the document gives it, else the defaults."""
    given = spec.get("x-invalidates")
    if given is None:
        return default_invalidates(segment, kind, collections)
    if not isinstance(given, list) or not all(isinstance(name, str) for name in given):
        raise ValueError(f"{spec.get('operationId')}: x-invalidates must be a list of names")
    return tuple(dict.fromkeys(given))
