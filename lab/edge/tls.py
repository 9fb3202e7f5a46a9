"""TLS over MemoryBIO, so the edge controls every byte of the handshake.

asyncio's own SSL transport closes TCP when the handshake fails, dropping the alert
OpenSSL queued; here the outgoing BIO is always flushed first, so a client asking for an
SNI the edge holds nothing for sees a real `unrecognized_name` (112) alert on the wire.
After the handshake the connection is a plain asyncio transport for the HTTP protocol
chosen by ALPN (aiohttp for http/1.1, h2 for h2).
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any, Callable

from lab.events import Events, new_trace

READ_CHUNK = 256 * 1024
HANDSHAKE_TIMEOUT = 10.0


class TLSConnection(asyncio.Protocol, asyncio.Transport):
    """Protocol towards the socket, Transport towards the HTTP protocol above it."""

    def __init__(self, edge: Any, listener: Any, base_ctx: ssl.SSLContext,
                 app_factory: Callable[["TLSConnection"], asyncio.Protocol]) -> None:
        asyncio.Transport.__init__(self)
        self.edge = edge
        self.listener = listener
        self.events: Events = edge.events
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = base_ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.sslobj._lab_conn = self  # read back in the SNI callback
        self.app_factory = app_factory
        self.app: asyncio.Protocol | None = None
        self.transport: asyncio.Transport | None = None
        self.sni: str | None = None
        self.sni_seen = False  # the SNI callback ran (with or without a name)
        self.cert_names: tuple[str, ...] = ()
        self.conn_id = new_trace()
        self.first_trace: str | None = self.conn_id  # the first request reuses it: one story per trace
        self.peer: tuple = ("", 0)
        self.closing = False
        self._timeout: asyncio.TimerHandle | None = None

    # ---- towards the socket -------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = transport.get_extra_info("peername") or ("", 0)
        self._timeout = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        if self.app is None:
            self.events.emit("tls.error", trace=self.conn_id, conn=self.conn_id, listener=self.listener.name,
                             sni=self.sni, error="handshake timeout")
            self.abort()

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.app is None:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                self._flush()
                return
            except (ssl.SSLError, OSError) as e:
                self._flush()  # carries the alert (112 for an SNI without a certificate)
                self._handshake_failed(e)
                return
            self._flush()
            self._handshake_done()
        self._read_app_data()

    def _handshake_failed(self, e: Exception) -> None:
        if self._timeout:
            self._timeout.cancel()
        reason = getattr(e, "reason", None) or str(e)
        if not self.cert_names and self.sni_seen:
            reason = "unrecognized_name: no certificate for this SNI"
        self.events.emit("tls.error", trace=self.conn_id, conn=self.conn_id, listener=self.listener.name,
                         sni=self.sni, error=reason)
        self.closing = True
        if self.transport:
            self.transport.close()

    def _handshake_done(self) -> None:
        if self._timeout:
            self._timeout.cancel()
        alpn = self.sslobj.selected_alpn_protocol() or "http/1.1"
        self.events.emit("tls.cert", trace=self.conn_id, conn=self.conn_id, listener=self.listener.name,
                         sni=self.sni, names=list(self.cert_names), alpn=alpn, version=self.sslobj.version())
        self.app = self.app_factory(self, alpn)
        self.app.connection_made(self)

    def _read_app_data(self) -> None:
        while self.app is not None and not self.closing:
            try:
                chunk = self.sslobj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self._flush()
                self.app.eof_received()
                self.close()
                break
            except (ssl.SSLError, OSError):
                self.abort()
                break
            if not chunk:
                break
            self.app.data_received(chunk)
        self._flush()

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data and self.transport and not self.transport.is_closing():
            self.transport.write(data)

    def eof_received(self) -> bool:
        if self.app is not None:
            self.app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timeout:
            self._timeout.cancel()
        self.closing = True
        self.edge.connections.discard(self)
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
        return self.transport.get_write_buffer_size() if self.transport else 0

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        if self.transport:
            self.transport.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.sslobj
        if name == "sslcontext":
            return self.sslobj.context
        if name == "peercert":
            return None
        if name == "socket":
            return None  # the app must not touch the raw socket under TLS
        return self.transport.get_extra_info(name, default) if self.transport else default

    def next_trace(self) -> str:
        trace, self.first_trace = self.first_trace, None
        return trace or new_trace()


def sni_callback(edge: Any) -> Callable:
    """The certificate choice: by SNI, from the edge's store, never minted."""

    def callback(sslobj: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext):
        conn: TLSConnection = sslobj._lab_conn
        conn.sni = server_name
        conn.sni_seen = True
        edge.events.emit("tls.clienthello", trace=conn.conn_id, conn=conn.conn_id, listener=conn.listener.name,
                         sni=server_name, client=conn.peer[0])
        found = edge.certs.lookup(server_name)
        if found is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.cert_names, sslobj.context = found
        return None

    return callback
