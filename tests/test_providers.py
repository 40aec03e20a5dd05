"""Several TeamUp credentials and providers behind one proxy (issue 22): settings, routing by
`TeamUp-Provider-ID`, isolation of every key, a budget and a circuit per credential, labels.

The upstream here is a small TeamUp of its own (`Upstream`): it knows which provider ids each
credential may act for, answers 400/403 like TeamUp when the header does not fit, and records
the credential and provider header of every call, so a test can see exactly what reached it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from multidict import MultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from proxy.core.contract import QueryErrors
from proxy.settings import DEFAULT_UPSTREAM, SettingsError, load_settings
from proxy.testing.e2e import ADMIN_KEY, KEY, OTHER_KEY, auth, make_settings
from proxy.testing.mock import MOCK_STATE, create_mock_app
from proxy.testing.procs import ProxyProcess
from proxy.web.app import KEY_PREFIX, create_app
from proxy.web.auth import hash_key
from tests.test_replicas import http

__all__ = ["http"]  # the client session fixture, shared with test_replicas

NORTH = "north-SECRET-token-1a"
SOUTH = "south-SECRET-token-2b"
UPSTREAMS = {
    "north": {"token": NORTH, "providers": ["101", "102"]},
    "south": {"token": SOUTH, "providers": ["201"]},
}
THIRD_KEY = "ops-key-7q8r9s"
CLIENTS: dict[str, dict[str, Any]] = {
    # billing may act for all three; its default is 101.
    "billing": {
        "key_sha256": hash_key(KEY),
        "rate": "100000/second",
        "providers": ["101", "102", "201"],
    },
    # crm only for 102.
    "crm": {"key_sha256": hash_key(OTHER_KEY), "rate": "100000/second", "providers": ["102"]},
    # ops: no list of its own, so the default upstream's (north: 101, 102).
    "ops": {"key_sha256": hash_key(THIRD_KEY), "rate": "100000/second"},
}
LIST = "/api/v2/customers"
REPORT = "/api/v2/reports/customer_credits/data"


def with_provider(provider: str | None, key: str = KEY) -> dict[str, str]:
    headers = auth(key)
    if provider is not None:
        headers["TeamUp-Provider-ID"] = provider
    return headers


# --- a TeamUp with several credentials and providers ------------------------------------------


@dataclass
class Call:
    """One call TeamUp received: which credential (by name, never the token), which provider."""

    credential: str
    provider: str | None
    method: str
    path: str
    at: float = field(default_factory=time.monotonic)


class Upstream:
    """TeamUp as far as these tests need it: per-credential providers, per-provider data."""

    def __init__(self, credentials: dict[str, tuple[str, tuple[str, ...]]]) -> None:
        # token -> (its name, the providers it may act for)
        self.credentials = credentials
        self.calls: list[Call] = []
        self.limited: set[str] = set()  # credential names answered 429
        self.latency = 0.0
        self.served = 0
        self.leak: str | None = None  # text put in every answer's item (an echo of a secret)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    def by(self, credential: str | None = None, provider: str | None = None) -> list[Call]:
        return [
            c
            for c in self.calls
            if credential in (None, c.credential) and provider in (None, c.provider)
        ]

    async def handle(self, request: web.Request) -> web.Response:
        if not request.path.startswith("/api/"):
            return web.Response(status=404)  # the proxy's connection warm-up
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        known = self.credentials.get(token) if scheme == "Token" else None
        provider = request.headers.get("TeamUp-Provider-ID")
        name = known[0] if known is not None else "unknown"
        self.calls.append(Call(name, provider, request.method, request.path))
        if known is None:
            return web.json_response({"detail": "Invalid token."}, status=401)
        allowed = known[1]
        if provider is None and len(allowed) > 1:
            return web.json_response({"detail": "TeamUp-Provider-ID is required."}, status=400)
        if provider is not None and provider not in allowed:
            return web.json_response({"detail": "Not allowed for this provider."}, status=403)
        if name in self.limited:
            return web.json_response(
                {"detail": "Slow down."}, status=429, headers={"Retry-After": "30"}
            )
        if self.latency:
            await asyncio.sleep(self.latency)
        self.served += 1
        item = {"id": self.served, "provider": provider, "credential": name}
        if self.leak is not None:
            item["note"] = "@leak@"
        if request.method == "POST":
            await request.read()
            return web.json_response(item, status=201)
        if request.path.startswith("/api/v2/reports/"):
            text = f"id,provider\n{self.served},{provider}\n"
            return web.Response(text=text, content_type="text/csv")
        text = json.dumps({"count": 1, "next": None, "previous": None, "results": [item]})
        # The leak goes in as JSON text: raw, or spelled with escapes a JSON parser decodes.
        text = text.replace("@leak@", self.leak or "")
        return web.Response(text=text, content_type="application/json")


def make_upstream() -> Upstream:
    return Upstream({NORTH: ("north", ("101", "102")), SOUTH: ("south", ("201",))})


Proxy = TestClient[web.Request, web.Application]
MakeProxy = Callable[..., Awaitable[Proxy]]


@pytest.fixture
def upstream() -> Upstream:
    return make_upstream()


@pytest.fixture
async def upstream_server(aiohttp_server: AiohttpServer, upstream: Upstream) -> TestServer:
    return await aiohttp_server(upstream.app())


@pytest.fixture
async def make_proxy(
    aiohttp_client: AiohttpClient, upstream_server: TestServer, redis_url: str
) -> MakeProxy:
    """A proxy in front of `upstream` on the session's real Redis, with north and south."""

    async def build(**overrides: Any) -> Proxy:
        values: dict[str, Any] = {
            "upstreams": UPSTREAMS,
            "clients": CLIENTS,
            "redis_url": redis_url,
            "cache_l1_ttl": 1.0,
        }
        values.update(overrides)
        settings = make_settings(str(upstream_server.make_url("")).rstrip("/"), **values)
        return await aiohttp_client(create_app(settings))

    return build


