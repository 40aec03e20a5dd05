"""README's tables of TeamUp's operations, made from proxy/spec/teamup.json (a test keeps README
in step): `python -m proxy.spec.operations_table`."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from importlib import resources
from typing import Any

__all__ = ["markdown_tables"]

KINDS = ("list", "retrieve", "other", "report-data", "report-export", "write")
# Taken by (nearly) every read; listed once above the table instead of on every row.
COMMON = ("format", "fields", "expand", "page", "page_size")


def _document() -> Mapping[str, Any]:
    data: Mapping[str, Any] = json.loads(
        resources.files("proxy.spec").joinpath("teamup.json").read_bytes()
    )
    return data


def markdown_tables(document: Mapping[str, Any] | None = None) -> str:
    """The TTL classes, operations per area and kind, then one row per GET but the report data
    ones (README's "Every TeamUp operation")."""
    document = document or _document()
    operations = [
        (path, method, operation)
        for path, item in document["paths"].items()
        for method, operation in item.items()
    ]
    counts: Counter[tuple[str, str]] = Counter(
        (operation["x-area"], operation["x-kind"]) for _, _, operation in operations
    )
    areas = sorted({area for area, _ in counts})
    classes: Counter[str] = Counter(
        operation["x-ttl-class"] for _, _, operation in operations if "x-ttl-class" in operation
    )
    rows = ["| TTL class | fresh (s) | stale (s) | reads | why |", "|---|---:|---:|---:|---|"]
    for name, ttl in document["x-ttl-classes"].items():
        rows.append(
            f"| `{name}` | {ttl['fresh']} | {ttl['stale']} | {classes[name]} | {ttl['why']} |"
        )
    rows += [
        "",
        "| area | " + " | ".join(KINDS) + " |",
        "|---|" + "---:|" * len(KINDS),
    ]
    for area in areas:
        rows.append(f"| {area} | " + " | ".join(str(counts[area, kind]) for kind in KINDS) + " |")
    rows.append("| **all** | " + " | ".join(str(_total(counts, kind)) for kind in KINDS) + " |")
    rows += [
        "",
        "| area | GET path | kind | TTL class | set-valued | ordered | required |",
        "|---|---|---|---|---|---|---|",
    ]
    reads = sorted(
        (operation["x-area"], path, operation)
        for path, method, operation in operations
        if method == "get" and operation["x-kind"] != "report-data"
    )
    previous = None
    for area, path, operation in reads:
        params = [
            p for p in operation["parameters"] if p["in"] == "query" and p["name"] not in COMMON
        ]
        sets = sorted(p["name"] for p in params if p.get("x-canonical") == "set")
        ordered = sorted(p["name"] for p in params if p.get("x-canonical") == "ordered")
        required = sorted(p["name"] for p in params if p.get("required"))
        shown = area if area != previous else ""
        previous = area
        rows.append(
            f"| {shown} | `{path}` | {operation['x-kind']} | {operation['x-ttl-class']} "
            f"| {_names(sets)} | {_names(ordered)} | {_names(required)} |"
        )
    return "\n".join(rows)


def _total(counts: Counter[tuple[str, str]], kind: str) -> int:
    return sum(count for (_, each), count in counts.items() if each == kind)


def _names(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names) or "\u2013"  # an en dash: none


if __name__ == "__main__":
    print(markdown_tables())
