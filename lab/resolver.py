"""The lab resolver's answer: query bytes in, response bytes out. Pure: no socket, no clock.

`Zones.build` makes an immutable snapshot of what the resolver serves (the world's
records with admin edits, synthesised NS/SOA, the overrides); `Zones.answer(query,
client, now)` is the whole protocol decision for one packet. The caller owns the
sockets, the clock (`now` is only compared with override expiry times), the answer
cache and the events; `answer` returns what the event needs as `info`.

It answers A, AAAA, CNAME (chains followed inside the lab zones), TXT and synthesised
NS/SOA; NXDOMAIN inside a lab zone, REFUSED outside (it is not an open resolver), and
REFUSED for zone transfers (AXFR/IXFR: we serve none). Overrides force an answer for a
name+type, optionally for one client address and until some time: that is how the lab
poisons DNS.

Hostile input gets FORMERR when a full header could be read, nothing otherwise; no
input costs more than one bounded parse. A query names the request it serves with the
EDNS0 option TRACE_OPTION (local use, RFC 6891); a value outside TRACE_CHARS is ignored.
The lab's own queries (the hostname verifier's) carry MARK_OPTION too: `answer` hands its
value to the caller as `info["mark"]`, and the caller, which holds the secret, judges it.
"""
from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

from dnslib import AAAA, CNAME, NS, QTYPE, RCODE, RR, SOA, TXT, A, DNSHeader, DNSRecord, EDNS0

from lab.hostnorm import HostError, is_ip, normalize
from lab.topology import RECORD_TYPES, World

EDNS_SIZE = 1232        # our UDP payload limit (DNS flag day 2020): no IP fragmentation
MAX_QUERY = 4096        # no honest query is bigger; bounds the work a hostile one can cause
MAX_CHAIN = 8           # CNAME hops before we call it a loop
TRACE_OPTION = 65001    # EDNS0 option code (65001-65534: local use) carrying the lab's trace id
MARK_OPTION = 65002     # EDNS0 option carrying the lab's own mark: its value goes to the caller, never an event
TRACE_CHARS = re.compile(rb"[0-9a-zA-Z_-]{1,64}")

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
OPT, TKEY, TSIG, IXFR, AXFR, MAILB, MAILA = 41, 249, 250, 251, 252, 253, 254
_ZONE_TRANSFERS = frozenset((AXFR, IXFR))
_NOT_IMPLEMENTED = frozenset((OPT, TKEY, TSIG, MAILB, MAILA))  # meta and obsolete types (RFC 6895)
_ANY_TYPES = ("SOA", "NS", "A", "AAAA", "CNAME", "TXT")
_RDATA = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "NS": NS}
_WIRE_LABEL = re.compile(rb"[\x21-\x2d\x2f-\x7e]+")  # printable ASCII but the dot: what a lab name can hold


@dataclass(frozen=True)
class Override:
    id: str
    name: str
    type: str
    values: tuple[str, ...]          # as given; empty: the name has no record of this type (NODATA)
    client: str | None = None        # only this source address sees it
    expires_at: float | None = None  # wall-clock time; from then on it never applies
    ttl: int = 5
    created: float = 0.0

    def live(self, now: float) -> bool:
        return self.expires_at is None or now < self.expires_at

    def as_dict(self) -> dict:
        value = self.values[0] if len(self.values) == 1 else list(self.values) or None  # as given
        return {"id": self.id, "name": self.name, "type": self.type, "value": value, "values": list(self.values),
                "client": self.client, "expires": self.expires_at, "ttl": self.ttl, "created": self.created}


