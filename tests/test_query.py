"""The query contract: equivalences, distinctions, errors and Hypothesis properties."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, urlencode

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from proxy.backends.keys import cache_key
from proxy.core.contract import MAX_ARRAY_ITEMS, MAX_QUERY_BYTES, CanonicalQuery, QueryErrors
from proxy.testing.e2e import parse_query

# Restated from the spec on purpose, not imported: the tests are the oracle for proxy/query.py.
COLUMNS = (
    "customer_id",
    "customer.id",
    "customer",
    "customer_name",
    "customer.name",
    "customer_email",
    "customer.email",
    "created_at",
    "amount",
    "balance",
    "memo",
)
NAMES = (
    "columns",
    "created_at_gte",
    "created_at_lte",
    "created_at_timeframe",
    "customers",
    "format",
    "id_gt",
    "limit",
    "offset",
    "page",
    "page_size",
    "sort",
)
KEY_RE = re.compile(r"v3:customer_credits:[0-9a-f]{64}")
HEADER_SAFE_RE = re.compile(r"[\x21-\x7e]*")
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def parse(qs: str) -> CanonicalQuery | QueryErrors:
    """Decode a raw query string the way aiohttp does, then parse it."""
    return parse_query(MultiDict(parse_qsl(qs, keep_blank_values=True)))


def canonical(qs: str) -> CanonicalQuery:
    """Parse a query string that must be valid."""
    result = parse(qs)
    assert isinstance(result, CanonicalQuery), result
    return result


def errors(qs: str) -> dict[str, list[str]]:
    """Parse a query string that must be invalid and return its field errors."""
    result = parse(qs)
    assert isinstance(result, QueryErrors), result
    return result.field_errors


EQUIVALENT = [
    ("customers=3,1", "customers=1&customers=3"),
    ("customers=1&customers=3", "customers[]=3&customers[]=1"),
    ("customers=3,1", "customers[]=3&customers[]=1"),
    ("customers=3,1,3&customers=1", "customers=1,3"),
    ("customers=0007", "customers=7"),
    ("customers[]=2&customers=3,1", "customers=1,2,3"),
    ("created_at_gte=2024-01-01T01:00:00%2B01:00", "created_at_gte=2024-01-01T00:00:00Z"),
    ("created_at_gte=2024-01-01T00:00:00Z", "created_at_gte=2024-01-01T00:00:00.000Z"),
    ("created_at_gte=2024-01-01T01:00:00%2B01:00", "created_at_gte=2024-01-01T00:00:00.000Z"),
    ("created_at_gte=2024-01-01T01:00:00+01:00", "created_at_gte=2024-01-01T00:00:00Z"),
    ("created_at_gte=2024-01-01T01:00:00%2B0100", "created_at_gte=2024-01-01T00:00:00Z"),
    ("created_at_lte=2023-12-31T19:00:00-05:00", "created_at_lte=2024-01-01T00:00:00Z"),
    ("created_at_lte=2024-01-01T00:00:00%2B00:00", "created_at_lte=2024-01-01t00:00:00z"),
    ("created_at_lte=2024-01-01T00:00Z", "created_at_lte=2024-01-01T00:00:00Z"),
    ("created_at_lte=2024-01-01T00:00:00.5Z", "created_at_lte=2024-01-01T00:00:00.500000000Z"),
    ("format=JSON", "format=json"),
    ("format=csv", ""),
    ("format=CsV", ""),
    ("limit=010", "limit=10"),
    ("limit=50", ""),
    ("offset=0", ""),
    ("offset=000", ""),
    ("limit=50&offset=0&format=csv", ""),
    ("page=1&page_size=20", "page_size=20&page=1"),
    ("id_gt=0005", "id_gt=5"),
    ("columns=memo,amount", "columns=memo&columns=amount"),
    ("columns[]=memo&columns[]=amount", "columns=memo,amount"),
    ("columns=memo&columns[]=amount", "columns=memo,amount"),
    ("columns=MEMO&columns=Customer.Email", "columns=memo,customer.email"),
    ("columns=memo,amount,memo", "columns=memo,amount"),
    ("sort=-amount,created_at", "sort=-amount&sort=created_at"),
    ("sort[]=-amount&sort=created_at", "sort=-amount,created_at"),
    ("sort=amount&sort=amount", "sort=amount"),
    ("sort=-AMOUNT", "sort=-amount"),
    ("created_at_timeframe=%20last_month%20", "created_at_timeframe=last_month"),
    ("created_at_timeframe=+this+year+", "created_at_timeframe=this%20year"),
    ("limit=10&sort=memo&customers=2", "customers=2&sort=memo&limit=10"),
]

DISTINCT = [
    ("sort=amount&sort=-balance", "sort=-balance&sort=amount"),
    ("columns=memo&columns=amount", "columns=amount&columns=memo"),
    ("sort=amount", "sort=-amount"),
    ("sort=memo", "columns=memo"),
    ("customers=1", "customers=1,2"),
    ("customers=1", "customers=2"),
    ("customers=12", "customers=1,2"),
    ("customers=1,2", "customers=1,2,3"),
    ("limit=10", "limit=11"),
    ("limit=10", ""),
    ("limit=100", "limit=99"),
    ("offset=1", ""),
    ("offset=50", "limit=50"),
    ("format=json", ""),
    ("format=json", "format=csv"),
    ("created_at_gte=2024-01-01T00:00:00Z", "created_at_lte=2024-01-01T00:00:00Z"),
    ("created_at_gte=2024-01-01T00:00:00Z", "created_at_gte=2024-01-01T00:00:00.000001Z"),
    ("created_at_gte=2024-01-01T00:00:00%2B01:00", "created_at_gte=2024-01-01T00:00:00Z"),
    ("created_at_gte=2024-01-01T00:00:00-01:00", "created_at_gte=2024-01-01T00:00:00%2B01:00"),
    ("created_at_timeframe=a", "created_at_timeframe=A"),
    ("created_at_timeframe=a%20b", "created_at_timeframe=a%20%20b"),
    ("created_at_timeframe=a,b", "created_at_timeframe=a"),
    ("id_gt=0", ""),
    ("id_gt=10", "id_gt=1"),
    ("page=1", ""),
    ("page_size=0", ""),
    ("page=2", "page_size=2"),
    ("limit=10", "page_size=10"),
    ("columns=customer.id", "columns=customer_id"),
    ("columns=memo", ""),
    ("columns=memo,amount", "columns=memo"),
    ("created_at_timeframe=1", "id_gt=1"),
]


@pytest.mark.parametrize(("left", "right"), EQUIVALENT)
def test_equivalent_queries_share_key_and_upstream_query(left: str, right: str) -> None:
    a, b = canonical(left), canonical(right)
    assert cache_key(a) == cache_key(b)
    assert a == b
    for style in ("comma", "repeat"):
        assert a.upstream_query(style) == b.upstream_query(style)


@pytest.mark.parametrize(("left", "right"), DISTINCT)
def test_distinct_queries_have_distinct_keys(left: str, right: str) -> None:
    assert cache_key(canonical(left)) != cache_key(canonical(right))


def test_tables_are_big_enough() -> None:
    assert len(EQUIVALENT) >= 25
    assert len(DISTINCT) >= 25


INVALID = [
    ("limit=0", "limit"),
    ("limit=101", "limit"),
    ("limit=1.5", "limit"),
    ("limit=1e3", "limit"),
    ("limit=-0", "limit"),
    ("limit=%2B1", "limit"),
    ("limit=+1", "limit"),
    ("limit=", "limit"),
    ("limit=%2010", "limit"),
    ("limit=10%20", "limit"),
    ("limit=1%200", "limit"),
    ("limit=\u0661\u0660", "limit"),
    ("limit=\uff11", "limit"),
    ("limit=" + "9" * 5000, "limit"),
    ("limit=10&limit=20", "limit"),
    ("limit=10&limit=10", "limit"),
    ("limit[]=10", "limit[]"),
    ("offset=-1", "offset"),
    ("page=0", "page"),
    ("page_size=101", "page_size"),
    ("id_gt=-1", "id_gt"),
    ("id_gt=" + "9" * 30, "id_gt"),
    ("customers=0", "customers"),
    ("customers=1,,2", "customers"),
    ("customers=1,", "customers"),
    ("customers=,1", "customers"),
    ("customers=", "customers"),
    ("customers=a", "customers"),
    ("customers=1&customers[]=x", "customers"),
    ("customers=" + ",".join(str(n) for n in range(1, MAX_ARRAY_ITEMS + 2)), "customers"),
    ("columns=nope", "columns"),
    ("columns=memo,,amount", "columns"),
    ("columns=", "columns"),
    ("columns=-memo", "columns"),
    ("columns=memo%20", "columns"),
    ("sort=nope", "sort"),
    ("sort=--amount", "sort"),
    ("sort=-", "sort"),
    ("sort=amount,", "sort"),
    ("format=xml", "format"),
    ("format=", "format"),
    ("format=json&format=json", "format"),
    ("format=\uff4a\uff53\uff4f\uff4e", "format"),
    ("created_at_gte=2024-01-01T00:00:00", "created_at_gte"),
    ("created_at_gte=2024-01-01", "created_at_gte"),
    ("created_at_gte=2024-13-01T00:00:00Z", "created_at_gte"),
    ("created_at_gte=2024-02-30T00:00:00Z", "created_at_gte"),
    ("created_at_gte=2024-01-01T24:00:00Z", "created_at_gte"),
    ("created_at_gte=2024-01-01T00:00:00%2B24:00", "created_at_gte"),
    ("created_at_gte=2024-01-01T00:00:00.1234567Z", "created_at_gte"),
    ("created_at_gte=yesterday", "created_at_gte"),
    ("created_at_gte=", "created_at_gte"),
    ("created_at_gte=0001-01-01T00:00:00%2B01:00", "created_at_gte"),
    ("created_at_lte=9999-12-31T23:30:00-01:00", "created_at_lte"),
    ("created_at_lte=0000-01-01T00:00:00Z", "created_at_lte"),
    ("created_at_lte=2024-01-01T00:00:00%20%2001:00", "created_at_lte"),
    ("created_at_lte=%202024-01-01T00:00:00Z", "created_at_lte"),
    ("created_at_gte=2024-02-01T00:00:00Z&created_at_lte=2024-01-01T00:00:00Z", "created_at_gte"),
    ("created_at_timeframe=%20%20", "created_at_timeframe"),
    ("created_at_timeframe=", "created_at_timeframe"),
    ("created_at_timeframe=" + "x" * 101, "created_at_timeframe"),
    ("created_at_timeframe=a%00b", "created_at_timeframe"),
    ("created_at_timeframe=a%C2%85b", "created_at_timeframe"),
    ("created_at_timeframe=a%7F", "created_at_timeframe"),
    ("limit=1%0A", "limit"),
    ("format=json%0D", "format"),
    ("sort=memo%09", "sort"),
    ("foo=1", "foo"),
    ("Limit=1", "Limit"),
]


@pytest.mark.parametrize(("qs", "field"), INVALID)
def test_invalid_input_names_the_parameter(qs: str, field: str) -> None:
    field_errors = errors(qs)
    assert list(field_errors) == [field]
    assert all(field_errors[field])


def test_integer_messages_follow_django_rest_framework() -> None:
    assert errors("limit=101") == {"limit": ["Ensure this value is less than or equal to 100."]}
    assert errors("limit=0") == {"limit": ["Ensure this value is greater than or equal to 1."]}
    assert errors("limit=1.5") == {"limit": ["A valid integer is required."]}
    assert errors("limit=" + "9" * 5000) == {
        "limit": ["Ensure this value is less than or equal to 100."]
    }


def test_every_bad_parameter_is_reported_at_once() -> None:
    result = parse("limit=0&foo=1&sort=bad&customers=1,,x&created_at_gte=2024-01-01T00:00:00")
    assert isinstance(result, QueryErrors)
    assert list(result.field_errors) == ["created_at_gte", "customers", "foo", "limit", "sort"]
    assert len(result.field_errors["customers"]) == 2


def test_body_has_teamups_error_shape() -> None:
    result = parse("limit=0&foo=1")
    assert isinstance(result, QueryErrors)
    body = result.body()
    assert body == {
        "code": "parameter_invalid",
        "type": "invalid_request_error",
        "message": "Invalid query parameters: foo, limit.",
        "field_errors": {
            "foo": ["Unknown parameter."],
            "limit": ["Ensure this value is greater than or equal to 1."],
        },
    }
    nameless = parse("=1")
    assert isinstance(nameless, QueryErrors)
    assert nameless.body()["message"] == 'Invalid query parameter: "".'
    single = parse("page=0")
    assert isinstance(single, QueryErrors)
    assert single.body()["message"] == "Invalid query parameter: page."


def test_canonical_forms() -> None:
    query = canonical(
        "sort=-amount&customers=3,1&customers[]=2&format=JSON&limit=010&offset=0"
        "&columns=MEMO,amount&created_at_gte=2024-01-01T01:00:00.250%2B01:00"
        "&created_at_timeframe=%20last%20month,%26more%20"
    )
    assert query.canonical_string() == (
        "columns=memo,amount&created_at_gte=2024-01-01T00:00:00.25Z"
        "&created_at_timeframe=last%20month%2C%26more&customers=1,2,3&format=json&limit=10"
        "&sort=-amount"
    )
    assert query.upstream_query("comma") == query.canonical_string()
    assert query.upstream_query("repeat") == (
        "columns=memo&columns=amount&created_at_gte=2024-01-01T00:00:00.25Z"
        "&created_at_timeframe=last%20month%2C%26more&customers=1&customers=2&customers=3"
        "&format=json&limit=10&sort=-amount"
    )
    assert query.get("customers") == (1, 2, 3)
    assert query.get("columns") == ("memo", "amount")
    assert query.get("limit") == 10
    assert query.get("offset") is None
    assert query.get("nope") is None
    assert [name for name, _ in query.items] == sorted(name for name, _ in query.items)
    assert KEY_RE.fullmatch(cache_key(query))


def test_empty_query_is_empty() -> None:
    query = canonical("")
    assert query.items == ()
    assert query.canonical_string() == ""
    assert query.upstream_query("repeat") == ""


def test_cache_key_tells_types_apart() -> None:
    as_text = CanonicalQuery("customer_credits", (("created_at_timeframe", "1"),))
    as_number = CanonicalQuery("customer_credits", (("created_at_timeframe", 1),))
    assert cache_key(as_text) != cache_key(as_number)
    assert CanonicalQuery("customer_credits", (("b", 1), ("a", 2))) == CanonicalQuery(
        "customer_credits", (("a", 2), ("b", 1))
    )


def test_datetime_layout_and_range_edges() -> None:
    assert canonical("created_at_gte=0001-01-01T00:00:00Z").get("created_at_gte") == (
        "0001-01-01T00:00:00Z"
    )
    assert canonical("created_at_lte=9999-12-31T23:59:59.999999Z").get("created_at_lte") == (
        "9999-12-31T23:59:59.999999Z"
    )
    equal = "created_at_gte=2024-01-01T00:00:00Z&created_at_lte=2024-01-01T01:00:00%2B01:00"
    assert isinstance(parse(equal), CanonicalQuery)


def test_limits_are_exported() -> None:
    assert MAX_QUERY_BYTES == 4096
    assert MAX_ARRAY_ITEMS == 200
    duplicates = "&".join(["customers=1"] * MAX_ARRAY_ITEMS)
    assert canonical(duplicates).get("customers") == (1,)


# --- Hypothesis: a semantic model of a query, rendered in many spellings ---------------------


@dataclass(frozen=True)
class Spec:
    """What a query means, independent of how it is spelled."""

    columns: tuple[str, ...] = ()
    sort: tuple[str, ...] = ()
    customers: frozenset[int] = frozenset()
    created_at_gte: datetime | None = None
    created_at_lte: datetime | None = None
    created_at_timeframe: str | None = None
    format: str = "csv"
    limit: int = 50
    offset: int = 0
    id_gt: int | None = None
    page: int | None = None
    page_size: int | None = None


EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)
moments = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(UTC)
)
timeframes = (
    st.text(st.characters(exclude_categories=["Cc", "Cs"]), min_size=1, max_size=30)
    .map(str.strip)
    .filter(bool)
)


@st.composite
def specs(draw: st.DrawFn) -> Spec:
    """A valid query's meaning."""
    start = draw(st.none() | moments)
    end = draw(st.none() | moments)
    if start is not None and end is not None and start > end:
        start, end = end, start
    sort_items = [sign + column for column in COLUMNS for sign in ("", "-")]
    return Spec(
        columns=tuple(draw(st.lists(st.sampled_from(COLUMNS), unique=True, max_size=5))),
        sort=tuple(draw(st.lists(st.sampled_from(sort_items), unique=True, max_size=4))),
        customers=frozenset(draw(st.sets(st.integers(1, 10**12), max_size=6))),
        created_at_gte=start,
        created_at_lte=end,
        created_at_timeframe=draw(st.none() | timeframes),
        format=draw(st.sampled_from(["csv", "json"])),
        limit=draw(st.integers(1, 100)),
        offset=draw(st.sampled_from([0, 0, 1, 50, 10**9])),
        id_gt=draw(st.none() | st.integers(0, 2**63 - 1)),
        page=draw(st.none() | st.integers(1, 10**6)),
        page_size=draw(st.none() | st.integers(0, 100)),
    )


