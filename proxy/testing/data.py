"""Generated report rows for the mock TeamUp: plausible, typed by the document, seed-determined.

Every report's rows come from its columns and their types (proxy/spec/teamup.json): a column
`a.b.c` is field `c` of entity `a.b` (one entity per prefix per row, drawn from a pool shared by
every report, so customer 123 has one name everywhere), other columns are fields of the row
itself. Values follow the type and the name: ids are integers, `*_at` ISO date-times, `*_date`
dates, money-like objects TeamUp's price objects, a string column with a same-named enum filter
takes that filter's values (so the filter finds rows). A grouped report's rows are records
grouped on request: attribute columns group, aggregate ones (`count`, `average_*`, `total_*`,
money) are computed per group.
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import orjson

from .document import Endpoint, Param, endpoints

__all__ = [
    "END",
    "FIRST_NAMES",
    "LAST_NAMES",
    "START",
    "Filter",
    "Row",
    "csv_value",
    "entity_id",
    "filters",
    "group",
    "is_aggregate",
    "label",
    "matcher",
    "money",
    "provider_seed",
    "rows",
    "sort_key",
]


def provider_seed(seed: int, provider: str | None) -> int:
    """The seed of a provider's generated data: `seed` itself without a provider (today's data),
    else one derived from both (stable across processes), so each provider's data differs."""
    if provider is None:
        return seed
    return zlib.crc32(f"{seed}:provider:{provider}".encode())


START = int(datetime(2023, 1, 1, tzinfo=UTC).timestamp())
END = int(datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp())
_N_ROWS = 500  # per report (a grouped report: records, before grouping)

# A few apostrophes, hyphens and non-ASCII letters so CSV quoting and UTF-8 get exercised.
FIRST_NAMES = (
    "Amelia Oliver Isla George Ava Noah Mia Arthur Zoë Leo Freya Oscar Siobhán Harry Ivy "
    "Jack Grace Theo Ella Finn Chloé Rory Maya Jonas Priya Omar Aoife Luca Nia Kai"
).split()
LAST_NAMES = (
    "Smith Jones Taylor Brown Williams Wilson Johnson Davies Patel Wright O'Brien Walker "
    "Thompson Robinson Smith-Jones Evans Hughes Müller Green Khan Lewis Clarke Byrne Hall"
).split()
_THINGS: dict[str, tuple[str, ...]] = {
    "venue": ("Riverside Studio", "Old Mill", "Harbour Loft", "Park Road", "Online"),
    "offering_type": ("Yoga", "Pilates", "HIIT", "Spin", "Barre", "Boxing", "Open Gym", "Kids"),
    "membership": (
        "Monthly Unlimited",
        "10-Class Pack",
        "Drop-in",
        "Annual, paid upfront",
        "Student",
        "Off-peak",
        "Family",
        'Intro "try us" offer',
    ),
    "waiver": ("Liability waiver", "Photo consent", "Health questionnaire"),
    "content": ("Morning flow video", "Nutrition guide", "Breathwork audio", "Stretch plan"),
    "discount_code": ("Welcome 10%", "Summer sale", "Friends & family", "Black Friday"),
    "group": ("Founders", "Corporate", "Students", "Seniors"),
    "course": ("Beginners' course", "Teacher training", "Prenatal series", "Mobility block"),
}
_PERSON_KINDS = (
    "customer",
    "instructor",
    "member",
    "purchaser",
    "recipient",
    "manager",
    "managers",
    "contact",
    "referrer",
)
_POOLS = {"customer": 300, "instructor": 12, "venue": 5, "offering_type": 8, "membership": 8}
_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_MONEY_WORDS = (
    "amount",
    "price",
    "balance",
    "pay",
    "cost",
    "fee",
    "charge",
    "credit",
    "refund",
    "tax",
    "discount",
    "revenue",
    "payment",
    "paid",
    "total",
)
_NULLABLE = ("deleted", "cancelled", "canceled", "refunded", "ended", "archived", "expired")
_VIRTUAL_FIELDS = re.compile(r"^(?P<prefix>.+?)_(?P<field>id|pk|name|email|thumbnail_url)$")


