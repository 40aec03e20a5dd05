"""`GET /openapi.json`: the proxy's own OpenAPI 3.1 document, built once per app on first use.

Everything that is not a report (info, security, headers, error responses, admin and health
paths) is data in `proxy/spec/proxy-openapi.json`; every report path is generated from
the routed report operations — each parameter from its `Param`, i.e. from what the proxy accepts
(enums in either case, integers in bounds, arrays in any spelling), which is not quite what
TeamUp documents. Nothing here names a report but the legacy purge form.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import AsyncIterator, Iterable, Mapping
from importlib import resources
from typing import Any

import orjson
from aiohttp import web

from ..core.contract import INT_CEILING, Param, PathParam
from ..core.operations import Operation
from .handlers import LEGACY_PURGE_REPORT, STATE

__all__ = [
    "OPENAPI",
    "OpenAPIDocument",
    "build_document",
    "load_template",
    "openapi_context",
    "openapi_handler",
]

_RESPONSES = {
    "200": "Report",
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "ReportForbidden",
    "404": "NotFound",
    "405": "MethodNotAllowed",
    "414": "URITooLong",
    "429": "TooManyRequests",
    "502": "BadGateway",
    "503": "ServiceUnavailable",
    "504": "GatewayTimeout",
}
# Every answer of the report handler names the report; a 405 comes from the router, and a 400
# the HTTP parser makes never reaches the handler (so there the header is optional).
_NAMED = {code: code != "400" for code in _RESPONSES if code != "405"}
_SECURITY: list[dict[str, list[str]]] = [{"TokenAuth": []}, {"ApiKeyAuth": []}]

_DESCRIPTION = (
    "TeamUp's `GET {path}` ({summary}), answered from the cache when it can. Call it exactly as "
    "you would call TeamUp, with your own proxy key. Every parameter is validated (a bad one is "
    "a 400 naming it, and nothing reaches TeamUp) and canonicalised: parameter order, array "
    "spellings, leading zeros, datetime offsets and enum case do not change the answer or the "
    "cache key{defaults}. A stale copy is served (`Cache-Status: …; fwd=stale`) when TeamUp "
    "fails or the budget is spent. Other 4xx answers from TeamUp are passed through as they are."
)
_SPELLINGS = (
    "Accepted as repeated keys (`{name}=a&{name}=b`), as `{name}[]=` and comma-separated "
    "(`{name}=a,b`), in any mix; all spellings are the same question."
)


@functools.cache
def load_template() -> Mapping[str, Any]:
    """Everything of the document that is not per report (read once per process)."""
    data: Mapping[str, Any] = orjson.loads(
        resources.files("proxy.spec").joinpath("proxy-openapi.json").read_bytes()
    )
    return data


def build_document(
    reports: Mapping[str, Operation],
    reads: Iterable[Operation] = (),
    writes: Iterable[Operation] = (),
    providers: Iterable[str] = (),
) -> dict[str, Any]:
    """The proxy's document for the operations it routes: the template plus two path items
    (single and doubled slash) per report, sharing the report's parameters and responses
    (components named `<report>.<name>`), two per other routed read (`reads`, parameters
    inline), and the admin purge forms limited to those reports. With `providers` (the ids
    the proxy's credentials serve) every operation takes a `TeamUp-Provider-ID` header."""
    document = copy.deepcopy(dict(load_template()))
    components = document["components"]
    paths: dict[str, Any] = {}
    others = sorted(reads, key=lambda op: op.path)
    if others:
        components["responses"].update(_read_responses())
    for read in others:
        paths[read.path] = {"get": _read_operation(read, doubled=False)}
        paths[read.doubled_path] = {"get": _read_operation(read, doubled=True)}
    sent = sorted(writes, key=lambda op: (op.path, op.method))
    if sent:
        components["responses"].update(_write_responses())
    for write in sent:
        method = write.method.lower()
        paths.setdefault(write.path, {})[method] = _write_operation(write, doubled=False)
        paths.setdefault(write.doubled_path, {})[method] = _write_operation(write, doubled=True)
    for report in reports.values():
        for param in _parameters(report):
            components["parameters"][f"{report.label}.{param['name']}"] = param
        components["responses"].update(_responses(report.label))
        paths[report.path] = {"get": _operation(report, doubled=False)}
        paths[report.doubled_path] = {"get": _operation(report, doubled=True)}
    admin: dict[str, Any] = document["paths"]
    if reports:
        for path in ("/admin/cache/{report}", "/admin/cache/{report}/data"):
            admin[path]["delete"]["parameters"][0] = _report_parameter(reports)
    else:
        del admin["/admin/cache/{report}"], admin["/admin/cache/{report}/data"]
    legacy = reports.get(LEGACY_PURGE_REPORT)
    if legacy is not None:
        admin["/admin/cache"]["delete"]["parameters"] = _parameter_refs(legacy)
    del components["parameters"]["report"]
    served = sorted(providers, key=lambda p: (len(p), p))
    if served:
        components["parameters"]["TeamUp-Provider-ID"] = _provider_parameter()
        for path, item in paths.items():
            if path.startswith("/api/"):
                for operation in item.values():
                    ref = {"$ref": "#/components/parameters/TeamUp-Provider-ID"}
                    operation["parameters"].append(ref)
    document["paths"] = {**paths, **admin}
    return document


def _parameter_refs(report: Operation) -> list[dict[str, str]]:
    return [
        {"$ref": f"#/components/parameters/{report.label}.{name}"}
        for name in sorted(report.contract.params)
    ]


def _report_parameter(reports: Mapping[str, Operation]) -> dict[str, Any]:
    return {
        "name": "report",
        "in": "path",
        "required": True,
        "description": "A report this proxy routes (`PROXY_REPORTS_ENABLED`).",
        "schema": {"type": "string", "enum": list(reports)},
    }


def _camel(report: str) -> str:
    """`customers.grouped` → `CustomersGrouped`."""
    return "".join(word.capitalize() for word in report.replace(".", "_").split("_"))


def _operation(report: Operation, *, doubled: bool) -> dict[str, Any]:
    """One report's GET operation, at its single- or doubled-slash path."""
    summary = str(report.document.get("summary") or f"Rows of the {report.label} report")
    defaults = [
        f"`{p.name}={_shown(p.default)}`"
        for p in report.contract.params.values()
        if p.default is not None
    ]
    dropped = f"; documented defaults ({', '.join(defaults)}) are dropped" if defaults else ""
    description = _DESCRIPTION.format(
        path=report.path, summary=summary[:1].lower() + summary[1:], defaults=dropped
    )
    operation_id = f"get{_camel(report.label)}ReportData"
    if doubled:
        operation_id += "DoubleSlash"
        summary += ", at the doubled-slash path TeamUp's docs print"
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "tags": ["report"],
        "security": copy.deepcopy(_SECURITY),
        "parameters": [
            *_parameter_refs(report),
            {"$ref": "#/components/parameters/X-Request-ID"},
        ],
        "responses": {
            code: {"$ref": f"#/components/responses/{_response_name(report.label, code)}"}
            for code in _RESPONSES
        },
    }


