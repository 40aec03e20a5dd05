"""A faithful fake TeamUp customer-credits report: the demo backend and the test double."""

from __future__ import annotations

import argparse
import asyncio
import csv
import functools
import hmac
import io
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from multidict import MultiMapping

__all__ = [
    "DEFAULT_COLUMNS",
    "MOCK_STATE",
    "REPORT_PATH",
    "Faults",
    "MockState",
    "RecordedRequest",
    "create_mock_app",
    "main",
]

REPORT_PATH = "/api/v2/reports/customer_credits/data"
_DOUBLE_SLASH_PATH = "/api/v2//reports/customer_credits/data"


@dataclass
class Faults:
    """Mutable switches applied to report requests."""

    latency: float = 0.0
    status: int | None = None
    retry_after: int | None = None
    times: int | None = None
    hang: bool = False
    drop: bool = False
    set_cookie: bool = False
    extra_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class RecordedRequest:
    """One report request as received."""

    query_string: str
    headers: dict[str, str]


@dataclass
class MockState:
    """What the mock saw, and the faults it applies."""

    token: str
    faults: Faults
    calls: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)

    def reset(self) -> None:
        """Forget calls and requests; faults back to their defaults (the same object)."""
        self.calls = 0
        self.requests.clear()
        _assign_faults(self.faults, Faults())


MOCK_STATE = web.AppKey("mock_state", MockState)
_RELEASE_HANGS = web.AppKey("mock_release_hangs", asyncio.Event)
_SEED = web.AppKey("mock_seed", int)


def _assign_faults(target: Faults, source: Faults) -> None:
    for f in fields(Faults):
        setattr(target, f.name, getattr(source, f.name))


# --- generated data -------------------------------------------------------------------------

