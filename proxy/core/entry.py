"""A cached answer: what is stored, how it is encoded, and when it is fresh or may be stored."""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field

import orjson

from .bodies import LARGE, BodyPool

__all__ = ["CACHEABLE_TYPES", "CachedResponse", "is_cacheable"]

_MAGIC = b"TP1"
_RAW, _ZLIB = b"r", b"z"
_LEN = struct.Struct(">I")
# Below this size compression saves too little to pay for the CPU on every hit.
_COMPRESS_MIN = 1024
CACHEABLE_TYPES = ("application/json", "text/csv", "application/xml", "text/xml")


@dataclass(frozen=True, slots=True, weakref_slot=True)  # weakref: BodyPool.hold
class CachedResponse:
    """One stored upstream answer: status, allowlisted headers, body and its freshness window."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float
    fresh_until: float
    header_map: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "header_map", dict(self.headers))

    @property
    def content_type(self) -> str:
        """The upstream `Content-Type`."""
        return self.header_map.get("Content-Type", "application/octet-stream")

    def is_fresh(self, now: float) -> bool:
        """Whether the entry may be served without asking upstream."""
        return now < self.fresh_until

    def ttl(self, now: float) -> int:
        """Seconds of freshness left (negative once stale), as `Cache-Status: ttl=` wants."""
        remaining = self.fresh_until - now
        return math.floor(remaining) if remaining >= 0 else -math.ceil(-remaining)

    def age(self, now: float) -> int:
        """Whole seconds since the entry was fetched (the `Age` header)."""
        return max(0, int(now - self.stored_at))

    def encode(self) -> bytes:
        """One Redis value: metadata and body, the body compressed when that pays."""
        meta = orjson.dumps(
            {"s": self.status, "h": self.headers, "t": self.stored_at, "f": self.fresh_until}
        )
        flag, payload = _RAW, self.body
        if len(self.body) >= _COMPRESS_MIN:
            packed = zlib.compress(self.body, 6)
            if len(packed) < len(self.body) * 0.9:
                flag, payload = _ZLIB, packed
        return b"".join((_MAGIC, flag, _LEN.pack(len(meta)), meta, payload))

    @classmethod
    def decode(cls, data: bytes, bodies: BodyPool | None = None) -> CachedResponse | None:
        """The entry `encode` wrote, or None for anything else (an old format, corruption).

        With `bodies`, a large body is taken from (or added to) the pool: a payload whose body
        is held already is not decompressed again."""
        if data[:3] != _MAGIC or len(data) < 8:
            return None
        try:
            flag = data[3:4]
            (meta_len,) = _LEN.unpack_from(data, 4)
            meta = orjson.loads(data[8 : 8 + meta_len])
            payload = memoryview(data)[8 + meta_len :]
            packed = flag == _ZLIB
            body = bodies.decoded(payload) if bodies is not None and packed else None
            if body is None:
                body = zlib.decompress(payload) if packed else bytes(payload)
            headers = tuple((str(k), str(v)) for k, v in meta["h"])
            entry = cls(int(meta["s"]), headers, body, float(meta["t"]), float(meta["f"]))
        except (ValueError, KeyError, TypeError, zlib.error, struct.error):
            return None
        if bodies is not None and len(body) >= LARGE:
            # Compressed payloads only: the same bytes stored raw would stand for another body.
            shared = bodies.hold(body, entry, payload if packed else None)
            object.__setattr__(entry, "body", shared)  # the same bytes, the pool's object
        return entry


def is_cacheable(status: int, headers: dict[str, str], body_size: int, max_bytes: int) -> bool:
    """200 answers of JSON, CSV or XML, under the size cap, that a shared cache may keep."""
    if status != 200 or body_size > max_bytes:
        return False
    if "Set-Cookie" in headers:
        return False
    content_type = headers.get("Content-Type", "").split(";")[0].strip().lower()
    if content_type not in CACHEABLE_TYPES:
        return False
    directives = {
        part.split("=")[0].strip().lower() for part in headers.get("Cache-Control", "").split(",")
    }
    return not directives & {"no-store", "private"}
