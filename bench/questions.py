"""The realistic mix: ~1,000 questions, Zipf-popular, each spelled the way some app would.

A *question* is what a caller wants to know (typed values); a *spelling* is one query string that
asks it. Each simulated app has its own habits (parameter order, array form, datetime offset,
`format` case, defaults written out or left off), so one question reaches the proxies in up to
`len(STYLES)` spellings. Every spelling is checked against `proxy.query` before the run: all
spellings of a question must canonicalise to the same cache key, and different questions to
different keys.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, quote

from multidict import MultiDict

from proxy.backends.keys import cache_key
from proxy.core.contract import CanonicalQuery
from proxy.core.operations import load_operations
from proxy.testing.mock import DEFAULT_COLUMNS, _credits

ENDPOINTS = load_operations().reports()
CREDITS = ENDPOINTS["customer_credits"].contract

__all__ = [
    "STYLES",
    "Other",
    "Question",
    "Replay",
    "build_replay",
    "canonical_key",
    "make_other_questions",
    "make_questions",
]

_COLUMNS = DEFAULT_COLUMNS
_ORDER = (
    "format",
    "limit",
    "offset",
    "columns",
    "sort",
    "customers",
    "created_at_gte",
    "created_at_lte",
)


@dataclass(frozen=True, slots=True)
class Question:
    """One thing a caller wants to know; empty tuples and None mean "not asked"."""

    fmt: str
    limit: int
    offset: int
    columns: tuple[str, ...]
    sort: tuple[str, ...]
    customers: tuple[int, ...]
    gte: datetime | None
    lte: datetime | None


Pairs = list[tuple[str, str]]


def _iso(moment: datetime, offset_hours: int, *, seconds: bool = True) -> str:
    """The instant written in another UTC offset (`Z` for 0)."""
    local = moment + timedelta(hours=offset_hours)
    text = local.strftime("%Y-%m-%dT%H:%M:%S" if seconds else "%Y-%m-%dT%H:%M")
    if offset_hours == 0:
        return text + "Z"
    sign = "+" if offset_hours > 0 else "-"
    return f"{text}{sign}{abs(offset_hours):02d}:00"


def _arrays(name: str, items: Sequence[str], form: str) -> Pairs:
    """One array parameter as `comma`, `repeat`, `brackets` (`name[]=`) or `mixed`."""
    if not items:
        return []
    if form == "comma":
        return [(name, ",".join(items))]
    if form == "repeat":
        return [(name, item) for item in items]
    if form == "brackets":
        return [(f"{name}[]", item) for item in items]
    rest = [(name, ",".join(items[1:]))] if len(items) > 1 else []
    return [(name, items[0]), *rest]


def _params(
    q: Question,
    *,
    form: str,
    fmt: str,
    defaults: bool,
    offset_hours: int,
    seconds: bool = True,
    customers: Sequence[int] | None = None,
    int_width: int = 0,
) -> dict[str, Pairs]:
    """The question's parameters, grouped by name, spelled with the given habits."""
    number: Callable[[int], str] = lambda n: str(n).zfill(int_width)  # noqa: E731
    out: dict[str, Pairs] = {}
    if q.fmt != "csv" or defaults:
        out["format"] = [("format", fmt)]
    if q.limit != 50 or defaults:
        out["limit"] = [("limit", number(q.limit))]
    if q.offset != 0 or defaults:
        out["offset"] = [("offset", str(q.offset))]
    out["columns"] = _arrays("columns", q.columns, form)
    out["sort"] = _arrays("sort", q.sort, form)
    ids = q.customers if customers is None else customers
    out["customers"] = _arrays("customers", [str(c) for c in ids], form)
    if q.gte is not None:
        out["created_at_gte"] = [("created_at_gte", _iso(q.gte, offset_hours, seconds=seconds))]
    if q.lte is not None:
        out["created_at_lte"] = [("created_at_lte", _iso(q.lte, offset_hours, seconds=seconds))]
    return {name: pairs for name, pairs in out.items() if pairs}


def _join(groups: dict[str, Pairs], order: Sequence[str]) -> Pairs:
    return [pair for name in order if name in groups for pair in groups[name]]


def _tidy(q: Question, _rng: random.Random) -> Pairs:
    """Alphabetical, comma arrays, `Z`, lower-case format, defaults left off."""
    groups = _params(q, form="comma", fmt=q.fmt, defaults=False, offset_hours=0)
    return _join(groups, sorted(groups))


def _explicit(q: Question, _rng: random.Random) -> Pairs:
    """Schema order, repeated arrays, `+01:00`, every default written out."""
    groups = _params(q, form="repeat", fmt=q.fmt, defaults=True, offset_hours=1)
    return _join(groups, _ORDER)


def _brackets(q: Question, _rng: random.Random) -> Pairs:
    """Reverse order, `name[]=` arrays, `Z` without seconds, `format=JSON`."""
    groups = _params(
        q, form="brackets", fmt=q.fmt.upper(), defaults=False, offset_hours=0, seconds=False
    )
    return _join(groups, sorted(groups, reverse=True))


