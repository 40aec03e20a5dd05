"""Every report's contract, from the document: generated cases for all 32 endpoints, Hypothesis
properties over every report, and hand-written cases for sets, ordered arrays, booleans, dates,
grouped `columns`, defaults and parameters of other reports.

The oracle is the raw OpenAPI document (`proxy/spec/teamup.json`), read here on its own, never
the `Contract` objects the proxy builds from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from proxy.backends.keys import cache_key
from proxy.core.contract import CanonicalQuery, QueryErrors
from proxy.core.operations import load_operations
from tests.test_query import array_pairs, datetime_text, number, respell_case

DOCUMENT: dict[str, Any] = json.loads(
    resources.files("proxy.spec").joinpath("teamup.json").read_bytes()
)
OPERATIONS: dict[str, dict[str, Any]] = {
    item["get"]["x-report"]: item["get"]
    for item in DOCUMENT["paths"].values()
    if "x-report" in item.get("get", {})
}
REPORTS = sorted(OPERATIONS)
GROUPED = [name for name in REPORTS if OPERATIONS[name]["x-grouped"]]
ENDPOINTS = load_operations().reports()
PROPERTY = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
MOMENTS = st.datetimes(
    min_value=datetime(1971, 1, 1), max_value=datetime(2099, 1, 1), timezones=st.just(UTC)
)
DATES = st.dates(min_value=date(1971, 1, 1), max_value=date(2099, 1, 1))


def params(report: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in OPERATIONS[report]["parameters"] if p["in"] == "query"}


def parse(report: str, pairs: list[tuple[str, str]]) -> CanonicalQuery | QueryErrors:
    return ENDPOINTS[report].contract.parse(MultiDict(pairs))


def parse_qs(report: str, qs: str) -> CanonicalQuery | QueryErrors:
    return parse(report, parse_qsl(qs, keep_blank_values=True))


def valid(report: str, pairs: list[tuple[str, str]]) -> CanonicalQuery:
    result = parse(report, pairs)
    assert isinstance(result, CanonicalQuery), (report, pairs, result)
    return result


def invalid(report: str, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    result = parse(report, pairs)
    assert isinstance(result, QueryErrors), (report, pairs, result)
    return result.field_errors


def required_pairs(report: str) -> list[tuple[str, str]]:
    """The least a valid query of `report` must say (grouped variants need `columns`)."""
    operation = OPERATIONS[report]
    return [("columns", operation["x-columns"][0])] if operation["x-grouped"] else []


def item_schema(param: dict[str, Any]) -> dict[str, Any]:
    schema: dict[str, Any] = param["schema"]
    return schema["items"] if schema["type"] == "array" else schema


def kind(param: dict[str, Any]) -> str:
    if param.get("x-sort"):
        return "sort"
    schema = item_schema(param)
    if schema["type"] in ("integer", "boolean"):
        return str(schema["type"])
    if "enum" in schema:
        return "enum"
    return str(schema.get("format", "text"))


def a_valid_value(report: str, param: dict[str, Any]) -> str:
    """One value the document allows (and that is not the default)."""
    schema = item_schema(param)
    default = param["schema"].get("default")
    k = kind(param)
    if k == "integer":
        return str(max(schema.get("minimum", 0), 1) + 1)
    if k == "boolean":
        return "true" if default is not True else "false"
    if k == "enum":
        return str(next(v for v in schema["enum"] if v != default))
    if k == "sort":
        return "-" + str(OPERATIONS[report]["x-columns"][0])
    fixed = {"date": "2024-02-29", "date-time": "2024-02-29T10:00:00+01:00"}
    return fixed.get(k, "42" if "pattern" in schema else "last_month")


BAD_VALUES = {
    "integer": ["1.5", "-1", "abc", ""],
    "boolean": ["yes", "2", "", "truee"],
    "enum": ["not-a-choice", ""],
    "date": ["2024-02-30", "2024-2-1", "01/02/2024", "2024-02-29T00:00:00Z"],
    "date-time": ["2024-02-30T00:00:00Z", "2024-01-01T00:00:00", "yesterday"],
    "text": ["   ", "a\x00b", "x" * 101],
    "sort": ["not_a_column", "--" + "x", ""],
}

CASES = [(report, name) for report in REPORTS for name in params(report)]


def test_the_document_has_32_endpoints_and_the_proxy_builds_them_all() -> None:
    assert len(REPORTS) == 32 and len(GROUPED) == 13
    assert sorted(ENDPOINTS) == REPORTS
    for report in REPORTS:
        assert ENDPOINTS[report].path == f"/api/v2/reports/{report}/data"
        assert set(ENDPOINTS[report].contract.params) == set(params(report))


@pytest.mark.parametrize(("report", "name"), CASES)
def test_every_parameter_accepts_a_valid_value_and_refuses_bad_ones(report: str, name: str) -> None:
    param = params(report)[name]
    base = [(k, v) for k, v in required_pairs(report) if k != name]
    good = a_valid_value(report, param)
    query = valid(report, [*base, (name, good)])
    assert name in dict(parse_qsl(query.canonical_string())), (report, name, good)
    for bad in BAD_VALUES[kind(param)]:
        if kind(param) == "integer" and bad == "-1" and item_schema(param).get("minimum") is None:
            continue
        if kind(param) == "text" and bad == "x" * 101 and "maxLength" not in param["schema"]:
            continue
        assert name in invalid(report, [*base, (name, bad)]), (report, name, bad)


@pytest.mark.parametrize("report", REPORTS)
def test_every_report_refuses_unknown_and_other_reports_parameters(report: str) -> None:
    mine = set(params(report))
    foreign = sorted({n for other in REPORTS for n in params(other)} - mine)
    base = required_pairs(report)
    errors = invalid(report, [*base, ("random", "1")])
    assert errors == {"random": ["Unknown parameter."]}
    for name in foreign[:5]:
        assert name in invalid(report, [*base, (name, "1")]), (report, name)


@pytest.mark.parametrize("report", GROUPED)
def test_grouped_variants_require_columns(report: str) -> None:
    assert "columns" in invalid(report, [])
    assert "columns" in invalid(report, [("format", "json")])
    assert "columns" in invalid(report, [("columns", "")])
    assert "columns" in invalid(report, [("columns", "not_a_column")])
    columns = OPERATIONS[report]["x-columns"]
    query = valid(report, [("columns", ",".join(columns[:2]))])
    assert query.get("columns") == tuple(columns[:2])


@pytest.mark.parametrize("report", REPORTS)
def test_documented_defaults_are_dropped(report: str) -> None:
    base = required_pairs(report)
    plain = valid(report, base)
    for name, param in params(report).items():
        default = param["schema"].get("default")
        if default is None:
            continue
        text = json.dumps(default) if isinstance(default, bool) else str(default)
        assert valid(report, [*base, (name, text)]) == plain, (report, name)


def test_include_deleted_false_is_the_empty_query() -> None:
    empty = valid("customers", [])
    assert valid("customers", [("include_deleted", "false")]) == empty
    assert valid("customers", [("include_deleted", "FALSE")]) == empty
    assert valid("customers", [("include_deleted", "0")]) == empty
    assert valid("customers", [("include_deleted", "true")]) != empty


def test_booleans_in_any_case_or_as_digits() -> None:
    for text in ("true", "TRUE", "True", "1"):
        assert valid("customers", [("is_active", text)]).canonical_string() == "is_active=true"
    for text in ("false", "False", "0"):
        assert valid("customers", [("is_active", text)]).canonical_string() == "is_active=false"
    for text in ("yes", "on", "t", "tru", "01", " true"):
        assert invalid("customers", [("is_active", text)]) == {
            "is_active": [f'"{text}" is not a valid boolean. Use true or false.']
        }


def test_dates_are_real_calendar_dates_and_ranges_are_ordered() -> None:
    query = valid("customers", [("date_of_birth_gte", "2000-02-29")])
    assert query.canonical_string() == "date_of_birth_gte=2000-02-29"
    assert "date_of_birth_gte" in invalid("customers", [("date_of_birth_gte", "2001-02-29")])
    assert "date_of_birth_lte" in invalid("customers", [("date_of_birth_lte", "2001-13-01")])
    errors = invalid(
        "customers", [("date_of_birth_gte", "2001-01-02"), ("date_of_birth_lte", "2001-01-01")]
    )
    assert errors == {"date_of_birth_gte": ["Must not be later than date_of_birth_lte."]}


def test_sets_are_sorted_and_deduplicated_ordered_arrays_keep_order() -> None:
    a = valid("customers", [("ids", "3,1"), ("ids[]", "3"), ("is_any", "LEAD,new")])
    b = valid("customers", [("is_any", "new"), ("is_any", "lead"), ("ids", "1,3")])
    assert a == b and a.canonical_string() == "ids=1,3&is_any=lead,new"
    c = valid("customers", [("columns", "email,id,email"), ("sort", "-age,email")])
    assert c.canonical_string() == "columns=email,id&sort=-age,email"
    d = valid("customers", [("columns", "id,email"), ("sort", "email,-age")])
    assert cache_key(c) != cache_key(d)


def test_sort_items_are_that_reports_columns() -> None:
    assert valid("invoices", [("sort", "-" + OPERATIONS["invoices"]["x-columns"][0])])
    assert "sort" in invalid("invoices", [("sort", "full_name")])  # a customers column
    assert valid("customers", [("sort", "-full_name")])


def test_every_error_of_one_query_at_once() -> None:
    errors = invalid(
        "customers.grouped",
        [("limit", "0"), ("is_active", "maybe"), ("date_of_birth_gte", "x"), ("nope", "1")],
    )
    assert set(errors) == {"columns", "limit", "is_active", "date_of_birth_gte", "nope"}


def test_entries_never_cross_reports() -> None:
    keys = {cache_key(valid(report, required_pairs(report))) for report in REPORTS}
    assert len(keys) == 32
    a = valid("customers", [("ids", "1")])
    b = valid("invoices", [("limit", "10")])
    assert cache_key(a).startswith("v3:customers:")
    assert cache_key(b).startswith("v3:invoices:")


# --- Hypothesis: a meaning per report, drawn from the raw document, in many spellings -------


@dataclass(frozen=True)
class Meaning:
    """What a query of one report means: parameter → value, defaults left out."""

    report: str
    values: tuple[tuple[str, Any], ...]


def _scalar(draw: st.DrawFn, report: str, param: dict[str, Any]) -> Any:
    schema = item_schema(param)
    k = kind(param)
    if k == "integer":
        low = schema.get("minimum", 0)
        return draw(st.integers(low, schema.get("maximum", 10**12)))
    if k == "boolean":
        return draw(st.booleans())
    if k == "enum":
        return draw(st.sampled_from(schema["enum"]))
    if k == "sort":
        return draw(st.sampled_from(["", "-"])) + draw(
            st.sampled_from(OPERATIONS[report]["x-columns"])
        )
    if k == "date":
        return draw(DATES)
    if k == "date-time":
        return draw(MOMENTS)
    if "pattern" in schema:  # the document's only patterns: `^(\d+|none)$`
        return draw(st.sampled_from(["1", "42", "007", "none"]))
    alphabet = st.characters(categories=["L", "N"], max_codepoint=0x2FF)
    return draw(st.text(alphabet, min_size=1, max_size=20))


@st.composite
def meanings(draw: st.DrawFn, report: str) -> Meaning:
    values: dict[str, Any] = {}
    for name, param in params(report).items():
        must = name == "columns" and OPERATIONS[report]["x-grouped"]
        if not must and not draw(st.booleans()):
            continue
        if param["schema"]["type"] == "array":
            drawn = [_scalar(draw, report, param) for _ in range(draw(st.integers(1, 4)))]
            if param["x-canonical"] == "set":
                values[name] = frozenset(drawn)
            else:
                values[name] = tuple(dict.fromkeys(drawn))
        else:
            value = _scalar(draw, report, param)
            if value != param["schema"].get("default"):
                values[name] = value
    for low, high in OPERATIONS[report]["x-ranges"]:
        if low in values and high in values and values[low] > values[high]:
            values[low], values[high] = values[high], values[low]
    return Meaning(report, tuple(sorted(values.items())))


def _spell(draw: st.DrawFn, param: dict[str, Any], value: Any) -> str:
    k = kind(param)
    if k == "integer":
        return number(draw, value)
    if k == "boolean":
        word = "true" if value else "false"
        return draw(st.sampled_from([respell_case(draw, word), "1" if value else "0"]))
    if k == "enum":
        return respell_case(draw, value)
    if k == "sort":
        return str(value[:1] + respell_case(draw, value[1:]))
    if k == "date":
        return str(value.isoformat())
    if k == "date-time":
        return datetime_text(draw, value)
    return " " * draw(st.integers(0, 1)) + str(value)


@st.composite
def spellings(draw: st.DrawFn, meaning: Meaning) -> list[tuple[str, str]]:
    """Decoded pairs that say `meaning`, in a random spelling and order."""
    table = params(meaning.report)
    groups: list[list[tuple[str, str]]] = []
    for name, value in meaning.values:
        param = table[name]
        if param["schema"]["type"] != "array":
            groups.append([(name, _spell(draw, param, value))])
            continue
        items = list(value) if isinstance(value, tuple) else sorted(value, key=repr)
        if isinstance(value, frozenset):
            items = draw(st.permutations(items + draw(st.lists(st.sampled_from(items)))))
        elif draw(st.booleans()):
            at = draw(st.integers(1, len(items)))
            items.insert(at, draw(st.sampled_from(items[:at])))  # an exact repeat, later
        groups.append(array_pairs(draw, name, [_spell(draw, param, item) for item in items]))
    slots = draw(st.permutations([i for i, group in enumerate(groups) for _ in group]))
    cursors = [iter(group) for group in groups]
    return [next(cursors[i]) for i in slots]


def _changed(draw: st.DrawFn, meaning: Meaning) -> Meaning:
    """`meaning` with exactly one meaningful value different (ranges kept ordered)."""
    values = dict(meaning.values)
    table = params(meaning.report)
    name = draw(st.sampled_from(sorted(table)))
    param = table[name]
    ranges = {
        n: (i, pair) for pair in OPERATIONS[meaning.report]["x-ranges"] for i, n in enumerate(pair)
    }
    old = values.get(name)
    k = kind(param)
    if param["schema"]["type"] == "array":
        extra = _scalar(draw, meaning.report, param)
        if isinstance(old, frozenset):
            new: Any = old ^ {extra}
        elif old and len(old) > 1:
            new = old[::-1]
        else:
            new = tuple(dict.fromkeys((*(old or ()), extra)))
            if new == old:
                new = (
                    None
                    if name != "columns" or not OPERATIONS[meaning.report]["x-grouped"]
                    else old
                )
        if not new:
            new = None
    elif k in ("date", "date-time"):
        step = timedelta(days=1) if k == "date" else timedelta(microseconds=1)
        base = old if old is not None else (date(2000, 1, 1) if k == "date" else MOMENT_2000)
        index = ranges.get(name, (0, None))[0]
        new = base - step if index == 0 else base + step
        partner = ranges.get(name, (0, None))[1]
        if partner is not None and old is None:
            other = values.get(partner[1 - index])
            if other is not None:
                new = other - step if index == 0 else other + step
    elif k == "integer":
        schema = item_schema(param)
        top = schema.get("maximum", 10**12)
        low = schema.get("minimum", 0)
        new = (old + 1 if old < top else old - 1) if old is not None else low
        if new == param["schema"].get("default"):
            new = None if old is not None else new + 1
    elif k == "boolean":
        new = (not old) if old is not None else not param["schema"].get("default", False)
        if new == param["schema"].get("default"):
            new = None
    elif k == "enum":
        choices = [c for c in item_schema(param)["enum"] if c != old]
        new = draw(st.sampled_from(choices))
        if new == param["schema"].get("default"):
            new = None
    else:
        new = (old or "") + "x"
    if new is None:
        values.pop(name, None)
    else:
        values[name] = new
    return Meaning(meaning.report, tuple(sorted(values.items())))


MOMENT_2000 = datetime(2000, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("report", REPORTS)
@PROPERTY
@given(data=st.data())
def test_respelling_reordering_and_reencoding_never_change_the_key(
    report: str, data: st.DataObject
) -> None:
    meaning = data.draw(meanings(report))
    first = valid(report, data.draw(spellings(meaning)))
    second = valid(report, data.draw(spellings(meaning)))
    assert cache_key(first) == cache_key(second)
    assert first.upstream_query("repeat") == second.upstream_query("repeat")
    encoded = parse_qs(report, urlencode(data.draw(spellings(meaning))))
    assert isinstance(encoded, CanonicalQuery) and cache_key(encoded) == cache_key(first)


@pytest.mark.parametrize("report", REPORTS)
@PROPERTY
@given(data=st.data())
def test_canonicalising_twice_changes_nothing(report: str, data: st.DataObject) -> None:
    query = valid(report, data.draw(spellings(data.draw(meanings(report)))))
    for text in (query.canonical_string(), query.upstream_query("repeat")):
        again = parse_qs(report, text)
        assert again == query
        assert isinstance(again, CanonicalQuery)
        assert again.canonical_string() == query.canonical_string()


@pytest.mark.parametrize("report", REPORTS)
@PROPERTY
@given(data=st.data())
def test_changing_one_meaningful_value_changes_the_key(report: str, data: st.DataObject) -> None:
    meaning = data.draw(meanings(report))
    changed = _changed(data.draw, meaning)  # type: ignore[arg-type]
    if changed == meaning:
        return  # the one parameter drawn had no other meaningful value here
    before = valid(report, data.draw(spellings(meaning)))
    after = valid(report, data.draw(spellings(changed)))
    assert cache_key(before) != cache_key(after), (meaning, changed)


def test_readmes_table_of_reports_is_the_documents() -> None:
    from pathlib import Path

    from proxy.core.reports_table import markdown_table

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme
