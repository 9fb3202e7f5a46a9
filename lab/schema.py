"""The control plane's requests, one table per endpoint: what `Control` checks and what
`openapi` publishes, from the same rows.

A field is a name, a type, whether it is required, and its bounds. Anything outside the
table (a missing field, a wrong type, `null`, a list where a number belongs, an unknown
key, a non-finite number) is a `SchemaError` naming the field: a 400, never a 500, and
never half a change. Semantics that need the world (is this an address of the lab? a
known zone?) stay with the code that owns them; the table only guarantees their types.
"""
from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any

from lab.topology import MODELS, VALIDATION_MODES

RECORD_TYPES = ("A", "AAAA", "CNAME", "TXT")
NAME_MAX = 253           # a DNS name in text form
VALUE_MAX = 4000         # one record value (the resolver splits a TXT value into 255-byte strings)
VALUES_MAX = 64          # values in one RRset
TTL_MAX = 2 ** 31 - 1    # RFC 2181 section 8
EXPIRES_MAX = 366 * 86400.0


class SchemaError(ValueError):
    """One line naming the field and what was wrong."""


@dataclass(frozen=True)
class Field:
    name: str
    type: str                      # "string", "strings" (one or a list), "integer", "number", "ip", "boolean"
    required: bool = False
    minimum: float | None = None   # numbers: inclusive; strings: shortest length; strings: fewest items
    maximum: float | None = None   # numbers: inclusive; strings: longest length
    exclusive_minimum: bool = False
    enum: tuple[str, ...] | None = None
    max_items: int = VALUES_MAX
    default: Any = None
    doc: str = ""


def _text(f: Field, v: Any, what: str) -> str:
    if not isinstance(v, str):
        raise SchemaError(f"{what}: expected a string, got {_kind(v)}")
    if f.minimum is not None and len(v) < f.minimum:
        raise SchemaError(f"{what}: must not be empty" if f.minimum == 1 else f"{what}: shorter than {f.minimum:g}")
    if f.maximum is not None and len(v) > f.maximum:
        raise SchemaError(f"{what}: longer than {f.maximum:g} characters")
    if "\x00" in v:
        raise SchemaError(f"{what}: contains a NUL character")
    if f.enum is not None:
        v = v.upper() if all(e.isupper() for e in f.enum) else v
        if v not in f.enum:
            raise SchemaError(f"{what}: {show(v)} is not one of {', '.join(f.enum)}")
    return v


def check_field(f: Field, v: Any) -> Any:
    what = f"field {f.name!r}"
    if f.type in ("string", "ip"):
        v = _text(f, v, what)
        if f.type == "ip":
            try:
                v = str(ipaddress.ip_address(v))
            except ValueError:
                raise SchemaError(f"{what}: not an IP address: {show(v)}") from None
        return v
    if f.type == "strings":
        items = v if isinstance(v, list) else [v]
        if isinstance(v, list) and not f.minimum <= len(items) <= f.max_items:
            raise SchemaError(f"{what}: expected {f.minimum:g} to {f.max_items} values, got {len(items)}")
        item = Field(f.name, "string", minimum=1, maximum=VALUE_MAX)
        return [_text(item, x, f"{what} value" if not isinstance(v, list) else f"{what}[{i}]")
                for i, x in enumerate(items)]
    if f.type == "boolean":
        if not isinstance(v, bool):
            raise SchemaError(f"{what}: expected true or false, got {_kind(v)}")
        return v
    if f.type in ("integer", "number"):
        # bool is an int to Python, never to a user; 5.0 is not an integer either.
        ok = (int,) if f.type == "integer" else (int, float)
        if isinstance(v, bool) or not isinstance(v, ok):
            raise SchemaError(f"{what}: expected {'an integer' if f.type == 'integer' else 'a number'}, got {_kind(v)}")
        if isinstance(v, float) and not math.isfinite(v):
            raise SchemaError(f"{what}: must be a finite number, got {v!r}")
        low = f.minimum
        if low is not None and (v <= low if f.exclusive_minimum else v < low):
            raise SchemaError(f"{what}: must be {'greater than' if f.exclusive_minimum else 'at least'} {low:g}, got {v!r}")
        if f.maximum is not None and v > f.maximum:
            raise SchemaError(f"{what}: must be at most {f.maximum:g}, got {v!r}")
        return v
    raise AssertionError(f"unknown field type {f.type!r}")