def _shuffled(q: Question, rng: random.Random) -> Pairs:
    """Any order, comma arrays with customers reversed and repeated, `-05:00`, `offset=0`."""
    ids = list(reversed(q.customers))
    groups = _params(
        q,
        form="comma",
        fmt=q.fmt,
        defaults=False,
        offset_hours=-5,
        customers=[*ids, *ids[:1]],
    )
    groups.setdefault("offset", [("offset", "0")])
    names = list(groups)
    rng.shuffle(names)
    return _join(groups, names)


def _script(q: Question, _rng: random.Random) -> Pairs:
    """Filters first, first array item repeated and the rest comma, zero-padded limit."""
    groups = _params(q, form="mixed", fmt=q.fmt, defaults=True, offset_hours=0, int_width=3)
    return _join(groups, list(reversed(_ORDER)))


STYLES: tuple[Callable[[Question, random.Random], Pairs], ...] = (
    _tidy,
    _explicit,
    _brackets,
    _shuffled,
    _script,
)


def spell(q: Question, style: int, seed: int) -> str:
    """The query string app number `style` sends for `q` (always the same for one app)."""
    pairs = STYLES[style](q, random.Random(f"{seed}:{style}:{q}"))
    return "&".join(f"{quote(name, safe='[]')}={quote(value, safe=':,')}" for name, value in pairs)


def canonical_key(query_string: str) -> str:
    """The cache key teamup-proxy derives from a customer_credits query string, or from a whole
    target (`/api/v2/reports/<report>/data?…`) of another report (raises if it is invalid)."""
    contract = CREDITS
    if query_string.startswith("/"):
        path, _, query_string = query_string.partition("?")
        contract = ENDPOINTS[path.split("/")[-2]].contract
    parsed = contract.parse(MultiDict(parse_qsl(query_string, keep_blank_values=True)))
    if not isinstance(parsed, CanonicalQuery):
        raise ValueError(f"invalid bench query {query_string!r}: {parsed.field_errors}")
    return cache_key(parsed)


def make_questions(count: int, seed: int, mock_seed: int) -> list[Question]:
    """`count` questions that are pairwise different to the proxy, from a seeded generator."""
    rng = random.Random(seed)
    customer_ids = sorted({credit.customer["id"] for credit in _credits(mock_seed)})
    start = datetime(2023, 1, 1, tzinfo=UTC)
    questions: list[Question] = []
    seen: set[str] = set()
    while len(questions) < count:
        gte = lte = None
        if rng.random() < 0.35:
            gte = start + timedelta(days=rng.randrange(0, 640))
            if rng.random() < 0.7:
                lte = gte + timedelta(days=rng.choice((7, 30, 90)))
        sort: tuple[str, ...] = ()
        if rng.random() < 0.3:
            sort = tuple(rng.choice(("", "-")) + c for c in rng.sample(_COLUMNS, rng.randint(1, 2)))
        q = Question(
            fmt=rng.choice(("csv", "json")),
            limit=rng.choice((10, 25, 50, 50, 100)),
            offset=rng.choice((0, 0, 0, 50, 100, 200)),
            columns=tuple(rng.sample(_COLUMNS, rng.randint(3, 5))) if rng.random() < 0.35 else (),
            sort=sort,
            customers=tuple(sorted(rng.sample(customer_ids, rng.randint(1, 4))))
            if rng.random() < 0.35
            else (),
            gte=gte,
            lte=lte,
        )
        key = canonical_key(spell(q, 0, seed))
        if key not in seen:
            seen.add(key)
            questions.append(q)
    return questions


@dataclass(frozen=True, slots=True)
class Other:
    """A question to another report: scalars and arrays by name, in their plain spelling."""

    report: str
    scalars: tuple[tuple[str, str], ...]
    arrays: tuple[tuple[str, tuple[str, ...]], ...]
    ordered: frozenset[str] = frozenset({"columns", "sort"})


# What the other apps of the mix ask, per report: how often, and the values they draw from.
_OTHER_REPORTS: tuple[tuple[str, float], ...] = (
    ("customers", 0.4),
    ("invoices", 0.3),
    ("customers.grouped", 0.15),
    ("attendances.grouped", 0.15),
)
_BOOL = {
    "true": ("true", "TRUE", "1", "True", "true"),
    "false": ("false", "FALSE", "0", "False", "false"),
}