def respell_case(draw: st.DrawFn, text: str) -> str:
    """The same ASCII word in a random mix of upper and lower case."""
    flips = draw(st.lists(st.booleans(), min_size=len(text), max_size=len(text)))
    return "".join(c.upper() if flip else c for c, flip in zip(text, flips, strict=True))


def number(draw: st.DrawFn, value: int) -> str:
    """An integer with a few optional leading zeros."""
    return "0" * draw(st.integers(0, 3)) + str(value)


def array_pairs(draw: st.DrawFn, name: str, items: list[str]) -> list[tuple[str, str]]:
    """Items split into consecutive chunks, each sent as `name`, `name[]` or a comma list."""
    pairs: list[tuple[str, str]] = []
    rest = items
    while rest:
        size = draw(st.integers(1, len(rest)))
        key = name + draw(st.sampled_from(["", "[]"]))
        pairs.append((key, ",".join(rest[:size])))
        rest = rest[size:]
    return pairs


def datetime_text(draw: st.DrawFn, moment: datetime) -> str:
    """One of many ISO 8601 spellings of the same instant."""
    minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    local = (moment + timedelta(minutes=minutes)).replace(tzinfo=None)
    text = local.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt ")) + local.strftime("%H:%M")
    if local.second or local.microsecond or draw(st.booleans()):
        text += local.strftime(":%S")
        fraction = f"{local.microsecond:06d}".rstrip("0")
        if fraction or draw(st.booleans()):
            text += "." + (fraction or "0") + "0" * draw(st.integers(0, 3))
    if minutes == 0 and draw(st.booleans()):
        return text + draw(st.sampled_from("Zz"))
    sign = "-" if minutes < 0 else draw(st.sampled_from("+ "))
    hours, mins = divmod(abs(minutes), 60)
    return text + sign + f"{hours:02d}" + draw(st.sampled_from([":", ""])) + f"{mins:02d}"


