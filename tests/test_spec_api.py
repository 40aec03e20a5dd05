"""proxy/spec/teamup.json against every page of TeamUp's API (docs/upstream/api), read by
tests/spec_api.py apart from the generator, and against the rules every operation follows."""

from __future__ import annotations

import json
import re
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from tests.spec_api import (
    API_DIR,
    Row,
    operation_problems,
    page_text,
    request_line,
    rows,
    widget_problems,
)

DOCUMENT: dict[str, Any] = json.loads(
    resources.files("proxy.spec").joinpath("teamup.json").read_bytes()
)
ROWS = rows()
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    (method.upper(), path): operation
    for path, item in DOCUMENT["paths"].items()
    for method, operation in item.items()
}
READS = ("list", "retrieve", "other", "report-data")
SHARED = next(
    (
        folder / "shared" / "upstream" / "api"
        for folder in Path(__file__).resolve().parents
        if (folder / "shared" / "upstream" / "api" / "endpoints.tsv").is_file()
    ),
    None,
)


def _operation(row: Row) -> dict[str, Any]:
    operation = OPERATIONS.get((row.method, row.template))
    assert operation is not None, f"{row.method} {row.template} ({row.file}) is not documented"
    return operation


@pytest.mark.parametrize("row", ROWS, ids=[f"{row.method}:{row.path}" for row in ROWS])
def test_each_operation_states_what_its_page_states(row: Row) -> None:
    text = page_text(row)
    # The request line in the body, not the page's unreliable **Method:** / **URL:** lines.
    assert request_line(text) == (row.method, row.path)
    operation = _operation(row)
    assert operation["x-page"] == f"{row.folder}/{row.file}"
    assert operation["x-area"] == row.folder
    assert operation["x-kind"] == row.kind
    assert operation_problems(row, text, operation) == []
    assert widget_problems(text, operation["parameters"]) in (None, [])
    path_names = re.findall(r"\{(\w+)\}", row.template)
    path_params = [p for p in operation["parameters"] if p["in"] == "path"]
    assert [p["name"] for p in path_params] == path_names


def test_every_operation_of_the_index_and_no_other() -> None:
    validate(DOCUMENT)  # OpenAPI 3.1, $refs resolving
    assert len(ROWS) == 353
    paged = {key for key, operation in OPERATIONS.items() if "x-added" not in operation}
    assert paged == {(row.method, row.template) for row in ROWS}
    methods = Counter(row.method for row in ROWS)
    assert methods["GET"] == 162
    assert sum(methods.values()) - methods["GET"] == 191
    kinds = Counter(OPERATIONS[key]["x-kind"] for key in paged)
    assert kinds == {
        "report-data": 32,
        "list": 56,
        "retrieve": 46,
        "other": 28,
        "report-export": 32,
        "write": 159,
    }
    assert all(path.startswith("/api/v2/") and "//" not in path for path in DOCUMENT["paths"])


def test_operation_ids_are_unique_and_follow_the_page() -> None:
    ids = Counter(operation["operationId"] for operation in OPERATIONS.values())
    assert [name for name, count in ids.items() if count > 1] == []
    for row in ROWS:
        operation = _operation(row)
        if row.kind != "report-data":
            stem = row.file.removeprefix("endpoints_").removesuffix(".md")
            assert operation["operationId"] == stem.replace("-", "_")


def test_every_read_names_a_ttl_class_the_document_defines() -> None:
    classes = DOCUMENT["x-ttl-classes"]
    assert {"reference", "standard", "volatile", "report"} <= set(classes)
    for ttl in classes.values():
        assert 0 < ttl["fresh"] <= ttl["stale"] and ttl["why"]
    for (method, path), operation in OPERATIONS.items():
        if operation["x-kind"] in READS:
            assert method == "GET"
            assert operation["x-ttl-class"] in classes, path
        else:
            assert method != "GET" and "x-ttl-class" not in operation, path
            assert "requestBody" in operation, path
    # Reports keep the proxy's default TTLs (proxy/settings.py).
    assert (classes["report"]["fresh"], classes["report"]["stale"]) == (300, 3600)
    for (_, path), operation in OPERATIONS.items():
        if operation["x-kind"] == "report-data":
            assert operation["x-ttl-class"] == "report", path
    # Reference data outlives an events list; attendance lives shortest.
    assert OPERATIONS["GET", "/api/v2/venues"]["x-ttl-class"] == "reference"
    assert OPERATIONS["GET", "/api/v2/events"]["x-ttl-class"] == "standard"
    assert OPERATIONS["GET", "/api/v2/attendances"]["x-ttl-class"] == "volatile"
    assert OPERATIONS["GET", "/api/v2/customers/{id}/account_status"]["x-ttl-class"] == "volatile"


