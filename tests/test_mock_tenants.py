"""The mock TeamUp with several credentials and providers (issue 22 item 6), through real HTTP:
who may act for which provider (401/400/403/200), each provider's own data and writes, the
recorded credential labels and providers, faults for one credential only, and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from proxy.testing.faults import MockProcess
from proxy.testing.mock import (
    MOCK_STATE,
    REPORT_PATH,
    MockState,
    create_mock_app,
    main,
    parse_tenants,
)
from proxy.testing.writes import MOCK_WRITES

Mock = TestClient[web.Request, web.Application]
DEFAULT = "def-token"
TOK_A = "tok-A-secret"  # may act for 101 and 102: "tenant0"
TOK_B = "tok-B-secret"  # may act for 201 only: "tenant1"
TENANTS = {TOK_A: ("101", "102"), TOK_B: ("201",)}
CREDITS = f"{REPORT_PATH}?format=json&limit=20&columns=customer.id,customer.name"
APPS = "/api/v2/applications"


@pytest.fixture
async def mock(aiohttp_client: AiohttpClient) -> Mock:
    return await aiohttp_client(create_mock_app(DEFAULT, tenants=TENANTS))


def state_of(mock: Mock) -> MockState:
    return mock.app[MOCK_STATE]


def headers(token: str, provider: str | None = None) -> dict[str, str]:
    out = {"Authorization": f"Token {token}", "Content-Type": "application/json"}
    if provider is not None:
        out["TeamUp-Provider-ID"] = provider
    return out


async def call(
    mock: Mock,
    token: str,
    provider: str | None = None,
    path: str = CREDITS,
    method: str = "GET",
    body: bytes | None = None,
) -> tuple[int, Any]:
    response = await mock.request(method, path, data=body, headers=headers(token, provider))
    return response.status, (await response.json() if response.content_length else None)


# --- who may act for which provider -------------------------------------------------------------


@pytest.mark.parametrize("token", ["nope", TOK_A + "x", ""])
async def test_an_unknown_credential_is_401_as_before(mock: Mock, token: str) -> None:
    status, body = await call(mock, token, "101")
    assert (status, body) == (401, {"detail": "Invalid token."})
    assert state_of(mock).requests[-1].credential is None


async def test_several_providers_and_no_header_is_400_in_teamups_shape(mock: Mock) -> None:
    status, body = await call(mock, TOK_A)
    assert status == 400
    assert body == {
        "code": "parameter_invalid",
        "type": "invalid_request_error",
        "message": "Invalid value for parameter 'TeamUp-Provider-ID'.",
        "field_errors": {"TeamUp-Provider-ID": ["This field is required."]},
    }


@pytest.mark.parametrize("value", ["abc", "-101", "10 1", "101,102", "1e2", " "])
async def test_a_malformed_provider_id_is_400(mock: Mock, value: str) -> None:
    response = await mock.get(
        CREDITS, headers={"Authorization": f"Token {TOK_B}", "TeamUp-Provider-ID": value}
    )
    assert response.status == 400
    body = await response.json()
    assert body["field_errors"] == {"TeamUp-Provider-ID": ["A valid integer is required."]}


@pytest.mark.parametrize(
    ("token", "provider"), [(TOK_A, "201"), (TOK_B, "101"), (TOK_B, "7"), (TOK_B, "9" * 5000)]
)
async def test_a_provider_the_credential_may_not_act_for_is_403(
    mock: Mock, token: str, provider: str
) -> None:
    status, body = await call(mock, token, provider)
    assert (status, body) == (403, {"detail": "You do not have permission to perform this action."})
    assert state_of(mock).requests[-1].provider == provider


async def test_one_provider_and_no_header_is_that_provider(mock: Mock) -> None:
    without = await call(mock, TOK_B)
    with_header = await call(mock, TOK_B, "201")
    assert without[0] == 200
    assert without == with_header
    assert [r.provider for r in state_of(mock).requests] == ["201", "201"]


async def test_leading_zeros_name_the_same_provider(mock: Mock) -> None:
    assert await call(mock, TOK_B, "0201") == await call(mock, TOK_B, "201")


async def test_the_default_token_without_providers_accepts_any_header_as_before(
    aiohttp_client: AiohttpClient, mock: Mock
) -> None:
    plain = await aiohttp_client(create_mock_app(DEFAULT))
    today = await call(plain, DEFAULT)
    assert today[0] == 200
    for provider in (None, "101", "999", "not-digits"):
        assert await call(mock, DEFAULT, provider) == today
        assert await call(plain, DEFAULT, provider) == today
    # Recorded as sent when well formed; the data stays the default's.
    assert [r.provider for r in state_of(mock).requests] == [None, "101", "999", None]


async def test_providers_for_the_single_token(aiohttp_client: AiohttpClient) -> None:
    one = await aiohttp_client(create_mock_app(DEFAULT, providers=["5"]))
    status, body = await call(one, DEFAULT)
    assert status == 200
    assert await call(one, DEFAULT, "5") == (status, body)
    assert (await call(one, DEFAULT, "6"))[0] == 403
    two = await aiohttp_client(create_mock_app(DEFAULT, providers=["5", "6"]))
    assert (await call(two, DEFAULT))[0] == 400
    assert await call(two, DEFAULT, "5") == (status, body)  # provider 5's data, either way
    assert state_of(one).requests[0].credential == "default"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"providers": []},
        {"providers": ["x1"]},
        {"tenants": {"t": []}},
        {"tenants": {"t": ["12", "-3"]}},
    ],
)
def test_provider_ids_are_digits_and_at_least_one(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="provider id"):
        create_mock_app(DEFAULT, **kwargs)


# --- each provider its own data -----------------------------------------------------------------


async def test_each_provider_answers_its_own_report_rows(mock: Mock) -> None:
    answers = {p: await call(mock, TOK_A, p) for p in ("101", "102")}
    answers["201"] = await call(mock, TOK_B, "201")
    answers["default"] = await call(mock, DEFAULT)
    assert all(status == 200 for status, _ in answers.values())
    customers = {
        who: tuple((r["customer"]["id"], r["customer"]["name"]) for r in body["rows"])
        for who, (_, body) in answers.items()
    }
    assert len(set(customers.values())) == 4, "every provider's customers differ"
    assert await call(mock, TOK_A, "101") == answers["101"], "the same provider, the same data"


async def test_each_provider_answers_its_own_objects(mock: Mock) -> None:
    first = (await call(mock, TOK_A, "101", APPS))[1]["results"]
    second = (await call(mock, TOK_A, "102", APPS))[1]["results"]
    assert first != second
    assert (await call(mock, TOK_A, "101", APPS))[1]["results"] == first


async def test_the_default_data_is_todays(aiohttp_client: AiohttpClient, mock: Mock) -> None:
    plain = await aiohttp_client(create_mock_app(DEFAULT))
    first = (await call(plain, DEFAULT, path=APPS))[1]["results"][0]["id"]
    for path in (CREDITS, APPS, f"{APPS}/{first}"):
        assert await call(mock, DEFAULT, path=path) == await call(plain, DEFAULT, path=path)


async def test_writes_change_only_their_providers_data(mock: Mock) -> None:
    listed = (await call(mock, TOK_A, "101", APPS))[1]
    first = listed["results"][0]["id"]
    renamed = await call(mock, TOK_A, "101", f"{APPS}/{first}", "PATCH", b'{"name": "Only 101"}')
    assert renamed[0] == 200
    assert (await call(mock, TOK_A, "101", f"{APPS}/{first}"))[1]["name"] == "Only 101"
    assert (await call(mock, TOK_A, "102", f"{APPS}/{first}"))[1]["name"] != "Only 101"
    assert (await call(mock, DEFAULT, None, f"{APPS}/{first}"))[1]["name"] != "Only 101"
    deleted = await call(mock, TOK_A, "102", f"{APPS}/{first}", "DELETE")
    assert deleted[0] == 204
    assert (await call(mock, TOK_A, "102", f"{APPS}/{first}"))[0] == 404
    assert (await call(mock, TOK_A, "101", f"{APPS}/{first}"))[0] == 200
    assert (await call(mock, TOK_A, "101", APPS))[1]["count"] == listed["count"]
    assert (await call(mock, TOK_A, "102", APPS))[1]["count"] == listed["count"] - 1
    received = mock.app[MOCK_WRITES].received
    assert [(w.method, w.credential, w.provider) for w in received] == [
        ("PATCH", "tenant0", "101"),
        ("DELETE", "tenant0", "102"),
    ]
    assert len(mock.app[MOCK_WRITES].received_by(provider="102")) == 1
    assert all(TOK_A not in str(w.credential) for w in received)


async def test_a_refused_write_changes_nothing(mock: Mock) -> None:
    first = (await call(mock, TOK_B, "201", APPS))[1]["results"][0]["id"]
    assert (await call(mock, TOK_B, "101", f"{APPS}/{first}", "DELETE"))[0] == 403
    assert (await call(mock, TOK_A, None, f"{APPS}/{first}", "DELETE"))[0] == 400
    assert (await call(mock, TOK_A, "101", f"{APPS}/{first}"))[0] == 200
    assert (await call(mock, TOK_B, "201", f"{APPS}/{first}"))[0] == 200


# --- recording ----------------------------------------------------------------------------------


async def test_calls_are_recorded_by_label_and_provider_never_the_token(mock: Mock) -> None:
    await call(mock, TOK_A, "101")
    await call(mock, TOK_A, "102")
    await call(mock, TOK_A, "102", APPS)
    await call(mock, TOK_B)
    await call(mock, DEFAULT)
    await call(mock, "unknown", "101")
    state = state_of(mock)
    assert state.label_of(TOK_A) == "tenant0"
    assert state.label_of(TOK_B) == "tenant1"
    assert state.label_of(DEFAULT) == "default"
    assert state.label_of("unknown") is None
    assert state.calls_by(credential="tenant0") == 3
    assert state.calls_by(credential="tenant0", provider="102") == 2
    assert state.calls_by(provider="101") == 2  # tenant0's, and the unknown caller's 401
    assert state.calls_by(credential="tenant1") == state.calls_by(provider="201") == 1
    assert state.calls_by(credential="default") == 1
    assert state.calls_by() == state.calls == 6
    assert [r.operation for r in state.requests_by(provider="102")][-1] == "applications_list"
    body = await (await mock.get("/_mock/state")).json()
    assert body["credential_calls"] == {"tenant0": 3, "tenant1": 1, "default": 1}
    assert body["provider_calls"] == {"101": 2, "102": 2, "201": 1}
    labels = {r["credential"] for r in body["requests"]}
    assert labels == {"tenant0", "tenant1", "default", None}
    assert all(token not in repr(state.credentials()) for token in (TOK_A, TOK_B, DEFAULT))


async def test_a_tenant_with_the_default_token_takes_its_place(
    aiohttp_client: AiohttpClient,
) -> None:
    mock = await aiohttp_client(create_mock_app(DEFAULT, tenants={DEFAULT: ["9"], TOK_A: ["8"]}))
    assert state_of(mock).label_of(DEFAULT) == "tenant0"
    assert [c.label for c in state_of(mock).credentials()] == ["tenant0", "tenant1"]
    assert (await call(mock, DEFAULT, "8"))[0] == 403


# --- faults for one credential ------------------------------------------------------------------


async def test_a_fault_for_one_credential_leaves_the_others_alone(mock: Mock) -> None:
    fault = {"status": 429, "retry_after": 7, "credential": "tenant1", "times": 2}
    response = await mock.put("/_mock/faults", json=fault)
    assert response.status == 200
    assert (await response.json())["credential"] == "tenant1"
    assert (await call(mock, TOK_A, "101"))[0] == 200
    throttled = await mock.get(CREDITS, headers=headers(TOK_B))
    assert throttled.status == 429
    assert throttled.headers["Retry-After"] == "7"
    assert (await call(mock, DEFAULT))[0] == 200
    assert (await call(mock, TOK_A, "102"))[0] == 200
    assert (await call(mock, TOK_B))[0] == 429  # `times` counts only tenant1's calls
    assert (await call(mock, TOK_B))[0] == 200
    assert state_of(mock).faults.credential == "tenant1"


async def test_a_fault_for_one_provider(mock: Mock) -> None:
    response = await mock.put(
        "/_mock/faults", json={"status": 503, "provider": "102", "extra_headers": {"X-F": "1"}}
    )
    assert response.status == 200
    ok = await mock.get(CREDITS, headers=headers(TOK_A, "101"))
    assert ok.status == 200
    assert "X-F" not in ok.headers
    failed = await mock.get(CREDITS, headers=headers(TOK_A, "102"))
    assert failed.status == 503
    assert failed.headers["X-F"] == "1"
    await mock.post("/_mock/reset")
    assert (await call(mock, TOK_A, "102"))[0] == 200


@pytest.mark.parametrize("bad", [{"credential": 3}, {"provider": "abc"}, {"provider": 101}])
async def test_fault_filters_are_checked(mock: Mock, bad: dict[str, Any]) -> None:
    assert (await mock.put("/_mock/faults", json=bad)).status == 400


async def test_a_write_fault_for_one_credential(mock: Mock) -> None:
    fault = {"when": "before", "status": 500, "credential": "tenant0", "times": 1}
    assert (await mock.put("/_mock/write-faults", json=fault)).status == 200
    first = (await call(mock, TOK_B, "201", APPS))[1]["results"][0]["id"]
    body = b'{"name": "B"}'
    assert (await call(mock, TOK_B, "201", f"{APPS}/{first}", "PATCH", body))[0] == 200
    assert (await call(mock, TOK_A, "101", f"{APPS}/{first}", "PATCH", body))[0] == 500
    assert (await call(mock, TOK_A, "101", f"{APPS}/{first}"))[1]["name"] != "B"
    assert (await call(mock, TOK_A, "101", f"{APPS}/{first}", "PATCH", body))[0] == 200


# --- the command line ---------------------------------------------------------------------------


def test_tenants_from_json_or_a_file(tmp_path: Path) -> None:
    text = '{"a": ["101", 102], "b": "201"}'
    assert parse_tenants(text) == {"a": ("101", "102"), "b": ("201",)}
    file = tmp_path / "tenants.json"
    file.write_text(text)
    assert parse_tenants(f"@{file}") == parse_tenants(text)


@pytest.mark.parametrize("text", ["[]", "{}", "{x", '{"a": []}', '{"a": ["x"]}', '{"a": {}}'])
def test_bad_tenants_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_tenants(text)


@pytest.mark.parametrize(
    "flags", [["--tenants", "{x"], ["--tenants", "@/nonexistent/t.json"], ["--providers", "1,a"]]
)
def test_the_cli_refuses_bad_flags(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--token", "t", "--port", "0", *flags])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err


async def test_a_mock_process_with_tenants() -> None:
    process = await MockProcess("plain", tenants={TOK_A: ["101", "102"]}, providers=["5"]).start()
    try:
        url = f"{process.url}{CREDITS}"
        for token, provider, expected in [
            (TOK_A, "101", 200),
            (TOK_A, None, 400),
            (TOK_A, "5", 403),
            ("plain", None, 200),
            ("plain", "101", 403),
        ]:
            async with process.http.get(url, headers=headers(token, provider)) as response:
                assert response.status == expected, (token, provider)
        assert await process.calls_by(credential="tenant0") == 3
        assert await process.calls_by(credential="default", provider="5") == 1
        await process.faults(status=429, credential="tenant0")
        async with process.http.get(url, headers=headers(TOK_A, "102")) as response:
            assert response.status == 429
        async with process.http.get(url, headers=headers("plain")) as response:
            assert response.status == 200
    finally:
        await process.stop()
