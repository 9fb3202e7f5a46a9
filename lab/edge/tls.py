"""TLS over MemoryBIO, so the edge controls every byte of the handshake.

The ClientHello is read first (`hello`) and the certificate chosen from its SNI before
OpenSSL sees a byte: a name the edge holds nothing for, a name that is no host name, or
bytes that are no ClientHello are answered here, with the alert written by the edge
(`unrecognized_name` (112) for a bad SNI) and no TLS work at all. Alerts OpenSSL queues
later are sent too: the outgoing BIO is always flushed before TCP is closed (asyncio's own
SSL transport would drop them). After the handshake the connection is a plain asyncio
transport for the HTTP protocol chosen by ALPN (`http1` or `http2`); what it writes in one
loop iteration leaves in one TCP write: each write is a syscall and a segment for both
ends, and writes spread over an iteration wake the client once each (measured: 8-11% of
the edge's CPU per request, new connection or keep-alive).

Resumption. Tickets are off in every version (`certstore.server_context`). The stdlib has
no switch for OpenSSL's TLS 1.2 session-ID cache, and that cache lives in the context a
connection *starts* on. So a connection starts on a context of its own listener and name
(`SessionContexts`): a session made for www.victim.example on one listener resumes only
there, for that name, never on another listener or under another SNI (the CVE-2025-23419
class); anywhere else the client gets a full handshake.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable

from lab.edge import hello
from lab.edge.admission import Refusals
from lab.edge.certstore import Cert, refusal, server_context
from lab.edge.contract import ConnState
from lab.events import Events
from lab.hostnorm import HostError, sni_name
from lab.topology import Limits, Listener

READ_CHUNK = 256 * 1024


class SessionContexts:
    """The context each connection starts on, one per (listener, name), newest kept.

    Dropping a context drops its sessions: those clients get a full handshake, nothing
    worse. `sessions` bounds each cache (the stdlib cannot size it), `size` how many
    there are, so memory stays bounded whatever names a wildcard lets clients send. A
    connection adds at most one session (renegotiation is off), so a context's count is
    asked for only once as many connections started on it as its cache may hold.
    """

    def __init__(self, size: int = 128, sessions: int = 160) -> None:
        self.size = size
        self.sessions = sessions
        self._by_key: dict[tuple[str, str], list] = {}  # key -> [context, connections to start before counting]

    def get(self, listener: str, name: str) -> ssl.SSLContext:
        key = (listener, name)
        entry = self._by_key.pop(key, None)
        if entry is not None and entry[1] <= 0:
            entry[1] = self.sessions - entry[0].session_stats()["number"]
        if entry is None or entry[1] <= 0:
            ctx = server_context()
            ctx.sni_callback = _switch_context
            entry = [ctx, self.sessions]
        entry[1] -= 1
        self._by_key[key] = entry  # last in, newest
        while len(self._by_key) > self.size:
            del self._by_key[next(iter(self._by_key))]
        return entry[0]


def _switch_context(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext):
    """OpenSSL's moment to switch to the certificate already chosen from the ClientHello."""
    conn: TLSConnection = sslobj._lab_conn
    try:
        # The first ClientHello's SNI named conn.cert: the same text names it again.
        same = server_name is not None and (server_name == conn.state.sni or sni_name(server_name) == conn.cert.name)
    except HostError:
        same = False
    if not same:  # a second ClientHello (after HelloRetryRequest) naming another host
        return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
    sslobj.context = conn.cert.context
    return None


