"""`GET /openapi.json`: served, valid OpenAPI 3.1, faithful to the query contract, and what a
real proxy answers conforms to it (schemathesis, positive and negative cases)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from aiohttp.test_utils import TestServer
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

from proxy.core.contract import INT_CEILING
from proxy.testing.mock import MockState
from tests.conftest import MakeProxy
from tests.e2e import CREDITS, REPORT, auth
from tests.procs import ProxyProcess

DOCUMENT: dict[str, Any] = json.loads(
    resources.files("proxy.spec").joinpath("proxy-openapi.json").read_bytes()
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


def resolve(node: dict[str, Any]) -> dict[str, Any]:
    """Follow one local `$ref`."""
    while "$ref" in node:
        target: Any = DOCUMENT
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def report_parameters(path: str = REPORT) -> dict[str, dict[str, Any]]:
    operation = DOCUMENT["paths"][path]["get"]
    return {p["name"]: p for p in (resolve(ref) for ref in operation["parameters"])}


async def test_the_document_is_served(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    response = await proxy.get("/openapi.json")
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOCUMENT


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    validate(DOCUMENT)


def test_every_parameter_follows_the_query_contract() -> None:
    for path in REPORT_PATHS:
        params = report_parameters(path)
        assert set(params) == {*CREDITS.params, "X-Request-ID"}
        for name, rule in CREDITS.params.items():
            param = params[name]
            assert param["in"] == "query" and not param.get("required", False)
            schema = param["schema"]
            if rule.array:
                assert schema["type"] == "array"
                assert (param["style"], param["explode"]) == ("form", True)
                schema = schema["items"]
            if rule.kind == "int":
                assert schema["type"] == "integer"
                assert schema.get("minimum") == rule.minimum or (
                    rule.minimum is None and schema["minimum"] == 0
                )
                assert schema["maximum"] == (INT_CEILING if rule.maximum is None else rule.maximum)
            elif rule.kind == "datetime":
                assert schema == {"type": "string", "format": "date-time"}
            elif rule.kind == "enum":
                allowed = {c for c in rule.choices}
                if rule.descending_prefix:
                    allowed |= {"-" + c for c in rule.choices}
                assert {v.lower() for v in schema["enum"]} == allowed
            else:
                assert schema["type"] == "string"
                assert schema["maxLength"] == rule.max_length
            if rule.default is not None:
                assert param["schema"]["default"] == rule.default
    limits = {n: p["schema"] for n, p in report_parameters().items()}
    assert (limits["limit"]["minimum"], limits["limit"]["maximum"]) == (1, 100)
    assert (limits["page_size"]["minimum"], limits["page_size"]["maximum"]) == (0, 100)
    assert limits["page"]["minimum"] == 1 and limits["offset"]["minimum"] == 0
    assert limits["id_gt"]["minimum"] == 0 and limits["customers"]["items"]["minimum"] == 1
    assert set(limits["format"]["enum"]) == {"csv", "json", "CSV", "JSON"}


def test_every_upstream_parameter_is_documented() -> None:
    import yaml

    upstream = yaml.safe_load(UPSTREAM_SPEC.read_text())
    names = {
        p["name"] for p in upstream["paths"]["/reports/customer_credits/data"]["get"]["parameters"]
    }
    assert names <= set(report_parameters())  # fmt: skip


def test_responses_security_and_headers_are_documented() -> None:
    schemes = DOCUMENT["components"]["securitySchemes"]
    assert {(s["type"], s["in"], s["name"]) for s in schemes.values()} == {
        ("apiKey", "header", "Authorization"),
        ("apiKey", "header", "X-API-Key"),
    }
    for path in REPORT_PATHS:
        operation = DOCUMENT["paths"][path]["get"]
        assert operation["security"] == [{"TokenAuth": []}, {"ApiKeyAuth": []}]
        responses = {code: resolve(r) for code, r in operation["responses"].items()}
        assert set(responses) == {
            "200", "400", "401", "404", "405", "414", "429", "502", "503", "504"
        }  # fmt: skip
        assert set(responses["200"]["content"]) == {"application/json", "text/csv"}
        ok_headers = set(responses["200"]["headers"])
        assert {"Cache-Status", "Age", "X-Request-ID", "X-Proxy-Canonical-Query"} <= ok_headers
        assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(responses["429"]["headers"])
        assert "Retry-After" in responses["503"]["headers"]
        for code, response in responses.items():
            if code != "200":
                schema = resolve(response["content"]["application/json"]["schema"])
                if "allOf" in schema:
                    assert "field_errors" in schema["allOf"][1]["required"]
                    schema = resolve(schema["allOf"][0])
                assert schema["required"] == ["code", "type", "message"]
                assert "field_errors" in schema["properties"]
    assert "delete" in DOCUMENT["paths"]["/admin/cache"]
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "get" in DOCUMENT["paths"][path]


def fuzz_with_schemathesis(base_url: str) -> Counter[int]:
    """Generated requests (valid, then deliberately invalid) for both report paths; every
    answer must be a documented status, content type, header set and body schema, never 5xx."""
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    statuses: Counter[int] = Counter()
    plan = [
        (REPORT_PATHS[0], GenerationMode.POSITIVE, 100),
        (REPORT_PATHS[0], GenerationMode.NEGATIVE, 60),
        (REPORT_PATHS[1], GenerationMode.POSITIVE, 30),
    ]
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
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        run()
    return statuses


@pytest.mark.slow
async def test_schemathesis_finds_no_5xx_and_no_schema_violation(
    mock_server: TestServer, mock_state: MockState
) -> None:
    upstream = str(mock_server.make_url("")).rstrip("/")
    # WARNING: no access log, so the stderr pipe stays small while the fuzz runs in a thread.
    proxy = ProxyProcess(upstream, workers=1, log_level="WARNING")
    await proxy.start()
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{proxy.url}/openapi.json") as response,
        ):
            assert response.status == 200
            assert response.content_type == "application/json"
            assert await response.json() == DOCUMENT
        statuses = await asyncio.to_thread(fuzz_with_schemathesis, proxy.url)
    finally:
        assert await proxy.stop() == 0
    assert statuses[200] > 30 and statuses[400] > 10, statuses
    assert all(status < 500 for status in statuses), statuses
    assert mock_state.calls > 0
    assert b"Traceback" not in proxy.stderr and b"unhandled" not in proxy.stderr