# --- settings ----------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in list(os.environ):
        if name.startswith("PROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PROXY_SECRETS_DIR", str(tmp_path / "none"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_upstreams_are_read_from_the_environment_with_token_files(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = clean_env / "north"
    secret.write_text(NORTH + "\n")
    upstreams = {
        "north": {"token_file": str(secret), "providers": ["101", "0102"], "rate": "250/minute"},
        "south": {"token": SOUTH, "providers": [201], "burst": 3, "request_mode": "customer"},
    }
    monkeypatch.setenv("PROXY_UPSTREAMS", json.dumps(upstreams))
    monkeypatch.setenv("PROXY_UPSTREAM_RATE_LIMIT", "120/minute")
    settings = load_settings()
    north, south = settings.upstream_list
    assert (north.name, north.providers) == ("north", ("101", "102"))
    assert north.token.get_secret_value() == NORTH
    assert north.budget.limit == 10 and north.budget.interval == pytest.approx(60 / 250)
    assert (south.name, south.providers, south.request_mode) == ("south", ("201",), "customer")
    assert south.budget.limit == 3 and south.budget.interval == pytest.approx(0.5)
    assert settings.default_upstream.name == "north"  # the first listed
    assert settings.upstream_of["201"].name == "south"
    # The secrets never show in what settings print.
    assert NORTH not in repr(settings) and SOUTH not in repr(settings)
    assert NORTH not in str(settings.upstream_list)


def test_an_upstream_named_default_is_the_default(clean_env: Path) -> None:
    settings = load_settings(
        upstreams={
            "a": {"token": "tok-a", "providers": ["1"]},
            "default": {"token": "tok-b", "providers": ["2"]},
        }
    )
    assert settings.default_upstream.name == "default"
    assert settings.client_providers(_client()) == ("2",)


def _client(**extra: Any) -> Any:
    from proxy.settings import ClientConfig

    return ClientConfig(key_sha256=hash_key("k"), **extra)


def test_the_single_credential_settings_are_the_upstream_default(clean_env: Path) -> None:
    plain = load_settings(upstream_token="tok-1")
    (only,) = plain.upstream_list
    assert (only.name, only.providers) == (DEFAULT_UPSTREAM, ())
    assert only.budget == plain.upstream_budget
    assert plain.tenant("app", _client(), None).provider is None  # type: ignore[union-attr]
    with_id = load_settings(upstream_token="tok-1", upstream_provider_id="42")
    assert with_id.default_upstream.providers == ("42",)
    tenant = with_id.tenant("app", _client(), None)
    assert tenant.provider == "42" and tenant.upstream.name == "default"  # type: ignore[union-attr]
    assert tenant.key is None  # type: ignore[union-attr]  # one provider: keys do not name it


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"upstream_token": "tok", "upstreams": {"a": {"token": "x", "providers": ["1"]}}},
            "PROXY_UPSTREAMS and PROXY_UPSTREAM_TOKEN are both set",
        ),
        (
            {
                "upstream_provider_id": "1",
                "upstreams": {"a": {"token": "x", "providers": ["1"]}},
            },
            "PROXY_UPSTREAMS and PROXY_UPSTREAM_PROVIDER_ID are both set",
        ),
        (
            {
                "upstreams": {
                    "a": {"token": "x", "providers": ["1", "2"]},
                    "b": {"token": "y", "providers": ["2"]},
                }
            },
            "provider 2 is served by both 'a' and 'b'",
        ),
        (
            {"upstreams": {"a": {"token": "x", "providers": ["12a"]}}},
            "PROXY_UPSTREAMS (a.providers): provider id '12a' must be 1-18 digits",
        ),
        (
            {"upstreams": {"a": {"token": "x", "providers": ["1" * 19]}}},
            "must be 1-18 digits",
        ),
        (
            {"upstreams": {"a": {"providers": ["1"]}}},
            "set exactly one of token and token_file",
        ),
        (
            {"upstreams": {"a": {"token": "x", "token_file": "/f", "providers": ["1"]}}},
            "set exactly one of token and token_file",
        ),
        (
            {"upstreams": {"a": {"token_file": "/nonexistent/t", "providers": ["1"]}}},
            "token_file '/nonexistent/t' cannot be read",
        ),
        (
            {
                "upstreams": {
                    "a": {"token": "x", "providers": []},
                    "b": {"token": "y", "providers": ["2"]},
                }
            },
            "upstream 'a' lists no providers",
        ),
        (
            {"upstreams": {"North!": {"token": "x", "providers": ["1"]}}},
            "upstream name 'North!' must be 1-32 of a-z 0-9 _ -",
        ),
        (
            {
                "upstreams": {"a": {"token": "x", "providers": ["1"]}},
                "clients": {"app": {"key_sha256": "a" * 64, "providers": ["1", "9"]}},
            },
            "PROXY_CLIENTS (app.providers): no upstream serves provider(s) 9",
        ),
        (
            {
                "upstreams": {
                    "a": {"token": "same-tok", "providers": ["1"]},
                    "b": {"token": "same-tok", "providers": ["2"]},
                }
            },
            "upstreams 'a' and 'b' hold the same credential",
        ),
        (
            {
                "upstreams": {
                    "a": {"token": "x", "providers": ["1"]},
                    "b": {"token": "y", "providers": ["2"], "rate": "12/minute"},
                },
                "upstream_queue_timeout": 5,
                "clients": {"app": {"key_sha256": "a" * 64, "providers": ["2"], "weight": 10}},
            },
            # b frees 12/minute: 0.5 units in half the queue timeout, so at most 1.
            "PROXY_CLIENTS (app.weight): 10 is more than 1",
        ),
        ({"upstream_token": "tok", "upstream_provider_id": "prov-1"}, "must be 1-18 digits"),
        ({}, "PROXY_UPSTREAM_TOKEN: is required"),
    ],
)
def test_bad_upstream_settings_fail_in_one_line(
    clean_env: Path, values: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(**values)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_token_is_named_never_echoed(clean_env: Path) -> None:
    leaked = "leak ME-secret"
    with pytest.raises(SettingsError) as caught:
        load_settings(upstreams={"a": {"token": leaked, "providers": ["1"]}})
    assert "PROXY_UPSTREAMS (a.token)" in str(caught.value)
    assert "ME-secret" not in str(caught.value)
    bad_file = clean_env / "bad"
    bad_file.write_text("two words-SECRET\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(upstreams={"a": {"token_file": str(bad_file), "providers": ["1"]}})
    assert "SECRET" not in str(caught.value)
    bad_file.write_bytes(b"\xffSECRET-token")  # not UTF-8: its decoder would quote the byte
    with pytest.raises(SettingsError) as caught:
        load_settings(upstreams={"a": {"token_file": str(bad_file), "providers": ["1"]}})
    assert "must hold one token" in str(caught.value)
    assert "SECRET" not in str(caught.value) and "0xff" not in str(caught.value)


def test_which_provider_a_client_gets(clean_env: Path) -> None:
    settings = load_settings(upstreams=UPSTREAMS, clients=CLIENTS)
    billing, crm, ops = (settings.clients[name] for name in ("billing", "crm", "ops"))
    tenant = settings.tenant("billing", billing, None)
    assert (tenant.upstream.name, tenant.provider) == ("north", "101")  # type: ignore[union-attr]
    tenant = settings.tenant("billing", billing, " 0201 ")
    assert (tenant.upstream.name, tenant.provider) == ("south", "201")  # type: ignore[union-attr]
    assert settings.tenant("crm", crm, None).provider == "102"  # type: ignore[union-attr]
    refused = settings.tenant("crm", crm, "101")
    assert (refused.status, refused.code) == (403, "permission_denied")  # type: ignore[union-attr]
    assert settings.tenant("ops", ops, "102").provider == "102"  # type: ignore[union-attr]
    assert settings.tenant("ops", ops, "201").status == 403  # type: ignore[union-attr]
    assert settings.tenant("ops", ops, "abc").status == 400  # type: ignore[union-attr]
    assert settings.tenant("ops", ops, "1" * 19).status == 400  # type: ignore[union-attr]


# --- keys ----------------------------------------------------------------------------------


def test_every_key_of_a_question_names_its_provider() -> None:
    from dataclasses import replace

    from proxy.backends import keys
    from proxy.core.operations import load_operations

    operation = load_operations()["customers_list"]
    plain = operation.contract.parse(MultiDict({"page": "2"}), ())
    assert not isinstance(plain, QueryErrors)
    north, other = replace(plain, provider="101"), replace(plain, provider="102")
    # Without a provider the key is what it always was; with one, the provider is in it.
    assert keys.cache_key(plain) == f"v3:customers_list:{plain.digest}"
    assert keys.cache_key(north) == f"v3:customers_list:p101:{plain.digest}"
    found = {keys.cache_key(q, "", 3) for q in (plain, north, other)}
    assert len(found) == 3
    # Leases and failure notes follow the cache key; idempotency and generations name it too.
    assert keys.lease("x:", keys.cache_key(north)) != keys.lease("x:", keys.cache_key(other))
    assert keys.idempotency("x:", "app", "k", "101") != keys.idempotency("x:", "app", "k", "102")
    assert keys.idempotency("x:", "app", "k") == keys.idempotency("x:", "app", "k", None)
    assert keys.collection("customers", "101") != keys.collection("customers", "102")
    assert keys.collection("customers", None) == "customers"
    # Purge patterns and prefixes: one provider's, not another's (101 is not a prefix of 1010).
    assert keys.matches(keys.cache_key(north), None, "101")
    assert not keys.matches(keys.cache_key(replace(plain, provider="1010")), None, "101")
    assert not keys.matches(keys.cache_key(plain), None, "101")
    assert keys.matches(keys.cache_key(north), "customers_list", "101")
    assert not keys.matches(keys.cache_key(other), "customers_list", "101")
    assert keys.entries("x:", None, "101") == "x:c:{v3:*:p101:*"
    assert keys.entries("x:", "customers_list", "101") == "x:c:{v3:customers_list:p101:*"
    # Budgets and circuits: one per credential; `default` keeps the single-credential names.
    assert keys.budget("default") == "upstream" and keys.budget("north") == "upstream:north"
    assert keys.circuit("x:") == "x:circuit" and keys.circuit("x:", "north") == "x:circuit:north"


# --- through HTTP, one process ----------------------------------------------------------------


async def test_two_providers_asking_the_same_question_are_two_calls_with_their_credentials(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    bodies = {}
    for provider in ("101", "102", "201"):
        response = await proxy.get(LIST, headers=with_provider(provider))
        assert response.status == 200
        bodies[provider] = await response.json()
    assert [(c.credential, c.provider) for c in upstream.calls] == [
        ("north", "101"),
        ("north", "102"),
        ("south", "201"),
    ]
    assert {b["results"][0]["provider"] for b in bodies.values()} == {"101", "102", "201"}
    # Asked again, each is its own provider's hit, from the cache.
    for provider in ("101", "102", "201"):
        response = await proxy.get(LIST, headers=with_provider(provider))
        assert "hit" in response.headers["Cache-Status"]
        assert (await response.json()) == bodies[provider]
    assert len(upstream.calls) == 3


async def test_an_answer_carrying_another_credential_is_refused(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    """North's answer that holds south's credential (raw, or spelled with JSON escapes) never
    reaches a caller of north's providers, nor the cache: each tenant's secret is everyone's."""
    proxy = await make_proxy()
    escaped = "".join(f"\\u{ord(c):04x}" for c in SOUTH)  # the JSON text \u0073\u006f...
    assert json.loads(f'"{escaped}"') == SOUTH
    for leak in (SOUTH, escaped, None):
        upstream.leak = leak
        response = await proxy.get(
            LIST + f"?page={len(upstream.calls) + 2}", headers=with_provider("101")
        )
        text = await response.text()
        assert SOUTH not in text and NORTH not in text
        if leak is None:
            assert response.status == 200
        else:
            assert response.status == 502
            assert (await response.json())["code"] == "upstream_invalid_response"
    upstream.leak = f"{SOUTH[:-1]}"  # a prefix is not the credential
    response = await proxy.get(LIST + "?page=9", headers=with_provider("201"))
    assert response.status == 200


async def test_without_the_header_a_client_gets_its_first_provider(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    assert (await proxy.get(LIST, headers=auth(KEY))).status == 200
    assert (await proxy.get(LIST, headers=auth(OTHER_KEY))).status == 200
    assert (await proxy.get(LIST, headers=auth(THIRD_KEY))).status == 200
    # billing -> 101, crm -> 102, ops (north's providers by default) -> 101: a hit of billing's.
    assert [(c.credential, c.provider) for c in upstream.calls] == [
        ("north", "101"),
        ("north", "102"),
    ]
    # Naming the default provider is the same question as not naming it.
    again = await proxy.get(LIST, headers=with_provider("101"))
    assert "hit" in again.headers["Cache-Status"]


async def test_a_provider_the_client_was_not_given_is_403_and_nothing_is_forwarded(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    for key, provider in ((OTHER_KEY, "101"), (OTHER_KEY, "201"), (THIRD_KEY, "201"), (KEY, "999")):
        response = await proxy.get(LIST, headers=with_provider(provider, key))
        assert response.status == 403
        body = await response.json()
        assert body["code"] == "permission_denied"
        assert body["type"] == "invalid_request_error"
        assert provider in body["message"]
        # Writes too: refused before anything is read or sent.
        written = await proxy.post(
            LIST,
            data=b'{"first_name": "Zed"}',
            headers={**with_provider(provider, key), "Content-Type": "application/json"},
        )
        assert written.status == 403
    assert upstream.calls == []


@pytest.mark.parametrize("header", ["abc", "12 3", "1" * 19, "-1", "1.5", "0x10"])
async def test_a_malformed_provider_id_is_400(
    make_proxy: MakeProxy, upstream: Upstream, header: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(LIST, headers=with_provider(header))
    assert response.status == 400
    body = await response.json()
    assert body["code"] == "parameter_invalid" and body["type"] == "invalid_request_error"
    assert "TeamUp-Provider-ID" in body["message"]
    assert list(body["field_errors"]) == ["TeamUp-Provider-ID"]
    assert upstream.calls == []


async def test_the_single_credential_proxy_forwards_no_provider_header(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, redis_url: str
) -> None:
    upstream = Upstream({"only-token": ("default", ("7",))})
    server = await aiohttp_server(upstream.app())
    settings = make_settings(
        str(server.make_url("")).rstrip("/"), upstream_token="only-token", redis_url=redis_url
    )
    proxy = await aiohttp_client(create_app(settings))
    assert (await proxy.get(LIST, headers=auth())).status == 200
    assert [(c.credential, c.provider) for c in upstream.calls] == [("default", None)]
    # A provider header to a proxy that serves none: refused, not passed on.
    assert (await proxy.get(LIST, headers=with_provider("7"))).status == 403
    assert len(upstream.calls) == 1
    # Its cache keys stay as they were: no provider in them.
    with redis.Redis.from_url(redis_url) as sync:
        names = [k.decode() for k in sync.keys(f"{KEY_PREFIX}c:*")]
    assert len(names) == 1 and ":p" not in names[0]


async def test_one_provider_keeps_todays_keys_and_always_sends_its_header(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, redis_url: str
) -> None:
    """`PROXY_UPSTREAM_PROVIDER_ID` alone (one provider in all): an upgrade changes no key (no
    cold cache, an Idempotency-Key retried across the deploy is still a replay, old and new
    replicas bump the same generations), every call carries the header, and purges with or
    without the provider named find the entries."""
    upstream = Upstream({"only-token": ("default", ("7", "8"))})
    server = await aiohttp_server(upstream.app())
    settings = make_settings(
        str(server.make_url("")).rstrip("/"),
        upstream_token="only-token",
        upstream_provider_id="7",
        redis_url=redis_url,
    )
    proxy = await aiohttp_client(create_app(settings))
    for headers in (auth(), with_provider("7"), with_provider("07")):
        assert (await proxy.get(LIST, headers=headers)).status == 200
    assert [(c.credential, c.provider) for c in upstream.calls] == [("default", "7")]
    with redis.Redis.from_url(redis_url) as sync:
        names = [k.decode() for k in sync.keys(f"{KEY_PREFIX}c:*")]
    assert len(names) == 1 and ":p7" not in names[0]
    assert (await proxy.get(LIST, headers=with_provider("8"))).status == 403
    admin = auth(ADMIN_KEY)
    for headers in (admin, {**admin, "TeamUp-Provider-ID": "7"}):
        purged = await proxy.delete("/admin/cache/customers_list/data", headers=headers)
        assert (await purged.json())["purged"] == 1
        assert (await proxy.get(LIST, headers=auth())).status == 200  # a miss: stored again
    assert len(upstream.calls) == 3


async def test_purge_can_target_one_provider(make_proxy: MakeProxy, upstream: Upstream) -> None:
    proxy = await make_proxy(cache_l1_ttl=0)
    admin = auth(ADMIN_KEY)
    for provider in ("101", "102"):
        assert (await proxy.get(LIST, headers=with_provider(provider))).status == 200
        assert (await proxy.get(REPORT, headers=with_provider(provider))).status == 200
    assert len(upstream.calls) == 4

    async def hit(path: str, provider: str) -> bool:
        response = await proxy.get(path, headers=with_provider(provider))
        assert response.status == 200
        return "hit" in response.headers["Cache-Status"]

    # One operation of one provider (the header).
    purged = await proxy.delete(
        "/admin/cache/customers_list", headers={**admin, "TeamUp-Provider-ID": "101"}
    )
    assert (await purged.json())["purged"] == 1
    assert not await hit(LIST, "101")
    assert await hit(LIST, "102") and await hit(REPORT, "101")
    # Everything of one provider (the parameter).
    purged = await proxy.delete("/admin/cache?provider=102", headers=admin)
    assert purged.status == 200
    assert (await purged.json()) == {"purged": 2, "provider": "102", "shared": True}
    assert not await hit(LIST, "102") and not await hit(REPORT, "102")
    assert await hit(LIST, "101") and await hit(REPORT, "101")
    # One entry of one provider.
    one = await proxy.delete(
        "/admin/cache/customer_credits/data", headers={**admin, "TeamUp-Provider-ID": "101"}
    )
    assert (await one.json())["purged"] == 1
    assert not await hit(REPORT, "101") and await hit(LIST, "101")
    bad = await proxy.delete("/admin/cache?provider=x1", headers=admin)
    assert bad.status == 400
    # Never more than was asked: a stray or repeated parameter is refused, nothing purged.
    for path in (
        "/admin/cache/customers_list?provider=101&x=2",
        "/admin/cache/customers_list?provider=101&provider=102",
        "/admin/cache?provider=101&provider=102",
    ):
        refused = await proxy.delete(path, headers=admin)
        assert refused.status == 400, path
    refused = await proxy.delete(
        "/admin/cache?provider=102", headers={**admin, "TeamUp-Provider-ID": "101"}
    )
    assert refused.status == 400
    assert await hit(LIST, "101")
    # One entry without a provider named: that question's entry of every provider.
    assert await hit(LIST, "101") and await hit(LIST, "102")
    one = await proxy.delete("/admin/cache/customers_list/data", headers=admin)
    assert (await one.json())["purged"] == 2
    assert not await hit(LIST, "101") and not await hit(LIST, "102")


async def test_a_write_invalidates_its_own_providers_reads_only(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    clients = {name: {**config, "write": ["customers"]} for name, config in CLIENTS.items()}
    proxy = await make_proxy(clients=clients, generation_check_interval=0)
    for provider in ("101", "102"):
        assert (await proxy.get(LIST, headers=with_provider(provider))).status == 200
    written = await proxy.post(
        LIST,
        data=b'{"first_name": "Zed"}',
        headers={**with_provider("101"), "Content-Type": "application/json"},
    )
    assert written.status == 201
    assert (upstream.calls[-1].credential, upstream.calls[-1].provider) == ("north", "101")
    fresh = await proxy.get(LIST, headers=with_provider("101"))
    assert "hit" not in fresh.headers["Cache-Status"]
    kept = await proxy.get(LIST, headers=with_provider("102"))
    assert "hit" in kept.headers["Cache-Status"]


async def test_one_idempotency_key_for_two_providers_is_two_writes(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    clients = {name: {**config, "write": ["customers"]} for name, config in CLIENTS.items()}
    proxy = await make_proxy(clients=clients, generation_check_interval=0)

    async def create(provider: str) -> aiohttp.ClientResponse:
        response = await proxy.post(
            LIST,
            data=b'{"first_name": "Zed"}',
            headers={
                **with_provider(provider),
                "Content-Type": "application/json",
                "Idempotency-Key": "order-1",
            },
        )
        await response.read()
        return response

    first_north = await create("101")
    first_south = await create("201")
    assert first_north.status == first_south.status == 201
    assert [(c.credential, c.provider) for c in upstream.calls] == [
        ("north", "101"),
        ("south", "201"),
    ]
    replay = await create("101")
    assert replay.headers.get("Idempotent-Replayed") == "true"
    assert (await replay.json()) == (await first_north.json())
    assert len(upstream.calls) == 2


async def test_metrics_and_access_logs_name_the_upstream_and_provider(
    make_proxy: MakeProxy, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await make_proxy(cache_l1_ttl=0)
    with caplog.at_level("INFO", logger="teamup_proxy.access"):
        assert (await proxy.get(LIST, headers=with_provider("201"))).status == 200
        assert (await proxy.get(LIST, headers=with_provider("102"))).status == 200
    text = await (await proxy.get("/metrics")).text()
    assert (
        'teamup_proxy_requests_total{cache="miss",provider="201",report="customers_list",'
        'route="read",status="200",upstream="south"} 1.0'
    ) in text
    assert (
        'teamup_proxy_upstream_requests_total{provider="102",report="customers_list",'
        'status="200",upstream="north"} 1.0'
    ) in text
    assert (
        'teamup_proxy_client_requests_total{client="billing",provider="201",'
        'report="customers_list",upstream="south"} 1.0'
    ) in text
    assert 'teamup_proxy_upstream_duration_seconds_count{upstream="south"} 1.0' in text
    assert 'teamup_proxy_upstream_budget_remaining{upstream="north"}' in text
    lines = [r for r in caplog.records if r.name == "teamup_proxy.access"]
    seen = [(getattr(r, "upstream", None), getattr(r, "provider", None)) for r in lines]
    assert seen == [("south", "201"), ("north", "102")]
    assert NORTH not in text and SOUTH not in text


async def test_a_429_opens_that_upstreams_circuit_only(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    proxy = await make_proxy()
    admin = auth(ADMIN_KEY)
    upstream.limited.add("north")
    limited = await proxy.get(LIST, headers=with_provider("101"))
    assert limited.status == 503
    assert (await limited.json())["code"] == "upstream_rate_limited"
    # North's other provider waits for the circuit too; south is answered.
    assert (await proxy.get(REPORT, headers=with_provider("102"))).status == 503
    assert (await proxy.get(LIST, headers=with_provider("201"))).status == 200
    assert [(c.credential, c.provider) for c in upstream.calls] == [
        ("north", "101"),
        ("south", "201"),
    ]
    shown = await (await proxy.get("/admin/circuit", headers=admin)).json()
    assert shown["upstream"] == "north" and shown["open"] is True
    assert shown["upstreams"]["north"]["open"] is True
    assert shown["upstreams"]["south"]["open"] is False
    south = await (await proxy.get("/admin/circuit?upstream=south", headers=admin)).json()
    assert south["open"] is False and south["upstream"] == "south"
    ready = await (await proxy.get("/readyz")).json()
    assert ready["status"] == "degraded"
    assert ready["upstreams"] == {"north": "circuit-open", "south": "ok"}
    assert (await proxy.get("/admin/circuit?upstream=east", headers=admin)).status == 404
    metrics = await (await proxy.get("/metrics")).text()
    assert (
        'teamup_proxy_ratelimit_rejections_total{client="billing",kind="circuit",'
        'upstream="north"} 1.0'
    ) in metrics
    assert 'kind="circuit",upstream="south"' not in metrics
    # The operator closes north's (only north's) circuit.
    upstream.limited.clear()
    closed = await (await proxy.delete("/admin/circuit?upstream=north", headers=admin)).json()
    assert closed["closed"] is True
    assert (await proxy.get(LIST, headers=with_provider("101"))).status == 200
    assert (await (await proxy.get("/readyz")).json())["status"] == "ok"


async def test_a_spent_budget_on_one_credential_leaves_the_other_answered(
    make_proxy: MakeProxy, upstream: Upstream, redis_url: str
) -> None:
    upstreams = {
        "north": {**UPSTREAMS["north"], "rate": "6/minute", "burst": 1},
        "south": UPSTREAMS["south"],
    }
    proxy = await make_proxy(upstreams=upstreams, upstream_queue_timeout=0)
    # North's one unit goes to the first question; the next ones find its budget spent.
    first = await proxy.get(LIST + "?page=2", headers=with_provider("101"))
    assert first.status == 200
    spent = [
        await proxy.get(f"{LIST}?page={n + 10}", headers=with_provider("102")) for n in range(2, 5)
    ]
    assert [r.status for r in spent] == [503] * 3
    assert {(await r.json())["code"] for r in spent} == {"upstream_budget_exhausted"}
    # Meanwhile south's callers are answered from their own budget.
    for n in range(2, 7):
        answered = await proxy.get(f"{LIST}?page={n + 10}", headers=with_provider("201"))
        assert answered.status == 200
    assert len(upstream.by(credential="south")) == 5
    assert len(upstream.by(credential="north")) == 1
    with redis.Redis.from_url(redis_url) as sync:
        names = {k.decode() for k in sync.keys(f"{KEY_PREFIX}rl:upstream*")}
    assert names == {f"{KEY_PREFIX}rl:upstream:north", f"{KEY_PREFIX}rl:upstream:south"}


async def test_while_redis_is_down_each_credential_gets_its_own_share(
    make_proxy: MakeProxy, upstream: Upstream
) -> None:
    from proxy.testing.support import free_port

    # Redis unreachable; 2 processes assumed: each counts half of each credential's budget
    # (burst 2 of 4, one unit a second of two), from a bucket taken as spent when Redis went.
    upstreams = {
        "north": {**UPSTREAMS["north"], "rate": "120/minute", "burst": 4},
        "south": {**UPSTREAMS["south"], "rate": "120/minute", "burst": 4},
    }
    proxy = await make_proxy(
        upstreams=upstreams,
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
        replicas_hint=2,
        workers=1,
        upstream_queue_timeout=0,
    )

    await asyncio.sleep(2.2)  # the local share's period (2 s): its bucket is full again

    async def statuses(provider: str) -> list[int]:
        found = []
        for n in range(2, 6):
            response = await proxy.get(f"{LIST}?page={n}", headers=with_provider(provider))
            found.append(response.status)
        return found

    assert await statuses("101") == [200, 200, 503, 503]  # north's share: 4 / 2
    assert await statuses("201") == [200, 200, 503, 503]  # south's own share, untouched
    assert len(upstream.by(credential="north")) == len(upstream.by(credential="south")) == 2


async def test_hot_hits_never_cross_providers(make_proxy: MakeProxy, upstream: Upstream) -> None:
    proxy = await make_proxy(cache_l1_ttl=5.0)
    answers: dict[str, list[Any]] = {"101": [], "201": []}
    for _ in range(5):
        for provider in answers:
            response = await proxy.get(LIST, headers=with_provider(provider))
            answers[provider].append((await response.json())["results"][0]["provider"])
    assert answers == {"101": ["101"] * 5, "201": ["201"] * 5}
    assert len(upstream.calls) == 2
    # The same presented key, now for a provider it may not use: refused, even when hot.
    assert (await proxy.get(LIST, headers=with_provider("102", OTHER_KEY))).status == 200
    assert (await proxy.get(LIST, headers=with_provider("101", OTHER_KEY))).status == 403


async def test_the_served_document_takes_the_provider_header(make_proxy: MakeProxy) -> None:
    from openapi_spec_validator import validate

    proxy = await make_proxy()
    document = await (await proxy.get("/openapi.json")).json()
    validate(document)
    header = document["components"]["parameters"]["TeamUp-Provider-ID"]
    assert header["in"] == "header" and header["schema"] == {
        "type": "string",
        "pattern": "^[0-9]{1,18}$",
    }
    ref = {"$ref": "#/components/parameters/TeamUp-Provider-ID"}
    for path, method in ((LIST, "get"), (LIST, "post"), (REPORT, "get")):
        assert ref in document["paths"][path][method]["parameters"], (path, method)
    assert all(ref not in op.get("parameters", []) for op in document["paths"]["/healthz"].values())


# --- two replicas on one Redis --------------------------------------------------------------


StartReplica = Callable[..., Awaitable[ProxyProcess]]


def replica_settings(redis_url: str) -> dict[str, Any]:
    """A `serve` replica's settings: north and south, the clients, the shared Redis."""
    return {
        "upstreams": json.dumps(UPSTREAMS),
        "clients": json.dumps(CLIENTS),
        "redis_url": redis_url,
        "rate_limit": "100000/second",
        "log_level": "WARNING",
    }


@pytest.fixture
async def start_replica(upstream_server: TestServer, redis_url: str) -> AsyncIterator[StartReplica]:
    started: list[ProxyProcess] = []

    async def start(**extra: Any) -> ProxyProcess:
        values = {**replica_settings(redis_url), **extra}
        replica = ProxyProcess(str(upstream_server.make_url("")).rstrip("/"), **values)
        started.append(replica)
        return await replica.start()

    yield start
    for replica in started:
        if replica.process is not None and replica.process.returncode is None:
            await replica.stop()


async def get(
    http: aiohttp.ClientSession,
    replica: ProxyProcess,
    path: str,
    provider: str | None,
    key: str = KEY,
) -> tuple[int, dict[str, Any], str]:
    async with http.get(replica.url + path, headers=with_provider(provider, key)) as response:
        return (
            response.status,
            orjson.loads(await response.read()),
            response.headers.get("Cache-Status", ""),
        )


@pytest.mark.slow
async def test_replicas_the_same_question_for_two_providers_is_two_calls(
    start_replica: StartReplica, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(start_replica(), start_replica())
    upstream.latency = 0.3
    asked = [(a if i % 2 else b, "101" if i % 3 else "201") for i in range(30)]
    results = await asyncio.gather(*(get(http, r, LIST, p) for r, p in asked))
    assert [status for status, _, _ in results] == [200] * 30
    for (_, provider), (_, body, _) in zip(asked, results, strict=True):
        assert body["results"][0]["provider"] == provider
    assert sorted((c.credential, c.provider) for c in upstream.calls) == [
        ("north", "101"),
        ("south", "201"),
    ]


@pytest.mark.slow
async def test_replicas_a_client_asking_for_another_provider_gets_403_and_teamup_sees_nothing(
    start_replica: StartReplica, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(start_replica(), start_replica())
    for replica in (a, b):
        status, body, _ = await get(http, replica, LIST, "201", OTHER_KEY)
        assert status == 403 and body["code"] == "permission_denied"
        status, _, _ = await get(http, replica, LIST, "12x", OTHER_KEY)
        assert status == 400
    assert upstream.calls == []


@pytest.mark.slow
async def test_replicas_a_flood_on_one_credential_leaves_the_other_answered(
    start_replica: StartReplica, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    # North: 60/minute, burst 2 across both replicas; its queue waits up to 2 s. South: plenty.
    upstreams = {
        "north": {**UPSTREAMS["north"], "rate": "60/minute", "burst": 2},
        "south": {**UPSTREAMS["south"], "rate": "100000/second", "burst": 1000},
    }
    settings = {"upstreams": json.dumps(upstreams), "upstream_queue_timeout": "2"}
    a, b = await asyncio.gather(start_replica(**settings), start_replica(**settings))
    flood = [
        asyncio.ensure_future(get(http, a if n % 2 else b, f"{LIST}?page={n + 10}", "101"))
        for n in range(1, 41)
    ]
    # While north's flood waits for its budget, south's callers are answered at once.
    await asyncio.sleep(0.5)
    started = time.monotonic()
    south = await asyncio.gather(
        *(get(http, a if n % 2 else b, f"{LIST}?page={n + 10}", "201") for n in range(1, 21))
    )
    # North's flood still waits its turn (or its timeout) when south's callers are all answered.
    still_waiting = sum(not f.done() for f in flood)
    flooded = await asyncio.gather(*flood)
    assert still_waiting > 0
    assert [status for status, _, _ in south] == [200] * 20
    assert not any("detail=queued" in status for _, _, status in south)
    assert len(upstream.by(credential="south")) == 20
    # North stayed inside its budget (rate + burst over the run, generously) and refused the
    # rest with 503 rather than exceed it.
    statuses = [status for status, _, _ in flooded]
    assert set(statuses) <= {200, 503} and statuses.count(503) > 0
    assert len(upstream.by(credential="north")) == statuses.count(200)
    run = time.monotonic() - started + 1.0
    assert statuses.count(200) <= 2 + 2 + int(run) + 1


@pytest.mark.slow
async def test_replicas_a_429_on_one_upstream_leaves_the_others_circuits_closed(
    start_replica: StartReplica, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(start_replica(), start_replica())
    upstream.limited.add("north")
    status, body, _ = await get(http, a, LIST, "102")
    assert status == 503 and body["code"] == "upstream_rate_limited"
    # The other replica knows: north is open there too, south is closed and answers.
    async with http.get(b.url + "/admin/circuit", headers=auth(ADMIN_KEY)) as response:
        shown = await response.json()
    assert shown["upstreams"]["north"]["open"] is True
    assert shown["upstreams"]["south"]["open"] is False
    status, _, _ = await get(http, b, LIST, "101")
    assert status == 503
    status, _, _ = await get(http, b, LIST, "201")
    assert status == 200
    assert [(c.credential, c.provider) for c in upstream.calls] == [
        ("north", "102"),
        ("south", "201"),
    ]
    async with http.get(b.url + "/readyz") as response:
        assert (await response.json())["upstreams"] == {"north": "circuit-open", "south": "ok"}


@pytest.mark.slow
async def test_replicas_a_purge_of_one_provider_reaches_every_replica(
    start_replica: StartReplica, upstream: Upstream, http: aiohttp.ClientSession
) -> None:
    a, b = await asyncio.gather(start_replica(), start_replica())
    for replica in (a, b):
        for provider in ("101", "102"):
            status, _, _ = await get(http, replica, LIST, provider)
            assert status == 200
    assert len(upstream.calls) == 2
    async with http.delete(a.url + "/admin/cache?provider=101", headers=auth(ADMIN_KEY)) as done:
        assert done.status == 200
        assert (await done.json())["provider"] == "101"
    # The other replica (its L1 included) forgot 101's entry, and only 101's.
    _, body, cache = await get(http, b, LIST, "101")
    assert "hit" not in cache and body["results"][0]["provider"] == "101"
    _, _, cache = await get(http, b, LIST, "102")
    assert "hit" in cache
    assert [(c.credential, c.provider) for c in upstream.calls][2:] == [("north", "101")]


# --- the same, against the mock TeamUp (proxy/testing/mock.py) with two tenants --------------


@pytest.fixture
async def tenant_mock(aiohttp_server: AiohttpServer) -> TestServer:
    """The mock TeamUp: north's token is "tenant0" (101, 102), south's "tenant1" (201)."""
    app = create_mock_app("unused-default-token", tenants={NORTH: ("101", "102"), SOUTH: ("201",)})
    return await aiohttp_server(app)


@pytest.mark.slow
async def test_mock_teamup_two_replicas_each_provider_its_credential_and_data(
    tenant_mock: TestServer, redis_url: str, http: aiohttp.ClientSession
) -> None:
    state = tenant_mock.app[MOCK_STATE]
    url = str(tenant_mock.make_url("")).rstrip("/")
    values = replica_settings(redis_url)
    async with ProxyProcess(url, **values) as a, ProxyProcess(url, **values) as b:
        state.faults.latency = 0.2
        query = REPORT + "?format=json&limit=5"
        asked = [(a if i % 2 else b, ("101", "102", "201")[i % 3]) for i in range(24)]
        results = await asyncio.gather(*(get(http, r, query, p) for r, p in asked))
        assert [status for status, _, _ in results] == [200] * 24
        by_provider = {
            p: orjson.dumps(body) for (_, p), (_, body, _) in zip(asked, results, strict=True)
        }
        assert len(set(by_provider.values())) == 3  # each provider's own data
        assert state.calls_by(credential=state.label_of(NORTH), provider="101") == 1
        assert state.calls_by(credential=state.label_of(NORTH), provider="102") == 1
        assert state.calls_by(credential=state.label_of(SOUTH), provider="201") == 1
        assert state.calls == 3
        # A client asking for a provider it was not given: 403, the mock sees nothing more.
        status, body, _ = await get(http, a, query, "201", OTHER_KEY)
        assert status == 403 and body["code"] == "permission_denied"
        assert state.calls == 3
        # A 429 for south only: south's circuit opens, north's stays closed.
        state.faults.latency = 0.0
        state.faults.status, state.faults.credential = 429, state.label_of(SOUTH)
        status, _, _ = await get(http, b, REPORT + "?format=json&limit=6", "201")
        assert status == 503
        status, _, _ = await get(http, a, REPORT + "?format=json&limit=6", "102")
        assert status == 200
        async with http.get(a.url + "/admin/circuit", headers=auth(ADMIN_KEY)) as response:
            shown = (await response.json())["upstreams"]
        assert shown["south"]["open"] is True and shown["north"]["open"] is False