def _other(rng: random.Random, report: str) -> Other:
    scalars: dict[str, str] = {"format": rng.choice(("csv", "json"))}
    arrays: dict[str, tuple[str, ...]] = {}
    if rng.random() < 0.5:
        scalars["limit"] = str(rng.choice((10, 25, 100)))
    if report == "customers":
        if rng.random() < 0.5:
            scalars["is_active"] = rng.choice(("true", "false"))
        if rng.random() < 0.4:
            arrays["ids"] = tuple(str(n) for n in sorted(rng.sample(range(1, 400), 3)))
        if rng.random() < 0.3:
            arrays["is_any"] = tuple(sorted(rng.sample(("new", "claimed", "lead", "active"), 2)))
    elif report == "invoices":
        if rng.random() < 0.4:
            scalars["credit_applied"] = rng.choice(("true", "false"))
        if rng.random() < 0.4:
            arrays["purchase_types"] = tuple(
                sorted(rng.sample(("class", "course", "membership"), 2))
            )
        if rng.random() < 0.3:
            arrays["sort"] = (rng.choice(("", "-")) + rng.choice(("due_date", "paid_at", "id")),)
    elif report == "customers.grouped":
        arrays["columns"] = (rng.choice(("gender", "is_active", "created_year")), "count")
        if rng.random() < 0.5:
            scalars["is_active"] = rng.choice(("true", "false"))
    else:
        arrays["columns"] = (rng.choice(("day_of_week", "customer_name")), "count")
        if rng.random() < 0.5:
            arrays["attendance_status"] = tuple(
                sorted(rng.sample(("attended", "registered", "no_show"), 2))
            )
    return Other(report, tuple(sorted(scalars.items())), tuple(sorted(arrays.items())))


def make_other_questions(count: int, seed: int) -> list[Other]:
    """`count` pairwise different questions to other reports, weighted as `_OTHER_REPORTS`."""
    rng = random.Random(f"{seed}:other")
    names = [name for name, _ in _OTHER_REPORTS]
    weights = [weight for _, weight in _OTHER_REPORTS]
    found: dict[str, Other] = {}
    while len(found) < count:
        q = _other(rng, rng.choices(names, weights=weights)[0])
        found.setdefault(canonical_key(spell_other(q, 0, seed)), q)
    return list(found.values())


def spell_other(q: Other, style: int, seed: int) -> str:
    """The whole target app number `style` sends for `q`: its own order, array form, boolean and
    `format` case, and whether it writes the default `limit=50` out."""
    rng = random.Random(f"{seed}:{style}:{q}")
    form = ("comma", "repeat", "brackets", "comma", "mixed")[style]
    groups: dict[str, Pairs] = {}
    for name, value in q.scalars:
        text = _BOOL[value][style] if value in _BOOL else value
        if name == "format" and style == 2:
            text = text.upper()
        if name == "limit" and style == 4:
            text = text.zfill(3)
        groups[name] = [(name, text)]
    if style in (1, 4) and "limit" not in groups:
        groups["limit"] = [("limit", "50")]
    for name, items in q.arrays:
        spelled = list(items)
        if name not in q.ordered and style == 3:
            spelled = [*reversed(spelled), spelled[0]]  # a set: any order, repeats
        groups[name] = _arrays(name, spelled, form)
    names = sorted(groups, reverse=style == 2)
    if style == 3:
        rng.shuffle(names)
    pairs = _join(groups, names)
    query = "&".join(f"{quote(n, safe='[]')}={quote(v, safe=':,')}" for n, v in pairs)
    return f"{ENDPOINTS[q.report].path}?{query}"


@dataclass(frozen=True, slots=True)
class Replay:
    """The requests of one mix run, in order, with what each cache can at best achieve."""

    query_strings: tuple[str, ...]
    keys: tuple[str, ...]
    distinct_keys: int
    distinct_spellings: int
    questions: int
    styles: int


def build_replay(
    requests: int, seed: int, mock_seed: int, questions: int = 1000, others: int = 400
) -> Replay:
    """Draw `requests` (question, app) pairs: questions Zipf-like (s=1.1), apps uniformly.

    The questions are `questions` to customer_credits (query strings) and `others` to four other
    reports (whole targets, `/api/v2/reports/<report>/data?…`), interleaved in popularity.
    """
    asked: list[Question | Other] = []
    credits = make_questions(questions, seed, mock_seed)
    rest = make_other_questions(others, seed)
    order = random.Random(f"{seed}:interleave")
    while credits or rest:
        pool = credits if rest == [] or (credits and order.random() < 0.7) else rest
        asked.append(pool.pop(0))
    spellings: dict[tuple[int, int], tuple[str, str]] = {}
    for index, q in enumerate(asked):
        keys = set()
        for style in range(len(STYLES)):
            text = spell(q, style, seed) if isinstance(q, Question) else spell_other(q, style, seed)
            keys.add(canonical_key(text))
            spellings[index, style] = (text, canonical_key(text))
        if len(keys) != 1:
            raise AssertionError(f"spellings of one question disagree: {q}")
    rng = random.Random(seed + 1)
    weights = [1 / rank**1.1 for rank in range(1, len(asked) + 1)]
    drawn = rng.choices(range(len(asked)), weights=weights, k=requests)
    picks = [spellings[index, rng.randrange(len(STYLES))] for index in drawn]
    return Replay(
        query_strings=tuple(text for text, _ in picks),
        keys=tuple(key for _, key in picks),
        distinct_keys=len({key for _, key in picks}),
        distinct_spellings=len({text for text, _ in picks}),
        questions=len(asked),
        styles=len(STYLES),
    )
