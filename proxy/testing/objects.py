"""Generated objects for every GET of the document that is not a report: plausible, typed by the
operation's `x-fields`, seed-determined, and the same wherever they appear.

An operation's objects belong to a collection: a list's own path, a retrieve's path without its
last parameter (`/api/v2/events/{id}` -> `/api/v2/events`), an other read's own path (one
object). A collection's fields are the union of its operations' `x-fields`, so a retrieve of an
id seen in a list answers the same values. Its ids are `data.entity_id(kind, index)`, the ids the
reports use for the same kind (customer 123 is one customer everywhere), and an integer field
named after a kind (`venue`, `customer`) holds one of that kind's ids. A field of type `uri`
holds an absolute URL of a related collection on the mock's own origin, as TeamUp's do.
"""

from __future__ import annotations

import io
import random
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib import parse
from xml.sax.saxutils import XMLGenerator
from xml.sax.xmlreader import AttributesImpl

from .data import (
    _POOLS,
    _THINGS,
    _entity_person,
    _is_person,
    _Leaf,
    _singular,
    _value,
    entity_id,
)
from .data import sort_key as _sort_key
from .document import Operation, Param

__all__ = ["Catalog", "Link", "page_url", "resolve", "sort_members", "to_xml"]

# Collections larger than the default pool, so lists page (events: 250 at most per page).
_SIZES = {"event": 600, "customer": 300}
_IMAGES = ("image", "logo", "thumbnail", "picture", "photo")
_SESSIONS = frozenset({"event", "course_session", "appointment"})
_SCALARS = frozenset({"integer", "number", "boolean", "date", "date-time", "object", "string"})
_EXAMPLES = ("abc", "a1", "ABC", "1", "abc-1_2", "YWJjZA", "a")
_NO_ATTRIBUTES: AttributesImpl[str] = AttributesImpl({})
_XML_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9._-]*$")


@dataclass(frozen=True, slots=True)
class Link:
    """A root-relative URL on the mock, made absolute on the origin of the request answered."""

    path: str


def _kind(template: str) -> str:
    """The kind of a collection's objects: its last static segment, singular."""
    statics = [part for part in template.strip("/").split("/") if not part.startswith("{")]
    return _singular(statics[-1]) if statics else "object"


def _fill(template: str, values: Sequence[str]) -> str:
    """A template with its parameters replaced, in order."""
    parts = iter(values)
    return re.sub(r"{[^}]+}", lambda _: next(parts), template)


def _owners(operation: Operation) -> list[tuple[str, Param]]:
    """Each path parameter with the template of the collection it picks from (the path before
    its segment: `/api/v2/customers` for the `{id}` of `/api/v2/customers/{id}/account_status`)."""
    found = re.finditer(r"{[^}]+}", operation.path)
    owners = [operation.path[: match.start()].rsplit("/", 1)[0] for match in found]
    return list(zip(owners, operation.path_params, strict=True))


@dataclass(frozen=True, slots=True)
class _Collection:
    key: str  # template, e.g. /api/v2/events or /api/v2/checkouts/{id}/items
    kind: str
    fields: Mapping[str, str]  # union of its operations' x-fields
    enums: Mapping[str, tuple[str, ...]]  # a string field's values, from a filter of that name
    size: int
    member_param: Param | None  # the retrieve's last path parameter, if it has a retrieve
    single: bool  # only `other` reads of one object: a sub-resource or a singleton


def _enums(
    operations: Iterable[Operation], fields: Mapping[str, str]
) -> dict[str, tuple[str, ...]]:
    found: dict[str, tuple[str, ...]] = {}
    for operation in operations:
        for param in operation.params.values():
            if param.kind != "string" or not param.enum or param.sort:
                continue
            for name in (param.name, _singular(param.name)):
                if fields.get(name) == "string":
                    found.setdefault(name, param.enum)
    return found


def _size(key: str, kind: str) -> int:
    crc = zlib.crc32(key.encode())
    if "{" in key:
        return 2 + crc % 10
    return _SIZES.get(kind) or _POOLS.get(kind) or 8 + crc % 90


