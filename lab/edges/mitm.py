"""PURE: the plan as mitmproxy's plain reverse mode (mitmdump 11): one `reverse:` mode per
listener, the lab's certificates through the `certs` option, and a small addon script.

mitmproxy has no host routing, no per-listener certificates and no SNI or host controls of
its own: a reverse mode sends everything to one origin, and `certs` is one table for every
listener (an SNI it has no certificate for gets one minted by mitmproxy's own CA, which a
client trusting the lab CA rejects). So:
- `default`: a v1 listener is the plain reverse mode to its zone's origin; a shared
  listener needs the addon (mitmproxy's documented way: change the request's target in a
  `request` hook) to route by Host, an unknown host getting 404.
- `fixed`: what mitmproxy offers is that addon, on every listener: a per-address allowlist
  of the authorized names, by SNI and by Host, anything else answered 421 — after the
  handshake, since no option refuses an SNI at the handshake.
"""
from __future__ import annotations

from lab.edges.plan import CertFiles, ListenerPlan, Plan, certificate_for

BINARY = "mitmdump"
INSTALL = "pip install 'sni-lab[mitmproxy]'"
VERSION = ("--version",)
BUNDLES = True  # wants certificate and key in one file
MAIN = "mitmproxy/config.yaml"
ADDON = "mitmproxy/route.py"  # paths in config.yaml are relative to it

ADDON_CODE = '''
def _host(value):
    # Host or :authority without its port, as an operator's script would compare it.
    host, _, port = (value or "").lower().rpartition(":")
    return host if port.isdigit() else (value or "").lower()


def _lookup(table, name):
    if name in table:
        return table[name]
    _, dot, parent = name.partition(".")
    return table.get("*." + parent) if dot else None


def request(flow):
    listener = LISTENERS.get(tuple(flow.client_conn.sockname[:2]))
    if listener is None:
        return  # a plain reverse mode: everything to its one origin
    if listener["sni"] is not None and _lookup(listener["sni"], (flow.client_conn.sni or "").lower()) is None:
        flow.response = http.Response.make(listener["not_routed"], b"not served here\\n",
                                           {"content-type": "text/plain"})
        return
    target = _lookup(listener["routes"], _host(flow.request.host_header))
    if target is None:
        flow.response = http.Response.make(listener["not_routed"], b"not served here\\n",
                                           {"content-type": "text/plain"})
        return
    host = flow.request.host_header
    flow.request.host, flow.request.port = target  # (this rewrites Host and :authority...)
    flow.request.host_header = host  # (...so the client's goes back: the origin picks its tenant by it)
'''


def command() -> list[str]:
    return [BINARY, "--set", "confdir=mitmproxy"]


def check() -> None:
    return None  # mitmdump has no config check: a bad option fails at start, with its message


def env() -> dict[str, str]:
    return {}


def _q(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mode(lp: ListenerPlan, plan: Plan) -> str:
    # A reverse mode needs one target; on a listener the addon routes, it is only the default.
    origin = plan.origins[lp.everything_to or (lp.routes[0][1] if lp.routes else next(iter(plan.origins)))]
    return f"reverse:http://{origin.address}@{lp.address}"


def _entry(lp: ListenerPlan, plan: Plan) -> list[str]:
    """The addon's table for a listener it handles."""
    lines = [f"    ({lp.host!r}, {lp.port}): {{  # {lp.name}", '        "routes": {']
    lines += [f"            {host!r}: ({plan.origins[o].host!r}, {plan.origins[o].port})," for host, o in lp.routes]
    lines.append("        },")
    if lp.strict:
        lines += ['        "sni": {'] + [f"            {name!r}: True," for name in lp.names] + ["        },"]
    else:
        lines.append('        "sni": None,')
    lines += [f'        "not_routed": {lp.not_routed},', "    },"]
    return lines


def write(plan: Plan, certs: dict[tuple[str, ...], CertFiles]):
    handled = [lp for lp in plan.listeners if lp.everything_to is None]
    sections = {lp.name: [f"- {_q(_mode(lp, plan))}", *(_entry(lp, plan) if lp.everything_to is None else [])]
                for lp in plan.listeners}
    config = [f"# sni-lab edges: mitmproxy, flavour {plan.flavour}, from {plan.source}.",
              f"# Run from the directory above this one: {' '.join(command())}",
              "mode:", *(f"  - {_q(_mode(lp, plan))}" for lp in plan.listeners),
              "certs:  # one table for every listener"]
    offered = dict.fromkeys(name for lp in plan.listeners for names in lp.certificates for name in names)
    for name in offered:
        config.append(f"  - {_q(f'{name}={certs[certificate_for(plan.certificates, name)].bundle}')}")
    config += ["keep_host_header: true  # the origin picks its tenant by Host",
               "http2: true", "connection_strategy: lazy",
               f"scripts:\n  - {_q(ADDON.rpartition('/')[2])}", "flow_detail: 0", "termlog_verbosity: warn", ""]
    addon = [f'"""sni-lab edges: mitmproxy, flavour {plan.flavour}: routing by Host on the listeners a plain',
             'reverse mode cannot serve, and (fixed) the per-address allowlist, by SNI and by Host."""',
             "from mitmproxy import http", "",
             "LISTENERS = {", *(line for lp in handled for line in _entry(lp, plan)), "}", ADDON_CODE]
    return {MAIN: "\n".join(config), ADDON: "\n".join(addon)}, sections