@dataclass(frozen=True)
class Zones:
    """What the resolver serves, as one immutable value. Build it with `Zones.build`."""
    zones: frozenset[str]
    data: Mapping[tuple[str, str], tuple]           # (name, type) -> ((value, ttl), ...), addresses resolved
    names: frozenset[str]                           # every name that exists, empty non-terminals included
    overrides: Mapping[tuple[str, str], tuple]      # (name, type) -> ((Override, ((address, ttl), ...)), ...) oldest first
    override_names: frozenset[str]
    valid_until: float = float("inf")               # earliest override expiry: answers may change from then on
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def build(cls, world: World, records: Mapping[tuple[str, str], tuple], overrides: tuple[Override, ...] = (),
              serial: int = 1) -> Zones:
        """`records`: (name, type) -> ((value, ttl), ...) as stored (listener:/origin: names allowed);
        `overrides` in creation order (among equals, the newest wins)."""
        zones = frozenset(world.dns_zones)
        warnings = []
        data: dict[tuple[str, str], tuple] = {}
        for (name, rtype), rrs in records.items():
            resolved = []
            for value, ttl in rrs:
                if rtype in ("A", "AAAA"):
                    value = world.address_of(value)
                    if not _is_address(value, rtype):
                        warnings.append(f"skipping {rtype} {name}: {value!r} is not an address in this world")
                        continue
                resolved.append((value, ttl))
            if resolved:
                data[(name, rtype)] = tuple(resolved)
        ns_type = "AAAA" if ":" in world.resolver.host else "A"
        for zone in world.dns_zones:
            ns = f"ns.{zone}"
            data.setdefault((zone, "NS"), ((ns, world.ttl),))
            data.setdefault((zone, "SOA"), (((ns, f"hostmaster.{zone}", serial, 3600, 600, 86400, world.ttl), world.ttl),))
            if not any((ns, t) in data for t in ("A", "AAAA", "CNAME")):
                data[(ns, ns_type)] = ((world.resolver.host, world.ttl),)
        names = set(world.dns_zones)
        for name, _ in data:
            zone = _zone_in(zones, name)
            while zone and name != zone and name not in names:  # empty non-terminals exist too
                names.add(name)
                name = name.partition(".")[2]
        by_key: dict[tuple[str, str], list] = {}
        for o in overrides:
            rrs = tuple((world.address_of(v), o.ttl) for v in o.values)
            by_key.setdefault((o.name, o.type), []).append((o, rrs))
        return cls(zones=zones, data=MappingProxyType(data), names=frozenset(names),
                   overrides=MappingProxyType({k: tuple(v) for k, v in by_key.items()}),
                   override_names=frozenset(name for name, _ in by_key),
                   valid_until=min((o.expires_at for o in overrides if o.expires_at is not None), default=float("inf")),
                   warnings=tuple(warnings))

    # ---- the answer ------------------------------------------------------------------

    def answer(self, query: bytes, client: str, now: float, tcp: bool = False) -> tuple[bytes | None, dict]:
        """The response to one query packet (None: send nothing) and what its event needs.

        info is either {"error": reason} (a `dns.error`; the response, if any, is a bare
        FORMERR/NOTIMP/SERVFAIL) or the `dns.answer` fields: name, type, rcode, answers,
        poisoned, override (the id of the first override used), trace, truncated when set,
        and mark (MARK_OPTION's bytes, not an event field) when sent. Never raises."""
        if len(query) < 12:
            return None, {"error": "truncated header"}
        _, flags, qd, an, ns, ar = struct.unpack_from("!6H", query)
        if flags & 0x8000:  # a response: answering it could start a loop between two servers
            return None, {"error": "not a query (QR set)"}
        opcode = (flags >> 11) & 0xF
        if opcode != 0:
            return _bare(query, NOTIMP), {"error": f"opcode {opcode} not implemented"}
        # Checked before parsing, so a thousand questions cost nothing.
        if len(query) > MAX_QUERY or qd != 1 or an or ns or ar > 1:
            return _bare(query, FORMERR), {"error": f"malformed query ({len(query)} bytes, counts {qd}/{an}/{ns}/{ar})"}
        try:
            req = DNSRecord.parse(query)
            labels = tuple(req.q.qname.label)
            if sum(len(l) + 1 for l in labels) + 1 > 255 or any(len(l) > 63 for l in labels):
                raise ValueError("name longer than RFC 1035 allows")
        except Exception as e:  # noqa: BLE001 - any parse failure of hostile bytes is a FORMERR
            return _bare(query, FORMERR), {"error": f"unparsable query: {type(e).__name__}: {str(e)[:100]}"}
        try:
            return self._respond(req, labels, client, now, tcp)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not stop the server
            return _bare(query, SERVFAIL), {"error": f"internal error: {type(e).__name__}: {e}", "exception": e}

    def _respond(self, req: DNSRecord, labels: tuple[bytes, ...], client: str, now: float, tcp: bool) -> tuple[bytes, dict]:
        q = req.q
        name = wire_name(labels)
        shown = name if name is not None else _presentation(labels)
        qtype = QTYPE.get(q.qtype, str(q.qtype))
        opt = next((r for r in req.ar if r.rtype == QTYPE.OPT), None)
        # UDP: 512 unless EDNS0 says more (RFC 6891), never more than ours
        limit = 65535 if tcp else min(max(opt.rclass, 512), EDNS_SIZE) if opt else 512
        used: list[Override] = []
        answer, auth, extra, aa, reason = [], [], [], True, None
        if opt is not None and (opt.ttl >> 16) & 0xFF:
            rcode, aa = BADVERS, False
        elif q.qclass != 1 or q.qtype in _ZONE_TRANSFERS:
            rcode, aa = REFUSED, False
        elif q.qtype in _NOT_IMPLEMENTED:
            rcode, aa = NOTIMP, False
        elif name is None:  # a label holding a dot is not two labels: no such name here
            zone = self._zone_of(_clean_suffix(labels))
            rcode, aa = (NXDOMAIN, True) if zone else (REFUSED, False)
            auth.extend(self._soa(zone) if zone else ())
        elif self._zone_of(name) is None:
            rcode, aa = REFUSED, False
        else:
            rcode, reason = self._resolve(name, qtype, client, now, used, answer, auth, extra)

        header = DNSHeader(id=req.header.id, qr=1, aa=int(aa), rd=req.header.rd, cd=req.header.cd,
                           opcode=req.header.opcode, rcode=rcode & 0xF)
        reply = DNSRecord(header, questions=[q], rr=[_rr(*r) for r in answer],
                          auth=[_rr(*r) for r in auth], ar=[_rr(*r) for r in extra])
        if opt is not None:
            reply.add_ar(EDNS0(udp_len=EDNS_SIZE, ext_rcode=rcode >> 4))
        wire = reply.pack()
        truncated = len(wire) > limit
        if truncated:  # RFC 2181 9: no partial RRsets; the client retries over TCP
            reply.rr, reply.auth, reply.ar = [], [], reply.ar[-1:] if opt is not None else []
            reply.header.tc = 1
            reply.set_header_qa()
            wire = reply.pack()
            answer = []
        wire = bytes(wire)  # dnslib packs into a bytearray
        info = {"name": shown, "type": qtype, "rcode": "BADVERS" if rcode == BADVERS else RCODE.get(rcode, str(rcode)),
                "answers": [_text(r[3]) for r in answer], "poisoned": bool(used),
                "override": used[0].id if used else None, "trace": _trace(opt)}
        if truncated:
            info["truncated"] = True
        mark = _option(opt, MARK_OPTION)
        if mark is not None:
            info["mark"] = mark
        if reason:
            info["reason"] = reason
        return wire, info

    def _resolve(self, name: str, qtype: str, client: str, now: float, used: list, answer: list, auth: list,
                 extra: list) -> tuple[int, str | None]:
        """Fill the sections for name/qtype (inside a lab zone); returns the rcode and why, if it failed."""
        seen = {name}
        while True:
            owner = self._find(name, client, now)
            if owner is None:
                auth.extend(self._soa(self._zone_of(name)))
                return NXDOMAIN, None
            if qtype == "ANY":  # RFC 8482 allows less; the lab has little data, so show it all
                for t in _ANY_TYPES:
                    rrs, ov = self._rrset(owner, t, client, now)
                    used.extend([ov] if ov else [])
                    answer.extend((name, t, ttl, v) for v, ttl in rrs or ())
                if not answer:
                    auth.extend(self._soa(self._zone_of(name)))
                return NOERROR, None
            rrs, ov = self._rrset(owner, qtype, client, now)
            if ov is None and qtype != "CNAME":
                crrs, cov = self._rrset(owner, "CNAME", client, now)
                # A CNAME override beats real data of any type; a real CNAME only
                # applies where the name has no data of the asked type.
                if crrs and (cov is not None or not rrs):
                    used.extend([cov] if cov else [])
                    target, ttl = crrs[0]
                    answer.append((name, "CNAME", ttl, target))
                    if target in seen or len(seen) > MAX_CHAIN:
                        return SERVFAIL, f"CNAME loop or chain longer than {MAX_CHAIN} at {name}"
                    if self._zone_of(target) is None:
                        return NOERROR, None  # leaves the lab: the client's resolver takes it from here
                    seen.add(target)
                    name = target
                    continue
            if ov is not None:
                used.append(ov)
            if not rrs:
                auth.extend(self._soa(self._zone_of(name)))
                return NOERROR, None
            answer.extend((name, qtype, ttl, v) for v, ttl in rrs)
            if qtype == "NS":  # glue: where the name servers are
                for target, _ in rrs:
                    for t in ("A", "AAAA"):
                        extra.extend((target, t, ttl, v) for v, ttl in self.data.get((target, t), ()))
            return NOERROR, None

    def override_for(self, name: str, rtype: str, client: str, now: float) -> tuple | None:
        """(Override, rrs) that answers name/rtype for client at now: a targeted one beats an untargeted one."""
        found = None
        for entry in self.overrides.get((name, rtype), ()):
            o = entry[0]
            if not o.live(now):
                continue
            if o.client == client:
                found = entry
            elif o.client is None and (found is None or found[0].client is None):
                found = entry
        return found

    def _rrset(self, owner: str, rtype: str, client: str, now: float) -> tuple[tuple | None, Override | None]:
        if (owner, rtype) in self.overrides:
            entry = self.override_for(owner, rtype, client, now)
            if entry is not None:
                return entry[1], entry[0]
        return self.data.get((owner, rtype)), None

    def _exists(self, name: str, client: str, now: float) -> bool:
        if name in self.names:
            return True
        return name in self.override_names and any(self.override_for(name, t, client, now) for t in RECORD_TYPES)

    def _find(self, name: str, client: str, now: float) -> str | None:
        """The owner whose data answers `name`: itself, a covering wildcard (RFC 4592), or None."""
        if self._exists(name, client, now):
            return name
        parent = name
        while "." in parent:
            parent = parent.partition(".")[2]
            if self._exists("*." + parent, client, now):
                return "*." + parent
            if parent in self.names:
                return None
        return None

    def _soa(self, zone: str | None) -> list[tuple]:
        return [(zone, "SOA", ttl, v) for v, ttl in self.data.get((zone, "SOA"), ())]

    def _zone_of(self, name: str) -> str | None:
        return _zone_in(self.zones, name)

    # ---- checks of admin input (records and overrides) --------------------------------

    def check_name(self, name: str) -> str:
        """A record or override owner: normalised, a name (not an address), inside a lab zone."""
        try:
            name = normalize(name, allow_wildcard=True)
        except HostError as e:
            raise ValueError(str(e)) from None
        if is_ip(name):
            raise ValueError(f"{name} is an address, not a name")
        if self._zone_of(name) is None:
            raise ValueError(f"{name} is outside the lab zones ({', '.join(sorted(self.zones))})")
        return name