_READ_DESCRIPTION = (
    "TeamUp's `GET {path}` ({summary}), answered from the cache when it can (TTL class "
    "`{ttl}`). Call it exactly as you would call TeamUp, with your own proxy key. Path and query "
    "parameters are validated (a bad path parameter is a 404, a bad query parameter a 400 "
    "naming it; nothing reaches TeamUp) and canonicalised. Absolute TeamUp API URLs in the "
    "answer (`next`, `previous`, related collections) point back at the proxy."
)
_READ_RESPONSES = {
    "200": "Read",
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "ReadForbidden",
    "404": "ReadNotFound",
    "414": "URITooLong",
    "429": "TooManyRequests",
    "502": "BadGateway",
    "503": "ServiceUnavailable",
    "504": "GatewayTimeout",
}


def _read_responses() -> dict[str, Any]:
    """The responses of the reads that are not reports (JSON or XML, TeamUp's shapes)."""
    template = load_template()["components"]["responses"]
    found = copy.deepcopy(template["Report"])
    found["description"] = (
        "TeamUp's answer: JSON, or XML with `format=xml`; from the cache or fetched now."
    )
    found["content"] = {
        "application/json": {"schema": {}},
        "application/xml": {"schema": {"type": "string"}},
    }
    forbidden = copy.deepcopy(template["ReportForbidden"])
    forbidden["description"] = (
        "Your client may not read this path (code `permission_denied`): its `read` list in "
        "`PROXY_CLIENTS` does not name the first segment after /api/v2/. Nothing was sent."
    )
    missing = copy.deepcopy(template["NotFound"])
    missing["description"] = (
        "No such path, or a malformed path parameter (code `not_found`, nothing sent), or "
        "TeamUp's own 404 for an unknown id, passed on (and kept a few seconds)."
    )
    missing["content"] = {"application/json": {"schema": {"type": "object"}}}
    return {"Read": found, "ReadForbidden": forbidden, "ReadNotFound": missing}