@st.composite
def spellings(draw: st.DrawFn, spec: Spec) -> list[tuple[str, str]]:
    """Decoded query pairs that mean `spec`, in a random spelling and order."""
    groups: list[list[tuple[str, str]]] = []
    if spec.columns:
        columns = [respell_case(draw, column) for column in spec.columns]
        for _ in range(draw(st.integers(0, 2))):
            at = draw(st.integers(1, len(columns)))
            columns.insert(at, respell_case(draw, draw(st.sampled_from(columns[:at]))))
        groups.append(array_pairs(draw, "columns", columns))
    if spec.sort:
        sort = [item[:1] + respell_case(draw, item[1:]) for item in spec.sort]
        if draw(st.booleans()):
            again = draw(st.sampled_from(sort))
            sort.append(again[:1] + respell_case(draw, again[1:]))
        groups.append(array_pairs(draw, "sort", sort))
    if spec.customers:
        ids = sorted(spec.customers) + draw(st.lists(st.sampled_from(sorted(spec.customers))))
        ids = draw(st.permutations(ids))
        groups.append(array_pairs(draw, "customers", [number(draw, n) for n in ids]))
    for name in ("created_at_gte", "created_at_lte"):
        moment = getattr(spec, name)
        if moment is not None:
            groups.append([(name, datetime_text(draw, moment))])
    if spec.created_at_timeframe is not None:
        pad = " " * draw(st.integers(0, 2)), " " * draw(st.integers(0, 2))
        groups.append([("created_at_timeframe", pad[0] + spec.created_at_timeframe + pad[1])])
    if spec.format != "csv" or draw(st.booleans()):
        groups.append([("format", respell_case(draw, spec.format))])
    for name, default in (("limit", 50), ("offset", 0), ("id_gt", None), ("page", None)):
        value = getattr(spec, name)
        if value is not None and (value != default or draw(st.booleans())):
            groups.append([(name, number(draw, value))])
    if spec.page_size is not None:
        groups.append([("page_size", number(draw, spec.page_size))])
    # Interleave the groups at random while each group keeps its own order.
    slots = draw(st.permutations([i for i, group in enumerate(groups) for _ in group]))
    cursors = [iter(group) for group in groups]
    return [next(cursors[i]) for i in slots]


