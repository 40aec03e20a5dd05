"""Build proxy/spec/teamup.json from TeamUp's API pages (`proxy.spec.api_pages`).

Every operation of docs/upstream/api/endpoints.tsv becomes one OpenAPI operation with the `x-`
keys README's "Every TeamUp operation" lists. The 32 report data operations are kept as the
committed document states them (their parameters were reviewed by hand and are checked against
docs/upstream/reports by proxy/spec/report_pages.py); they only gain the keys every operation
has. Every judgement call the pages force is a table below, so a rerun gives the same document:
`scripts/extract-spec --write` writes it, `--check` fails when the committed one differs.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from typing import Any

from proxy.spec.api_pages import ApiPage, ApiParam

__all__ = [
    "DOTTED_PATH_PATTERN",
    "MAX_ITEMS",
    "MAX_TEXT",
    "PAGE_SIZE_DEFAULT",
    "SAFE_PATH_PATTERN",
    "TTL_CLASSES",
    "generate_document",
    "operation_id",
    "template_path",
    "ttl_class",
]

READ_KINDS = ("list", "retrieve", "other", "report-data")
# TeamUp's page size when a list is asked without one (the pages state only the maximum).
PAGE_SIZE_DEFAULT = 100
# A string path parameter the page gives no pattern for: one segment of plain characters, never
# `/`, `.` or `%` (so never `..` nor a percent-encoded separator).
SAFE_PATH_PATTERN = "^[A-Za-z0-9_-]+$"
# Base64 ids keep `+` and `=` (still one segment, no separator).
BASE64_PATH_PATTERN = "^[A-Za-z0-9+=_-]+$"
# Dotted names (`lead_form.submitted`): dots only between plain runs, so never `.` or `..`.
DOTTED_PATH_PATTERN = r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$"
# Bounds the proxy puts on what a read's query may hold (as on the report operations), so a
# canonical query, and the cache key made of it, stays small.
MAX_ITEMS = 200
MAX_TEXT = 100
# Integer arrays that are not lists of ids (their items may be 0); none outside the reports yet.
NOT_ID_LISTS: frozenset[str] = frozenset()
_PATH_PATTERNS = {
    # GET /crm/workflow_triggers/:trigger - the triggers other pages list are dotted names.
    "trigger": (
        DOTTED_PATH_PATTERN,
        "The page gives no pattern; the trigger names other pages list are dotted "
        "(`lead_form.submitted`, the `workflow_trigger` values of crm/workflow_actions).",
    ),
}

TTL_CLASSES: dict[str, dict[str, Any]] = {
    "reference": {
        "fresh": 3600,
        "stale": 86400,
        "why": (
            "Configuration an operator edits a few times a month (the provider, venues, rooms, "
            "membership types and terms, forms, fields, waivers, themes, settings): an hour "
            "fresh is far "
            "below how often it changes, and a day of stale answers rides out a TeamUp outage."
        ),
    },
    "standard": {
        "fresh": 60,
        "stale": 600,
        "why": (
            "Business records that change during the day (customers, events, memberships, "
            "invoices): a minute is as fresh as a schedule page or a membership check needs, and "
            "ten minutes of stale answers cover a short outage."
        ),
    },
    "volatile": {
        "fresh": 10,
        "stale": 60,
        "why": (
            "State that moves minute by minute and that a caller acts on (attendance, "
            "occupancy, account and trial status, usage, gift card balances, checkouts, job "
            "results): ten seconds "
            "still collapses a burst into one upstream call without serving yesterday's answer."
        ),
    },
    "report": {
        "fresh": 300,
        "stale": 3600,
        "why": (
            "The report data endpoints keep the proxy's CACHE_TTL / CACHE_STALE_TTL defaults "
            "(proxy/settings.py): aggregates over history, expensive upstream, rarely needed "
            "to the second."
        ),
    },
}
# First match wins; anything else that is read is `standard`.
_TTL_RULES: tuple[tuple[str, str], ...] = (
    (r"^/api/v2/reports/", "report"),
    (r"^/api/v2/auth/", "volatile"),
    (
        r"/(attendances|course_session_attendances)(/|$)|/account_status$|/share_status$"
        r"|/usage$|/allotment$|/trial_status$|/status$|^/api/v2/bulk_actions/|^/api/v2/checkouts"
        r"|/blocked_times$|/overrides$|/unavailable_upcoming_events$|/resolved$"
        r"|/payment_resolution$|/sms_account$|^/api/v2/external_calendars/events$"
        r"|^/api/v2/gift_cards/\{id\}$",
        "volatile",
    ),
    (
        r"^/api/v2/(venues|venue_rooms|memberships|membership_categories|membership_terms"
        r"|membership_payment_plans|membership_penalty_systems|customer_fields|customer_forms"
        r"|crm/lead_sources|crm/lead_forms|crm/workflow_action_types|crm/workflow_triggers"
        r"|crm/workflows|crm/workflow_actions|waivers|policy_versions|payment_processors"
        r"|content_filters|content_collections|discount_code_groups|feature_flags|applications"
        r"|communication/notification_types|integrations/wellhub|checkins/settings"
        r"|gift_cards/config|business_closures|availability_schedule_offering_types)(/|$)"
        r"|^/api/v2/providers(/\{id\})?$"
        r"|^/api/v2/providers/\{id\}/(theme|email_settings|customer_referral_settings)$",
        "reference",
    ),
)

# A parameter whose page type contradicts its description: the schema the document takes.
_READINGS = {
    # `instructors integer`, described as "comma-separated instructor id values, or use me".
    ("events_list", "instructors"): (
        {"type": "string", "pattern": "^([1-9][0-9]*|me)$"},
        "The page types this `integer` yet describes comma-separated instructor ids or `me`: "
        "read as a set of ids or `me`.",
    ),
}
ERROR_STATUSES = {
    "400": "The query breaks the contract; field_errors names each parameter and why.",
    "401": "Missing or invalid credential.",
    "403": "The credential may not read this.",
    "404": "No such object or operation.",
    "429": "Too many requests.",
}


def template_path(path: str) -> str:
    """`/api/v2/customers/:id` -> `/api/v2/customers/{id}`."""
    return re.sub(r":([a-z0-9_]+)", r"{\1}", path)


def operation_id(page: ApiPage) -> str:
    return page.stem.replace("-", "_")


def ttl_class(path: str) -> str:
    for pattern, name in _TTL_RULES:
        if re.search(pattern, path):
            return name
    return "standard"


def generate_document(
    pages: Sequence[ApiPage], committed: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The whole document; report data operations come from `committed` when it has them."""
    committed_paths: Mapping[str, Any] = (committed or {}).get("paths", {})
    paths: dict[str, dict[str, Any]] = {}
    for page in sorted(pages, key=lambda page: (template_path(page.path), page.method)):
        path = template_path(page.path)
        method = page.method.lower()
        if page.kind == "report-data":
            kept = committed_paths.get(path, {}).get(method)
            if kept is None:
                raise ValueError(f"{path}: report data operation missing from the document")
            operation = _report_operation(page, kept)
        else:
            operation = _operation(page, path)
        paths.setdefault(path, {})[method] = operation
    # An operation added by hand (no page in this copy, e.g. GET /api/v2/jobs/{id}) says why in
    # `x-added`, and is kept as it is.
    for path, item in committed_paths.items():
        for method, operation in item.items():
            if "x-added" in operation and method not in paths.get(path, {}):
                paths.setdefault(path, {})[method] = copy.deepcopy(operation)
    paths = dict(sorted(paths.items()))
    components = copy.deepcopy(dict((committed or {}).get("components", {})))
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    components["responses"] = {
        f"Error{code}": {"description": description, "content": error}
        for code, description in ERROR_STATUSES.items()
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "TeamUp API v2 (every documented operation)",
            "version": "v2",
            "description": (
                "The 353 operations of TeamUp's API (162 GET, 191 writes), restated from the "
                "documentation pages in docs/upstream/api by scripts/extract-spec, which also "
                "checks them (tests/test_spec_api.py checks again with a parse of its own). The "
                "32 report data operations are also checked against docs/upstream/reports "
                "(tests/test_spec_pages.py). x-tightened marks where this document is stricter "
                "than a page, x-implicit a value the page leaves unsaid (TeamUp's pagination "
                "defaults), x-note where a page contradicts itself and which reading was taken. "
                "x-area is the page's folder, x-kind the operation's family, x-ttl-class names "
                "one of x-ttl-classes, x-fields the top-level fields of one answer object as far "
                "as the page shows them. x-default-columns (the columns TeamUp returns without "
                "`columns`) are not on the pages: customer_credits gives the mock upstream's, "
                "the other reports the first eight columns, grouped reports none."
            ),
        },
        "servers": [{"url": "https://goteamup.com"}],
        "security": [{"TokenAuth": []}],
        "x-ttl-classes": copy.deepcopy(TTL_CLASSES),
        "paths": paths,
        "components": components,
    }