_WRITE_RESPONSES = {
    "2XX": "WriteAnswer",
    "400": "BadRequest",
    "401": "Unauthorized",
    "403": "WriteForbidden",
    "404": "ReadNotFound",
    "409": "IdempotencyConflict",
    "413": "PayloadTooLarge",
    "414": "URITooLong",
    "415": "UnsupportedMediaType",
    "422": "IdempotencyKeyReused",
    "429": "TooManyRequests",
    "502": "BadGateway",
    "503": "ServiceUnavailable",
}
_WRITE_DESCRIPTION = (
    "TeamUp's `{method} {path}` ({summary}), sent exactly once: never cached, coalesced or "
    "retried. Needs the first path segment in the client's `write` list. The body, if any, is "
    "JSON, forwarded byte for byte. With `Idempotency-Key` a repeat of the same request is "
    "answered from the first (`Idempotent-Replayed: true`), never sent again. A 2xx "
    "invalidates the cached reads of: {invalidates}."
)


def _write_responses() -> dict[str, Any]:
    """The responses of the writes (TeamUp's answer passed on, and the proxy's refusals)."""
    template = load_template()["components"]["responses"]

    def error(description: str) -> dict[str, Any]:
        found: dict[str, Any] = copy.deepcopy(template["ReportForbidden"])
        found["description"] = description
        return found

    answer = copy.deepcopy(template["Report"])
    answer["description"] = (
        "TeamUp's answer to the write, passed on (its 4xx too: TeamUp's own validation); "
        "`Idempotent-Replayed: true` on a repeat answered from the first."
    )
    answer["content"] = {"application/json": {"schema": {}}, "application/xml": {}}
    return {
        "WriteAnswer": answer,
        "WriteForbidden": error(
            "Your client may not write this path (code `permission_denied`): its `write` list "
            "in `PROXY_CLIENTS` does not name the first segment after /api/v2/. Nothing sent."
        ),
        "IdempotencyConflict": error(
            "A request with this Idempotency-Key is still being sent (`idempotency_key_in_use`)."
        ),
        "IdempotencyKeyReused": error(
            "This Idempotency-Key was used for another request (`idempotency_key_reused`)."
        ),
        "PayloadTooLarge": error(
            "The body is over `PROXY_MAX_REQUEST_BODY_BYTES` (`request_too_large`); not sent."
        ),
        "UnsupportedMediaType": error("The body is not JSON (`unsupported_media_type`); not sent."),
    }


def _write_operation(write: Operation, *, doubled: bool) -> dict[str, Any]:
    """One write, at its single- or doubled-slash path."""
    summary = str(write.document.get("summary") or write.operation_id)
    description = _WRITE_DESCRIPTION.format(
        method=write.method,
        path=write.path,
        summary=summary[:1].lower() + summary[1:],
        invalidates=", ".join(f"`{name}`" for name in write.invalidates) or "nothing",
    )
    if doubled:
        summary += ", at the doubled-slash path TeamUp's docs print"
    return {
        "operationId": write.operation_id + ("_double_slash" if doubled else ""),
        "summary": summary,
        "description": description,
        "tags": [write.area],
        "security": copy.deepcopy(_SECURITY),
        "parameters": [
            *(_path_parameter(p) for p in write.contract.path_params),
            *_parameters(write),
            {"$ref": "#/components/parameters/X-Request-ID"},
            {
                "name": "Idempotency-Key",
                "in": "header",
                "description": (
                    'Makes a retry safe: a structured-field string (`"…"`, 1 to 255 printable '
                    "characters; a bare token is accepted), per client, kept 24 h "
                    "(PROXY_IDEMPOTENCY_TTL)."
                ),
                "schema": {"type": "string", "maxLength": 257},
            },
        ],
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
        "responses": {
            code: {"$ref": f"#/components/responses/{name}"}
            for code, name in _WRITE_RESPONSES.items()
        },
    }


