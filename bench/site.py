"""The website mix: event list pages in many spellings, `next` followed, retrieves by id.

A website's class schedule reads `/api/v2/events` and follows `next`; its event pages and a
membership check read `/api/v2/events/{id}` and `/api/v2/customers/{id}`. Five simulated apps
each spell a question their own way: parameter order, sets as one comma value or repeated (and
reordered), `page=1` written or left off, the default `page_size=100` and `format=json` written or
left off, datetimes in `Z` or another offset, the doubled slash TeamUp's docs print. Every
spelling of a question is checked against the proxy's own router and contracts before the run:
all spellings of one question give one cache key, different questions different keys.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote

from multidict import MultiDict

from proxy.backends.keys import cache_key
from proxy.core.contract import CanonicalQuery
from proxy.core.operations import Route, Router, load_operations

__all__ = [
    "APPS",
    "HOT_LIST",
    "HOT_RETRIEVE",
    "ListQuestion",
    "SiteReplay",
    "Visit",
    "build_site",
    "site_key",
    "spell_list",
    "spell_retrieve",
]

EVENTS = "/api/v2/events"
# The mock's ids (proxy.testing.objects): 600 events from 135001, 300 customers from 377001.
EVENT_IDS = range(135001, 135601)
CUSTOMER_IDS = range(377001, 377301)
APPS = 5

# The hot reads of `hotread`: a schedule widget's page (~3.6 KB) and one event (~0.9 KB).
HOT_LIST = (
    f"{EVENTS}?fields=id,name,starts_at,ends_at,venue,status,attending_count,max_occupancy"
    "&page_size=20&sort=start&status=active"
)
HOT_RETRIEVE = f"{EVENTS}/135001"

_ROUTER = Router(load_operations().reads())
_EVENT_FIELDS = (
    "id",
    "name",
    "starts_at",
    "ends_at",
    "venue",
    "status",
    "max_occupancy",
    "attending_count",
    "waiting_count",
    "category",
)
_CUSTOMER_FIELDS = ("id", "first_name", "last_name", "email", "is_lead", "created_at")
_WEEK0 = datetime(2024, 1, 1, tzinfo=UTC)

Pairs = list[tuple[str, str]]


def site_key(target: str) -> str:
    """The cache key teamup-proxy derives from a whole target (raises if it is not valid)."""
    path, _, query = target.partition("?")
    route = _ROUTER.match(path)
    if not isinstance(route, Route):
        raise ValueError(f"bench target {target!r} does not route: {route}")
    parsed = route.operations["GET"].contract.parse(
        MultiDict(parse_qsl(query, keep_blank_values=True)), route.path
    )
    if not isinstance(parsed, CanonicalQuery):
        raise ValueError(f"invalid bench target {target!r}: {parsed.field_errors}")
    return cache_key(parsed)


@dataclass(frozen=True, slots=True)
class ListQuestion:
    """One events list a page asks for; empty tuples and None mean "not asked"."""

    page_size: int  # 100 is TeamUp's default
    status: tuple[str, ...]  # a set
    sort: tuple[str, ...]  # ordered
    week: int | None  # starts_at_gte .. starts_at_lte over one week
    venues: tuple[int, ...]  # a set
    fields: tuple[str, ...]  # a set
    expand: tuple[str, ...]  # a set


def _iso(moment: datetime, offset_hours: int) -> str:
    local = moment + timedelta(hours=offset_hours)
    text = local.strftime("%Y-%m-%dT%H:%M:%S")
    if offset_hours == 0:
        return text + "Z"
    return f"{text}{'+' if offset_hours > 0 else '-'}{abs(offset_hours):02d}:00"


def _set(name: str, items: Sequence[str], app: int, *, ordered: bool = False) -> Pairs:
    """One array parameter as app `app` writes it (sets reordered by some apps)."""
    if not items:
        return []
    values = list(items)
    if not ordered and app in (2, 3):
        values.reverse()
    if not ordered and app == 4:
        values = values[1:] + values[:1]
    if app in (1, 3):
        return [(name, value) for value in values]  # repeated
    if app == 4:
        rest = [(name, ",".join(values[1:]))] if len(values) > 1 else []
        return [(name, values[0]), *rest]  # first repeated, the rest comma
    return [(name, ",".join(values))]


def _query(groups: dict[str, Pairs], app: int, rng: random.Random) -> str:
    names = sorted(groups, reverse=app == 2)
    if app == 3:
        rng.shuffle(names)
    pairs = [pair for name in names for pair in groups[name]]
    return "&".join(f"{quote(n, safe='[]')}={quote(v, safe=':,')}" for n, v in pairs)


def spell_list(q: ListQuestion, app: int, seed: int) -> str:
    """The first page of `q` as app `app` asks for it (always the same for one app)."""
    groups: dict[str, Pairs] = {}
    if q.page_size != 100 or app in (1, 3):
        groups["page_size"] = [("page_size", str(q.page_size))]
    if app in (1, 2):
        groups["page"] = [("page", "1")]
    if app in (1, 3):
        groups["format"] = [("format", "json")]
    if q.week is not None:
        start = _WEEK0 + timedelta(weeks=q.week)
        offset = (0, 1, 0, -5, 2)[app]
        groups["starts_at_gte"] = [("starts_at_gte", _iso(start, offset))]
        groups["starts_at_lte"] = [("starts_at_lte", _iso(start + timedelta(days=7), offset))]
    for name, items in (
        ("status", q.status),
        ("venues", tuple(str(v) for v in q.venues)),
        ("fields", q.fields),
        ("expand", q.expand),
    ):
        groups[name] = _set(name, items, app)
    groups["sort"] = _set("sort", q.sort, app, ordered=True)
    query = _query({k: v for k, v in groups.items() if v}, app, random.Random(f"{seed}:{app}:{q}"))
    path = EVENTS.replace("/v2/", "/v2//", 1) if app == 4 else EVENTS
    return f"{path}?{query}" if query else path


def spell_retrieve(path: str, fields: tuple[str, ...], app: int, seed: int) -> str:
    """A retrieve (`/api/v2/events/135001`) as app `app` asks for it."""
    groups: dict[str, Pairs] = {"fields": _set("fields", fields, app)}
    if app in (1, 3):
        groups["format"] = [("format", "json")]
    rng = random.Random(f"{seed}:{app}:{path}")
    query = _query({k: v for k, v in groups.items() if v}, app, rng)
    if app == 4:
        path = path.replace("/v2/", "/v2//", 1)
    return f"{path}?{query}" if query else path


def _list_question(rng: random.Random) -> ListQuestion:
    fields: tuple[str, ...] = ()
    if rng.random() < 0.6:
        fields = tuple(rng.sample(_EVENT_FIELDS, rng.randint(4, 7)))
    return ListQuestion(
        page_size=rng.choice((20, 25, 50, 100, 100)),
        status=("active",) if rng.random() < 0.7 else (),
        sort=(rng.choice(("start", "start", "-start")),) if rng.random() < 0.7 else (),
        week=rng.randrange(0, 8) if rng.random() < 0.5 else None,
        venues=tuple(rng.sample(range(265001, 265013), rng.randint(1, 3)))
        if rng.random() < 0.3
        else (),
        fields=fields,
        expand=tuple(rng.sample(("venue", "category"), rng.randint(1, 2)))
        if rng.random() < 0.3
        else (),
    )


@dataclass(frozen=True, slots=True)
class Visit:
    """One visitor: a first request, then how many `next` links it follows."""

    target: str
    follow: int


@dataclass(frozen=True, slots=True)
class SiteReplay:
    """The visits of one run, in order."""

    visits: tuple[Visit, ...]
    list_questions: int
    first_targets: int  # requests before any `next` is followed


def _zipf(rng: random.Random, n: int, k: int, s: float = 1.1) -> list[int]:
    weights = [1 / rank**s for rank in range(1, n + 1)]
    return rng.choices(range(n), weights=weights, k=k)


def build_site(visits: int, seed: int, list_questions: int = 60) -> SiteReplay:
    """`visits` visits: 55 % walk an events list from page 1 (following `next` 0-3 times), 30 %
    read one event, 15 % one customer; lists, events and customers each drawn Zipf-like (s=1.1),
    apps uniformly."""
    rng = random.Random(f"{seed}:site")
    questions: list[ListQuestion] = []
    seen: set[str] = set()
    while len(questions) < list_questions:
        q = _list_question(rng)
        keys = {site_key(spell_list(q, app, seed)) for app in range(APPS)}
        if len(keys) != 1:
            raise AssertionError(f"spellings of one list question disagree: {q}")
        if not keys & seen:
            seen |= keys
            questions.append(q)
    event_order = list(EVENT_IDS)
    rng.shuffle(event_order)  # the popular events are not the first ids
    customer_order = list(CUSTOMER_IDS)
    rng.shuffle(customer_order)
    kinds = rng.choices(("list", "event", "customer"), weights=(55, 30, 15), k=visits)
    lists = iter(_zipf(rng, len(questions), visits))
    events = iter(_zipf(rng, len(event_order), visits))
    customers = iter(_zipf(rng, len(customer_order), visits))
    out: list[Visit] = []
    pool: tuple[str, ...]
    for kind in kinds:
        app = rng.randrange(APPS)
        if kind == "list":
            target = spell_list(questions[next(lists)], app, seed)
            out.append(Visit(target, rng.choice((0, 0, 1, 1, 2, 3))))
            continue
        if kind == "event":
            path, pool = f"{EVENTS}/{event_order[next(events)]}", _EVENT_FIELDS
        else:
            path, pool = f"/api/v2/customers/{customer_order[next(customers)]}", _CUSTOMER_FIELDS
        # A page asks for the same fields every time: drawn from the id, not per visit.
        pick = random.Random(f"{seed}:{path}")
        fields = tuple(pick.sample(pool, 4)) if pick.random() < 0.5 else ()
        keys = {site_key(spell_retrieve(path, fields, other, seed)) for other in range(APPS)}
        if len(keys) != 1:
            raise AssertionError(f"spellings of one retrieve disagree: {path} {fields}")
        target = spell_retrieve(path, fields, app, seed)
        out.append(Visit(target, 0))
    return SiteReplay(tuple(out), len(questions), len(out))
