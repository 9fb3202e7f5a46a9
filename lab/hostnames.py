"""The life of a custom hostname of a SaaS zone (docs/design.md, "Glossary").

    pending --(ownership proven + DNS points at the zone's target)--> active
    active  --(DNS no longer points at the target, N answers in a row)--> moved
    moved   --(points again + ownership proven again)---------------> active
    any     --(delete)----------------------------------------------> deleted (terminal)
    (new)   --(the name is on the provider's block list)--------------> blocked (only delete leaves it)

v1 routed a registration as soon as it existed, which is the whole flaw: anyone could
claim www.victim.example. v2 routes only `active` hostnames, and `active` needs proof of
control that a mere tenant of the SaaS cannot forge: a token in the name's own DNS
(TXT) or on its own web server (HTTP). Pointing DNS at the target is not proof — a
poisoned resolver makes any name point anywhere.

When the verifier asks next is decided here too (`next_check`): a pending or moved hostname
on Cloudflare's schedule of growing intervals, an active one about once a day, sooner while
its DNS answers negatively. A lookup that got no answer (resolver unreachable, timeout,
SERVFAIL) is not evidence: the hostname keeps its state, records the error and is asked
again later, with backoff.
An active hostname is moved only after `moved_after` real negative answers in a row,
the first and the last at least `moved_span` seconds apart, so one bad minute of DNS
(or a client flooding the lab until its lookups fail) never de-activates a customer. An
explicit "verify now" by the operator passes `CONCLUSIVE`: one real answer decides.

Evidence is only as good as where it was gathered: `agree` folds what several vantage
points saw into one round, and anything they disagree on is no evidence at all (a poisoned
path to one of them must neither activate nor move a name). A wildcard registration
(`*.customer.example`) is proven at its base name, by TXT only, as CAs require for wildcards.

Pure: no I/O, no clock, no randomness. The control plane passes in time, ids and tokens,
and the verifier (I/O) condenses what it saw into `Evidence`.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

from lab import hostnorm, topology
from lab.hostnorm import HostError, is_ip, normalize

TXT_PREFIX = "_sni-lab-custom-hostname"
HTTP_PREFIX = "/.well-known/sni-lab-custom-hostname-challenge/"
STATUSES = topology.HOSTNAME_STATUSES
# `ownership` of a hostname declared active in the world file: no proof was ever run.
OWNERSHIP_WORLD = "world"


@dataclass(frozen=True)
class Recheck:
    """How much negative evidence moves an active hostname, when the verifier asks again, and
    how failed lookups back off."""
    moved_after: int = 3        # real negative answers in a row...
    moved_span: float = 600.0   # ...the first and the last at least this many seconds apart
    retry: float = 10.0         # first retry after a failed lookup; doubles with each failure in a row
    retry_max: float = 600.0
    pending_max: float = 14400.0   # the longest wait of a pending or moved hostname (Cloudflare: 4 h)
    active_every: float = 86400.0  # an active hostname whose DNS points at the target: about this often

    @classmethod
    def of(cls, limits: topology.Limits, retry: float) -> "Recheck":
        return cls(limits.verify_moved_after, limits.verify_moved_span, retry, limits.verify_retry_max,
                   limits.verify_pending_max, limits.verify_active_every)

    def conclusive(self) -> "Recheck":
        """The operator's "verify now": one real answer decides."""
        return dataclasses.replace(self, moved_after=1, moved_span=0.0)

    def backoff(self, failures: int) -> float:
        return min(self.retry_max, self.retry * 2 ** min(failures - 1, 32))

    def pending(self, checks: int) -> float:
        """The wait after `checks` real answers to a pending or moved hostname: Cloudflare's
        custom hostname backoff, 60 s growing 5% a check for the first 10, then 15%, capped."""
        growth = 1.05 if checks < 10 else 1.15
        return min(self.pending_max, math.floor(60 * growth ** min(checks, 200)))


# Cloudflare spreads 75 checks of a pending hostname over 7 days, then deletes it. The lab
# keeps checking at the cap instead: a registration stays what its user made it.
PENDING_FIRST = Recheck().pending(0)
CONCLUSIVE = Recheck().conclusive()


class HostnameError(ValueError):
    """A user mistake (bad name, unknown zone, duplicate...): `str()` is the one line to show."""


def txt_name(hostname: str) -> str:
    return f"{TXT_PREFIX}.{base_name(hostname)}"


def base_name(hostname: str) -> str:
    """The name DNS is asked about: a wildcard registration's base (`*.x` -> `x`)."""
    return hostname.removeprefix("*.")


def http_path(record: "Hostname | str") -> str:
    """The challenge path; by id (not name) so a re-registration gets a fresh path."""
    return HTTP_PREFIX + (record if isinstance(record, str) else record.id)


