"""The spine end to end: authentication, credential injection, header allowlists, error mapping."""

from __future__ import annotations

import logging

import pytest

from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY, REPORT, TOKEN, auth
from proxy.testing.mock import MockState
from tests.conftest import LogLines, MakeProxy


async def test_credential_is_injected_and_caller_key_never_forwarded(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(REPORT + "?format=json&limit=2", headers=auth())
    assert response.status == 200
    body = await response.json()
    assert len(body["rows"]) == 2
    assert mock_state.calls == 1
    sent = mock_state.requests[0].headers
    assert sent["Authorization"] == f"Token {TOKEN}"
    assert all(KEY not in value for value in sent.values())
    assert "X-API-Key" not in sent


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Token {KEY}"},
        {"Authorization": f"Bearer {KEY}"},
        {"X-API-Key": KEY},
        {"Authorization": f"token   {KEY}  "},
    ],
    ids=["token", "bearer", "x-api-key", "lowercase-scheme-extra-spaces"],
)
async def test_three_caller_header_styles(
    make_proxy: MakeProxy, mock_state: MockState, headers: dict[str, str]
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(REPORT + "?format=json", headers=headers)
    assert response.status == 200
    assert mock_state.calls == 1


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Token wrong-key"},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Token"},
        {"X-API-Key": ""},
        {"Authorization": f"Token {TOKEN}"},  # the upstream credential is not a caller key
        {"Authorization": f"Token {ADMIN_KEY}"},
    ],
    ids=["none", "wrong", "basic", "empty-token", "empty-x-api-key", "upstream-token", "admin"],
)
async def test_unknown_callers_get_401_and_no_upstream_call(
    make_proxy: MakeProxy, mock_state: MockState, headers: dict[str, str]
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(REPORT + "?format=json", headers=headers)
    assert response.status == 401
    body = await response.json()
    assert body["code"] == "not_authenticated"
    assert body["type"] == "invalid_request_error"
    assert response.headers["WWW-Authenticate"].startswith("Token")
    assert mock_state.calls == 0


async def test_doubled_slash_path_is_the_same_report(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    first = await proxy.get(REPORT + "?format=json", headers=auth())
    second = await proxy.get("/api/v2//reports/customer_credits/data?format=json", headers=auth())
    assert first.status == second.status == 200
    assert await first.read() == await second.read()
    assert mock_state.calls == 1


@pytest.mark.parametrize(
    "path", ["/", "/api/v2/reports", "/api/v2/reports/customer_credits", "/admin", "/x/../etc"]
)
async def test_other_paths_404_in_teamup_shape(
    make_proxy: MakeProxy, mock_state: MockState, path: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(path, headers=auth())
    assert response.status == 404
    assert (await response.json())["code"] == "not_found"
    assert mock_state.calls == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
async def test_other_methods_405_in_teamup_shape(
    make_proxy: MakeProxy, mock_state: MockState, method: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.request(method, REPORT, headers=auth())
    assert response.status == 405
    assert (await response.json())["code"] == "method_not_allowed"
    assert "GET" in response.headers["Allow"]
    assert mock_state.calls == 0


async def test_request_headers_are_allowlisted(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(
        REPORT + "?format=json",
        headers={
            **auth(),
            "X-Request-ID": "trace-123",
            "Cookie": "session=caller",
            "X-Forwarded-For": "10.0.0.1",
            "X-Custom": "1",
            "Accept": "text/html",
            "Accept-Language": "fr",
        },
    )
    assert response.status == 200
    sent = mock_state.requests[0].headers
    assert sent["X-Request-ID"] == "trace-123"
    # Accept follows the canonical format, never the caller: the answer is shared by everyone.
    assert sent["Accept"] == "application/json"
    for name in ("Cookie", "X-Forwarded-For", "X-Custom", "Accept-Language", "X-API-Key"):
        assert name not in sent
    assert response.headers["X-Request-ID"] == "trace-123"


async def test_response_headers_are_allowlisted_and_set_cookie_dropped(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    mock_state.faults.set_cookie = True
    mock_state.faults.extra_headers = {"X-Internal-Node": "db-7", "Link": "<x>; rel=next"}
    proxy = await make_proxy()
    response = await proxy.get(REPORT + "?limit=2", headers=auth())
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/csv")
    assert "attachment" in response.headers["Content-Disposition"]
    for name in ("Set-Cookie", "X-Internal-Node", "X-Mock-Calls", "Link"):
        assert name not in response.headers
    assert response.headers["Server"] == "teamup-proxy"  # not TeamUp's, not our versions


async def test_provider_headers_sent_when_configured(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(upstream_provider_id="42", upstream_request_mode="customer")
    assert (await proxy.get(REPORT, headers=auth())).status == 200
    sent = mock_state.requests[0].headers
    assert sent["TeamUp-Provider-ID"] == "42"
    assert sent["Teamup-Request-Mode"] == "customer"


async def test_provider_headers_absent_by_default(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    assert (await proxy.get(REPORT, headers=auth())).status == 200
    sent = mock_state.requests[0].headers
    assert "TeamUp-Provider-ID" not in sent
    assert "Teamup-Request-Mode" not in sent


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ({"status": 500}, 502, "upstream_error"),
        ({"status": 503}, 502, "upstream_error"),
        ({"drop": True}, 502, "upstream_unreachable"),
        ({"hang": True}, 504, "upstream_timeout"),
        ({"status": 401}, 502, "upstream_credential_rejected"),
        ({"status": 403}, 502, "upstream_credential_rejected"),
    ],
    ids=["500", "503", "drop", "hang", "401", "403"],
)
async def test_upstream_failures_map_to_gateway_errors(
    make_proxy: MakeProxy,
    mock_state: MockState,
    fault: dict[str, object],
    status: int,
    code: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, value in fault.items():
        setattr(mock_state.faults, name, value)
    proxy = await make_proxy(upstream_timeout=0.5)
    with caplog.at_level(logging.DEBUG):
        response = await proxy.get(REPORT + "?format=json", headers=auth())
        text = await response.text()
    assert response.status == status
    body = await response.json()
    assert body["code"] == code
    assert body["type"] == "api_error"
    assert TOKEN not in text and TOKEN not in caplog.text
    assert KEY not in text and KEY not in caplog.text
    if status == 502 and "credential" in code:
        assert "PROXY_UPSTREAM_TOKEN" in body["message"]


async def test_upstream_down_is_502(make_proxy: MakeProxy) -> None:
    from proxy.testing.support import free_port

    proxy = await make_proxy(upstream_url=f"http://127.0.0.1:{free_port()}")
    response = await proxy.get(REPORT, headers=auth())
    assert response.status == 502
    assert (await response.json())["code"] == "upstream_unreachable"


async def test_secret_never_in_bodies_or_logs(
    make_proxy: MakeProxy, mock_state: MockState, json_logs: LogLines
) -> None:
    proxy = await make_proxy()
    seen: list[str] = []
    for fault in (None, 401, 500):
        mock_state.faults.status = fault
        response = await proxy.get(REPORT + f"?format=json&limit={fault or 1}", headers=auth())
        seen.append(await response.text())
        seen.append(str(dict(response.headers)))
        response = await proxy.get(
            REPORT + "?format=json", headers={"Authorization": f"Token {OTHER_KEY}x"}
        )
        seen.append(await response.text())
    everything = "\n".join(seen) + json_logs.text
    assert TOKEN not in everything
    assert KEY not in everything
    clients = {line.get("client") for line in json_logs.records()}
    assert "billing" in clients  # the access log names the client, not its key


async def test_health_endpoints(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    assert (await (await proxy.get("/healthz")).json()) == {"status": "ok"}
    ready = await proxy.get("/readyz")
    assert ready.status == 200
    assert await ready.json() == {
        "status": "ok",
        "checks": {"redis": "embedded", "upstream": "ok"},
    }
    metrics = await proxy.get("/metrics")
    assert metrics.status == 200
    assert "teamup_proxy_requests_total" in await metrics.text()


async def test_head_is_not_a_report_method(make_proxy: MakeProxy, mock_state: MockState) -> None:
    proxy = await make_proxy()
    response = await proxy.head(REPORT, headers=auth())
    assert response.status == 405
    assert mock_state.calls == 0


@pytest.mark.parametrize("shared", [False, True], ids=["local", "redis"])
async def test_closing_the_circuit_is_logged_only_when_it_was_open(
    make_proxy: MakeProxy,
    mock_state: MockState,
    json_logs: LogLines,
    redis_url: str,
    shared: bool,
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url) if shared else None
    proxy = await make_proxy(redis_client=client, upstream_circuit_default=60)
    admin = auth(ADMIN_KEY)

    def closed_lines() -> list[dict[str, object]]:
        return [r for r in json_logs.records() if r.get("event") == "circuit_closed"]

    # Nothing to close: the answer says so and the log says nothing.
    answer = await (await proxy.delete("/admin/circuit", headers=admin)).json()
    assert answer["closed"] is False and answer["open"] is False
    assert closed_lines() == []
    # A 429 opens it; the operator's DELETE closes it: one warning.
    mock_state.faults.status, mock_state.faults.retry_after, mock_state.faults.times = 429, 60, 1
    assert (await proxy.get(REPORT + "?format=json", headers=auth())).status == 503
    assert (await (await proxy.get("/admin/circuit", headers=admin)).json())["open"] is True
    answer = await (await proxy.delete("/admin/circuit", headers=admin)).json()
    assert answer["closed"] is True and answer["open"] is False
    assert [line["message"] for line in closed_lines()] == ["circuit closed by an operator"]
    # Closing it again changes nothing and logs nothing more.
    answer = await (await proxy.delete("/admin/circuit", headers=admin)).json()
    assert answer["closed"] is False
    assert len(closed_lines()) == 1