_N_CREDITS = 3000
_N_CUSTOMERS = 300
_START = int(datetime(2023, 1, 1, tzinfo=UTC).timestamp())
_END = int(datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
# A few apostrophes, hyphens and non-ASCII letters so CSV quoting and UTF-8 get exercised.
_FIRST = (
    "Amelia Oliver Isla George Ava Noah Mia Arthur Zoë Leo Freya Oscar Siobhán Harry Ivy "
    "Jack Grace Theo Ella Finn Chloé Rory Maya Jonas Priya Omar Aoife Luca Nia Kai"
).split()
_LAST = (
    "Smith Jones Taylor Brown Williams Wilson Johnson Davies Patel Wright O'Brien Walker "
    "Thompson Robinson Smith-Jones Evans Hughes Müller Green Khan Lewis Clarke Byrne Hall"
).split()
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


def _money(cents: int) -> dict[str, Any]:
    units, rest = divmod(abs(cents), 100)
    text = f"{'-' if cents < 0 else ''}£{units}" + (f".{rest:02d}" if rest else "")
    return {
        "decimal": cents / 100 if rest else cents // 100,
        "string": text,
        "iso_currency_code": "gbp",
        "currency_symbol": "£",
        "currency_symbol_position": "before",
    }


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


# --- columns --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Column:
    key: str
    label: str
    holds_customer_id: bool
    value: Callable[[_Credit], Any]
    csv_value: Callable[[_Credit], Any] | None = None  # None: the JSON value
    sort_key: Callable[[_Credit], Any] | None = None  # None: the CSV value


def _name(credit: _Credit) -> Any:
    return credit.customer["name"]


_COLUMNS: dict[str, _Column] = {
    c.key: c
    for c in (
        _Column("customer.id", "Customer ID", True, lambda c: c.customer["id"]),
        _Column("customer", "Customer", True, lambda c: c.customer, csv_value=_name),
        _Column("customer.name", "Customer Name", False, _name),
        _Column("customer.email", "Customer Email", False, lambda c: c.customer["email"]),
        _Column("created_at", "Created At", False, lambda c: c.created_at),
        _Column(
            "amount",
            "Amount",
            False,
            lambda c: c.amount,
            csv_value=lambda c: c.amount["string"],
            sort_key=lambda c: c.amount_cents,
        ),
        _Column(
            "balance",
            "Balance",
            False,
            lambda c: c.balance,
            csv_value=lambda c: c.balance["string"],
            sort_key=lambda c: c.balance_cents,
        ),
        _Column("memo", "Memo", False, lambda c: c.memo),
    )
}
_ALIASES = {
    **{key: key for key in _COLUMNS},
    "customer_id": "customer.id",
    "customer_name": "customer.name",
    "customer_email": "customer.email",
}
# The columns a report has when `columns` is not given (the spec example's).
DEFAULT_COLUMNS = (
    "customer.id",
    "customer.name",
    "customer.email",
    "created_at",
    "amount",
    "balance",
    "memo",
)


# --- the query ------------------------------------------------------------------------------

_DIGITS = re.compile(r"[0-9]+")
_INT_REQUIRED = "A valid integer is required."
_DATETIME_FORMAT = (
    "Datetime has wrong format. Use one of these formats instead: "
    "YYYY-MM-DDThh:mm[:ss[.uuuuuu]][+HH:MM|-HH:MM|Z]."
)


@dataclass(frozen=True, slots=True)
class _Query:
    columns: tuple[str, ...]
    sort: tuple[tuple[str, bool], ...]
    customers: frozenset[int] | None
    created_gte: float | None
    created_lte: float | None
    id_gt: int | None
    offset: int
    limit: int
    format: str


class _InvalidParams(Exception):
    def __init__(self, errors: dict[str, list[str]]) -> None:
        super().__init__(errors)
        self.errors = errors


class _Parser:
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

    def integer(self, name: str, text: str, low: int | None = None, high: int | None = None) -> int:
        if not _DIGITS.fullmatch(text):
            self.fail(name, _INT_REQUIRED)
            return 0
        number = int(text)
        if low is not None and number < low:
            self.fail(name, f"Ensure this value is greater than or equal to {low}.")
        if high is not None and number > high:
            self.fail(name, f"Ensure this value is less than or equal to {high}.")
        return number

    def int_param(
        self, name: str, default: int | None, low: int | None = None, high: int | None = None
    ) -> int | None:
        text = self.scalar(name)
        return default if text is None else self.integer(name, text, low, high)

    def datetime_param(self, name: str) -> float | None:
        text = self.scalar(name)
        if text is None:
            return None
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            self.fail(name, _DATETIME_FORMAT)
            return None
        if moment.tzinfo is None:
            self.fail(name, "Datetime must include a UTC offset or Z.")
            return None
        return moment.timestamp()

    def parse(self) -> _Query:
        columns = self.columns()
        sort = self.sort()
        customer_items = self.items("customers")
        customers = (
            None
            if customer_items is None
            else frozenset(self.integer("customers", item) for item in customer_items)
        )
        created_gte = self.datetime_param("created_at_gte")
        created_lte = self.datetime_param("created_at_lte")
        id_gt = self.int_param("id_gt", None)
        limit = self.int_param("limit", 50, high=100)
        offset = self.int_param("offset", 0, low=0)
        page = self.int_param("page", None, low=1)
        page_size = self.int_param("page_size", None, low=0, high=100)
        fmt = self.scalar("format")
        fmt = "csv" if fmt is None else fmt
        if fmt not in ("csv", "json"):
            self.fail("format", f'"{fmt}" is not a valid choice.')
        if self.errors:
            raise _InvalidParams(self.errors)
        assert limit is not None and offset is not None
        if page is not None or page_size is not None:
            limit = limit if page_size is None else page_size
            offset = ((page or 1) - 1) * limit
        return _Query(columns, sort, customers, created_gte, created_lte, id_gt, offset, limit, fmt)

    def columns(self) -> tuple[str, ...]:
        items = self.items("columns")
        if items is None:
            return DEFAULT_COLUMNS
        keys: dict[str, None] = {}
        for item in items:
            key = _ALIASES.get(item)
            if key is None:
                self.fail("columns", f'"{item}" is not a valid choice.')
            else:
                keys.setdefault(key)
        return tuple(keys)

    def sort(self) -> tuple[tuple[str, bool], ...]:
        items = self.items("sort")
        if items is None:
            return ()
        keys: dict[str, bool] = {}
        for item in items:
            descending = item.startswith("-")
            key = _ALIASES.get(item[1:] if descending else item)
            if not item:
                self.fail("sort", "This field may not be blank.")
            elif key is None:
                self.fail("sort", f'"{item}" is not a valid choice.')
            else:
                keys.setdefault(key, descending)
        return tuple(keys.items())


def _select(credits: Sequence[_Credit], query: _Query) -> tuple[int, Sequence[_Credit]]:
    """The total matching the filters, and the page of it to answer."""
    rows: Sequence[_Credit] = credits
    customers, gte, lte, id_gt = query.customers, query.created_gte, query.created_lte, query.id_gt
    if customers is not None or gte is not None or lte is not None or id_gt is not None:
        rows = [
            c
            for c in credits
            if (customers is None or c.customer["id"] in customers)
            and (gte is None or c.created_ts >= gte)
            and (lte is None or c.created_ts <= lte)
            and (id_gt is None or c.id > id_gt)
        ]
    if query.sort:
        ordered = list(rows)
        # Stable sorts from the lowest priority up; ties keep id order.
        for key, descending in reversed(query.sort):
            column = _COLUMNS[key]
            sort_key = column.sort_key or column.csv_value or column.value
            ordered.sort(key=sort_key, reverse=descending)
        rows = ordered
    return len(rows), rows[query.offset : query.offset + query.limit]


def _column_headers(query: _Query) -> list[dict[str, Any]]:
    priorities = {key: (i, descending) for i, (key, descending) in enumerate(query.sort)}
    headers = []
    for key in query.columns:
        column = _COLUMNS[key]
        header: dict[str, Any] = {
            "label": column.label,
            "key": key,
            "sortable": True,
            "holds_customer_id": column.holds_customer_id,
            "required": False,
        }
        if key in priorities:
            priority, descending = priorities[key]
            header["sorted"] = {"order": "desc" if descending else "asc", "priority": priority}
        headers.append(header)
    return headers


def _json_row(credit: _Credit, columns: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for key in columns:
        value = _COLUMNS[key].value(credit)
        if key == "customer":
            row.setdefault("customer", {}).update(value)
        elif key.startswith("customer."):
            row.setdefault("customer", {})[key[9:]] = value
        else:
            row[key] = value
    return row


def _render(query: _Query, total: int, page: Sequence[_Credit]) -> web.Response:
    if query.format == "json":
        body = {
            "total": total,
            "column_headers": _column_headers(query),
            "rows": [_json_row(credit, query.columns) for credit in page],
        }
        return web.Response(body=orjson.dumps(body), content_type="application/json")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    cells = [_COLUMNS[key].csv_value or _COLUMNS[key].value for key in query.columns]
    writer.writerow([_COLUMNS[key].label for key in query.columns])
    writer.writerows([cell(credit) for cell in cells] for credit in page)
    return web.Response(
        body=buffer.getvalue().encode(),
        content_type="text/csv",
        charset="utf-8",
        headers={"Content-Disposition": 'attachment; filename="customer_credits.csv"'},
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


def _authorised(request: web.Request, token: str) -> bool:
    parts = request.headers.get("Authorization", "").split()
    return (
        len(parts) == 2
        and parts[0].lower() == "token"
        and hmac.compare_digest(parts[1].encode(), token.encode())
    )


def _record(request: web.Request) -> RecordedRequest:
    headers: dict[str, str] = {}
    spelling: dict[str, str] = {}
    for name, value in request.headers.items():
        first = spelling.setdefault(name.lower(), str(name))
        headers[first] = f"{headers[first]}, {value}" if first in headers else value
    return RecordedRequest(request.raw_path.partition("?")[2], headers)


async def _report(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    state.calls += 1
    call = state.calls
    state.requests.append(_record(request))
    faults = state.faults
    fault = _take_fault(faults)
    extra = {"X-Mock-Calls": str(call), **faults.extra_headers}
    cookie = faults.set_cookie
    if faults.latency > 0:
        await asyncio.sleep(faults.latency)
    if fault is not None and fault.hang:
        await request.app[_RELEASE_HANGS].wait()
        return _drop(request)
    if fault is not None and fault.drop:
        return _drop(request)
    if fault is not None:
        response = _fault_response(fault)
    elif not _authorised(request, state.token):
        response = _fault_response(_Fault(401, None, False, False))
    else:
        try:
            query = _Parser(request.query).parse()
        except _InvalidParams as exc:
            names = list(exc.errors)
            message = (
                f"Invalid value for parameter '{names[0]}'."
                if len(names) == 1
                else f"Invalid values for parameters: {', '.join(names)}."
            )
            response = _json_error(
                400,
                {
                    "code": "parameter_invalid",
                    "type": "invalid_request_error",
                    "message": message,
                    "field_errors": exc.errors,
                },
            )
        else:
            total, page = _select(_credits(request.app[_SEED]), query)
            response = _render(query, total, page)
    response.headers.update(extra)
    if cookie:
        response.headers.add("Set-Cookie", "sessionid=abc; HttpOnly")
    return response


async def _state(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    body = {"calls": state.calls, "requests": [asdict(r) for r in state.requests]}
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


def create_mock_app(token: str, *, latency: float = 0.0, seed: int = 7) -> web.Application:
    """A fake TeamUp answering the customer-credits report with generated data."""
    app = web.Application()
    app[MOCK_STATE] = MockState(token=token, faults=Faults(latency=latency))
    app[_SEED] = seed
    app[_RELEASE_HANGS] = asyncio.Event()
    _credits(seed)  # generate now, not during the first request
    app.router.add_route("GET", REPORT_PATH, _report)
    app.router.add_route("GET", _DOUBLE_SLASH_PATH, _report)
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


def main(argv: list[str] | None = None) -> None:
    """Serve the mock: `python -m proxy.testing.mock --port 8081 --token T`."""
    parser = argparse.ArgumentParser(prog="python -m proxy.testing.mock", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--token", required=True, help="the token callers must send")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds added per request")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated data")
    args = parser.parse_args(argv)
    app = create_mock_app(args.token, latency=args.latency, seed=args.seed)
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
