"""The browser's network: an HTTP CONNECT proxy that resolves through the lab resolver as its client.

A browser started with `--proxy-server` reaches the lab's names without /etc/hosts or
`--host-resolver-rules` (fixed at launch): each CONNECT (RFC 9110 9.3.6) is resolved by a
real DNS query to the lab resolver, sent from the browser's own address (so a targeted
poisoning reaches that one client) with a fresh trace id (the resolver's `dns.answer`
carries it), then tunnelled byte for byte. TLS stays end to end: the padlock is the
browser's own verdict.

A browser keeps a pooled connection for minutes, so a DNS change alone reaches no open
browser: when the answer for an open tunnel's (name, client) changes, the tunnel is
closed and the browser reconnects, asking again.

Only the lab is reachable: names inside the lab's DNS zones, answers that are a lab
listener or origin (address and port); anything else, and every request that is not a
CONNECT (Chromium sends its own background traffic through any proxy), is refused with
a reason, never sent elsewhere.

Pure: `parse_connect`, `lab_endpoints`, `check_name`, `check_endpoint`, `answer_address`.
Sockets: `Proxy`.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from typing import Callable

from dnslib import QTYPE, RCODE, DNSRecord

from lab.binding import bind_error
from lab.caps import Caps
from lab.dns import query
from lab.events import Events, new_trace
from lab.hostnorm import HostError, is_ip, normalize
from lab.resolver import Zones
from lab.topology import World

log = logging.getLogger("lab.proxy")

MAX_HEAD = 8192           # request line and header fields of one CONNECT; a browser's is < 1 KiB
HEAD_TIMEOUT = 10.0       # for the whole head, like the edge's header_timeout
CONNECT_TIMEOUT = 5.0     # DNS query, then TCP connect to the answer
IDLE_TIMEOUT = 300.0      # a tunnel with no byte either way (a browser pools connections for minutes)
MAX_TUNNELS = 256         # connections to the proxy in all, heads being read included
MAX_PER_CLIENT = 64       # from one client address (Chromium opens at most 32 per proxy)
CHECK_INTERVAL = 0.5      # how often open tunnels are checked for expired overrides and idleness
CHUNK = 64 * 1024
ADDRESS_TYPES = ("A", "AAAA")  # AAAA is asked only when there is no A: the lab is IPv4 by default

_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")          # RFC 9110 5.6.2
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_VERSION = re.compile(rb"HTTP/1\.[01]")


class Refusal(Exception):
    """Why a CONNECT is not tunnelled: the status sent back and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass(frozen=True)
class Target:
    host: str  # normalised (hostnorm): a name or an IP literal
    port: int


def parse_connect(head: bytes) -> Target:
    """The target of one request head (through the blank line). Raises Refusal:
    405 for a method other than CONNECT, 400 for anything malformed."""
    if not head.endswith(b"\r\n\r\n"):
        raise Refusal(400, "request head does not end with CRLF CRLF")
    line, *fields = head[:-4].split(b"\r\n")
    parts = line.split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _VERSION.fullmatch(parts[2]):
        raise Refusal(400, "malformed request line (expected CONNECT host:port HTTP/1.1)")
    method, authority, _ = parts
    if method != b"CONNECT":
        raise Refusal(405, f"only CONNECT is proxied, not {method.decode('ascii')} (this proxy serves the lab's https)")
    for f in fields:
        name, colon, value = f.partition(b":")
        if not colon or not _TOKEN.fullmatch(name) or not _FIELD_VALUE.fullmatch(value):
            raise Refusal(400, "malformed header field")
    return _authority(authority)


def _authority(raw: bytes) -> Target:
    """authority-form (RFC 9110 9.3.6): host:port, the port required, IPv6 in brackets."""
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise Refusal(400, "CONNECT target is not ASCII") from None
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
        raise Refusal(400, f"CONNECT target must be host:port, got {text[:100]!r}")
    if host.startswith("["):
        if not host.endswith("]"):
            raise Refusal(400, f"bad IPv6 literal in {text[:100]!r}")
    elif ":" in host:
        raise Refusal(400, f"an IPv6 target goes in brackets: {text[:100]!r}")
    try:
        return Target(normalize(host), int(port))
    except HostError as e:
        raise Refusal(400, f"CONNECT target: {e}") from None


def lab_endpoints(world: World) -> frozenset[tuple[str, int]]:
    """Where the proxy may connect: the world's listeners and origins, by address and port."""
    return frozenset([(l.host, l.port) for l in world.listeners] + [(o.host, o.port) for o in world.origins])


