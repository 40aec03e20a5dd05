"""Settings: the contract's defaults, where the token may come from, cross-setting checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.core.gcra import Rate
from proxy.settings import SettingsError, load_settings
from proxy.web.auth import hash_key

TOKEN = "tok-from-somewhere"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No PROXY_* from the machine, no .env from the repo, no real /run/secrets."""
    import os

    for name in list(os.environ):
        if name.startswith("PROXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PROXY_SECRETS_DIR", str(tmp_path / "no-secrets"))


def test_design_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_UPSTREAM_TOKEN", TOKEN)
    settings = load_settings()
    assert settings.upstream_url == "https://goteamup.com"
    assert settings.upstream_auth_scheme == "Token"
    assert settings.upstream_provider_id is None and settings.upstream_request_mode is None
    assert settings.upstream_rate_limit == Rate(240, 60.0)
    assert settings.upstream_timeout == 10
    assert settings.upstream_array_style == "comma"
    assert settings.redis_url is None
    assert (settings.cache_ttl, settings.cache_stale_ttl) == (300, 3600)
    assert settings.clients == {}
    assert settings.rate_limit == Rate(120, 60.0)
    assert settings.admin_key_sha256 is None
    assert (settings.log_level, settings.log_format) == ("INFO", "json")
    assert settings.upstream_headers == {"Authorization": f"Token {TOKEN}"}
    assert TOKEN not in repr(settings) and TOKEN not in settings.model_dump_json()


def test_token_from_a_dotenv_file(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"PROXY_UPSTREAM_TOKEN={TOKEN}\nPROXY_CACHE_TTL=60\n")
    settings = load_settings()
    assert settings.default_upstream.token.get_secret_value() == TOKEN
    assert settings.cache_ttl == 60


def test_token_from_a_secrets_directory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "PROXY_UPSTREAM_TOKEN").write_text(TOKEN + "\n")
    monkeypatch.setenv("PROXY_SECRETS_DIR", str(secrets))
    assert load_settings().default_upstream.token.get_secret_value() == TOKEN


def test_environment_wins_over_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("PROXY_UPSTREAM_TOKEN=from-dotenv\n")
    monkeypatch.setenv("PROXY_UPSTREAM_TOKEN", TOKEN)
    assert load_settings().default_upstream.token.get_secret_value() == TOKEN


def test_clients_and_rates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_UPSTREAM_TOKEN", TOKEN)
    monkeypatch.setenv(
        "PROXY_CLIENTS",
        f'{{"billing": {{"key_sha256": "{hash_key("k").upper()}", "rate": "600/minute",'
        f' "upstream_rate": "2/second"}}}}',
    )
    billing = load_settings().clients["billing"]
    assert billing.key_sha256 == hash_key("k")  # normalised to lower case
    assert billing.rate == Rate(600, 60.0)
    assert billing.upstream_rate == Rate(2, 1.0)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"PROXY_FLIGHT_LEASE_MS": "500"}, "PROXY_FLIGHT_LEASE_MS"),
        ({"PROXY_ADMIN_KEY_SHA256": hash_key("k")}, "PROXY_ADMIN_KEY_SHA256"),
        ({"PROXY_UPSTREAM_URL": "https://goteamup.com/api/v2"}, "PROXY_UPSTREAM_URL"),
        ({"PROXY_UPSTREAM_AUTH_SCHEME": "Token x"}, "PROXY_UPSTREAM_AUTH_SCHEME"),
        ({"PROXY_REDIS_URL": "http://redis"}, "PROXY_REDIS_URL"),
        ({"PROXY_LOG_FORMAT": "xml"}, "PROXY_LOG_FORMAT"),
        ({"PROXY_UPSTREAM_PROVIDER_ID": "a\r\nX-Evil: 1"}, "PROXY_UPSTREAM_PROVIDER_ID"),
    ],
)
def test_bad_combinations_are_named(
    monkeypatch: pytest.MonkeyPatch, values: dict[str, str], named: str
) -> None:
    monkeypatch.setenv("PROXY_UPSTREAM_TOKEN", TOKEN)
    monkeypatch.setenv("PROXY_CLIENTS", f'{{"billing": {{"key_sha256": "{hash_key("k")}"}}}}')
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as caught:
        load_settings()
    message = str(caught.value)
    assert named in message
    assert "\n" not in message and TOKEN not in message


def test_the_budget_bursts_at_most_upstream_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROXY_UPSTREAM_TOKEN", TOKEN)
    budget = load_settings().upstream_budget
    assert budget.limit == 10
    assert budget.interval == pytest.approx(0.25)  # still 240 a minute
    monkeypatch.setenv("PROXY_UPSTREAM_RATE_LIMIT", "4/minute")
    assert load_settings().upstream_budget == Rate(4, 60.0)