def _read_operation(read: Operation, *, doubled: bool) -> dict[str, Any]:
    """One non-report read's GET operation, at its single- or doubled-slash path."""
    summary = str(read.document.get("summary") or read.operation_id)
    description = _READ_DESCRIPTION.format(
        path=read.path, summary=summary[:1].lower() + summary[1:], ttl=read.ttl_class or "-"
    )
    operation_id = read.operation_id + ("_double_slash" if doubled else "")
    if doubled:
        summary += ", at the doubled-slash path TeamUp's docs print"
    return {
        "operationId": operation_id,
        "summary": summary,
        "description": description,
        "tags": [read.area],
        "security": copy.deepcopy(_SECURITY),
        "parameters": [
            *(_path_parameter(p) for p in read.contract.path_params),
            *_parameters(read),
            {"$ref": "#/components/parameters/X-Request-ID"},
        ],
        "responses": {
            code: {"$ref": f"#/components/responses/{name}"}
            for code, name in _READ_RESPONSES.items()
        },
    }


def _path_parameter(param: PathParam) -> dict[str, Any]:
    schema: dict[str, Any]
    if param.kind == "int":
        schema = {"type": "integer", "minimum": param.minimum if param.minimum is not None else 0}
        note = "An integer; leading zeros are fine (the same entry)."
    elif param.kind == "enum":
        schema = {"type": "string", "enum": list(param.choices)}
        note = "One of the documented values."
    else:
        schema = {"type": "string", "pattern": f"^(?:{param.pattern})$"}
        note = f"Matching `{param.pattern}`; never `/`, `.`, `..` or `%`."
    return {
        "name": param.name,
        "in": "path",
        "required": True,
        "description": note,
        "schema": schema,
    }


def _response_name(report: str, code: str) -> str:
    return f"{report}.{_RESPONSES[code]}" if code in _NAMED else _RESPONSES[code]


def _responses(report: str) -> dict[str, Any]:
    """The template's responses that the handler answers once it knows the report, with
    `X-Proxy-Report` (exactly this report), by component name."""
    template = load_template()["components"]["responses"]
    responses: dict[str, Any] = {}
    for code, required in _NAMED.items():
        response = copy.deepcopy(template[_RESPONSES[code]])
        response["headers"]["X-Proxy-Report"] = {
            "description": f"The report that answered: `{report}`.",
            "required": required,
            "schema": {"type": "string", "const": report},
        }
        responses[_response_name(report, code)] = response
    return responses


def _parameters(operation: Operation) -> list[dict[str, Any]]:
    """One OpenAPI query parameter per `Param` of the operation's contract, by name."""
    upstream = {
        str(spec["name"]): spec
        for spec in operation.document.get("parameters", ())
        if spec.get("in") == "query"
    }
    later = {low: high for low, high in operation.contract.ranges}
    earlier = {high: low for low, high in operation.contract.ranges}
    found = []
    for name in sorted(operation.contract.params):
        param = operation.contract.params[name]
        spec = upstream.get(name, {})
        notes = [str(spec.get("description", "")).strip()]
        if name in later:
            notes.append(f"Must not be later than `{later[name]}`.")
        if name in earlier:
            notes.append(f"Must not be earlier than `{earlier[name]}`.")
        item, note = _item_schema(param)
        notes.append(note)
        schema: dict[str, Any]
        result: dict[str, Any] = {"name": name, "in": "query"}
        if param.array:
            # An array that is present has at least one item: an empty item is an error.
            schema = {
                "type": "array",
                "items": item,
                "minItems": max(1, param.min_items),
                "maxItems": param.max_items,
            }
            notes.append(
                "Ordered: the order of the items is meaningful; exact duplicates are dropped."
                if param.ordered
                else "A set: order and duplicates carry no meaning."
            )
            notes.append(_SPELLINGS.format(name=name))
            result.update(style="form", explode=True)
        else:
            schema = item
        if param.required:
            result["required"] = True
            notes.append("Required.")
        if param.default is not None:
            schema["default"] = param.default
        result["description"] = " ".join(note for note in notes if note)
        result["schema"] = schema
        found.append(result)
    return found