def _common(page: ApiPage, path: str) -> dict[str, Any]:
    common: dict[str, Any] = {
        "x-page": f"{page.folder}/{page.file}",
        "x-area": page.folder,
        "x-kind": page.kind,
    }
    if page.kind in READ_KINDS:
        common["x-ttl-class"] = ttl_class(path)
    if page.permissions:
        common["x-permissions"] = list(page.permissions)
    if page.feature_gated:
        common["x-feature-gated"] = True
    return common


def _report_operation(page: ApiPage, kept: Mapping[str, Any]) -> dict[str, Any]:
    operation = dict(copy.deepcopy(kept))
    for key in ("x-page", "x-area", "x-kind", "x-ttl-class", "x-permissions", "x-feature-gated"):
        operation.pop(key, None)
    operation.update(_common(page, template_path(page.path)))
    return operation


def _operation(page: ApiPage, path: str) -> dict[str, Any]:
    title = page.title.removeprefix("Endpoints_")
    operation: dict[str, Any] = {"operationId": operation_id(page), "summary": title}
    if page.summary.lower() not in title.lower():
        # The page's own heading where it says more than the title (`Retrieve a customer`).
        operation["description"] = page.summary
    operation.update(_common(page, path))
    if page.method == "GET" and page.fields:
        operation["x-fields"] = dict(page.fields)
    operation["security"] = [{"TokenAuth": []}]
    operation["parameters"] = [_parameter(page, param) for param in _ordered(page)]
    if page.method != "GET":
        operation["requestBody"] = {
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    operation["responses"] = _responses(page)
    return operation


def _ordered(page: ApiPage) -> list[ApiParam]:
    """Path parameters in path order, then the page's query and header parameters."""
    path_names = re.findall(r":([a-z0-9_]+)", page.path)
    by_name = {param.name: param for param in page.params if param.where == "path"}
    missing = [name for name in path_names if name not in by_name]
    if missing:
        raise ValueError(f"{page.file}: path parameters {missing} are not on the page")
    rest = [param for param in page.params if param.where != "path"]
    return [by_name[name] for name in path_names] + rest


def _parameter(page: ApiPage, param: ApiParam) -> dict[str, Any]:
    result: dict[str, Any] = {"name": param.name, "in": param.where}
    if param.required:
        result["required"] = True
    if param.description:
        result["description"] = param.description
    notes: list[str] = []
    tightened: list[str] = []
    implicit: list[str] = []
    if param.where == "path":
        result["schema"] = _path_schema(param, tightened, notes)
    elif param.where == "header":
        schema: dict[str, Any] = {"type": "string"}
        if param.enum is not None:
            schema["enum"] = list(param.enum)
        result["schema"] = schema
    else:
        result["schema"] = _query_schema(page, param, notes, tightened, implicit)
        if param.array or result["schema"].get("type") == "array":
            result["style"] = "form"
            result["explode"] = False
            result["x-canonical"] = "ordered" if param.name in ("sort", "columns") else "set"
    if tightened:
        result["x-tightened"] = "; ".join(tightened)
    if implicit:
        result["x-implicit"] = "; ".join(implicit)
    if notes:
        result["x-note"] = " ".join(notes)
    return result


def _path_schema(param: ApiParam, tightened: list[str], notes: list[str]) -> dict[str, Any]:
    if param.type == "integer":
        tightened.append("minimum 1: ids are positive")
        return {"type": "integer", "minimum": 1}
    schema: dict[str, Any] = {"type": "string"}
    if param.enum is not None:
        schema["enum"] = list(param.enum)
    elif param.pattern is not None:
        schema["pattern"] = param.pattern
    elif param.name in _PATH_PATTERNS:
        schema["pattern"], note = _PATH_PATTERNS[param.name]
        tightened.append("pattern: dotted plain segments; the page states none")
        notes.append(note)
    elif param.name.startswith("base64_"):
        schema["pattern"] = BASE64_PATH_PATTERN
        tightened.append("pattern: one base64 segment; the page states none")
    else:
        schema["pattern"] = SAFE_PATH_PATTERN
        tightened.append("pattern: one plain segment (no `/`, `.`, `%`); the page states none")
    return schema


def _scalar(type_: str | None) -> dict[str, Any]:
    if type_ == "date":
        return {"type": "string", "format": "date"}
    if type_ == "date-time":
        return {"type": "string", "format": "date-time"}
    if type_ == "email":
        return {"type": "string", "format": "email"}
    if type_ in ("number", "double"):
        return {"type": "number"}
    if type_ in ("integer", "boolean"):
        return {"type": type_}
    return {"type": "string"}


def _query_schema(
    page: ApiPage,
    param: ApiParam,
    notes: list[str],
    tightened: list[str],
    implicit: list[str],
) -> dict[str, Any]:
    override = _READINGS.get((operation_id(page), param.name))
    if override is not None:
        item_schema, note = override
        notes.append(note)
        tightened.append(f"maxItems {MAX_ITEMS}: the proxy's cap on a list")
        return {"type": "array", "items": dict(item_schema), "maxItems": MAX_ITEMS}
    item = _scalar(param.type)
    if param.enum is not None:
        values: list[Any] = list(param.enum)
        if item["type"] in ("integer", "number"):
            if all(re.fullmatch(r"-?[0-9]+", value) for value in param.enum):
                values = [int(value) for value in param.enum]
            else:
                notes.append(
                    f"The page types this `{param.type}` yet lists the values "
                    f"{list(param.enum)}: the values win, so it is a string."
                )
                item = {"type": "string"}
        item["enum"] = values
    if param.pattern is not None:
        item["pattern"] = param.pattern
    if param.max_length is not None:
        item["maxLength"] = param.max_length
    if param.non_empty and "enum" not in item and "pattern" not in item:
        item["minLength"] = 1
    if param.minimum is not None:
        item["minimum"] = param.minimum
    if param.maximum is not None:
        item["maximum"] = param.maximum
    read = page.method == "GET"
    if read and item == {"type": "string"} and not param.array:
        item["maxLength"] = MAX_TEXT
        tightened.append(f"maxLength {MAX_TEXT}: free text is bounded to keep cache keys small")
    schema: dict[str, Any]
    if param.array:
        if read and item["type"] == "integer" and "minimum" not in item:
            if param.name not in NOT_ID_LISTS:
                item["minimum"] = 1
                tightened.append("items minimum 1: ids are positive")
        schema = {"type": "array", "items": item}
        if param.min_items is not None:
            schema["minItems"] = param.min_items
        if param.max_items is not None:
            schema["maxItems"] = param.max_items
        elif read:
            schema["maxItems"] = MAX_ITEMS
            tightened.append(f"maxItems {MAX_ITEMS}: the proxy's cap on a list")
    else:
        schema = item
    if param.default is not None:
        schema["default"] = param.default
    _pagination(page, param, schema, tightened, implicit)
    return schema


def _pagination(
    page: ApiPage,
    param: ApiParam,
    schema: dict[str, Any],
    tightened: list[str],
    implicit: list[str],
) -> None:
    """TeamUp's pagination and `format` defaults, which the pages leave unsaid."""
    if param.name == "format" and schema.get("enum") == ["json", "xml"] and "default" not in schema:
        schema["default"] = "json"
        implicit.append("default json: TeamUp answers JSON unless asked for XML")
    if page.kind != "list":
        return
    if param.name == "page" and param.type == "integer":
        if "minimum" not in schema:
            schema["minimum"] = 1
            tightened.append("minimum 1: pages count from 1")
        if "default" not in schema:
            schema["default"] = 1
            implicit.append("default 1: the first page")
    if param.name == "page_size" and param.type == "integer":
        if "minimum" not in schema:
            schema["minimum"] = 1
            tightened.append("minimum 1: a page of nothing answers nothing")
        if "default" not in schema:
            schema["default"] = PAGE_SIZE_DEFAULT
            implicit.append(f"default {PAGE_SIZE_DEFAULT}: TeamUp's page size")


def _responses(page: ApiPage) -> dict[str, Any]:
    if page.kind == "list":
        ok: dict[str, Any] = {
            "description": (
                "One page: count, absolute next / previous URLs on TeamUp's host, results."
            ),
            "content": {
                "application/json": {"schema": _list_schema()},
                "application/xml": {},
            },
        }
    elif page.method == "GET":
        ok = {
            "description": "The object (x-fields lists its top-level fields).",
            "content": {"application/json": {"schema": {"type": "object"}}, "application/xml": {}},
        }
    elif page.kind == "report-export":
        ok = {
            "description": 'The export job: {"job": <id>}; the file is fetched when it is done.',
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    else:
        ok = {
            "description": "TeamUp's answer to the write.",
            "content": {"application/json": {"schema": {"type": "object"}}},
        }
    status = "204" if page.method == "DELETE" else "200"
    if status == "204":
        ok = {"description": "Deleted."}
    return {status: ok} | {
        code: {"$ref": f"#/components/responses/Error{code}"} for code in ERROR_STATUSES
    }


def _list_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "TeamUp's page of a list.",
        "required": ["count", "next", "previous", "results"],
        "properties": {
            "count": {"type": "integer", "description": "Objects in all pages."},
            "next": {
                "type": ["string", "null"],
                "format": "uri",
                "description": "The next page: an absolute URL on TeamUp's host.",
            },
            "previous": {
                "type": ["string", "null"],
                "format": "uri",
                "description": "The previous page: an absolute URL on TeamUp's host.",
            },
            "results": {"type": "array", "items": {"type": "object"}},
        },
    }
