"""`GET /openapi.json`: generated from the endpoint document for the reports the proxy routes,
valid OpenAPI 3.1, faithful to every endpoint's query contract, still saying everything the old
static customer_credits document said, and what a real proxy answers conforms to it
(schemathesis, positive and negative cases)."""

from __future__ import annotations

import importlib
import json
import pkgutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from openapi_spec_validator import validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from proxy.core.contract import INT_CEILING, Param
from proxy.core.operations import Operation as Endpoint
from proxy.core.operations import load_operations
from proxy.testing.e2e import KEY, OTHER_KEY, REPORT, TOKEN, auth
from proxy.testing.faults import MockProcess
from proxy.testing.procs import ProxyProcess
from proxy.web.auth import hash_key
from proxy.web.openapi import build_document
from tests.conftest import MakeProxy

ENDPOINTS = load_operations().reports()
# Every other read a default proxy routes (auth/* is off).
READS = [
    op for op in load_operations().routed(reports=None, auth=False).values() if op.report is None
]


# What a proxy routing every report serves (JSON round trip: what a client reads).
def _import_lazy_modules() -> None:
    """Import now, at collection, what schemathesis would import lazily during the fuzz.

    pytest rewrites the modules of plugin packages (schemathesis, hypothesis) as they are
    imported, with `ast.parse`; CPython 3.11.7's AST recursion-depth state is global, and once
    something in the session has upset it (a race between threads, gh-106905, fixed in 3.11.8)
    every later `ast.parse` fails with "AST constructor recursion depth mismatch".
    """
    for module in pkgutil.walk_packages(schemathesis.__path__, "schemathesis."):
        if not module.name.startswith(("schemathesis.cli", "schemathesis.reporting")):
            importlib.import_module(module.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hypothesis warns of slow imports during plugin set-up
        for name in ("flatmapped", "random", "regex"):
            importlib.import_module(f"hypothesis.strategies._internal.{name}")


_import_lazy_modules()


DOCUMENT: dict[str, Any] = json.loads(orjson.dumps(build_document(ENDPOINTS, READS)))
# The static document the proxy served before every report was routed (customer_credits only).
STATIC: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "static-openapi.json").read_text()
)
REPORT_PATHS = (REPORT, REPORT.replace("/v2/", "/v2//", 1))
# A copy of shared/upstream/openapi.yaml, kept in the repo so the check runs in any clone.
UPSTREAM_SPEC = Path(__file__).resolve().parents[1] / "docs" / "upstream" / "teamup-openapi.yaml"
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Every answer of the report handler names the report (a 405 comes from the router).
NAMED = {"200", "400", "401", "403", "404", "414", "429", "502", "503", "504"}


def resolve(node: dict[str, Any], document: dict[str, Any] = DOCUMENT) -> dict[str, Any]:
    """Follow local `$ref`s."""
    while "$ref" in node:
        target: Any = document
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operation_of(path: str, document: dict[str, Any] = DOCUMENT) -> dict[str, Any]:
    operation: dict[str, Any] = document["paths"][path]["get"]
    return operation


def parameters_of(path: str, document: dict[str, Any] = DOCUMENT) -> dict[str, dict[str, Any]]:
    operation = operation_of(path, document)
    return {p["name"]: p for p in (resolve(ref, document) for ref in operation["parameters"])}


def report_paths(document: dict[str, Any]) -> set[str]:
    return {
        path
        for path in document["paths"]
        if path.startswith(("/api/v2/reports/", "/api/v2//reports/")) and path.endswith("/data")
    }


def paths_of(endpoint: Endpoint) -> tuple[str, str]:
    return endpoint.path, endpoint.doubled_path


