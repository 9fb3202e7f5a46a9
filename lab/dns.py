"""The lab resolver: an asyncio DNS server, authoritative for the world's lab zones.

It answers A, AAAA, CNAME (chains followed inside the lab zones), TXT and synthesised
NS/SOA; NXDOMAIN inside a lab zone, REFUSED outside (it is not an open resolver).
Overrides force an answer for a name+type, optionally for one client address and
until some time: that is how the lab poisons DNS.

Speed: a query is answered from a dict keyed by its bytes after the 2-byte ID and the
client address (targeted overrides make answers differ per client, and the event
names the client), holding the answer in wire form and the event fields; only a miss
is parsed with dnslib. Any change of records, overrides or world clears that cache,
so a cached answer is never stale.

Hostile input gets FORMERR when a full header could be read, is dropped otherwise,
and is reported as a rate-limited `dns.error`; no input costs more than one bounded
parse, and TCP clients are bounded in number, size and idle time.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import itertools
import json
import logging
import math
import socket
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from dnslib import AAAA, CNAME, NS, QTYPE, RCODE, RR, SOA, TXT, A, DNSHeader, DNSLabel, DNSRecord, EDNS0

from lab.binding import bind_error
from lab.events import Events
from lab.hostnorm import HostError, is_ip, normalize
from lab.topology import RECORD_TYPES, World

log = logging.getLogger("lab.dns")

EDNS_SIZE = 1232        # our UDP payload limit (DNS flag day 2020): no IP fragmentation
MAX_QUERY = 4096        # no honest query is bigger; bounds the work a hostile one can cause
MAX_CHAIN = 8           # CNAME hops before we call it a loop
CACHE_MAX = 4096        # answers per transport; the cache is cleared when full
CACHEABLE = 512         # longer queries are answered but not remembered

NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
BADVERS = 16
_ANY_TYPES = ("SOA", "NS", "A", "AAAA", "CNAME", "TXT")
_RDATA = {"A": A, "AAAA": AAAA, "CNAME": CNAME, "NS": NS}


@dataclass(frozen=True)
class Override:
    id: str
    name: str
    type: str
    values: tuple[str, ...]          # empty: the name has no record of this type (NODATA)
    client: str | None = None        # only this source address sees it
    expires: float | None = None     # wall-clock time.time()
    ttl: int = 5
    created: float = 0.0

    def as_dict(self) -> dict:
        value = self.values[0] if len(self.values) == 1 else list(self.values) or None  # as given
        return {"id": self.id, "name": self.name, "type": self.type, "value": value, "values": list(self.values),
                "client": self.client, "expires": self.expires, "ttl": self.ttl, "created": self.created}


class _Limiter:
    """Token bucket: lets `burst` through at once, then `rate` per second; counts the rest."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp, self.suppressed = float(burst), time.monotonic(), 0

    def allow(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


class Resolver:
    """The lab resolver: `await start()`, then change what it says with set_record,
    delete_record, set_override, remove_override and update_world at any time."""

    # Tunables, per instance (tests shorten the timeout).
    tcp_idle_timeout = 10.0
    max_tcp_clients = 128

    def __init__(self, world: World, events: Events | None = None) -> None:
        self.events = events if events is not None else Events()
        self.world = world
        self._edits: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {}  # admin layer over the world; () = deleted
        self._overrides: dict[str, Override] = {}
        self._ids = itertools.count(1)
        self._serial = int(time.time()) & 0xFFFFFFFF
        self._udp_cache: dict = {}
        self._tcp_cache: dict = {}
        self._event_limit = _Limiter(rate=50, burst=200)
        self._log_limit = _Limiter(rate=2, burst=10)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tcp_tasks: set[asyncio.Task] = set()
        self.address: tuple[str, int] | None = None
        self._rebuild()
        self._reindex()

    # ---- zone data ----------------------------------------------------------------

    def update_world(self, world: World) -> None:
        """Serve a new world snapshot; admin edits and overrides stay. Does not rebind."""
        self.world = world
        self._rebuild()

    def set_record(self, name: str, rtype: str, value: str | list[str], ttl: int | None = None) -> None:
        """Replace the records of name+type with `value` (one value or a list: an RRset).

        A name holds a CNAME or other data, never both (RFC 1034 3.6.2): setting one
        removes the other. `listener:NAME`/`origin:NAME` follow the world."""
        name, rtype = self._check_name(name), self._check_type(rtype)
        values = self._check_values(rtype, value)
        if not values:
            raise ValueError(f"{rtype} record for {name}: no value (use delete_record)")
        ttl = self._check_ttl(self.world.ttl if ttl is None else ttl)
        for other in RECORD_TYPES:
            if (other == "CNAME") != (rtype == "CNAME") and self._effective(name, other):
                self._edits[(name, other)] = ()
        self._edits[(name, rtype)] = tuple((v, ttl) for v in values)
        self._serial = (self._serial + 1) & 0xFFFFFFFF
        self._rebuild()

    def delete_record(self, name: str, rtype: str | None = None) -> int:
        """Delete the records of name (of one type, or all); returns how many went."""
        name = self._check_name(name)
        types = (self._check_type(rtype),) if rtype else RECORD_TYPES
        count = 0
        for t in types:
            count += len(self._effective(name, t))
            self._edits[(name, t)] = ()
        if count:
            self._serial = (self._serial + 1) & 0xFFFFFFFF
            self._rebuild()
        return count

    def records(self) -> list[dict]:
        """The zone data as served (world records with admin edits), before overrides."""
        return [{"name": n, "type": t, "value": v, "ttl": ttl}
                for (n, t), rrs in sorted(self._merged().items()) for v, ttl in rrs]

    def _effective(self, name: str, rtype: str) -> tuple:
        return self._merged().get((name, rtype), ())

    def _merged(self) -> dict[tuple[str, str], tuple[tuple[str, int], ...]]:
        data: dict[tuple[str, str], tuple] = {}
        for r in self.world.records:
            data[(r.name, r.type)] = data.get((r.name, r.type), ()) + ((r.value, r.ttl),)
        data.update(self._edits)
        return {k: v for k, v in data.items() if v}

    def _rebuild(self) -> None:
        """Recompute what is served: resolved addresses, synthesised NS/SOA, existing names."""
        w = self.world
        self._zones = frozenset(w.dns_zones)
        data: dict[tuple[str, str], tuple] = {}
        for (name, rtype), rrs in self._merged().items():
            resolved = []
            for value, ttl in rrs:
                if rtype in ("A", "AAAA"):
                    value = w.address_of(value)
                    if not _is_address(value, rtype):
                        self._log(f"skipping {rtype} {name}: {value!r} is not an address in this world")
                        continue
                resolved.append((value, ttl))
            if resolved:
                data[(name, rtype)] = tuple(resolved)
        ns_type = "AAAA" if ":" in w.resolver.host else "A"
        for zone in w.dns_zones:
            ns = f"ns.{zone}"
            data.setdefault((zone, "NS"), ((ns, w.ttl),))
            data.setdefault((zone, "SOA"), (((ns, f"hostmaster.{zone}", self._serial, 3600, 600, 86400, w.ttl), w.ttl),))
            if not any((ns, t) in data for t in ("A", "AAAA", "CNAME")):
                data[(ns, ns_type)] = ((w.resolver.host, w.ttl),)
        names = set(w.dns_zones)
        for name, _ in data:
            zone = self._zone_of(name)
            while zone and name != zone and name not in names:  # empty non-terminals exist too
                names.add(name)
                name = name.partition(".")[2]
        self._data, self._names = data, names
        self._clear_cache()

    # ---- overrides ----------------------------------------------------------------

    def set_override(self, name: str, rtype: str, value: str | list[str] | None, client: str | None = None,
                     expires: float | None = None, ttl: int = 5) -> str:
        """Force the answer for name+type (poisoning); returns the override id.

        `value` may be a list (an RRset) or None/[] (the type has no data). `client`
        limits it to one source address. `expires` is seconds from now (> 0), or an
        absolute time.time() when larger than 1e9; an absolute time already past makes
        an override that never applies (so restoring saved state cannot race its expiry)."""
        name, rtype = self._check_name(name), self._check_type(rtype)
        values = self._check_values(rtype, value)
        if client is not None:
            try:
                client = str(ipaddress.ip_address(client))
            except ValueError:
                raise ValueError(f"override client: not an IP address: {client!r}") from None
        now = time.time()
        if expires is not None:
            if not expires > 0:  # also refuses NaN
                raise ValueError(f"override expiry: expected seconds from now (> 0) or a time.time(), got {expires!r}")
            expires = float(expires) if expires > 1e9 else now + float(expires)
        ov = Override(f"ovr-{next(self._ids)}", name, rtype, values, client, expires, self._check_ttl(ttl), now)
        self._overrides[ov.id] = ov
        self._reindex()
        return ov.id

    def remove_override(self, override_id_or_name: str) -> int:
        """Remove one override by id, or every override of a name; returns how many went."""
        key = override_id_or_name
        if key in self._overrides:
            gone = [key]
        else:
            try:
                name = normalize(key, allow_wildcard=True)
            except HostError:
                return 0
            gone = [o.id for o in self._overrides.values() if o.name == name]
        for oid in gone:
            del self._overrides[oid]
        if gone:
            self._reindex()
        return len(gone)

    def overrides(self) -> list[dict]:
        self._expire(time.time())
        return [o.as_dict() for o in self._overrides.values()]

    def _reindex(self) -> None:
        by_key: dict[tuple[str, str], list[Override]] = {}
        for o in self._overrides.values():  # creation order: the newest wins
            by_key.setdefault((o.name, o.type), []).append(o)
        self._ov = by_key
        self._ov_names = {name for name, _ in by_key}
        self._valid_until = min((o.expires for o in self._overrides.values() if o.expires), default=math.inf)
        self._expiring = self._valid_until != math.inf  # spares the hot path a clock read
        self._clear_cache()

    def _expire(self, now: float) -> None:
        gone = [oid for oid, o in self._overrides.items() if o.expires is not None and o.expires <= now]
        for oid in gone:
            del self._overrides[oid]
        if gone:
            self._reindex()

    def _override_for(self, name: str, rtype: str, client: str) -> Override | None:
        found = None
        for o in self._ov.get((name, rtype), ()):
            if o.client == client:
                found = o
            elif o.client is None and (found is None or found.client is None):
                found = o
        return found

    # ---- answering ----------------------------------------------------------------

    def _clear_cache(self) -> None:
        self._udp_cache.clear()
        self._tcp_cache.clear()

    def answer(self, data: bytes, client: str, transport: str = "udp") -> bytes | None:
        """The response to one query packet (None: drop it). Never raises."""
        if self._valid_until <= time.time():
            self._expire(time.time())
        cache = self._udp_cache if transport == "udp" else self._tcp_cache
        hit = cache.get((data[2:], client))
        if hit is not None:
            self.events.emit("dns.answer", None, **hit[1])
            return data[:2] + hit[0]
        return self._miss(data, client, transport, cache)

    def _miss(self, data: bytes, client: str, transport: str, cache: dict) -> bytes | None:
        if len(data) < 12:
            self._error("truncated header", data, client, transport)
            return None
        _, flags, qd, an, ns, ar = struct.unpack_from("!6H", data)
        if flags & 0x8000:  # a response: answering it could start a loop between two servers
            self._error("not a query (QR set)", data, client, transport)
            return None
        opcode = (flags >> 11) & 0xF
        if opcode != 0:
            self._error(f"opcode {opcode} not implemented", data, client, transport)
            return _bare(data, NOTIMP)
        # Checked before parsing, so a thousand questions cost nothing.
        if len(data) > MAX_QUERY or qd != 1 or an or ns or ar > 1:
            self._error(f"malformed query ({len(data)} bytes, counts {qd}/{an}/{ns}/{ar})", data, client, transport)
            return _bare(data, FORMERR)
        try:
            req = DNSRecord.parse(data)
            qname = str(req.q.qname)
            labels = req.q.qname.label
            if sum(len(l) + 1 for l in labels) + 1 > 255 or any(len(l) > 63 for l in labels):
                raise ValueError("name longer than RFC 1035 allows")
        except Exception as e:  # noqa: BLE001 - any parse failure of hostile bytes is a FORMERR
            self._error(f"unparsable query: {type(e).__name__}: {str(e)[:100]}", data, client, transport)
            return _bare(data, FORMERR)
        try:
            wire, fields = self._respond(req, qname, client, transport)
        except Exception as e:  # noqa: BLE001 - a bug of ours must not stop the server
            log.exception("internal error answering %s", qname)
            self._error(f"internal error: {type(e).__name__}: {e}", data, client, transport)
            return _bare(data, SERVFAIL)
        if len(data) <= CACHEABLE:
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[(data[2:], client)] = (wire[2:], fields)
        self.events.emit("dns.answer", None, **fields)
        return wire

    def _respond(self, req: DNSRecord, qname: str, client: str, transport: str) -> tuple[bytes, dict]:
        q = req.q
        name = qname.lower().rstrip(".")
        qtype = QTYPE.get(q.qtype, str(q.qtype))
        opt = next((r for r in req.ar if r.rtype == QTYPE.OPT), None)
        if transport == "tcp":
            limit = 65535
        else:  # UDP: 512 unless EDNS0 says more (RFC 6891), never more than ours
            limit = min(max(opt.rclass, 512), EDNS_SIZE) if opt else 512
        used: list[Override] = []
        answer, auth, extra, aa = [], [], [], True
        if opt is not None and (opt.ttl >> 16) & 0xFF:
            rcode, aa = BADVERS, False
        elif q.qclass != 1 or self._zone_of(name) is None:
            rcode, aa = REFUSED, False
        else:
            rcode = self._resolve(name, qtype, client, used, answer, auth, extra)

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
        # The whole event but its id and time, built once per cache entry: the client
        # is part of the cache key so that a hit costs a single emit. Few keys on purpose.
        fields = {"name": name, "type": qtype, "rcode": "BADVERS" if rcode == BADVERS else RCODE.get(rcode, str(rcode)),
                  "answers": [_text(r[3]) for r in answer], "client": client, "transport": transport,
                  "poisoned": bool(used), "override": used[0].id if used else None}
        if truncated:
            fields["truncated"] = True
        return wire, fields

    def _resolve(self, name: str, qtype: str, client: str, used: list, answer: list, auth: list, extra: list) -> int:
        """Fill the sections for name/qtype (inside a lab zone); returns the rcode."""
        seen = {name}
        while True:
            owner = self._find(name, client)
            if owner is None:
                auth.extend(self._soa(name))
                return NXDOMAIN
            if qtype == "ANY":  # RFC 8482 allows less; the lab has little data, so show it all
                for t in _ANY_TYPES:
                    rrs, ov = self._rrset(owner, t, client)
                    used.extend([ov] if ov else [])
                    answer.extend((name, t, ttl, v) for v, ttl in rrs or ())
                if not answer:
                    auth.extend(self._soa(name))
                return NOERROR
            rrs, ov = self._rrset(owner, qtype, client)
            if ov is None and qtype != "CNAME":
                crrs, cov = self._rrset(owner, "CNAME", client)
                # A CNAME override beats real data of any type; a real CNAME only
                # applies where the name has no data of the asked type.
                if crrs and (cov is not None or not rrs):
                    used.extend([cov] if cov else [])
                    target, ttl = crrs[0]
                    answer.append((name, "CNAME", ttl, target))
                    if target in seen or len(seen) > MAX_CHAIN:
                        self._log(f"CNAME loop or chain longer than {MAX_CHAIN} at {name}")
                        return SERVFAIL
                    if self._zone_of(target) is None:
                        return NOERROR  # leaves the lab: the client's resolver takes it from here
                    seen.add(target)
                    name = target
                    continue
            if ov is not None:
                used.append(ov)
            if not rrs:
                auth.extend(self._soa(name))
                return NOERROR
            answer.extend((name, qtype, ttl, v) for v, ttl in rrs)
            if qtype == "NS":  # glue: where the name servers are
                for target, _ in rrs:
                    for t in ("A", "AAAA"):
                        extra.extend((target, t, ttl, v) for v, ttl in self._data.get((target, t), ()))
            return NOERROR

    def _rrset(self, owner: str, rtype: str, client: str) -> tuple[tuple | None, Override | None]:
        ov = self._override_for(owner, rtype, client) if (owner, rtype) in self._ov else None
        if ov is not None:
            w = self.world
            return tuple((w.address_of(v), ov.ttl) for v in ov.values), ov
        return self._data.get((owner, rtype)), None

    def _exists(self, name: str, client: str) -> bool:
        if name in self._names:
            return True
        return name in self._ov_names and any(
            self._override_for(name, t, client) for t in RECORD_TYPES)

    def _find(self, name: str, client: str) -> str | None:
        """The owner whose data answers `name`: itself, a covering wildcard (RFC 4592), or None."""
        if self._exists(name, client):
            return name
        parent = name
        while "." in parent:
            parent = parent.partition(".")[2]
            if self._exists("*." + parent, client):
                return "*." + parent
            if parent in self._names:
                return None
        return None

    def _soa(self, name: str) -> list[tuple]:
        zone = self._zone_of(name)
        return [(zone, "SOA", ttl, v) for v, ttl in self._data.get((zone, "SOA"), ())]

    def _zone_of(self, name: str) -> str | None:
        while True:
            if name in self._zones:
                return name
            if "." not in name:
                return None
            name = name.partition(".")[2]

    def _check_name(self, name: str) -> str:
        try:
            name = normalize(name, allow_wildcard=True)
        except HostError as e:
            raise ValueError(str(e)) from None
        if is_ip(name):
            raise ValueError(f"{name} is an address, not a name")
        if self._zone_of(name) is None:
            raise ValueError(f"{name} is outside the lab zones ({', '.join(self.world.dns_zones)})")
        return name

    @staticmethod
    def _check_type(rtype: str) -> str:
        t = str(rtype).upper()
        if t not in RECORD_TYPES:
            raise ValueError(f"unsupported record type {rtype!r} (choose from {', '.join(RECORD_TYPES)})")
        return t

    @staticmethod
    def _check_ttl(ttl: int) -> int:
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 2**31 - 1:
            raise ValueError(f"bad TTL {ttl!r}")
        return ttl

    def _check_values(self, rtype: str, value) -> tuple[str, ...]:
        values = () if value is None else (value,) if isinstance(value, str) else tuple(value)
        out = []
        for v in values:
            if not isinstance(v, str):
                raise ValueError(f"{rtype} value must be a string, got {v!r}")
            if rtype in ("A", "AAAA"):
                if not _is_address(self.world.address_of(v), rtype):
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

    # ---- errors -------------------------------------------------------------------

    def _error(self, reason: str, data: bytes, client: str, transport: str) -> None:
        """One `dns.error` per bad packet, rate-limited so a flood cannot drown the events."""
        lim = self._event_limit
        if lim.allow():
            self.events.emit("dns.error", reason=reason, client=client, transport=transport, size=len(data),
                             head=data[:32].hex(), suppressed=lim.suppressed)
            lim.suppressed = 0
        self._log(f"{transport} {client}: {reason}")

    def _log(self, msg: str) -> None:
        lim = self._log_limit
        if lim.allow():
            log.warning("%s%s", msg, f" ({lim.suppressed} similar messages suppressed)" if lim.suppressed else "")
            lim.suppressed = 0

    # ---- sockets ------------------------------------------------------------------

    async def start(self, host: str | None = None, port: int | None = None) -> tuple[str, int]:
        """Listen on UDP and TCP; port 0 picks a port free for both. Returns (host, port)."""
        if self._udp is not None:
            raise RuntimeError(f"the resolver is already listening on {self.address[0]}:{self.address[1]}")
        host = host or self.world.resolver.host
        port = self.world.resolver.port if port is None else port
        udp, tcp = _bind_pair(host, port)
        loop = asyncio.get_running_loop()
        self._udp, self._udp_proto = await loop.create_datagram_endpoint(lambda: _UDP(self, udp), sock=udp)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp, limit=MAX_QUERY + 2)
        self.address = (host, tcp.getsockname()[1])
        return self.address

    @property
    def tcp_clients(self) -> int:
        """TCP connections being served now (at most max_tcp_clients)."""
        return len(self._tcp_tasks)

    async def stop(self) -> None:
        if self._udp is not None:
            self._udp.close()
            with contextlib.suppress(TimeoutError):  # the port is free when stop() returns
                await asyncio.wait_for(asyncio.shield(self._udp_proto.closed), 1)
            self._udp = None
        if self._tcp is not None:
            self._tcp.close()
            tasks = list(self._tcp_tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else "?"
        if len(self._tcp_tasks) >= self.max_tcp_clients:
            self._error(f"more than {self.max_tcp_clients} TCP clients", b"", client, "tcp")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._tcp_tasks.add(task)
        timeout, served = self.tcp_idle_timeout, 0
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readexactly(2), timeout)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        self._error("TCP length prefix cut short", e.partial, client, "tcp")
                    return
                except TimeoutError:
                    if not served:  # an idle keep-alive after answers is normal; silence from the start is not
                        self._error(f"TCP client sent nothing for {timeout:g}s", b"", client, "tcp")
                    return
                size = int.from_bytes(head, "big")
                if not 12 <= size <= MAX_QUERY:
                    self._error(f"TCP length prefix {size} out of range", head, client, "tcp")
                    return
                try:
                    data = await asyncio.wait_for(reader.readexactly(size), timeout)
                except asyncio.IncompleteReadError as e:
                    self._error(f"TCP message cut short ({len(e.partial)} of {size} bytes)", e.partial, client, "tcp")
                    return
                except TimeoutError:
                    self._error(f"TCP message incomplete after {timeout:g}s", b"", client, "tcp")
                    return
                wire = self.answer(data, client, "tcp")
                if wire is None:
                    return
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await asyncio.wait_for(writer.drain(), timeout)  # a client that never reads is dropped
                served += 1
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.transport.abort()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, sock: socket.socket) -> None:
        self.resolver = resolver
        self.cache = resolver._udp_cache  # cleared in place, never replaced
        self.emit = resolver.events.emit
        # Answers go straight on the socket: cheaper than the transport, and when the
        # send buffer is full the answer is dropped, never queued (UDP clients retry),
        # so memory stays bounded under a flood.
        self.sendto = sock.sendto
        self.closed = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        # Resolver.answer, inlined: this is the path every query takes.
        r = self.resolver
        if r._expiring and r._valid_until <= time.time():
            r._expire(time.time())
        hit = self.cache.get((data[2:], addr[0]))
        if hit is not None:
            self.emit("dns.answer", None, **hit[1])
            wire = data[:2] + hit[0]
        else:
            wire = r._miss(data, addr[0], "udp", self.cache)
            if wire is None:
                return
        try:
            self.sendto(wire, addr)
        except OSError:
            pass

    def error_received(self, exc) -> None:
        pass  # ICMP errors from clients that went away

    def connection_lost(self, exc) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for _ in range(50 if port == 0 else 1):
        udp = socket.socket(family, socket.SOCK_DGRAM)
        tcp = socket.socket(family, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            udp.bind((host, port))
            tcp.bind((host, udp.getsockname()[1]))
            tcp.listen(128)
        except OSError as e:
            udp.close()
            tcp.close()
            if port == 0 and e.errno == errno.EADDRINUSE:
                continue  # the UDP port's TCP twin is taken: try another
            raise bind_error("resolver", host, port, e) from None
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp
    raise OSError(errno.EADDRINUSE, f"no port free for both UDP and TCP on {host}")


def _bare(data: bytes, rcode: int) -> bytes:
    """A header-only response carrying the query's ID, opcode and RD."""
    flags = struct.unpack_from("!H", data, 2)[0]
    return data[:2] + struct.pack("!5H", 0x8000 | (flags & 0x7900) | rcode, 0, 0, 0, 0)


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


# ---- a tiny client ------------------------------------------------------------------

class _UDPClient(asyncio.DatagramProtocol):
    def __init__(self, qid: int) -> None:
        self.qid, self.done = qid, asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        if len(data) >= 2 and int.from_bytes(data[:2], "big") == self.qid and not self.done.done():
            self.done.set_result(data)

    def error_received(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


async def query(name: str, rtype: str = "A", host: str = "127.0.0.2", port: int = 5353, tcp: bool = False,
                timeout: float = 2.0, source: str | None = None) -> DNSRecord:
    """Ask the lab resolver; a truncated UDP answer is asked again over TCP, like dig.
    `source` picks the client address (a targeted poisoning answers one address only).

    Raises ValueError (bad name or type), TimeoutError, OSError (refused, unreachable)."""
    return (await _query(name, rtype, host, port, tcp, timeout, source))[0]


async def _query(name: str, rtype: str, host: str, port: int, tcp: bool, timeout: float,
                 source: str | None = None) -> tuple[DNSRecord, str]:
    t = str(rtype).upper()
    if _qtype_code(t) is None:
        raise ValueError(f"unknown record type {rtype!r}")
    q = DNSRecord.question(DNSLabel("."), t)
    q.add_ar(EDNS0(udp_len=EDNS_SIZE))
    try:
        q.q.qname = DNSLabel(name)
        data = q.pack()
    except Exception as e:  # noqa: BLE001 - dnslib raises assorted errors for bad names
        raise ValueError(f"bad name {name!r}: {e}") from None
    if not tcp:
        loop = asyncio.get_running_loop()
        udp, proto = await loop.create_datagram_endpoint(lambda: _UDPClient(q.header.id), remote_addr=(host, port),
                                                         local_addr=(source, 0) if source else None)
        try:
            udp.sendto(data)
            reply = DNSRecord.parse(await asyncio.wait_for(proto.done, timeout))
        finally:
            udp.close()
        if not reply.header.tc:
            return reply, "UDP"
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source, 0) if source else None), timeout)
    try:
        writer.write(len(data).to_bytes(2, "big") + data)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), timeout), "big")
        return DNSRecord.parse(await asyncio.wait_for(reader.readexactly(size), timeout)), "TCP"
    finally:
        writer.close()