def _params(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation["parameters"] if p["in"] == "query"}


def test_every_list_pages_the_way_teamup_does() -> None:
    lists = [(path, op) for (_, path), op in OPERATIONS.items() if op["x-kind"] == "list"]
    assert len(lists) == 56
    for path, operation in lists:
        params = _params(operation)
        page = params["page"]["schema"]
        size = params["page_size"]["schema"]
        assert page == {"type": "integer", "minimum": 1, "default": 1}, path
        largest = 250 if path == "/api/v2/events" else 100
        assert size == {"type": "integer", "maximum": largest, "minimum": 1, "default": 100}, path
        content = operation["responses"]["200"]["content"]
        envelope = content["application/json"]["schema"]
        assert envelope["required"] == ["count", "next", "previous", "results"], path
        assert envelope["properties"]["results"]["type"] == "array", path
        assert "application/xml" in content, path


def test_common_read_parameters() -> None:
    for (_, path), operation in OPERATIONS.items():
        if operation["x-kind"] not in ("list", "retrieve", "other"):
            continue
        params = _params(operation)
        assert params["format"]["schema"] == {
            "type": "string",
            "enum": ["json", "xml"],
            "default": "json",
        }
        for name in ("fields", "expand"):
            if name in params:
                param = params[name]
                assert param["schema"]["type"] == "array", path
                assert param["style"] == "form" and param["explode"] is False, path
                assert param["x-canonical"] == "set", path
        if "sort" in params:
            assert params["sort"]["x-canonical"] == "ordered", path
    # "Nearly every list and retrieve takes format, fields and expand".
    with_fields = sum(
        "fields" in _params(op)
        for op in OPERATIONS.values()
        if op["x-kind"] in ("list", "retrieve")
    )
    assert with_fields >= 80


def test_path_parameters_admit_one_plain_segment_only() -> None:
    for (_, path), operation in OPERATIONS.items():
        for param in operation["parameters"]:
            if param["in"] != "path":
                continue
            schema = param["schema"]
            assert param["required"] is True
            if schema["type"] == "integer":
                assert schema == {"type": "integer", "minimum": 1}, path
                continue
            if "enum" in schema:
                continue
            pattern = re.compile(schema["pattern"])
            for bad in ("a/b", "..", ".", "%2F", "a%2fb", "", "a b"):
                assert pattern.search(bad) is None, (path, param["name"], bad)
            assert pattern.search("AbC-12_3") or pattern.search("123"), (path, param["name"])
    trigger = OPERATIONS["GET", "/api/v2/crm/workflow_triggers/{trigger}"]["parameters"][0]
    assert re.search(trigger["schema"]["pattern"], "lead_form.submitted")


def test_a_self_contradicting_page_says_which_reading_it_took() -> None:
    """`status integer` with values [active, inactive]: the values win, and x-note says so."""
    contradictions = 0
    for operation in OPERATIONS.values():
        for param in operation["parameters"]:
            schema = param.get("schema", {})
            item = schema.get("items", schema)
            if param["in"] == "query" and "enum" in item:
                assert all(isinstance(value, item_type(item)) for value in item["enum"])
            if param.get("x-note") and "the values win" in param["x-note"]:
                contradictions += 1
                assert item["type"] == "string"
    assert contradictions >= 3


def item_type(item: dict[str, Any]) -> type | tuple[type, ...]:
    types: dict[str, type | tuple[type, ...]] = {
        "integer": int,
        "number": (int, float),
        "boolean": bool,
    }
    return types.get(item["type"], str)


def test_the_repository_copy_is_the_shared_one() -> None:
    if SHARED is None:
        pytest.skip("no shared/upstream/api beside this checkout")
    for row in ROWS:
        name = f"{row.folder}/{row.file}"
        assert (API_DIR / name).read_bytes() == (SHARED / name).read_bytes(), name
    for name in ("endpoints.tsv", "LICENSE", "README.md", "SOURCE.txt"):
        assert (API_DIR / name).read_bytes() == (SHARED / name).read_bytes(), name


def test_the_document_is_what_the_generator_gives() -> None:
    """What `scripts/extract-spec --check` checks, in the suite: a hand edit of a generated
    operation, or a page changed without `--write`, fails here."""
    from proxy.spec.api_pages import load_api_pages
    from proxy.spec.generate import generate_document

    assert generate_document(load_api_pages(API_DIR), DOCUMENT) == DOCUMENT


def test_readme_carries_the_generated_operation_tables() -> None:
    from proxy.spec.operations_table import markdown_tables

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert markdown_tables() in readme
