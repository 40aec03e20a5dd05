"""The mock TeamUp's writes: every documented POST/PUT/PATCH/DELETE is accepted (the body, when
there is one, must be a JSON object), counted and recorded byte for byte, and applied to the
generated data where that is plain — an update of a retrieve's object (PATCH/PUT), a delete
(DELETE), a create in a list (POST) — so that a read after a write shows the change.

Write faults (`PUT /_mock/write-faults`, `{"when": "before"|"after", "status": 500 | null,
"drop": false, "times": 1}`) fail a write before it is done (nothing changes) or after (the
change is made, then the answer is an error or a dropped connection). The read faults of
`/_mock/faults` apply to writes too, before anything is done. A write fault with `credential`
(a label: "default", "tenant0", ...) and/or `provider` fails only the matching writes.

Each provider's data is its own (see create_mock_app's `providers` and `tenants`): a write for
provider 101 changes 101's data only.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson
from aiohttp import web

from ..core.operations import Operation as DocOperation
from ..core.operations import load_operations
from .data import entity_id
from .document import Operation, Param
from .mock import (
    _CATALOG,
    _NEW_CATALOG,
    Who,
    _drop,
    _guarded,
    _json_error,
    _route,
    catalog_for,
    who,
)
from .objects import Catalog, _kind

__all__ = ["MOCK_WRITES", "MockWrites", "WriteFaults", "install_writes"]


@dataclass
class WriteFaults:
    """Fail the next `times` writes `before` or `after` they are done (only those of the
    credential label `credential` and/or for `provider`, when set)."""

    when: str = "before"
    status: int | None = None
    drop: bool = False
    times: int | None = None
    credential: str | None = None
    provider: str | None = None


@dataclass
class RecordedWrite:
    """One write as received (the body byte for byte, decoded as Latin-1 to keep every byte)."""

    operation: str
    method: str
    path: str
    query_string: str
    headers: dict[str, str]
    body: str
    credential: str | None = None  # the credential's label, never the token (None: unknown)
    provider: str | None = None  # the provider it acted for


@dataclass
class MockWrites:
    """What the mock's writes saw and changed."""

    faults: WriteFaults = field(default_factory=WriteFaults)
    received: list[RecordedWrite] = field(default_factory=list)
    deleted: set[tuple[str, tuple[str, ...], int]] = field(default_factory=set)
    created: dict[str, int] = field(default_factory=dict)  # per collection template

    def received_by(
        self, credential: str | None = None, provider: str | None = None
    ) -> list[RecordedWrite]:
        """The writes of a credential label and/or for a provider (None: any)."""
        return [
            w
            for w in self.received
            if (credential is None or w.credential == credential)
            and (provider is None or w.provider == provider)
        ]


MOCK_WRITES = web.AppKey("mock_writes", MockWrites)


class WritableCatalog(Catalog):
    """The generated data with the writes applied: deleted objects are gone, created ones
    exist."""

    def __init__(self, operations: Sequence[Operation], seed: int, writes: MockWrites) -> None:
        super().__init__(operations, seed)
        self.writes = writes

    def size_of(self, template: str) -> int:
        return super().size_of(template) + self.writes.created.get(template, 0)

    def exists(self, operation: Operation, values: Sequence[str]) -> bool:
        if not super().exists(operation, values):
            return False
        if operation.kind != "retrieve":
            return True
        key = operation.collection
        index = self.index(key, operation.path_params[-1], values[-1])
        return (key, tuple(values[:-1]), index or 0) not in self.writes.deleted


def _take(faults: WriteFaults, when: str, caller: Who) -> WriteFaults | None:
    if faults.when != when or (faults.status is None and not faults.drop):
        return None
    if faults.credential is not None and faults.credential != caller.credential:
        return None
    if faults.provider is not None and faults.provider != caller.provider:
        return None
    if faults.times is not None:
        if faults.times <= 0:
            return None
        faults.times -= 1
    return copy.copy(faults)


def _failed(request: web.Request, fault: WriteFaults) -> web.Response:
    if fault.drop:
        return _drop(request)
    status = fault.status or 500
    return _json_error(status, {"detail": "A server error occurred."})


@dataclass(frozen=True, slots=True)
class _Target:
    """Where a write lands in the generated data."""

    action: str  # update | delete | create | other
    collection: str  # the collection template
    member: Param | None  # the retrieve's last path parameter


def _targets(reads: Sequence[Operation]) -> dict[str, Operation]:
    return {op.path: op for op in reads if op.kind in ("retrieve", "list")}


def _target(write: DocOperation, reads: Mapping[str, Operation]) -> _Target:
    read = reads.get(write.path)
    if read is not None and read.kind == "retrieve" and write.method in ("PATCH", "PUT"):
        return _Target("update", read.collection, read.path_params[-1])
    if read is not None and read.kind == "retrieve" and write.method == "DELETE":
        return _Target("delete", read.collection, read.path_params[-1])
    if read is not None and read.kind == "list" and write.method == "POST":
        return _Target("create", read.collection, None)
    return _Target("other", "", None)


