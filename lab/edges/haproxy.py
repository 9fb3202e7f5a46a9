"""PURE: the plan as haproxy.cfg and one crt-list per listener (HAProxy 2.6).

A frontend per listener. `default`: every certificate in every crt-list (chosen by SNI, the
first one for an unknown SNI); a v1 listener's frontend has its zone's origin as
default_backend; a shared one picks the backend with a host ACL. `fixed`: `strict-sni` on
the bind, the crt-list limited to the listener's authorized names (SNI filters), and the
host ACLs of those names only, anything else answered 421.
"""
from __future__ import annotations

import re

from lab.edges.plan import CertFiles, ListenerPlan, Plan, certificate_for

BINARY = "haproxy"
INSTALL = "apt-get install haproxy"
VERSION = ("-v",)
BUNDLES = True  # wants certificate and key in one file
MAIN = "haproxy.cfg"
HOST = "req.hdr(host),field(1,:),lower"  # the Host header (HTTP/2: from :authority) without its port


def command() -> list[str]:
    return [BINARY, "-f", MAIN, "-db"]  # -db: in the foreground, as the lab's child


def check() -> list[str]:
    return [BINARY, "-c", "-f", MAIN]  # (-q would silence its errors too)


def env() -> dict[str, str]:
    return {}


def crt_list(lp: ListenerPlan) -> str:
    return f"{lp.name}.crt-list"


def _crt_lines(lp: ListenerPlan, certs) -> list[str]:
    if not lp.strict:
        return [certs[names].bundle for names in lp.certificates]
    lines = []
    for names in lp.certificates:  # SNI filters: the authorized names this certificate is offered for
        served = [n for n in lp.names if certificate_for(lp.certificates, n) == names]
        lines.append(" ".join([certs[names].bundle, *served]))
    return lines


def _acl(name: str, hosts: list[str]) -> list[str]:
    exact = [h for h in hosts if not h.startswith("*.")]
    lines = [f"acl {name} {HOST} -m str {' '.join(exact)}"] if exact else []
    for w in hosts:
        if w.startswith("*."):  # one label, as a certificate's wildcard covers
            lines.append(f"acl {name} {HOST} -m reg ^[^.]+{re.escape(w[1:])}$")
    return lines


def _frontend(lp: ListenerPlan, plan: Plan) -> list[str]:
    bind = f"bind {lp.address} ssl crt-list {crt_list(lp)} alpn h2,http/1.1"
    lines = [f"# listener {lp.name}" + (f": the dedicated v1 address of {lp.zone}" if lp.zone else ": shared, by Host"),
             f"frontend {lp.name}", f"    {bind}" + (" strict-sni" if lp.strict else "")]
    if lp.everything_to is not None:
        return lines + [f"    default_backend {lp.everything_to}"]
    by_origin: dict[str, list[str]] = {}
    for host, origin in lp.routes:
        by_origin.setdefault(origin, []).append(host)
    for origin, hosts in by_origin.items():
        lines += [f"    {line}" for line in _acl(f"host_{origin}", hosts)]
    known = " || ".join(f"host_{o}" for o in by_origin) or "FALSE"
    lines.append(f"    http-request return status {lp.not_routed} content-type text/plain "
                 f"string \"not served here\" unless {known}")
    lines += [f"    use_backend {origin} if host_{origin}" for origin in by_origin]
    return lines


def write(plan: Plan, certs: dict[tuple[str, ...], CertFiles]):
    sections = {lp.name: [*_frontend(lp, plan), *_crt_lines(lp, certs)] for lp in plan.listeners}
    lines = [f"# sni-lab edges: haproxy, flavour {plan.flavour}, from {plan.source}.",
             f"# Run from this directory: {' '.join(command())}",
             "global",
             "    ssl-default-bind-options ssl-min-ver TLSv1.2 no-tls-tickets",
             "defaults",
             "    mode http",
             "    timeout connect 5s",
             "    timeout client 30s",
             "    timeout server 30s",
             "    timeout http-request 10s",
             ""]
    for lp in plan.listeners:
        lines += [*_frontend(lp, plan), ""]
    for origin in plan.origins.values():
        lines += [f"backend {origin.name}", f"    server {origin.name} {origin.address}", ""]
    files = {MAIN: "\n".join(lines)}
    for lp in plan.listeners:
        files[crt_list(lp)] = "\n".join(_crt_lines(lp, certs)) + "\n"
    return files, sections