class Catalog:
    """Every collection of the document's operations, and their objects (cached per seed)."""

    def __init__(self, operations: Sequence[Operation], seed: int) -> None:
        self.seed = seed
        by_key: dict[str, list[Operation]] = {}
        for operation in operations:
            by_key.setdefault(operation.collection, []).append(operation)
        self.collections: dict[str, _Collection] = {}
        for key, ops in by_key.items():
            fields: dict[str, str] = {}
            for operation in ops:
                for name, kind in operation.fields.items():
                    fields.setdefault(name, kind)
            member = next((o.path_params[-1] for o in ops if o.kind == "retrieve"), None)
            single = all(o.kind not in ("list", "retrieve") and not o.array for o in ops)
            kind = _kind(key)
            size = 1 if single else _size(key, kind)
            self.collections[key] = _Collection(
                key, kind, fields, _enums(ops, fields), size, member, single
            )
        self.lists = {o.path: o for o in operations if o.kind == "list"}
        # The top-level collection of each kind: what an integer field named after it points to.
        self.kinds: dict[str, _Collection] = {}
        for collection in self.collections.values():
            if "{" not in collection.key:
                self.kinds.setdefault(collection.kind, collection)
        self._objects: dict[tuple[str, tuple[str, ...], int], dict[str, Any]] = {}
        self._members: dict[tuple[str, tuple[str, ...]], tuple[dict[str, Any], ...]] = {}

    # --- membership ---------------------------------------------------------------------------

    def size_of(self, template: str) -> int:
        """How many objects the collection of a template holds (one not in the document: its
        kind's pool)."""
        collection = self.collections.get(template)
        return collection.size if collection is not None else _size(template, _kind(template))

    def index(self, template: str, param: Param, value: str) -> int | None:
        """The index of the member of a collection a path value names, None when none does."""
        size = self.size_of(template)
        if param.kind == "integer":
            index = int(value) - entity_id(_kind(template), 0)
            return index if 0 <= index < size else None
        if param.enum is not None:
            return param.enum.index(value) if value in param.enum else None
        return zlib.crc32(value.encode()) % size  # any well-formed string names a member

    def exists(self, operation: Operation, values: Sequence[str]) -> bool:
        """Whether every integer path value of a request names a member of its collection."""
        last = len(values) - 1
        for position, (template, param) in enumerate(_owners(operation)):
            named = param.kind == "integer" or (position == last and operation.kind == "retrieve")
            if named and self.index(template, param, values[position]) is None:
                return False
        return True

    def example(self, operation: Operation) -> list[str]:
        """Path values that name existing objects (the first of each collection)."""
        values: list[str] = []
        for template, param in _owners(operation):
            if param.kind == "integer":
                values.append(str(entity_id(_kind(template), 0)))
            elif param.enum:
                values.append(param.enum[0])
            else:
                pattern = param.pattern
                fits = [c for c in _EXAMPLES if pattern is None or pattern.search(c)]
                values.append(fits[0] if fits else "a")
        return values

    def example_path(self, operation: Operation) -> str:
        """The operation's path naming existing objects (`/api/v2/events/135001`)."""
        return _fill(operation.path, self.example(operation))

    # --- objects ------------------------------------------------------------------------------

    def _reference_size(self, kind: str) -> int:
        collection = self.kinds.get(kind)
        return collection.size if collection is not None else _POOLS.get(kind, 40)

    def is_reference(self, field: str) -> bool:
        """Whether an integer field holds the id of another kind's object (`venue`)."""
        return field in self.kinds or field in _POOLS or _is_person(field)

    def _link(
        self, collection: _Collection, parents: Sequence[str], ident: int, field: str
    ) -> Link:
        target = self.lists.get(f"/api/v2/{field}")
        if target is None:
            return Link(f"{_fill(collection.key, parents)}/{ident}/{field}")
        for name in (collection.kind, f"{collection.kind}s"):
            if name in target.params:
                return Link(f"{target.path}?{name}={ident}")
        return Link(target.path)

    def obj(self, key: str, parents: Sequence[str], index: int) -> dict[str, Any]:
        """Member `index` of a collection, every field of the union (cached, never mutate)."""
        cache_key = (key, tuple(parents), index)
        found = self._objects.get(cache_key)
        if found is None:
            found = self._objects[cache_key] = self._generate(key, tuple(parents), index)
        return found

    def _generate(self, key: str, parents: tuple[str, ...], index: int) -> dict[str, Any]:
        collection = self.collections[key]
        kind = collection.kind
        ident = entity_id(kind, index)
        digits = [value for value in parents if value.isdigit()]
        if collection.single and digits:
            ident = int(digits[-1])  # a sub-resource's `id` is the object it hangs off
        person = _entity_person(kind, index) if _is_person(kind) else None
        out: dict[str, Any] = {}
        fields = collection.fields or {"id": "integer", "object": "string"}
        for field, kind_of in fields.items():
            rng = random.Random(f"{self.seed}:{key}:{'/'.join(parents)}:{index}:{field}")
            out[field] = self._field(collection, parents, index, ident, person, field, kind_of, rng)
        for field in out:
            # An end follows its start (an event ends 30-90 minutes after it starts).
            start = field.replace("ends_at", "starts_at")
            if field.endswith("ends_at") and isinstance(out.get(start), str):
                begun = datetime.fromisoformat(out[start].replace("Z", "+00:00"))
                minutes = 30 + 15 * (index % 5)
                out[field] = (begun + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return out

    def _field(
        self,
        collection: _Collection,
        parents: Sequence[str],
        index: int,
        ident: int,
        person: tuple[str, str] | None,
        field: str,
        kind_of: str,
        rng: random.Random,
    ) -> Any:
        if field == "id" and kind_of == "integer":
            return ident
        if field == "object" and kind_of == "string":
            return collection.kind
        if field == "name" and kind_of == "string" and collection.kind in _SESSIONS:
            return _THINGS["offering_type"][index % len(_THINGS["offering_type"])]
        if kind_of == "uri":
            return self._link(collection, parents, ident, field)
        if kind_of == "integer" and field != "id" and self.is_reference(field):
            return entity_id(field, rng.randrange(self._reference_size(field)))
        if kind_of == "integer[]":
            other = _singular(field)
            size = self._reference_size(other)
            return [entity_id(other, i) for i in sorted(rng.sample(range(size), min(size, 2)))]
        if kind_of == "object" and field.endswith(_IMAGES):
            image = entity_id("image", rng.randrange(1000))
            return {
                "id": image,
                "url": f"https://example.com/images/{image}.jpg",
                "original_width": 64,
                "original_height": 64,
            }
        if kind_of == "object" and field.endswith("address"):
            field = "address"  # TeamUp's address object, whatever its name
        if kind_of.endswith("[]"):
            kind_of = "array"
        elif kind_of not in _SCALARS and kind_of != "array":
            kind_of = "string"
        leaf = _Leaf(field, "", collection.kind, field, kind_of, collection.enums.get(field))
        return _value(rng, leaf, index, person, ident)

    def members(self, key: str, parents: Sequence[str]) -> tuple[dict[str, Any], ...]:
        """Every member of a collection, in id order (cached)."""
        cache_key = (key, tuple(parents))
        found = self._members.get(cache_key)
        if found is None:
            size = self.collections[key].size
            found = tuple(self.obj(key, parents, index) for index in range(size))
            self._members[cache_key] = found
        return found

    def warm(self) -> None:
        """Generate every top-level collection now, not during its first request."""
        for key in self.collections:
            if "{" not in key and not self.collections[key].single:
                self.members(key, ())

    def expanded(self, kind: str, ident: Any) -> Any:
        """The object an id of a kind stands for, as `expand` answers it."""
        collection = self.kinds.get(kind)
        if not isinstance(ident, int) or isinstance(ident, bool):
            return ident
        index = ident - entity_id(kind, 0)
        if collection is not None and 0 <= index < collection.size:
            return self.obj(collection.key, (), index)
        leaf = _Leaf("name", "", kind, "name", "string", None)
        person = _entity_person(kind, index) if _is_person(kind) else None
        rng = random.Random(f"{self.seed}:{kind}:{ident}")
        return {"id": ident, "object": kind, "name": _value(rng, leaf, index, person, ident)}

    # --- one answer ---------------------------------------------------------------------------

    def shape(
        self,
        operation: Operation,
        item: Mapping[str, Any],
        expand: Iterable[str],
        fields: Iterable[str] | None,
    ) -> dict[str, Any]:
        """One object as an operation answers it: its own x-fields, `expand`ed, `fields` kept."""
        names = list(operation.fields) or list(item)
        out = {name: item[name] for name in names if name in item}
        for name in {part.split(".", 1)[0] for part in expand}:
            if name not in out:
                continue
            value, declared = out[name], operation.fields.get(name, "")
            if isinstance(value, Link):
                other = _singular(name)
                size = self._reference_size(other)
                rng = random.Random(f"{self.seed}:{value.path}")
                picks = sorted(rng.sample(range(size), min(size, 2)))
                out[name] = [self.expanded(other, entity_id(other, i)) for i in picks]
            elif isinstance(value, list) and declared == "integer[]":
                out[name] = [self.expanded(_singular(name), v) for v in value]
            elif declared == "integer" and self.is_reference(name):
                out[name] = self.expanded(name, value)
        if fields is not None:
            wanted: dict[str, set[str] | None] = {}
            for spec in fields:
                head, _, rest = spec.partition(".")
                if not rest:
                    wanted[head] = None
                elif wanted.get(head, set()) is not None:
                    wanted.setdefault(head, set()).add(rest.split(".", 1)[0])  # type: ignore[union-attr]
            kept: dict[str, Any] = {}
            for name, value in out.items():
                if name not in wanted:
                    continue
                inner = wanted[name]
                if inner is not None and isinstance(value, dict):
                    value = {k: v for k, v in value.items() if k in inner}
                kept[name] = value
            out = kept
        return out


def sort_members(
    members: Sequence[Mapping[str, Any]], fields: Mapping[str, str], sort: Sequence[str]
) -> list[Mapping[str, Any]]:
    """Members ordered by `sort` (`-` descending, `start` finding `starts_at`); stable."""
    ordered = list(members)
    for item in reversed(sort):
        descending = item.startswith("-")
        name = item.removeprefix("-")
        field = next((f for f in (name, f"{name}s_at", f"{name}_at") if f in fields), None)
        if field is not None:
            ordered.sort(key=lambda m: _sort_key(m.get(field)), reverse=descending)
    return ordered


def resolve(value: Any, origin: str) -> Any:
    """An answer with every Link made absolute on an origin (`http://127.0.0.1:8081`)."""
    if isinstance(value, Link):
        return origin + value.path
    if isinstance(value, dict):
        return {k: resolve(v, origin) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, origin) for v in value]
    return value


