"""Every GET of the document, pure (no I/O): routed by its template (both slash forms), a valid
and an invalid value per parameter (path parameters included), and Hypothesis properties of
the cache key — respelling never changes it, canonicalising twice is stable, a changed value
changes it — over every operation.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from proxy.backends import keys
from proxy.core.contract import CanonicalQuery, Param, PathParam, QueryErrors
from proxy.core.operations import BadPath, Operation, Route, Router, load_operations

DOCUMENT = load_operations()
READS = [op for op in DOCUMENT.reads().values()]
ROUTED = DOCUMENT.routed(reports=None, auth=False)
ROUTER = Router(
    ROUTED,
    DOCUMENT.where(lambda op: op.operation_id in ROUTED or (not op.is_read and op.area != "auth")),
)
AUTH_ROUTER = Router(DOCUMENT.routed(reports=None, auth=True), DOCUMENT)
IDS = [op.operation_id for op in READS]
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def by_operation() -> pytest.MarkDecorator:
    return pytest.mark.parametrize("operation", READS, ids=IDS)


def path_value(param: PathParam) -> str:
    """A valid raw value of a path parameter."""
    if param.kind == "int":
        return str(max(param.minimum or 1, 1) + 6)
    if param.kind == "enum":
        return param.choices[0]
    return "7" if re.fullmatch(param.pattern, "7", re.ASCII) else "abc"


def concrete(op: Operation, values: dict[str, str] | None = None) -> str:
    chosen = {p.name: path_value(p) for p in op.contract.path_params} | (values or {})
    return _PARAM.sub(lambda m: chosen[m[1]], op.path)


def valid_text(param: Param) -> str:
    """A valid query value of one parameter (as a caller spells it)."""
    if param.kind == "enum":
        return param.choices[0]
    return {
        "int": str(max(param.minimum or 1, 1)),
        "number": "1.5",
        "bool": "true",
        "date": "2024-03-01",
        "datetime": "2024-03-01T09:00:00Z",
    }.get(param.kind, "abc" if param.pattern is None else _matching(param.pattern))


def _matching(pattern: str) -> str:
    for candidate in ("abc", "7", "a_b", "ABC", "a-b", "1.5", "2024-03-01"):
        if re.fullmatch(pattern, candidate, re.ASCII):
            return candidate
    raise AssertionError(f"no sample for {pattern}")


def invalid_text(param: Param) -> str:
    """A value the contract refuses for one parameter."""
    if param.kind == "int":
        return "abc" if param.maximum is None else str(param.maximum + 1)
    if param.kind == "enum":
        return "not-a-choice"
    return {
        "number": "abc",
        "bool": "maybe",
        "date": "2024-13-45",
        "datetime": "yesterday",
    }.get(param.kind, "")  # text: blank


def required(op: Operation) -> dict[str, str]:
    return {p.name: valid_text(p) for p in op.contract.params.values() if p.required}


def parse(op: Operation, query: list[tuple[str, str]], path: Any = ()) -> Any:
    return op.contract.parse(MultiDict(query), path)


def route_of(op: Operation) -> Route:
    found = AUTH_ROUTER.match(concrete(op))
    assert isinstance(found, Route), (op.operation_id, found)
    return found


# --- routes ------------------------------------------------------------------------------------


def test_the_document_has_162_reads_and_the_router_takes_every_one_but_auth() -> None:
    assert len(READS) == 162
    auth = [op for op in READS if op.area == "auth"]
    assert auth and len(ROUTED) == 162 - len(auth)


@by_operation()
def test_each_read_routes_to_itself_at_both_slash_forms(operation: Operation) -> None:
    path = concrete(operation)
    for form in (path, path.replace("/api/v2/", "/api/v2//", 1)):
        found = (AUTH_ROUTER if operation.area == "auth" else ROUTER).match(form)
        assert isinstance(found, Route), (form, found)
        assert found.operations["GET"] is operation
    if operation.area == "auth":
        assert ROUTER.match(path) is None  # off unless an operator switches it on


@by_operation()
def test_each_path_parameter_has_a_valid_and_an_invalid_value(operation: Operation) -> None:
    for param in operation.contract.path_params:
        bad_values = ["..", ".", "a%2Fb", "%2e%2e", "x\x00"]
        bad_values += ["abc", "0", "-1", "1.5"] if param.kind == "int" else ["a b", "é"]
        if param.kind == "int":
            # Canonical without leading zeros: `007` is `7`, one entry.
            found = ROUTER.match(concrete(operation, {param.name: "007"}))
            if operation.area != "auth":
                assert isinstance(found, Route) and dict(found.path)[param.name] == 7
        for bad in bad_values:
            found = AUTH_ROUTER.match(concrete(operation, {param.name: bad}))
            if isinstance(found, Route):  # a more specific template took it (`/customers/me`)
                assert found.operations.get("GET") is not operation, (param.name, bad)
            else:
                assert isinstance(found, BadPath | None), (param.name, bad)


@by_operation()
def test_each_query_parameter_has_a_valid_and_an_invalid_value(operation: Operation) -> None:
    route = (AUTH_ROUTER if operation.area == "auth" else ROUTER).match(concrete(operation))
    assert isinstance(route, Route)
    base = required(operation)
    assert isinstance(parse(operation, list(base.items()), route.path), CanonicalQuery)
    unknown = parse(operation, [*base.items(), ("no_such_parameter", "1")], route.path)
    assert isinstance(unknown, QueryErrors)
    assert list(unknown.field_errors) == ["no_such_parameter"]
    for param in operation.contract.params.values():
        good = parse(operation, [*(base | {param.name: valid_text(param)}).items()], route.path)
        assert isinstance(good, CanonicalQuery), (param.name, good)
        bad = parse(operation, [*(base | {param.name: invalid_text(param)}).items()], route.path)
        assert isinstance(bad, QueryErrors), (param.name, invalid_text(param))
        assert list(bad.field_errors) == [param.name]


def test_undocumented_paths_are_not_routed_and_writes_are_405() -> None:
    for path in ("/api/v2/nope", "/api/v2/customers/1/nope", "/api/v1/customers", "/api/v2/"):
        assert ROUTER.match(path) is None, path
    # A documented write (not routed yet): its path matches with no GET, so another method is 405.
    export = ROUTER.match("/api/v2/reports/customer_credits/export")
    assert isinstance(export, Route) and dict(export.operations) == {}


def test_keys_never_cross_operations_or_ids() -> None:
    made: dict[str, str] = {}
    for op in READS:
        route = route_of(op)
        query = parse(op, list(required(op).items()), route.path)
        assert isinstance(query, CanonicalQuery)
        key = keys.cache_key(query)
        assert key.startswith(f"v3:{op.operation_id}:")
        assert key not in made, (op.operation_id, made.get(key))
        made[key] = op.operation_id
    customers = DOCUMENT["customers_retrieve"]
    one, two = (customers.contract.parse(MultiDict(), (("id", n),)) for n in (1, 2))
    assert isinstance(one, CanonicalQuery) and isinstance(two, CanonicalQuery)
    assert keys.cache_key(one) != keys.cache_key(two)


def test_page_one_default_page_size_and_json_are_dropped() -> None:
    events = DOCUMENT["events_list"]
    plain = parse(events, [])
    spelled = parse(events, [("page", "1"), ("page_size", "100"), ("format", "JSON")])
    assert isinstance(plain, CanonicalQuery) and isinstance(spelled, CanonicalQuery)
    assert keys.cache_key(plain) == keys.cache_key(spelled)
    assert spelled.canonical_string() == ""
    big = parse(events, [("page_size", "250")])
    too_big = parse(events, [("page_size", "251")])
    assert isinstance(big, CanonicalQuery) and isinstance(too_big, QueryErrors)
    customers = DOCUMENT["customers_list"]
    assert isinstance(parse(customers, [("page_size", "101")]), QueryErrors)
    sets = parse(customers, [("fields", "name,id"), ("fields", "id"), ("expand", "b,a")])
    same = parse(customers, [("fields", "id,name"), ("expand", "a"), ("expand", "b")])
    assert isinstance(sets, CanonicalQuery) and isinstance(same, CanonicalQuery)
    assert keys.cache_key(sets) == keys.cache_key(same)
    xml = parse(customers, [("format", "xml")])
    assert isinstance(xml, CanonicalQuery) and keys.cache_key(xml) != keys.cache_key(same)


# --- Hypothesis: the key over every operation ---------------------------------------------------


def _scalar(param: Param) -> st.SearchStrategy[tuple[Any, list[str]]]:
    """(the meaning, spellings of it) for one value of a parameter."""
    if param.kind == "int":
        low = max(param.minimum if param.minimum is not None else 0, 0)
        high = param.maximum if param.maximum is not None else low + 10**6
        return st.integers(low, high).map(lambda n: (n, [str(n), f"0{n}", f"00{n}"]))
    if param.kind == "bool":
        return st.booleans().map(
            lambda b: (b, ["true", "True", "1", "TRUE"] if b else ["false", "0", "FALSE"])
        )
    if param.kind == "enum":
        return st.sampled_from(param.choices).map(lambda c: (c, [c, c.upper()]))
    if param.kind == "date":
        return st.dates().map(lambda d: (d.isoformat(), [d.isoformat()]))
    if param.kind == "datetime":
        return st.integers(0, 2_000_000_000).map(
            lambda s: (
                s,
                [
                    _iso(s) + "Z",
                    _iso(s + 3600) + "+01:00",
                    _iso(s - 7200) + "-02:00",
                ],
            )
        )
    if param.kind == "number":
        return st.integers(0, 10**6).map(lambda n: (n, [f"{n}", f"{n}.0", f"{n}.00"]))
    sample = valid_text(param)
    words = st.sampled_from([sample, sample + "x", "zz" + sample])
    if param.pattern is not None:
        words = words.filter(lambda w: re.fullmatch(str(param.pattern), w, re.ASCII) is not None)
    return words.map(lambda w: (w, [w, f" {w}"]))


def _iso(seconds: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S")


@st.composite
def _question(draw: st.DrawFn, op: Operation) -> tuple[dict[str, Any], list[list[tuple[str, str]]]]:
    """A meaning (name → value) and two different spellings of it as query lists."""
    params = op.contract.params
    names = sorted(params)
    chosen = (
        set(draw(st.lists(st.sampled_from(names), max_size=3, unique=True))) if names else set()
    )
    chosen |= {n for n, p in params.items() if p.required}
    for low, high in op.contract.ranges:  # an ordered pair is its own property (test_reports)
        if low in chosen and high in chosen:
            chosen.discard(high)
    meaning: dict[str, Any] = {}
    spellings: list[list[tuple[str, str]]] = [[], []]
    groups: list[list[tuple[str, str]]] = []  # the second spelling, one group per parameter
    for name in sorted(chosen):
        param = params[name]
        if param.array:
            items = draw(st.lists(_scalar(param), min_size=max(param.min_items, 1), max_size=3))
            values = [v for v, _ in items]
            if param.kind == "datetime" or len({str(v) for v in values}) != len(values):
                items, values = items[:1], values[:1]
            meaning[name] = tuple(values) if param.ordered else frozenset(map(str, values))
            one = [draw(st.sampled_from(sp)) for _, sp in items]
            two = [draw(st.sampled_from(sp)) for _, sp in items]
            if not param.ordered:
                two = list(reversed(two)) + two[:1]  # order and duplicates mean nothing
            spellings[0].append((name, ",".join(one)))
            groups.append([(f"{name}[]", item) for item in two])
        else:
            value, spelled = draw(_scalar(param))
            meaning[name] = value
            spellings[0].append((name, draw(st.sampled_from(spelled))))
            groups.append([(name, draw(st.sampled_from(spelled)))])
    spellings[1] = [pair for group in reversed(groups) for pair in group]  # parameters reordered
    return meaning, spellings


def _operations_in_groups() -> Iterator[list[Operation]]:
    ops = READS  # auth/* included: routed when switched on
    size = 18
    for start in range(0, len(ops), size):
        yield ops[start : start + size]


GROUPS = list(_operations_in_groups())


@pytest.mark.parametrize("group", GROUPS, ids=[g[0].operation_id for g in GROUPS])
def test_respelling_reordering_and_recanonicalising_never_change_the_key(
    group: list[Operation],
) -> None:
    for op in group:
        _respellings_of(op, route_of(op).path)


def _respellings_of(op: Operation, path: Any) -> None:
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(_question(op))
    def check(question: tuple[dict[str, Any], list[list[tuple[str, str]]]]) -> None:
        _meaning, (one, two) = question
        first, second = parse(op, one, path), parse(op, two, path)
        assert isinstance(first, CanonicalQuery), (op.operation_id, one, first)
        assert isinstance(second, CanonicalQuery), (op.operation_id, two, second)
        assert keys.cache_key(first) == keys.cache_key(second), (one, two)
        again = op.contract.parse(MultiDict(_pairs(first.canonical_string())), path)
        assert isinstance(again, CanonicalQuery)
        assert keys.cache_key(again) == keys.cache_key(first)
        assert again.canonical_string() == first.canonical_string()

    check()


@pytest.mark.parametrize("group", GROUPS, ids=[g[0].operation_id for g in GROUPS])
def test_a_changed_value_or_id_changes_the_key(group: list[Operation]) -> None:
    for op in group:
        route = route_of(op)
        base = required(op)
        before = parse(op, list(base.items()), route.path)
        assert isinstance(before, CanonicalQuery)
        for name, param in op.contract.params.items():
            if param.kind not in ("int", "enum", "bool") or param.array:
                continue
            values = _two_values(param)
            if values is None:
                continue
            one, two = (parse(op, [*(base | {name: v}).items()], route.path) for v in values)
            assert isinstance(one, CanonicalQuery) and isinstance(two, CanonicalQuery)
            assert keys.cache_key(one) != keys.cache_key(two), (op.operation_id, name)
        for slot in op.contract.path_params:
            if slot.kind != "int":
                continue
            other = tuple(
                (n, v + 1 if n == slot.name and isinstance(v, int) else v) for n, v in route.path
            )
            moved = parse(op, list(base.items()), other)
            assert isinstance(moved, CanonicalQuery)
            assert keys.cache_key(moved) != keys.cache_key(before)


def _two_values(param: Param) -> tuple[str, str] | None:
    if param.kind == "enum":
        return (param.choices[0], param.choices[1]) if len(param.choices) > 1 else None
    if param.kind == "bool":
        return ("true", "false")
    low = max(param.minimum or 0, 0)
    pair = (str(low + 1), str(low + 2))
    if param.maximum is not None and low + 2 > param.maximum:
        return None
    return pair


def _pairs(query: str) -> list[tuple[str, str]]:
    from urllib.parse import parse_qsl

    return parse_qsl(query, keep_blank_values=True)


def test_every_hypothesis_group_covers_every_read() -> None:
    assert sum(len(g) for g in GROUPS) == len(READS) == 162
    assert {op.operation_id for op in itertools.chain.from_iterable(GROUPS)} == set(IDS)


# --- settings: read scopes, TTL overrides, the public URL ----------------------------------------


def test_settings_name_only_what_the_document_has() -> None:
    from pydantic import ValidationError

    from proxy.settings import ClientConfig
    from proxy.testing.e2e import make_settings
    from proxy.web.auth import hash_key

    digest = hash_key("k")

    def client(**scopes: Any) -> ClientConfig:
        return ClientConfig.model_validate({"key_sha256": digest, **scopes})

    assert client(read=["customers", "events"]).may_read("events")
    assert client(read=["*"]).may_read("anything")
    assert client().may_read("venues")  # default: everything routed
    narrowed = client(read=["reports"], reports=["customers"])
    assert narrowed.may_read("reports", "customers")
    assert not narrowed.may_read("reports", "invoices")
    assert not narrowed.may_read("customers")
    with pytest.raises(ValidationError, match="unknown path segment"):
        client(read=["custmers"])
    with pytest.raises(ValidationError, match="unknown name"):
        make_settings("http://127.0.0.1:1", ttls={"evnts": {"fresh": 1}})
    with pytest.raises(ValidationError, match="public_url"):
        make_settings("http://127.0.0.1:1", public_url="ftp://proxy.example")
    base = make_settings("http://127.0.0.1:1", public_url="https://proxy.example/teamup/")
    assert base.public_url == "https://proxy.example/teamup"


def test_the_most_specific_ttl_wins() -> None:
    from proxy.testing.e2e import make_settings

    def ttls(**overrides: Any) -> Any:
        settings = make_settings("http://127.0.0.1:1", **overrides)
        return lambda name: settings.operation_ttls(DOCUMENT[name], DOCUMENT.ttl_classes)

    plain = ttls()
    assert (plain("venues_list").fresh, plain("venues_list").stale) == (3600, 86400)
    assert (plain("customers_list").fresh, plain("customers_list").stale) == (60, 600)
    assert (plain("customers").fresh, plain("customers").stale) == (300, 3600)  # a report
    layered = ttls(
        ttls={
            "standard": {"fresh": 1, "stale": 2},
            "events": {"fresh": 3},
            "events_retrieve": {"fresh": 4},
            "reports": {"stale": 5},
        },
        reports={"customers": {"cache_ttl": 6}},
    )
    assert (layered("customers_list").fresh, layered("customers_list").stale) == (1, 2)
    assert (layered("events_list").fresh, layered("events_list").stale) == (3, 2)
    assert (layered("events_retrieve").fresh, layered("events_retrieve").stale) == (4, 2)
    assert (layered("customers").fresh, layered("customers").stale) == (6, 5)
    assert (layered("invoices").fresh, layered("invoices").stale) == (300, 5)


_SEGMENTS = st.one_of(
    st.sampled_from(sorted({op.path.split("/")[3] for op in READS})),
    st.sampled_from(["1", "007", "0", "..", ".", "%2F", "%2e%2e", "a%00b", "", "me", "x:y"]),
    st.text(max_size=12),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(_SEGMENTS, min_size=1, max_size=6), st.booleans())
def test_any_path_routes_to_a_documented_read_or_to_a_404(
    segments: list[str], doubled: bool
) -> None:
    path = ("/api/v2//" if doubled else "/api/v2/") + "/".join(segments)
    found = AUTH_ROUTER.match(path)
    assert found is None or isinstance(found, Route | BadPath)
    if isinstance(found, Route):
        for name, value in found.path:
            if isinstance(value, str):
                assert value not in (".", "..") and "/" not in value and "%" not in value, name
            else:
                assert value >= 0
        for operation in found.operations.values():  # a value or errors, never an exception
            assert isinstance(
                operation.contract.parse(MultiDict(), found.path), CanonicalQuery | QueryErrors
            )