def _item_schema(param: Param) -> tuple[dict[str, Any], str]:
    """The JSON Schema of one value (an array's item) as the proxy reads it, and a note."""
    if param.kind == "int":
        low = 0 if param.minimum is None else max(0, param.minimum)
        high = INT_CEILING if param.maximum is None else param.maximum
        note = "Plain digits; leading zeros are fine."
        return {"type": "integer", "minimum": low, "maximum": high}, note
    if param.kind == "bool":
        note = "`true` or `false`; `1` and `0` and any case are accepted too."
        return {"type": "boolean"}, note
    if param.kind == "date":
        return {"type": "string", "format": "date"}, "`YYYY-MM-DD`."
    if param.kind == "datetime":
        note = (
            "RFC 3339 with `Z` or an offset (an offset is required); at most microsecond "
            "precision; converted to UTC."
        )
        return {"type": "string", "format": "date-time"}, note
    if param.kind == "enum":
        choices = list(param.choices)
        if param.descending_prefix:
            choices += [f"-{choice}" for choice in param.choices]
        upper = [c.upper() for c in choices if c.isascii() and c.upper() != c]
        note = "Case-insensitive."
        if param.descending_prefix:
            note = "The report's column keys, case-insensitive; a leading `-` sorts descending."
        return {"type": "string", "enum": list(dict.fromkeys(choices + upper))}, note
    text: dict[str, Any] = {"type": "string", "minLength": 1}
    note = "Free text: trimmed, not blank, no control characters"
    if param.max_length is not None:
        text["maxLength"] = param.max_length
        note += f", at most {param.max_length} characters"
    if param.pattern is not None:
        # The contract matches the whole (trimmed) value; a JSON Schema pattern may match
        # anywhere, so one that is not anchored is.
        anchored = param.pattern.startswith("^") and param.pattern.endswith("$")
        text["pattern"] = param.pattern if anchored else f"^(?:{param.pattern})$"
        note += f", matching `{param.pattern}`"
    note += "."
    return text, note


def _shown(value: str | int | bool) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _provider_parameter() -> dict[str, Any]:
    """The `TeamUp-Provider-ID` request header, as this proxy's credentials serve it."""
    return {
        "name": "TeamUp-Provider-ID",
        "in": "header",
        "description": (
            "The TeamUp provider the call is for, as TeamUp's API takes it. The proxy forwards "
            "the call with the credential that serves that provider. Without it: your client's "
            "first provider (`providers` in PROXY_CLIENTS). A provider your client was not "
            "given: 403; a malformed id: 400. Nothing is sent to TeamUp for either."
        ),
        # A pattern, not the list: the document is served to anyone, and which providers
        # (businesses) one proxy serves is the operator's to tell.
        "schema": {"type": "string", "pattern": "^[0-9]{1,18}$"},
    }


class OpenAPIDocument:
    """One app's document: built and encoded on first use, then served as the same bytes
    (most apps in tests, and many workers, are never asked for it)."""

    __slots__ = ("_body", "_endpoints", "_providers", "_reads", "_writes")

    def __init__(
        self,
        reports: Mapping[str, Operation],
        reads: Iterable[Operation] = (),
        writes: Iterable[Operation] = (),
        providers: Iterable[str] = (),
    ) -> None:
        self._endpoints = reports
        self._reads = tuple(reads)
        self._writes = tuple(writes)
        self._providers = tuple(providers)
        self._body: bytes | None = None

    @property
    def body(self) -> bytes:
        if self._body is None:
            document = build_document(self._endpoints, self._reads, self._writes, self._providers)
            self._body = orjson.dumps(document)
        return self._body


OPENAPI = web.AppKey("openapi", OpenAPIDocument)


async def openapi_context(app: web.Application) -> AsyncIterator[None]:
    """The document of the reports this app routes (after the proxy's own cleanup context
    has chosen them)."""
    state = app[STATE]
    reads = (op for op in state.operations.values() if op.report is None)
    writes = state.writes.operations.values() if state.writes is not None else ()
    providers = state.settings.upstream_of  # the provider ids some credential serves
    app[OPENAPI] = OpenAPIDocument(state.reports, reads, writes, providers)
    yield


async def openapi_handler(request: web.Request) -> web.Response:
    """Serve the document."""
    return web.Response(body=request.app[OPENAPI].body, content_type="application/json")