def validate(fields: tuple[Field, ...], body: Any) -> dict[str, Any]:
    """The body as the handler may trust it: every declared field checked, defaults filled in."""
    if not isinstance(body, dict):
        raise SchemaError(f"body must be a JSON object, got {_kind(body)}")
    known = {f.name for f in fields}
    unknown = [k for k in body if k not in known]
    if unknown:
        raise SchemaError(f"unknown field(s): {', '.join(show(k) for k in unknown[:5])} "
                          f"(known: {', '.join(sorted(known))})")
    missing = [f.name for f in fields if f.required and f.name not in body]
    if missing:
        raise SchemaError(f"missing field(s): {', '.join(missing)}")
    return {f.name: check_field(f, body[f.name]) if f.name in body else f.default for f in fields}


def validate_items(fields: tuple[Field, ...], body: Any, maximum: int) -> list[dict[str, Any]]:
    """A list of bodies, each checked as `validate` checks one; an error names its item."""
    if not isinstance(body, list) or not 1 <= len(body) <= maximum:
        raise SchemaError(f"body: expected an object or a list of 1 to {maximum} objects, got "
                          f"{f'{len(body)} items' if isinstance(body, list) else _kind(body)}")
    items = []
    for i, item in enumerate(body):
        try:
            items.append(validate(fields, item))
        except SchemaError as e:
            raise SchemaError(f"item {i}: {e}") from None
    return items


def validate_query(fields: tuple[Field, ...], query: Any) -> dict[str, Any]:
    """Query parameters (always text): numbers are parsed first, then checked like a body's."""
    body = {}
    for k, v in query.items():
        f = next((f for f in fields if f.name == k), None)
        if f is not None and f.type in ("integer", "number"):
            try:
                v = int(v) if f.type == "integer" else float(v)
            except ValueError:
                raise SchemaError(f"parameter {k!r}: expected {'an integer' if f.type == 'integer' else 'a number'}, "
                                  f"got {show(v)}") from None
        body[k] = v
    return validate(fields, body)


def json_schema(fields: tuple[Field, ...]) -> dict[str, Any]:
    """The OpenAPI (JSON Schema 2020-12) object for a table."""
    props = {}
    for f in fields:
        if f.type == "strings":
            one = {"type": "string", "minLength": 1, "maxLength": VALUE_MAX}
            s: dict = {"oneOf": [one, {"type": "array", "items": one, "minItems": int(f.minimum or 0),
                                       "maxItems": f.max_items}]}
        elif f.type in ("string", "ip"):
            s = {"type": "string"}
            if f.type == "ip":
                s["format"] = "ip"
            if f.minimum is not None:
                s["minLength"] = int(f.minimum)
            if f.maximum is not None:
                s["maxLength"] = int(f.maximum)
        else:
            s = {"type": f.type}
            if f.minimum is not None:
                s["exclusiveMinimum" if f.exclusive_minimum else "minimum"] = f.minimum
            if f.maximum is not None:
                s["maximum"] = f.maximum
        if f.enum is not None:
            s = {"enum": list(f.enum)}
        if f.default is not None:
            s["default"] = f.default
        if f.doc:
            s["description"] = f.doc
        props[f.name] = s
    out: dict = {"type": "object", "properties": props, "additionalProperties": False}
    required = [f.name for f in fields if f.required]
    if required:
        out["required"] = required
    return out


def _kind(v: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(v), type(v).__name__)


def show(v: Any, limit: int = 40) -> str:
    s = "".join(c if c.isprintable() else "?" for c in str(v))
    return repr(s[:limit] + "..." if len(s) > limit else s)


_NAME = dict(type="string", required=True, minimum=1, maximum=NAME_MAX)

