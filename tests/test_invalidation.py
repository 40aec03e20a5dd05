"""What a write invalidates (core/invalidation.py and the document's x-invalidates)."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core.operations import load_document, load_operations, operations_from_document


def test_every_write_names_collections_that_reads_belong_to() -> None:
    operations = load_operations()
    collections = {op.collection for op in operations.values() if op.is_read}
    for op in operations.values():
        if op.is_read:
            assert op.invalidates == ()
            continue
        assert set(op.invalidates) <= collections, op.operation_id
        if op.kind == "report-export" or op.area == "auth":
            assert op.invalidates == (), op.operation_id
        elif op.segment in collections:
            assert op.invalidates[0] == op.segment, op.operation_id


def test_the_document_carries_x_invalidates_on_every_write() -> None:
    for item in load_document()["paths"].values():
        for method, spec in item.items():
            assert ("x-invalidates" in spec) == (method != "get"), spec["operationId"]


def test_a_customer_write_reaches_its_reads_and_reports() -> None:
    operations = load_operations()
    patch = operations["customers_partial_update"]
    assert {"customers", "reports/customers", "reports/customer_credits"} <= set(patch.invalidates)
    assert operations["customers_retrieve"].collection == "customers"
    assert operations["customers_list"].collection == "customers"
    reports = operations.reports()
    assert reports["customers.grouped"].collection == "reports/customers"
    # Booking a class changes attendance reads and the class reports.
    register = next(op for op in operations.values() if op.path.endswith("/register"))
    assert {"events", "attendances", "reports/attendances"} <= set(register.invalidates)


def test_a_misspelt_collection_is_refused_at_start_up() -> None:
    document: dict[str, Any] = {
        "paths": {
            "/api/v2/customers": {
                "get": {"operationId": "customers_list", "x-kind": "list"},
                "post": {"operationId": "customers_create", "x-invalidates": ["customer"]},
            }
        }
    }
    with pytest.raises(ValueError, match="x-invalidates names no read"):
        operations_from_document(document)
    document["paths"]["/api/v2/customers"]["post"]["x-invalidates"] = ["customers"]
    assert operations_from_document(document)["customers_create"].invalidates == ("customers",)
