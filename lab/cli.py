"""`sni-lab ...`: argument parsing and printing; the work lives in the modules it calls."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from lab import __version__
from lab.compose import ROLES as COMPOSE_ROLES
from lab.models import FLAVOURS
from lab.remote import RemoteError
from lab.schema import EVENTS_MAX, HOSTNAMES_PAGE, HOSTNAMES_PAGE_MAX
from lab.topology import MODELS, VALIDATION_MODES, WorldError


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code `code`."""

    def __init__(self, msg: str, code: int = 2):
        super().__init__(msg)
        self.code = code


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="world file (default: the packaged lab.toml)")
    p.add_argument("--certs", metavar="DIR", default="certs", help="certificate directory (default: certs/)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sni-lab",
        description="A lab for the CDN flaw where the certificate follows the SNI but the request is routed by something else.",
    )
    parser.add_argument("--version", action="version", version=f"sni-lab {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    certs = sub.add_parser("certs", help="the lab CA and its leaf certificates")
    certs_sub = certs.add_subparsers(dest="certs_command", metavar="ACTION")
    for name, text in (("init", "create the lab CA (name-constrained to the lab TLDs) if missing"),
                       ("show", "list the CA and leaves: subject, SANs, expiry, SHA-256 fingerprint")):
        _add_common(certs_sub.add_parser(name, help=text, description=text))
    issue = certs_sub.add_parser("issue", help="issue a leaf for NAME... (one certificate, all names as SANs)",
                                 description="Issue a leaf for NAME... (one certificate, all names as SANs).")
    issue.add_argument("names", nargs="+", metavar="NAME")
    _add_common(issue)

    up = sub.add_parser("up", help="run the whole world on loopback until Ctrl-C",
                        description="Start the edge, origins, resolver and control plane; print the endpoints and "
                                    "write them to .lab/endpoints.json.")
    up.add_argument("--model", choices=MODELS, help="the SaaS zones' model (default: the world file's)")
    up.add_argument("--engine", default="native", choices=("native", "mitmproxy"))
    up.add_argument("--no-origins", action="store_true",
                    help="do not start the origins: they run elsewhere (`sni-lab origins`) at the world's addresses")
    up.add_argument("--flows", metavar="FILE",
                    help="mitmproxy engine: write every flow to FILE (read it with `mitmdump -nr FILE`)")
    up.add_argument("--state", metavar="DIR", default=".lab", help="state directory (default: .lab/)")
    up.add_argument("--free-ports", action="store_true",
                    help="bind every part to a free port (the world's addresses, any port); see endpoints.json")
    up.add_argument("--allow-remote", action="store_true",
                    help="let the control plane listen on a non-loopback address of the world file "
                         "(reachable from other machines: anyone with the token changes the lab)")
    _add_common(up)

    origins = sub.add_parser("origins", help="run only the world's origins (the rest runs elsewhere)",
                             description="Run only the origins of the world, e.g. in their own process or container.")
    _add_common(origins)

    compose = sub.add_parser("compose", help="print docker-compose.yml for this world; --role: run one of its services",
                             description="Print the Compose file of the world (sni-lab compose > docker-compose.yml); "
                                         "inside the stack's containers, --role runs one service.")
    compose.add_argument("--role", choices=COMPOSE_ROLES,
                         help="run this service of the stack (inside its container)")
    compose.add_argument("name", nargs="?", metavar="ORIGIN", help="with --role origin: which origin")
    compose.add_argument("--config", metavar="PATH", help="world file (default: the packaged lab.toml)")

    dig = sub.add_parser("dig", help="ask the running lab resolver", description="Ask the lab resolver NAME [TYPE].")
    dig.add_argument("name")
    dig.add_argument("type", nargs="?", default="A")
    dig.add_argument("--tcp", action="store_true", help="query over TCP")
    dig.add_argument("--server", metavar="HOST:PORT", help="resolver address (default: the running lab's)")
    dig.add_argument("--state", metavar="DIR", default=".lab")
    _add_common(dig)
    browser = sub.add_parser("browser", help="open Chromium on the lab's network: its proxy, trusting the lab CA",
                             description="Launch Chromium with a throwaway profile that trusts the lab CA (NSS) and "
                                         "uses the running lab's proxy; print the settings for other browsers.")
    browser.add_argument("--profile", metavar="DIR", help="keep the profile in DIR (default: a throwaway one)")
    browser.add_argument("--chromium", metavar="PATH", help="the browser to run (default: /usr/bin/chromium)")
    browser.add_argument("--url", help="the page to open (default: the victim's site on the edge)")
    browser.add_argument("--headless", action="store_true", help="no window (CI, or a demo driven unseen)")
    browser.add_argument("--state", metavar="DIR", default=".lab", help="the running lab's state directory")
    demo = sub.add_parser("demo", help="play the attack's story, narrated, while the live page follows",
                          description="Start the lab (or use the running one), print the live page's address, then "
                                      "play six acts: a normal login, DNS poisoned, the attack landing under v1, "
                                      "v1-waf and v2 blocking it, the attacker's registration staying pending. "
                                      "Drives the browser of `sni-lab browser` when one is open, else a scripted "
                                      "client through the same proxy. Exit 1 if an act did not go as told.")
    demo.add_argument("--step", action="store_true", help="wait for Enter before each act")
    demo.add_argument("--no-play", action="store_true", help="only serve the lab and its live page, until Ctrl-C")
    demo.add_argument("--exit", action="store_true",
                      help="stop right after the play (default: a lab the demo started keeps serving until Ctrl-C)")
    demo.add_argument("--state", metavar="DIR", default=".lab", help="state directory (default: .lab/)")
    demo.add_argument("--config", metavar="PATH", help="world file, when the demo starts the lab")
    demo.add_argument("--certs", metavar="DIR", default="certs", help="certificate directory (default: certs/)")
    _control_parsers(sub)
    _scenario_parsers(sub)
    _edges_parsers(sub)
    from lab.workshop.cli import parsers as workshop_parsers

    workshop_parsers(sub)  # workshop, waf
    return parser


def _edges_parsers(sub) -> None:
    from lab.edges import EDGES, FLAVOURS

    edges = sub.add_parser("edges", help="real edges (nginx, Caddy, HAProxy, mitmproxy) configured from the world",
                           description="Configs for real edges, written from the world in two flavours: default "
                                       "(a typical multi-tenant config) and fixed (the edge's own controls plus a "
                                       "per-address host allowlist).")
    es = edges.add_subparsers(dest="edges_command", metavar="ACTION")
    es.add_parser("list", help="each edge: installed or why not, version, binary").add_argument(
        "--json", action="store_true", help="machine-readable output")
    for name, text in (("config", "print EDGE's main config for the world (--out DIR: write every file there)"),
                       ("up", "the lab without its own edge, and EDGE on the world's listeners, until Ctrl-C")):
        p = es.add_parser(name, help=text, description=text)
        p.add_argument("edge", choices=EDGES, metavar="EDGE", help=f"one of {', '.join(EDGES)}")
        p.add_argument("--flavour", choices=FLAVOURS, default="default", help="default (the default) or fixed")
        p.add_argument("--config", metavar="PATH", help="world file (default: the packaged lab.toml)")
        p.add_argument("--certs", metavar="DIR", default="certs", help="certificate directory (default: certs/)")
    es.choices["config"].add_argument("--out", metavar="DIR", help="write the config, its files and the bundles here")
    up = es.choices["up"]
    up.add_argument("--state", metavar="DIR", default=".lab", help="state directory (default: .lab/)")
    up.add_argument("--free-ports", action="store_true",
                    help="every part on a free port (the world's addresses, any port); see endpoints.json")
    up.add_argument("--json", action="store_true", help="the ready line as JSON")
    text = ("the catalog on every installed edge under each flavour, beside the lab's own v1 and v2; "
            "exit 1 if a case failed (MISROUTED under fixed, or a legitimate request refused)")
    matrix = es.add_parser("matrix", help=text, description=text)
    matrix.add_argument("--edge", metavar="E[,E]", help=f"edges (default: all: {', '.join(EDGES)})")
    matrix.add_argument("--flavour", metavar="F[,F]", help="flavours (default: default,fixed)")
    matrix.add_argument("--tag", action="append", help="only scenarios with this tag (repeatable)")
    matrix.add_argument("--scenarios", metavar="DIR", help="scenario directory (default: the built-in catalog, scenarios/)")
    matrix.add_argument("--config", metavar="PATH", help="world file (default: the packaged lab.toml)")
    matrix.add_argument("--certs", metavar="DIR", help="certificates for this run (default: throwaway)")
    matrix.add_argument("--markdown", metavar="FILE", help="write the report as Markdown")
    matrix.add_argument("--html", metavar="FILE", help="write the report as HTML")
    matrix.add_argument("--json", action="store_true", help="machine-readable output")


def _scenario_parsers(sub) -> None:
    def common(p, several_models: bool = True):
        p.add_argument("--model", metavar="M[,M]" if several_models else "M",
                       help="models to run (default: all)" if several_models else "the model (default: the world's)")
        p.add_argument("--engine", metavar="E[,E]", help="engines: native, mitmproxy (several: compare verdicts)")
        p.add_argument("--scenarios", metavar="DIR", help="scenario directory (default: the built-in catalog, scenarios/)")
        p.add_argument("--fresh", action="store_true", help="start a lab in-process even if one is running")
        p.add_argument("--edge", action="append", metavar="NAME=HOST:PORT",
                       help="run against another edge: where the world's listener NAME is on it (repeatable); "
                            "the lab's resolver, origins and control plane serve it")
        p.add_argument("--flavour", choices=tuple(FLAVOURS),
                       help="with --edge: what its config claims (default: deployed, judged as protected)")
        p.add_argument("--state", metavar="DIR", help="the running lab's state directory (default: .lab/ if a lab "
                                                     "runs there)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--config", metavar="PATH", help="world file (default: the packaged lab.toml)")
        # A lab started for this run gets a throwaway CA: nothing is written where the command runs.
        p.add_argument("--certs", metavar="DIR", help="certificates of a lab started for this run (default: throwaway)")

    run = sub.add_parser("run", help="run scenarios under every model and judge them",
                         description="Run NAME... (files in scenarios/, paths, or directories).")
    run.add_argument("names", nargs="+", metavar="NAME")
    common(run)
    matrix = sub.add_parser("matrix", help="the whole catalog x models, as a table of verdicts")
    matrix.add_argument("--tag", action="append", help="only scenarios with this tag (repeatable)")
    common(matrix)
    for p in (run, matrix):
        p.add_argument("--junit", metavar="FILE", help="also write JUnit XML")
        p.add_argument("--markdown", metavar="FILE", help="also write a Markdown report")
    explain = sub.add_parser("explain", help="one case told step by step: DNS, SNI, certificate, decision, origin, verdict")
    explain.add_argument("name", metavar="NAME")
    common(explain, several_models=False)


def _state_opts(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--state", metavar="DIR", default=".lab", help="the running lab's state directory (default: .lab/)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def _control_parsers(sub) -> None:
    hosts = sub.add_parser("hostnames", help="custom hostnames of SaaS zones (via the control plane)")
    hs = hosts.add_subparsers(dest="action", metavar="ACTION")
    add = _state_opts(hs.add_parser("add", help="register NAME (starts pending)"))
    add.add_argument("name")
    add.add_argument("--zone", help="SaaS zone (default: the first SaaS zone of the world)")
    hlist = _state_opts(hs.add_parser("list", help="list custom hostnames and their status, a page at a time",
                                      description="A page of custom hostnames, in the order they were registered; "
                                                  "the last line says how to see the next page."))
    hlist.add_argument("--status", metavar="S[,S...]", help="only these statuses (pending, active, moved, deleted, blocked)")
    hlist.add_argument("--zone", help="only this SaaS zone's")
    hlist.add_argument("--prefix", metavar="TEXT", help="only names starting with TEXT")
    hlist.add_argument("--limit", "-n", type=_whole(1, HOSTNAMES_PAGE_MAX), metavar="N",
                       help=f"hostnames on a page (default {HOSTNAMES_PAGE})")
    hlist.add_argument("--cursor", metavar="C", help="the page after the one that named C as the next")
    hlist.add_argument("--all", action="store_true", help="every page, one after the other (slow for a big lab)")
    for action, text in (("verify", "verify now: TXT/HTTP ownership and DNS target"), ("rm", "delete (terminal)")):
        _state_opts(hs.add_parser(action, help=text)).add_argument("ref", metavar="NAME|ID")

    dns = sub.add_parser("dns", help="DNS admin: records and poisoning overrides (via the control plane)")
    ds = dns.add_subparsers(dest="action", metavar="ACTION")
    dset = _state_opts(ds.add_parser("set", help="set a record: NAME TYPE VALUE..."))
    dset.add_argument("name")
    dset.add_argument("type", type=str.upper, choices=("A", "AAAA", "CNAME", "TXT"))
    dset.add_argument("value", nargs="+")
    dset.add_argument("--ttl", type=int)
    poison = _state_opts(ds.add_parser("poison", help="force NAME to answer VALUE (an override)"))
    poison.add_argument("name")
    poison.add_argument("value", nargs="+")
    poison.add_argument("--type", default="A", type=str.upper, choices=("A", "AAAA", "CNAME", "TXT"))
    poison.add_argument("--client", metavar="IP", help="only this client address sees it (targeted poisoning)")
    poison.add_argument("--expires", type=_seconds, metavar="SECONDS", help="remove it after SECONDS")
    clear = _state_opts(ds.add_parser("clear", help="remove overrides: one id, every one of a NAME, or all"))
    clear.add_argument("ref", nargs="?", metavar="NAME|ID")
    _state_opts(ds.add_parser("list", help="records and overrides"))

    model = _state_opts(sub.add_parser("model", help="show or switch the running edge's model"))
    model.add_argument("name", nargs="?", choices=MODELS)

    validation = _state_opts(sub.add_parser(
        "validation", help="show or switch how custom hostnames are validated",
        description="multi (the default): from several vantage points that must agree, and DNS proof only for a "
                    "name already on the edge. single: one lookup from the control plane's own address, which a "
                    "targeted DNS poisoning fools (the lesson of validator-poisoned)."))
    validation.add_argument("mode", nargs="?", choices=VALIDATION_MODES)

    zones = sub.add_parser("zones", help="zones on the edge; add or remove zones at run time (via the control plane)")
    zs = zones.add_subparsers(dest="action", metavar="ACTION")
    zadd = _state_opts(zs.add_parser("add", help="put zone NAME on the edge"))
    zadd.add_argument("name")
    zadd.add_argument("--origin", required=True, help="the origin it routes to (a world origin, by name)")
    zadd.add_argument("--saas", action="store_true", help="a SaaS zone (custom hostnames, a v1 address)")
    zadd.add_argument("--v1-listener", metavar="LISTENER", help="its dedicated v1 address (refused under v1-waf)")
    zadd.add_argument("--host", dest="hosts", action="append", metavar="HOST",
                      help="a name the edge serves for it (repeat; default: NAME)")
    zadd.add_argument("--cname-target", metavar="NAME", help="where its custom hostnames point (SaaS zones)")
    _state_opts(zs.add_parser("list", help="every zone: from the world file, and added at run time"))
    _state_opts(zs.add_parser("rm", help="remove a zone added at run time")).add_argument("name")

    events = _state_opts(sub.add_parser("events", help="the lab's events (DNS, TLS, decisions, origins, hostnames)",
                                        description="The newest events, oldest first (the last line is the latest)."))
    events.add_argument("--follow", "-f", action="store_true", help="then keep printing new events")
    events.add_argument("--limit", "-n", type=_whole(1, EVENTS_MAX), metavar="N",
                        help=f"the N newest (default {EVENTS_SHOWN}; with --since: every one after ID)")
    events.add_argument("--since", type=_whole(0, 2 ** 63 - 1), metavar="ID", help="only events after ID")
    events.add_argument("--trace", help="only one client request's story")
    events.add_argument("--kind", help="only events whose kind starts with this, e.g. route or dns")
    events.add_argument("--all", action="store_true",
                        help="also the lab's own traffic (the live page's and the demo's requests)")

    reset = _state_opts(sub.add_parser("reset", help="forget hostnames, DNS changes, model and events (lab stopped)"))
    reset.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")


def _whole(low: int, high: int):
    """An argparse type: a whole number from low to high (else a usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {text!r}")
        return value
    return parse


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (argparse turns the ValueError into a usage error, exit 2)."""
    from lab.schema import EXPIRES_MAX

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= EXPIRES_MAX:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and {EXPIRES_MAX:g}, got {text!r}")
    return value


def _ca(args, log=None):
    from lab.pki import LabCA, PKIError
    from lab.world import load  # here, not at the top: it imports CEL, a fifth of a second a command

    world = load(args.config)
    try:
        return LabCA.open(args.certs, tuple(world.tlds), log=log or (lambda m: print(m, file=sys.stderr)))
    except PKIError as e:
        raise UserError(str(e), 1) from None


def cmd_certs(args) -> int:
    from cryptography import x509

    from lab.hostnorm import HostError, normalize
    from lab.pki import describe

    if args.certs_command is None:
        raise UserError("certs: choose an action: init, issue, show (see sni-lab certs --help)")
    ca = _ca(args)
    if args.certs_command == "init":
        out = {"ca": str(ca.cert_path), **describe(ca.cert)}
    elif args.certs_command == "issue":
        try:
            names = [normalize(n, allow_wildcard=True) for n in args.names]
        except HostError as e:
            raise UserError(f"certs issue: {e}") from None
        outside = [n for n in names if not any(n == t or n.endswith("." + t) for t in ca.tlds)]
        if outside:
            raise UserError(f"certs issue: {', '.join(outside)} outside the lab TLDs; the CA's name "
                            f"constraints would make every client reject it")
        leaf = ca.leaf(names)
        out = {"cert": str(leaf.cert_path), "key": str(leaf.key_path),
               **describe(x509.load_pem_x509_certificate(leaf.cert_path.read_bytes()))}
    else:
        items = [("ca", ca.cert_path)] + [(p.stem, p) for p in ca.leaves()]
        out = []
        for label, path in items:
            try:
                out.append({"file": str(path), **describe(x509.load_pem_x509_certificate(path.read_bytes()))})
            except ValueError:
                out.append({"file": str(path), "error": "unreadable"})
    if args.json:
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    for item in out if isinstance(out, list) else [out]:
        for key, value in item.items():
            print(f"{key:>9}: {', '.join(value) if isinstance(value, list) else value}")
        print()
    return 0


def cmd_up(args) -> int:
    from lab.run import up

    return up(args)


def cmd_origins(args) -> int:
    from lab.run import origins

    return origins(args)


def cmd_compose(args) -> int:
    if args.role is None:
        from lab.compose import render
        from lab.world import load

        if args.name:
            raise UserError("compose: ORIGIN goes with --role origin")
        sys.stdout.write(render(load(args.config), args.config))
        return 0
    from lab.stack import serve

    return serve(args)


def cmd_dig(args) -> int:
    from lab.dns import dig_command

    return dig_command(args)


def _print(args, data, human) -> int:
    if args.json:
        print(json.dumps(data, indent=2, allow_nan=False))
    else:
        human(data)
    return 0


def _hostname_line(h: dict) -> None:
    print(f"{h['name']:<28} {h['status']:<8} {h['zone']:<16} {h['id']}")
    print(f"{'':<28} {h['reason']}")
    if h.get("poisoned_by"):
        print(f"{'':<28} the lab knows (the provider did not): its proof came from poisoned answers ({h['poisoned_by']})")
    if h.get("last_error"):
        retry = time.strftime("%H:%M:%S", time.localtime(h["next_check"])) if h.get("next_check") else "soon"
        print(f"{'':<28} last check failed ({h['failures']} in a row, not evidence; next at {retry}): {h['last_error']}")


def _hostname_page(page: dict, again: str) -> None:
    for h in page["hostnames"]:
        _hostname_line(h)
    if not page["hostnames"]:
        print("none")
    if page["next"] is not None:
        print(f"more: {again} --cursor {page['next']}   (or --all)")


def _every_hostname(api, path: str) -> list[dict]:
    """Page after page, with a progress line on a terminal."""
    found: list[dict] = []
    for page in api.pages(path):
        found += page["hostnames"]
        if sys.stderr.isatty():
            print(f"\r{len(found):,} hostnames...", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    return found


def cmd_hostnames(args) -> int:
    from lab.remote import Api

    if args.action is None:
        raise UserError("hostnames: choose an action: add, list, verify, rm")
    api = Api(args.state)
    if args.action == "add":
        body = {"hostname": args.name, **({"zone": args.zone} if args.zone else {})}
        return _print(args, api.call("POST", "/hostnames", body), _hostname_line)
    from urllib.parse import quote, urlencode

    if args.action == "list":
        import shlex

        filters = {k: getattr(args, k) for k in ("status", "zone", "prefix", "limit") if getattr(args, k)}
        again = shlex.join(["sni-lab", "hostnames", "list", *[f"--{k}={v}" for k, v in filters.items()]])
        query = urlencode({**filters, **({"cursor": args.cursor} if args.cursor else {})})
        path = "/hostnames" + (f"?{query}" if query else "")
        page = {"hostnames": _every_hostname(api, path), "next": None} if args.all else api.call("GET", path)
        return _print(args, page, lambda p: _hostname_page(p, again))
    ref = quote(args.ref, safe="")
    if args.action == "verify":
        return _print(args, api.call("POST", f"/hostnames/{ref}/verify"), _hostname_line)
    return _print(args, api.call("DELETE", f"/hostnames/{ref}"), _hostname_line)


def cmd_dns(args) -> int:
    from urllib.parse import quote

    from lab.remote import Api

    if args.action is None:
        raise UserError("dns: choose an action: set, poison, clear, list")
    api = Api(args.state)
    show_override = lambda o: print(f"{o['id']}: {o['name']} {o['type']} -> {', '.join(o['values']) or '(no data)'}"
                                    + (f" for client {o['client']}" if o["client"] else "")
                                    + (f", expires {time.strftime('%H:%M:%S', time.localtime(o['expires']))}" if o["expires"] else ""))
    if args.action == "set":
        body = {"name": args.name, "type": args.type, "value": args.value, **({"ttl": args.ttl} if args.ttl else {})}
        return _print(args, api.call("POST", "/dns/records", body),
                      lambda r: print(f"{r['name']} {r['ttl']} {r['type']} {', '.join(r['value'])}"))
    if args.action == "poison":
        body = {"name": args.name, "type": args.type, "value": args.value}
        if args.client:
            body["client"] = args.client
        if args.expires is not None:
            body["expires_in"] = args.expires
        return _print(args, api.call("POST", "/dns/overrides", body), show_override)
    if args.action == "clear":
        refs = [args.ref] if args.ref else sorted({o["id"] for o in api.call("GET", "/dns/overrides")})
        removed = sum(api.call("DELETE", f"/dns/overrides/{quote(r, safe='')}")["removed"] for r in refs)
        return _print(args, {"removed": removed}, lambda d: print(f"removed {d['removed']} override(s)"))
    data = {"records": api.call("GET", "/dns/records"), "overrides": api.call("GET", "/dns/overrides")}

    def human(d):
        for r in d["records"]:
            print(f"{r['name']:<40} {r.get('ttl', ''):>5} {r['type']:<5} {', '.join(r['values']) if 'values' in r else r.get('value')}")
        for o in d["overrides"]:
            show_override(o)
    return _print(args, data, human)


def cmd_model(args) -> int:
    from lab.remote import Api

    api = Api(args.state)
    data = api.call("PUT", "/model", {"model": args.name}) if args.name else api.call("GET", "/model")
    return _print(args, data, lambda d: print(d["model"]))


def cmd_validation(args) -> int:
    from lab.remote import Api

    api = Api(args.state)
    data = api.call("PUT", "/validation", {"mode": args.mode}) if args.mode else api.call("GET", "/validation")
    return _print(args, data, lambda d: print(f"{d['mode']}: from {', '.join(d['vantages'])}"
                                              + ("" if d["http_through_edge"] else "; DNS proof only for names on the edge")))


def _zone_line(z: dict) -> None:
    kind = "saas" if z["saas"] else "zone"
    v1 = f" v1 {z['v1_listener']}" + (" (allowlisted)" if z["v1_allowlisted"] else "") if z["v1_listener"] else ""
    print(f"{z['name']:<24} {kind:<5} -> {z['origin']:<10}{v1}{'  [added]' if z['added'] else ''}")
    print(f"{'':<24} hosts: {', '.join(z['hosts'])}" + (f"; custom hostnames CNAME {z['cname_target']}"
                                                       if z["cname_target"] else ""))


def cmd_zones(args) -> int:
    from urllib.parse import quote

    from lab.remote import Api

    if args.action is None:
        raise UserError("zones: choose an action: add, list, rm")
    api = Api(args.state)
    if args.action == "add":
        body = {"name": args.name, "origin": args.origin, "saas": args.saas}
        body.update({k: v for k, v in (("v1_listener", args.v1_listener), ("hosts", args.hosts),
                                       ("cname_target", args.cname_target)) if v})
        return _print(args, api.call("POST", "/zones", body), _zone_line)
    if args.action == "list":
        return _print(args, api.call("GET", "/zones"), lambda zs: [_zone_line(z) for z in zs])
    return _print(args, api.call("DELETE", f"/zones/{quote(args.name, safe='')}"), _zone_line)


EVENTS_SHOWN = 50  # `sni-lab events` without --limit: a screenful or two


def _event_line(e: dict) -> str:
    skip = {"id", "ts", "kind", "trace"}
    fields = " ".join(f"{k}={v}" for k, v in e.items() if k not in skip and v not in (None, "", []))
    return f"{time.strftime('%H:%M:%S', time.localtime(e['ts']))} #{e['id']:<6} {e['kind']:<16} {e.get('trace') or '-':<16} {fields}"


def cmd_events(args) -> int:
    from urllib.parse import urlencode

    from lab.remote import Api

    api = Api(args.state)
    # The newest, so what the user just did is on screen; --since alone: all after ID (to the bound).
    newest = args.limit or (EVENTS_MAX if args.since is not None else EVENTS_SHOWN)
    params = {"newest": newest, "since": args.since, "trace": args.trace, "kind": args.kind, "internal": int(args.all)}
    query = urlencode({k: v for k, v in params.items() if v})
    if not args.follow:
        events = api.call("GET", f"/events?{query}")
        if len(events) == EVENTS_MAX and not args.limit:
            print(f"sni-lab: showing the newest {EVENTS_MAX} after #{args.since}; pass a later --since or "
                  f"--kind/--trace for the rest", file=sys.stderr)
        return _print(args, events, lambda es: [print(_event_line(e)) for e in es])
    try:
        for e in api.stream(f"/events?{query}"):  # the same newest first, then every new one as it comes
            print(json.dumps(e, allow_nan=False) if args.json else _event_line(e), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_reset(args) -> int:
    from lab.state import State, StateError

    if not args.yes:
        if not sys.stdin.isatty():
            raise UserError("reset: this forgets every hostname, DNS change and event; pass --yes to confirm")
        if input(f"forget everything in {args.state}/ (hostnames, DNS changes, model, events)? [y/N] ").lower() not in ("y", "yes"):
            print("nothing changed")
            return 1
    try:
        state = State(args.state, exclusive=True)
    except StateError as e:
        raise UserError(f"reset: {e} (stop the running lab first)", 1) from None
    try:
        state.reset()
    finally:
        state.close()
    Path(args.state, "endpoints.json").unlink(missing_ok=True)
    return _print(args, {"reset": True}, lambda d: print(f"{args.state}/: state cleared; the next `sni-lab up` starts from the world file"))


def cmd_scenarios(args) -> int:
    from lab.matrix import explain_command, run_command
    from lab.scenarios import ScenarioError

    from lab.target import TargetError

    try:
        return explain_command(args) if args.command == "explain" else run_command(args)
    except ScenarioError as e:
        raise UserError(str(e)) from None
    except TargetError as e:
        raise UserError(str(e), e.code) from None


def cmd_workshop(args) -> int:
    from lab.workshop.cli import command, waf_command

    return command(args) if args.command == "workshop" else waf_command(args)


def cmd_edges(args) -> int:
    from lab.edges.commands import CommandError, command

    try:
        return command(args)
    except CommandError as e:
        raise UserError(str(e), e.code) from None


def cmd_demo(args) -> int:
    from lab.demo import demo_command

    return demo_command(args)


def cmd_browser(args) -> int:
    from lab.browser import browser_command

    return browser_command(args)


COMMANDS = {"run": cmd_scenarios, "matrix": cmd_scenarios, "explain": cmd_scenarios, "certs": cmd_certs, "up": cmd_up,
            "origins": cmd_origins, "compose": cmd_compose, "dig": cmd_dig, "hostnames": cmd_hostnames, "dns": cmd_dns,
            "model": cmd_model, "validation": cmd_validation, "zones": cmd_zones, "events": cmd_events,
            "reset": cmd_reset, "browser": cmd_browser, "workshop": cmd_workshop, "waf": cmd_workshop, "demo": cmd_demo,
            "edges": cmd_edges}


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            return _main(argv)
        finally:
            sys.stdout.flush()  # a reader gone shows here, not as a traceback at exit
    except BrokenPipeError:
        # The reader stopped early (`sni-lab events | head -1`): it had what it wanted, so this is
        # not a failure, and a 141 would fail `set -o pipefail` scripts for nothing. As the Python
        # docs advise (signal, "Note on SIGPIPE"), stdout goes to devnull so exit's flush is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (UserError, WorldError, RemoteError) as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except KeyboardInterrupt:
        return 130