def check_type(rtype: str) -> str:
    t = str(rtype).upper()
    if t not in RECORD_TYPES:
        raise ValueError(f"unsupported record type {rtype!r} (choose from {', '.join(RECORD_TYPES)})")
    return t


def check_ttl(ttl: int) -> int:
    if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 2**31 - 1:
        raise ValueError(f"bad TTL {ttl!r}")
    return ttl


def check_values(world: World, rtype: str, value) -> tuple[str, ...]:
    """One value or a list (an RRset), None/[] for none; A/AAAA may name a listener:/origin:."""
    values = () if value is None else (value,) if isinstance(value, str) else tuple(value)
    out = []
    for v in values:
        if not isinstance(v, str):
            raise ValueError(f"{rtype} value must be a string, got {v!r}")
        if rtype in ("A", "AAAA"):
            if not _is_address(world.address_of(v), rtype):
                raise ValueError(f"not an {rtype} address or known listener:/origin: name: {v!r}")
        elif rtype == "CNAME":
            try:
                v = normalize(v)
            except HostError as e:
                raise ValueError(f"CNAME target: {e}") from None
        elif len(v.encode()) > 4000:
            raise ValueError("TXT value longer than 4000 bytes")
        out.append(v)
    if rtype == "CNAME" and len(out) > 1:
        raise ValueError("a name has at most one CNAME")
    return tuple(out)