@dataclass(frozen=True, slots=True)
class Row:
    """One row: its id (what `id_gt` compares), its values by column key, and the instants of
    its date and date-time values (POSIX seconds) for range filters."""

    id: int
    values: Mapping[str, Any]
    moments: Mapping[str, float]


def money(cents: int) -> dict[str, Any]:
    """TeamUp's price object for an amount of pence."""
    units, rest = divmod(abs(cents), 100)
    text = f"{'-' if cents < 0 else ''}£{units}" + (f".{rest:02d}" if rest else "")
    return {
        "decimal": cents / 100 if rest else cents // 100,
        "string": text,
        "iso_currency_code": "gbp",
        "currency_symbol": "£",
        "currency_symbol_position": "before",
    }


def label(key: str) -> str:
    """A column's display name: `customer.id` → `Customer ID`."""
    words = key.replace(".", " ").replace("_", " ").split()
    special = {"id": "ID", "pk": "PK", "url": "URL", "sms": "SMS"}
    return " ".join(special.get(word, word.capitalize()) for word in words)


def csv_value(value: Any) -> Any:
    """A value as one CSV cell: a price as its string, an entity as its name."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        if "string" in value:
            return value["string"]
        if "name" in value:
            return value["name"]
        return ", ".join(str(csv_value(v)) for v in value.values() if v not in (None, ""))
    if isinstance(value, list):
        return ", ".join(str(csv_value(item)) for item in value)
    return value


def sort_key(value: Any) -> tuple[bool, Any]:
    """How a value orders: nulls last (first when descending), a price by its amount, an entity
    by its name, a list by its CSV text, digits as a number."""
    if value is None:
        return (True, 0)
    if isinstance(value, dict):
        if "decimal" in value:
            return (False, value["decimal"])
        if "name" in value:
            return (False, str(value["name"]))
        return (False, str(csv_value(value)))
    if isinstance(value, list):
        return (False, str(csv_value(value)))
    if isinstance(value, str):
        # Digits order as numbers (a page may type a count or a year as a string).
        return (
            False,
            (0, int(value), "") if value.isascii() and value.isdigit() else (1, 0, value),
        )
    return (False, value)


def _money_like(field: str) -> bool:
    """An object column named like an amount (`credit_amount`, `instructor_pay`, `billed_price`)."""
    return any(word in field for word in _MONEY_WORDS)


def _money_text(field: str) -> bool:
    """A string column that holds an amount's text (`total_pay`, `credit_given`)."""
    return field.endswith((*_MONEY_WORDS, "given")) and not field.endswith("payment")


def is_aggregate(endpoint: Endpoint, key: str) -> bool:
    """Whether a grouped report's column is computed per group rather than grouped on."""
    if not endpoint.grouped:
        return False
    field = key.rsplit(".", 1)[-1]
    if field == "count" or field.startswith(("average_", "total_", "sum_")):
        return True
    return (
        endpoint.types.get(key) == "object"
        and not _has_children(endpoint, key)
        and (_money_like(field))
    )


def _has_children(endpoint: Endpoint, key: str) -> bool:
    return any(other.startswith(key + ".") for other in endpoint.keys)


def _plural(word: str) -> tuple[str, ...]:
    if word.endswith("y"):
        return (word + "s", word[:-1] + "ies")
    if word.endswith(("s", "x", "ch", "sh")):
        return (word + "es",)
    return (word + "s",)


def _singular(word: str) -> str:
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("sses", "xes", "ches", "shes")):
        return word[:-2]
    return word.removesuffix("s")


# --- layout: which entity each column belongs to ------------------------------------------


@dataclass(frozen=True, slots=True)
class _Leaf:
    key: str
    prefix: str  # "" for the row itself
    kind: str  # the entity's kind: the prefix's last part, or the report's own
    field: str
    type: str
    enum: tuple[str, ...] | None


@dataclass(frozen=True, slots=True)
class _Layout:
    leaves: tuple[_Leaf, ...]
    # Object columns made of other columns (`customer` of `customer.id`, …): key → the leaves.
    objects: tuple[tuple[str, tuple[_Leaf, ...]], ...]
    primary: str | None  # the date-time leaf that grows with the row id
    aggregates: frozenset[str]


def _root_kind(report: str) -> str:
    return _singular(report.removesuffix(".grouped"))


