"""The world: zones, listeners, origins, custom hostnames and DNS data, and `parse()`,
which turns the world file's tables into them.

Parsing validates the structure once and raises `WorldError` with one line naming the
file and the key, so no user mistake ever surfaces as a traceback; `lab.world.load`
reads the file and adds the checks that need the deciding code (WAF rules compile).
The `World` is immutable; run-time changes (model, zones) make a new one with `replace`, so
pure code can hold a snapshot without locks. The one exception is its custom hostnames, an
index (`Hostnames`) that a running lab changes in place one name at a time: every snapshot
made from the lab's world shares it, so a registration, an activation or a delete is one
dict update, never a new world (`with_hostnames` gives a snapshot an index of its own).
Pure: no I/O.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from collections.abc import Iterable, Iterator, Mapping
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from lab.hostnorm import HostError, normalize, wildcard_of
from lab.models import MODELS, PROTECTED  # re-exported: the names callers know them by

HOSTNAME_STATUSES = ("pending", "active", "moved", "deleted", "blocked")
VALIDATION_MODES = ("multi", "single")  # the first is the default: the control on
ORIGIN_KINDS = ("victim", "saas", "collector")
RECORD_TYPES = ("A", "AAAA", "CNAME", "TXT")


class WorldError(ValueError):
    """A broken world file: `str()` is the one line shown to the user."""


@dataclass(frozen=True)
class Listener:
    name: str
    host: str
    port: int
    zone: str | None = None  # the SaaS zone whose dedicated v1 address this is (from zone.v1_listener)


@dataclass(frozen=True)
class Tenant:
    name: str
    hosts: tuple[str, ...]
    payload: bool = False


@dataclass(frozen=True)
class Origin:
    name: str
    kind: str
    host: str
    port: int
    tenants: tuple[Tenant, ...] = ()

    @property
    def scheme(self) -> str:
        # The collector is reached from https pages: over http a browser blocks it (mixed content).
        return "https" if self.kind == "collector" else "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"


@dataclass(frozen=True)
class WafRule:
    id: str
    expression: str
    action: str = "block"
    description: str = ""


@dataclass(frozen=True, slots=True)
class CustomHostname:
    name: str
    zone: str
    status: str = "pending"
    # The lab's knowledge, never the edge's: the overrides that answered the verifier when it
    # activated this name (its proof was forged). The oracle reads it; policy never does.
    poisoned_by: str | None = None


Row = tuple  # (name, zone, status, poisoned_by): a custom hostname as the index keeps it


class Names(tuple):
    """Names whose hash and set are made once: a zone's authorized hosts are asked about and
    key the WAF's compiled context on every request, and a zone may have 100,000 of them."""

    def __hash__(self) -> int:
        found = self.__dict__.get("hash")
        if found is None:
            found = self.__dict__["hash"] = tuple.__hash__(self)
        return found

    def __contains__(self, name: object) -> bool:
        found = self.__dict__.get("set")
        if found is None:
            found = self.__dict__["set"] = frozenset(self)
        return name in found


