"""The lab resolver's server: UDP and TCP sockets around `lab.resolver.Zones.answer`.

`Resolver` holds what the admin changed (records over the world's, overrides), builds
an immutable `Zones` snapshot on every change, and serves it: each packet goes to the
one answer function, its `info` becomes the `dns.answer` (or rate-limited `dns.error`)
event, and the bytes go back. Also here: a small client (`query`) and `sni-lab dig`.

Speed: an answer is remembered in wire form, keyed by the query's bytes after the 2-byte
ID and the client address (targeted overrides make answers differ per client, and the
event names the client), with its event; only a miss is parsed, and a UDP hit is answered
in the datagram handler itself. The cache holds for one snapshot and until its earliest
override expiry, so a cached answer is never stale.

TCP clients are bounded in number, per client address (below the total, so one client
cannot take every slot), in size and in idle time: `world.limits.dns_tcp_*`.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import hmac
import ipaddress
import itertools
import json
import logging
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from dnslib import QTYPE, RCODE, RR, DNSLabel, DNSRecord, EDNS0, EDNSOption

from lab.binding import bind_error
from lab.caps import Caps
from lab.events import Events, bounded
from lab.hostnorm import HostError, is_ip, normalize
from lab.resolver import (EDNS_SIZE, MARK_OPTION, MAX_QUERY, TRACE_CHARS, TRACE_OPTION, Override, Zones,
                          check_ttl, check_type, check_values, world_records)
from lab.topology import RECORD_TYPES, World

log = logging.getLogger("lab.dns")

CACHE_MAX = 4096        # answers per transport; the cache is cleared when full
CACHEABLE = 512         # longer queries are answered but not remembered
INTERNAL_KEPT = 1024    # answers to the lab's own lookups not read yet (one that timed out leaves one)


class _Limiter:
    """Token bucket: lets `burst` through at once, then `rate` per second; counts the rest."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float]) -> None:
        self.rate, self.burst, self.clock = rate, burst, clock
        self.tokens, self.stamp, self.suppressed = float(burst), clock(), 0

    def allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


