"""The engine contract: what the native and the mitmproxy engines do alike, written once.

Each engine carries bytes its own way (asyncio + stdlib ssl + httptools/h2, or mitmproxy);
everything a user could tell apart between them is here, and both import it:

- `Engine`: the certificate store, the `EdgeCore`, the connection caps, `set_world`;
- `ConnState`: one client connection as the events tell it: its conn id (which the first
  request reuses as its trace), the SNI its ClientHello asked for, the handshake timeout of
  `world.limits`, and the `tls.clienthello` / `tls.cert` / `tls.error` events, which carry
  the peer's "ip:port" (`lab.strips` joins it to the browser proxy's `proxy.tunnel`);
- `new_request`: a carrier's parsed request as `EdgeCore` takes it, with its trace;
- `h1_head` and `h2_head` (`h2_malformed`): the edge's request-head checks, HTTP/1 and HTTP/2,
  and `join_cookies`, an HTTP/2 request's cookie crumbs as one field for the origin;
- `body_too_large`: the one body limit (`limits.max_body`), declared or as it arrives;
- `response_fields`, `reason` and `sent_body`: how an answer is framed (Content-Length
  always, no connection-specific field, `Connection: close` where HTTP/1 closes, no body
  for HEAD).

Host and SNI normalisation stay `lab.hostnorm`'s, which host a request names is
`policy.request_host`'s, and what a refusal says is `policy.malformed`'s.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable

from lab.edge import hello
from lab.edge.admission import ConnectionCaps, Refusals, descriptor_cap
from lab.edge.certstore import CertStore
from lab.edge.core import EdgeCore, Malformed, Request
from lab.events import Events, new_trace
from lab.pki import LabCA
from lab.policy import Target
from lab.topology import Limits, World

_TRACE = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")
_REASONS = {s.value: s.phrase for s in HTTPStatus}
# Not sent with an answer: its framing is the edge's own (Content-Length, Connection).
_FRAMING = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade",
                      "content-length"})
_BAD_VALUE = frozenset("\r\n\0")


# ---- the engine ---------------------------------------------------------------------------

class Engine:
    """What every engine holds: certificates for what the world allows, the core, the connection caps."""

    engine = ""

    def __init__(self, world: World, events: Events, ca: LabCA) -> None:
        self.events = events
        self.certs = CertStore(ca)
        self.certs.load(world)
        self.core = EdgeCore(world, events)
        self.caps = ConnectionCaps()
        self.refusals = Refusals(events)

    @property
    def world(self) -> World:
        return self.core.world

    def set_world(self, world: World) -> None:
        """Switch model or hostnames at run time; certificates follow what the world allows."""
        self.certs.load(world)
        self.core.world = world

    async def _start_core(self) -> None:
        self.caps = ConnectionCaps(descriptor_cap(self.world.limits.descriptor_reserve))
        await self.core.start()

    def admit(self, conn: "ConnState") -> str | None:
        """Count a new connection in (None), or tell why it is refused, before any TLS work."""
        why = self.caps.admit(conn.client, self.world.limits)
        if why is not None:
            self.refusals.connection(client=conn.client, listener=conn.listener, conn=conn.conn_id, why=why)
            return why
        conn.admitted = True
        return None

    def release(self, conn: "ConnState") -> None:
        if conn.admitted:
            conn.admitted = False
            self.caps.release(conn.client)


# ---- one client connection ----------------------------------------------------------------

def hostport(address) -> str:
    """A socket address as "ip:port" ("[v6]:port"), the form `proxy.tunnel`'s `local` has."""
    host, port = (address or ("", 0))[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ConnState:
    """A client connection as both engines tell it; the engine's connection object holds one."""

    def __init__(self, events: Events, listener: str, peer=None) -> None:
        self.events = events
        self.listener = listener  # its name
        self.peer: tuple = tuple(peer or ("", 0))
        self.conn_id = new_trace()
        self.first_trace: str | None = self.conn_id  # the first request reuses it: one story per trace
        self.sni: str | None = None  # as sent (hello.shown)
        self.admitted = False  # counted in the connection caps
        self.failed = False  # a tls.error was told: one per connection
        self._clock: asyncio.TimerHandle | None = None

    @property
    def client(self) -> str:
        return self.peer[0]

    def next_trace(self) -> str:
        trace, self.first_trace = self.first_trace, None
        return trace or new_trace()

    def start_clock(self, limits: Limits, expired: Callable[[], None]) -> None:
        """The handshake timeout: a client that has not finished its handshake in time is dropped."""
        self._clock = asyncio.get_running_loop().call_later(limits.handshake_timeout, self._expired, expired)

    def _expired(self, expired: Callable[[], None]) -> None:
        self._clock = None
        self.tls_error("handshake timeout")
        expired()

    def stop_clock(self) -> None:
        # Drop the handle too: it holds the engine's connection object.
        if self._clock is not None:
            self._clock.cancel()
            self._clock = None

    def client_hello(self, sni: bytes | None) -> None:
        self.sni = hello.shown(sni)
        self.events.emit("tls.clienthello", trace=self.conn_id, conn=self.conn_id, listener=self.listener,
                         sni=self.sni, client=self.client, peer=hostport(self.peer))

    def tls_cert(self, names, alpn: str, version: str | None, resumed: bool) -> None:
        self.stop_clock()
        self.events.emit("tls.cert", trace=self.conn_id, conn=self.conn_id, listener=self.listener, sni=self.sni,
                         names=list(names), alpn=alpn, version=version, resumed=resumed)

    def tls_error(self, reason: str) -> None:
        self.stop_clock()
        if self.failed:
            return
        self.failed = True
        self.events.emit("tls.error", trace=self.conn_id, conn=self.conn_id, listener=self.listener, sni=self.sni,
                         error=reason, peer=hostport(self.peer))


def trace_of(headers: list[tuple[str, str]], fallback: str) -> str:
    # A probe may name its own trace id so its DNS query and this request tell one story.
    for name, value in headers:
        if name.lower() == "x-lab-trace" and _TRACE.match(value):
            return value
    return fallback


def new_request(conn: ConnState, method: str, target: Target, path_qs: str, headers: list[tuple[str, str]],
                body: bytes) -> Request:
    return Request(method=method, target=target, path_qs=path_qs, headers=headers, body=body, client=conn.client,
                   sni=conn.sni, conn=conn.conn_id, trace=trace_of(headers, conn.next_trace()))


# ---- request heads ------------------------------------------------------------------------

def body_too_large(limits: Limits, size: int, declared: bool = False) -> Malformed | None:
    """The body limit: None while `size` bytes (received so far, or declared) fit in `limits.max_body`."""
    if size <= limits.max_body:
        return None
    what = f"declared body of {size} bytes is" if declared else "request body"
    return Malformed(f"{what} larger than {limits.max_body} bytes (limits.max_body)", 413, "body-too-large")


@dataclass(slots=True)
class H1Head:
    """What an HTTP/1 request head declares about its body, or why the edge refuses it."""

    problem: Malformed | None = None
    length: int | None = None  # Content-Length
    chunked: bool = False
    expect: bytes = b""  # Expect, lower-case


def h1_head(method: bytes, version: str, fields: list[tuple[bytes, bytes]], limits: Limits,
            upgrade: bool = False) -> H1Head:
    """The edge's one HTTP/1 request-head check, what nginx refuses besides the parser's framing rules.

    A version other than 1.0 and 1.1 (505), CONNECT, a folded value or a control character
    in one, Content-Length with Transfer-Encoding, a coding other than plain "chunked" (501,
    as nginx), Transfer-Encoding in HTTP/1.0, an HTTP/1.1 request without Host, an Upgrade
    with a body (400), a declared body over `max_body` (413). Trailers are not fields here:
    they are counted, never forwarded, so they cannot name a second Host.
    """
    head = H1Head()
    if version != "1.1" and version != "1.0":
        head.problem = Malformed(f"HTTP/{version} is not served over HTTP/1", 505, "http-version-not-supported")
        return head
    if method == b"CONNECT":
        head.problem = Malformed("CONNECT: the edge is not a forward proxy")
        return head
    host = False
    for name, value in fields:
        if b"\r" in value or b"\n" in value or b"\0" in value:  # obs-fold, which mitmproxy's reader lets through
            head.problem = Malformed(f"bad value in header {name[:64].decode('latin-1')}")
            return head
        low = name.lower()
        if low == b"host":
            host = True
        elif low == b"content-length":
            if not value.strip().isdigit():
                head.problem = Malformed(f"bad Content-Length {value[:32].decode('latin-1')!r}")
                return head
            head.length = int(value)
        elif low == b"transfer-encoding":
            head.chunked = True  # one field, ending in "chunked" (the parsers' rule); nginx wants it alone
            if value.strip().lower() != b"chunked":
                head.problem = Malformed(f"Transfer-Encoding {value[:64].decode('latin-1')!r}: only chunked is "
                                         "served", 501, "transfer-encoding-not-implemented")
                return head
            if version == "1.0":  # RFC 9112 6.1: the framing of such a message is faulty
                head.problem = Malformed("Transfer-Encoding in an HTTP/1.0 request")
                return head
        elif low == b"expect":
            head.expect = value.strip().lower()
    if head.chunked and head.length is not None:
        head.problem = Malformed("Content-Length with Transfer-Encoding")
    elif version == "1.1" and not host:
        head.problem = Malformed("Missing 'Host' header in request.")
    elif head.length is not None:
        head.problem = body_too_large(limits, head.length, declared=True)
    if head.problem is None and upgrade and (head.chunked or head.length):
        head.problem = Malformed("Upgrade with a request body is not served")
    return head


_PSEUDO = frozenset({":method", ":scheme", ":path", ":authority"})
_TCHAR = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NAME_CHARS = _TCHAR - frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ")  # RFC 9113 8.2.1: lowercase tokens
_METHOD_CHARS = _TCHAR - frozenset("abcdefghijklmnopqrstuvwxyz")  # methods are case-sensitive; ours are upper
_CONNECTION_SPECIFIC = _FRAMING - {"content-length"}
_HPACK_OVERHEAD = 32  # per field, as SETTINGS_MAX_HEADER_LIST_SIZE counts (RFC 9113 6.5.2)
_DEFAULT_LIMITS = Limits()


@dataclass(slots=True)
class H2Head:
    """An HTTP/2 request's header fields as the edge reads them, or why it refuses them."""

    problem: Malformed | None = None
    pseudo: dict[str, str] = field(default_factory=dict)  # :method, :scheme, :path, :authority
    fields: list[tuple[str, str]] = field(default_factory=list)  # the regular ones, in order
    hosts: list[str] = field(default_factory=list)  # every `host` field's value
    length: int | None = None  # the first content-length
    size: int = 0  # the fields' size as SETTINGS_MAX_HEADER_LIST_SIZE counts it (once passed)


def h2_head(headers: list[tuple[str, str]], limits: Limits | None = None) -> H2Head:
    """The edge's one HTTP/2 request-header check: RFC 9113 8.2-8.3 and the world's size limits.

    The HTTP/2 libraries' own inbound validation is off, because it kills the whole
    connection over a `host` that disagrees with `:authority`, where the policy answers that
    one stream 400; every other rule they would apply is here, and what the edge refuses
    besides (CONNECT, a scheme other than https), so no such request reaches an origin.
    One pass over the fields: it is on the path of every HTTP/2 request.
    """
    limits = limits or _DEFAULT_LIMITS
    head = H2Head()
    if len(headers) > limits.max_headers:
        head.problem = Malformed(f"{len(headers)} header fields, more than {limits.max_headers}", 431,
                                 "headers-too-large")
        return head
    max_field, max_total = limits.max_field, limits.max_header_bytes
    pseudo, fields = head.pseudo, head.fields
    total = 0
    for name, value in headers:
        size = len(name) + len(value)
        total += size + _HPACK_OVERHEAD
        regular = name[:1] != ":"
        if name == ":path":
            if len(value) > limits.max_request_line:
                head.problem = Malformed(f":path of {len(value)} bytes, more than {limits.max_request_line}", 414,
                                         "uri-too-long")
                return head
        elif size > max_field:
            head.problem = Malformed(f"header {name[:64]!r} of {size} bytes, more than {max_field}", 431,
                                     "headers-too-large")
            return head
        if total > max_total:
            head.problem = Malformed(f"header fields over {max_total} bytes", 431, "headers-too-large")
            return head
        if regular or name not in _PSEUDO:
            bare = name if regular else name[1:]
            if not bare or not _NAME_CHARS.issuperset(bare):
                head.problem = Malformed(f"bad header name {name[:64]!r}")
                return head
        if not _BAD_VALUE.isdisjoint(value) or (value and (value[0] in " \t" or value[-1] in " \t")):
            head.problem = Malformed(f"bad value in header {name[:64]}")
            return head
        if not regular:
            if fields or name not in _PSEUDO or name in pseudo:
                head.problem = Malformed(f"misplaced, repeated or unknown pseudo-header {name[:64]}")
                return head
            pseudo[name] = value
            continue
        if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
            head.problem = Malformed(f"connection-specific header {name}")
            return head
        if name == "content-length":
            if not (value.isascii() and value.isdigit()):
                head.problem = Malformed(f"bad content-length {value[:32]!r}")
                return head
            length = int(value)
            head.problem = body_too_large(limits, length, declared=True)
            if head.problem:
                return head
            if head.length is None:
                head.length = length
        elif name == "host":
            head.hosts.append(value)
        fields.append((name, value))
    head.size = total
    head.problem = _h2_request_line(pseudo)
    return head


def _h2_request_line(pseudo: dict[str, str]) -> Malformed | None:
    method = pseudo.get(":method")
    if method == "CONNECT":
        return Malformed("CONNECT: the edge is not a proxy")
    if method is None or ":scheme" not in pseudo or ":path" not in pseudo:
        return Malformed(f"missing {', '.join(p for p in (':method', ':scheme', ':path') if p not in pseudo)}")
    if not method or not _METHOD_CHARS.issuperset(method):
        return Malformed(f"bad method {method[:32]!r}")
    if pseudo[":scheme"] != "https":
        return Malformed(f":scheme {pseudo[':scheme'][:32]!r} on a TLS connection")
    path = pseudo[":path"]
    if not (path.startswith("/") or (path == "*" and method == "OPTIONS")):
        return Malformed(f":path {path[:64]!r} is neither absolute nor * for OPTIONS")
    if (" " in path or not path.isprintable()) and any(c <= " " or c == "\x7f" for c in path):
        return Malformed("space or control character in :path")
    return None


def join_cookies(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """An HTTP/2 request's cookie crumbs as the one field HTTP/1.1 carries: "; "-joined, last
    (RFC 9113 8.2.3, as h2 joins them). Before `h2_head`, so its limits count the joined field."""
    if not any(k == "cookie" for k, _ in headers):
        return headers
    cookies = [v for k, v in headers if k == "cookie"]
    return [h for h in headers if h[0] != "cookie"] + [("cookie", "; ".join(cookies))]


def h2_malformed(headers: list[tuple[str, str]], limits: Limits | None = None) -> Malformed | None:
    """`h2_head`'s verdict alone: None for a request the edge serves."""
    return h2_head(headers, limits).problem


# ---- answers ------------------------------------------------------------------------------

def reason(status: int) -> str:
    """The reason phrase of an HTTP/1 status line."""
    return _REASONS.get(status, "Unknown")


def sent_body(method: str, body: bytes) -> bytes:
    """An answer to HEAD has the length of its body, and no body (RFC 9110 9.3.2)."""
    return b"" if method == "HEAD" else body


def response_fields(headers: list[tuple[str, str]], length: int, *, http2: bool, close: bool = False,
                    keep_alive: bool = False) -> list[tuple[str, str]]:
    """An answer's header fields as the edge sends them, whichever engine: its framing is the edge's own.

    HTTP/2 names are lower-case; `close` (HTTP/1) says `Connection: close`, `keep_alive`
    `Connection: keep-alive` (an HTTP/1.0 client that asked for it).
    """
    if http2:
        out = [(low, v) for k, v in headers if (low := k.lower()) not in _FRAMING]
        out.append(("content-length", str(length)))
        return out
    out = [(k, v) for k, v in headers if k.lower() not in _FRAMING]
    out.append(("Content-Length", str(length)))
    if close:
        out.append(("Connection", "close"))
    elif keep_alive:
        out.append(("Connection", "keep-alive"))
    return out
