"""PURE: which origin a request goes to, or why it is refused.

`decide(listener, sni, target, world, model)` is the whole routing brain of the edge;
engines only carry bytes to and from it. What differs between models is data, the rows
of `lab.models`; this module reads a row and never compares a model's name. No I/O, no
imports from edge/dns/control.
"""
from __future__ import annotations

from dataclasses import dataclass

from lab import models, waf
from lab.hostnorm import HostError, normalize, wildcard_of, wire_host
from lab.models import Model
from lab.topology import Listener, World, WorldError, Zone


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


def named_hosts(target: Target) -> list[tuple[str, str]]:
    """Every host a request names, as sent, in the one order the edge reads them: Host, :authority,
    an absolute-form target. They must agree (`request_host`); the first is the one forwarded."""
    named = [("Host", host) for host in target.hosts]
    if target.authority is not None:
        named.append((":authority", target.authority))
    if target.absolute is not None:
        named.append(("absolute-form target", target.absolute))
    return named


def request_host(target: Target) -> str | None:
    """The one host a request names, normalised; raises _BadTarget when it contradicts itself."""
    if len(target.hosts) > 1:
        raise _BadTarget("duplicate-host", f"{len(target.hosts)} Host headers in one request")
    named = []
    for label, value in named_hosts(target):
        try:
            named.append((label, wire_host(value)))
        except HostError as e:
            raise _BadTarget("bad-host", f"{label}: {e}") from None
    if not named:
        return None
    first_label, first = named[0]
    for label, host in named[1:]:
        if host != first:
            raise _BadTarget("host-mismatch", f"{first_label} {first} disagrees with {label} {host}")
    return first


def refused(model: str, status: int, code: str, reason: str, host: str | None = None, rule: str = "") -> Decision:
    """Every refusal the edge tells, the policy's own and the edge's (a parser, an origin, itself)."""
    return Decision(model=model, rule=rule or code, reason=reason, status=status, code=code, host=host)


def malformed(model: str, status: int, code: str, problem: str, http2: bool = False) -> Decision:
    """A request an engine refused before the policy could read it: a bad head, a limit, a timeout."""
    what = f"malformed {'HTTP/2 ' if http2 else ''}request: " if status == 400 else ""
    return refused(model, status, code, f"{model}: {what}{problem}")


def zone_for_host(world: World, host: str) -> Zone | None:
    zone = world.zone_by_host.get(host)
    if zone is None:
        wildcard = wildcard_of(host)
        zone = world.zone_by_host.get(wildcard) if wildcard else None
    return zone


def _waf(world: World, zone: Zone, host: str | None, sni: str | None, listener: Listener, path: str,
         allowlist: bool) -> waf.RuleHit | None:
    authorized = world.authorized_hosts(zone)
    wildcard = wildcard_of(host) if host else None
    # An active wildcard custom hostname authorizes the names it covers.
    covered = host if wildcard in authorized else None
    return waf.evaluate(zone.rules, zone=zone.name, authorized=authorized, host=host or "",
                        sni=sni or "", dst=listener.host, path=path, include_allowlist=allowlist,
                        covered=covered)


def _blocked(model: str, zone: Zone, hit: waf.RuleHit, host: str | None) -> Decision:
    why = (f"host {host} is not an authorized hostname of {zone.name}" if hit.rule_id == waf.ALLOWLIST_RULE_ID
           else hit.description or "custom rule")
    return refused(model, 403, "waf-block", f"{model}: rule {hit.rule_id} of zone {zone.name} blocked the request "
                   f"({why})", host, rule=hit.rule_id)


def _route(world: World, zone: Zone, model: str, rule: str, reason: str, host: str | None, sni: str | None,
           listener: Listener, path: str) -> Decision:
    # A zone's own custom rules apply whichever model brought the request to it.
    if zone.rules:
        hit = _waf(world, zone, host, sni, listener, path, allowlist=False)
        if hit:
            return _blocked(model, zone, hit, host)
    return Decision(model=model, rule=rule, reason=reason, origin=zone.origin, host=host)


def _by_listener(m: Model, zone: Zone | None) -> bool:
    """Does this model send everything on the zone's dedicated v1 address to the zone?"""
    return zone is not None and m.by_listener and (zone.v1_allowlisted or not m.v1_allowlist)


