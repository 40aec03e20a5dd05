"""A faithful fake TeamUp API (every GET of proxy/spec/teamup.json: the report data endpoints,
the lists, retrieves and other reads): the demo backend and the test double."""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import hmac
import io
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

from .data import (
    END,
    FIRST_NAMES,
    LAST_NAMES,
    START,
    Row,
    _singular,
    csv_value,
    group,
    label,
    matcher,
    provider_seed,
    rows,
    sort_key,
)
from .data import money as _money
from .document import Endpoint, Operation, Param, endpoints, operations
from .objects import Catalog, page_url, resolve, sort_members, to_xml

__all__ = [
    "DEFAULT_COLUMNS",
    "MOCK_STATE",
    "PROVIDER_HEADER",
    "REPORT_PATH",
    "Credential",
    "Faults",
    "MockState",
    "RecordedRequest",
    "create_mock_app",
    "main",
    "parse_tenants",
]

REPORT_PATH = "/api/v2/reports/customer_credits/data"
PROVIDER_HEADER = "TeamUp-Provider-ID"
DEFAULT_LABEL = "default"


@dataclass
class Faults:
    """Mutable switches applied to report requests (and every other call). With `credential` (a
    label: "default", "tenant0", ...) and/or `provider` set, every switch, latency included,
    applies only to the calls of that credential / for that provider."""

    latency: float = 0.0
    status: int | None = None
    retry_after: int | None = None
    times: int | None = None
    hang: bool = False
    drop: bool = False
    set_cookie: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)
    credential: str | None = None
    provider: str | None = None


@dataclass
class RecordedRequest:
    """One report request as received."""

    query_string: str
    headers: dict[str, str]
    path: str = ""  # as received, e.g. /api/v2//reports/customers.grouped/data
    report: str = ""  # the report it asked for, e.g. customers.grouped
    at: float = field(default_factory=time.time)  # when it arrived (wall clock)
    operation: str = ""  # the operationId it asked for, e.g. events_list
    # The label of the credential it carried (never the token; None: no known credential) and
    # the provider it acted for (None: none; a token without providers: the header as sent).
    credential: str | None = None
    provider: str | None = None


@dataclass(frozen=True, slots=True)
class Credential:
    """A token the mock accepts, its label (what recordings and fault filters name) and the
    providers it may act for (None: any `TeamUp-Provider-ID`, unchecked, as the mock always did)."""

    label: str
    token: str = field(repr=False)
    providers: tuple[str, ...] | None


@dataclass
class MockState:
    """What the mock saw, and the faults it applies."""

    token: str
    faults: Faults
    calls: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    report_calls: dict[str, int] = field(default_factory=dict)  # calls by report name
    operation_calls: dict[str, int] = field(default_factory=dict)  # calls by operationId
    # The providers `token` may act for (None: any header, unchecked), and more credentials:
    # token -> providers, labelled "tenant0", "tenant1", ... in the map's order.
    providers: tuple[str, ...] | None = None
    tenants: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def credentials(self) -> tuple[Credential, ...]:
        """Every accepted credential: the tenants in order, then `token` ("default") unless a
        tenant has the same token."""
        found = [Credential(f"tenant{i}", t, p) for i, (t, p) in enumerate(self.tenants.items())]
        if self.token not in self.tenants:
            found.append(Credential(DEFAULT_LABEL, self.token, self.providers))
        return tuple(found)

    def credential_for(self, token: str) -> Credential | None:
        """The credential a token is (every one compared in constant time), None if none."""
        found = None
        for credential in self.credentials():
            if hmac.compare_digest(token.encode(), credential.token.encode()):
                found = credential
        return found

    def label_of(self, token: str) -> str | None:
        """The label a token is recorded under ("default", "tenant0", ...), None if unknown."""
        credential = self.credential_for(token)
        return None if credential is None else credential.label

    def requests_by(
        self, credential: str | None = None, provider: str | None = None
    ) -> list[RecordedRequest]:
        """The recorded calls of a credential label and/or for a provider (None: any)."""
        return [
            r
            for r in self.requests
            if (credential is None or r.credential == credential)
            and (provider is None or r.provider == provider)
        ]

    def calls_by(self, credential: str | None = None, provider: str | None = None) -> int:
        """How many calls a credential label made and/or were for a provider (None: any)."""
        return len(self.requests_by(credential, provider))

    def reset(self) -> None:
        """Forget calls and requests; faults back to their defaults (the same object)."""
        self.calls = 0
        self.requests.clear()
        self.report_calls.clear()
        self.operation_calls.clear()
        _assign_faults(self.faults, Faults())


MOCK_STATE = web.AppKey("mock_state", MockState)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_RELEASE_HANGS = web.AppKey("mock_release_hangs", asyncio.Event)
_SEED = web.AppKey("mock_seed", int)
_CATALOG = web.AppKey("mock_catalog", Catalog)
# The catalogs of the providers (the default one, of `seed`, is _CATALOG), and how to make one.
_CATALOGS = web.AppKey("mock_catalogs", dict[str, Catalog])
_NEW_CATALOG: web.AppKey[Callable[[int], Catalog]] = web.AppKey("mock_new_catalog")


