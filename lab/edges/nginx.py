"""PURE: the plan as nginx.conf (nginx 1.22: `listen ... ssl http2`, `ssl_reject_handshake`).

Certificates come from a map on `$ssl_server_name` (`ssl_certificate $var`), so one server
block per listener offers every certificate it should while routing stays by address on a v1
listener. `fixed` adds, per listener, a default server that refuses the handshake for an SNI
none of its server_names match (and answers 421 to a Host none match), and a server whose
server_name lists the listener's authorized names.
"""
from __future__ import annotations

from lab.edges.plan import CertFiles, ListenerPlan, Plan, certificate_for, offered

BINARY = "nginx"
INSTALL = "apt-get install nginx-light"
VERSION = ("-v",)
BUNDLES = False  # wants certificate and key in one file
MAIN = "nginx.conf"
TEMP = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def command() -> list[str]:
    # -p .: pid and temp files in the files' directory; errors on stderr; in the foreground, as the lab's child.
    return [BINARY, "-p", ".", "-c", MAIN, "-e", "stderr", "-g", "daemon off;"]


def check() -> list[str]:
    return [*command(), "-t", "-q"]


def env() -> dict[str, str]:
    return {}


def _var(kind: str, listener: ListenerPlan) -> str:
    return f"$lab_{kind}_{listener.name.replace('-', '_')}"


def _listener(lp: ListenerPlan, plan: Plan, certs) -> list[str]:
    cert, key, route = _var("cert", lp), _var("key", lp), _var("route", lp)
    first = certs[lp.certificates[0]] if lp.certificates else None
    lines = [f"# listener {lp.name}" + (f": the dedicated v1 address of {lp.zone}" if lp.zone else ": shared, by Host")]
    for var, pick in ((cert, lambda f: f.cert), (key, lambda f: f.key)):
        lines.append(f"map $ssl_server_name {var} {{")
        lines.append("    hostnames;")
        if first is not None and not lp.strict:  # strict: an SNI no server_name matches gets no handshake
            lines.append(f"    default {pick(first)};")
        for name in offered(lp):
            lines.append(f"    {name} {pick(certs[certificate_for(lp.certificates, name)])};")
        lines.append("}")
    if lp.everything_to is None:
        lines.append(f"map $host {route} {{")
        lines.append("    hostnames;")
        lines.append('    default "";')
        lines += [f"    {host} {plan.origins[origin].address};" for host, origin in lp.routes]
        lines.append("}")
    listen = f"listen {lp.address} ssl http2"
    if lp.strict:
        lines += ["server {",
                  f"    {listen} default_server;",
                  "    ssl_reject_handshake on;",
                  f"    return {lp.not_routed};",
                  "}"]
    lines += ["server {", f"    {listen};"]
    if lp.strict:
        lines.append(f"    server_name {' '.join(lp.names)};")
    if first is not None:
        lines += [f"    ssl_certificate {cert};", f"    ssl_certificate_key {key};"]
    lines.append("    location / {")
    if lp.everything_to is not None:
        lines.append(f"        proxy_pass http://{plan.origins[lp.everything_to].address};")
    else:
        lines += [f'        if ({route} = "") {{ return {lp.not_routed}; }}',
                  f"        proxy_pass http://{route};"]
    lines += ["    }", "}"]
    return lines


def write(plan: Plan, certs: dict[tuple[str, ...], CertFiles], user: str | None = None):
    sections = {lp.name: _listener(lp, plan, certs) for lp in plan.listeners}
    head = [f"# sni-lab edges: nginx, flavour {plan.flavour}, from {plan.source}.",
            f"# Run from this directory: {' '.join(command()[:-1])} '{command()[-1]}'",
            "worker_processes 1;",
            *([f"user {user};"] if user else []),
            "pid nginx.pid;",
            "error_log stderr notice;",
            "events { worker_connections 1024; }",
            "http {",
            "    access_log access.log;",
            *(f"    {t}_temp_path {t}_temp;" for t in TEMP),
            "    ssl_protocols TLSv1.2 TLSv1.3;",
            "    ssl_session_tickets off;",
            "    proxy_http_version 1.1;",
            "    proxy_set_header Host $host;  # the origin picks its tenant by Host",
            "    proxy_set_header Connection \"\";",
            ""]
    body = [f"    {line}" if line else "" for lp in plan.listeners for line in [*sections[lp.name], ""]]
    text = "\n".join(head + body + ["}", ""])
    return {MAIN: text}, sections