def _enum_for(endpoint: Endpoint, key: str) -> tuple[str, ...] | None:
    """The values of a string enum filter named after the column, if there is one."""
    field = key.rsplit(".", 1)[-1]
    for name in (key.replace(".", "_"), field):
        for candidate in (name, *_plural(name)):
            param = endpoint.params.get(candidate)
            if param is not None and param.kind == "string" and param.enum:
                return param.enum
    return None


@functools.cache
def _layout(report: str) -> _Layout:
    endpoint = endpoints()[report]
    keys = endpoint.keys
    aggregates = frozenset(key for key in keys if is_aggregate(endpoint, key))
    virtual = [match for key in keys if "." not in key and (match := _VIRTUAL_FIELDS.match(key))]
    with_ids = {match["prefix"] for match in virtual if match["field"] in ("id", "pk")}
    leaves: list[_Leaf] = []
    for key in keys:
        if _has_children(endpoint, key) or key in aggregates:
            continue
        prefix, _, field = key.rpartition(".")
        match = _VIRTUAL_FIELDS.match(key) if not prefix else None
        if match is not None and match["prefix"] in with_ids:
            prefix, field = match["prefix"], "id" if match["field"] == "pk" else match["field"]
        kind = prefix.rsplit(".", 1)[-1] if prefix else _root_kind(report)
        enum = _enum_for(endpoint, key)
        leaves.append(_Leaf(key, prefix, kind, field, endpoint.types[key], enum))
    objects = tuple(
        (key, tuple(leaf for leaf in leaves if leaf.key.startswith(key + ".")))
        for key in keys
        if _has_children(endpoint, key) and key not in aggregates
    )
    starts = [low.removesuffix("_gte") for low, _ in endpoint.ranges]
    root_times = [leaf.key for leaf in leaves if not leaf.prefix and leaf.type == "date-time"]
    ranged = [key for key in root_times if key in {endpoint.aliases.get(s, s) for s in starts}]
    primary = next(iter(ranged or root_times), None)
    return _Layout(tuple(leaves), objects, primary, aggregates)


# --- values ---------------------------------------------------------------------------------


def entity_id(kind: str, index: int) -> int:
    """The id of entity `index` of a kind: stable, distinct per kind, growing with the index."""
    return (100 + zlib.crc32(kind.encode()) % 900) * 1000 + index + 1


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)


def _is_person(kind: str) -> bool:
    return kind.endswith(_PERSON_KINDS)


def _stamp(rng: random.Random) -> int:
    return rng.randint(START, END)


def _iso(stamp: float) -> str:
    return datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _day(rng: random.Random, field: str) -> str:
    if "birth" in field:
        return date(rng.randint(1950, 2006), rng.randint(1, 12), rng.randint(1, 28)).isoformat()
    return datetime.fromtimestamp(_stamp(rng), UTC).date().isoformat()


def _thing_name(kind: str, index: int) -> str:
    names = _THINGS.get(kind)
    if names is None:
        return f"{label(kind)} {index + 1}"
    return names[index % len(names)] + ("" if index < len(names) else f" {index // len(names) + 1}")


def _integer(rng: random.Random, field: str) -> int:
    if field.endswith("month"):
        return rng.randint(1, 12)
    if field.endswith("year"):
        return rng.choice((2023, 2024))
    if field.endswith("hour"):
        return rng.randint(6, 21)
    if field == "age":
        return rng.randint(16, 80)
    if "duration" in field or field.endswith("minutes"):
        return rng.choice((30, 45, 60, 75, 90))
    if field.startswith("days") or field.endswith("days"):
        return rng.randint(0, 364)
    if field.startswith("max_"):
        return rng.randint(10, 30)
    return rng.randint(0, 40)


