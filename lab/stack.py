"""`sni-lab compose --role ROLE`: one service of the compose stack (docker-compose.yml).

- init: the lab CA and the world's leaves into the certs volume, the CA certificate into
  the trust volume (for the client's system store), the control plane's token into the
  secret volume (0600). Each made once: a second `up` keeps them.
- control: the control plane and the live page (`lab.follow.Hub`), state in its volume.
- resolver, edge: a server of their own, following the control plane (`lab.follow`).
- origin NAME: one origin of the world, on its own address.

Every role runs the world of the file on the bridge (`lab.compose.bridge_world`); the
followers tell their events to the control plane with the token.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import sys
from pathlib import Path

from lab import compose as c
from lab.binding import bind_hint
from lab.events import Events
from lab.follow import DnsFollower, Follower, Hub, HubControl, Pusher, edge_follower
from lab.run import _stop_on_signals, run_loop
from lab.topology import World
from lab.world import load


def serve(args) -> int:
    world = c.bridge_world(load(args.config))
    if args.role == "init":
        return init(world)
    if args.name and args.role != "origin":
        print(f"sni-lab: error: compose --role {args.role} takes no ORIGIN", file=sys.stderr)
        return 2
    if args.role == "origin" and args.name not in world.origin_by_name:
        print(f"sni-lab: error: compose --role origin needs an origin of the world ({', '.join(world.origin_by_name)})",
              file=sys.stderr)
        return 2
    try:
        token = Path(c.TOKEN).read_text().strip()
    except OSError as e:
        print(f"sni-lab: error: {c.TOKEN}: {e.strerror}; the init service makes it", file=sys.stderr)
        return 1
    role = {"control": _control, "resolver": _resolver, "edge": _edge, "origin": _origin}[args.role]
    return run_loop(_main(role, world, token, args))


def init(world: World) -> int:
    from lab.edge.certstore import CertStore
    from lab.origins import collector
    from lab.pki import LabCA

    ca = LabCA.open(c.CERTS, tuple(world.tlds), log=lambda m: print(m, file=sys.stderr))
    CertStore(ca).load(world)  # the leaves of the world's zones (an active custom hostname's: at its first handshake)
    for o in world.origins:  # and the collectors' (https: a page cannot post to http from https)
        if o.kind == "collector":
            collector.tls_context(ca, o, world)
    trust = Path(c.CA)
    if not trust.exists() or trust.read_bytes() != ca.cert_path.read_bytes():
        shutil.copyfile(ca.cert_path, trust)
        trust.chmod(0o644)
    if not Path(c.TOKEN).exists():
        fd = os.open(c.TOKEN, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")
    print(f"init: CA and leaves in {c.CERTS}, CA certificate in {c.CA}, token in {c.TOKEN}", file=sys.stderr)
    return 0


async def _main(role, world: World, token: str, args) -> int:
    stop = _stop_on_signals()
    try:
        tasks, close = await role(world, token, args)
    except OSError as e:
        print(f"sni-lab: error: {bind_hint(e)}", file=sys.stderr)
        return 1
    stopped = asyncio.ensure_future(stop.wait())
    pending, failed = {stopped, *tasks}, []
    while not stopped.done() and not failed:
        done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopped and t.exception()]
    for t in (stopped, *tasks):
        t.cancel()
    await asyncio.gather(stopped, *tasks, return_exceptions=True)
    await close()
    Path(c.READY).unlink(missing_ok=True)
    for t in failed:
        print(f"sni-lab: error: {args.role}: {t.exception()!r}", file=sys.stderr)
    return 1 if failed else 0


def _control_url(world: World) -> str:
    return f"http://{world.control.host}:{world.control.port}"


async def _ready_after(follower: Follower | None, what: str) -> None:
    if follower is not None:
        await follower.ready.wait()
    Path(c.READY).write_text("ready\n")
    print(f"{what}: ready", file=sys.stderr, flush=True)


async def _control(world: World, token: str, args):
    from lab.state import EventSink, State

    state = State(c.STATE, exclusive=True)
    hub = Hub(world, state, c.CA)
    published = f"http://127.0.0.1:{world.control.port}"  # the file publishes the same port on the host
    control = HubControl(hub, published, token=token)
    control.restore()
    host, port = await control.start(world.control.host, world.control.port)
    limits = world.limits
    sink = EventSink(hub.events, state, keep_rows=limits.event_log_rows, keep_bytes=limits.event_log_bytes)
    await sink.start()
    hub.endpoints = {
        "model": hub.world.model, "engine": hub.engine_name, "ca": c.CA,
        "edge": [{"name": l.name, "host": l.host, "port": l.port, "zone": l.zone} for l in world.listeners],
        "origins": {o.name: o.url for o in world.origins},
        "dns": {"host": world.resolver.host, "port": world.resolver.port},
        "control": {"url": f"http://{host}:{port}", "token": token},
    }
    # For `docker compose exec control sni-lab ...` (the state directory is the working one).
    fd = os.open(Path(c.STATE) / "endpoints.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(hub.endpoints, indent=2) + "\n")
    print(f"control: ready, model {hub.world.model}; live page: {published}/?token={token}", file=sys.stderr, flush=True)

    async def close() -> None:
        await control.stop()
        await sink.close()
        state.close()
    return [], close


async def _resolver(world: World, token: str, args):
    from lab.dns import Resolver

    events = Events(field_limit=world.limits.event_field)
    resolver = Resolver(world, events)
    await resolver.start(world.resolver.host, world.resolver.port)
    dns = DnsFollower(world, resolver)
    follower = Follower(_control_url(world), token, "resolver", dns.apply)
    pusher = Pusher(events, _control_url(world), token, transform=dns.hub_event)
    tasks = [asyncio.ensure_future(follower.run()), asyncio.ensure_future(pusher.run()),
             asyncio.ensure_future(_ready_after(follower, f"resolver {world.resolver.host}:{world.resolver.port}"))]
    return tasks, resolver.stop


async def _edge(world: World, token: str, args):
    from lab.edge.native import NativeEdge
    from lab.pki import LabCA

    events = Events(field_limit=world.limits.event_field)
    edge = NativeEdge(world, events, LabCA.open(c.CERTS, tuple(world.tlds)))
    await edge.start()
    follower = Follower(_control_url(world), token, "edge", edge_follower(world, edge))
    pusher = Pusher(events, _control_url(world), token)
    listeners = ", ".join(f"{l.host}:{l.port}" for l in world.listeners)
    tasks = [asyncio.ensure_future(follower.run()), asyncio.ensure_future(pusher.run()),
             asyncio.ensure_future(_ready_after(follower, f"edge {listeners}"))]
    return tasks, edge.stop


async def _origin(world: World, token: str, args):
    from lab.origins import Origins
    from lab.pki import LabCA

    origin = world.origin_by_name[args.name]
    events = Events(field_limit=world.limits.event_field)
    # The collector serves https with the leaf init issued; the CA verifies the victim's edge on replay.
    ca = LabCA.open(c.CERTS, tuple(world.tlds)) if origin.kind == "collector" else None
    running = Origins(world, events, ca=ca, only=(origin.name,))
    await running.start()
    pusher = Pusher(events, _control_url(world), token)
    tasks = [asyncio.ensure_future(pusher.run()),
             asyncio.ensure_future(_ready_after(None, f"origin {origin.name} {origin.url}"))]
    return tasks, running.stop
