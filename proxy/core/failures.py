"""Why an upstream answer could not be given: a small closed set of kinds, and the failure."""

from __future__ import annotations

from enum import StrEnum

import orjson

__all__ = ["FailureKind", "UpstreamFailure"]


class FailureKind(StrEnum):
    """What stopped a fetch. The value is what metrics, logs and `Cache-Status` detail show."""

    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"
    CREDENTIAL = "credential"
    RATE_LIMITED = "rate_limited"
    BUDGET = "budget"
    CIRCUIT = "circuit"
    UPSTREAM_ERROR = "upstream_error"
    REFRESHING_ELSEWHERE = "refreshing_elsewhere"
    TOO_LARGE = "too_large"
    INVALID_RESPONSE = "invalid_response"
    OUTCOME_UNKNOWN = "outcome_unknown"  # a write sent, and no answer: done or not, unknown

    @property
    def code(self) -> str:
        """The `code` of the proxy's error body for this kind."""
        return _CODES.get(self, "upstream_unavailable")


_CODES = {
    FailureKind.TIMEOUT: "upstream_timeout",
    FailureKind.UNREACHABLE: "upstream_unreachable",
    FailureKind.CREDENTIAL: "upstream_credential_rejected",
    FailureKind.RATE_LIMITED: "upstream_rate_limited",
    FailureKind.BUDGET: "upstream_budget_exhausted",
    FailureKind.CIRCUIT: "upstream_rate_limited",
    FailureKind.UPSTREAM_ERROR: "upstream_error",
    FailureKind.TOO_LARGE: "upstream_response_too_large",
    FailureKind.INVALID_RESPONSE: "upstream_invalid_response",
    FailureKind.OUTCOME_UNKNOWN: "upstream_outcome_unknown",
}


class UpstreamFailure(Exception):
    """TeamUp could not give an answer the caller may see; `status` is what the proxy answers."""

    def __init__(
        self,
        kind: FailureKind,
        status: int,
        message: str,
        *,
        retry_after: float | None = None,
        upstream_status: int | None = None,
        elapsed: float | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = FailureKind(kind)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.upstream_status = upstream_status
        self.elapsed = elapsed

    def to_bytes(self) -> bytes:
        """What a lease holder leaves for the replicas that waited on its fetch."""
        return orjson.dumps(
            [self.kind, self.status, self.message, self.retry_after, self.upstream_status]
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> UpstreamFailure:
        """The failure another replica's fetch ended in."""
        kind, status, message, retry_after, upstream_status = orjson.loads(data)
        return cls(
            FailureKind(kind),
            status,
            message,
            retry_after=retry_after,
            upstream_status=upstream_status,
        )