def _text(
    rng: random.Random, leaf: _Leaf, index: int, person: tuple[str, str] | None, ident: int
) -> str:
    field = leaf.field
    if leaf.enum:
        return rng.choice(leaf.enum)
    if field.endswith("_at"):
        return _iso(_stamp(rng))
    if "phone" in field:
        return f"+44 7700 9{rng.randint(0, 99999):05d}"
    if field == "number" or field.endswith("_number"):
        return f"{leaf.kind[:3].upper()}-{rng.randint(1, 99999):06d}"
    if field.endswith("_date") or field == "date":
        return _day(rng, field)
    if field == "id" or field.endswith(("_id", "_pk")):
        return str(ident)
    if field.endswith(("month", "year", "count")):
        return str(_integer(rng, field))
    first, last = person or _person(rng)
    if field == "email" or field.endswith("_email"):
        return f"{first}.{last}{ident}@example.com".lower().replace("'", "")
    if field in ("first_name",):
        return first
    if field in ("last_name",):
        return last
    if field.endswith("_name") and _is_person(field.removesuffix("_name")):
        return f"{first} {last}"
    if field in ("name", "full_name") or field.endswith("_name"):
        return f"{first} {last}" if person is not None else _thing_name(leaf.kind, index)
    if field.endswith("url"):
        return f"https://example.com/{leaf.kind}/{ident}.jpg"
    if field == "gender":
        return rng.choice(("female", "male", "non-binary", "prefer not to say"))
    if "day_of_week" in field:
        return rng.choice(_DAYS)
    if field.endswith("time"):
        return f"{rng.randint(6, 20):02d}:{rng.choice((0, 15, 30, 45)):02d}"
    if "timezone" in field:
        return "Europe/London"
    if field.endswith("code"):
        return f"{rng.choice(('WELCOME', 'FRIEND', 'SUMMER', 'SPRING'))}{rng.randint(5, 50)}"
    if _money_text(field):
        return str(money(rng.randint(1, 400) * 50)["string"])
    if field == "status" or field.endswith("_status"):
        return rng.choice(("active", "pending", "cancelled", "completed"))
    if field == "type" or field.endswith("_type"):
        return rng.choice(("standard", "premium", "trial"))
    if field in ("relationship",):
        return rng.choice(("Parent", "Partner", "Friend", "Sibling"))
    if field in ("role",):
        return rng.choice(("Manager", "Member"))
    if field in ("memo", "description", "note", "notes", "reason") or field.endswith("_reason"):
        return rng.choice(("Booked online", "Changed at the desk", "Moved, see notes", "—"))
    return f"{label(field)} {rng.randint(1, 99)}"


def _object(rng: random.Random, leaf: _Leaf, ident: int) -> dict[str, Any]:
    field = leaf.field
    if _money_like(field):
        return money(rng.randint(0 if "balance" in field else 1, 400) * 50)
    if field == "address":
        return {
            "first_line": f"{rng.randint(1, 180)} {rng.choice(('High', 'Mill', 'Park', 'Church'))}"
            " Street",
            "second_line": rng.choice(("", "Flat 2", "Unit 7")),
            "city": rng.choice(("London", "Bristol", "Leeds", "Cork", "Glasgow")),
            "region": "",
            "country": rng.choice(("GB", "IE")),
            "postal_code": f"AB{rng.randint(1, 20)} {rng.randint(1, 9)}CD",
        }
    if "registration" in field:
        return {
            "id": rng.randint(1000, 99999),
            "starts_at": _iso(_stamp(rng)),
            "name": rng.choice(_THINGS["offering_type"]),
            "type": rng.choice(("event", "course_session")),
        }
    kind = _singular(field)
    index = rng.randrange(_POOLS.get(kind, 40))
    return {"id": entity_id(kind, index), "name": _thing_name(kind, index)}


def _array(rng: random.Random, leaf: _Leaf) -> list[dict[str, Any]]:
    kind = _singular(leaf.field)
    person = _is_person(kind)
    out = []
    for index in sorted(rng.sample(range(_POOLS.get(kind, 40)), rng.randint(0, 3))):
        name = " ".join(_entity_person(kind, index)) if person else _thing_name(kind, index)
        out.append({"id": entity_id(kind, index), "name": name})
    return out