def _assign_faults(target: Faults, source: Faults) -> None:
    for f in fields(Faults):
        setattr(target, f.name, getattr(source, f.name))


# --- generated data -------------------------------------------------------------------------

_N_CREDITS = 3000
_N_CUSTOMERS = 300
_START, _END, _FIRST, _LAST = START, END, FIRST_NAMES, LAST_NAMES
_TOP_UPS = (500, 1000, 1250, 2000, 2500, 4500, 5000, 10000)
_USES = (500, 1000, 1250, 1500)
_TOP_UP_MEMOS = (
    "Purchased credit pack",
    "Gift card redeemed",
    'Promotion: "welcome" bonus',
    "Refund, cancelled class",
)
_USE_MEMOS = ("Class booking", "Personal training session", "Workshop, weekend intensive")


@dataclass(frozen=True, slots=True)
class _Credit:
    id: int
    customer: dict[str, Any]
    created_ts: int
    created_at: str
    amount_cents: int
    balance_cents: int
    amount: dict[str, Any]
    balance: dict[str, Any]
    memo: str


@functools.cache
def _credits(seed: int) -> tuple[_Credit, ...]:
    """The report's rows for a seed, in id (= creation) order; pure, so cached."""
    rng = random.Random(seed)
    customers: list[dict[str, Any]] = []
    for customer_id in sorted(rng.sample(range(1000, 100000), _N_CUSTOMERS)):
        first, last = rng.choice(_FIRST), rng.choice(_LAST)
        email = f"{first}.{last}{customer_id}@example.com".lower().replace("'", "")
        customers.append({"id": customer_id, "name": f"{first} {last}", "email": email})
    stamps = sorted(rng.randint(_START, _END) for _ in range(_N_CREDITS))
    balances: dict[int, int] = {}
    out: list[_Credit] = []
    for credit_id, stamp in enumerate(stamps, start=1):
        customer = rng.choice(customers)
        balance = balances.get(customer["id"], 0)
        if balance >= 500 and rng.random() < 0.45:
            amount, memo = -min(balance, rng.choice(_USES)), rng.choice(_USE_MEMOS)
        else:
            amount, memo = rng.choice(_TOP_UPS), rng.choice(_TOP_UP_MEMOS)
        balance += amount
        balances[customer["id"]] = balance
        created_at = datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out.append(
            _Credit(
                credit_id,
                customer,
                stamp,
                created_at,
                amount,
                balance,
                _money(amount),
                _money(balance),
                memo,
            )
        )
    return tuple(out)


# --- rows -----------------------------------------------------------------------------------


@functools.cache
def _credit_rows(seed: int) -> tuple[Row, ...]:
    """The customer-credits rows in the shape every report's rows have."""
    return tuple(
        Row(
            credit.id,
            {
                "customer.id": credit.customer["id"],
                "customer": credit.customer,
                "customer.name": credit.customer["name"],
                "customer.email": credit.customer["email"],
                "created_at": credit.created_at,
                "amount": credit.amount,
                "balance": credit.balance,
                "memo": credit.memo,
            },
            {"created_at": float(credit.created_ts)},
        )
        for credit in _credits(seed)
    )


def _table(seed: int, endpoint: Endpoint) -> tuple[Row, ...]:
    if endpoint.report == "customer_credits":
        return _credit_rows(seed)
    return rows(seed, endpoint.report)


# The columns a report has when `columns` is not given (the document's x-default-columns).
DEFAULT_COLUMNS = endpoints()["customer_credits"].default_columns