async def test_the_generated_document_is_served(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    response = await proxy.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOCUMENT


async def test_switched_off_reports_are_absent(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy(reports_enabled=["customers"])
    response = await proxy.get("/openapi.json")
    document = await response.json()
    validate(document)
    assert report_paths(document) == set(paths_of(ENDPOINTS["customers"]))
    assert not any(
        name.startswith("customer_credits.") for name in document["components"]["parameters"]
    )
    for path in ("/admin/cache/{report}", "/admin/cache/{report}/data"):
        report = resolve(document["paths"][path]["delete"]["parameters"][0], document)
        assert report["in"] == "path" and report["schema"]["enum"] == ["customers"]
    # The legacy `DELETE /admin/cache?<query>` form means customer_credits, switched off here.
    assert "parameters" not in document["paths"]["/admin/cache"]["delete"]
    # What is documented is what is routed: the switched-off report is a 404.
    gone = await proxy.get(REPORT, headers=auth())
    assert gone.status == 404


def test_the_document_is_valid_openapi_3_1_with_two_paths_per_report() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate(DOCUMENT)
    assert DOCUMENT["info"]["summary"] == "A caching reverse proxy for TeamUp's reporting API."
    assert len(ENDPOINTS) == 32
    assert report_paths(DOCUMENT) == {p for e in ENDPOINTS.values() for p in paths_of(e)}
    assert len(report_paths(DOCUMENT)) == 2 * len(ENDPOINTS)
    ids = [op["operationId"] for item in DOCUMENT["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids))
    for endpoint in ENDPOINTS.values():
        for path in paths_of(endpoint):
            operation = operation_of(path)
            assert operation["tags"] == ["report"]
            assert endpoint.document["summary"] in operation["summary"]
            assert f"`GET {endpoint.path}`" in operation["description"]


def expected_item(rule: Param) -> dict[str, Any]:
    """What one value of `rule` must look like in the document (the proxy's contract)."""
    if rule.kind == "int":
        return {
            "type": "integer",
            "minimum": 0 if rule.minimum is None else rule.minimum,
            "maximum": INT_CEILING if rule.maximum is None else rule.maximum,
        }
    if rule.kind == "bool":
        return {"type": "boolean"}
    if rule.kind in ("date", "datetime"):
        return {"type": "string", "format": "date" if rule.kind == "date" else "date-time"}
    if rule.kind == "text":
        text: dict[str, Any] = {"type": "string", "minLength": 1}
        if rule.max_length is not None:
            text["maxLength"] = rule.max_length
        if rule.pattern is not None:
            text["pattern"] = rule.pattern  # the contract's patterns are anchored already
        return text
    allowed = [*rule.choices, *(f"-{c}" for c in rule.choices if rule.descending_prefix)]
    return {"type": "string", "enum": allowed}


@pytest.mark.parametrize("report", list(ENDPOINTS))
def test_every_parameter_follows_its_endpoints_contract(report: str) -> None:
    endpoint = ENDPOINTS[report]
    contract = endpoint.contract
    for path in paths_of(endpoint):
        params = parameters_of(path)
        assert set(params) == {*contract.params, "X-Request-ID"}
        assert params["X-Request-ID"]["in"] == "header"
        for name, rule in contract.params.items():
            param = params[name]
            assert param["in"] == "query"
            assert param.get("required", False) == rule.required
            assert param["description"]
            schema = dict(param["schema"])
            assert schema.pop("default", None) == rule.default
            if rule.array:
                assert schema["type"] == "array"
                assert (param["style"], param["explode"]) == ("form", True)
                assert schema["minItems"] == max(1, rule.min_items)
                assert schema["maxItems"] == rule.max_items
                ordered = "Ordered" if rule.ordered else "A set"
                assert ordered in param["description"]
                for spelling in (f"{name}=a&{name}=b", f"{name}[]=", f"{name}=a,b"):
                    assert spelling in param["description"]
                schema = schema["items"]
            expected = expected_item(rule)
            if rule.kind == "enum":
                # Enums are case folded: the upper-case spelling is accepted as well.
                assert schema["enum"][: len(expected["enum"])] == expected["enum"]
                assert set(schema["enum"]) == {
                    *expected["enum"], *(v.upper() for v in expected["enum"])
                }  # fmt: skip
                schema = {**schema, "enum": expected["enum"]}
            if rule.kind == "bool":
                assert "`1` and `0` and any case" in param["description"]
            assert schema == expected, (report, name)
        if endpoint.grouped:
            columns = params["columns"]
            assert columns["required"] and columns["schema"]["minItems"] == 1
        for low, high in contract.ranges:
            assert f"Must not be later than `{high}`" in params[low]["description"]


def test_customer_credits_keeps_everything_the_static_document_said() -> None:
    for path in REPORT_PATHS:
        old, new = operation_of(path, STATIC), operation_of(path)
        assert new["operationId"] == old["operationId"]
        assert new["security"] == old["security"]
        assert set(old["responses"]) < set(new["responses"])
        assert new["description"] == old["description"].replace(
            "customer_credits/data`,",
            "customer_credits/data` (rows of the customer credits report),",
        )
        old_params, new_params = parameters_of(path, STATIC), parameters_of(path)
        assert set(old_params) == set(new_params)
        for name, before in old_params.items():
            after = new_params[name]
            for key in ("in", "style", "explode", "required"):
                assert after.get(key) == before.get(key), (name, key)
            assert said_as_much(after["schema"], before["schema"]), name
    limits = {n: p["schema"] for n, p in parameters_of(REPORT).items()}
    assert (limits["limit"]["minimum"], limits["limit"]["maximum"]) == (1, 100)
    assert (limits["page_size"]["minimum"], limits["page_size"]["maximum"]) == (0, 100)
    assert limits["page"]["minimum"] == 1 and limits["offset"]["minimum"] == 0
    assert limits["id_gt"]["minimum"] == 0 and limits["customers"]["items"]["minimum"] == 1
    assert limits["format"]["enum"] == ["csv", "json", "CSV", "JSON"]
    assert limits["sort"]["minItems"] == 1


def said_as_much(new: Any, old: Any) -> bool:
    """`new` says everything `old` said: same values, enums that only grew (upper case)."""
    if isinstance(old, dict) and isinstance(new, dict):
        return all(
            key in new
            and (
                set(old[key]) <= set(new[key])
                if key == "enum"
                else said_as_much(new[key], old[key])
            )
            for key in old
        )
    return bool(new == old)


def test_every_upstream_parameter_is_documented() -> None:
    import yaml

    upstream = yaml.safe_load(UPSTREAM_SPEC.read_text())
    names = {
        p["name"] for p in upstream["paths"]["/reports/customer_credits/data"]["get"]["parameters"]
    }
    assert names <= set(parameters_of(REPORT))  # fmt: skip


def test_responses_security_and_headers_are_documented() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert {(s["type"], s["in"], s["name"]) for s in schemes.values()} == {
        ("apiKey", "header", "Authorization"),
        ("apiKey", "header", "X-API-Key"),
    }
    for endpoint in ENDPOINTS.values():
        for path in paths_of(endpoint):
            operation = operation_of(path)
            assert operation["security"] == [{"TokenAuth": []}, {"ApiKeyAuth": []}]
            responses = {code: resolve(r) for code, r in operation["responses"].items()}
            assert set(responses) == {
                "200", "400", "401", "403", "404", "405", "414", "429", "502", "503", "504"
            }  # fmt: skip
            assert set(responses["200"]["content"]) == {"application/json", "text/csv"}
            ok_headers = set(responses["200"]["headers"])
            assert {
                "Cache-Status", "Age", "X-Request-ID", "X-Proxy-Canonical-Query", "X-Proxy-Report"
            } <= ok_headers  # fmt: skip
            assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(
                responses["429"]["headers"]
            )
            assert "Retry-After" in responses["503"]["headers"]
            assert "permission_denied" in responses["403"]["description"]
            assert "PROXY_CLIENTS" in responses["403"]["description"]
            for code, response in responses.items():
                named = response["headers"].get("X-Proxy-Report")
                if code in NAMED:
                    assert named["schema"] == {"type": "string", "const": endpoint.report}
                    assert named["required"] == (code != "400")
                else:
                    assert named is None, code
                if code != "200":
                    schema = resolve(response["content"]["application/json"]["schema"])
                    if "allOf" in schema:
                        assert "field_errors" in schema["allOf"][1]["required"]
                        schema = resolve(schema["allOf"][0])
                    assert schema["required"] == ["code", "type", "message"]
                    assert "field_errors" in schema["properties"]
    assert "delete" in DOCUMENT["paths"]["/admin/cache"]
    legacy = {resolve(p)["name"] for p in DOCUMENT["paths"]["/admin/cache"]["delete"]["parameters"]}
    assert legacy == set(ENDPOINTS["customer_credits"].contract.params)
    for path in ("/admin/cache/{report}", "/admin/cache/{report}/data"):
        purge = DOCUMENT["paths"][path]["delete"]
        assert purge["security"] == [{"TokenAuth": []}, {"ApiKeyAuth": []}]
        report = purge["parameters"][0]
        assert (report["name"], report["in"], report["required"]) == ("report", "path", True)
        assert report["schema"]["enum"] == list(ENDPOINTS)
        assert {"200", "401", "403", "404"} <= set(purge["responses"])
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert "get" in DOCUMENT["paths"][path]


async def test_a_client_limited_to_other_reports_gets_the_documented_403(
    make_proxy: MakeProxy,
) -> None:
    clients = {
        "billing": {"key_sha256": hash_key(KEY)},
        "crm": {"key_sha256": hash_key(OTHER_KEY), "reports": ["customers"]},
    }
    proxy = await make_proxy(clients=clients)
    response = await proxy.get(REPORT, headers=auth(OTHER_KEY))
    assert response.status == 403
    body = await response.json()
    documented = resolve(operation_of(REPORT)["responses"]["403"])
    assert body["code"] == "permission_denied" and body["code"] in documented["description"]
    assert response.headers["X-Proxy-Report"] == "customer_credits"
    unknown = await proxy.get(REPORT, headers=auth("no-such-key"))
    assert unknown.status == 401 and unknown.headers["X-Proxy-Report"] == "customer_credits"
    allowed = await proxy.get(REPORT, headers=auth(KEY), params={"format": "json"})
    assert allowed.status == 200
    assert allowed.headers["X-Proxy-Report"] == "customer_credits"


# customer_credits as before, and a handful of others (plain and grouped) through the mock,
# which serves every report.
FUZZ_REPORTS = ["customers", "invoices", "customers.grouped", "attendances.grouped"]
FUZZ_PLAN = [
    (REPORT_PATHS[0], GenerationMode.POSITIVE, 100),
    (REPORT_PATHS[0], GenerationMode.NEGATIVE, 60),
    (REPORT_PATHS[1], GenerationMode.POSITIVE, 30),
    *(
        step
        for report in FUZZ_REPORTS
        for step in (
            (ENDPOINTS[report].path, GenerationMode.POSITIVE, 30),
            (ENDPOINTS[report].path, GenerationMode.NEGATIVE, 15),
            (ENDPOINTS[report].doubled_path, GenerationMode.POSITIVE, 5),
        )
    ),
    # A list and a retrieve (random ids: mostly TeamUp's own 404, passed on).
    ("/api/v2/events", GenerationMode.POSITIVE, 30),
    ("/api/v2/events", GenerationMode.NEGATIVE, 15),
    ("/api/v2/customers/{id}", GenerationMode.POSITIVE, 15),
    ("/api/v2/customers/{id}", GenerationMode.NEGATIVE, 10),
]


def fuzz_with_schemathesis(
    base_url: str, plan: list[tuple[str, GenerationMode, int]]
) -> Counter[tuple[str, int]]:
    """Generated requests (valid, then deliberately invalid) per planned path; every answer
    must be a documented status, content type, header set and body schema, never 5xx."""
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    statuses: Counter[tuple[str, int]] = Counter()
    for path, mode, examples in plan:
        operation = schema[path]["GET"]

        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=base_url, headers=auth(), timeout=10)
            statuses[case.path.split("/")[-2], response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        run()
    return statuses


@pytest.mark.slow
async def test_schemathesis_finds_no_5xx_and_no_schema_violation() -> None:
    # The mock and the proxy are processes of their own, so the fuzz runs in this thread.
    mock = await MockProcess().start()
    # WARNING: no access log, so the stderr pipe stays small while the fuzz blocks the loop.
    proxy = ProxyProcess(mock.url, workers=1, log_level="WARNING")
    await proxy.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{proxy.url}/openapi.json") as response,
        ):
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.json() == DOCUMENT
        statuses = fuzz_with_schemathesis(proxy.url, FUZZ_PLAN)
        calls = await mock.calls()
    finally:
        assert await proxy.stop() == 0
        await mock.stop()
    for report in ("customer_credits", *FUZZ_REPORTS):
        assert statuses[report, 200] > 10 and statuses[report, 400] > 5, statuses
    assert statuses["v2", 200] > 10 and statuses["v2", 400] > 5, statuses  # /api/v2/events
    assert all(status < 500 for _, status in statuses), statuses
    assert b"Traceback" not in proxy.stderr and b"unhandled" not in proxy.stderr
    assert TOKEN.encode() not in proxy.stderr
    assert calls > 0