class Resolver:
    """The lab resolver: `await start()`, then change what it says with set_record,
    delete_record, set_override, remove_override and update_world at any time.

    `clock` is the wall clock (override expiry, error rate limit); tests pass their own."""

    def __init__(self, world: World, events: Events | None = None, clock: Callable[[], float] = time.time) -> None:
        self.events = events if events is not None else Events()
        self.world = world
        self.clock = clock
        self._edits: dict[tuple[str, str], tuple[tuple[str, int], ...]] = {}  # admin layer over the world; () = deleted
        self._overrides: dict[str, Override] = {}
        self._ids = itertools.count(1)
        self._serial = int(clock()) & 0xFFFFFFFF
        self._udp_cache: dict = {}
        self._tcp_cache: dict = {}
        self._event_limit = _Limiter(rate=50, burst=200, clock=clock)
        self._log_limit = _Limiter(rate=2, burst=10, clock=clock)
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.AbstractServer | None = None
        self._tcp_tasks: set[asyncio.Task] = set()
        self._tcp_caps = Caps()
        self.address: tuple[str, int] | None = None
        # Queries carrying this (MARK_OPTION) are the lab's own (the verifier's): no event each, or
        # the log would be the verifier's; their asker reads the answer's fields (internal_answer).
        # It is never in an event, so a client cannot learn it to hide its lookups from the page.
        self.internal_mark = secrets.token_bytes(16)
        self._internal: dict[str, dict] = {}  # trace -> the fields of the answer, oldest first
        # Called after every change of what is served (records, overrides, world): the proxy
        # closes the tunnels whose answer changed.
        self.on_change: list[Callable[[], None]] = []
        self._rebuild()

    # ---- what is served ---------------------------------------------------------------

    def _rebuild(self) -> None:
        """A new snapshot after any change; the caches belong to the old one."""
        data = world_records(self.world)
        data.update(self._edits)
        self._merged = {k: v for k, v in data.items() if v}
        self.zones = Zones.build(self.world, self._merged, tuple(self._overrides.values()), self._serial)
        for warning in self.zones.warnings:
            self._log(warning)
        self._expiring = self.zones.valid_until != float("inf")  # spares the hot path a clock read
        self._udp_cache.clear()
        self._tcp_cache.clear()
        for callback in self.on_change:
            try:
                callback()
            except Exception:  # noqa: BLE001 - a listener's bug must not undo a change already served
                log.exception("resolver change callback failed")

    def update_world(self, world: World) -> None:
        """Serve a new world snapshot; admin edits and overrides stay. Does not rebind."""
        self.world = world
        self._rebuild()

    def set_record(self, name: str, rtype: str, value: str | list[str], ttl: int | None = None) -> None:
        """Replace the records of name+type with `value` (one value or a list: an RRset).

        A name holds a CNAME or other data, never both (RFC 1034 3.6.2): setting one
        removes the other. `listener:NAME`/`origin:NAME` follow the world."""
        name, rtype = self.zones.check_name(name), check_type(rtype)
        values = check_values(self.world, rtype, value)
        if not values:
            raise ValueError(f"{rtype} record for {name}: no value (use delete_record)")
        ttl = check_ttl(self.world.ttl if ttl is None else ttl)
        for other in RECORD_TYPES:
            if (other == "CNAME") != (rtype == "CNAME") and self._merged.get((name, other)):
                self._edits[(name, other)] = ()
        self._edits[(name, rtype)] = tuple((v, ttl) for v in values)
        self._serial = (self._serial + 1) & 0xFFFFFFFF
        self._rebuild()

    def delete_record(self, name: str, rtype: str | None = None) -> int:
        """Delete the records of name (of one type, or all); returns how many went."""
        name = self.zones.check_name(name)
        types = (check_type(rtype),) if rtype else RECORD_TYPES
        count = 0
        for t in types:
            count += len(self._merged.get((name, t), ()))
            self._edits[(name, t)] = ()
        if count:
            self._serial = (self._serial + 1) & 0xFFFFFFFF
            self._rebuild()
        return count

    def records(self) -> list[dict]:
        """The zone data as served (world records with admin edits), before overrides."""
        return [{"name": n, "type": t, "value": v, "ttl": ttl}
                for (n, t), rrs in sorted(self._merged.items()) for v, ttl in rrs]

    def set_override(self, name: str, rtype: str, value: str | list[str] | None, client: str | None = None,
                     expires: float | None = None, ttl: int = 5) -> str:
        """Force the answer for name+type (poisoning); returns the override id.

        `value` may be a list (an RRset) or None/[] (the type has no data). `client`
        limits it to one source address. `expires` is seconds from now (> 0), or an
        absolute wall-clock time when larger than 1e9; an absolute time already past makes
        an override that never applies (so restoring saved state cannot race its expiry)."""
        name, rtype = self.zones.check_name(name), check_type(rtype)
        values = check_values(self.world, rtype, value)
        if client is not None:
            try:
                client = str(ipaddress.ip_address(client))
            except ValueError:
                raise ValueError(f"override client: not an IP address: {client!r}") from None
        now = self.clock()
        if expires is not None:
            if not expires > 0:  # also refuses NaN
                raise ValueError(f"override expiry: expected seconds from now (> 0) or a time.time(), got {expires!r}")
            expires = float(expires) if expires > 1e9 else now + float(expires)
        ov = Override(f"ovr-{next(self._ids)}", name, rtype, values, client, expires, check_ttl(ttl), now)
        self._overrides[ov.id] = ov
        self._rebuild()
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
            self._rebuild()
        return len(gone)

    def overrides(self) -> list[dict]:
        self._expire(self.clock())
        return [o.as_dict() for o in self._overrides.values()]

    def _expire(self, now: float) -> None:
        gone = [oid for oid, o in self._overrides.items() if not o.live(now)]
        for oid in gone:
            del self._overrides[oid]
        if gone:
            self._rebuild()

    # ---- answering --------------------------------------------------------------------

    def internal_answer(self, trace: str) -> dict | None:
        """The fields of the answer to the lab's own lookup `trace` (an override's id when one
        answered), once; None when there was none (or it was asked too long ago)."""
        return self._internal.pop(trace, None)

    def respond(self, data: bytes, client: str, transport: str = "udp") -> bytes | None:
        """The response to one packet from `client` (None: send nothing), told as an event."""
        if self._expiring and self.zones.valid_until <= self.clock():
            self._expire(self.clock())
        cache = self._udp_cache if transport == "udp" else self._tcp_cache
        hit = cache.get((data[2:], client))
        if hit is not None:  # its event was made once, when it was cached
            self.events.again(hit[0])
            return data[:2] + hit[1]
        wire, info = self.zones.answer(data, client, self.clock(), transport == "tcp")
        if "error" in info:
            if "exception" in info:
                log.error("internal error answering %s", client, exc_info=info["exception"])
            self._error(info["error"], data, client, transport)
            return wire
        trace = info.pop("trace")
        mark = info.pop("mark", None)
        if "reason" in info:
            self._log(info["reason"])
        if mark is not None and hmac.compare_digest(mark, self.internal_mark):
            if trace is not None:  # not cached either: each carries a trace of its own
                self._internal[trace] = info
                if len(self._internal) > INTERNAL_KEPT:
                    del self._internal[next(iter(self._internal))]
            return wire
        fields = self.events.bound({**info, "client": client, "transport": transport})
        event = self.events.stamp("dns.answer", bounded(trace, self.events.field_limit), fields)
        if len(data) <= CACHEABLE:
            if len(cache) >= CACHE_MAX:
                cache.clear()
            cache[(data[2:], client)] = (dict(event), wire[2:])  # a copy: subscribers get their own
        self.events.publish(event)
        return wire

    # ---- errors -----------------------------------------------------------------------

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

    # ---- sockets ----------------------------------------------------------------------

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
        """TCP connections being served now (at most world.limits.dns_tcp_max_connections)."""
        return len(self._tcp_tasks)

    async def stop(self) -> None:
        for listening in (self._udp, self._tcp):  # both first: a stop cut short still frees the port
            if listening is not None:
                listening.close()
        if self._udp is not None:
            with contextlib.suppress(TimeoutError):  # the port is free when stop() returns
                await asyncio.wait_for(asyncio.shield(self._udp_proto.closed), 1)
            self._udp = None
        if self._tcp is not None:
            tasks = list(self._tcp_tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._tcp.wait_closed()
            self._tcp = None

    def _admit(self, client: str) -> str | None:
        """Why a new TCP connection from client is refused, or None to serve it."""
        lim = self.world.limits
        total = lim.dns_tcp_max_connections
        per_client = max(1, min(lim.dns_tcp_per_client, total - 1))  # below the total: room for others
        met = self._tcp_caps.admit(client, total, per_client)
        if met == "total":
            return f"{total} TCP connections open, the limit"
        if met == "client":
            return f"more than {per_client} TCP connections from one client"
        return None

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = peer[0] if peer else "?"
        refused = self._admit(client)
        if refused:
            self._error(refused, b"", client, "tcp")
            writer.transport.abort()
            return
        task = asyncio.current_task()
        self._tcp_tasks.add(task)
        timeout, served = self.world.limits.dns_tcp_idle_timeout, 0
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
                wire = self.respond(data, client, "tcp")
                if wire is None:
                    return
                writer.write(len(wire).to_bytes(2, "big") + wire)
                await asyncio.wait_for(writer.drain(), timeout)  # a client that never reads is dropped
                served += 1
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            self._tcp_caps.release(client)
            writer.transport.abort()


class _UDP(asyncio.DatagramProtocol):
    def __init__(self, resolver: Resolver, sock: socket.socket) -> None:
        self.resolver = resolver
        self.cache = resolver._udp_cache  # cleared on every change, never replaced
        self.again = resolver.events.again
        # Answers go straight on the socket: cheaper than the transport, and when the
        # send buffer is full the answer is dropped, never queued (UDP clients retry),
        # so memory stays bounded under a flood.
        self.sendto = sock.sendto
        self.closed = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr) -> None:
        # Most queries repeat one already answered: respond's cache hit, inline (a call less
        # per packet). A miss, or any packet while an override may expire, goes to respond.
        hit = self.cache.get((data[2:], addr[0]))
        if hit is None or self.resolver._expiring:
            wire = self.resolver.respond(data, addr[0])
            if wire is None:
                return
        else:
            self.again(hit[0])
            wire = data[:2] + hit[1]
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
                timeout: float = 2.0, source: str | None = None, trace: str | None = None,
                mark: bytes | None = None) -> DNSRecord:
    """Ask the lab resolver; a truncated UDP answer is asked again over TCP, like dig.
    `source` picks the client address (a targeted poisoning answers one address only);
    `trace` names the request this lookup serves: the resolver's `dns.answer` event
    carries it (EDNS0 option TRACE_OPTION), so the answer joins that request exactly.
    `mark` (the resolver's `internal_mark`, MARK_OPTION) says the lab itself is asking.

    Raises ValueError (bad name, type or trace), TimeoutError, OSError (refused, unreachable)."""
    return (await _query(name, rtype, host, port, tcp, timeout, source, trace, mark))[0]


async def _query(name: str, rtype: str, host: str, port: int, tcp: bool, timeout: float,
                 source: str | None = None, trace: str | None = None,
                 mark: bytes | None = None) -> tuple[DNSRecord, str]:
    t = str(rtype).upper()
    if _qtype_code(t) is None:
        raise ValueError(f"unknown record type {rtype!r}")
    if trace is not None and not TRACE_CHARS.fullmatch(str(trace).encode()):
        raise ValueError(f"trace: expected 1-64 of [0-9a-zA-Z_-], got {trace!r}")
    q = DNSRecord.question(DNSLabel("."), t)
    opts = [EDNSOption(TRACE_OPTION, trace.encode())] if trace else []
    opts += [EDNSOption(MARK_OPTION, mark)] if mark else []
    q.add_ar(EDNS0(udp_len=EDNS_SIZE, opts=opts))
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