# --- the query ------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?")
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_INT_REQUIRED = "A valid integer is required."
_DATETIME_FORMAT = (
    "Datetime has wrong format. Use one of these formats instead: "
    "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)
_DATE_FORMAT = "Date has wrong format. Use one of these formats instead: YYYY-MM-DD."
# Django REST framework's BooleanField spellings.
_TRUE = frozenset({"t", "T", "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On"})
_TRUE |= {"ON", "1"}
_FALSE = frozenset({"f", "F", "n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off"})
_FALSE |= {"OFF", "0"}
_PAGING = frozenset({"limit", "offset", "page", "page_size"})


@dataclass(frozen=True, slots=True)
class _Query:
    columns: tuple[str, ...]
    sort: tuple[tuple[str, bool], ...]
    given: Mapping[str, Any]  # the other parameters given, parsed
    offset: int
    limit: int
    format: str


class _InvalidParams(Exception):
    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class _Bad:
    """A value that failed (its errors are recorded)."""


_BAD = _Bad()


class _Values:
    """Reads one parameter at a time, collecting every error (as DRF does)."""

    def __init__(self, query: MultiMapping[str]) -> None:
        self.query = query
        self.errors: dict[str, list[str]] = {}

    def fail(self, name: str, message: str) -> None:
        self.errors.setdefault(name, []).append(message)

    def scalar(self, name: str) -> str | None:
        values = self.query.getall(name, [])
        # Django's QueryDict.get answers the last of repeated values.
        return values[-1] if values else None

    def items(self, name: str) -> list[str] | None:
        values = self.query.getall(name, [])
        return [item for value in values for item in value.split(",")] if values else None

    def bounds(self, param: Param, name: str, number: float) -> None:
        if param.minimum is not None and number < param.minimum:
            self.fail(name, f"Ensure this value is greater than or equal to {param.minimum}.")
        if param.maximum is not None and number > param.maximum:
            self.fail(name, f"Ensure this value is less than or equal to {param.maximum}.")

    def value(self, param: Param, text: str) -> Any:
        """One value (or array item) of a parameter's kind, or _BAD."""
        name, kind = param.name, param.kind
        if kind == "integer":
            if not _DIGITS.fullmatch(text):
                self.fail(name, _INT_REQUIRED)
                return _BAD
            self.bounds(param, name, int(text))
            return int(text)
        if kind == "number":
            if not _NUMBER.fullmatch(text):
                self.fail(name, "A valid number is required.")
                return _BAD
            self.bounds(param, name, float(text))
            return float(text)
        if kind == "boolean":
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
            self.fail(name, "Must be a valid boolean.")
            return _BAD
        if kind == "date":
            try:
                day = datetime.fromisoformat(text) if _DAY.fullmatch(text) else None
            except ValueError:
                day = None
            if day is None:
                self.fail(name, _DATE_FORMAT)
                return _BAD
            return day.replace(tzinfo=UTC).timestamp()
        if kind == "date-time":
            try:
                moment = datetime.fromisoformat(text)
            except ValueError:
                self.fail(name, _DATETIME_FORMAT)
                return _BAD
            if moment.tzinfo is None:
                self.fail(name, "Datetime must include a UTC offset or Z.")
                return _BAD
            return moment.timestamp()
        if param.enum is not None and text not in param.enum:
            self.fail(name, f'"{text}" is not a valid choice.')
            return _BAD
        if param.pattern is not None and param.pattern.search(text) is None:
            self.fail(name, "Enter a valid value.")
            return _BAD
        if param.max_length is not None and len(text) > param.max_length:
            self.fail(name, f"Ensure this field has no more than {param.max_length} characters.")
        if param.min_length is not None and len(text) < param.min_length:
            self.fail(name, f"Ensure this field has at least {param.min_length} characters.")
        return text

    def count(self, param: Param, items: Sequence[str]) -> None:
        if param.min_items is not None and len(items) < param.min_items:
            self.fail(param.name, f"Ensure this field has at least {param.min_items} elements.")
        if param.max_items is not None and len(items) > param.max_items:
            self.fail(param.name, f"Ensure this field has no more than {param.max_items} elements.")


class _Parser(_Values):
    """A report's query."""

    def __init__(self, endpoint: Endpoint, query: MultiMapping[str]) -> None:
        super().__init__(query)
        self.endpoint = endpoint

    def parse(self) -> _Query:
        endpoint = self.endpoint
        columns = tuple(dict.fromkeys(endpoint.aliases[c] for c in endpoint.default_columns))
        sort: tuple[tuple[str, bool], ...] = ()
        given: dict[str, Any] = {}
        for param in endpoint.params.values():
            if param.name == "columns":
                columns = self.columns(param) or columns
            elif param.sort:
                sort = self.sort(param)
            elif param.array:
                items = self.items(param.name)
                if items is None:
                    if param.required:
                        self.fail(param.name, "This field is required.")
                    continue
                self.count(param, items)
                given[param.name] = frozenset(self.value(param, item) for item in items)
            else:
                text = self.scalar(param.name)
                if text is None:
                    if param.required:
                        self.fail(param.name, "This field is required.")
                    elif param.default is not None and param.name in _PAGING | {"format"}:
                        given[param.name] = param.default
                    continue
                given[param.name] = self.value(param, text)
        if self.errors:
            raise _InvalidParams(self.errors)
        limit = int(given.pop("limit", 50))
        offset = int(given.pop("offset", 0))
        page, page_size = given.pop("page", None), given.pop("page_size", None)
        if page is not None or page_size is not None:
            limit = limit if page_size is None else int(page_size)
            offset = ((page or 1) - 1) * limit
        fmt = str(given.pop("format", "csv"))
        return _Query(columns, sort, given, offset, limit, fmt)

    def columns(self, param: Param) -> tuple[str, ...]:
        items = self.items("columns")
        if items is None:
            if param.required:
                self.fail("columns", "This field is required.")
            return ()
        self.count(param, items)
        keys: dict[str, None] = {}
        for item in items:
            key = self.endpoint.aliases.get(item)
            if key is None or (param.enum is not None and item not in param.enum):
                self.fail("columns", f'"{item}" is not a valid choice.')
            else:
                keys.setdefault(key)
        return tuple(keys)

    def sort(self, param: Param) -> tuple[tuple[str, bool], ...]:
        items = self.items(param.name)
        if items is None:
            return ()
        self.count(param, items)
        keys: dict[str, bool] = {}
        for item in items:
            descending = item.startswith("-")
            key = self.endpoint.aliases.get(item[1:] if descending else item)
            if not item:
                self.fail(param.name, "This field may not be blank.")
            elif key is None:
                self.fail(param.name, f'"{item}" is not a valid choice.')
            else:
                keys.setdefault(key, descending)
        return tuple(keys.items())


def _by(key: str) -> Callable[[Row], tuple[bool, Any]]:
    return lambda row: sort_key(row.values.get(key))


def _select(seed: int, endpoint: Endpoint, query: _Query) -> tuple[int, Sequence[Row]]:
    """The total matching the filters, and the page of it to answer."""
    table = _table(seed, endpoint)
    match = matcher(endpoint.report, query.given)
    selected: Sequence[Row] = table if match is None else [row for row in table if match(row)]
    if endpoint.grouped:
        selected = group(endpoint, selected, query.columns)
    if query.sort:
        ordered = list(selected)
        # Stable sorts from the lowest priority up; ties keep id order.
        for key, descending in reversed(query.sort):
            ordered.sort(key=_by(key), reverse=descending)
        selected = ordered
    return len(selected), selected[query.offset : query.offset + query.limit]


def _holds_customer_id(endpoint: Endpoint, key: str) -> bool:
    if key == "id":
        return endpoint.report.removesuffix(".grouped") == "customers"
    head = key.removesuffix(".id").removesuffix("_id")
    is_entity = head != key or endpoint.types.get(key) == "object"
    return is_entity and head.rsplit(".", 1)[-1].endswith("customer")


def _column_headers(endpoint: Endpoint, query: _Query) -> list[dict[str, Any]]:
    priorities = {key: (i, descending) for i, (key, descending) in enumerate(query.sort)}
    headers = []
    for key in query.columns:
        header: dict[str, Any] = {
            "label": label(key),
            "key": key,
            "sortable": True,
            "holds_customer_id": _holds_customer_id(endpoint, key),
            "required": False,
        }
        if key in priorities:
            priority, descending = priorities[key]
            header["sorted"] = {"order": "desc" if descending else "asc", "priority": priority}
        headers.append(header)
    return headers


def _merge(node: dict[str, Any], value: Mapping[str, Any]) -> None:
    """Copy an object's fields into a row's object (never into the shared table)."""
    for name, part in value.items():
        if isinstance(part, dict):
            if not isinstance(node.get(name), dict):
                node[name] = {}
            _merge(node[name], part)
        else:
            node[name] = part


def _json_row(row: Row, columns: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in columns:
        *path, last = key.split(".")
        node = out
        for part in path:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        value = row.values.get(key)
        if isinstance(value, dict):
            if not isinstance(node.get(last), dict):
                node[last] = {}
            _merge(node[last], value)
        else:
            node[last] = value
    return out


def _render(endpoint: Endpoint, query: _Query, total: int, page: Sequence[Row]) -> web.Response:
    if query.format == "json":
        body = {
            "total": total,
            "column_headers": _column_headers(endpoint, query),
            "rows": [_json_row(row, query.columns) for row in page],
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([label(key) for key in query.columns])
    writer.writerows([csv_value(row.values.get(key)) for key in query.columns] for row in page)
    return web.Response(
        body=buffer.getvalue().encode(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": f'attachment; filename="{endpoint.report}.csv"'},
    )


# --- handlers -------------------------------------------------------------------------------

_HTML_ERRORS = {
    500: "<h1>Server Error (500)</h1>",
    502: "<html><head><title>502 Bad Gateway</title></head>"
    "<body><h1>502 Bad Gateway</h1></body></html>",
    503: "<html><head><title>503 Service Unavailable</title></head>"
    "<body><h1>503 Service Unavailable</h1></body></html>",
}
_DETAILS = {
    401: "Invalid token.",
    403: "You do not have permission to perform this action.",
    429: "Request was throttled.",
}


@dataclass(frozen=True, slots=True)
class _Fault:
    status: int | None
    retry_after: int | None
    hang: bool
    drop: bool


def _take_fault(faults: Faults) -> _Fault | None:
    """The status/hang/drop fault for this request, counting down `times`."""
    if faults.status is None and not faults.hang and not faults.drop:
        return None
    if faults.times is not None and faults.times <= 0:
        _clear_fault(faults)
        return None
    fault = _Fault(faults.status, faults.retry_after, faults.hang, faults.drop)
    if faults.times is not None:
        faults.times -= 1
        if faults.times == 0:
            _clear_fault(faults)
    return fault


def _clear_fault(faults: Faults) -> None:
    faults.status = faults.retry_after = faults.times = None
    faults.hang = faults.drop = False


def _json_error(status: int, body: Mapping[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _fault_response(fault: _Fault) -> web.Response:
    status = fault.status or 500
    if status in _HTML_ERRORS:
        response = web.Response(status=status, text=_HTML_ERRORS[status], content_type="text/html")
    else:
        detail = _DETAILS.get(status) or _phrase(status)
        if status == 429 and fault.retry_after is not None:
            detail = f"Request was throttled. Expected available in {fault.retry_after} seconds."
        response = _json_error(status, {"detail": detail})
    if status == 401:
        response.headers["WWW-Authenticate"] = "Token"
    if status in (429, 503) and fault.retry_after is not None:
        response.headers["Retry-After"] = str(fault.retry_after)
    return response


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _drop(request: web.Request) -> web.Response:
    request.protocol.force_close()
    if request.transport is not None:
        request.transport.close()
    return web.Response()  # never reaches the client: the transport is closed


@dataclass(frozen=True, slots=True)
class Who:
    """Who a call is from and for: the credential's label (None: no known credential), the
    provider it is recorded as acting for, the provider whose data answers (None: the default
    data), and why it is refused (a 400 or 403 body), if it is."""

    credential: str | None
    provider: str | None
    data: str | None
    refusal: tuple[int, str] | None = None


_WHO = web.RequestKey("mock_who", Who)
_REQUIRED = "This field is required."


def _token(request: web.Request) -> str | None:
    parts = request.headers.get("Authorization", "").split()
    return parts[1] if len(parts) == 2 and parts[0].lower() == "token" else None


def _canonical_id(digits: str) -> str:
    """A provider id without leading zeros (no int(): any length of digits is fine)."""
    return digits.lstrip("0") or "0"


def who(request: web.Request) -> Who:
    """The credential and provider of a call (worked out once per request)."""
    if _WHO in request:
        return request[_WHO]
    state = request.app[MOCK_STATE]
    token = _token(request)
    credential = None if token is None else state.credential_for(token)
    sent = request.headers.getall(PROVIDER_HEADER, [])
    header = ", ".join(sent) if sent else None
    valid = _canonical_id(header) if header is not None and _DIGITS.fullmatch(header) else None
    found: Who
    if credential is None:
        found = Who(None, valid, None)
    elif credential.providers is None:  # today's mock: any header, unchecked, default data
        found = Who(credential.label, valid, None)
    elif header is None:
        if len(credential.providers) == 1:
            only = credential.providers[0]
            found = Who(credential.label, only, only)
        else:
            found = Who(credential.label, None, None, (400, _REQUIRED))
    elif valid is None:
        found = Who(credential.label, None, None, (400, _INT_REQUIRED))
    elif valid not in credential.providers:
        found = Who(credential.label, valid, None, (403, _DETAILS[403]))
    else:
        found = Who(credential.label, valid, valid)
    request[_WHO] = found
    return found


def _refused(refusal: tuple[int, str]) -> web.Response:
    status, message = refusal
    if status == 400:
        return _invalid({PROVIDER_HEADER: [message]})
    return _json_error(status, {"detail": message})


def catalog_for(request: web.Request) -> Catalog:
    """The generated data (with its writes) of the provider a call acts for."""
    provider = who(request).data
    if provider is None:
        return request.app[_CATALOG]
    catalogs = request.app[_CATALOGS]
    if provider not in catalogs:
        catalogs[provider] = request.app[_NEW_CATALOG](provider_seed(request.app[_SEED], provider))
    return catalogs[provider]


def _seed_for(request: web.Request) -> int:
    return provider_seed(request.app[_SEED], who(request).data)


def _fault_applies(faults: Faults, caller: Who) -> bool:
    return (faults.credential is None or faults.credential == caller.credential) and (
        faults.provider is None or faults.provider == caller.provider
    )


def _record(request: web.Request, report: str, operation: str) -> RecordedRequest:
    headers: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for name, value in request.headers.items():
        first = spelling.setdefault(name.lower(), str(name))
        headers[first] = f"{headers[first]}, {value}" if first in headers else value
    path, _, query = request.raw_path.partition("?")
    caller = who(request)
    return RecordedRequest(
        query,
        headers,
        path,
        report,
        operation=operation,
        credential=caller.credential,
        provider=caller.provider,
    )


def _invalid(errors: dict[str, list[str]]) -> web.Response:
    names = list(errors)
    message = (
        f"Invalid value for parameter '{names[0]}'."
        if len(names) == 1
        else f"Invalid values for parameters: {', '.join(names)}."
    )
    return _json_error(
        400,
        {
            "code": "parameter_invalid",
            "type": "invalid_request_error",
            "message": message,
            "field_errors": errors,
        },
    )


async def _guarded(
    request: web.Request, report: str, operation_id: str, answer: Callable[[], web.Response]
) -> web.Response:
    """Count and record a call, apply the faults, check the token and the provider, then
    answer."""
    state = request.app[MOCK_STATE]
    caller = who(request)
    state.calls += 1
    if report:
        state.report_calls[report] = state.report_calls.get(report, 0) + 1
    state.operation_calls[operation_id] = state.operation_calls.get(operation_id, 0) + 1
    call = state.calls
    state.requests.append(_record(request, report, operation_id))
    faults = state.faults
    applies = _fault_applies(faults, caller)
    fault = _take_fault(faults) if applies else None
    extra = {"X-Mock-Calls": str(call), **(faults.extra_headers if applies else {})}
    cookie = faults.set_cookie and applies
    if applies and faults.latency > 0:
        await asyncio.sleep(faults.latency)
    if fault is not None and fault.hang:
        await request.app[_RELEASE_HANGS].wait()
        return _drop(request)
    if fault is not None and fault.drop:
        return _drop(request)
    if fault is not None:
        response = _fault_response(fault)
    elif caller.credential is None:
        response = _fault_response(_Fault(401, None, False, False))
    elif caller.refusal is not None:
        response = _refused(caller.refusal)
    else:
        response = answer()
    response.headers.update(extra)
    if cookie:
        response.headers.add("Set-Cookie", "sessionid=abc; HttpOnly")
    return response


async def _report(request: web.Request, endpoint: Endpoint) -> web.Response:
    def answer() -> web.Response:
        try:
            query = _Parser(endpoint, request.query).parse()
        except _InvalidParams as exc:
            return _invalid(exc.errors)
        total, page = _select(_seed_for(request), endpoint, query)
        return _render(endpoint, query, total, page)

    return await _guarded(request, endpoint.report, endpoint.operation_id, answer)


# --- every other GET ------------------------------------------------------------------------

_NOT_FOUND = {"detail": "Not found."}
_CANONICAL_INT = re.compile(r"[1-9][0-9]{0,17}")


def _path_ok(param: Param, text: str) -> bool:
    """Whether a path value is well formed (else TeamUp has no such URL: 404)."""
    if not text or "/" in text or "%" in text or not text.strip("."):
        return False
    if param.kind == "integer":
        return _CANONICAL_INT.fullmatch(text) is not None and (
            param.maximum is None or int(text) <= param.maximum
        )
    if param.enum is not None:
        return text in param.enum
    return param.pattern is None or param.pattern.search(text) is not None


def _operation_query(operation: Operation, query: MultiMapping[str]) -> dict[str, Any]:
    """The query's values by parameter; an unknown parameter is an error too."""
    reader = _Values(query)
    given: dict[str, Any] = {}
    for param in operation.params.values():
        if param.array:
            items = reader.items(param.name)
            if items is None:
                if param.required:
                    reader.fail(param.name, "This field is required.")
                continue
            reader.count(param, items)
            given[param.name] = tuple(reader.value(param, item) for item in items)
            continue
        text = reader.scalar(param.name)
        if text is None:
            if param.required:
                reader.fail(param.name, "This field is required.")
            elif param.default is not None and param.name in _PAGING | {"format"}:
                given[param.name] = param.default
            continue
        given[param.name] = reader.value(param, text)
    for name in dict.fromkeys(query):
        if name not in operation.params:
            reader.fail(name, "Unknown parameter.")
    if reader.errors:
        raise _InvalidParams(reader.errors)
    return given


Item = Mapping[str, Any]


def _is_in(field: str, allowed: frozenset[Any]) -> Callable[[Item], bool]:
    return lambda item: item.get(field) in allowed


def _matches(
    operation: Operation, fields: Mapping[str, str], given: Mapping[str, Any]
) -> Callable[[Item], bool] | None:
    """The filters the mock applies: `ids`, a string enum naming a string field, a boolean naming
    a boolean field (the others are validated, not applied)."""
    tests: list[Callable[[Item], bool]] = []
    for name, wanted in given.items():
        param = operation.params[name]
        if name == "ids" and param.kind == "integer":
            tests.append(_is_in("id", frozenset(wanted)))
        elif param.kind == "string" and param.enum and not param.sort:
            field = next((f for f in (name, _singular(name)) if fields.get(f) == "string"), None)
            if field is not None:
                tests.append(_is_in(field, frozenset(wanted if param.array else (wanted,))))
        elif param.kind == "boolean" and not param.array and fields.get(name) == "boolean":
            tests.append(_is_in(name, frozenset((wanted,))))
    if not tests:
        return None
    return lambda item: all(test(item) for test in tests)


def _answer(
    request: web.Request, operation: Operation, values: Sequence[str], given: Mapping[str, Any]
) -> web.Response:
    catalog = catalog_for(request)
    if not catalog.exists(operation, values):
        return _json_error(404, _NOT_FOUND)
    origin = f"{request.scheme}://{request.host}"
    expand: tuple[str, ...] = given.get("expand", ())
    fields: tuple[str, ...] | None = given.get("fields")
    key = operation.collection
    collection = catalog.collections[key]
    retrieve = operation.kind == "retrieve"
    parents = tuple(values[:-1] if retrieve else values)
    body: Any
    if retrieve:
        index = catalog.index(key, operation.path_params[-1], values[-1])
        assert index is not None  # exists() said so
        body = catalog.shape(operation, catalog.obj(key, parents, index), expand, fields)
    elif operation.kind == "list":
        members: Sequence[Mapping[str, Any]] = catalog.members(key, parents)
        match = _matches(operation, collection.fields, given)
        if match is not None:
            members = [item for item in members if match(item)]
        if "sort" in given and operation.params["sort"].array:
            members = sort_members(members, collection.fields, given["sort"])
        page, size = int(given.get("page", 1)), int(given.get("page_size", 100))
        pages = max(1, -(-len(members) // size))
        if page > pages:
            return _json_error(404, {"detail": "Invalid page."})
        chunk = members[(page - 1) * size : page * size]
        body = {
            "count": len(members),
            "next": page_url(origin, request.raw_path, page + 1) if page < pages else None,
            "previous": page_url(origin, request.raw_path, page - 1) if page > 1 else None,
            "results": [catalog.shape(operation, item, expand, fields) for item in chunk],
        }
    elif operation.array:
        members = catalog.members(key, parents)
        body = [catalog.shape(operation, item, expand, fields) for item in members]
    else:
        body = catalog.shape(operation, catalog.obj(key, parents, 0), expand, fields)
    body = resolve(body, origin)
    if given.get("format", "json") == "xml":
        return web.Response(body=to_xml(body), content_type="application/xml", charset="utf-8")
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def _read(request: web.Request, operation: Operation) -> web.Response:
    values = [request.match_info.get(f"p{i}", "") for i in range(len(operation.path_params))]
    if not all(_path_ok(p, v) for p, v in zip(operation.path_params, values, strict=True)):
        return _json_error(404, _NOT_FOUND)  # no such URL: not a call, like any unknown path

    def answer() -> web.Response:
        try:
            given = _operation_query(operation, request.query)
        except _InvalidParams as exc:
            return _invalid(exc.errors)
        return _answer(request, operation, values, given)

    return await _guarded(request, "", operation.operation_id, answer)


def _read_handler(operation: Operation) -> Handler:
    async def read(request: web.Request) -> web.Response:
        return await _read(request, operation)

    return read


def _route(template: str) -> str:
    """An aiohttp route for a document template, its parameters named by position."""
    counter = iter(range(template.count("{")))
    return re.sub(r"{[^}]+}", lambda _: f"{{p{next(counter)}}}", template)


def _counts(names: Iterable[str | None]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for name in names:
        if name is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


async def _state(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    body = {
        "calls": state.calls,
        "requests": [asdict(r) for r in state.requests],
        "report_calls": state.report_calls,
        "credential_calls": _counts(r.credential for r in state.requests),
        "provider_calls": _counts(r.provider for r in state.requests),
    }
    return web.Response(body=orjson.dumps(body), content_type="application/json")


def _faults_from_json(data: Any) -> Faults:
    """Validate a JSON object of Faults fields (omitted ones take their defaults)."""
    if not isinstance(data, dict):
        raise ValueError("the body must be a JSON object of Faults fields")
    known = {f.name for f in fields(Faults)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown fields: {', '.join(unknown)}")

    def number(value: Any) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool) and value >= 0

    def count(value: Any) -> bool:
        return value is None or (
            isinstance(value, int) and not isinstance(value, bool) and value >= 0
        )

    checks: dict[str, Callable[[Any], bool]] = {
        "latency": number,
        "status": lambda v: v is None or (count(v) and 400 <= v <= 599),
        "retry_after": count,
        "times": count,
        "hang": lambda v: isinstance(v, bool),
        "drop": lambda v: isinstance(v, bool),
        "set_cookie": lambda v: isinstance(v, bool),
        "extra_headers": lambda v: (
            isinstance(v, dict)
            and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
        ),
        "credential": lambda v: v is None or isinstance(v, str),
        "provider": lambda v: (
            v is None or (isinstance(v, str) and _DIGITS.fullmatch(v) is not None)
        ),
    }
    for name, value in data.items():
        if not checks[name](value):
            raise ValueError(f"invalid value for {name}: {value!r}")
    return Faults(**data)


async def _put_faults(request: web.Request) -> web.Response:
    try:
        new = _faults_from_json(orjson.loads(await request.read()))
    except (orjson.JSONDecodeError, ValueError) as exc:
        return _json_error(400, {"detail": str(exc)})
    faults = request.app[MOCK_STATE].faults
    _assign_faults(faults, new)
    return web.Response(body=orjson.dumps(asdict(faults)), content_type="application/json")


async def _reset(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].reset()
    return web.Response(status=204)


async def _stamp(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "mock-teamup"
    response.headers.setdefault("X-Mock-Calls", str(request.app[MOCK_STATE].calls))


async def _release_hangs(app: web.Application) -> None:
    app[_RELEASE_HANGS].set()


@web.middleware
async def _not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A path that is no report (nor a control endpoint): 404 in TeamUp's (DRF's) shape."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return _json_error(404, {"detail": "Not found."})


def _handler(endpoint: Endpoint) -> Handler:
    async def report(request: web.Request) -> web.Response:
        return await _report(request, endpoint)

    return report


def _provider_ids(owner: str, ids: Sequence[str] | str | int) -> tuple[str, ...]:
    """Provider ids as the mock keeps them (digits, no leading zeros), or ValueError."""
    items = (ids,) if isinstance(ids, str | int) else tuple(ids)
    out: list[str] = []
    for item in items:
        text = str(item)
        if isinstance(item, bool) or not _DIGITS.fullmatch(text):
            raise ValueError(f"{owner}: a provider id is digits, not {item!r}")
        out.append(_canonical_id(text))
    if not out:
        raise ValueError(f"{owner}: at least one provider id")
    return tuple(dict.fromkeys(out))


def create_mock_app(
    token: str,
    *,
    latency: float = 0.0,
    seed: int = 7,
    document: Path | None = None,
    providers: Sequence[str] | None = None,
    tenants: Mapping[str, Sequence[str]] | None = None,
) -> web.Application:
    """A fake TeamUp answering every GET of proxy/spec/teamup.json (or of `document`, for the
    reads other than reports) with generated data, and every documented write.

    `token` is the credential "default"; `providers` the provider ids it may act for (None:
    any `TeamUp-Provider-ID` header is accepted and ignored, the data is `seed`'s). `tenants`
    maps more tokens to the provider ids each may act for, labelled "tenant0", "tenant1", ... in
    the map's order. A credential with providers needs the header when it has several (400
    without, 400 when not digits, 403 for a provider it may not act for); each provider's data
    is generated from `provider_seed(seed, provider)` and its writes are its own."""
    app = web.Application(middlewares=[_not_found])
    app[MOCK_STATE] = MockState(
        token=token,
        faults=Faults(latency=latency),
        providers=None if providers is None else _provider_ids("providers", providers),
        tenants={
            t: _provider_ids(f"tenant {i}", p) for i, (t, p) in enumerate((tenants or {}).items())
        },
    )
    app[_SEED] = seed
    reads = operations(document)
    app[_CATALOG] = Catalog(reads, seed)
    app[_CATALOGS] = {}
    app[_NEW_CATALOG] = lambda data_seed: Catalog(reads, data_seed)
    app[_RELEASE_HANGS] = asyncio.Event()
    _credit_rows(seed)  # generate now, not during the first request (the others: on first use)
    for endpoint in endpoints().values():
        handler = _handler(endpoint)
        app.router.add_route("GET", endpoint.path, handler)
        app.router.add_route("GET", endpoint.path.replace("/api/v2/", "/api/v2//", 1), handler)
    # A static path before a template that could match it (`gift_cards/config`, `gift_cards/{id}`).
    for operation in sorted(reads, key=lambda o: o.path.count("{")):
        handler = _read_handler(operation)
        route = _route(operation.path)
        app.router.add_route("GET", route, handler)
        app.router.add_route("GET", route.replace("/api/v2/", "/api/v2//", 1), handler)
    from .writes import install_writes  # it builds on this module

    install_writes(app, reads, seed)  # every documented write (proxy/testing/writes.py)
    app.router.add_route("GET", "/_mock/state", _state)
    app.router.add_route("PUT", "/_mock/faults", _put_faults)
    app.router.add_route("POST", "/_mock/reset", _reset)
    app.on_response_prepare.append(_stamp)
    app.on_shutdown.append(_release_hangs)
    return app


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def parse_tenants(text: str) -> dict[str, tuple[str, ...]]:
    """`--tenants`: a JSON object token -> provider ids (a list, or one id), or `@file` holding
    one; ValueError when it is not."""
    if text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or not data:
        raise ValueError("a JSON object of token -> provider ids")
    out: dict[str, tuple[str, ...]] = {}
    for i, (token, ids) in enumerate(data.items()):
        if not token:
            raise ValueError("a token is not empty")
        if not isinstance(ids, list | str | int):
            raise ValueError(f"tenant {i}: a list of provider ids")
        out[token] = _provider_ids(f"tenant {i}", ids)
    return out


def main(argv: list[str] | None = None) -> None:
    """Serve the mock: `python -m proxy.testing.mock --port 8081 --token T`."""
    parser = argparse.ArgumentParser(prog="python -m proxy.testing.mock", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", required=True, help="the token callers must send")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated data")
    parser.add_argument(
        "--document", type=Path, default=None, help="an OpenAPI document of the reads to serve"
    )
    parser.add_argument(
        "--providers",
        default=None,
        help="comma-separated provider ids --token may act for (default: any header, unchecked)",
    )
    parser.add_argument(
        "--tenants",
        default=None,
        help='more credentials: JSON {"token": ["101", "102"], ...} or @file; '
        'recorded as "tenant0", "tenant1", ... in order',
    )
    args = parser.parse_args(argv)
    try:
        tenants = None if args.tenants is None else parse_tenants(args.tenants)
        providers = None if args.providers is None else args.providers.split(",")
        app = create_mock_app(
            args.token,
            latency=args.latency,
            seed=args.seed,
            document=args.document,
            providers=providers,
            tenants=tenants,
        )
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    for endpoint in endpoints().values():
        _table(args.seed, endpoint)  # every report's rows now, not during its first request
    app[_CATALOG].warm()
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=5.0,
        print=functools.partial(print, flush=True),
        loop=_new_loop(),
    )


if __name__ == "__main__":
    main()