def _apply(
    catalog: WritableCatalog, target: _Target, values: Sequence[str], data: dict[str, Any]
) -> tuple[int, Any]:
    """Change the data; the status and body TeamUp would answer."""
    if target.action == "other":
        return 200, {"detail": "OK"}
    if target.collection not in catalog.collections:
        return (204, None) if target.action == "delete" else (200, data)
    key = target.collection
    if target.action == "create":
        parents = tuple(values)
        members = catalog.members(key, parents)  # generated now, before it grows
        template = catalog.obj(key, parents, 0)
        created = catalog.writes.created.get(key, 0)
        index = catalog.collections[key].size + created
        catalog.writes.created[key] = created + 1
        obj = {**copy.deepcopy(template), **data}
        obj["id"] = entity_id(_kind(key), index)
        catalog._objects[(key, parents, index)] = obj
        catalog._members[(key, parents)] = (*members, obj)
        return 201, obj
    assert target.member is not None
    parents = tuple(values[:-1])
    found = catalog.index(key, target.member, values[-1])
    if found is None or (key, parents, found) in catalog.writes.deleted:
        return 404, {"detail": "Not found."}
    obj = catalog.obj(key, parents, found)
    catalog.members(key, parents)  # generated before the change, so it holds this object
    if target.action == "delete":
        catalog.writes.deleted.add((key, parents, found))
        members = catalog._members.get((key, parents), ())
        catalog._members[(key, parents)] = tuple(m for m in members if m is not obj)
        return 204, None
    obj.update({k: v for k, v in data.items() if k != "id"})
    return 200, obj


def _handler(write: DocOperation, target: _Target) -> Any:
    async def handle(request: web.Request) -> web.StreamResponse:
        writes = request.app[MOCK_WRITES]
        raw = await request.read()
        path, _, query = request.raw_path.partition("?")
        caller = who(request)
        writes.received.append(
            RecordedWrite(
                write.operation_id,
                request.method,
                path,
                query,
                {str(k): v for k, v in request.headers.items()},
                raw.decode("latin-1"),
                caller.credential,
                caller.provider,
            )
        )
        values = [request.match_info.get(f"p{i}", "") for i in range(write.path.count("{"))]
        outcome: dict[str, web.StreamResponse] = {}

        def answer() -> web.Response:
            data: Any = {}
            if raw:
                try:
                    data = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    return _json_error(400, {"detail": "JSON parse error."})
                if not isinstance(data, dict):
                    return _json_error(400, {"detail": "Expected a JSON object."})
            before = _take(writes.faults, "before", caller)
            if before is not None:
                if before.drop:
                    outcome["drop"] = _drop(request)
                    return web.Response()
                return _failed(request, before)
            catalog = catalog_for(request)
            assert isinstance(catalog, WritableCatalog)
            status, body = _apply(catalog, target, values, data)
            after = _take(writes.faults, "after", caller)
            if after is not None and status < 300:
                if after.drop:
                    outcome["drop"] = _drop(request)
                    return web.Response()
                return _failed(request, after)
            if body is None:
                return web.Response(status=status)
            response = web.Response(
                status=status, body=orjson.dumps(body), content_type="application/json"
            )
            if status == 201:  # where the created object is, as DRF's CreateModelMixin says
                response.headers["Location"] = (
                    f"{request.scheme}://{request.host}{path.rstrip('/')}/{body['id']}"
                )
            return response

        return await _guarded(request, "", write.operation_id, answer)

    return handle


async def _put_faults(request: web.Request) -> web.Response:
    try:
        data = orjson.loads(await request.read())
        if not isinstance(data, dict) or data.get("when", "before") not in ("before", "after"):
            raise ValueError("a JSON object; when: before | after")
        faults = WriteFaults(**data)
    except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
        return _json_error(400, {"detail": str(exc)})
    request.app[MOCK_WRITES].faults = faults
    return web.Response(body=orjson.dumps(asdict(faults)), content_type="application/json")


async def _list_writes(request: web.Request) -> web.Response:
    writes = request.app[MOCK_WRITES]
    body = [asdict(w) for w in writes.received]
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _forget_writes(request: web.Request) -> web.Response:
    request.app[MOCK_WRITES].received.clear()
    return web.Response(status=204)


def install_writes(app: web.Application, reads: Sequence[Operation], seed: int) -> None:
    """Route every documented write of the shipped document on the mock app."""
    writes = MockWrites()
    app[MOCK_WRITES] = writes
    app[_CATALOG] = WritableCatalog(reads, seed, writes)
    # Another provider's data: its own deleted and created objects (its MockWrites holds only
    # those; what was received is recorded in the app's).
    app[_NEW_CATALOG] = lambda data_seed: WritableCatalog(reads, data_seed, MockWrites())
    by_path = _targets(reads)
    ops = [op for op in load_operations().values() if not op.is_read]
    # A static path before a template that could match it (as the reads do).
    for op in sorted(ops, key=lambda o: o.path.count("{")):
        handler = _handler(op, _target(op, by_path))
        route = _route(op.path)
        app.router.add_route(op.method, route, handler)
        app.router.add_route(op.method, route.replace("/api/v2/", "/api/v2//", 1), handler)
    app.router.add_route("PUT", "/_mock/write-faults", _put_faults)
    app.router.add_route("GET", "/_mock/writes", _list_writes)
    app.router.add_route("DELETE", "/_mock/writes", _forget_writes)