def _qtype_code(rtype: str) -> int | None:
    """The number of a query type by name (A, TXT, TYPE65...), None when unknown."""
    if rtype == "OPT":
        return None
    try:
        return getattr(QTYPE, rtype)
    except Exception:  # noqa: BLE001 - dnslib raises DNSError for unknown names
        return None


def _server_of(args) -> tuple[str, int]:
    server = getattr(args, "server", None)
    if server:
        host, sep, port = server.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or not is_ip(host):
            raise ValueError(f"--server: expected HOST:PORT with an IP address, e.g. 127.0.0.2:5353, got {server!r}")
        return host, int(port)
    path = Path(getattr(args, "state", None) or ".lab") / "endpoints.json"
    try:
        dns = json.loads(path.read_text())["dns"]
        return str(dns["host"]), int(dns["port"])
    except FileNotFoundError:
        raise ValueError(f"no running lab ({path} not found): start the lab with `sni-lab up` or pass --server") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{path} has no usable \"dns\" endpoint: start the lab with `sni-lab up` or pass --server") from None


def dig_command(args) -> int:
    """`sni-lab dig NAME [TYPE]`: print the lab resolver's answer like dig (or as JSON)."""
    def fail(msg: str, code: int) -> int:
        print(f"sni-lab: error: {msg}", file=sys.stderr)
        return code

    rtype = str(getattr(args, "type", None) or "A").upper()
    if _qtype_code(rtype) is None:
        return fail(f"unknown record type {rtype!r} (e.g. A, AAAA, CNAME, TXT, NS, SOA)", 2)
    try:
        name = normalize(args.name, allow_wildcard=True)
        host, port = _server_of(args)
    except (HostError, ValueError) as e:
        return fail(str(e), 2)
    tcp = bool(getattr(args, "tcp", False))
    try:
        reply, transport = asyncio.run(_query(name, rtype, host, port, tcp, 2.0))
    except TimeoutError:
        return fail(f"no answer from {host}:{port} within 2s: is the lab running? (`sni-lab up`)", 1)
    except OSError as e:
        return fail(f"cannot reach {host}:{port}: {e.strerror or e}: is the lab running? (`sni-lab up`)", 1)
    except Exception as e:  # noqa: BLE001 - e.g. an unparsable answer from something that is not the lab
        return fail(f"bad answer from {host}:{port}: {e}", 1)
    if getattr(args, "json", False):
        h = reply.header
        flags = [f for f in ("qr", "aa", "tc", "rd", "ra", "ad", "cd") if getattr(h, f)]
        section = lambda rrs: [{"name": str(r.rname).rstrip("."), "ttl": r.ttl, "type": QTYPE.get(r.rtype),
                                "value": _rdata_text(r)} for r in rrs if r.rtype != QTYPE.OPT]
        print(json.dumps({"server": f"{host}:{port}", "transport": transport.lower(), "name": name, "type": rtype,
                          "status": RCODE.get(h.rcode), "flags": flags, "answer": section(reply.rr),
                          "authority": section(reply.auth), "additional": section(reply.ar)}, indent=2))
    else:
        print(reply)
        print(f";; SERVER: {host}#{port}({transport})")
    return 0


def _rdata_text(rr: RR) -> str:
    text = rr.rdata.toZone()
    if rr.rtype == QTYPE.TXT:
        return "".join(s.decode(errors="replace") for s in rr.rdata.data)
    return text.rstrip(".") if rr.rtype in (QTYPE.CNAME, QTYPE.NS) else text