class Hostnames(Mapping[str, CustomHostname]):
    """The custom hostnames the edge knows, by name; a deleted registration is history, not a
    claim on a name, so it is not here. `put` and `discard` change one name in O(1); the
    policy and the certificate store read by name, and a zone's active names (the WAF's
    authorized hosts) are kept as they change, not gathered per request. Held as plain rows,
    a `CustomHostname` made when one is read: a start reads 100,000 of them."""

    def __init__(self, hostnames: Iterable[CustomHostname] = ()) -> None:
        self._rows: dict[str, Row] = {}
        self._active: dict[str, dict[str, None]] = {}  # zone -> its active names, in order
        self._active_tuple: dict[str, tuple[str, ...]] = {}  # the same, made once per change
        self._authorized: dict[str, tuple[tuple[str, ...], Names]] = {}  # zone -> (its hosts, authorized)
        for c in hostnames:
            self.put(c)

    @classmethod
    def of_rows(cls, rows: Iterable[Row]) -> "Hostnames":
        """From (name, zone, status, poisoned_by) rows, none deleted (what a start reads)."""
        index = cls()
        index._rows = {r[0]: r for r in rows}
        for name, zone, status, _ in index._rows.values():
            if status == "active":
                index._active.setdefault(zone, {})[name] = None
        return index

    def put(self, c: CustomHostname) -> None:
        """Add or replace the registration of `c.name` (a deleted one removes it)."""
        if c.status == "deleted":
            self.discard(c.name)
            return
        self._unactive(self._rows.get(c.name))
        self._rows[c.name] = (c.name, c.zone, c.status, c.poisoned_by)
        if c.status == "active":
            self._active.setdefault(c.zone, {})[c.name] = None
            self._changed(c.zone)

    def discard(self, name: str) -> None:
        self._unactive(self._rows.pop(name, None))

    def _unactive(self, old: Row | None) -> None:
        if old is not None and old[2] == "active":
            self._active.get(old[1], {}).pop(old[0], None)
            self._changed(old[1])

    def _changed(self, zone: str) -> None:
        self._active_tuple.pop(zone, None)
        self._authorized.pop(zone, None)

    def active(self, zone: str) -> tuple[str, ...]:
        """The active custom hostnames of `zone`, in the order they became active."""
        found = self._active_tuple.get(zone)
        if found is None:
            found = self._active_tuple[zone] = tuple(self._active.get(zone, ()))
        return found

    def authorized(self, zone: str, hosts: tuple[str, ...]) -> Names:
        """`hosts` (the zone's own) and its active custom hostnames, made once per change."""
        kept = self._authorized.get(zone)
        if kept is None or kept[0] != hosts:
            kept = self._authorized[zone] = (hosts, Names(hosts + self.active(zone)))
        return kept[1]

    def __getitem__(self, name: str) -> CustomHostname:
        return CustomHostname(*self._rows[name])

    def get(self, name: str, default: Any = None) -> Any:  # the hot path: no KeyError in between
        row = self._rows.get(name)
        return default if row is None else CustomHostname(*row)

    def __contains__(self, name: object) -> bool:
        return name in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"Hostnames({len(self)} names)"


@dataclass(frozen=True)
class Zone:
    name: str
    origin: str
    hosts: tuple[str, ...]
    saas: bool = False
    cname_target: str | None = None
    v1_listener: str | None = None
    v1_allowlisted: bool = False
    rules: tuple[WafRule, ...] = ()
    added: bool = False  # put on the edge at run time (POST /zones), not by the world file

    def to_dict(self) -> dict[str, Any]:
        """As the control plane's /zones tells it (WAF rules are the world file's business)."""
        return {"name": self.name, "origin": self.origin, "saas": self.saas, "hosts": list(self.hosts),
                "cname_target": self.cname_target, "v1_listener": self.v1_listener,
                "v1_allowlisted": self.v1_allowlisted, "added": self.added}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Zone":
        """A zone added at run time, from `to_dict` (never allowlisted for v1, no WAF rules)."""
        return cls(d["name"], d["origin"], tuple(d["hosts"]), bool(d["saas"]), d.get("cname_target"),
                   d.get("v1_listener"), added=True)


