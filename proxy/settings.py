"""Settings: every `PROXY_*` variable, validated once at start-up."""

from __future__ import annotations

import functools
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .core.gcra import Rate, parse_rate
from .core.operations import Operation, TtlClass, load_operations

__all__ = [
    "DEFAULT_UPSTREAM",
    "PROVIDER_ID",
    "ClientConfig",
    "ReportConfig",
    "Settings",
    "SettingsError",
    "Tenant",
    "TenantRefused",
    "TtlConfig",
    "Upstream",
    "UpstreamConfig",
    "load_settings",
]

DEFAULT_SECRETS_DIR = "/run/secrets"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A TeamUp provider id as the `TeamUp-Provider-ID` header carries it: 1-18 digits.
PROVIDER_ID = re.compile(r"[0-9]{1,18}")
# The upstream the single-credential settings (`PROXY_UPSTREAM_TOKEN`, …) make.
DEFAULT_UPSTREAM = "default"
_UPSTREAM_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


def _to_rate(value: Any) -> Any:
    return parse_rate(value) if isinstance(value, str) else value


RateSetting = Annotated[Rate, NoDecode, BeforeValidator(_to_rate), PlainSerializer(str)]


def _check_sha256(value: str) -> str:
    value = value.strip().lower()
    if not _HEX64.match(value):
        raise ValueError("must be 64 hex characters (see `teamup-proxy hash-key KEY`)")
    return value


