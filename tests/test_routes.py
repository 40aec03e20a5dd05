"""Every report behind the proxy, as a caller and an operator see it: routes, 404s that never
reach TeamUp, per-client report lists, per-report switches and lifetimes, per-report purge, and
the report named in headers, metrics and access logs."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY, REPORT, FakeClock, auth
from proxy.testing.mock import MockState
from proxy.web.auth import hash_key
from tests.conftest import LogLines, MakeProxy

CUSTOMERS = "/api/v2/reports/customers/data"
GROUPED = "/api/v2/reports/customers.grouped/data"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v2/reports/nope/data",
        "/api/v2/reports/customer_credits/data/extra",
        "/api/v2/reports/customers",
        "/api/v2/reports/customers.grouped",
        "/api/v2/reports/%2e%2e/data",
        "/api/v2/reports/..%2Fcustomers/data",
        "/api/v2/reports/customers%2Fdata/data",
        "/api/v2/reports/CUSTOMERS/data",
        "/api/v2/reports//data",
        "/api/v2/reports/customers.grouped.grouped/data",
        "/api/v1/reports/customers/data",
    ],
)
async def test_anything_but_a_documented_report_is_a_404_that_never_reaches_teamup(
    make_proxy: MakeProxy, mock_state: MockState, path: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(path + "?format=json", headers=auth())
    assert response.status == 404
    body = await response.json()
    assert body["code"] == "not_found" and body["type"] == "invalid_request_error"
    assert mock_state.calls == 0


async def test_every_report_has_both_paths(make_proxy: MakeProxy, mock_state: MockState) -> None:
    proxy = await make_proxy()
    for path in (CUSTOMERS, CUSTOMERS.replace("/v2/", "/v2//", 1), GROUPED):
        # An invalid query proves the route and its contract without calling TeamUp.
        response = await proxy.get(path + "?is_active=maybe", headers=auth())
        assert response.status == 400, path
        assert response.headers["X-Proxy-Report"] == path.split("/")[-2]
        assert "is_active" in (await response.json())["field_errors"]
    assert mock_state.calls == 0


async def test_a_parameter_of_another_report_is_unknown_here(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(REPORT + "?is_active=true&customers=1", headers=auth())
    assert response.status == 400
    assert (await response.json())["field_errors"] == {"is_active": ["Unknown parameter."]}
    response = await proxy.get(CUSTOMERS + "?customers=1", headers=auth())
    assert (await response.json())["field_errors"] == {"customers": ["Unknown parameter."]}
    assert mock_state.calls == 0


async def test_grouped_without_columns_is_a_400_naming_columns(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(GROUPED + "?format=json", headers=auth())
    assert response.status == 400
    body = await response.json()
    assert body["field_errors"] == {"columns": ["This parameter is required."]}
    assert body["message"] == "Invalid query parameter: columns."
    assert mock_state.calls == 0


async def test_switched_off_reports_are_not_routed(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy(reports_enabled="customer_credits,invoices")
    assert (await proxy.get(CUSTOMERS + "?is_active=maybe", headers=auth())).status == 404
    assert (await proxy.get(GROUPED, headers=auth())).status == 404
    assert (await proxy.get("/api/v2/reports/invoices/data?x=1", headers=auth())).status == 400
    response = await proxy.get(REPORT + "?format=json", headers=auth())
    assert response.status == 200
    assert mock_state.calls == 1


async def test_a_client_limited_to_some_reports_gets_403_elsewhere(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    clients = {
        "billing": {"key_sha256": hash_key(KEY), "rate": "2/minute", "reports": ["customers"]},
        "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "1000/minute"},
    }
    proxy = await make_proxy(clients=clients)
    for _ in range(3):  # a refused report costs nothing of the caller's rate either
        response = await proxy.get(REPORT + "?format=json", headers=auth())
        assert response.status == 403
        body = await response.json()
        assert body["code"] == "permission_denied"
        assert body["type"] == "invalid_request_error"
        assert "customer_credits" in body["message"] and "billing" in body["message"]
        assert response.headers["X-Proxy-Report"] == "customer_credits"
    assert mock_state.calls == 0
    allowed = await proxy.get(CUSTOMERS + "?is_active=maybe", headers=auth())
    assert allowed.status == 400  # the report is allowed: it gets as far as the contract
    other = await proxy.get(REPORT + "?format=json", headers=auth(OTHER_KEY))
    assert other.status == 200  # clients without a list read every report
    assert mock_state.calls == 1


def test_unknown_report_names_in_settings_stop_the_proxy() -> None:
    from proxy.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="PROXY_REPORTS_ENABLED: unknown report"):
        load_settings(upstream_token="t", reports_enabled="customers,costumers")
    with pytest.raises(SettingsError, match="unknown report"):
        load_settings(upstream_token="t", reports={"nope": {"cache_ttl": 1}})
    clients = {"a": {"key_sha256": "0" * 64, "reports": ["invoice"]}}
    with pytest.raises(SettingsError, match=r"PROXY_CLIENTS \(a\.reports\)"):
        load_settings(upstream_token="t", clients=clients)


async def test_a_report_has_its_own_lifetimes(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    clock = FakeClock()
    client = aioredis.Redis.from_url(redis_url)
    proxy = await make_proxy(
        redis_client=client,
        clock=clock,
        cache_ttl=300,
        reports={"customer_credits": {"cache_ttl": 5, "cache_stale_ttl": 10}},
    )
    first = await proxy.get(REPORT + "?format=json", headers=auth())
    assert first.status == 200 and mock_state.calls == 1
    key = next(iter([k async for k in client.scan_iter(match="teamup-proxy:c:*")]))
    assert 14_000 < await client.pttl(key) <= 15_000  # fresh 5 s + stale 10 s
    clock.advance(6)
    stale = await proxy.get(REPORT + "?format=json", headers=auth())
    assert "fwd=stale" in stale.headers["Cache-Status"]
    await client.aclose()


async def test_purge_one_entry_one_report_or_everything(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    client = aioredis.Redis.from_url(redis_url)
    proxy = await make_proxy(redis_client=client)
    admin = auth(ADMIN_KEY)
    for query in ("?format=json", "?format=json&limit=3", "?limit=4"):
        assert (await proxy.get(REPORT + query, headers=auth())).status == 200
    assert mock_state.calls == 3

    one = await proxy.delete(
        "/admin/cache/customer_credits/data?limit=03&format=JSON", headers=admin
    )
    assert one.status == 200
    assert await one.json() == {
        "purged": 1,
        "report": "customer_credits",
        "canonical_query": "format=json&limit=3",
        "shared": True,
    }
    assert (
        (await proxy.get(REPORT + "?format=json", headers=auth()))
        .headers["Cache-Status"]
        .startswith("teamup-proxy; hit")
    )

    everything_of_one = await proxy.delete("/admin/cache/customer_credits", headers=admin)
    assert await everything_of_one.json() == {
        "purged": 2,
        "report": "customer_credits",
        "shared": True,
    }
    assert [k async for k in client.scan_iter(match="teamup-proxy:c:*")] == []

    unknown = await proxy.delete("/admin/cache/nope", headers=admin)
    assert unknown.status == 404
    bad = await proxy.delete("/admin/cache/customers/data?is_active=maybe", headers=admin)
    assert bad.status == 400
    assert (await proxy.delete("/admin/cache/customers", headers=auth())).status == 403
    await client.aclose()


async def test_the_report_is_in_metrics_and_access_logs(
    make_proxy: MakeProxy, json_logs: LogLines
) -> None:
    proxy = await make_proxy()
    assert (await proxy.get(REPORT + "?format=json", headers=auth())).status == 200
    assert (await proxy.get(GROUPED, headers=auth())).status == 400
    text = await (await proxy.get("/metrics")).text()
    assert (
        'teamup_proxy_requests_total{cache="miss",provider="none",report="customer_credits",'
        'route="report",status="200",upstream="default"} 1.0'
    ) in text
    assert 'report="customers.grouped",route="report",status="400"' in text
    assert (
        'teamup_proxy_upstream_requests_total{provider="none",report="customer_credits",'
        'status="200",upstream="default"} 1.0' in text
    )
    access = [r for r in json_logs.records() if r.get("logger") == "teamup_proxy.access"]
    assert [r["report"] for r in access] == ["customer_credits", "customers.grouped"]


async def test_every_report_is_reachable_validated_and_cached_under_its_own_key(
    make_proxy: MakeProxy, mock_state: MockState, redis_url: str
) -> None:
    from proxy.core.operations import load_operations

    client = aioredis.Redis.from_url(redis_url)
    proxy = await make_proxy(redis_client=client)
    endpoints = load_operations().reports()
    for report, endpoint in endpoints.items():
        columns = endpoint.contract.columns
        query = "format=json&limit=2"
        if endpoint.grouped:
            query += f"&columns={columns[0]}"
        first = await proxy.get(f"{endpoint.path}?{query}", headers=auth())
        assert first.status == 200, (report, await first.text())
        assert first.headers["X-Proxy-Report"] == report
        assert "fwd=uri-miss" in first.headers["Cache-Status"]
        body = await first.json()
        assert set(body) == {"total", "column_headers", "rows"}
        respelled = query.replace("limit=2", "limit=02").replace("format=json", "format=JSON")
        again = await proxy.get(f"{endpoint.doubled_path}?{respelled}", headers=auth())
        assert again.headers["Cache-Status"].startswith("teamup-proxy; hit"), report
        assert await again.json() == body
    assert mock_state.calls == len(endpoints) == 32
    assert [r.path for r in mock_state.requests] == [e.path for e in endpoints.values()]
    assert len([k async for k in client.scan_iter(match="teamup-proxy:c:*")]) == 32
    await client.aclose()
