"""README's table of reports, made from the operation document (a test keeps README in step)."""

from __future__ import annotations

from collections.abc import Mapping

from .operations import Operation, load_operations

__all__ = ["markdown_table"]


def markdown_table(endpoints: Mapping[str, Operation] | None = None) -> str:
    """One row per report: path, set-valued and ordered parameters, required ones."""
    rows = [
        "| report | path | set-valued (sorted, deduplicated) | ordered | required |",
        "|---|---|---|---|---|",
    ]
    for report, endpoint in (endpoints or load_operations().reports()).items():
        params = endpoint.contract.params.values()
        sets = [p.name for p in params if p.array and not p.ordered]
        ordered = [p.name for p in params if p.array and p.ordered]
        required = [p.name for p in params if p.required]
        rows.append(
            f"| `{report}` | `{endpoint.path}` | {_names(sets)} | {_names(ordered)} "
            f"| {_names(required)} |"
        )
    return "\n".join(rows)


def _names(names: list[str]) -> str:
    return ", ".join(f"`{name}`" for name in names) or "\u2013"  # an en dash: none


if __name__ == "__main__":
    print(markdown_table())
