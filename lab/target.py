"""What the catalog runs against: the lab's own edge, or another edge (nginx, Caddy, HAProxy,
yours) at listeners the lab names but did not start (`--edge NAME=HOST:PORT`, an edge-only
endpoints file, `sni-lab edges matrix`).

Another edge has no model to switch; it runs one config, whose flavour (`lab.models.FLAVOURS`)
says which lab model it is compared with and whether it claims to be protected. Asking for a
target that does not answer is an error, never a reason to test something else.
"""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lab.models import FLAVOURS, is_protected
from lab.topology import World

if TYPE_CHECKING:
    from lab.run import Lab


class TargetError(Exception):
    """One line for the user; `code` is the exit status (2: a wrong flag, 1: nothing answers)."""

    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


@dataclass(frozen=True)
class Target:
    """Another edge: its name (`nginx`, `edge`), its config's flavour, where each of the world's
    listeners is on it. A listener of the world it does not have is `missing`."""
    name: str
    flavour: str
    listeners: dict[str, tuple[str, int]]
    missing: tuple[str, ...] = ()

    @property
    def protected(self) -> bool:
        return is_protected(self.flavour)

    @property
    def reference(self) -> str:
        """The lab model whose expectations this edge's outcomes are compared with."""
        return FLAVOURS[self.flavour]

    def place(self, world: World) -> World:
        """The world with its listeners where this edge has them: the lab's resolver then sends
        `listener:NAME` records there, and the oracle judges by the same names."""
        moved = tuple(dataclasses.replace(l, host=self.listeners[l.name][0], port=self.listeners[l.name][1])
                      if l.name in self.listeners else l for l in world.listeners)
        return dataclasses.replace(world, listeners=moved)


    def lab(self, world: World, certs) -> Lab:
        """The lab that serves this edge (not started): its resolver, origins where the world file
        says (the edge's config points there) and control plane; no edge of its own."""
        from lab.run import Lab

        return Lab.ephemeral(self.place(world), certs, run_edge=False, keep_origin_ports=True)

    def endpoints(self, lab_endpoints: dict) -> dict:
        """The serving lab's endpoints with this edge's listeners as the edge."""
        return {**lab_endpoints, "engine": self.name,
                "edge": [e for e in lab_endpoints["edge"] if e["name"] in self.listeners]}


def parse_edges(specs: list[str], world: World, name: str = "edge", flavour: str = "deployed") -> Target:
    """`--edge NAME=HOST:PORT` (repeatable): which listener of the world is where on the edge."""
    listeners: dict[str, tuple[str, int]] = {}
    for spec in specs:
        lname, eq, where = spec.partition("=")
        host, colon, port = where.rpartition(":")
        if not eq or not colon:
            raise TargetError(f"--edge {spec}: expected NAME=HOST:PORT, e.g. saas-v1=127.0.0.11:8443", 2)
        if lname not in world.listener_by_name:
            raise TargetError(f"--edge {spec}: the world has no listener {lname!r} "
                              f"(it has {', '.join(world.listener_by_name)})", 2)
        try:
            address = str(ipaddress.ip_address(host.strip("[]")))
            number = int(port)
        except ValueError:
            raise TargetError(f"--edge {spec}: HOST must be an IP address and PORT a number", 2) from None
        if not 0 < number < 65536:
            raise TargetError(f"--edge {spec}: port {number} out of range", 2)
        if lname in listeners:
            raise TargetError(f"--edge {spec}: listener {lname} is given twice", 2)
        listeners[lname] = (address, number)
    return target_of(listeners, world, name, flavour)


def target_of(listeners: dict[str, tuple[str, int]], world: World, name: str, flavour: str) -> Target:
    if flavour not in FLAVOURS:
        raise TargetError(f"unknown flavour {flavour!r} (choose from {', '.join(FLAVOURS)})", 2)
    seen: dict[tuple[str, int], str] = {}
    for lname, where in listeners.items():
        if where in seen:
            # The v1 flaw is routing by address: two listeners on one address cannot be told apart.
            raise TargetError(f"listeners {seen[where]} and {lname} are both at {where[0]}:{where[1]}; each "
                              f"listener of the world needs an address of its own on the edge", 2)
        seen[where] = lname
    missing = tuple(l for l in world.listener_by_name if l not in listeners)
    return Target(name=name, flavour=flavour, listeners=dict(listeners), missing=missing)


def from_endpoints(ep: dict, world: World, flavour: str | None = None) -> Target:
    """An endpoints file's edge (`[{"name", "host", "port"}]`), as another edge; `flavour`, when
    given, wins over the file's."""
    try:
        listeners = {l["name"]: (str(l["host"]), int(l["port"])) for l in ep["edge"]}
    except (KeyError, TypeError, ValueError):
        raise TargetError("the endpoints file has no usable \"edge\" list of {name, host, port}") from None
    unknown = sorted(set(listeners) - set(world.listener_by_name))
    if unknown:
        raise TargetError(f"the endpoints file names listener {unknown[0]!r}, which the world does not have", 2)
    return target_of(listeners, world, str(ep.get("engine") or "edge"),
                     flavour or str(ep.get("flavour") or "deployed"))


async def check_answers(target: Target, timeout: float = 3.0) -> None:
    """Every listener of the target accepts a connection, or TargetError says which does not."""
    async def one(lname: str, host: str, port: int) -> str | None:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except (OSError, TimeoutError) as e:
            why = "timed out" if isinstance(e, TimeoutError) else (e.strerror or str(e)).lower()
            return f"listener {lname} at {host}:{port} does not answer ({why})"
        writer.close()
        return None

    problems = [p for p in await asyncio.gather(*(one(n, *where) for n, where in target.listeners.items())) if p]
    if problems:
        raise TargetError(f"{target.name}: {'; '.join(problems)}: nothing was tested")


def needs_control_plane(sc) -> str | None:
    """Why a scenario cannot run on an edge the lab does not drive, or None when it can."""
    if sc.hostnames:
        return ("custom hostname lifecycle: the lab's control plane registers and verifies hostnames at run "
                "time, which a static edge config does not learn")
    if sc.zones:
        return "zones put on the edge at run time through the lab's control plane"
    if sc.controls_off:
        return "turns a control of the lab's own verifier off"
    return None