def decide(listener: Listener, sni: str | None, target: Target, world: World, model: str | None = None) -> Decision:
    m = models.get(model or world.model)
    model = m.name
    try:
        host = request_host(target)
    except _BadTarget as e:
        return refused(model, 400, e.code, f"{model}: {e.reason}; refused, never guessed", None)
    if sni is not None:
        try:
            sni = normalize(sni)  # the edge only lets through an SNI hostnorm.sni_name accepts
        except HostError:
            sni = sni.lower()

    # The listener's zone as this world says: a zone added at run time takes a listener the
    # engine bound before it existed.
    listener = world.listener_by_name.get(listener.name, listener)
    dedicated = world.zone_by_name.get(listener.zone) if listener.zone else None
    if _by_listener(m, dedicated):
        where = f"listener {listener.name} ({listener.host}) belongs to zone {dedicated.name}"
        if m.v1_allowlist:
            where += ", on the v1 allowlist"
        if not m.host_allowlist:
            return _route(world, dedicated, model, "v1-listener", f"{model}: {where}; Host ignored", host, sni,
                          listener, target.path)
        hit = _waf(world, dedicated, host, sni, listener, target.path, allowlist=True)
        if hit:
            return _blocked(model, dedicated, hit, host)
        return Decision(model=model, rule="v1-listener", origin=dedicated.origin, host=host,
                        reason=f"{model}: {where}; host {host} is authorized")
    # Otherwise (the model routes by Host, or this v1 zone is not on the allowlist): by Host.

    name = host or sni
    if name is None:
        return refused(model, 400, "no-host", f"{model}: the request names no host and the connection no SNI", None)
    if m.sni_must_match_host and host is not None and sni is not None and host != sni:
        return refused(model, 421, "sni-host-mismatch",
                       f"{model}: host {host} differs from SNI {sni}; Misdirected Request", host)
    # Cloudflare's hostname priority: among exact matches an active custom hostname beats the
    # zone's own record; among wildcards the zone wins (lab.models).
    exact = world.hostnames.get(name)
    if exact is not None and exact.status == "active":
        return _custom(world, m, exact, name, sni, listener, target.path)
    zone = zone_for_host(world, name)
    if zone is not None:
        return _route(world, zone, model, "zone-host", f"{model}: host {name} belongs to zone {zone.name}", name, sni,
                      listener, target.path)
    wildcard = wildcard_of(name)
    custom = exact or (world.hostnames.get(wildcard) if wildcard else None)
    if custom is not None:
        if custom.status in m.trusts:
            return _custom(world, m, custom, name, sni, listener, target.path)
        saas = world.zone_by_name[custom.zone]
        return refused(model, 421, "hostname-not-active",
                       f"{model}: custom hostname {custom.name} of {saas.name} is {custom.status}; only "
                       f"{' or '.join(m.trusts)} hostnames are routed", name)
    trusted = "active" if m.trusts == models.VERIFIED else "registered"
    return refused(model, 421, "unknown-host", f"{model}: no zone or {trusted} custom hostname for host {name}", name)


def _custom(world: World, m: Model, custom, name: str, sni: str | None, listener: Listener, path: str) -> Decision:
    saas = world.zone_by_name[custom.zone]
    how = "an active" if custom.status == "active" else f"a {custom.status}"
    proof = "" if custom.status == "active" else ", routed on its registration alone (no ownership proof)"
    covered = f" (by {custom.name})" if custom.name != name else ""
    zone = zone_for_host(world, name)
    beats = f"; an exact custom hostname beats zone {zone.name}'s own host" if zone is not None else ""
    return _route(world, saas, m.name, "custom-hostname",
                  f"{m.name}: host {name} is {how} custom hostname of {saas.name}{covered}{proof}{beats}",
                  name, sni, listener, path)


def admit_zone(world: World, zone: Zone) -> Decision | None:
    """The refusal of putting `zone` on the edge as it asks, or None: the write-up's third
    compensating control. Under a model with a v1 allowlist no new zone gets a v1 address
    (zones already on the allowlist keep theirs); elsewhere nothing refuses it."""
    m = models.get(world.model)
    if zone.v1_listener and m.v1_allowlist:
        return refused(m.name, 403, "v1-closed", f"{m.name}: no new zone goes on v1 (the v1 allowlist is closed): add "
                       f"{zone.name} without a v1_listener, as a v2 zone", zone.name)
    return None


def check_world(world: World) -> None:
    """What the world loader cannot check by itself: every zone's WAF rules compile.

    Raises WorldError with one line (the compiler's caret drawing adds nothing there)."""
    for zone in world.zones:
        try:
            waf.compile_rules(zone.name, zone.rules)
        except waf.WafError as e:
            raise WorldError(f"{world.source}: {e}".split("\n")[0]) from None


def certificate_for(world: World, name: str) -> tuple[str, ...] | None:
    """The names of the certificate the edge serves for SNI `name` (normalised), or None: a
    zone's (apex and wildcard) when it names the zone, an active custom hostname's when it is
    one, else the one wildcard that may cover it, the zone's before a custom hostname's. The
    names of one of `certificate_names`, read by name."""
    for candidate in (name, wildcard_of(name)):
        if candidate is None:
            continue
        zone = world.zone_by_name.get(candidate.removeprefix("*."))
        if zone is not None:
            return zone.name, f"*.{zone.name}"
        custom = world.hostnames.get(candidate)
        if custom is not None and custom.status == "active":
            return (custom.name,)
    return None


def certificate_names(world: World) -> list[tuple[str, ...]]:
    """The certificates the edge may hold: one per zone (apex and wildcard), one per active custom hostname.

    A pending, moved, deleted or blocked hostname has proven nothing, so it gets no certificate in any model.
    """
    certs = [(z.name, f"*.{z.name}") for z in world.zones]
    certs += [(c.name,) for c in world.hostnames.values() if c.status == "active"]
    return certs