def _known_reports(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    known = load_operations().reports()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown report(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def _check_token_value(raw: str) -> str:
    raw = raw.strip()
    if not raw or any(c in raw for c in "\r\n\0 "):
        raise ValueError("must be a non-empty token without spaces or line breaks")
    return raw


def _provider_ids(ids: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Provider ids as TeamUp writes them (digits, no leading zeros), in order, once each."""
    out: list[str] = []
    for raw in ids:
        text = str(raw).strip()
        if not PROVIDER_ID.fullmatch(text):
            raise ValueError(f"provider id {text[:20]!r} must be 1-18 digits")
        canonical = str(int(text))
        if canonical not in out:
            out.append(canonical)
    return tuple(out)


def _known_segments(names: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    if "*" in names:
        return ("*",)
    known = load_operations().segments()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown path segment(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    return tuple(dict.fromkeys(names))


class ClientConfig(BaseModel):
    """One calling app: the SHA-256 of its key, optional limits, and what it may read."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key_sha256: str
    rate: RateSetting | None = None
    upstream_rate: RateSetting | None = None
    # Units of the shared budget this client gets per round of the fair queue.
    weight: int = Field(1, ge=1, le=1000)
    # None: every enabled report. Least privilege: list only what the app needs.
    reports: tuple[str, ...] | None = None
    # First path segments after /api/v2/ (`customers`, `events`, `reports`, …; `*`: all).
    # None: everything routed.
    read: tuple[str, ...] | None = None
    # The first path segments this client may write (`*`: all). Default: no writes at all.
    write: tuple[str, ...] = ()
    # The TeamUp providers this client may act for (`TeamUp-Provider-ID`); the first is its
    # default. None: the default upstream's providers.
    providers: tuple[str, ...] | None = None

    _check_key = field_validator("key_sha256")(_check_sha256)

    @field_validator("providers", mode="before")
    @classmethod
    def _check_providers(cls, value: Any) -> Any:
        if value is None:
            return None
        if not isinstance(value, list | tuple) or not value:
            raise ValueError("must be a non-empty list of provider ids")
        return _provider_ids(value)

    @field_validator("reports")
    @classmethod
    def _check_reports(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else _known_reports(value)

    @field_validator("read")
    @classmethod
    def _check_read(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None or "*" in value else _known_segments(value)

    @field_validator("write")
    @classmethod
    def _check_write(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return _known_segments(value) if value else ()

    def may_write(self, segment: str) -> bool:
        """Whether this client may send a write under `segment` (least privilege: none unless
        listed)."""
        return "*" in self.write or segment in self.write

    def may_read(self, segment: str, report: str | None = None) -> bool:
        """Whether this client may read an operation under `segment` (and, for a report data
        operation, that report: `reports` narrows the `reports` segment)."""
        if self.read is not None and segment not in self.read:
            return False
        return report is None or self.reports is None or report in self.reports


class UpstreamConfig(BaseModel):
    """One TeamUp credential in `PROXY_UPSTREAMS`: its token (a value or a file), the providers
    it may act for, and its own budget."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    token: SecretStr | None = None
    token_file: str | None = None
    providers: tuple[str, ...] = ()
    rate: RateSetting | None = None
    burst: int | None = Field(None, ge=1)
    request_mode: str | None = None

    @field_validator("providers", mode="before")
    @classmethod
    def _check_providers(cls, value: Any) -> Any:
        if not isinstance(value, list | tuple):
            raise ValueError("must be a list of provider ids")
        return _provider_ids(value)

    @field_validator("request_mode")
    @classmethod
    def _check_mode(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "\r\n\0"):
            raise ValueError("must not contain line breaks")
        return value or None

    @field_validator("token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Never echoed: the message names the rule, not the value.
        return None if value is None else SecretStr(_check_token_value(value.get_secret_value()))

    @model_validator(mode="after")
    def _one_token(self) -> UpstreamConfig:
        if (self.token is None) == (self.token_file is None):
            raise ValueError("set exactly one of token and token_file")
        return self

    def secret(self) -> SecretStr:
        """The token, read from `token_file` when that is how it is given."""
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        try:
            with open(self.token_file, encoding="utf-8") as handle:
                raw = handle.read()
        except OSError as exc:
            raise ValueError(
                f"token_file {self.token_file[:200]!r} cannot be read ({exc.strerror})"
            ) from None
        except UnicodeDecodeError:  # its message would quote a byte of the secret
            raise ValueError(
                f"token_file {self.token_file[:200]!r} must hold one token without spaces"
            ) from None
        try:
            return SecretStr(_check_token_value(raw))
        except ValueError:
            raise ValueError(
                f"token_file {self.token_file[:200]!r} must hold one token without spaces"
            ) from None


@dataclass(frozen=True, slots=True)
class Upstream:
    """One TeamUp credential as the proxy uses it (resolved from `PROXY_UPSTREAMS`, or from
    the single-credential settings as `default`)."""

    name: str
    token: SecretStr = field(repr=False)
    providers: tuple[str, ...]
    budget: Rate
    request_mode: str | None = None

    def headers(self, auth_scheme: str) -> dict[str, str]:
        """Headers every call with this credential carries (the provider header is per call)."""
        headers = {"Authorization": f"{auth_scheme} {self.token.get_secret_value()}"}
        if self.request_mode:
            headers["Teamup-Request-Mode"] = self.request_mode
        return headers


@dataclass(frozen=True, slots=True)
class Tenant:
    """Whom a request is for: the provider (None: none named, no header forwarded) and the
    credential that serves it."""

    upstream: Upstream
    provider: str | None
    # The provider as keys name it (cache, lease, idempotency, generations, hot memo): None
    # while the proxy serves one provider at most, so that keys stay what they were before
    # providers existed (an upgrade changes no key); the provider header is still sent.
    key: str | None = None

    @property
    def labels(self) -> tuple[str, str]:
        """(upstream, provider) as metrics label them."""
        return self.upstream.name, self.provider or "none"


@dataclass(frozen=True, slots=True)
class TenantRefused:
    """Why a request's provider cannot be served (400: malformed; 403: not this client's, or
    no credential serves it); nothing is forwarded."""

    status: int
    code: str
    message: str


class ReportConfig(BaseModel):
    """Per-report overrides of the cache lifetimes (unset: the global ones)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_ttl: int | None = Field(None, ge=0)
    cache_stale_ttl: int | None = Field(None, ge=0)


class TtlConfig(BaseModel):
    """Seconds fresh and seconds stale on top, for an operation id, a first path segment or a
    TTL class of the document (`PROXY_TTLS`); unset: the next less specific one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    fresh: int | None = Field(None, ge=0)
    stale: int | None = Field(None, ge=0)


def _to_report_list(value: Any) -> Any:
    """`all`, a comma-separated list, or a JSON list."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return orjson.loads(text)
            except orjson.JSONDecodeError:
                raise ValueError("is not a valid JSON list") from None
        if text.lower() in ("", "all", "*"):
            return None
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


ReportList = Annotated[tuple[str, ...] | None, NoDecode, BeforeValidator(_to_report_list)]


class Settings(BaseSettings):
    """The proxy's configuration (environment, `.env`, or files in a secrets directory)."""

    model_config = SettingsConfigDict(
        env_prefix="PROXY_",
        env_file=".env",
        extra="ignore",
        frozen=True,
    )

    upstream_url: str = "https://goteamup.com"
    upstream_token: SecretStr | None = None
    upstream_auth_scheme: str = "Token"
    upstream_provider_id: str | None = None
    upstream_request_mode: str | None = None
    upstream_rate_limit: RateSetting = Field(default_factory=lambda: parse_rate("240/minute"))
    upstream_burst: int = Field(10, ge=1)
    upstream_timeout: float = Field(10.0, gt=0, le=300)
    upstream_array_style: Literal["comma", "repeat"] = "comma"
    upstream_circuit_default: float = Field(30.0, gt=0, le=3600)
    upstream_circuit_max: float = Field(300.0, gt=0, le=86400)
    upstream_max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    upstream_queue_timeout: float = Field(5.0, ge=0, le=300)
    # Several credentials, by name (issue 22); unset: the single-credential settings above.
    upstreams: dict[str, UpstreamConfig] = Field(default_factory=dict)

    redis_url: str | None = None
    redis_timeout: float = Field(0.1, gt=0, le=10)
    redis_max_connections: int = Field(64, ge=1, le=10_000)
    redis_retry_interval: float = Field(1.0, gt=0, le=60)
    redis_autopipeline: bool = True

    cache_ttl: int = Field(300, ge=0)
    cache_stale_ttl: int = Field(3600, ge=0)
    cache_stale_while_revalidate: bool = True
    cache_max_body_bytes: int = Field(8 * 1024 * 1024, ge=1)
    cache_memory_entries: int = Field(1024, ge=1)
    cache_memory_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    cache_l1_ttl: float = Field(1.0, ge=0)
    honor_client_no_cache: bool = False

    flight_lease_ms: int | None = Field(None, ge=100)
    flight_wait_timeout: float | None = Field(None, gt=0)

    clients: dict[str, ClientConfig] = Field(default_factory=dict)
    reports_enabled: Annotated[
        tuple[str, ...] | None, NoDecode, BeforeValidator(_to_report_list)
    ] = None
    reports: dict[str, ReportConfig] = Field(default_factory=dict)
    ttls: dict[str, TtlConfig] = Field(default_factory=dict)
    not_found_ttl: int = Field(5, ge=0, le=3600)
    auth_endpoints_enabled: bool = False
    public_url: str | None = None
    rate_limit: RateSetting = Field(default_factory=lambda: parse_rate("120/minute"))
    # Seconds a process may spend a reserved batch of a busy client's limit locally (0: off).
    rate_limit_reservation: float = Field(0.05, ge=0, le=1)
    replicas_hint: int = Field(1, ge=1, le=1000)
    admin_key_sha256: str | None = None
    admin_rate_limit: RateSetting = Field(default_factory=lambda: parse_rate("10/minute"))
    metrics_key_sha256: str | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    # Lines a process may hold for its writer thread; beyond, new lines are dropped and counted.
    log_queue_lines: int = Field(10_000, ge=10, le=1_000_000)
    # Seconds the exit may wait for stderr to take the last lines before leaving without them.
    log_flush_timeout: float = Field(1.0, ge=0, le=60)

    host: str = "0.0.0.0"
    port: int = Field(8080, ge=0, le=65535)
    workers: int = Field(0, ge=0, le=256)
    shutdown_timeout: float = Field(15.0, ge=0, le=600)
    drain_delay: float = Field(0.0, ge=0, le=600)
    client_header_timeout: float = Field(75.0, gt=0, le=3600)
    client_write_timeout: float = Field(30.0, gt=0, le=3600)
    # Per worker: bytes of large answers being written (each distinct body once); see README.
    client_write_buffer_bytes: int = Field(64 * 1024 * 1024, ge=1024 * 1024)
    # SO_SNDBUF of accepted connections (0: the kernel's autotuning); bounds kernel memory.
    client_sndbuf_bytes: int = Field(0, ge=0, le=64 * 1024 * 1024)

    # Writes (issue 21): the largest body a caller may send, how long an Idempotency-Key's
    # answer is kept, and how long a worker may use the collection generations it last read
    # from Redis (every write waits that long before answering, so no worker serves a read
    # from before it once it has been answered).
    max_request_body_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024)
    idempotency_ttl: int = Field(86400, ge=60, le=7 * 86400)
    generation_check_interval: float = Field(0.05, ge=0, le=5)

    @field_validator("upstream_url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http(s)://host[:port]")
        if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
            raise ValueError("must be scheme://host[:port] only, with no path, query or user")
        return f"{parts.scheme}://{parts.netloc}"

    @field_validator("public_url")
    @classmethod
    def _check_public_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be http(s)://host[:port][/path]")
        if parts.query or parts.fragment or parts.username:
            raise ValueError("must have no query, fragment or user")
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"

    @field_validator("ttls")
    @classmethod
    def _check_ttl_names(cls, value: dict[str, TtlConfig]) -> dict[str, TtlConfig]:
        operations = load_operations()
        known = set(operations) | operations.segments() | set(operations.ttl_classes)
        unknown = [name for name in value if name not in known]
        if unknown:
            raise ValueError(
                f"unknown name(s) {', '.join(unknown)}: use an operation id, a first path "
                "segment or a TTL class"
            )
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        scheme = urlsplit(value.strip()).scheme
        if scheme not in ("redis", "rediss", "unix", "redis+sentinel", "redis+cluster"):
            raise ValueError(
                "must start with redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://"
            )
        return value.strip()

    @field_validator("upstream_token")
    @classmethod
    def _check_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        return SecretStr(_check_token_value(value.get_secret_value()))

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(cls, value: dict[str, UpstreamConfig]) -> dict[str, UpstreamConfig]:
        for name in value:
            if not _UPSTREAM_NAME.fullmatch(name):
                raise ValueError(f"upstream name {name[:40]!r} must be 1-32 of a-z 0-9 _ -")
        served: dict[str, str] = {}
        for name, config in value.items():
            for provider in config.providers:
                if provider in served:
                    raise ValueError(
                        f"provider {provider} is served by both {served[provider]!r} and "
                        f"{name!r}; each provider needs exactly one credential"
                    )
                served[provider] = name
            if len(value) > 1 and not config.providers:
                raise ValueError(
                    f"upstream {name!r} lists no providers: with several upstreams each must "
                    "list the provider ids it serves"
                )
        tokens: dict[str, str] = {}
        for name, config in value.items():
            token = config.secret().get_secret_value()  # an unreadable file fails at start-up
            if token in tokens:
                raise ValueError(
                    f"upstreams {tokens[token]!r} and {name!r} hold the same credential: one "
                    "credential has one TeamUp budget (list all its providers under one name)"
                )
            tokens[token] = name
        return value

    @field_validator("upstream_auth_scheme")
    @classmethod
    def _check_scheme(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", value):
            raise ValueError("must be one word, such as Token or Bearer")
        return value

    @field_validator("upstream_provider_id", "upstream_request_mode")
    @classmethod
    def _check_header_value(cls, value: str | None) -> str | None:
        if value is not None and any(c in value for c in "\r\n\0"):
            raise ValueError("must not contain line breaks")
        return value or None

    @field_validator("upstream_provider_id")
    @classmethod
    def _check_provider_id(cls, value: str | None) -> str | None:
        return _provider_ids([value])[0] if value else None

    @field_validator("admin_key_sha256", "metrics_key_sha256")
    @classmethod
    def _check_admin(cls, value: str | None) -> str | None:
        return _check_sha256(value) if value else None

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator("reports_enabled")
    @classmethod
    def _check_enabled(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else _known_reports(value)

    @field_validator("reports")
    @classmethod
    def _check_report_names(cls, value: dict[str, ReportConfig]) -> dict[str, ReportConfig]:
        _known_reports(tuple(value))
        return value

    @field_validator("clients")
    @classmethod
    def _unique_keys(cls, value: dict[str, ClientConfig]) -> dict[str, ClientConfig]:
        digests = [client.key_sha256 for client in value.values()]
        if len(set(digests)) != len(digests):
            raise ValueError("two clients share one key_sha256")
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(f"client name {name[:64]!r} must be 1-64 of A-Z a-z 0-9 _ . -")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        self._check_upstream_choice()
        if self.flight_lease_ms is not None and self.flight_lease_ms < self.upstream_timeout * 1000:
            raise ValueError(
                "PROXY_FLIGHT_LEASE_MS must outlast PROXY_UPSTREAM_TIMEOUT, or a second replica "
                "fetches while the first still waits for TeamUp"
            )
        served = set(self.upstream_of)
        for name, client in self.clients.items():
            if client.providers is not None and not set(client.providers) <= served:
                continue  # named below
            cap = self.max_client_weight(client)
            if client.weight > cap:
                raise ValueError(
                    f"PROXY_CLIENTS ({name}.weight): {client.weight} is more than {cap}, the "
                    "units its upstream budget frees in half of PROXY_UPSTREAM_QUEUE_TIMEOUT; "
                    "a longer turn would make every other app's queued miss time out"
                )
        for name, client in self.clients.items():
            unknown = [p for p in client.providers or () if p not in served]
            if unknown:
                raise ValueError(
                    f"PROXY_CLIENTS ({name}.providers): no upstream serves provider(s) "
                    f"{', '.join(unknown)}; add them to an upstream's providers"
                )
        digests = {client.key_sha256 for client in self.clients.values()}
        if self.admin_key_sha256 is not None and self.admin_key_sha256 in digests:
            raise ValueError("PROXY_ADMIN_KEY_SHA256 must not be a client's key")
        return self

    def _check_upstream_choice(self) -> None:
        if self.upstreams:
            legacy = [
                name
                for name, value in (
                    ("PROXY_UPSTREAM_TOKEN", self.upstream_token),
                    ("PROXY_UPSTREAM_PROVIDER_ID", self.upstream_provider_id),
                    ("PROXY_UPSTREAM_REQUEST_MODE", self.upstream_request_mode),
                )
                if value is not None
            ]
            if legacy:
                raise ValueError(
                    f"PROXY_UPSTREAMS and {', '.join(legacy)} are both set: keep one (move the "
                    "single credential into PROXY_UPSTREAMS, see README)"
                )
        elif self.upstream_token is None:
            raise ValueError("PROXY_UPSTREAM_TOKEN: is required (or set PROXY_UPSTREAMS)")

    @functools.cached_property
    def upstream_list(self) -> tuple[Upstream, ...]:
        """Every credential, the default one first."""
        if not self.upstreams:
            assert self.upstream_token is not None
            providers = (
                _provider_ids([self.upstream_provider_id]) if self.upstream_provider_id else ()
            )
            return (
                Upstream(
                    DEFAULT_UPSTREAM,
                    self.upstream_token,
                    providers,
                    self.upstream_budget,
                    self.upstream_request_mode,
                ),
            )
        made = [
            Upstream(
                name,
                config.secret(),
                config.providers,
                (config.rate or self.upstream_rate_limit).with_burst(
                    config.burst or self.upstream_burst
                ),
                config.request_mode,
            )
            for name, config in self.upstreams.items()
        ]
        # The default: the one named `default`, else the first listed.
        made.sort(key=lambda up: up.name != DEFAULT_UPSTREAM)
        return tuple(made)

    @property
    def default_upstream(self) -> Upstream:
        """The credential of a client that names no provider (and has none of its own)."""
        return self.upstream_list[0]

    @functools.cached_property
    def keyed_providers(self) -> bool:
        """Whether keys name the provider: only when the proxy serves more than one."""
        return len(self.upstream_of) > 1

    @functools.cached_property
    def upstream_of(self) -> dict[str, Upstream]:
        """Each provider id, the credential that serves it."""
        return {provider: up for up in self.upstream_list for provider in up.providers}

    def client_providers(self, client: ClientConfig) -> tuple[str, ...]:
        """The providers a client may ask for; the first is the one it gets without asking."""
        if client.providers is not None:
            return client.providers
        return self.default_upstream.providers

    def tenant(self, name: str, client: ClientConfig, header: str | None) -> Tenant | TenantRefused:
        """The provider and credential for a request of client `name` whose
        `TeamUp-Provider-ID` header is `header` (None: absent): that provider if the client
        may use it, else the client's first provider (none: the default credential, no
        provider header, as with a single credential)."""
        allowed = self.client_providers(client)
        if header is None or not header.strip(" \t"):
            if not allowed:
                return Tenant(self.default_upstream, None)
            first = allowed[0]
            return Tenant(self.upstream_of[first], first, first if self.keyed_providers else None)
        text = header.strip(" \t")
        if not PROVIDER_ID.fullmatch(text):
            return TenantRefused(
                400,
                "parameter_invalid",
                "The TeamUp-Provider-ID header must be a provider id (1-18 digits).",
            )
        provider = str(int(text))
        upstream = self.upstream_of.get(provider)
        if provider not in allowed or upstream is None:
            return TenantRefused(
                403,
                "permission_denied",
                f"Client {name!r} may not act for provider {provider}. Operators: see "
                "`providers` in PROXY_CLIENTS and PROXY_UPSTREAMS.",
            )
        return Tenant(upstream, provider, provider if self.keyed_providers else None)

    @property
    def enabled_reports(self) -> frozenset[str] | None:
        """The reports routed (None: every report of the document)."""
        return None if self.reports_enabled is None else frozenset(self.reports_enabled)

    def report_ttls(self, report: str) -> tuple[int, int]:
        """(fresh, stale window) in seconds for `report`: its own, else the global ones."""
        own = self.reports.get(report)
        fresh = own.cache_ttl if own is not None and own.cache_ttl is not None else self.cache_ttl
        stale = (
            own.cache_stale_ttl
            if own is not None and own.cache_stale_ttl is not None
            else self.cache_stale_ttl
        )
        return fresh, stale

    def operation_ttls(self, operation: Operation, classes: Mapping[str, TtlClass]) -> TtlClass:
        """(fresh, stale window) for one read. The most specific setting wins: `PROXY_TTLS` by
        operation id, `PROXY_REPORTS` by report name, `PROXY_TTLS` by first path segment, then
        by TTL class; below those, a report's lifetimes are `PROXY_CACHE_TTL` /
        `PROXY_CACHE_STALE_TTL` and any other operation's are its class in the document
        (without a class: the global ones too)."""
        if operation.report is not None:
            fresh, stale = self.report_ttls(operation.report)
            report_own = self.reports.get(operation.report)
        else:
            own_class = classes.get(operation.ttl_class or "")
            fresh, stale = (
                (own_class.fresh, own_class.stale)
                if own_class is not None
                else (self.cache_ttl, self.cache_stale_ttl)
            )
            report_own = None
        layers = [
            self.ttls.get(operation.ttl_class or ""),
            self.ttls.get(operation.segment),
        ]
        for layer in layers:
            if layer is not None:
                fresh = layer.fresh if layer.fresh is not None else fresh
                stale = layer.stale if layer.stale is not None else stale
        if report_own is not None:
            fresh = report_own.cache_ttl if report_own.cache_ttl is not None else fresh
            stale = report_own.cache_stale_ttl if report_own.cache_stale_ttl is not None else stale
        own = self.ttls.get(operation.operation_id)
        if own is not None:
            fresh = own.fresh if own.fresh is not None else fresh
            stale = own.stale if own.stale is not None else stale
        return TtlClass(fresh, stale)

    @property
    def upstream_budget(self) -> Rate:
        """The global budget as the GCRA runs it: the steady rate, and a burst of at most
        `upstream_burst`, so no window of one period ever holds more than rate + burst calls."""
        return self.upstream_rate_limit.with_burst(self.upstream_burst)

    def max_client_weight(self, client: ClientConfig | None = None) -> int:
        """The largest `weight` a client may have: the units its credentials' budgets free in
        half the queue timeout (the slowest of them; at least 1). A client's turn in a fair
        queue then ends with half the timeout to spare for everyone waiting behind it (other
        workers and replicas take units from the same budget meanwhile). Without a queue
        (timeout 0) weights do nothing."""
        if self.upstream_queue_timeout <= 0:
            return 1000
        providers = self.client_providers(client) if client is not None else ()
        upstreams = {self.upstream_of[p].name: self.upstream_of[p] for p in providers}
        intervals = [up.budget.interval for up in upstreams.values()] or [
            self.default_upstream.budget.interval
        ]
        per_half = self.upstream_queue_timeout / 2 / max(intervals)
        return max(1, min(1000, math.floor(per_half)))

    @property
    def lease_ms(self) -> int:
        """The cross-replica fetch lease: a little longer than one upstream call. Its holder
        extends it while it queues for a budget slot (`RedisLease.kept`), so a crashed holder
        stalls the other replicas for at most this long."""
        return self.flight_lease_ms or int((self.upstream_timeout + 1.0) * 1000)

    @property
    def lease_wait(self) -> float:
        """How long a replica waits for another's fetch before fetching itself."""
        return self.flight_wait_timeout or self.upstream_queue_timeout + self.upstream_timeout + 0.5

    @property
    def processes(self) -> int:
        """Worker processes per replica (`PROXY_WORKERS`, 0 meaning one per CPU)."""
        return self.workers or os.cpu_count() or 1

    @property
    def upstream_headers(self) -> dict[str, str]:
        """Headers the proxy adds to every call with the default credential (the credential
        included; the provider header is added per call)."""
        return self.default_upstream.headers(self.upstream_auth_scheme)


class SettingsError(Exception):
    """Configuration that cannot start the proxy; the message is one line and secret-free."""


def _describe(exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        name = "PROXY_" + loc[0].upper() if loc else "settings"
        where = ".".join(loc[1:])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "missing" and not where:
            message = "is required"
        if not loc:  # a check across settings names them in its message
            problems.append(message)
            continue
        problems.append(f"{name}{f' ({where})' if where else ''}: {message}")
    return "invalid settings: " + "; ".join(problems)


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment, `.env` and the secrets directory, or fail in one line."""
    secrets_dir = os.environ.get("PROXY_SECRETS_DIR", DEFAULT_SECRETS_DIR)
    kwargs: dict[str, Any] = dict(overrides)
    if os.path.isdir(secrets_dir):
        kwargs["_secrets_dir"] = secrets_dir
    try:
        return Settings(**kwargs)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None
    except ValueError as exc:  # a JSON decoding error in a complex value, say
        field = re.search(r'field "(\w+)"', str(exc))
        name = f"PROXY_{field.group(1).upper()}" if field else "a setting"
        raise SettingsError(f"invalid settings: {name}: is not valid JSON") from None