def check_name(name: str, world: World) -> None:
    """Raises Refusal(403) for a name outside the lab's DNS zones (it would leave the lab)."""
    if not any(name == z or name.endswith("." + z) for z in world.dns_zones):
        raise Refusal(403, f"{name} is outside the lab's DNS zones")


def check_endpoint(address: str, port: int, world: World) -> None:
    """Raises Refusal(403) unless address:port is a lab listener or origin."""
    endpoints = lab_endpoints(world)
    if (address, port) in endpoints:
        return
    if any(address == a for a, _ in endpoints):
        raise Refusal(403, f"port {port} of {address} is not a lab listener or origin")
    raise Refusal(403, f"{address} is not a lab address")


def answer_address(zones: Zones, name: str, client: str, now: float) -> str | None:
    """The address the resolver answers `client` for `name` at `now` (CNAMEs followed), as the
    proxy reads it from its own query: the first A, else the first AAAA. Pure: give it to
    `Proxy(lookup=lambda name, client: answer_address(resolver.zones, name, client, time.time()))`."""
    for rtype in ADDRESS_TYPES:
        wire, _ = zones.answer(DNSRecord.question(name, rtype).pack(), client, now)
        if wire is None:
            return None
        address = _first_address(DNSRecord.parse(wire), rtype)
        if address is not None:
            return address
    return None


def _first_address(reply: DNSRecord, rtype: str) -> str | None:
    code = getattr(QTYPE, rtype)
    return next((str(rr.rdata) for rr in reply.rr if rr.rtype == code), None)


@dataclass(eq=False)
class Tunnel:
    trace: str
    client: str          # the browser's address, as the proxy sees it
    dns_client: str      # the address the lab resolver answered (the client's own when it could be bound)
    name: str            # as asked in CONNECT (a name or an IP literal)
    port: int
    address: str         # where it connected: the answer
    opened: float
    last: float          # loop time of the last byte either way
    up: int = 0          # bytes client -> edge
    down: int = 0        # bytes edge -> client
    eof: str | None = None     # the way ("up", "down") that ended first
    reason: str | None = None  # why the proxy ended it (None: an end closed)
    task: asyncio.Task | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {"trace": self.trace, "client": self.client, "dns_client": self.dns_client, "name": self.name,
                "port": self.port, "address": self.address, "bytes_up": self.up, "bytes_down": self.down}


Lookup = Callable[[str, str], str | None]


