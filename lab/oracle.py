"""PURE: the verdict on what one client saw (docs/design.md, "Oracle").

Computed from the outcome and the world only, never from a scenario's expectation:
MISROUTED when the certificate verified as valid for the name N the client asked for and
an origin not authorized for N answered; SAFE when an origin answered and it is
authorized for N, or the certificate was not valid for N (nothing shown in N's name);
REFUSED when nothing reached an origin.
"""
from __future__ import annotations

from lab.hostnorm import HostError, normalize, wildcard_of
from lab.topology import World

MISROUTED, SAFE, REFUSED = "MISROUTED", "SAFE", "REFUSED"
SEVERITY = {MISROUTED: 2, SAFE: 1, REFUSED: 0}


def authority_of(target: str | None) -> str | None:
    """The authority of an absolute-form request target (`https://www.victim.example:443/`),
    None for any other form (`/`, `*`, an authority-form CONNECT target)."""
    if not target or "://" not in target:
        return None
    rest = target.split("://", 1)[1]
    authority = rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]
    return authority or None


def name_asked(sni: str | None, host: str | None, target: str | None = None) -> str | None:
    """N: an absolute-form target's authority (RFC 9112 §3.2.2: a proxy or edge routes by it,
    whatever the Host says), else the request's host, else the SNI when it carries neither."""
    for value in (authority_of(target), host, sni):
        if value:
            try:
                return normalize(value)
            except HostError:
                return value.lower()
    return None


def owning_zone(world: World, name: str):
    """The zone whose domain holds `name` (longest suffix), whether or not the edge serves that host."""
    best = None
    for zone in world.zones:
        if (name == zone.name or name.endswith("." + zone.name)) and (best is None or len(zone.name) > len(best.name)):
            best = zone
    return best


def authorized_origins(world: World, name: str) -> set[str]:
    """Origins N's owner sends N to: its zone's, and a SaaS zone's for an ACTIVE custom hostname
    covering N (exact or wildcard) whose proof was not forged: a poisoned validator's "active"
    is the attacker's word, not the owner's."""
    origins = set()
    zone = owning_zone(world, name)
    if zone is not None:
        origins.add(zone.origin)
    wildcard = wildcard_of(name)
    for custom in (world.hostnames.get(name), world.hostnames.get(wildcard) if wildcard else None):
        if custom is not None and custom.status == "active" and not custom.poisoned_by:
            origins.add(world.zone_by_name[custom.zone].origin)
    return origins


def judge(world: World, name: str | None, *, reached_origin: str | None, cert_valid: bool,
          tls_failed: bool = False) -> tuple[str, str]:
    """(verdict, one-line reason)."""
    if tls_failed:
        return REFUSED, "the TLS handshake failed or the client rejected the certificate"
    if reached_origin is None:
        return REFUSED, "the edge answered itself; no origin was reached"
    if not cert_valid:
        return SAFE, (f"origin {reached_origin} answered, but the certificate is not valid for {name}: "
                      f"nothing is shown in {name}'s name")
    allowed = authorized_origins(world, name) if name else set()
    if reached_origin in allowed:
        return SAFE, f"origin {reached_origin} is authorized for {name}"
    owners = ", ".join(sorted(allowed)) or "no origin"
    return MISROUTED, (f"certificate valid for {name}, but origin {reached_origin} answered; "
                       f"{name} belongs to {owners}")


def worst(verdicts) -> str:
    return max(verdicts, key=lambda v: SEVERITY.get(v, -1), default=REFUSED)
