"""Links that page back through the proxy: upstream API URLs in a body, rewritten.

TeamUp's lists carry absolute `next` / `previous` URLs on its own host, and answers carry
absolute URLs of related collections. Passed through, they send callers straight to TeamUp.
Every `<upstream origin>/api/` (either scheme, JSON's `\\/` escaping too) becomes
`<PROXY_PUBLIC_URL>/api/`, or `/api/` (root-relative) when that is unset. The base comes from
settings only, never from a caller's `Host` or `X-Forwarded-*`: the entry is shared by every
caller, so a caller-chosen base would poison it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

__all__ = ["LinkRewriter"]


class LinkRewriter:
    """Rewrites one upstream origin's API URLs to one public base, in JSON or XML bytes."""

    def __init__(self, upstream_url: str, public_url: str | None) -> None:
        parts = urlsplit(upstream_url)
        base = (public_url or "").rstrip("/")
        pairs: list[tuple[bytes, bytes]] = []
        for scheme in ("https", "http"):
            origin = f"{scheme}://{parts.netloc}"
            pairs.append((f"{origin}/api/".encode(), f"{base}/api/".encode()))
            escaped = origin.replace("/", "\\/")
            pairs.append(
                (
                    f"{escaped}\\/api\\/".encode(),
                    f"{base.replace('/', chr(92) + '/')}\\/api\\/".encode(),
                )
            )
        self._pairs = tuple(pairs)
        # Any form of the host at all: the cheap test that skips bodies without links.
        self._host = parts.netloc.encode()

    def rewrite(self, body: bytes) -> bytes:
        """The body with every upstream API URL pointing at the proxy instead."""
        if self._host not in body:
            return body
        for old, new in self._pairs:
            if old in body:
                body = body.replace(old, new)
        return body