@dataclass(frozen=True)
class Record:
    name: str
    type: str
    value: str
    ttl: int


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class Limits:
    """Every timeout and size bound of the lab, in one place (the world file's `[limits]`).

    Defaults follow nginx where nginx has a knob for the same thing (named beside each),
    tightened where a lab on a laptop should give up sooner. Seconds are floats, sizes bytes.
    """
    # TLS and HTTP connections on the edge
    handshake_timeout: float = 10.0        # nginx ssl_handshake_timeout (60 s)
    header_timeout: float = 10.0           # whole request head: nginx client_header_timeout (60 s)
    idle_timeout: float = 75.0             # keep-alive between requests / h2 with no stream: keepalive_timeout 75 s
    body_timeout: float = 60.0             # gap between two reads of a request body: client_body_timeout 60 s
    max_body: int = 1024 * 1024            # request body: client_max_body_size 1m
    max_request_line: int = 8190           # request line and :path: large_client_header_buffers 8k
    max_field: int = 8190                  # one header field (name + value)
    max_header_bytes: int = 32768          # all header fields of one request: 4 x 8k
    max_headers: int = 100                 # header fields of one request
    max_pipelined: int = 32                # HTTP/1.1 requests read ahead of their answers on one connection
    send_timeout: float = 60.0             # a peer that reads none of our answers: send_timeout 60 s
    lingering_time: float = 10.0           # after refusing a request still being sent, read and drop it at
    lingering_timeout: float = 2.0         # most this long, until it pauses this long: lingering_time 30 s / 5 s
    max_connections: int = 4096            # edge connections in all (also capped below the descriptor limit)
    max_connections_per_client: int = 256  # edge connections from one client address: limit_conn
    h2_max_streams: int = 100              # http2_max_concurrent_streams (128)
    h2_max_buffered: int = 1024 * 1024     # request body held per h2 connection before flow control stops it
    h2_control_frames: int = 1000          # SETTINGS/PING/RST_STREAM/empty frames a peer may send per 10 s
    # the edge's leg to the origins
    origin_connect_timeout: float = 5.0    # proxy_connect_timeout (60 s)
    origin_timeout: float = 30.0           # response from an origin: proxy_read_timeout (60 s)
    origin_max_connections: int = 256      # per origin, open at once; requests beyond wait their turn
    origin_max_response: int = 16 * 1024 * 1024
    origin_max_queued: int = 1024          # requests waiting for a connection to one origin; beyond: 503
    origin_idle_timeout: float = 60.0      # an unused keep-alive connection to an origin: upstream keepalive_timeout (60 s)
    # the resolver over TCP
    dns_tcp_max_connections: int = 128
    dns_tcp_per_client: int = 16           # so one client cannot take every slot
    dns_tcp_idle_timeout: float = 10.0     # RFC 7766 suggests seconds, not minutes
    # the event log
    event_field: int = 512                 # longest text kept in one event field (paths, reasons)
    event_log_rows: int = 200_000          # newest events kept in the durable log
    event_log_bytes: int = 64 * 1024 * 1024  # and at most this much of it
    # the background verifier of custom hostnames (Cloudflare retries before "moved")
    verify_moved_after: int = 3            # an active hostname is moved after this many real negative answers
    verify_moved_span: float = 600.0       # in a row, the first and the last at least this many seconds apart
    verify_retry_max: float = 600.0        # a failed lookup is retried after 10 s, doubling up to this
    verify_pending_max: float = 14400.0    # a pending or moved hostname: Cloudflare's growing intervals, up to 4 h
    verify_active_every: float = 86400.0   # an active hostname is re-checked about once a day
    verify_rate: float = 5.0               # hostnames the background verifier checks per second, at most
    # the process
    descriptor_reserve: int = 256          # descriptors never given to edge connections (control, DNS, origins, log)


LIMIT_FIELDS = {f.name: f for f in dataclasses.fields(Limits)}


@dataclass(frozen=True)
class Compose:
    """The docker-compose stack (the world file's `[compose]`, read by `lab.compose`).

    Every actor keeps its number: 127.0.0.N is host N of `subnet` on the stack's bridge,
    so the addresses of the stories stay recognisable. A private /24 that is unlikely to be
    a real network; never 192.0.2.0/24, which is the host's own network on some machines."""
    subnet: str = "10.213.37.0/24"
    edge_port: int = 443   # where a real edge listens
    dns_port: int = 53     # where a system resolver is asked


