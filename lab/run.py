"""The whole world in one process: origins, resolver, edge. Used by `sni-lab up` and tests."""
from __future__ import annotations

import asyncio
import gc
import ipaddress
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

from lab.binding import bind_hint, free_port
from lab.events import Events
from lab.pki import LabCA
from lab.topology import World
from lab.world import load

log = logging.getLogger(__name__)

ENGINES = ("native", "mitmproxy")
# `up` stops within 2 s, whatever hangs: the parts share STOP_TIMEOUT, each gets at least
# PART_MIN even when an earlier one used it up, and the event log has SINK_RESERVE of its own.
STOP_TIMEOUT = 1.2
PART_MIN = 0.1
SINK_RESERVE = 0.3
CHECKPOINT_INTERVAL = 0.5  # the state's WAL copied into its database this often, off the loop


class Lab:
    """`async with Lab(world, certs) as lab:` -> everything bound, `lab.endpoints` says where."""

    def __init__(self, world: World, certs_dir: str | Path = "certs", engine: str = "native",
                 events: Events | None = None, log=lambda msg: None, state_dir: str | Path | None = None,
                 model: str | None = None, verify_interval: float | None = None,
                 flows: str | Path | None = None, run_origins: bool = True, allow_remote: bool = False,
                 verify_in_background: bool = True, run_edge: bool = True) -> None:
        """`state_dir` turns on the control plane and durable state; `model` (an explicit
        choice) wins over the saved one and is saved. `allow_remote`: the control plane may
        listen on an address other machines reach (else that is a ValueError). `run_edge=False`:
        the world's listeners are another edge's (nginx, Caddy, ...), which the lab does not
        start; its resolver, origins and control plane serve it as they serve the lab's own."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}")
        if flows and engine != "mitmproxy":
            raise ValueError("--flows needs --engine mitmproxy")
        if not run_origins and any(o.port == 0 for o in world.origins):
            raise ValueError("--no-origins: the origins run elsewhere, so the world must give their ports (not 0)")
        if state_dir is not None and not allow_remote and not ipaddress.ip_address(world.control.host).is_loopback:
            raise RemoteNotAllowed(
                f"the control plane would listen on {world.control.host}, reachable from other machines "
                f"(its token changes the lab; its hostnames hold verification tokens): use a 127.0.0.0/8 "
                f"address, or pass --allow-remote if that is what you want")
        self.run_origins = run_origins
        self.run_edge = run_edge
        if not run_edge and any(l.port == 0 for l in world.listeners):
            raise ValueError("an edge the lab does not start must have its listeners' ports (not 0)")
        self.allow_remote = allow_remote
        self.verify_in_background = verify_in_background
        self._tmp: str | None = None  # Lab.ephemeral's directory, removed on stop
        self.engine_name = engine
        self.flows = flows
        self.state = self.control = self.sink = None
        self._checkpoints: asyncio.Task | None = None
        if state_dir is not None:
            from lab.state import State

            self.state = State(state_dir, exclusive=True)
            saved = self.state.get("model")
            if model:
                self.state.set("model", model)
            world = world.with_model(model or saved or world.model)
        elif model:
            world = world.with_model(model)
        self.world = world
        self.verify_interval = verify_interval
        self.events = events or Events(start_id=self.state.last_event_id() + 1 if self.state else 1,
                                       field_limit=world.limits.event_field)
        self.ca = LabCA.open(certs_dir, tuple(world.tlds), log=log)
        self.origins = self.resolver = self.edge = self.proxy = None
        self.endpoints: dict = {}

    @classmethod
    def ephemeral(cls, world: World, certs_dir: str | Path | None = None, keep_origin_ports: bool = False,
                  **options) -> "Lab":
        """A lab for one run (tests, `matrix`, the pytest plugin): free ports, state in a
        temporary directory removed on stop, no background verifier (verify on demand)."""
        tmp = tempfile.mkdtemp(prefix="sni-lab-")
        free = world.with_free_ports()
        if not options.get("run_edge", True):  # another edge's listeners: where it is, or free ports for it to take
            free = free.with_ports({l.name: l.port or free_port(l.host) for l in world.listeners})
        if keep_origin_ports:  # another edge's config points at the origins where the world file says
            free = free.with_ports({o.name: o.port for o in world.origins})
        try:
            lab = cls(free, certs_dir or Path(tmp) / "certs", state_dir=Path(tmp) / "state",
                      verify_in_background=False, **options)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        lab._tmp = tmp
        return lab

    async def start(self) -> dict:
        from lab.dns import Resolver
        from lab.origins import Origins

        try:
            if self.run_origins:  # else they run in another process (`sni-lab origins`), at the world's addresses
                self.origins = Origins(self.world, self.events, ca=self.ca)
                bound = await self.origins.start()
                self.world = self.world.with_ports({name: port for name, (_, port) in bound.items()})
            self.resolver = Resolver(self.world, self.events)
            dns_host, dns_port = await self.resolver.start()
            self.world = self.world.with_ports({"resolver": dns_port})
            if self.state is not None:
                from lab.control import VERIFY_INTERVAL, Control

                # Saved hostnames, records and overrides are in place before the edge takes a connection.
                self.control = Control(self, self.state, interval=self.verify_interval or VERIFY_INTERVAL,
                                       allow_remote=self.allow_remote)
                self.control.restore()
            if self.run_edge:
                self.edge = self._make_edge()
                edge_bound = await self.edge.start()
                self.world = self.world.with_ports({name: port for name, (_, port) in edge_bound.items()})
                self.edge.set_world(self.world)
            self.resolver.update_world(self.world)
            if self.origins is not None:  # the collector's replay goes through the edge's bound port
                self.origins.set_world(self.world)
            await self._start_proxy()
            if self.control is not None:
                await self._start_control()
        except BaseException:
            await self.stop()
            raise
        self.endpoints = {
            "model": self.world.model,
            "engine": self.engine_name if self.run_edge else "external",
            "ca": str(self.ca.cert_path.resolve()),
            "edge": [{"name": l.name, "host": l.host, "port": l.port, "zone": l.zone} for l in self.world.listeners],
            "origins": {o.name: o.url for o in self.world.origins},
            "dns": {"host": dns_host, "port": dns_port},
            "proxy": {"host": self.world.proxy.host, "port": self.world.proxy.port},
        }
        if self.control is not None:
            self.endpoints["control"] = {"url": self.control.url, "token": self.control.token}
        return self.endpoints

    async def _start_proxy(self) -> None:
        """The browsers' CONNECT proxy, once every lab address it may reach is bound. It asks
        the resolver's pure answer whether a tunnel still goes where DNS now says."""
        from lab.proxy import Proxy, answer_address

        resolver = self.resolver
        self.proxy = Proxy(self.world, self.events,
                           lookup=lambda name, client: answer_address(resolver.zones, name, client, time.time()))
        _, port = await self.proxy.start(self.world.proxy.host, self.world.proxy.port)
        self.world = self.world.with_ports({"proxy": port})
        self.proxy.set_world(self.world)
        resolver.on_change.append(self.proxy.dns_changed)

    async def _start_control(self) -> None:
        from lab.state import EventSink

        _, port = await self.control.start(self.world.control.host, self.world.control.port,
                                           background=self.verify_in_background)
        self.world = self.world.with_ports({"control": port})
        limits = self.world.limits
        self.sink = EventSink(self.events, self.state, keep_rows=limits.event_log_rows, keep_bytes=limits.event_log_bytes)
        await self.sink.start()
        self.state.checkpoint_apart()
        self._checkpoints = asyncio.create_task(self._checkpoint_forever(), name="lab.run.checkpoints")

    async def _checkpoint_forever(self) -> None:
        """The state's checkpoints in a worker thread: a commit on the loop (an add) then only appends."""
        from lab.state import StateError

        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL)
            try:
                await asyncio.to_thread(self.state.checkpoint)
            except StateError as e:  # busy or failing: the next round tries again, the backstop remains
                log.warning("state checkpoint: %s", e)

    def _make_edge(self):
        if self.engine_name == "mitmproxy":
            try:
                from lab.edge.mitm import MitmEdge
            except ImportError:
                raise RuntimeError("the mitmproxy engine needs the extra: pip install 'sni-lab[mitmproxy]'") from None
            return MitmEdge(self.world, self.events, self.ca, flows=self.flows)
        from lab.edge.native import NativeEdge

        return NativeEdge(self.world, self.events, self.ca)

    def set_world(self, world: World) -> None:
        self.world = world
        if self.edge is not None:
            self.edge.set_world(world)
        if self.resolver is not None:
            self.resolver.update_world(world)
        if self.proxy is not None:
            self.proxy.set_world(world)

    def set_model(self, model: str) -> None:
        self.set_world(self.world.with_model(model))
        self.endpoints["model"] = model
        self.events.emit("lab.model", model=model)

    def hostnames_changed(self, names: Iterable[str]) -> None:
        """Nothing to do: the edge reads the world's hostname index by name, the resolver and the
        proxy do not read it at all."""

    async def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every part in turn within `timeout` seconds: one that fails or hangs is logged
        and left behind, never a reason to leave the others running. The event log is
        written last (the parts' last events included), with time of its own, then closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        for name in ("control", "proxy", "edge", "resolver", "origins"):
            part = getattr(self, name)
            setattr(self, name, None)
            if part is not None:
                await _stop_part(name, part.stop(), max(deadline - loop.time(), PART_MIN))
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
            self._checkpoints = None
        if self.sink is not None:
            sink, self.sink = self.sink, None
            await _stop_part("event log", sink.close(), max(deadline - loop.time(), SINK_RESERVE))
        if self.state is not None:
            self.state.close()
            self.state = None
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    async def __aenter__(self) -> "Lab":
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def _stop_part(name: str, stopping, timeout: float) -> None:
    try:
        await asyncio.wait_for(stopping, timeout)
    except TimeoutError:
        log.warning("%s did not stop in time; stopping the rest", name)
    except Exception:  # noqa: BLE001 - a part that fails to stop must not keep the others running
        log.exception("%s failed to stop; stopping the rest", name)


class RemoteNotAllowed(ValueError):
    """The control plane would be reachable from other machines and nobody said so."""


def write_endpoints(state: str | Path, endpoints: dict) -> Path:
    """state/endpoints.json, where every other command finds the running lab; 0600: it carries the token."""
    path = Path(state) / "endpoints.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(endpoints, indent=2, allow_nan=False) + "\n")
    return path


def up(args) -> int:
    world = load(args.config)
    if args.free_ports:
        world = world.with_free_ports()
    return run_loop(_serve(world, args))


def run_loop(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def _stop_on_signals() -> asyncio.Event:
    """Before anything is announced: a SIGTERM right after the ready line must stop cleanly, not kill."""
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    return stop


async def _serve(world: World, args) -> int:
    started = time.perf_counter()
    from lab.state import StateError

    stop = _stop_on_signals()
    # The start makes what lives as long as the lab (100,000 hostnames make some 300,000
    # objects): no collection while it does (each full one walked them all, ~30 ms, twice a
    # start), and none of them walked again afterwards (a full collection during traffic
    # would stall every request for as long).
    gc.disable()
    try:
        lab = Lab(world, args.certs, engine=args.engine, log=lambda m: print(m, file=sys.stderr), state_dir=args.state,
                  model=args.model, flows=args.flows, run_origins=not args.no_origins, allow_remote=args.allow_remote)
    except RemoteNotAllowed as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return 2
    except (StateError, ValueError) as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return 1
    try:
        endpoints = await lab.start()
    except OSError as e:
        print(f"sni-lab: error: {bind_hint(e)}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"sni-lab: error: {e}", file=sys.stderr)
        return 1
    if not ipaddress.ip_address(lab.world.control.host).is_loopback:
        print(f"sni-lab: warning: the control plane listens on {endpoints['control']['url']}, reachable from other "
              f"machines: anyone who learns its token can change this lab", file=sys.stderr, flush=True)
    gc.freeze()
    gc.enable()
    state = Path(args.state)
    write_endpoints(state, endpoints)
    ready_ms = (time.perf_counter() - started) * 1000
    if args.json:
        print(json.dumps({"ready_ms": round(ready_ms, 1), **endpoints}, allow_nan=False), flush=True)
    else:
        print(f"sni-lab ready in {ready_ms:.0f} ms: model {endpoints['model']}, engine {endpoints['engine']}")
        for l in endpoints["edge"]:
            print(f"  edge     {l['name']:<10} https://{l['host']}:{l['port']}" + (f"  (v1 address of {l['zone']})" if l["zone"] else ""))
        for name, url in endpoints["origins"].items():
            print(f"  origin   {name:<10} {url}")
        print(f"  dns      {endpoints['dns']['host']}:{endpoints['dns']['port']} (udp+tcp)")
        print(f"  proxy    {endpoints['proxy']['host']}:{endpoints['proxy']['port']}  (browsers' CONNECT proxy: sni-lab browser)")
        print(f"  control  {endpoints['control']['url']}  token {endpoints['control']['token']}")
        print(f"  page     {endpoints['control']['url']}/?token={endpoints['control']['token']}  (open it in a browser)")
        print(f"  ca       {endpoints['ca']}")
        v1 = next((l for l in endpoints["edge"] if l["zone"]), endpoints["edge"][0])
        print(f"  try: curl -i --cacert {endpoints['ca']} --resolve www.victim.example:{v1['port']}:{v1['host']} "
              f"https://www.victim.example:{v1['port']}/")
        print(f"  endpoints written to {state / 'endpoints.json'}; Ctrl-C to stop", flush=True)
    await stop.wait()
    await lab.stop()
    (state / "endpoints.json").unlink(missing_ok=True)
    print("sni-lab stopped", file=sys.stderr)
    return 0


def origins(args) -> int:
    """`sni-lab origins`: only the origins of the world, for a lab spread over processes or containers."""
    from lab.origins import Origins
    from lab.pki import PKIError

    world = load(args.config)

    async def serve() -> int:
        stop = _stop_on_signals()
        events = Events()
        try:
            ca = LabCA.open(args.certs, tuple(world.tlds), log=lambda m: print(m, file=sys.stderr))
            running = Origins(world, events, ca=ca)
            await running.start()
        except OSError as e:
            print(f"sni-lab: error: {bind_hint(e)}", file=sys.stderr)
            return 1
        except PKIError as e:
            print(f"sni-lab: error: {e}", file=sys.stderr)
            return 1
        urls = {o.name: o.url for o in running.world.origins}
        if args.json:
            print(json.dumps({"origins": urls}, allow_nan=False), flush=True)
        else:
            for name, url in urls.items():
                print(f"  origin   {name:<10} {url}")
            print("origins ready; Ctrl-C to stop", flush=True)
        await stop.wait()
        await running.stop()
        return 0

    return run_loop(serve())