def one_step(number: int) -> int:
    """Another valid integer: one up, or one down from the 64-bit ceiling (one up is refused)."""
    return number + 1 if number < 2**63 - 1 else number - 1


@st.composite
def mutations(draw: st.DrawFn, spec: Spec) -> Spec:
    """A spec that differs from `spec` in exactly one meaningful value."""
    name = draw(st.sampled_from(sorted(field.name for field in dataclasses.fields(Spec))))
    value = getattr(spec, name)
    changed: Any
    if name == "columns":
        unused = next(column for column in COLUMNS if column not in value)
        changed = value[::-1] if len(value) > 1 else (unused,)
    elif name == "sort":
        first = value[0] if value else "-memo"
        changed = (first[1:] if first.startswith("-") else "-" + first, *value[1:])
    elif name == "customers":
        changed = value ^ {draw(st.integers(1, 10**12))}
    elif name == "created_at_gte":
        changed = (value or EARLIEST) - timedelta(microseconds=1)
    elif name == "created_at_lte":
        changed = (value or spec.created_at_gte or EARLIEST) + timedelta(microseconds=1)
    elif name == "created_at_timeframe":
        changed = (value or "") + "x"
    elif name == "format":
        changed = "json" if value == "csv" else "csv"
    elif name == "limit":
        changed = draw(st.integers(1, 100).filter(lambda n: n != value))
    elif name in ("offset", "page"):
        changed = one_step(value or 0)
    elif name == "id_gt":
        changed = None if value is not None and draw(st.booleans()) else one_step(value or 0)
    else:
        changed = None if value is not None else 100
    return dataclasses.replace(spec, **{name: changed})