@dataclass(frozen=True)
class World:
    model: str
    tlds: tuple[str, ...]
    listeners: tuple[Listener, ...]
    origins: tuple[Origin, ...]
    zones: tuple[Zone, ...]
    hostnames: Hostnames  # the custom hostnames, by name (the class says why it is not frozen)
    records: tuple[Record, ...]
    dns_zones: tuple[str, ...]
    resolver: Endpoint
    control: Endpoint
    proxy: Endpoint = Endpoint("127.0.0.1", 8118)  # the browsers' CONNECT proxy (lab/proxy.py)
    source: str = "<memory>"
    ttl: int = 60
    challenge_port: int = 80  # where the verifier fetches HTTP ownership tokens
    # Where the multi-vantage verifier asks from: distinct source addresses that must agree.
    vantages: tuple[str, ...] = ("127.0.0.41", "127.0.0.42", "127.0.0.43")
    # The provider's block list: a custom hostname matching one (exact, or `*.suffix` for any
    # name below it) is registered `blocked` and never verified.
    blocked_hostnames: tuple[str, ...] = ()
    limits: Limits = Limits()
    compose: Compose = Compose()
    # Named client addresses (`[clients]`: the victim's browser...), so a scenario says
    # `client:victim`, not an address that only fits one world.
    clients: tuple[tuple[str, str], ...] = ()

    # Indexes, built once per snapshot: decide() runs on every request.
    @cached_property
    def listener_by_name(self) -> dict[str, Listener]:
        return {l.name: l for l in self.listeners}

    @cached_property
    def origin_by_name(self) -> dict[str, Origin]:
        return {o.name: o for o in self.origins}

    @cached_property
    def client_by_name(self) -> dict[str, str]:
        return dict(self.clients)

    @cached_property
    def zone_by_name(self) -> dict[str, Zone]:
        return {z.name: z for z in self.zones}

    @cached_property
    def zone_by_host(self) -> dict[str, Zone]:
        return {h: z for z in self.zones for h in z.hosts}

    @property
    def custom_hostnames(self) -> tuple[CustomHostname, ...]:
        """Every custom hostname, in a tuple: a copy, for code that wants them all (not the edge)."""
        return tuple(self.hostnames.values())

    def active_hostnames(self, zone: str) -> tuple[str, ...]:
        return self.hostnames.active(zone)

    def authorized_hosts(self, zone: Zone) -> tuple[str, ...]:
        """The names a zone's owner sends to its origin: its own and its active custom hostnames."""
        return self.hostnames.authorized(zone.name, zone.hosts)

    def with_model(self, model: str) -> "World":
        if model not in MODELS:
            raise WorldError(f"unknown model {model!r} (choose from {', '.join(MODELS)})")
        return dataclasses.replace(self, model=model)

    def with_hostnames(self, hostnames: Iterable[CustomHostname] | Hostnames) -> "World":
        """This world with an index of its own holding `hostnames` (for one name, the last wins)."""
        index = hostnames if isinstance(hostnames, Hostnames) else Hostnames(hostnames)
        return dataclasses.replace(self, hostnames=index)

    def frozen(self, names: Iterable[str]) -> "World":
        """This world with an index of its own holding what it says now of `names` (each, and the
        wildcard that may cover it): a snapshot for a reader that judges later, in O(len(names))."""
        said = [c for name in names for n in (name, wildcard_of(name)) if n and (c := self.hostnames.get(n))]
        if said:
            return dataclasses.replace(self, hostnames=Hostnames(said))
        if "_frozen_none" not in self.__dict__:  # the usual case, a zone's own host: one snapshot per world
            self.__dict__["_frozen_none"] = dataclasses.replace(self, hostnames=Hostnames())
        return self.__dict__["_frozen_none"]

    def with_zones(self, added: tuple[Zone, ...]) -> "World":
        """The world file's zones plus `added` (zones put on the edge at run time), checked as the
        loader checks a file; the listeners' v1 zones and the resolver's zones follow."""
        parser = _Parser(f"{self.source} (zones added at run time)")
        zones = [z for z in self.zones if not z.added] + [dataclasses.replace(z, added=True) for z in added]
        parser.check_unique([z.name for z in zones], [f"zone {z.name}" for z in zones], what="name")
        parser.check_unique([h for z in zones for h in z.hosts], [f"zone {z.name}" for z in zones for _ in z.hosts],
                            what="host")
        for z in added:
            taken = sorted(h for h in z.hosts if h in self.hostnames)
            if taken:
                raise WorldError(f"zone {z.name}: {taken[0]} is already a custom hostname on the edge")
        listeners = parser.v1_addresses(tuple(dataclasses.replace(l, zone=None) for l in self.listeners), zones)
        dns_zones = self.dns_zones + tuple(z.name for z in added if not _covered(z.name, self.dns_zones))
        world = dataclasses.replace(self, zones=tuple(zones), listeners=listeners, dns_zones=dns_zones)
        parser.check_references(world)
        return world

    def blocked(self, name: str) -> bool:
        """Is `name` on the provider's block list?"""
        return any(name == b or (b.startswith("*.") and name.endswith(b[1:])) for b in self.blocked_hostnames)

    def with_ports(self, ports: dict[str, int]) -> "World":
        """Rebind actors (by listener/origin name, or 'resolver'/'control'/'proxy') to other ports."""
        listeners = tuple(dataclasses.replace(l, port=ports.get(l.name, l.port)) for l in self.listeners)
        origins = tuple(dataclasses.replace(o, port=ports.get(o.name, o.port)) for o in self.origins)
        resolver = Endpoint(self.resolver.host, ports.get("resolver", self.resolver.port))
        control = Endpoint(self.control.host, ports.get("control", self.control.port))
        proxy = Endpoint(self.proxy.host, ports.get("proxy", self.proxy.port))
        return dataclasses.replace(self, listeners=listeners, origins=origins, resolver=resolver, control=control,
                                   proxy=proxy,
                                   challenge_port=ports.get("challenge", self.challenge_port))

    def with_free_ports(self) -> "World":
        """Every actor on port 0: the OS picks free ports (tests, in-process labs)."""
        return self.with_ports({n: 0 for n in [*self.listener_by_name, *self.origin_by_name, "resolver", "control", "proxy"]})

    def address_of(self, ref: str) -> str:
        """Resolve an actor reference `listener:NAME` / `origin:NAME` / `client:NAME` to its
        address; anything else (an address) is returned as it is."""
        kind, _, name = ref.partition(":")
        if kind == "listener" and name in self.listener_by_name:
            return self.listener_by_name[name].host
        if kind == "origin" and name in self.origin_by_name:
            return self.origin_by_name[name].host
        if kind == "client" and name in self.client_by_name:
            return self.client_by_name[name]
        return ref

    def knows(self, ref: str) -> bool:
        """Whether an actor reference names an actor of this world."""
        kind, _, name = ref.partition(":")
        return name in {"listener": self.listener_by_name, "origin": self.origin_by_name,
                        "client": self.client_by_name}.get(kind, ())