def _value(
    rng: random.Random, leaf: _Leaf, index: int, person: tuple[str, str] | None, ident: int
) -> Any:
    field, kind = leaf.field, leaf.type
    moment = kind in ("date", "date-time") or field.endswith(("_at", "_date"))
    if moment and field.startswith(_NULLABLE) and rng.random() < 0.8:
        return None
    if kind == "integer":
        if field in ("id", "pk"):
            return ident
        if field.endswith(("_id", "_pk")):
            other = field.rsplit("_", 1)[0]
            return entity_id(other, rng.randrange(_POOLS.get(other, 40)))
        return _integer(rng, field)
    if kind == "number":
        return (
            round(rng.uniform(0.5, 40.0) * 4) / 4
            if "hour" in field
            else round(rng.uniform(1.0, 25.0), 2)
        )
    if kind == "boolean":
        return rng.random() < (0.8 if field in ("is_active", "is_claimed") else 0.3)
    if kind == "date":
        return _day(rng, field)
    if kind == "date-time":
        return _iso(_stamp(rng))
    if kind == "object":
        return _object(rng, leaf, ident)
    if kind == "array":
        return _array(rng, leaf)
    return _text(rng, leaf, index, person, ident)


@functools.cache
def _entity_person(kind: str, index: int) -> tuple[str, str]:
    return _person(random.Random(f"person:{kind}:{index}"))


@functools.cache
def _entity_value(seed: int, leaf: _Leaf, index: int) -> Any:
    """Field `leaf.field` of entity `index` of `leaf.kind`: the same in every row and report."""
    rng = random.Random(f"{seed}:{leaf.kind}:{index}:{leaf.field}:{leaf.type}")
    person = _entity_person(leaf.kind, index) if _is_person(leaf.kind) else None
    return _value(rng, leaf, index, person, entity_id(leaf.kind, index))


def _moment(value: Any) -> float | None:
    if not isinstance(value, str) or len(value) < 10 or value[4:5] != "-":
        return None
    try:
        if len(value) == 10:
            return datetime.fromisoformat(value).replace(tzinfo=UTC).timestamp()
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def _contribution(rng: random.Random, endpoint: Endpoint, key: str) -> Any:
    """A record's part of an aggregate column: 1 for a count, a number, or pence."""
    field = key.rsplit(".", 1)[-1]
    if field == "count":
        return 1
    if endpoint.types.get(key) == "object":
        return rng.randint(1, 400) * 50
    if endpoint.types.get(key) == "number" or field.startswith("average_"):
        return round(rng.uniform(1.0, 25.0), 2)
    return rng.randint(0, 40)


@functools.cache
def _generated(seed: int, report: str) -> tuple[Row, ...]:
    endpoint = endpoints()[report]
    layout = _layout(report)
    root = _root_kind(report)
    person_root = _is_person(root)
    table_rng = random.Random(f"{seed}:{report}")
    stamps = sorted(_stamp(table_rng) for _ in range(_N_ROWS))
    out: list[Row] = []
    for index, stamp in enumerate(stamps):
        rng = random.Random(f"{seed}:{report}:{index}")
        ident = entity_id(root, index) if person_root else index + 1
        person = _entity_person(root, index) if person_root else None
        chosen: dict[str, int] = {}
        values: dict[str, Any] = {}
        for leaf in layout.leaves:
            if leaf.key == layout.primary:
                values[leaf.key] = _iso(stamp)
            elif leaf.prefix:
                pool = _POOLS.get(leaf.kind, 40)
                entity = chosen.setdefault(leaf.prefix, rng.randrange(pool))
                values[leaf.key] = _entity_value(seed, leaf, entity)
            else:
                values[leaf.key] = _value(rng, leaf, index, person, ident)
        for key, parts in layout.objects:
            values[key] = _nest(key, parts, values)
        for key in layout.aggregates:
            values[key] = _contribution(rng, endpoint, key)
        moments = {
            key: moment for key, value in values.items() if (moment := _moment(value)) is not None
        }
        out.append(Row(ident, values, moments))
    return tuple(out)


