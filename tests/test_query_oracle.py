"""The query contract agrees with an oracle written apart from it (tests/query_oracle.py), on the
same hostile query strings the HTTP fuzz test sends (many more of them: no HTTP here)."""

from __future__ import annotations

from hypothesis import given, settings
from yarl import URL

from proxy.core.contract import CanonicalQuery, QueryErrors
from proxy.testing.e2e import REPORT, parse_query
from tests.query_oracle import expected_outcome
from tests.test_hostile import query_strings


def test_the_oracle_and_the_contract_agree_on_the_corners() -> None:
    """Hand-picked outcomes, checked against both: the oracle is pinned to something fixed,
    and the corners random examples may miss (Unicode digits, equal bounds) are always run."""
    cases = {
        "limit=050&format=JSON&offset=0": "format=json",
        "customers=3,1,3&customers[]=2": "customers=1,2,3",
        "sort=-Amount,memo,-amount": "sort=-amount,memo",
        "created_at_gte=2024-01-01T00:30:00%2B01:00": "created_at_gte=2023-12-31T23:30:00Z",
        "created_at_gte=2024-01-01 00:00:00.500000Z": "created_at_gte=2024-01-01T00:00:00.5Z",
        "created_at_timeframe=%20last%20week%20": "created_at_timeframe=last%20week",
        "created_at_gte=2024-01-01T00:00Z&created_at_lte=2024-01-01T01:00%2B01:00": (
            "created_at_gte=2024-01-01T00:00:00Z&created_at_lte=2024-01-01T00:00:00Z"
        ),
    }
    for qs, canonical in cases.items():
        decoded = URL.build(path=REPORT, query_string=qs, encoded=True).query
        assert expected_outcome(decoded.items()).canonical == canonical, qs
        got = parse_query(decoded)
        assert isinstance(got, CanonicalQuery) and got.canonical_string() == canonical, qs
    refused = {
        "limit=0": {"limit"},
        "limit=1&limit=2": {"limit"},
        "limit[]=1": {"limit[]"},
        "page_size=101&nope=1": {"page_size", "nope"},
        "created_at_gte=2024-01-01T00:00:00": {"created_at_gte"},
        "created_at_gte=2024-02-02T00:00Z&created_at_lte=2024-02-01T00:00Z": {"created_at_gte"},
        "customers=1,,2": {"customers"},
        "id_gt=%EF%BC%91": {"id_gt"},  # a fullwidth digit one
        "customers=%D9%A1": {"customers"},  # an Arabic-Indic digit one
    }
    for qs, bad in refused.items():
        decoded = URL.build(path=REPORT, query_string=qs, encoded=True).query
        assert expected_outcome(decoded.items()).bad == bad, qs
        got = parse_query(decoded)
        assert isinstance(got, QueryErrors) and set(got.field_errors) == bad, qs


@settings(max_examples=1000, deadline=None)
@given(qs=query_strings())
def test_the_contract_agrees_with_the_oracle(qs: str) -> None:
    decoded = URL.build(path=REPORT, query_string=qs, encoded=True).query
    expected = expected_outcome(decoded.items())
    got = parse_query(decoded)
    if expected.canonical is None:
        assert isinstance(got, QueryErrors), got
        assert set(got.field_errors) == expected.bad
    else:
        assert isinstance(got, CanonicalQuery), got
        assert got.canonical_string() == expected.canonical