def parse_pairs(pairs: list[tuple[str, str]]) -> CanonicalQuery:
    """Parse decoded pairs that must be valid."""
    result = parse_query(MultiDict(pairs))
    assert isinstance(result, CanonicalQuery), (pairs, result)
    return result


@PROPERTY
@given(st.data())
def test_respelling_and_reordering_never_change_the_key(data: st.DataObject) -> None:
    spec = data.draw(specs())
    first = parse_pairs(data.draw(spellings(spec)))
    second = parse_pairs(data.draw(spellings(spec)))
    assert cache_key(first) == cache_key(second)
    assert first.upstream_query("repeat") == second.upstream_query("repeat")
    encoded = canonical(urlencode(data.draw(spellings(spec))))
    assert cache_key(encoded) == cache_key(first)


@PROPERTY
@given(st.data())
def test_canonicalising_is_idempotent(data: st.DataObject) -> None:
    query = parse_pairs(data.draw(spellings(data.draw(specs()))))
    for text in (
        query.canonical_string(),
        query.upstream_query("comma"),
        query.upstream_query("repeat"),
    ):
        again = canonical(text)
        assert again == query
        assert cache_key(again) == cache_key(query)
        assert again.canonical_string() == query.canonical_string()
    assert HEADER_SAFE_RE.fullmatch(query.canonical_string())


@PROPERTY
@given(st.data())
def test_changing_one_meaningful_value_changes_the_key(data: st.DataObject) -> None:
    spec = data.draw(specs())
    changed = data.draw(mutations(spec))
    assert changed != spec
    before = parse_pairs(data.draw(spellings(spec)))
    after = parse_pairs(data.draw(spellings(changed)))
    assert cache_key(before) != cache_key(after)


anything = st.text(st.characters(exclude_categories=()), max_size=40)
numbers = st.integers(-(10**30), 10**30).map(str) | st.just("9" * 5000)
digits = st.text(st.characters(categories=["Nd"]), min_size=1, max_size=5)
raw_keys = st.sampled_from(NAMES) | st.sampled_from(NAMES).map(lambda n: n + "[]") | anything
raw_values = anything | numbers | digits | st.sampled_from(COLUMNS) | moments.map(str)
query_strings = st.text(
    st.sampled_from(list("&=,+%[]-:.TZ 0123456789abcdefxyzABCF\u0661\x00")) | st.characters(),
    max_size=120,
)


def check_never_raises(result: CanonicalQuery | QueryErrors) -> None:
    """Whatever came back is usable: a canonical query or a serialisable error body."""
    if isinstance(result, CanonicalQuery):
        assert KEY_RE.fullmatch(cache_key(result))
        assert HEADER_SAFE_RE.fullmatch(result.canonical_string())
        assert HEADER_SAFE_RE.fullmatch(result.upstream_query("repeat"))
    else:
        assert result.field_errors
        orjson.dumps(result.body())


@PROPERTY
@given(st.lists(st.tuples(raw_keys, raw_values), max_size=30))
def test_parse_never_raises_on_arbitrary_pairs(pairs: list[tuple[str, str]]) -> None:
    check_never_raises(parse_query(MultiDict(pairs)))


@PROPERTY
@given(query_strings)
def test_parse_never_raises_on_arbitrary_query_strings(qs: str) -> None:
    check_never_raises(parse(qs))


@PROPERTY
@given(st.sampled_from(NAMES), st.lists(raw_values, min_size=1, max_size=300))
def test_parse_never_raises_on_many_values(name: str, values: list[str]) -> None:
    check_never_raises(parse_query(MultiDict((name, value) for value in values)))