def _covered(name: str, zones: tuple[str, ...]) -> bool:
    return any(name == z or name.endswith("." + z) for z in zones)


def default_path() -> Path:
    return Path(str(resources.files("lab") / "lab.toml"))


def parse(data: dict[str, Any], source: str = "<memory>") -> World:
    """The world file's tables (as tomllib reads them) to a World; `source` names the file in errors."""
    return _Parser(source).world(data)


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, msg: str) -> WorldError:
        return WorldError(f"{self.source}: {key}: {msg}")

    def get(self, table: dict, key: str, where: str, typ: type | tuple, default: Any = ...) -> Any:
        if key not in table:
            if default is ...:
                raise self.fail(f"{where}.{key}" if where else key, "missing")
            return default
        value = table[key]
        if isinstance(value, bool) and typ is int or not isinstance(value, typ):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.fail(f"{where}.{key}" if where else key, f"expected {names}, got {type(value).__name__}")
        return value

    def ip(self, table: dict, where: str) -> str:
        return self.address(self.get(table, "host", where, str), f"{where}.host")

    def address(self, value: Any, key: str) -> str:
        try:
            return str(ipaddress.ip_address(value))
        except ValueError:
            raise self.fail(key, f"not an IP address: {value!r}") from None

    def port(self, table: dict, where: str) -> int:
        value = self.get(table, "port", where, int)
        if not 0 <= value <= 65535:
            raise self.fail(f"{where}.port", f"out of range: {value}")
        return value

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"expected a host name, got {value!r}")
        try:
            return normalize(value, allow_wildcard=True)
        except HostError as e:
            raise self.fail(key, str(e)) from None

    def world(self, data: dict) -> World:
        lab = self.get(data, "lab", "", dict, {})
        model = self.get(lab, "model", "lab", str, "v1")
        if model not in MODELS:
            raise self.fail("lab.model", f"unknown model {model!r} (choose from {', '.join(MODELS)})")
        tlds = tuple(self.get(lab, "tlds", "lab", list, ["example", "test"]))
        resolver_t = self.get(data, "resolver", "", dict, {"host": "127.0.0.2", "port": 5353})
        control_t = self.get(data, "control", "", dict, {"host": "127.0.0.1", "port": 8000})
        resolver = Endpoint(self.ip(resolver_t, "resolver"), self.port(resolver_t, "resolver"))
        control = Endpoint(self.ip(control_t, "control"), self.port(control_t, "control"))
        proxy_t = self.get(data, "proxy", "", dict, {"host": "127.0.0.1", "port": 8118})
        proxy = Endpoint(self.ip(proxy_t, "proxy"), self.port(proxy_t, "proxy"))
        ttl = self.get(resolver_t, "ttl", "resolver", int, 60)
        challenge_port = self.get(control_t, "challenge_port", "control", int, 80)
        vantages = tuple(self.address(v, f"control.vantages[{i}]")
                         for i, v in enumerate(self.get(control_t, "vantages", "control", list, list(World.vantages))))
        if len(set(vantages)) < 2:
            raise self.fail("control.vantages", "multi-vantage validation needs at least 2 distinct addresses")
        blocked = tuple(self.name(b, "lab.blocked_hostnames") for b in self.get(lab, "blocked_hostnames", "lab", list, []))

        listeners = tuple(self.listener(t, f"listener[{i}]") for i, t in enumerate(self.get(data, "listener", "", list)))
        origins = tuple(
            self.origin(n, t, f"origin.{n}") for n, t in self.get(data, "origin", "", dict).items()
        )
        zones, hostnames = [], []
        for i, t in enumerate(self.get(data, "zone", "", list)):
            zone, hs = self.zone(t, f"zone[{i}]")
            zones.append(zone)
            hostnames.extend(hs)
        dns = self.get(data, "dns", "", dict, {})
        dns_zones = tuple(self.name(z, "dns.zones") for z in self.get(dns, "zones", "dns", list, []))
        records = tuple(self.record(t, f"dns.record[{i}]", ttl) for i, t in enumerate(self.get(dns, "record", "dns", list, [])))

        listeners = self.v1_addresses(listeners, zones)
        self.check_unique([(l.host, l.port) for l in listeners] + [(o.host, o.port) for o in origins]
                          + [(resolver.host, resolver.port), (control.host, control.port), (proxy.host, proxy.port)],
                          [f"listener {l.name}" for l in listeners] + [f"origin.{o.name}" for o in origins]
                          + ["resolver", "control", "proxy"])
        self.check_unique([l.name for l in listeners], [f"listener {l.name}" for l in listeners], what="name")
        self.check_unique([z.name for z in zones], [f"zone {z.name}" for z in zones], what="name")
        self.check_unique([h.name for h in hostnames], [f"custom hostname {h.name}" for h in hostnames], what="name")
        self.check_unique([h for z in zones for h in z.hosts], [f"zone {z.name}" for z in zones for _ in z.hosts], what="host")
        world = World(model=model, tlds=tlds, listeners=listeners, origins=origins, zones=tuple(zones),
                      hostnames=Hostnames(hostnames), records=records, dns_zones=dns_zones,
                      resolver=resolver, control=control, proxy=proxy, source=self.source, ttl=ttl,
                      challenge_port=challenge_port, vantages=vantages, blocked_hostnames=blocked,
                      limits=self.limits(self.get(data, "limits", "", dict, {})),
                      compose=self.compose(self.get(data, "compose", "", dict, {})),
                      clients=tuple((str(n), self.address(a, f"clients.{n}"))
                                    for n, a in self.get(data, "clients", "", dict, {}).items()))
        self.check_references(world)
        return world

    def v1_addresses(self, listeners: tuple[Listener, ...], zones: list[Zone]) -> tuple[Listener, ...]:
        """Derive each listener's zone from `zone.v1_listener`, the one place the file states it.

        `listener.zone`, the older spelling of the same fact, is still read, and must agree."""
        owner: dict[str, str] = {}
        for i, z in enumerate(zones):
            if z.v1_listener is None:
                continue
            if not z.saas:
                raise self.fail(f"zone[{i}].v1_listener", "only a SaaS zone (saas = true) has a dedicated v1 address")
            if z.v1_listener in owner:
                raise self.fail(f"zone[{i}].v1_listener",
                                f"listener {z.v1_listener!r} is already the v1 address of zone {owner[z.v1_listener]}")
            owner[z.v1_listener] = z.name
        for i, l in enumerate(listeners):
            derived = owner.get(l.name)
            if l.zone is not None and l.zone != derived:
                says = f"zone {derived} names it" if derived else "no zone names it"
                raise self.fail(f"listener[{i}].zone", f"{l.zone}, but {says} as its v1_listener; state it once, "
                                f"as the zone's v1_listener")
        return tuple(dataclasses.replace(l, zone=owner.get(l.name)) for l in listeners)

    def limits(self, t: dict) -> Limits:
        values = {}
        for key, value in t.items():
            field = LIMIT_FIELDS.get(key)
            if field is None:
                raise self.fail(f"limits.{key}", f"unknown limit (known: {', '.join(LIMIT_FIELDS)})")
            want = (int, float) if field.type == "float" else int
            if isinstance(value, bool) or not isinstance(value, want):
                raise self.fail(f"limits.{key}", f"expected a number, got {type(value).__name__}")
            if not 0 < value < 2 ** 53:
                raise self.fail(f"limits.{key}", f"must be positive and finite, got {value!r}")
            values[key] = float(value) if field.type == "float" else value
        return Limits(**values)

    def compose(self, t: dict) -> Compose:
        known = [f.name for f in dataclasses.fields(Compose)]
        unknown = set(t) - set(known)
        if unknown:
            raise self.fail(f"compose.{sorted(unknown)[0]}", f"unknown key (known: {', '.join(known)})")
        subnet = self.get(t, "subnet", "compose", str, Compose.subnet)
        try:
            net = ipaddress.ip_network(subnet)
        except ValueError as e:
            raise self.fail("compose.subnet", f"not a network: {e}") from None
        if net.version != 4 or not net.is_private or net.prefixlen > 24 or net.overlaps(ipaddress.ip_network("127.0.0.0/8")):
            raise self.fail("compose.subnet", f"{subnet}: expected a private IPv4 network of at least /24, not loopback")
        ports = {}
        for key in ("edge_port", "dns_port"):
            ports[key] = self.get(t, key, "compose", int, getattr(Compose, key))
            if not 0 < ports[key] <= 65535:
                raise self.fail(f"compose.{key}", f"out of range: {ports[key]}")
        return Compose(str(net), **ports)

    def check_unique(self, keys: list, labels: list[str], what: str = "address") -> None:
        seen: dict = {}
        for key, label in zip(keys, labels):
            if key in seen and not (what == "address" and key[1] == 0):
                shown = f"{key[0]}:{key[1]}" if isinstance(key, tuple) else key
                raise WorldError(f"{self.source}: {label}: duplicate {what} {shown} (also {seen[key]})")
            seen.setdefault(key, label)

    def check_references(self, w: World) -> None:
        for i, z in enumerate(w.zones):
            if z.origin not in w.origin_by_name:
                raise self.fail(f"zone[{i}].origin", f"unknown origin {z.origin!r}")
            if z.v1_listener is not None and z.v1_listener not in w.listener_by_name:
                raise self.fail(f"zone[{i}].v1_listener", f"unknown listener {z.v1_listener!r}")
        for i, r in enumerate(w.records):
            kind, _, name = r.value.partition(":")
            if r.type in ("A", "AAAA") and kind in ("listener", "origin"):
                known = w.listener_by_name if kind == "listener" else w.origin_by_name
                if name not in known:
                    raise self.fail(f"dns.record[{i}].value", f"unknown {kind} {name!r}")
            elif r.type in ("A", "AAAA"):
                try:
                    addr = ipaddress.ip_address(r.value)
                except ValueError:
                    raise self.fail(f"dns.record[{i}].value", f"not an IP address: {r.value!r}") from None
                if addr.version != (4 if r.type == "A" else 6):
                    raise self.fail(f"dns.record[{i}].value", f"{r.value} is not an {r.type} address")

    def listener(self, t: dict, where: str) -> Listener:
        if not isinstance(t, dict):
            raise self.fail(where, "expected a table")
        zone = self.get(t, "zone", where, str, None)
        return Listener(self.get(t, "name", where, str), self.ip(t, where), self.port(t, where),
                        self.name(zone, f"{where}.zone") if zone else None)

    def origin(self, name: str, t: dict, where: str) -> Origin:
        if not isinstance(t, dict):
            raise self.fail(where, "expected a table")
        kind = self.get(t, "kind", where, str)
        if kind not in ORIGIN_KINDS:
            raise self.fail(f"{where}.kind", f"unknown kind {kind!r} (choose from {', '.join(ORIGIN_KINDS)})")
        tenants = tuple(
            Tenant(self.get(tt, "name", f"{where}.tenant[{i}]", str),
                   tuple(self.name(h, f"{where}.tenant[{i}].hosts") for h in self.get(tt, "hosts", f"{where}.tenant[{i}]", list)),
                   self.get(tt, "payload", f"{where}.tenant[{i}]", bool, False))
            for i, tt in enumerate(self.get(t, "tenant", where, list, []))
        )
        return Origin(name, kind, self.ip(t, where), self.port(t, where), tenants)

    def zone(self, t: dict, where: str) -> tuple[Zone, list[CustomHostname]]:
        if not isinstance(t, dict):
            raise self.fail(where, "expected a table")
        name = self.name(self.get(t, "name", where, str), f"{where}.name")
        hosts = tuple(self.name(h, f"{where}.hosts") for h in self.get(t, "hosts", where, list))
        for h in hosts:
            if h != name and not h.endswith("." + name):
                raise self.fail(f"{where}.hosts", f"{h} is not inside zone {name}")
        rules = tuple(
            WafRule(self.get(r, "id", f"{where}.rule[{i}]", str), self.get(r, "expression", f"{where}.rule[{i}]", str),
                    self.get(r, "action", f"{where}.rule[{i}]", str, "block"),
                    self.get(r, "description", f"{where}.rule[{i}]", str, ""))
            for i, r in enumerate(self.get(t, "rule", where, list, []))
        )
        for i, r in enumerate(rules):
            if r.action not in ("block", "allow"):
                raise self.fail(f"{where}.rule[{i}].action", f"unknown action {r.action!r} (block or allow)")
        target = self.get(t, "cname_target", where, str, None)
        zone = Zone(name, self.get(t, "origin", where, str), hosts, self.get(t, "saas", where, bool, False),
                    self.name(target, f"{where}.cname_target") if target else None,
                    self.get(t, "v1_listener", where, str, None), self.get(t, "v1_allowlisted", where, bool, False), rules)
        hostnames = []
        for i, h in enumerate(self.get(t, "custom_hostname", where, list, [])):
            key = f"{where}.custom_hostname[{i}]"
            status = self.get(h, "status", key, str, "pending")
            if status not in HOSTNAME_STATUSES:
                raise self.fail(f"{key}.status", f"unknown status {status!r} (choose from {', '.join(HOSTNAME_STATUSES)})")
            hostnames.append(CustomHostname(self.name(self.get(h, "name", key, str), f"{key}.name"), name, status))
        if hostnames and not zone.saas:
            raise self.fail(f"{where}.custom_hostname", "only a SaaS zone (saas = true) has custom hostnames")
        return zone, hostnames

    def record(self, t: dict, where: str, ttl: int) -> Record:
        rtype = self.get(t, "type", where, str).upper()
        if rtype not in RECORD_TYPES:
            raise self.fail(f"{where}.type", f"unsupported type {rtype!r} (choose from {', '.join(RECORD_TYPES)})")
        value = self.get(t, "value", where, str)
        if rtype == "CNAME":
            value = self.name(value, f"{where}.value")
        return Record(self.name(self.get(t, "name", where, str), f"{where}.name"), rtype, value,
                      self.get(t, "ttl", where, int, ttl))