def _nest(key: str, parts: Iterable[_Leaf], values: Mapping[str, Any]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for leaf in parts:
        *path, last = leaf.key[len(key) + 1 :].split(".")
        node = obj
        for part in path:
            node = node.setdefault(part, {})
        node[last] = values[leaf.key]
    return obj


def rows(seed: int, report: str) -> tuple[Row, ...]:
    """A report's rows (a grouped report's records) for a seed, in id order; cached."""
    return _generated(seed, report)


# --- filters and groups ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Filter:
    """A parameter that narrows the rows: its values `in` a column, `eq`, or a bound."""

    param: str
    key: str
    how: str  # in | eq | gte | lte


def _column(endpoint: Endpoint, names: Iterable[str], types: tuple[str, ...]) -> str | None:
    for name in names:
        key = endpoint.aliases.get(name)
        if key is not None and endpoint.types.get(key) in types:
            return key
    return None


def _filter_for(endpoint: Endpoint, param: Param) -> Filter | None:
    name = param.name
    if param.kind == "integer" and param.array:
        thing = _singular(name)
        names = ["id"] if name == "ids" else [f"{thing}.id", f"{thing}_id", f"{thing}_pk"]
        key = _column(endpoint, names, ("integer",))
        return None if key is None else Filter(name, key, "in")
    if param.kind == "string" and param.enum:
        key = _column(endpoint, (name, _singular(name)), ("string",))
        return None if key is None else Filter(name, key, "in" if param.array else "eq")
    if param.kind == "boolean" and not param.array:
        key = _column(endpoint, (name,), ("boolean",))
        return None if key is None else Filter(name, key, "eq")
    return None


@functools.cache
def filters(report: str) -> tuple[Filter, ...]:
    """The parameters of a report that the mock applies (the others are accepted, not applied)."""
    endpoint = endpoints()[report]
    found = [
        found
        for param in endpoint.params.values()
        if param.name not in ("columns", "sort", "format")
        and (found := _filter_for(endpoint, param)) is not None
    ]
    for low, high in endpoint.ranges:
        base = low.removesuffix("_gte")
        key = _column(endpoint, (base, f"{base}_at"), ("date", "date-time", "string"))
        if key is not None:
            found += [Filter(low, key, "gte"), Filter(high, key, "lte")]
    return tuple(found)


def _test(how: str, key: str, wanted: Any) -> Callable[[Row], bool]:
    def test(row: Row) -> bool:
        if how == "in":
            return bool(row.values.get(key) in wanted)
        if how == "eq":
            return bool(row.values.get(key) == wanted)
        moment = row.moments.get(key)
        if moment is None:
            return False
        return bool(moment >= wanted if how == "gte" else moment <= wanted)

    return test


def matcher(report: str, given: Mapping[str, Any]) -> Callable[[Row], bool] | None:
    """A test of a row against the given parameter values; None when none of them filters."""
    tests = [
        _test(rule.how, rule.key, given[rule.param])
        for rule in filters(report)
        if rule.param in given
    ]
    if "id_gt" in given:
        id_gt = given["id_gt"]
        tests.append(lambda row: row.id > id_gt)
    if not tests:
        return None
    return lambda row: all(test(row) for test in tests)


def _aggregate(endpoint: Endpoint, key: str, parts: Sequence[Any]) -> Any:
    field = key.rsplit(".", 1)[-1]
    kind = endpoint.types.get(key)
    if field == "count":
        total: Any = len(parts)
    elif kind == "object":
        return money(sum(parts))
    elif field.startswith("average_"):
        total = sum(parts) / len(parts)
        total = round(total, 2) if kind == "number" else round(total)
    else:
        total = sum(parts)
        total = round(total, 2) if isinstance(total, float) else total
    return str(total) if kind == "string" else total


def group(endpoint: Endpoint, records: Iterable[Row], columns: Sequence[str]) -> list[Row]:
    """Records grouped by the attribute columns asked for, aggregates computed per group; groups
    in the order of their attribute values."""
    aggregates = _layout(endpoint.report).aggregates
    attributes = [key for key in columns if key not in aggregates]
    buckets: dict[bytes, list[Row]] = {}
    for record in records:
        bucket = orjson.dumps([record.values.get(key) for key in attributes])
        buckets.setdefault(bucket, []).append(record)
    out: list[Row] = []
    for members in buckets.values():
        first = members[0]
        values = {key: first.values.get(key) for key in attributes}
        for key in columns:
            if key in aggregates:
                values[key] = _aggregate(endpoint, key, [m.values[key] for m in members])
        moments = {key: first.moments[key] for key in attributes if key in first.moments}
        out.append(Row(first.id, values, moments))
    out.sort(key=lambda row: [sort_key(row.values[key]) for key in attributes])
    return out
