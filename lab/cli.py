"""`sni-lab ...`: argument parsing and printing; the work lives in the modules it calls."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lab import __version__
from lab.topology import MODELS, WorldError, load


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
    up.add_argument("--state", metavar="DIR", default=".lab", help="state directory (default: .lab/)")
    _add_common(up)

    dig = sub.add_parser("dig", help="ask the running lab resolver", description="Ask the lab resolver NAME [TYPE].")
    dig.add_argument("name")
    dig.add_argument("type", nargs="?", default="A")
    dig.add_argument("--tcp", action="store_true", help="query over TCP")
    dig.add_argument("--server", metavar="HOST:PORT", help="resolver address (default: the running lab's)")
    dig.add_argument("--state", metavar="DIR", default=".lab")
    _add_common(dig)
    return parser


def _ca(args, log=None):
    from lab.pki import LabCA, PKIError

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
        outside = [n for n in names if not any(n == t or n.endswith("." + t) for t in ca_tlds(ca))]
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
        print(json.dumps(out, indent=2))
        return 0
    for item in out if isinstance(out, list) else [out]:
        for key, value in item.items():
            print(f"{key:>9}: {', '.join(value) if isinstance(value, list) else value}")
        print()
    return 0


def ca_tlds(ca) -> list[str]:
    return sorted(ca._tlds_of(ca.cert))


def cmd_up(args) -> int:
    from lab.run import up

    return up(args)


def cmd_dig(args) -> int:
    from lab.dns import dig_command

    return dig_command(args)


COMMANDS = {"certs": cmd_certs, "up": cmd_up, "dig": cmd_dig}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (UserError, WorldError) as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return getattr(e, "code", 2)
    except KeyboardInterrupt:
        return 130