NEW_HOSTNAME = (
    Field("hostname", **_NAME, doc="the custom hostname to register"),
    Field("zone", "string", minimum=1, maximum=NAME_MAX, doc="SaaS zone (default: the first SaaS zone)"),
)
HOSTNAMES_BATCH_MAX = 100  # registrations in one POST /hostnames: one write, one short turn of the event loop
HOSTNAMES_PAGE = 100        # GET /hostnames: a page by default...
HOSTNAMES_PAGE_MAX = 1000   # ...and at most
LIST_HOSTNAMES = (
    Field("limit", "integer", minimum=1, maximum=HOSTNAMES_PAGE_MAX, default=HOSTNAMES_PAGE,
          doc="at most this many, in the order they were registered"),
    Field("cursor", "string", minimum=1, maximum=32, doc="the page after the one whose `next` this is (opaque)"),
    Field("status", "string", minimum=1, maximum=64, doc="only these statuses, comma-separated (e.g. pending,moved)"),
    Field("zone", "string", minimum=1, maximum=NAME_MAX, doc="only this SaaS zone's"),
    Field("prefix", "string", minimum=1, maximum=NAME_MAX, doc="only names starting with this"),
)
RECORD = (
    Field("name", **_NAME),
    Field("type", "string", required=True, enum=RECORD_TYPES),
    Field("value", "strings", required=True, minimum=1, doc="one value, or a list: the whole RRset"),
    Field("ttl", "integer", minimum=0, maximum=TTL_MAX, doc="seconds (default: the world's ttl)"),
)
NEW_OVERRIDE = (
    Field("name", **_NAME),
    Field("type", "string", enum=RECORD_TYPES, default="A"),
    Field("value", "strings", required=True, minimum=0, doc="the forced answer; [] answers with no data"),
    Field("client", "ip", doc="only this source address sees it"),
    Field("expires_in", "number", minimum=0, exclusive_minimum=True, maximum=EXPIRES_MAX,
          doc="remove it after this many seconds"),
    Field("ttl", "integer", minimum=0, maximum=TTL_MAX, default=5),
)
MODEL = (Field("model", "string", required=True, enum=MODELS),)
VALIDATION = (Field("mode", "string", required=True, enum=VALIDATION_MODES,
                    doc="multi: several vantage points that must agree, DNS proof only for a name on the edge; "
                        "single: one lookup from the control plane's address (what a targeted poisoning fools)"),)
NEW_ZONE = (
    Field("name", **_NAME, doc="the zone's domain"),
    Field("origin", "string", required=True, minimum=1, maximum=64, doc="a world origin, by name"),
    Field("saas", "boolean", default=False, doc="a SaaS zone: it may have custom hostnames and a v1 address"),
    Field("v1_listener", "string", minimum=1, maximum=64,
          doc="its dedicated v1 address, a listener of the world (refused under v1-waf: v1-closed)"),
    Field("hosts", "strings", minimum=1, max_items=VALUES_MAX, doc="the names the edge serves (default: the zone's name)"),
    Field("cname_target", "string", minimum=1, maximum=NAME_MAX, doc="where custom hostnames point (SaaS zones)"),
)
DELETE_RECORD = (Field("name", **_NAME), Field("type", "string", enum=RECORD_TYPES))
EVENTS_MAX = 10000
EVENTS = (
    Field("since", "integer", minimum=0, maximum=2 ** 63 - 1, default=0, doc="events after this id"),
    Field("limit", "integer", minimum=1, maximum=EVENTS_MAX, default=1000, doc="at most this many, the oldest first"),
    Field("newest", "integer", minimum=1, maximum=EVENTS_MAX,
          doc="instead of limit: the newest N (after since) that match, oldest first"),
    Field("trace", "string", maximum=128, doc="one client request's story"),
    Field("kind", "string", maximum=64, doc="kinds starting with this, e.g. dns or route"),
    Field("internal", "integer", minimum=0, maximum=1, default=0,
          doc="1: also the lab's own traffic (the live page's and the demo's requests), hidden by default"),
)
DELETE_HOSTNAME = (
    Field("purge", "integer", minimum=0, maximum=1, default=0,
          doc="1: remove it entirely (undoing a scenario's setup); "
              "by default a deleted hostname stays listed as deleted"),
)
