"""proxy/spec/teamup.json against TeamUp's 32 report data pages, and against itself.

Every page (the copy in docs/upstream/reports, and shared/upstream/reports when a checkout has it
beside the repository) must be in the document: the endpoint, every parameter with its type,
array-ness, values, default, `required` and bounds; the document may be stricter only where the
parameter's x-tightened says so (proxy/spec/report_pages.py: `gaps`). The rest checks the shape the
proxy builds its validators from, and that customer_credits is exactly today's contract.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openapi_spec_validator import validate

from proxy.core.contract import MAX_ARRAY_ITEMS, Param
from proxy.core.operations import load_operations
from proxy.spec.report_pages import (
    COLUMN_TYPES,
    DOCUMENT,
    PAGES_DIR,
    REPO,
    gaps,
    page_files,
    parse_page,
    path_for,
)
from proxy.testing.mock import DEFAULT_COLUMNS

TEXT = DOCUMENT.read_text(encoding="utf-8")
SPEC: dict[str, Any] = json.loads(TEXT)
ERROR_REF = "#/components/schemas/Error"
ERROR_STATUSES = ("400", "401", "403", "404", "429")
CANONICAL = {"set", "ordered"}


def _shared_pages() -> Path | None:
    """shared/upstream/reports beside the checkout (/work/main → /work/shared, and from a
    worktree one level deeper), when this machine has it."""
    for ancestor in Path(__file__).resolve().parents[1:]:
        candidate = ancestor / "shared" / "upstream" / "reports"
        if candidate.is_dir():
            return candidate
    return None


SHARED = _shared_pages()
SOURCES = {"docs": PAGES_DIR} | ({"shared": SHARED} if SHARED is not None else {})
PAGE_CASES = [
    pytest.param(path, id=f"{source}:{path.stem}")
    for source, directory in SOURCES.items()
    for path in page_files(directory)
]


def _operations() -> Iterator[tuple[str, dict[str, Any]]]:
    for path, item in SPEC["paths"].items():
        if item.get("get", {}).get("x-kind") == "report-data":
            yield path, item["get"]


def _params(operation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {param["name"]: param for param in operation["parameters"]}


OPERATIONS = dict(_operations())


# --- the pages ------------------------------------------------------------------------------


@pytest.mark.parametrize("page_path", PAGE_CASES)
def test_the_document_states_what_the_page_states(page_path: Path) -> None:
    page = parse_page(page_path.name, page_path.read_text(encoding="utf-8"))
    assert gaps(page, SPEC) == []


def test_the_pages_are_all_there() -> None:
    pages = [parse_page(path.name, path.read_text(encoding="utf-8")) for path in page_files()]
    assert len(pages) == 32
    assert {page.path for page in pages} == set(OPERATIONS)
    assert Counter(page.grouped for page in pages) == {False: 19, True: 13}


def test_the_repository_copy_is_the_shared_one() -> None:
    if SHARED is None:
        pytest.skip("no shared/upstream/reports beside this checkout")
    names = sorted(path.name for path in SHARED.iterdir())
    assert names == sorted(path.name for path in PAGES_DIR.iterdir())
    assert {"LICENSE", "README.md"} <= set(names)
    for name in names:
        assert (PAGES_DIR / name).read_bytes() == (SHARED / name).read_bytes(), name


# --- the document's shape -------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    assert SPEC["openapi"] == "3.1.0"
    validate(SPEC)


def test_the_document_is_pretty_printed() -> None:
    assert TEXT == json.dumps(SPEC, indent=2, ensure_ascii=False) + "\n"


def test_paths_32_endpoints_19_reports_13_grouped() -> None:
    assert len(OPERATIONS) == 32
    reports = {operation["x-report"]: operation for operation in OPERATIONS.values()}
    assert Counter(operation["x-grouped"] for operation in reports.values()) == {
        False: 19,
        True: 13,
    }
    for path, operation in OPERATIONS.items():
        report = operation["x-report"]
        assert path == path_for(report) and "//" not in path
        assert operation["x-grouped"] == report.endswith(".grouped")
        assert operation["operationId"] == report.replace(".", "_")
        if operation["x-grouped"]:
            assert report.removesuffix(".grouped") in reports
    assert len({operation["operationId"] for operation in OPERATIONS.values()}) == 32


def test_every_array_parameter_says_how_it_is_canonicalised() -> None:
    for path, operation in OPERATIONS.items():
        for name, param in _params(operation).items():
            schema = param["schema"]
            where = f"{path} {name}"
            if schema["type"] != "array":
                assert "x-canonical" not in param and "style" not in param, where
                continue
            assert param["x-canonical"] in CANONICAL, where
            assert (param["style"], param["explode"]) == ("form", True), where
            assert schema["maxItems"] <= MAX_ARRAY_ITEMS, where
            if name in ("columns", "sort"):
                assert param["x-canonical"] == "ordered", where
            assert param.get("x-sort", False) == (name == "sort"), where


def test_sort_names_the_columns() -> None:
    for path, operation in OPERATIONS.items():
        sort = _params(operation)["sort"]
        assert sort["x-sort"] is True, path
        assert sort["schema"] == {"type": "array", "items": {"type": "string"}, "maxItems": 200}


def test_grouped_reports_require_columns() -> None:
    for path, operation in OPERATIONS.items():
        columns = _params(operation).get("columns")
        if operation["x-grouped"]:
            assert columns is not None and columns["required"] is True, path
            assert columns["schema"]["minItems"] >= 1, path
            assert operation["x-default-columns"] == [], path


def test_columns_and_their_types() -> None:
    for path, operation in OPERATIONS.items():
        columns = operation["x-columns"]
        assert columns and len(set(columns)) == len(columns), path
        param = _params(operation).get("columns")
        if param is not None:
            assert columns == param["schema"]["items"]["enum"], path
        else:
            assert operation["x-report"] == "instructors" and operation["x-note"], path
        assert list(operation["x-column-types"]) == columns, path
        assert set(operation["x-column-types"].values()) <= set(COLUMN_TYPES), path


def test_default_columns() -> None:
    for path, operation in OPERATIONS.items():
        if operation["x-grouped"]:
            continue
        if operation["x-report"] == "customer_credits":
            assert operation["x-default-columns"] == list(DEFAULT_COLUMNS)
        else:
            assert operation["x-default-columns"] == operation["x-columns"][:8], path
        assert set(operation["x-default-columns"]) <= set(operation["x-columns"]), path


def test_ranges_are_every_gte_lte_pair() -> None:
    for path, operation in OPERATIONS.items():
        params = _params(operation)
        pairs = [
            [name, name.removesuffix("_gte") + "_lte"]
            for name in params
            if name.endswith("_gte") and name.removesuffix("_gte") + "_lte" in params
        ]
        assert sorted(operation["x-ranges"]) == sorted(pairs), path
        for low, high in operation["x-ranges"]:
            assert params[low]["schema"] == params[high]["schema"], f"{path} {low}"
            assert params[low]["schema"].get("format") in ("date", "date-time"), f"{path} {low}"


def test_every_parameter_is_described_and_every_extension_says_why() -> None:
    for path, operation in OPERATIONS.items():
        for name, param in _params(operation).items():
            assert param["in"] == "query" and param["description"], f"{path} {name}"
            assert param.get("required", True) is True, f"{path} {name}: required only if true"
            for key in ("x-tightened", "x-note"):
                assert isinstance(param.get(key, "-"), str) and param.get(key, "-"), key
            schema = param["schema"]
            if schema == {"type": "string", "maxLength": 100}:
                assert param.get("x-tightened"), f"{path} {name}"


def test_responses_and_security() -> None:
    components = SPEC["components"]
    scheme = components["securitySchemes"]["TokenAuth"]
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
    assert set(components["schemas"]["Error"]["properties"]) == {
        "code",
        "type",
        "message",
        "field_errors",
    }
    for path, operation in OPERATIONS.items():
        assert operation["security"] == [{"TokenAuth": []}], path
        responses = operation["responses"]
        assert set(responses["200"]["content"]) == {"application/json", "text/csv"}, path
        assert set(responses) == {"200", *ERROR_STATUSES}, path
        for status in ERROR_STATUSES:
            content = responses[status]["content"]["application/json"]
            assert content["schema"] == {"$ref": ERROR_REF}, f"{path} {status}"


# --- customer_credits: exactly the contract the proxy enforces today ------------------------

_KINDS = {
    "int": {"type": "integer"},
    "datetime": {"type": "string", "format": "date-time"},
    "enum": {"type": "string"},
    "text": {"type": "string"},
}


# The customer credits contract as the proxy enforced it before every report was data
# (restated, not imported: it is the oracle for both the document and the builder).
CREDIT_COLUMNS = (
    "customer_id",
    "customer.id",
    "customer",
    "customer_name",
    "customer.name",
    "customer_email",
    "customer.email",
    "created_at",
    "amount",
    "balance",
    "memo",
)
TODAYS_CREDITS = {
    param.name: param
    for param in (
        Param("columns", "enum", array=True, choices=CREDIT_COLUMNS),
        Param("created_at_gte", "datetime"),
        Param("created_at_lte", "datetime"),
        Param("created_at_timeframe", "text", max_length=100),
        Param("customers", "int", array=True, ordered=False, minimum=1),
        Param("format", "enum", default="csv", choices=("csv", "json")),
        Param("id_gt", "int", minimum=0),
        Param("limit", "int", default=50, minimum=1, maximum=100),
        Param("offset", "int", default=0, minimum=0),
        Param("page", "int", minimum=1),
        Param("page_size", "int", minimum=0, maximum=100),
        Param("sort", "enum", array=True, choices=CREDIT_COLUMNS, descending_prefix=True),
    )
}


def test_the_built_customer_credits_contract_is_todays() -> None:
    contract = load_operations().reports()["customer_credits"].contract
    assert dict(contract.params) == TODAYS_CREDITS
    assert contract.ranges == (("created_at_gte", "created_at_lte"),)


def test_customer_credits_is_todays_contract() -> None:
    operation = OPERATIONS[path_for("customer_credits")]
    params = _params(operation)
    assert set(params) == set(TODAYS_CREDITS)
    assert operation["x-columns"] == list(CREDIT_COLUMNS)
    assert operation["x-ranges"] == [["created_at_gte", "created_at_lte"]]
    for name, rule in TODAYS_CREDITS.items():
        param = params[name]
        schema = param["schema"]
        assert (schema["type"] == "array") == rule.array, name
        item = schema["items"] if rule.array else schema
        assert {key: item[key] for key in ("type", "format") if key in item} == _KINDS[rule.kind]
        if rule.array:
            assert schema["maxItems"] == MAX_ARRAY_ITEMS, name
            assert param["x-canonical"] == ("ordered" if rule.ordered else "set"), name
        if rule.descending_prefix:
            assert param["x-sort"] is True and list(rule.choices) == operation["x-columns"]
        else:
            assert item.get("enum") == (list(rule.choices) if rule.choices else None), name
        assert schema.get("default") == rule.default, name
        assert item.get("minimum") == rule.minimum, name
        assert item.get("maximum") == rule.maximum, name
        assert item.get("maxLength") == rule.max_length, name
        assert not param.get("required", False), name


def test_extract_spec_check_passes() -> None:
    script = REPO / "scripts" / "extract-spec"
    result = subprocess.run(
        [sys.executable, str(script), "--check"], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout) == (0, ""), result.stdout