@dataclass(frozen=True)
class Hostname:
    id: str
    name: str
    zone: str
    status: str
    txt_token: str
    http_token: str
    reason: str
    created: float
    updated: float
    ownership: str | None = None  # "txt" | "http" once proven ("world" when seeded active)
    # The lab's knowledge, never the provider's: overrides that answered the round that made it
    # active (its proof was forged). Recorded for the oracle; verify() never reads it.
    poisoned_by: str | None = None
    # The verifier's bookkeeping: failed lookups in a row, the last one's error and when to
    # ask again; real negative answers in a row for an active hostname, since when.
    failures: int = 0
    last_error: str | None = None
    next_check: float | None = None  # when the verifier asks next (None: never, or at its next round)
    negatives: int = 0
    negative_since: float | None = None
    checks: int = 0  # real answers since its status began: the step of the pending schedule

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in _FIELDS}  # every field is a str, number or None
        d["txt_name"] = txt_name(self.name)
        d["http_path"] = http_path(self)
        d["routable"] = routable(self)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Hostname":
        """Inverse of `to_dict` (derived keys are ignored)."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def as_custom_hostname(self) -> topology.CustomHostname:
        return topology.CustomHostname(self.name, self.zone, self.status, self.poisoned_by)


_FIELDS = tuple(f.name for f in dataclasses.fields(Hostname))


@dataclass(frozen=True)
class Evidence:
    """What the verifier found, once, for one hostname.

    Trust note for the verifier: the evidence is only as good as where it was fetched
    from. One lookup from one address is what a targeted poisoning fools (validation
    `single`); `multi` asks from several vantage points that must agree (`agree`), and never
    fetches an HTTP token through the edge itself (a name poisoned to the SaaS address would
    reach the SaaS origin, where the attacker is a tenant).
    """
    txt: tuple[str, ...]      # TXT strings at txt_name(hostname); () if none / NXDOMAIN
    http: str | None          # body served at http_path; None when unreachable / not 200
    points_to_target: bool    # resolves (CNAME chain or same addresses) to the zone's cname_target
    dns: str                  # short description for reasons: "CNAME customers.saas.example", "NXDOMAIN"
    error: str | None = None  # a lookup got no real answer (unreachable, timeout, SERVFAIL): not evidence
    http_refused: str | None = None  # why no HTTP token was fetched at all (the validation's rule)
    poisoned: tuple[str, ...] = ()   # overrides that answered these lookups (the lab's knowledge)


def agree(seen: "dict[str, Evidence]") -> Evidence:
    """One round from what several vantage points (by source address) saw: what they all
    agree on, else no evidence (`error` says who saw what)."""
    views = list(seen.values())
    first = views[0]
    poisoned = tuple(dict.fromkeys(p for v in views for p in v.poisoned))
    errors = [f"{src}: {v.error}" for src, v in seen.items() if v.error]
    if errors:
        return dataclasses.replace(first, error="; ".join(errors), poisoned=poisoned)
    differ = [what for what, key in (("TXT", lambda v: sorted(set(v.txt))), ("HTTP token", lambda v: v.http),
                                     ("DNS target", lambda v: v.points_to_target))
              if len({repr(key(v)) for v in views}) > 1]
    if differ:
        told = "; ".join(f"{src}: {_show(v.dns, 60, quote=False)}, TXT {len(v.txt)} string(s)"
                         for src, v in seen.items())
        return dataclasses.replace(first, poisoned=poisoned, error=(
            f"not evidence: the vantage points disagree on {', '.join(differ)} ({told})"))
    return dataclasses.replace(first, poisoned=poisoned)


@dataclass(frozen=True)
class Transition:
    hostname: str
    zone: str
    old: str
    new: str
    reason: str


def create(name: str, zone: str, *, world: topology.World, existing: Iterable[Hostname], id: str,
           txt_token: str, http_token: str, now: float) -> Hostname:
    """A new registration: always `pending`, whoever asks and whatever DNS says today.
    `world.hostnames` holds the live registrations; `existing` what it does not (deleted ones,
    the earlier items of one list), and is authoritative for the names it has."""
    if not id or not txt_token or not http_token:
        # An empty token would be "found" in an empty TXT string or an empty HTTP body.
        raise ValueError("create() needs a non-empty id, txt_token and http_token")
    host = name_of(name)
    z = _saas_zone(zone, world)
    if not any(host.endswith("." + tld) for tld in world.tlds):
        # The lab CA is name-constrained to these: it could never issue this name's certificate.
        raise HostnameError(f"{host} is outside the lab's TLDs ({', '.join('.' + t for t in world.tlds)})")
    if host in z.hosts or host == z.cname_target:
        raise HostnameError(f"{host} is already a name of zone {z.name}, not a custom hostname")
    existing = list(existing)
    if any(e.id == id for e in existing):
        raise ValueError(f"hostname id {id!r} is already used")
    # `existing` (the control plane's state) is authoritative for every name it knows,
    # deleted ones included; the world's declaration counts only for a name it does not know.
    claims = [(e.zone, e.status) for e in existing if e.name == host]
    declared = world.hostnames.get(host)
    if declared is not None and not claims:
        claims.append((declared.zone, declared.status))
    for other_zone, status in claims:
        if status != "deleted":
            raise HostnameError(f"{host} is already registered as a custom hostname of {other_zone} ({status})")
    if world.blocked(host):
        return Hostname(id, host, z.name, "blocked", txt_token, http_token,
                        f"{host} is on the provider's block list: never verified, never routed", now, now)
    http = "" if host.startswith("*.") else f" or serve {http_token} at {http_path(id)}"
    reason = f"add TXT {txt_name(host)} = {txt_token}{http}; point {host} at {z.cname_target}"
    return Hostname(id, host, z.name, "pending", txt_token, http_token, reason, now, now,
                    next_check=now + PENDING_FIRST)


def from_world(c: topology.CustomHostname, *, id: str, txt_token: str, http_token: str, now: float,
               source: str = "the world file") -> Hostname:
    """Adopt a hostname the world file declares (the seed), e.g. on the first start with empty state."""
    ownership = OWNERSHIP_WORLD if c.status == "active" else None
    h = Hostname(id, c.name, c.zone, c.status, txt_token, http_token, f"declared {c.status} in {source}", now, now,
                 ownership)
    return dataclasses.replace(h, next_check=next_check(h, now))


def verify(h: Hostname, ev: Evidence, *, target: str, now: float,
           recheck: Recheck = Recheck()) -> tuple[Hostname, Transition | None]:
    """Apply one round of evidence, and say when to ask next. Returns `h` itself when there
    was nothing to do (deleted, blocked: nothing to save)."""
    if h.status in ("deleted", "blocked"):
        return h, None
    if ev.error is not None:
        failures = h.failures + 1
        return dataclasses.replace(h, failures=failures, last_error=_show(ev.error, 200, quote=False),
                                   next_check=now + recheck.backoff(failures)), None
    if h.failures or h.last_error is not None:
        h = dataclasses.replace(h, failures=0, last_error=None)
    new, transition = _decide(h, ev, target=target, now=now, recheck=recheck)
    new = dataclasses.replace(new, checks=0 if transition else h.checks + 1)
    return dataclasses.replace(new, next_check=next_check(new, now, recheck)), transition


def next_check(h: Hostname, now: float, recheck: Recheck = Recheck()) -> float | None:
    """When the verifier asks about `h` again, after a real answer at `now` (None: never).

    Pending and moved: `Recheck.pending`, by the answers since the status began. Active: about
    `active_every` (spread by the id, so hostnames activated together are not all due
    together); while DNS answers negatively, often enough that `moved_after` answers span
    `moved_span`."""
    if h.status in ("deleted", "blocked"):
        return None
    if h.status != "active":
        return now + recheck.pending(h.checks)
    if h.negatives:
        return now + max(PENDING_FIRST, recheck.moved_span / max(1, recheck.moved_after - 1))
    spread = zlib.crc32(h.id.encode()) / 2 ** 32  # the same id, the same place in the day
    return now + recheck.active_every * (0.9 + 0.2 * spread)


def _decide(h: Hostname, ev: Evidence, *, target: str, now: float,
            recheck: Recheck) -> tuple[Hostname, Transition | None]:
    """What a real answer means for `h`'s status (never called with an error or a terminal status)."""
    via = _ownership(h, ev)
    dns = _show(ev.dns, 80, quote=False)
    if h.status == "pending":
        if via and ev.points_to_target:
            return _move(h, "active", f"ownership proven by {via.upper()}; {h.name} points at {target} ({dns})",
                         now, ownership=via, poisoned_by=",".join(ev.poisoned) or None)
        if via:
            return _note(h, f"ownership proven by {via.upper()}; {h.name} does not point at {target} yet ({dns})",
                         now), None
        return _note(h, _not_owned(h, ev) + f"; {h.name}: {dns}", now), None
    if h.status == "active":
        # Ownership is not re-checked: removing the TXT after activation is normal. DNS is.
        if ev.points_to_target:
            if h.negatives:
                return dataclasses.replace(h, negatives=0, negative_since=None, updated=now,
                                           reason=f"{h.name} points at {target} again ({dns})"), None
            return h, None
        negatives, since = h.negatives + 1, h.negative_since if h.negatives else now
        if negatives >= recheck.moved_after and now - since >= recheck.moved_span:
            return _move(h, "moved", f"DNS no longer points at {target} ({dns})", now, negatives=0,
                         negative_since=None)
        return dataclasses.replace(
            h, negatives=negatives, negative_since=since, updated=now,
            reason=f"DNS does not point at {target} ({dns}): answer {negatives} in a row; moved after "
                   f"{recheck.moved_after} over at least {recheck.moved_span:g} s"), None
    # moved: the name left us, so coming back needs fresh proof (it may have changed hands).
    if not ev.points_to_target:
        return _note(h, f"DNS still does not point at {target} ({dns})", now), None
    if via:
        return _move(h, "active", f"{h.name} points at {target} again ({dns}); ownership proven by {via.upper()}",
                     now, ownership=via, poisoned_by=",".join(ev.poisoned) or None)
    return _note(h, f"{h.name} points at {target} again ({dns}) but " + _not_owned(h, ev), now), None


