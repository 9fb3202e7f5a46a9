"""PURE: which origin a request goes to, or why it is refused.

`decide(listener, sni, target, world, model)` is the whole routing brain of the edge;
engines only carry bytes to and from it. No I/O, no imports from edge/dns/control.
"""
from __future__ import annotations

from dataclasses import dataclass

from lab import waf
from lab.hostnorm import HostError, normalize, wildcard_of
from lab.topology import Listener, World, Zone


@dataclass(frozen=True)
class Target:
    """The request's host as sent: every Host header, `:authority`, an absolute-form URI's host."""

    hosts: tuple[str, ...] = ()
    authority: str | None = None
    absolute: str | None = None  # host[:port] of an absolute-form request target
    path: str = "/"


@dataclass(frozen=True)
class Decision:
    model: str
    rule: str
    reason: str
    origin: str | None = None  # set when routed
    status: int = 0  # set when refused
    code: str = ""
    host: str | None = None  # the normalised host the decision was about

    @property
    def routed(self) -> bool:
        return self.origin is not None

    def header(self) -> str:
        """The `X-Lab-Decision` value: model, rule, outcome and reason, on one latin-1 line."""
        outcome = f"origin={self.origin}" if self.routed else f"refused={self.status} {self.code}"
        text = f"model={self.model}; rule={self.rule}; {outcome}; reason={self.reason}"
        return text.encode("latin-1", "replace").decode("latin-1").replace("\r", " ").replace("\n", " ")


class _BadTarget(Exception):
    def __init__(self, code: str, reason: str):
        self.code, self.reason = code, reason


def request_host(target: Target) -> str | None:
    """The one host a request names, normalised; raises _BadTarget when it contradicts itself."""
    if len(target.hosts) > 1:
        raise _BadTarget("duplicate-host", f"{len(target.hosts)} Host headers in one request")
    named = []
    for label, value in (("Host", target.hosts[0] if target.hosts else None),
                         (":authority", target.authority), ("absolute-form target", target.absolute)):
        if value is None:
            continue
        try:
            named.append((label, normalize(value)))
        except HostError as e:
            raise _BadTarget("bad-host", f"{label}: {e}") from None
    if not named:
        return None
    first_label, first = named[0]
    for label, host in named[1:]:
        if host != first:
            raise _BadTarget("host-mismatch", f"{first_label} {first} disagrees with {label} {host}")
    return first


def _refuse(model: str, status: int, code: str, reason: str, host: str | None, rule: str = "") -> Decision:
    return Decision(model=model, rule=rule or code, reason=reason, status=status, code=code, host=host)


def zone_for_host(world: World, host: str) -> Zone | None:
    zone = world.zone_by_host.get(host)
    if zone is None:
        wildcard = wildcard_of(host)
        zone = world.zone_by_host.get(wildcard) if wildcard else None
    return zone


def _route(world: World, zone: Zone, model: str, rule: str, reason: str, host: str | None, sni: str | None,
           listener: Listener, path: str) -> Decision:
    # A zone's own custom rules apply whichever model brought the request to it.
    if zone.rules:
        hit = waf.evaluate(world, zone, host=host or "", sni=sni or "", dst=listener.host, path=path,
                           include_allowlist=False)
        if hit:
            return _refuse(model, 403, "waf-block", f"{model}: rule {hit.rule_id} of zone {zone.name} blocked "
                           f"the request ({hit.description or 'custom rule'})", host, rule=hit.rule_id)
    return Decision(model=model, rule=rule, reason=reason, origin=zone.origin, host=host)


def decide(listener: Listener, sni: str | None, target: Target, world: World, model: str | None = None) -> Decision:
    model = model or world.model
    try:
        host = request_host(target)
    except _BadTarget as e:
        return _refuse(model, 400, e.code, f"{model}: {e.reason}; refused, never guessed", None)
    if sni is not None:
        try:
            sni = normalize(sni)
        except HostError:
            sni = sni.lower()

    dedicated = world.zone_by_name.get(listener.zone) if listener.zone else None
    if dedicated is not None and dedicated.saas and dedicated.v1_listener == listener.name:
        where = f"listener {listener.name} ({listener.host}) belongs to zone {dedicated.name}"
        if model == "v1":
            return _route(world, dedicated, model, "v1-listener", f"v1: {where}; Host ignored", host, sni,
                          listener, target.path)
        if model == "v1-waf" and dedicated.v1_allowlisted:
            hit = waf.evaluate(world, dedicated, host=host or "", sni=sni or "", dst=listener.host,
                               path=target.path, include_allowlist=True)
            if hit:
                why = (f"host {host} is not an authorized hostname of {dedicated.name}"
                       if hit.rule_id == waf.ALLOWLIST_RULE_ID else hit.description or "custom rule")
                return _refuse(model, 403, "waf-block", f"v1-waf: rule {hit.rule_id} of zone {dedicated.name}: {why}",
                               host, rule=hit.rule_id)
            return Decision(model=model, rule="v1-listener", origin=dedicated.origin, host=host,
                            reason=f"v1-waf: {where}, on the v1 allowlist; host {host} is authorized")
        # Any other model, or a v1 zone not on the allowlist: route by host like everything else.

    name = host or sni
    if name is None:
        return _refuse(model, 400, "no-host", f"{model}: the request names no host and the connection no SNI", None)
    if model == "v2-strict" and host is not None and sni is not None and host != sni:
        return _refuse(model, 421, "sni-host-mismatch",
                       f"v2-strict: host {host} differs from SNI {sni}; Misdirected Request", host)
    zone = zone_for_host(world, name)
    if zone is not None:
        return _route(world, zone, model, "zone-host", f"{model}: host {name} belongs to zone {zone.name}", name, sni,
                      listener, target.path)
    custom = world.hostname_by_name.get(name)
    if custom is not None:
        saas = world.zone_by_name[custom.zone]
        if custom.status == "active":
            return _route(world, saas, model, "custom-hostname",
                          f"{model}: host {name} is an active custom hostname of {saas.name}", name, sni, listener,
                          target.path)
        return _refuse(model, 421, "hostname-not-active",
                       f"{model}: custom hostname {name} of {saas.name} is {custom.status}; only active hostnames "
                       f"are routed", name)
    return _refuse(model, 421, "unknown-host", f"{model}: no zone or active custom hostname for host {name}", name)


def certificate_names(world: World) -> list[tuple[str, ...]]:
    """The certificates the edge may hold: one per zone (apex and wildcard), one per active custom hostname.

    A pending, moved or deleted hostname has proven nothing, so it gets no certificate in any model.
    """
    certs = [(z.name, f"*.{z.name}") for z in world.zones]
    certs += [(c.name,) for c in world.custom_hostnames if c.status == "active"]
    return certs