def page_url(origin: str, raw_path: str, page: int) -> str:
    """The URL of another page of the request, as Django REST framework builds it: the request's
    own URL with `page` replaced (removed for page 1) and the query re-encoded, keys sorted."""
    path, _, query = raw_path.partition("?")
    values = parse.parse_qs(query, keep_blank_values=True)
    if page == 1:
        values.pop("page", None)
    else:
        values["page"] = [str(page)]
    encoded = parse.urlencode(sorted(values.items()), doseq=True)
    return f"{origin}{path}" + (f"?{encoded}" if encoded else "")


def _xml(out: XMLGenerator, value: Any) -> None:
    if isinstance(value, list | tuple):
        for item in value:
            out.startElement("list-item", _NO_ATTRIBUTES)
            _xml(out, item)
            out.endElement("list-item")
    elif isinstance(value, dict):
        for key, item in value.items():
            name = str(key) if _XML_NAME.match(str(key)) else "item"
            out.startElement(
                name, _NO_ATTRIBUTES if name == str(key) else AttributesImpl({"key": str(key)})
            )
            _xml(out, item)
            out.endElement(name)
    elif value is None:
        pass
    elif isinstance(value, bool):
        out.characters("true" if value else "false")
    else:
        out.characters(str(value))


def to_xml(value: Any) -> bytes:
    """An answer as TeamUp renders `format=xml` (Django REST framework's XML renderer): a `root`
    element, a list's items as `list-item`, null as an empty element, text escaped."""
    stream = io.StringIO()
    out = XMLGenerator(stream, encoding="utf-8", short_empty_elements=False)
    out.startDocument()
    out.startElement("root", _NO_ATTRIBUTES)
    _xml(out, value)
    out.endElement("root")
    out.endDocument()
    return stream.getvalue().encode()