def delete(h: Hostname, *, now: float) -> tuple[Hostname, Transition]:
    if h.status == "deleted":
        raise HostnameError(f"{h.name} is already deleted")
    return _move(h, "deleted", f"deleted (was {h.status})", now, next_check=None)


def served_by_edge(world: topology.World, h: Hostname) -> bool:
    """Is `h`'s name already on the edge (a zone's own host, or another active registration)?
    Then an HTTP token would be fetched through the edge itself: DNS proof only."""
    name = base_name(h.name)
    wildcard = hostnorm.wildcard_of(name)
    registered = world.hostnames.get(h.name)
    return (name in world.zone_by_host or (wildcard is not None and wildcard in world.zone_by_host)
            or (registered is not None and registered.status == "active"))


def routable(h: Hostname) -> bool:
    return h.status == "active"


# -- helpers -------------------------------------------------------------------------


def name_of(name: str) -> str:
    """The name a registration of `name` has (normalised), or HostnameError saying why none."""
    if not isinstance(name, str):
        raise HostnameError(f"expected a host name, got {name!r}")
    try:
        host = normalize(name, allow_wildcard=True)
    except HostError as e:
        raise HostnameError(str(e)) from None
    if is_ip(host):
        raise HostnameError(f"{host} is an IP address, not a host name")
    if "." not in base_name(host):
        raise HostnameError(f"{host} is not a fully qualified name")
    if "_" in host:
        # Not a valid host name for a certificate, and keeps the TXT_PREFIX namespace ours.
        raise HostnameError(f"{host}: underscores are not allowed in a host name")
    if len(txt_name(host)) > 253:
        raise HostnameError(f"{host} is too long for its TXT record name {TXT_PREFIX}.<name>")
    return host