class TLSConnection(asyncio.Protocol, asyncio.Transport):
    """Protocol towards the socket, Transport towards the HTTP protocol above it.

    Handed what it needs: the certificate lookup, the session contexts, the events and
    how to tell of refusals, the world's limits, and two callbacks of its engine:
    `admit` (may this client connect at all) and `on_close` (it is gone). What the
    events tell of it (its trace, SNI, handshake timeout) is its `state`, as on the
    mitmproxy engine.
    """

    def __init__(self, listener: Listener, *, lookup: Callable[[bytes | None], Cert | None],
                 contexts: SessionContexts, events: Events, refusals: Refusals, limits: Limits,
                 app_factory: Callable[["TLSConnection", str], asyncio.Protocol],
                 admit: Callable[["TLSConnection"], bool], on_close: Callable[["TLSConnection"], None]) -> None:
        asyncio.Transport.__init__(self)
        self.listener = listener
        self.state = ConnState(events, listener.name)
        self.lookup = lookup
        self.contexts = contexts
        self.refusals = refusals
        self.limits = limits
        self.app_factory = app_factory
        self.admit = admit
        self.on_close = on_close
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj: ssl.SSLObject | None = None  # once the ClientHello named a certificate
        self.hello = b""  # the ClientHello so far, while it comes in pieces
        self.app: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.cert: Cert | None = None
        self.closing = False
        self._batching = False  # in data_received after the handshake: writes wait for its one flush
        self._flush_due = False  # a flush is queued for the end of this loop iteration

    # ---- towards the socket -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.peer = transport.get_extra_info("peername") or ("", 0)
        if not self.admit(self):
            self.closing = True
            transport.close()
            return
        self.state.start_clock(self.limits, self.abort)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        if self.sslobj is None:
            data = self.hello + data if self.hello else data
            try:
                first = hello.client_hello(data)
            except hello.HelloError as e:
                self._refuse(e.reason, e.alert)
                return
            if first is None:
                self.hello = data
                return
            self.hello = b""
            if not self._start_tls(first.sni):
                return
        self.incoming.write(data)
        if self.app is None:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as e:
                self._flush()  # carries OpenSSL's alert
                self._handshake_failed(getattr(e, "reason", None) or str(e))
                return
        # What OpenSSL and the app write from here on goes out in one write at the end:
        # the handshake's last flight, the app's first frames, the answers to this read.
        self._batching = True
        try:
            if self.app is None:
                self._handshake_done()
            self._read_app_data()
        finally:
            self._batching = False
        self._flush()

    def _start_tls(self, sni: bytes | None) -> bool:
        """The certificate for this ClientHello's SNI, and OpenSSL from here on; False if none."""
        state = self.state
        state.client_hello(sni)
        self.cert = self.lookup(sni)
        if self.cert is None:
            if sni is not None and not sni.isascii():
                self.refusals.non_ascii_sni(client=state.client, sni=state.sni)
            self._refuse(refusal(sni), hello.UNRECOGNIZED_NAME)
            return False
        self.sslobj = self.contexts.get(self.listener.name, self.cert.name).wrap_bio(
            self.incoming, self.outgoing, server_side=True)
        self.sslobj._lab_conn = self  # read back in _switch_context, dropped after the handshake
        return True

    def _refuse(self, reason: str, alert: int | None) -> None:
        """Answer the ClientHello with an alert of the edge's own, before any TLS work."""
        if alert is not None and self.transport:
            self.transport.write(hello.alert(alert))
        self._handshake_failed(reason)

    def _handshake_failed(self, reason: str) -> None:
        self._forget_conn()
        self.state.tls_error(reason)
        self.closing = True
        if self.transport:
            self.transport.close()

    def _forget_conn(self) -> None:
        # sslobj -> self -> sslobj: a cycle only the garbage collector would free, holding
        # the OpenSSL connection and its buffers until it runs.
        if self.sslobj is not None:
            self.sslobj._lab_conn = None

    def _handshake_done(self) -> None:
        self._forget_conn()
        alpn = self.sslobj.selected_alpn_protocol() or "http/1.1"
        self.state.tls_cert(self.cert.names, alpn, self.sslobj.version(), self.sslobj.session_reused)
        self.app = self.app_factory(self, alpn)
        self.app.connection_made(self)

    def _read_app_data(self) -> None:
        sslobj, incoming = self.sslobj, self.incoming
        # Until nothing is left: neither bytes in the BIO nor plaintext OpenSSL holds.
        while self.app is not None and not self.closing and (incoming.pending or sslobj.pending()):
            try:
                chunk = sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:  # part of a record: the rest comes with the next read
                break
            except ssl.SSLZeroReturnError:
                chunk = b""
            except (ssl.SSLError, OSError):
                self.abort()
                break
            if not chunk:  # close_notify (the stdlib reads it as b"", or raises): the client is done
                self._flush()
                self.app.eof_received()
                self.close()
                break
            self.app.data_received(chunk)

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport and not self.transport.is_closing():
            self.transport.write(data)

    def eof_received(self) -> bool:
        if self.app is not None:
            self.app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.stop_clock()
        self._forget_conn()
        self.closing = True
        self.on_close(self)
        if self.app is not None:
            app, self.app = self.app, None
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    # ---- towards the HTTP protocol -------------------------------------------
    def write(self, data: bytes) -> None:
        if self.closing or not data:
            return
        try:
            self.sslobj.write(data)
        except (ssl.SSLError, OSError):
            self.abort()
            return
        if not self._batching and not self._flush_due:
            # The writes of one loop iteration (an answer and its close_notify, HTTP/2 frames
            # of several streams) go out in one TCP write.
            self._flush_due = True
            asyncio.get_running_loop().call_soon(self._flush_queued)

    def _flush_queued(self) -> None:
        self._flush_due = False
        self._flush()

    def writelines(self, chunks) -> None:
        self.write(b"".join(chunks))

    def can_write_eof(self) -> bool:
        return False

    def is_closing(self) -> bool:
        return self.closing or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        if self.sslobj is not None:
            try:
                self.sslobj.unwrap()  # queue close_notify
            except (ssl.SSLError, OSError, ValueError):
                pass
            self._flush()
        if self.transport:
            self.transport.close()

    def abort(self) -> None:
        self.closing = True
        if self.transport:
            self.transport.abort()

    def pause_reading(self) -> None:
        if self.transport:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport:
            self.transport.resume_reading()

    def is_reading(self) -> bool:
        return bool(self.transport and self.transport.is_reading())

    def get_write_buffer_size(self) -> int:
        return self.outgoing.pending + (self.transport.get_write_buffer_size() if self.transport else 0)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        if self.transport:
            self.transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context if self.sslobj else None
        if name == "peercert":
            return None
        if name == "socket":
            return None  # the app must not touch the raw socket under TLS
        return self.transport.get_extra_info(name, default) if self.transport else default

