"""PURE: the plan as Caddy's native JSON config (Caddy 2.6, `caddy run --config caddy.json`).

JSON rather than a Caddyfile: every setting is stated, nothing is inferred (no automatic
HTTPS, no ACME, no admin endpoint). One server per listener. `default`: every certificate
loaded and chosen by SNI; a v1 listener's one route proxies everything to its zone's origin;
a shared one routes with host matchers, else 404. `fixed`: a TLS connection policy matching
only the listener's authorized names (any other SNI fails the handshake) with its own
certificates (by tag), `strict_sni_host` (Host must be the SNI, else 421), and host matchers
of the authorized names only, else 421.
"""
from __future__ import annotations

import json

from lab.edges.plan import CertFiles, ListenerPlan, Plan

BINARY = "caddy"
INSTALL = "apt-get install caddy"
VERSION = ("version",)
BUNDLES = False  # wants certificate and key in one file
MAIN = "caddy.json"


def command() -> list[str]:
    return [BINARY, "run", "--config", MAIN]


def check() -> list[str]:
    return [BINARY, "validate", "--config", MAIN]


def env() -> dict[str, str]:
    # Caddy keeps its instance id and any state under these: the files' directory, not $HOME.
    return {"XDG_DATA_HOME": "caddy-data", "XDG_CONFIG_HOME": "caddy-config"}


def _proxy(plan: Plan, origin: str) -> dict:
    # reverse_proxy keeps the client's Host header (the origin picks its tenant by it) and caches nothing.
    return {"handler": "reverse_proxy", "upstreams": [{"dial": plan.origins[origin].address}]}


def _refuse(status: int) -> dict:
    return {"handle": [{"handler": "static_response", "status_code": status, "body": "not served here\n"}]}


def server(lp: ListenerPlan, plan: Plan) -> dict:
    s: dict = {"listen": [lp.address], "protocols": ["h1", "h2"], "automatic_https": {"disable": True}}
    if lp.strict:
        s["tls_connection_policies"] = [{"match": {"sni": list(lp.names)},
                                         "certificate_selection": {"any_tag": [lp.name]}}]
        s["strict_sni_host"] = True
    else:
        s["tls_connection_policies"] = [{}]  # TLS on, every loaded certificate by SNI
    if lp.everything_to is not None:
        s["routes"] = [{"handle": [_proxy(plan, lp.everything_to)]}]
        return s
    by_origin: dict[str, list[str]] = {}
    for host, origin in lp.routes:
        by_origin.setdefault(origin, []).append(host)
    s["routes"] = [{"match": [{"host": hosts}], "handle": [_proxy(plan, origin)], "terminal": True}
                   for origin, hosts in by_origin.items()] + [_refuse(lp.not_routed)]
    return s


def write(plan: Plan, certs: dict[tuple[str, ...], CertFiles]):
    servers = {lp.name: server(lp, plan) for lp in plan.listeners}
    tags: dict[tuple[str, ...], list[str]] = {names: [] for names in plan.certificates}
    for lp in plan.listeners:
        for names in lp.certificates:
            tags[names].append(lp.name)
    load = [{"certificate": certs[names].cert, "key": certs[names].key, "tags": listeners}
            for names, listeners in tags.items() if listeners]
    config = {  # JSON has no comments, and `caddy run` refuses unknown keys (`caddy validate` does not)
        "admin": {"disabled": True, "config": {"persist": False}},
        "storage": {"module": "file_system", "root": "caddy-data"},
        "apps": {"tls": {"certificates": {"load_files": load}},
                 "http": {"servers": servers}},
    }
    sections = {name: json.dumps({name: s}, indent=2).splitlines() for name, s in servers.items()}
    return {MAIN: json.dumps(config, indent=2) + "\n"}, sections
