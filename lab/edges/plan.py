"""PURE: what a real edge's config must say, from the world: per listener, which certificates
it offers by SNI, which hosts it routes to which origin, and what it refuses.

Every edge writer (nginx, Caddy, HAProxy, mitmproxy) renders this one plan in its own
syntax, so the four configs differ only where the edges do.

Two flavours:
- `default`, a typical multi-tenant config: every certificate on every listener, chosen by
  SNI; a SaaS zone's dedicated v1 listener sends everything to the zone's origin whatever
  the Host; any other listener is shared and routes by Host, an unknown host gets 404.
- `fixed`, the edge's own controls plus a per-address allowlist: a listener serves only its
  authorized names, by SNI and by Host (a v1 listener its zone's own names and active custom
  hostnames; a shared listener every zone's), and refuses the rest (421).
"""
from __future__ import annotations

from dataclasses import dataclass

from lab.hostnorm import wildcard_of
from lab.policy import certificate_names
from lab.topology import World, WorldError

FLAVOURS = ("default", "fixed")
NOT_ROUTED = {"default": 404, "fixed": 421}  # the answer to a host a listener routes nowhere


class PlanError(WorldError):
    """A world the real-edge configs cannot express: one line for the user."""


@dataclass(frozen=True)
class CertFiles:
    """One lab certificate as files: PEM certificate, its key, and both in one file (0600) for the
    edges that want them together (HAProxy, mitmproxy)."""
    cert: str
    key: str
    bundle: str


@dataclass(frozen=True)
class Upstream:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class ListenerPlan:
    name: str
    host: str
    port: int
    zone: str | None  # the SaaS zone whose dedicated v1 listener this is
    certificates: tuple[tuple[str, ...], ...]  # offered by SNI here (a certificate is named by its names)
    routes: tuple[tuple[str, str], ...]  # (host or *.wildcard, origin) routed by Host; exact names first
    everything_to: str | None  # the origin every request goes to, Host ignored (default flavour, v1 listener)
    not_routed: int  # the status for a host routed nowhere
    strict: bool  # fixed: an SNI or host outside `names` is refused

    @property
    def names(self) -> tuple[str, ...]:
        """The hosts routed here by Host (under `fixed`: the names this address serves)."""
        return tuple(host for host, _ in self.routes)

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


@dataclass(frozen=True)
class Plan:
    flavour: str
    source: str  # the world file it was made from
    listeners: tuple[ListenerPlan, ...]
    origins: dict[str, Upstream]  # the origins some listener sends to
    certificates: tuple[tuple[str, ...], ...]  # every certificate of the world


def routes(world: World, zones) -> tuple[tuple[str, str], ...]:
    """The authorized names of `zones` (their hosts and active custom hostnames), each with the
    origin Cloudflare's hostname priority gives it (lab.models.PRIORITY, as policy.decide): an
    exact active custom hostname beats a zone's own host; among wildcards the zone wins."""
    custom = {c.name: c for c in world.custom_hostnames if c.status == "active"}
    wanted = {name for z in zones for name in world.authorized_hosts(z)}
    origin: dict[str, str] = {}
    for name, c in custom.items():
        if not name.startswith("*."):
            origin[name] = world.zone_by_name[c.zone].origin
    for z in world.zones:
        for host in z.hosts:
            origin.setdefault(host, z.origin)
    for name, c in custom.items():
        origin.setdefault(name, world.zone_by_name[c.zone].origin)
    ordered = sorted(wanted, key=lambda n: (n.startswith("*."), n))
    return tuple((name, origin[name]) for name in ordered)


def certificate_for(certificates, name: str) -> tuple[str, ...] | None:
    """The certificate an edge offers for SNI `name`: one naming it exactly (an active custom
    hostname's own first), else the one wildcard that covers it, as lab.edge.certstore picks."""
    exact = [c for c in certificates if name in c]
    if exact:
        return min(exact, key=len)
    wildcard = wildcard_of(name)
    return next((c for c in certificates if wildcard and wildcard in c), None)


def make(world: World, flavour: str) -> Plan:
    if flavour not in FLAVOURS:
        raise PlanError(f"unknown flavour {flavour!r} (choose from {', '.join(FLAVOURS)})")
    fixed = flavour == "fixed"
    every_cert = tuple(certificate_names(world))
    shared_routes = routes(world, world.zones)
    listeners = []
    for l in world.listeners:
        zone = world.zone_by_name.get(l.zone) if l.zone else None
        if zone is None:
            own = shared_routes
        elif fixed:
            own = routes(world, [zone])
        else:
            own = ()
        if fixed:
            certs = tuple(dict.fromkeys(c for c in (certificate_for(every_cert, n) for n, _ in own) if c))
        else:
            certs = every_cert
        listeners.append(ListenerPlan(
            name=l.name, host=l.host, port=l.port, zone=l.zone, certificates=certs, routes=own,
            everything_to=zone.origin if zone is not None and not fixed else None,
            not_routed=NOT_ROUTED[flavour], strict=fixed))
    used = {o for lp in listeners for o in [lp.everything_to, *(o for _, o in lp.routes)] if o}
    origins = {}
    for o in world.origins:
        if o.name in used:
            if o.scheme != "http":
                raise PlanError(f"{world.source}: origin {o.name} is reached over {o.scheme}; the real-edge "
                                f"configs proxy to http origins only")
            origins[o.name] = Upstream(o.name, o.host, o.port)
    return Plan(flavour, world.source, tuple(listeners), origins, every_cert)


def offered(lp: ListenerPlan) -> tuple[str, ...]:
    """Every name the listener's certificates cover, once each (an edge's SNI table)."""
    return tuple(dict.fromkeys(name for names in lp.certificates for name in names))