def world_records(world: World) -> dict[tuple[str, str], tuple]:
    """The world file's records as `Zones.build` takes them: (name, type) -> ((value, ttl), ...)."""
    data: dict[tuple[str, str], tuple] = {}
    for r in world.records:
        data[(r.name, r.type)] = data.get((r.name, r.type), ()) + ((r.value, r.ttl),)
    return data


# ---- names on the wire ---------------------------------------------------------------

def wire_name(labels: tuple[bytes, ...]) -> str | None:
    """The name the wire labels spell, as the lab spells names (lower case, dotted, no
    trailing dot), or None when a label holds a byte no lab name can: a dot above all,
    since `a.b` as one label is not the two labels a, b. DNS case is ASCII-only."""
    for label in labels:
        if not _WIRE_LABEL.fullmatch(label):
            return None
    return b".".join(labels).lower().decode("ascii")


def _clean_suffix(labels: tuple[bytes, ...]) -> str:
    """The longest tail of labels that wire_name accepts: where a name that is not one sits."""
    tail: list[bytes] = []
    for label in reversed(labels):
        if not _WIRE_LABEL.fullmatch(label):
            break
        tail.insert(0, label)
    return wire_name(tuple(tail)) or ""


def _presentation(labels: tuple[bytes, ...]) -> str:
    """Master-file form (RFC 1035 5.1) for events: `a\\.b.victim.example`, `\\000` for odd bytes."""
    def esc(b: int) -> str:
        c = chr(b)
        return "\\" + c if c in '.\\"();@$' else c if 0x21 <= b <= 0x7e else f"\\{b:03d}"
    return ".".join("".join(esc(b) for b in label) for label in labels)


