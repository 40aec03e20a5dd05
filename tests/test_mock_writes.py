"""The mock TeamUp's writes (proxy/testing/writes.py), called directly: every documented write
answers, bodies are checked loosely, plain writes change the data, faults fail a write before
or after it is done."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.core.operations import load_operations
from proxy.testing.e2e import TOKEN
from proxy.testing.mock import create_mock_app
from tests.test_writes import example_path

Mock = TestClient[web.Request, web.Application]
H = {"Authorization": f"Token {TOKEN}", "Content-Type": "application/json"}


@pytest.fixture
async def mock(aiohttp_client: AiohttpClient) -> Mock:
    return await aiohttp_client(create_mock_app(TOKEN))


async def json_of(mock: Mock, method: str, path: str, body: bytes | None = None) -> Any:
    response = await mock.request(method, path, data=body, headers=H)
    return response.status, (await response.json() if response.content_length else None)


async def test_every_documented_write_answers(mock: Mock) -> None:
    for op in load_operations().values():
        if op.is_read:
            continue
        response = await mock.request(op.method, example_path(op), data=b"{}", headers=H)
        assert response.status not in (405, 500), (op.operation_id, response.status)
        if response.status == 404:  # an id the data does not hold, in TeamUp's shape
            assert await response.json() == {"detail": "Not found."}
    state = await (await mock.get("/_mock/writes")).json()
    assert len(state) == 191


async def test_a_body_must_be_a_json_object(mock: Mock) -> None:
    assert (await json_of(mock, "PATCH", "/api/v2/customers/377001", b"[1]"))[0] == 400
    assert (await json_of(mock, "PATCH", "/api/v2/customers/377001", b"{x"))[0] == 400
    unauthorised = await mock.patch("/api/v2/customers/377001", data=b"{}")
    assert unauthorised.status == 401


async def test_update_and_delete_change_what_reads_see(mock: Mock) -> None:
    path = "/api/v2/applications"
    status, listed = await json_of(mock, "GET", path)
    assert status == 200
    first = listed["results"][0]["id"]
    assert (await json_of(mock, "PATCH", f"{path}/{first}", b'{"name": "Renamed"}'))[0] == 200
    assert (await json_of(mock, "GET", f"{path}/{first}"))[1]["name"] == "Renamed"
    gone = await mock.delete(f"{path}/{first}", headers=H)
    assert gone.status == 204
    assert (await json_of(mock, "GET", f"{path}/{first}"))[0] == 404
    _, after = await json_of(mock, "GET", path)
    assert after["count"] == listed["count"] - 1
    assert first not in [item["id"] for item in after["results"]]
    assert (await json_of(mock, "PATCH", f"{path}/{first}", b"{}"))[0] == 404


@pytest.mark.parametrize("when", ["before", "after"])
async def test_faults_fail_a_write_before_or_after_it_is_done(mock: Mock, when: str) -> None:
    fault = await mock.put("/_mock/write-faults", json={"when": when, "status": 503, "times": 1})
    assert fault.status == 200
    status, _ = await json_of(mock, "PATCH", "/api/v2/customers/377001", b'{"first_name": "Q"}')
    assert status == 503
    _, customer = await json_of(mock, "GET", "/api/v2/customers/377001")
    assert (customer["first_name"] == "Q") == (when == "after")
    # `times` spent: the next write goes through.
    assert (await json_of(mock, "PATCH", "/api/v2/customers/377001", b"{}"))[0] == 200
    assert (await mock.delete("/_mock/writes")).status == 204
    assert await (await mock.get("/_mock/writes")).json() == []
