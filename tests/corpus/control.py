"""The control API: bodies with wrong types, odd Authorization bytes, rebinding Host headers, odd paths.

Sent as raw HTTP/1.1 bytes, so a header can carry bytes no HTTP client library would
(0xff in Authorization, two Host headers). `send` is (method, path, headers, body):
headers a list of (name, value) with value str (latin-1) or bytes; the placeholders
TOKEN and HOSTPORT are replaced by the running control plane's token and address;
`auth` True adds the right Authorization header. `body` is a JSON-able object, or bytes
sent as they are. `expect` is ("status", {codes}).

None of these may change state: the test compares every listing before and after.
"""
from __future__ import annotations

import json

from tests.corpus import Case, unique

TOKEN, TOKEN_CUT, HOSTPORT = "\0TOKEN\0", "\0TOKEN-1\0", "\0HOSTPORT\0"  # replaced when sent
AUTH = ("Authorization", f"Bearer {TOKEN}")
REC = {"name": "corpus.victim.example", "type": "A", "value": "127.0.0.10", "ttl": 60}
OVR = {"name": "www.victim.example", "value": "127.0.0.11"}
HN = {"hostname": "corpus.newshop.test", "zone": "saas.example"}


def call(method: str, path: str, body=None, headers=(), auth=True) -> tuple:
    return (method, path, ([AUTH] if auth else []) + list(headers), body)


def bad_types() -> list[Case]:
    """Issue 11: every field checked by one schema; a wrong type is a 400, never a 500 or a half change."""
    why = "issue 11: a wrong type or value is the client's mistake: 400"
    out = []
    for field, values in {
        "ttl": [None, [1], "60", -1, 2 ** 40, 1.5, True, {}],
        "value": [5, None, {"a": 1}, True, "not-an-ip", "127.0.0.256"],
        "name": [5, None, "", "bad name!", "a" * 300, ["x.victim.example"], "www.google.com"],
        "type": [5, None, "MX", "", ["A"]],
    }.items():
        for v in values:
            out.append(Case(f"record-{field}-{json.dumps(v)[:24]}", call("POST", "/dns/records", {**REC, field: v}),
                            ("status", {400}), why))
    for field, values in {
        "expires_in": [[1], "10", -5, 0, {"s": 1}, True],
        "client": [5, "not-an-ip", [], True, "127.0.0.300"],
        "ttl": [None, [1], -1, "5"],
        "value": [5, ["127.0.0.1", 5], {}, True],  # null is valid: NODATA
        "name": [5, None, ""],
        "type": [5, "MX"],
    }.items():
        for v in values:
            out.append(Case(f"override-{field}-{json.dumps(v)[:24]}", call("POST", "/dns/overrides", {**OVR, field: v}),
                            ("status", {400}), why))
    # JSON numbers Python's parser takes but JSON does not have (issue 11: --expires inf).
    for lit in ("Infinity", "-Infinity", "NaN", "1e400"):
        body = f'{{"name": "www.victim.example", "value": "127.0.0.11", "expires_in": {lit}}}'.encode()
        out.append(Case(f"override-expires-{lit}", call("POST", "/dns/overrides", body), ("status", {400}),
                        "issue 11: a non-finite expiry is refused (it would make /dns/overrides invalid JSON)"))
    for v in (5, None, [], {}, "", "bad host!", "a" * 300, "*.*.victim.example", "http://x.newshop.test/"):
        out.append(Case(f"hostname-{json.dumps(v)[:24]}", call("POST", "/hostnames", {**HN, "hostname": v}),
                        ("status", {400}), why))
    for v in (5, [], "nope.example", "victim.example"):
        out.append(Case(f"hostname-zone-{json.dumps(v)[:24]}", call("POST", "/hostnames", {**HN, "zone": v}),
                        ("status", {400}), why))
    for v in (5, None, [], "V2", "", {"m": 1}):
        out.append(Case(f"model-{json.dumps(v)[:24]}", call("PUT", "/model", {"model": v}), ("status", {400}), why))
    return out


def bad_bodies() -> list[Case]:
    why = "a body that is not the JSON object asked for: 400"
    table = {
        "not-json": b"model=v1",
        "json-array": b'["model", "v1"]',
        "json-string": b'"v1"',
        "json-null": b"null",
        "empty": b"",
        "truncated": b'{"model": "v1"',
        "bad-utf8": b'{"model": "\xff\xfe"}',
        "deep-nesting": b'{"model": ' + b"[" * 20000 + b"]" * 20000 + b"}",
        "missing-field": b"{}",
    }
    out = [Case(f"body-{k}", call("PUT", "/model", v), ("status", {400}), why) for k, v in table.items()]
    out.append(Case("body-70k", call("POST", "/dns/records", json.dumps({**REC, "pad": "x" * 70000}).encode()),
                    ("status", {413}), "over the control plane's 64 KiB body bound: 413"))
    return out