class Proxy:
    """`await Proxy(world, events, lookup).start(host, port)`; `set_world` when addresses move;
    `dns_changed()` when records or overrides change; `await stop()`.

    `lookup(name, client) -> address | None` is what the resolver answers now, without a
    query or an event (see `answer_address`): tunnels whose answer it no longer gives are
    closed. Events: `proxy.tunnel`, `proxy.closed`, `proxy.refused`."""

    def __init__(self, world: World, events: Events, lookup: Lookup, *, max_tunnels: int = MAX_TUNNELS,
                 max_per_client: int = MAX_PER_CLIENT, head_timeout: float = HEAD_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT, check_interval: float = CHECK_INTERVAL) -> None:
        self.world, self.events, self.lookup = world, events, lookup
        self.max_tunnels = max_tunnels
        self.max_per_client = max(1, min(max_per_client, max_tunnels - 1))  # below the total: room for others
        self.head_timeout, self.idle_timeout, self.check_interval = head_timeout, idle_timeout, check_interval
        self.address: tuple[str, int] | None = None
        self._server: asyncio.Server | None = None
        self._checker: asyncio.Task | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task] = set()
        self._caps = Caps()
        self._tunnels: set[Tunnel] = set()
        self._asked: dict[str, dict | None] = {}  # trace -> its dns.answer event, while the query runs

    def set_world(self, world: World) -> None:
        self.world = world

    @property
    def tunnels(self) -> list[dict]:
        """The open tunnels, for the live page."""
        return [t.as_dict() for t in self._tunnels]

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        """Listen on host:port (0: any free port); returns the bound (host, port)."""
        if self._server is not None:
            raise RuntimeError(f"the proxy is already listening on {self.address[0]}:{self.address[1]}")
        try:
            self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD, reuse_address=True)
        except OSError as e:
            raise bind_error("proxy", host, port, e) from None
        self.address = self._server.sockets[0].getsockname()[:2]
        self._unsubscribe = self.events.subscribe(self._on_event)
        self._checker = asyncio.create_task(self._check_forever())
        return self.address

    async def stop(self) -> None:
        """Close the listener and every tunnel; bounded: peers are aborted, not waited for."""
        if self._server is not None:
            self._server.close()
        if self._checker is not None:
            self._checker.cancel()
        for t in list(self._tunnels):
            t.reason = t.reason or "proxy stopped"
        tasks = list(self._tasks) + ([self._checker] if self._checker else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1)
        if self._unsubscribe is not None:
            self._unsubscribe()
        self._server = self._checker = self._unsubscribe = None

    # ---- following DNS ------------------------------------------------------------------

    def dns_changed(self, name: str | None = None) -> int:
        """Close the tunnels whose answer changed; returns how many. `name` is the name edited:
        every tunnel is checked all the same, since a CNAME edit changes the names that point to it."""
        closed = 0
        answers: dict[tuple[str, str], str | None] = {}
        for t in list(self._tunnels):
            if t.reason is not None or is_ip(t.name):
                continue
            key = (t.name, t.dns_client)
            if key not in answers:
                try:
                    answers[key] = self.lookup(*key)
                except Exception:  # noqa: BLE001 - a broken lookup must not stop the tunnels or the timer
                    log.exception("lookup %s for %s failed", *key)
                    continue
            now = answers[key]
            if now != t.address:
                self._end(t, f"DNS changed: {t.name} now {now or 'does not resolve'} (was {t.address})")
                closed += 1
        return closed

    async def _check_forever(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.check_interval)
            if not self._tunnels:
                continue
            self.dns_changed()  # catches override expiries, which nobody announces
            idle_since = loop.time() - self.idle_timeout
            for t in list(self._tunnels):
                if t.last < idle_since and t.reason is None:
                    self._end(t, f"idle for {self.idle_timeout:g}s")

    def _end(self, t: Tunnel, reason: str) -> None:
        t.reason = reason
        if t.task is not None:
            t.task.cancel()

    def _on_event(self, e: dict) -> None:
        if e["kind"] == "dns.answer" and e["trace"] in self._asked:
            self._asked[e["trace"]] = e

    # ---- one client connection ----------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        client = peer[0]
        met = self._caps.admit(client, self.max_tunnels, self.max_per_client)
        if met is not None:
            over = (Refusal(503, f"{self.max_tunnels} connections open, the limit") if met == "total"
                    else Refusal(429, f"{self.max_per_client} connections open from {client}, the limit"))
            self._refuse(writer, client, over)
            return writer.close()  # no lingering: this connection holds no slot
        task = asyncio.current_task()
        self._tasks.add(task)
        target = trace = upstream = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.head_timeout)
                target = parse_connect(head)
                trace = new_trace()
                address, dns = await self._resolve(target, client, trace)
                upstream = await self._connect(address, target.port, client)
            except asyncio.IncompleteReadError:
                return  # gone before a full head: nothing to answer
            except asyncio.LimitOverrunError:
                self._refuse(writer, client, Refusal(431, f"request head longer than {MAX_HEAD} bytes"))
                return await _linger(reader)
            except TimeoutError:
                self._refuse(writer, client, Refusal(408, f"no complete request head within {self.head_timeout:g}s"))
                return await _linger(reader)
            except Refusal as r:
                self._refuse(writer, client, r, target, trace)
                return await _linger(reader)
            await self._tunnel(reader, writer, upstream, client, target, address, dns, trace)
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass  # cancelled: by stop() or _end(), which said why
        finally:
            self._tasks.discard(task)
            self._caps.release(client)
            writer.transport.abort()
            if upstream is not None:
                upstream[1].transport.abort()

    async def _resolve(self, target: Target, client: str, trace: str) -> tuple[str, dict]:
        """The address to connect to and what the DNS answer said (dns_client, poisoned, override)."""
        if is_ip(target.host):
            check_endpoint(target.host, target.port, self.world)
            return target.host, {"dns_client": None, "poisoned": False, "override": None}
        check_name(target.host, self.world)
        dns = self.world.resolver
        source = _bindable(client, dns.host)
        self._asked[trace] = None
        try:
            for rtype in ADDRESS_TYPES:
                try:
                    reply = await query(target.host, rtype, dns.host, dns.port, timeout=CONNECT_TIMEOUT,
                                        source=source, trace=trace)
                except (TimeoutError, OSError) as e:
                    raise Refusal(502, f"the lab resolver did not answer for {target.host} ({type(e).__name__})") from None
                if reply.header.rcode != 0:
                    raise Refusal(502, f"{target.host} does not resolve ({RCODE.get(reply.header.rcode)})")
                address = _first_address(reply, rtype)
                if address is not None:
                    break
            else:
                raise Refusal(502, f"{target.host} has no address")
            event = self._asked[trace] or {}  # set by _on_event when the resolver runs in this process
        finally:
            self._asked.pop(trace, None)
        check_endpoint(address, target.port, self.world)
        return address, {"dns_client": event.get("client", source or client), "poisoned": event.get("poisoned"),
                         "override": event.get("override")}

    async def _connect(self, address: str, port: int, client: str):
        # From the client's own address where it can be bound: the edge then sees the browser's address too.
        source = _bindable(client, address)
        try:
            return await asyncio.wait_for(asyncio.open_connection(
                address, port, local_addr=(source, 0) if source else None, limit=CHUNK), CONNECT_TIMEOUT)
        except (TimeoutError, OSError) as e:
            why = getattr(e, "strerror", None) or type(e).__name__
            raise Refusal(502, f"cannot connect to {address}:{port} ({why})") from None

    async def _tunnel(self, reader, writer, upstream, client: str, target: Target, address: str, dns: dict,
                      trace: str) -> None:
        up_reader, up_writer = upstream
        loop = asyncio.get_running_loop()
        t = Tunnel(trace, client, dns["dns_client"] or client, target.host, target.port, address, loop.time(),
                   loop.time(), task=asyncio.current_task())
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        self._tunnels.add(t)
        self.events.emit("proxy.tunnel", trace, client=client, name=target.host, port=target.port, address=address,
                         poisoned=dns["poisoned"], override=dns["override"], dns_client=dns["dns_client"],
                         local=_hostport(up_writer.get_extra_info("sockname")))
        pumps = [asyncio.create_task(self._pump(reader, up_writer, t, "up")),
                 asyncio.create_task(self._pump(up_reader, writer, t, "down"))]
        ended = None
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_EXCEPTION)
            errors = [p.exception() for p in done if p.exception() is not None]
            if errors:
                ended = f"connection error: {errors[0].strerror or type(errors[0]).__name__}"
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tunnels.discard(t)
            reason = t.reason or ended or {"up": "client closed", "down": "edge closed", None: "closed"}[t.eof]
            self.events.emit("proxy.closed", trace, reason=reason, bytes_up=t.up, bytes_down=t.down,
                             seconds=round(loop.time() - t.opened, 3))

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, t: Tunnel, way: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await src.read(CHUNK)
            if not data:
                t.eof = t.eof or way
                with contextlib.suppress(OSError):  # the other end may be gone already: that ends it too
                    dst.write_eof()  # half-close: the other way may still carry an answer
                return
            if way == "up":
                t.up += len(data)
            else:
                t.down += len(data)
            t.last = loop.time()
            dst.write(data)
            await dst.drain()  # backpressure: no more reading until the other end takes it

    def _refuse(self, writer: asyncio.StreamWriter, client: str, r: Refusal, target: Target | None = None,
                trace: str | None = None) -> None:
        """Answer r, then FIN; never any connection onwards."""
        body = (r.reason + "\n").encode()
        writer.write(f"HTTP/1.1 {r.status} {_REASONS.get(r.status, 'Refused')}\r\nContent-Type: text/plain\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n".encode()
                     + (b"Allow: CONNECT\r\n" if r.status == 405 else b"") + b"\r\n" + body)
        self.events.emit("proxy.refused", trace, client=client, status=r.status, reason=r.reason,
                         name=target.host if target else None, port=target.port if target else None)
        writer.write_eof()


async def _linger(reader: asyncio.StreamReader, limit: int = 64 * 1024, within: float = 1.0) -> None:
    """Read what the client still sends, briefly: closing with unread bytes sends a reset,
    which can destroy the answer before the client reads it (nginx's lingering_close)."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(within):
            while limit > 0 and (chunk := await reader.read(limit)):
                limit -= len(chunk)


_REASONS = {400: "Bad Request", 403: "Forbidden", 405: "Method Not Allowed", 408: "Request Timeout",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 502: "Bad Gateway",
            503: "Service Unavailable"}


def _bindable(client: str, toward: str) -> str | None:
    """The client's address when the proxy can send from it toward `toward`: a loopback
    address of the same family (all of 127.0.0.0/8 is local on Linux). Else None: the OS
    picks, and the resolver's event names the address it answered."""
    try:
        c, d = ipaddress.ip_address(client), ipaddress.ip_address(toward)
    except ValueError:
        return None
    return client if c.is_loopback and c.version == d.version else None


def _hostport(sockname) -> str | None:
    if not sockname:
        return None
    host, port = sockname[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