def _saas_zone(zone: str, world: topology.World) -> topology.Zone:
    try:
        z = world.zone_by_name.get(normalize(zone)) if isinstance(zone, str) else None
    except HostError:
        z = None
    if z is None:
        raise HostnameError(f"unknown zone {zone!r}")
    if not z.saas:
        raise HostnameError(f"zone {z.name} is not a SaaS zone; only a SaaS zone has custom hostnames")
    if not z.cname_target:
        raise HostnameError(f"SaaS zone {z.name} has no cname_target to point custom hostnames at")
    return z


def _ownership(h: Hostname, ev: Evidence) -> str | None:
    # Exact matches only, and never an empty token (create() refuses them; seeds could not).
    if h.txt_token and h.txt_token in ev.txt:
        return "txt"
    if h.http_token and ev.http is not None and ev.http.strip() == h.http_token and not h.name.startswith("*."):
        return "http"
    return None


def _not_owned(h: Hostname, ev: Evidence) -> str:
    found_txt = ", ".join(_show(t) for t in ev.txt[:3]) + (f" (+{len(ev.txt) - 3} more)" if len(ev.txt) > 3 else "")
    found_http = "nothing" if ev.http is None else _show(ev.http)
    http = (f"HTTP proof not accepted: {ev.http_refused}" if ev.http_refused
            else f"looked for {h.http_token} at {http_path(h)}, found {found_http}")
    return (f"ownership not proven: looked for TXT {txt_name(h.name)} = {h.txt_token}, found {found_txt or 'none'}; "
            + http)


def _show(s: str, limit: int = 40, quote: bool = True) -> str:
    """Evidence is written by whoever controls the name: keep reasons one short printable line."""
    s = "".join(c if c.isprintable() else "?" for c in str(s).strip())
    s = s[:limit] + "..." if len(s) > limit else s
    return f'"{s}"' if quote else s


def _note(h: Hostname, reason: str, now: float) -> Hostname:
    return h if reason == h.reason else dataclasses.replace(h, reason=reason, updated=now)


def _move(h: Hostname, new: str, reason: str, now: float, **changes: Any) -> tuple[Hostname, Transition]:
    moved = dataclasses.replace(h, status=new, reason=reason, updated=now, **changes)
    return moved, Transition(h.name, h.zone, h.status, new, reason)
