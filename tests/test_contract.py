"""The query contract end to end: spellings, what reaches TeamUp, and that TeamUp accepts it."""

from __future__ import annotations

import random
from urllib.parse import urlencode

import pytest

from proxy.testing.e2e import COLUMNS, REPORT, auth
from proxy.testing.mock import MockState
from tests.conftest import MakeProxy

NO_CACHE = {"cache_ttl": 0, "cache_stale_ttl": 0}

SPELLINGS = [
    "customers=3,1&format=json&sort=-amount&sort=created_at&limit=10",
    "format=JSON&customers=1&customers=3&sort=-amount,created_at&limit=010",
    "sort[]=-amount&sort[]=created_at&customers[]=3&customers[]=1&format=json&limit=10&offset=0",
    "limit=10&customers=3&customers=1,3&format=Json&sort=-amount&sort=created_at",
]
DATETIMES = [
    "created_at_gte=2024-01-01T01:00:00%2B01:00",
    "created_at_gte=2024-01-01T00:00:00Z",
    "created_at_gte=2024-01-01T00:00:00.000Z",
    "created_at_gte=2024-01-01T01:00:00+01:00",  # an unencoded + arrives as a space
    "created_at_gte=2023-12-31T19:00:00-05:00&limit=50",
]


@pytest.mark.parametrize("spellings", [SPELLINGS, DATETIMES], ids=["arrays", "datetimes"])
async def test_equivalent_spellings_reach_teamup_as_one_query(
    make_proxy: MakeProxy, mock_state: MockState, spellings: list[str]
) -> None:
    proxy = await make_proxy(**NO_CACHE)
    canonical = set()
    for query in spellings:
        response = await proxy.get(f"{REPORT}?{query}", headers=auth())
        assert response.status == 200, await response.text()
        canonical.add(response.headers["X-Proxy-Canonical-Query"])
    assert len(canonical) == 1
    forwarded = {r.query_string for r in mock_state.requests}
    assert len(forwarded) == 1
    assert mock_state.calls == len(spellings)


async def test_equivalent_spellings_share_one_cache_entry(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    for query in SPELLINGS:
        assert (await proxy.get(f"{REPORT}?{query}", headers=auth())).status == 200
    assert mock_state.calls == 1


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("sort=created_at&sort=-amount", "sort=-amount&sort=created_at"),
        ("columns=memo&columns=amount", "columns=amount&columns=memo"),
        ("customers=1,2", "customers=1,2,3"),
        ("format=json", "format=csv"),
    ],
)
async def test_different_questions_get_different_answers(
    make_proxy: MakeProxy, mock_state: MockState, first: str, second: str
) -> None:
    proxy = await make_proxy()
    a = await proxy.get(f"{REPORT}?{first}&limit=20", headers=auth())
    b = await proxy.get(f"{REPORT}?{second}&limit=20", headers=auth())
    assert a.status == b.status == 200
    assert a.headers["X-Proxy-Canonical-Query"] != b.headers["X-Proxy-Canonical-Query"]
    assert mock_state.calls == 2


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("x=random", "x"),
        ("limit=101", "limit"),
        ("limit=0", "limit"),
        ("limit=1.5", "limit"),
        ("limit=10&limit=20", "limit"),
        ("format=xml", "format"),
        ("columns=password", "columns"),
        ("sort=nope", "sort"),
        ("customers=0", "customers"),
        ("created_at_gte=2024-01-01T00:00:00", "created_at_gte"),
        (
            "created_at_gte=2024-02-01T00:00:00Z&created_at_lte=2024-01-01T00:00:00Z",
            "created_at_gte",
        ),
        ("page=0", "page"),
        ("offset=-1", "offset"),
    ],
)
async def test_bad_queries_never_reach_teamup(
    make_proxy: MakeProxy, mock_state: MockState, query: str, field: str
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(f"{REPORT}?{query}", headers=auth())
    assert response.status == 400
    body = await response.json()
    assert body["code"] == "parameter_invalid"
    assert body["type"] == "invalid_request_error"
    assert field in body["field_errors"]
    assert mock_state.calls == 0


async def test_every_bad_parameter_is_reported_at_once(
    make_proxy: MakeProxy, mock_state: MockState
) -> None:
    proxy = await make_proxy()
    response = await proxy.get(f"{REPORT}?limit=500&format=xml&bogus=1", headers=auth())
    assert set((await response.json())["field_errors"]) == {"limit", "format", "bogus"}
    assert mock_state.calls == 0


async def test_a_long_query_is_414(make_proxy: MakeProxy, mock_state: MockState) -> None:
    proxy = await make_proxy()
    response = await proxy.get(f"{REPORT}?created_at_timeframe={'x' * 4100}", headers=auth())
    assert response.status == 414
    assert (await response.json())["code"] == "query_too_long"
    assert mock_state.calls == 0


def random_query(rng: random.Random) -> list[tuple[str, str]]:
    """A valid query in a random spelling."""
    params: list[tuple[str, str]] = []

    def array(name: str, items: list[str]) -> None:
        style = rng.choice(["repeat", "comma", "brackets"])
        if style == "comma":
            params.append((name, ",".join(items)))
        else:
            params.extend((name + ("[]" if style == "brackets" else ""), i) for i in items)

    if rng.random() < 0.5:
        array("columns", rng.sample(COLUMNS, rng.randint(1, 5)))
    if rng.random() < 0.5:
        array("sort", [rng.choice(["", "-"]) + c for c in rng.sample(COLUMNS, rng.randint(1, 3))])
    if rng.random() < 0.5:
        array("customers", [str(rng.randint(1, 99999)) for _ in range(rng.randint(1, 4))])
    if rng.random() < 0.4:
        day = rng.randint(1, 28)
        params.append(("created_at_gte", f"2024-0{rng.randint(1, 6)}-{day:02d}T00:00:00+02:00"))
    if rng.random() < 0.3:
        params.append(("created_at_lte", "2024-12-31T23:59:59.5Z"))
    if rng.random() < 0.5:
        params.append(("format", rng.choice(["json", "JSON", "csv", "Csv"])))
    if rng.random() < 0.5:
        params.append(("limit", str(rng.randint(1, 100)).zfill(rng.randint(1, 4))))
    if rng.random() < 0.3:
        params.append(("offset", str(rng.randint(0, 3000))))
    if rng.random() < 0.2:
        params.append(("page", str(rng.randint(1, 40))))
        params.append(("page_size", str(rng.randint(0, 100))))
    if rng.random() < 0.3:
        params.append(("id_gt", str(rng.randint(0, 3000))))
    if rng.random() < 0.2:
        params.append(("created_at_timeframe", rng.choice(["this_month", " last_year "])))
    rng.shuffle(params)
    return params


@pytest.mark.parametrize("style", ["comma", "repeat"])
async def test_teamup_accepts_every_query_the_proxy_forwards(
    make_proxy: MakeProxy, mock_state: MockState, style: str
) -> None:
    proxy = await make_proxy(upstream_array_style=style, **NO_CACHE)
    rng = random.Random(f"contract-{style}")
    for _ in range(120):
        query = urlencode(random_query(rng))
        response = await proxy.get(f"{REPORT}?{query}", headers=auth())
        assert response.status == 200, (query, await response.text())
    assert mock_state.calls == 120
    if style == "repeat":
        assert any(
            "&sort=" in r.query_string or "&columns=" in r.query_string for r in mock_state.requests
        )
    else:
        assert all(r.query_string.count("sort=") <= 1 for r in mock_state.requests)
