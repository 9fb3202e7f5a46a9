"""`sni-lab edges list|config|up`: the real edges, their configs, and one of them serving the world."""
from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

from lab.binding import bind_hint, free_port
from lab.edges import EDGES, render
from lab.edges.process import EdgeError, available, binary, cert_files, options, prepare, running, version
from lab.world import load


class CommandError(Exception):
    """One line for the user, and the exit status."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


def _ca(args, world):
    from lab.pki import LabCA, PKIError

    try:
        return LabCA.open(args.certs, tuple(world.tlds), log=lambda m: print(m, file=sys.stderr))
    except PKIError as e:
        raise CommandError(str(e)) from None


def list_command(args) -> int:
    rows = [{"edge": name, "installed": available(name) is None, "reason": available(name),
             "binary": binary(name), "version": version(name)} for name in EDGES]
    if args.json:
        print(json.dumps(rows, indent=2, allow_nan=False))
        return 0
    for r in rows:
        print(f"{r['edge']:<10} " + (f"{r['version'] or 'installed'}  ({r['binary']})" if r["installed"]
                                     else f"not available: {r['reason']}"))
    return 0


def config_command(args) -> int:
    world = load(args.config)
    ca = _ca(args, world)
    if args.out is None:
        # Bundles are only named here (bundles/ beside the config); --out writes them.
        rendered = render(args.edge, world, args.flavour, cert_files(ca, world), **options(args.edge))
        sys.stdout.write(rendered.files[rendered.main])
        return 0
    out = Path(args.out)
    try:
        rendered = prepare(args.edge, world, args.flavour, ca, out)
    except OSError as e:
        raise CommandError(f"edges config: cannot write to {out}: {e.strerror or e}") from None
    sys.stdout.write(rendered.files[rendered.main])
    env = " ".join(f"{k}={v}" for k, v in rendered.env.items())
    bundles = " and the bundles (0600)" if EDGES[args.edge].BUNDLES else ""
    print(f"sni-lab: wrote {', '.join(rendered.files)}{bundles} to {out}; run it there: "
          f"cd {out} && {env + ' ' if env else ''}{' '.join(_shell(a) for a in rendered.command)}", file=sys.stderr)
    return 0


def _shell(arg: str) -> str:
    return f"'{arg}'" if any(c in arg for c in " ;$*") else arg


def up_command(args) -> int:
    reason = available(args.edge)
    if reason:
        raise CommandError(reason)
    world = load(args.config)
    if args.free_ports:  # the lab binds port 0; the edge, which the lab does not bind for, gets free ones
        world = world.with_free_ports()
        world = world.with_ports({l.name: free_port(l.host) for l in world.listeners})
    from lab.run import run_loop

    return run_loop(_serve(world, args))


async def _serve(world, args) -> int:
    from lab.run import Lab, write_endpoints
    from lab.state import StateError

    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    started = time.perf_counter()
    try:
        lab = Lab(world, args.certs, log=lambda m: print(m, file=sys.stderr), state_dir=args.state, run_edge=False)
    except (StateError, ValueError) as e:
        raise CommandError(str(e)) from None
    state = Path(args.state)
    try:
        endpoints = await lab.start()  # (stops what it started when it fails)
    except OSError as e:
        raise CommandError(bind_hint(e)) from None
    except RuntimeError as e:
        raise CommandError(str(e)) from None
    try:
        with tempfile.TemporaryDirectory(prefix=f"sni-lab-{args.edge}-") as workdir:
            async with running(args.edge, lab.world, args.flavour, lab.ca, workdir) as edge:
                endpoints = {**endpoints, "engine": args.edge, "flavour": args.flavour}
                write_endpoints(state, endpoints)
                ready_ms = round((time.perf_counter() - started) * 1000, 1)
                if args.json:
                    print(json.dumps({"ready_ms": ready_ms, **endpoints, "pid": edge.pid,
                                      "config": str(edge.directory / edge.rendered.main)}, allow_nan=False), flush=True)
                else:
                    _announce(endpoints, edge, ready_ms, state)
                await stop.wait()
                (state / "endpoints.json").unlink(missing_ok=True)
    except EdgeError as e:
        raise CommandError(str(e)) from None
    finally:
        await lab.stop()
    print(f"sni-lab: {args.edge} and the lab stopped", file=sys.stderr)
    return 0


def _announce(endpoints: dict, edge, ready_ms: float, state: Path) -> None:
    r = edge.rendered
    print(f"sni-lab ready in {ready_ms:.0f} ms: {edge.edge} ({r.flavour} flavour, pid {edge.pid}), "
          f"the lab's origins, resolver and control plane")
    for l in endpoints["edge"]:
        print(f"  edge     {l['name']:<10} https://{l['host']}:{l['port']}"
              + (f"  (v1 address of {l['zone']})" if l["zone"] else ""))
    for name, url in endpoints["origins"].items():
        print(f"  origin   {name:<10} {url}")
    print(f"  dns      {endpoints['dns']['host']}:{endpoints['dns']['port']} (udp+tcp)")
    print(f"  control  {endpoints['control']['url']}  token {endpoints['control']['token']}")
    print(f"  config   {edge.directory / r.main}  (removed at stop; `sni-lab edges config` prints it)")
    print(f"  ca       {endpoints['ca']}")
    print("  the edge serves the world as the file says; the control plane's changes (model, hostnames, "
          "zones) do not reach a static config")
    print(f"  endpoints written to {state / 'endpoints.json'}; Ctrl-C to stop", flush=True)


def command(args) -> int:
    """Dispatch `edges ACTION`; CommandError is one line and its exit status for the caller to print."""
    if args.edges_command is None:
        raise CommandError("edges: choose an action: list, config, up, matrix (see sni-lab edges --help)", 2)
    from lab.edgematrix import command as matrix_command
    from lab.scenarios import ScenarioError

    try:
        return {"list": list_command, "config": config_command, "up": up_command,
                "matrix": matrix_command}[args.edges_command](args)
    except EdgeError as e:
        raise CommandError(str(e)) from None
    except ScenarioError as e:
        raise CommandError(str(e), 2) from None