def auth() -> list[Case]:
    why = "no mutation without the token: 401"
    body = {"model": "v2"}  # the running model: a success changes nothing
    table = [
        ("none", None, {401}, why),
        ("wrong", "Bearer wrong", {401}, why),
        ("basic", f"Basic {TOKEN}", {401}, why),
        ("scheme-only", "Bearer", {401}, why),
        ("token-plus", f"Bearer {TOKEN}x", {401}, why),
        ("token-prefix", f"Bearer {TOKEN_CUT}", {401}, why),
        ("bytes-ff", b"Bearer \xff\xfe\xfd", {401}, "issue 11: 0xff bytes in Authorization: 401, not 500"),
        ("token-then-ff", f"Bearer {TOKEN}".encode("latin-1") + b"\xff", {401}, "issue 11: 401, not 500"),
        ("only-ff", b"\xff\xff\xff", {401}, "issue 11: 401, not 500"),
        ("long", "Bearer " + "a" * 7000, {401}, why),
        ("nul", b"Bearer \x00", {400, 401}, why),
        ("lowercase-scheme", f"bearer {TOKEN}", {200}, "issue 11: the Bearer scheme is case-insensitive (RFC 7235)"),
        ("uppercase-scheme", f"BEARER {TOKEN}", {200}, "issue 11: the Bearer scheme is case-insensitive (RFC 7235)"),
        ("right", f"Bearer {TOKEN}", {200}, "the right token works"),
    ]
    out = [Case(f"auth-{k}", call("PUT", "/model", body, [("Authorization", v)] if v is not None else [], auth=False),
                ("status", codes), w) for k, v, codes, w in table]
    for method, path, b in (("POST", "/hostnames", HN), ("POST", "/dns/records", REC), ("POST", "/dns/overrides", OVR),
                            ("DELETE", "/hostnames/shop.customer.example", None), ("DELETE", "/dns/records?name=www.victim.example", None),
                            ("POST", "/hostnames/shop.customer.example/verify", None)):
        out.append(Case(f"unauth-{method}-{path}", call(method, path, b, auth=False), ("status", {401}), why))
    return out


def hosts() -> list[Case]:
    """Issue 12: a DNS-rebinding page reaches the control plane under a name of its own: 403."""
    why = "issue 12: only the lab's own names and addresses in Host"
    out = []
    for path in ("/hostnames", "/events", "/dns/overrides", "/health"):
        for host in ("evil.test", "evil.test:8000", "127.0.0.1.nip.io", "attacker.example"):
            out.append(Case(f"rebind-{host}{path}", call("GET", path, headers=[("Host", host)], auth=False),
                            ("status", {403}), why))
    out.append(Case("rebind-own-address", call("GET", "/hostnames", headers=[("Host", HOSTPORT)], auth=False),
                    ("status", {200}), "the control plane's own address is fine"))
    out.append(Case("rebind-mutation-with-token", call("PUT", "/model", {"model": "v2"}, [("Host", "evil.test")]),
                    ("status", {403}), why))
    return out


def paths() -> list[Case]:
    return [
        Case("path-unknown", call("GET", "/nope", auth=False), ("status", {404}), "no such endpoint"),
        Case("path-patch-model", call("PATCH", "/model", {"model": "v2"}), ("status", {405}), "method not allowed"),
        Case("path-trace", call("TRACE", "/", auth=False), ("status", {401, 404, 405}), "no TRACE"),
        Case("path-hostname-nul", call("GET", "/hostnames/%00", auth=False), ("status", {404}), "no such hostname"),
        Case("path-hostname-long", call("GET", "/hostnames/" + "a" * 3000, auth=False), ("status", {404}), "no such hostname"),
        Case("path-delete-missing", call("DELETE", "/hostnames/nope.newshop.test"), ("status", {404}), "no such hostname"),
        Case("path-verify-missing", call("POST", "/hostnames/nope.newshop.test/verify"), ("status", {404}), "no such hostname"),
        Case("path-delete-record-no-name", call("DELETE", "/dns/records"), ("status", {400}), "name is required"),
        Case("path-delete-override-missing", call("DELETE", "/dns/overrides/nope"), ("status", {404}), "no such override"),
        Case("events-since-abc", call("GET", "/events?since=abc", auth=False), ("status", {400}), "since is an integer"),
        Case("events-limit-abc", call("GET", "/events?limit=abc", auth=False), ("status", {400}), "limit is an integer"),
        Case("events-since-1e400", call("GET", "/events?since=1e400", auth=False), ("status", {400}), "since is an integer"),
        Case("events-limit-negative", call("GET", "/events?limit=-1", auth=False), ("status", {200, 400}),
             "a negative limit: none, or refused"),
        Case("events-since-huge", call("GET", "/events?since=" + "9" * 400, auth=False), ("status", {200, 400}),
             "a huge since: nothing newer, or refused"),
        Case("request-line-10k", call("GET", "/hostnames?x=" + "a" * 10000, auth=False), ("status", {400, 414}),
             "an over-long request line is refused"),
    ]


def cases() -> list[Case]:
    return unique(bad_types() + bad_bodies() + auth() + hosts() + paths())