def _zone_in(zones: frozenset[str], name: str) -> str | None:
    while True:
        if name in zones:
            return name
        if "." not in name:
            return None
        name = name.partition(".")[2]


def _trace(opt: RR | None) -> str | None:
    """The trace id of the query's TRACE_OPTION; None when absent, repeated or not TRACE_CHARS."""
    found = _option(opt, TRACE_OPTION)
    if found is None or not TRACE_CHARS.fullmatch(found):
        return None
    return found.decode("ascii")


def _option(opt: RR | None, code: int) -> bytes | None:
    """The value of the query's EDNS0 option `code`; None when absent or repeated."""
    if opt is None:
        return None
    found = [o.data for o in opt.rdata if o.code == code]
    return bytes(found[0]) if len(found) == 1 else None


def _bare(query: bytes, rcode: int) -> bytes:
    """A header-only response carrying the query's ID, opcode and RD."""
    flags = struct.unpack_from("!H", query, 2)[0]
    return query[:2] + struct.pack("!5H", 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


def _is_address(value: str, rtype: str) -> bool:
    try:
        return ipaddress.ip_address(value).version == (4 if rtype == "A" else 6)
    except ValueError:
        return False


def _rr(owner: str, rtype: str, ttl: int, value) -> RR:
    if rtype == "TXT":
        raw = value.encode()
        rdata = TXT([raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""])
    elif rtype == "SOA":
        rdata = SOA(value[0], value[1], value[2:])
    else:
        rdata = _RDATA[rtype](value)
    return RR(owner, getattr(QTYPE, rtype), ttl=ttl, rdata=rdata)


def _text(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else value
