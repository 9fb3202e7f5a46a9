"""The `mitmproxy` engine: mitmproxy embedded in the running asyncio loop, one reverse-mode
listener per edge listener, and four small addons, one concern each:

  _Connections  which listener a client connected to (by the address it hit), its
                `contract.ConnState` (conn id, TLS events, handshake timeout), the connection
                caps; no new connections while stopping
  _CertBySni    the certificate, by SNI, from the lab's CertStore (`tls_start_client`);
                mitmproxy never mints one, and an SNI with no certificate fails the handshake
                with alert 112 unrecognized_name, as on the native engine. The SNI is read
                from the ClientHello's own extension (`hello.server_name`), as the native
                engine reads it, not from mitmproxy's filtered `client.sni`
  _Route        the `request` hook: `EdgeCore.handle` decides (policy.decide, same events) and
                answers: a refusal page, or the origin's response fetched over plain HTTP;
                request heads are checked by the contract (`h1_head`, `h2_malformed`)
  _FlowFile     `flows=FILE`: every flow written in mitmproxy's own format (`mitmdump -nr FILE`)

Why the origin leg goes through `EdgeCore` and not through mitmproxy's own upstream
connection: when mitmproxy (11 and 12) cannot reach an upstream it answers with its own 502
page from inside its HTTP layer, and no hook can replace it; the lab must answer
`pages.upstream_failure`. So mitmproxy carries the client side (TLS, HTTP/1.1, HTTP/2,
flows, hooks) and the request hook hands each request to the very code the native engine
uses. mitmproxy itself never opens an upstream connection (`server_connect` refuses).

Embedding, against mitmproxy's habits (docs/design.md, "Architecture"):
- no `Master.run()`: its error check calls `sys.exit`; `start()` brings the servers up
  itself and turns a bind failure into one OSError naming the listener and address;
- only the addons needed are loaded: no TlsConfig (it would mint certificates and create a
  CA under ~/.mitmproxy), no ErrorCheck, no termlog, no Save (it calls `sys.exit` when a
  write fails);
- `stop()` empties the server list (else the ports stay bound), closes every live
  connection and waits for mitmproxy's tasks, so nothing is left behind;
- every hook of these addons is wrapped: an exception fails that request with a 502 page
  naming the error and is logged (mitmproxy would only log it and carry on);
- mitmproxy's `validate_inbound_headers` is off and the contract's checks run per request
  instead (`_malformed`): with it on, one HTTP/2 stream whose `host` disagrees with `:authority`
  would kill the whole connection, where the policy refuses that stream alone (400).

mitmproxy keeps its master in a module global (`mitmproxy.ctx`), so one MitmEdge runs per
process at a time. Works with mitmproxy 11.0.x and 12.x.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import inspect
import logging
import os
import ssl
import time
import weakref
from pathlib import Path
from typing import Any, Callable

from mitmproxy import connection, http
from mitmproxy import io as mitm_io
from mitmproxy import options as mitm_options
from mitmproxy.addons import next_layer, proxyserver
from mitmproxy.exceptions import OptionsError
from mitmproxy.master import Master
from mitmproxy.net.http.validate import validate_headers
from OpenSSL import SSL

from lab.binding import bind_error
from lab.edge import hello, pages
from lab.edge.certstore import ALPN, MIN_VERSION, TLS12_CIPHERS, refusal
from lab.edge.contract import (ConnState, Engine, h1_head, h2_malformed, join_cookies, new_request, reason,
                               response_fields, sent_body)
from lab.edge.core import Malformed, Request, absolute_authority
from lab.events import Events
from lab.pki import LabCA
from lab.policy import Target, refused
from lab.topology import Limits, Listener, World

log = logging.getLogger("lab.edge.mitm")

# Where a reverse-mode listener "points": nowhere. Requests are carried by EdgeCore, and the
# `server_connect` hook refuses any connection mitmproxy would open itself.
UNROUTED = "reverse:http://unrouted.invalid:9"
STOP_TIMEOUT = 2.0
_ALPN = tuple(p.encode() for p in ALPN)  # server preference, as the native engine: h2, then http/1.1
_VERSIONS = {ssl.TLSVersion.TLSv1_2: SSL.TLS1_2_VERSION, ssl.TLSVersion.TLSv1_3: SSL.TLS1_3_VERSION}
_UNRECOGNIZED_NAME = 112
_SSL_TLSEXT_ERR_ALERT_FATAL = 2
_MITMPROXY_DIR = os.path.dirname(inspect.getfile(Master)) + os.sep  # .../site-packages/mitmproxy/


# ---- TLS: pyOpenSSL contexts from the lab's certificates ------------------------------

def _select_alpn(conn: SSL.Connection, offered: list[bytes]) -> bytes:
    for proto in _ALPN:
        if proto in offered:
            return proto
    return SSL.NO_OVERLAPPING_PROTOCOLS  # no ALPN in the ServerHello, like the native engine


def _server_context() -> SSL.Context:
    """certstore's settings (the native engine's `server_context`) for pyOpenSSL: its minimum
    version and TLS 1.2 suites, and no resumption at all, which pyOpenSSL can switch off: no
    tickets, no cache."""
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(_VERSIONS[MIN_VERSION])
    ctx.set_cipher_list(TLS12_CIPHERS.encode())
    ctx.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return ctx


def _leaf_context(cert: str, key: str) -> SSL.Context:
    ctx = _server_context()
    ctx.use_certificate_chain_file(cert)
    ctx.use_privatekey_file(key)
    ctx.check_privatekey()
    ctx.set_alpn_select_callback(_select_alpn)
    return ctx


_refusing: tuple[SSL.Context, str] | None = None


def _refusing_context() -> tuple[SSL.Context, str]:
    """A context holding no certificate whose handshake fails, and the alert it sends.

    pyOpenSSL's servername callback cannot return an alert, so the callback is set through
    the OpenSSL binding pyOpenSSL itself uses: it answers every ClientHello with a fatal
    alert 112 unrecognized_name, exactly what the native engine (stdlib ssl) sends. Should
    that binding ever be missing, OpenSSL fails the handshake for want of a certificate
    (alert 40 handshake_failure): still no certificate, never a minted one.
    """
    global _refusing
    if _refusing is None:
        ctx = _server_context()
        ctx.set_alpn_select_callback(_select_alpn)
        alert = "handshake_failure"
        try:
            ffi, lib = SSL._ffi, SSL._lib

            def unrecognized_name(ssl, al, arg):
                al[0] = _UNRECOGNIZED_NAME
                return _SSL_TLSEXT_ERR_ALERT_FATAL

            callback = ffi.callback("int (*)(SSL *, int *, void *)", unrecognized_name)
            lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, callback)
            ctx._lab_keepalive = callback  # the C side holds only a raw pointer
            alert = "unrecognized_name"
        except Exception as e:  # pragma: no cover - depends on the pyOpenSSL build
            log.warning("mitmproxy engine: cannot send alert 112 (%s); an unknown SNI gets handshake_failure", e)
        _refusing = (ctx, alert)
    return _refusing


class _EdgeTLS(SSL.Connection):
    """The client connection's TLS. A failed handshake still sends its alert.

    mitmproxy returns from a failed `do_handshake()` without reading the outgoing BIO, so the
    alert OpenSSL queued (112 for an SNI without a certificate) would never reach the wire.
    Here the failure is reported as "want read" once: mitmproxy then flushes the BIO; the edge
    emits `tls.error` at once and closes the connection right after (`MitmEdge._tls_failed_now`).
    """

    _lab_failure: SSL.Error | None = None
    _lab_on_failure: Callable[[str], None] | None = None

    def do_handshake(self) -> None:
        if self._lab_failure is not None:
            raise self._lab_failure
        try:
            super().do_handshake()
        except SSL.WantReadError:
            raise
        except SSL.Error as e:
            self._lab_failure = e
            if self._lab_on_failure is not None:
                self._lab_on_failure(_ssl_reason(e))
            raise SSL.WantReadError() from None


def _ssl_reason(e: SSL.Error) -> str:
    errors = e.args[0] if e.args and isinstance(e.args[0], list) else []
    return (errors[-1][2] if errors and len(errors[-1]) > 2 else "") or str(e) or type(e).__name__


class _TlsContexts:
    """pyOpenSSL contexts for the certificates the CertStore holds, by their names."""

    def __init__(self, ca: LabCA) -> None:
        self.ca = ca
        self._by_names: dict[tuple[str, ...], SSL.Context] = {}

    def get(self, names: tuple[str, ...]) -> SSL.Context:
        ctx = self._by_names.get(names)
        if ctx is None:
            leaf = self.ca.leaf(names)
            ctx = self._by_names[names] = _leaf_context(str(leaf.cert_path), str(leaf.key_path))
        return ctx

    def keep(self, names: list[tuple[str, ...]]) -> None:
        wanted = set(names)
        self._by_names = {n: c for n, c in self._by_names.items() if n in wanted}


# ---- per-connection state ------------------------------------------------------------

class _Conn(ConnState):
    """The contract's connection state, and what the mitmproxy engine learns besides."""

    def __init__(self, events: Events, listener: str, peer) -> None:
        super().__init__(events, listener, peer)
        self.sni_raw: bytes | None = None
        self.cert_names: tuple[str, ...] = ()
        self.failure: str | None = None  # why the handshake cannot succeed, when the edge knows

    def tls_error(self, reason: str) -> None:
        super().tls_error(self.failure or reason)  # a reason the edge knows (no certificate) wins


def _guarded(hook):
    """Run a hook; an exception is logged and handed to the edge (502 for a flow), never lost."""
    if inspect.iscoroutinefunction(hook):
        @functools.wraps(hook)
        async def wrapper(self, data):
            try:
                await hook(self, data)
            except Exception as e:
                self.edge._hook_failed(hook.__name__, data, e)
    else:
        @functools.wraps(hook)
        def wrapper(self, data):
            try:
                hook(self, data)
            except Exception as e:
                self.edge._hook_failed(hook.__name__, data, e)
    return wrapper


# ---- the addons ----------------------------------------------------------------------

class _Connections:
    name = "sni_lab_connections"

    def __init__(self, edge: "MitmEdge") -> None:
        self.edge = edge

    @_guarded
    def client_connected(self, client) -> None:
        if self.edge._stopping:
            client.error = "the edge is stopping"
            return
        st = self.edge._conn(client)
        why = self.edge.admit(st)
        if why is not None:
            client.error = why  # mitmproxy closes it before reading a byte
            return
        st.start_clock(self.edge.world.limits, functools.partial(self.edge._close_client, client.id))

    @_guarded
    def client_disconnected(self, client) -> None:
        # The state itself stays until mitmproxy lets go of the client (a weak key): a hook
        # task of this connection may still run after this one.
        st = self.edge._conns.get(client)
        if st is not None:
            st.stop_clock()
            self.edge.release(st)


class _CertBySni:
    name = "sni_lab_certificates"

    def __init__(self, edge: "MitmEdge") -> None:
        self.edge = edge

    @_guarded
    def tls_clienthello(self, data) -> None:
        client = data.context.client
        st = self.edge._conn(client)
        try:
            st.sni_raw = next((hello.server_name(body) for kind, body in data.client_hello.extensions
                               if kind == hello.SERVER_NAME), None)
        except hello.HelloError as e:
            st.failure = f"unrecognized_name: {e.reason}"
        st.client_hello(st.sni_raw)
        if st.sni_raw is not None and not st.sni_raw.isascii():
            self.edge.refusals.non_ascii_sni(client=st.client, sni=st.sni)

    @_guarded
    def tls_start_client(self, data) -> None:
        if data.ssl_conn is not None:
            return
        client = data.conn
        st = self.edge._conn(client)
        found = None if st.failure else self.edge.certs.lookup(st.sni_raw)
        if found is None:
            ctx, alert = _refusing_context()
            st.failure = st.failure or refusal(st.sni_raw).replace("unrecognized_name", alert, 1)
        else:
            st.cert_names = found.names
            ctx = self.edge._tls.get(found.names)
        conn = _EdgeTLS(ctx)
        conn._lab_on_failure = functools.partial(self.edge._tls_failed_now, client, st)
        conn.set_accept_state()
        data.ssl_conn = conn

    @_guarded
    def tls_established_client(self, data) -> None:
        client = data.conn
        st = self.edge._conn(client)
        st.tls_cert(st.cert_names, client.alpn.decode() if client.alpn else "http/1.1", client.tls_version, False)

    @_guarded
    def tls_failed_client(self, data) -> None:
        # Failures inside OpenSSL were reported the moment they happened (_EdgeTLS); this is
        # for the others (the client gave up, mitmproxy closed the connection).
        client = data.conn
        self.edge._conn(client).tls_error((client.error or "handshake failed")[:200])


class _Route:
    name = "sni_lab_route"

    def __init__(self, edge: "MitmEdge") -> None:
        self.edge = edge

    @_guarded
    async def request(self, flow: http.HTTPFlow) -> None:
        client = flow.client_conn
        st = self.edge._conn(client)
        if not client.tls_established:
            # Plain HTTP on a TLS listener: the native engine's handshake fails on it too.
            st.tls_error("the client did not start TLS")
            flow.kill()
            return
        core = self.edge.core
        req = _lab_request(flow, st)
        flow.metadata["sni-lab"] = {"trace": req.trace, "conn": st.conn_id, "listener": st.listener}
        listener = self.edge.world.listener_by_name[st.listener]
        problem = _malformed(flow, self.edge.world.limits)
        if problem:
            _show_as_asked(flow, None)
            flow.response = self._refuse_malformed(flow, req, listener, problem)
            return
        decision = core.decide(listener, req)
        _show_as_asked(flow, decision.host)
        flow.response = _mitm_response(flow, *await core.handle_async(listener, req, decision))

    def _refuse_malformed(self, flow: http.HTTPFlow, req: Request, listener: Listener,
                          problem: Malformed) -> http.Response:
        h2 = flow.request.is_http2
        accept = next((v for k, v in req.headers if k.lower() == "accept"), None)
        refusal = self.edge.core.refuse_malformed(listener, problem, trace=req.trace, conn=req.conn, sni=req.sni,
                                                  http2=h2, accept=accept)
        # HTTP/1: close after it, as the native engine does once its parser gave up on the stream.
        return _mitm_response(flow, *refusal, close=not h2)

    def server_connect(self, data) -> None:
        # Never reached while `request` answers every flow; a guard, not a path.
        data.server.error = "the sni-lab edge carries requests to origins itself"


class _FlowFile:
    """Streams finished flows to FILE in mitmproxy's format; a write error stops recording, loudly."""

    name = "sni_lab_flows"

    def __init__(self, edge: "MitmEdge", path: Path) -> None:
        self.edge = edge
        self.path = path
        self.file = None
        self.writer = None

    def open(self) -> None:
        try:
            self.file = open(self.path, "wb")
        except OSError as e:
            raise OSError(e.errno, f"flows file {self.path}: cannot write: {e.strerror}") from None
        self.writer = mitm_io.FlowWriter(self.file)

    def _write(self, flow) -> None:
        if self.writer is None:
            return
        try:
            self.writer.add(flow)
            self.file.flush()
        except OSError as e:
            log.error("mitmproxy engine: flows file %s: %s; flows are no longer recorded", self.path, e)
            self.done()

    @_guarded
    def response(self, flow) -> None:
        self._write(flow)

    @_guarded
    def error(self, flow) -> None:
        self._write(flow)

    def done(self) -> None:
        file, self.file, self.writer = self.file, None, None
        if file is not None:
            try:
                file.close()
            except OSError as e:
                log.error("mitmproxy engine: flows file %s: %s", self.path, e)


# ---- requests and responses between mitmproxy and EdgeCore ---------------------------

def _lab_request(flow: http.HTTPFlow, st: _Conn) -> Request:
    r = flow.request
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.headers.fields]
    path_qs = r.path
    if r.is_http2 or r.is_http3:
        headers = join_cookies(headers)
        authority, absolute = r.authority or None, None  # :authority
    else:
        # mitmproxy keeps an HTTP/1 request target's authority only for the absolute form.
        authority = None
        absolute = absolute_authority(f"{r.scheme or 'http'}://{r.authority}/") if r.authority else None
    target = Target(hosts=tuple(v for k, v in headers if k.lower() == "host"), authority=authority,
                    absolute=absolute, path=path_qs.split("?", 1)[0])
    return new_request(st, r.method, target, path_qs, headers, r.raw_content or b"")


def _malformed(flow: http.HTTPFlow, limits: Limits) -> Malformed | None:
    """The contract's request-head checks, then mitmproxy's anti-smuggling header validation.

    mitmproxy's `validate_inbound_headers` is off: with it, the h2 library kills the whole
    connection (GOAWAY) over a `host` header that disagrees with `:authority`, where the
    policy answers that one stream 400 host-mismatch. Framing errors (two Content-Lengths, a
    bad chunk) stay mitmproxy's: its reader answers them with its own 400 before any hook.
    """
    r = flow.request
    if r.is_http2:
        # Reverse mode rewrites the scheme to the unrouted target's before any hook; the
        # client's own :scheme never reaches us, and this listener is TLS.
        pseudo = [(":method", r.method), (":scheme", "https")]
        pseudo += [(":authority", r.authority)] if r.authority else []
        pseudo += [(":path", r.path)]
        fields = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in r.headers.fields]
        return h2_malformed(join_cookies(pseudo + fields), limits)
    fields = r.headers.fields
    upgrade = "upgrade" in r.headers and "upgrade" in r.headers.get("connection", "").lower()
    head = h1_head(r.data.method, r.http_version.removeprefix("HTTP/"), fields, limits, upgrade)
    if head.problem is not None:
        return head.problem
    try:
        validate_headers(r)
    except ValueError as e:
        return Malformed(str(e))
    return None


def _show_as_asked(flow: http.HTTPFlow, host: str | None) -> None:
    """Flows show the URL the client asked for (https://host:port/...), not the unrouted target.

    `host` is the one the decision was about. Only the flow's record changes: the request the
    edge decided on is its own, and mitmproxy opens no connection for it (the request hook
    answers every flow).
    """
    sockname = flow.client_conn.sockname or ("", 0)
    flow.request.scheme = "https"
    flow.request.data.host = host or sockname[0]
    flow.request.data.port = sockname[1]


def _mitm_response(flow: http.HTTPFlow, status: int, headers: list[tuple[str, str]], body: bytes,
                   close: bool = False) -> http.Response:
    """(status, headers, body) framed as the contract frames every answer."""
    h2 = flow.request.is_http2 or flow.request.is_http3
    fields = [(k.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
              for k, v in response_fields(headers, len(body), http2=h2, close=close)]
    now = time.time()
    return http.Response(b"HTTP/2.0" if h2 else b"HTTP/1.1", status, reason(status).encode(), http.Headers(fields),
                         sent_body(flow.request.method, body), None, now, now)


# ---- the engine ----------------------------------------------------------------------

def _body_size_limit(limits: Limits) -> str:
    # mitmproxy's reader holds a request to it (answering 413 itself): the contract's body limit.
    return str(limits.max_body)


class MitmEdge(Engine):
    engine = "mitmproxy"
    _active: "MitmEdge | None" = None  # mitmproxy.ctx is a module global: one engine per process

    def __init__(self, world: World, events: Events, ca: LabCA, flows: str | Path | None = None) -> None:
        super().__init__(world, events, ca)
        self._tls = _TlsContexts(ca)
        self.flows = Path(flows).expanduser() if flows else None
        self.master: Master | None = None
        self._proxyserver: proxyserver.Proxyserver | None = None
        self._flowfile: _FlowFile | None = None
        self._conns: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # mitmproxy Client -> _Conn
        self._bound: dict[tuple[str, int], str] = {}  # address actually bound -> listener name
        self._by_spec: dict[str, str] = {}  # mitmproxy mode spec -> listener name
        self._stopping = False
        self._log_level: int | None = None

    def set_world(self, world: World) -> None:
        super().set_world(world)
        self._tls.keep(self.certs.names())
        limit = _body_size_limit(world.limits)
        if self.master is not None and self.master.options.body_size_limit != limit:
            self.master.options.update(body_size_limit=limit)

    # ---- lifecycle ----
    async def start(self) -> dict[str, tuple[str, int]]:
        """Bind one reverse-mode listener per listener of the world; returns name -> (host, port) bound."""
        if self.master is not None:
            raise RuntimeError("this mitmproxy edge is already running")
        if MitmEdge._active is not None:
            raise RuntimeError("a mitmproxy edge is already running in this process "
                               "(mitmproxy keeps its state in module globals: one engine per process)")
        MitmEdge._active = self
        await self._start_core()
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> dict[str, tuple[str, int]]:
        specs = self._specs()
        if self.flows is not None:
            self._flowfile = _FlowFile(self, self.flows)
            self._flowfile.open()
        self._quiet_mitmproxy()
        master = self.master = Master(mitm_options.Options(), event_loop=asyncio.get_running_loop())
        # mitmproxy's handler on the root logger would swallow every record of the process
        # (and silence logging's last-resort stderr output); the lab does not read add_log.
        legacy = getattr(master, "_legacy_log_events", None)
        if legacy is not None:
            legacy.uninstall()
        ps = self._proxyserver = proxyserver.Proxyserver()
        ours = [_Connections(self), _CertBySni(self), _Route(self)] + ([self._flowfile] if self._flowfile else [])
        # Ours first: a hook that sets tls_start.ssl_conn wins (mitmproxy's TlsConfig, were it
        # loaded, steps aside when ssl_conn is set; it is not loaded at all).
        master.addons.add(*ours, ps, next_layer.NextLayer())
        try:
            # keep_host_header: in reverse mode mitmproxy rewrites Host to the target before any
            # hook, and the policy must see the client's. validate_inbound_headers: see _malformed.
            master.options.update(mode=list(specs), connection_strategy="lazy", keep_host_header=True,
                                  body_size_limit=_body_size_limit(self.world.limits), http2=True,
                                  validate_inbound_headers=False)
        except OptionsError as e:
            raise ValueError(f"mitmproxy engine: {e}") from None
        await ps.setup_servers()
        bound = {}
        for spec, (listener, port) in specs.items():
            instance = ps.servers[spec]
            addrs = instance.listen_addrs
            if instance.last_exception is not None or not addrs:
                raise _bind_error(listener, port, instance.last_exception)
            bound[listener.name] = addrs[0][:2]
            self._bound[addrs[0][:2]] = listener.name
            self._by_spec[spec] = listener.name
        logging.getLogger("mitmproxy").setLevel(logging.ERROR)
        await master.running()
        return bound

    def _specs(self) -> dict[str, tuple[Listener, int]]:
        specs: dict[str, tuple[Listener, int]] = {}
        seen: dict[tuple[str, int], str] = {}
        for listener in self.world.listeners:
            port = listener.port
            if (listener.host, port) in seen:
                # mitmproxy serves one mode per address, and takes "host:0" as one address: the
                # port it binds is only known after. Port 0 on a host of its own is fine.
                why = ("mitmproxy binds one free port per host: give it a port"
                       if port == 0 else f"listener {seen[(listener.host, port)]} has this address")
                raise OSError(errno.EADDRINUSE, f"edge listener {listener.name}: cannot bind {listener.host}:{port}: "
                                                f"{why}")
            seen[(listener.host, port)] = listener.name
            specs[f"{UNROUTED}@{listener.host}:{port}"] = (listener, port)
        return specs

    async def stop(self) -> None:
        self._stopping = True
        try:
            if self._proxyserver is not None:
                await self._proxyserver.servers.update([])  # frees every port (shutdown() alone would not)
                await self._close_connections()
            if self.master is not None:
                await self.master.done()
        finally:
            if self._flowfile is not None:
                self._flowfile.done()
            self.master = self._proxyserver = self._flowfile = None
            for st in list(self._conns.values()):
                st.stop_clock()
            self._conns.clear()
            self._bound.clear()
            self._by_spec.clear()
            await self.core.stop()
            self._restore_logging()
            self._stopping = False
            if MitmEdge._active is self:
                MitmEdge._active = None

    async def _close_connections(self) -> None:
        """Close every client connection and wait for mitmproxy's tasks; cancel the stubborn."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT
        while True:
            for handler in list(self._proxyserver.connections.values()):
                io = handler.transports.get(handler.client)
                if io is not None and io.handler is not None and not io.handler.done():
                    io.handler.cancel("sni-lab edge stopping")
            tasks = _mitmproxy_tasks()
            if not tasks:
                return
            if loop.time() >= deadline:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                return
            await asyncio.wait(tasks, timeout=0.05)

    def _quiet_mitmproxy(self) -> None:
        # The lab reports TLS failures and bind errors itself (events, one OSError); mitmproxy's
        # own warnings about them would be noise on stderr. Its errors still show.
        logger = logging.getLogger("mitmproxy")
        self._log_level = logger.level
        logger.setLevel(logging.CRITICAL)  # until the listeners are up: a bind error is ours to report

    def _restore_logging(self) -> None:
        if self._log_level is not None:
            logging.getLogger("mitmproxy").setLevel(self._log_level)
            self._log_level = None

    # ---- helpers for the addons ----
    def _conn(self, client) -> _Conn:
        st = self._conns.get(client)
        if st is None:
            st = self._conns[client] = _Conn(self.events, self._listener_of(client), client.peername)
        return st

    def _listener_of(self, client) -> str:
        """The listener the client connected to: by the address it hit, else by mitmproxy's mode."""
        sockname = tuple((client.sockname or ("", 0))[:2])
        name = self._bound.get(sockname)
        if name is None:
            mode = getattr(client, "proxy_mode", None)
            name = self._by_spec.get(getattr(mode, "full_spec", None))
        if name is None:
            name = next((l.name for l in self.world.listeners if l.port == sockname[1]), "?")
        return name

    def _tls_failed_now(self, client, st: _Conn, reason: str) -> None:
        """The handshake failed inside OpenSSL: the alert is being flushed; close right after."""
        st.tls_error(reason)
        asyncio.get_running_loop().call_soon(self._close_client, client.id)

    def _close_client(self, client_id: str) -> None:
        ps = self._proxyserver
        handler = ps.connections.get(client_id) if ps is not None else None
        if handler is None:
            return
        io = handler.transports.get(handler.client)
        if io is not None and io.handler is not None and not io.handler.done():
            io.handler.cancel("TLS handshake failed")

    def _hook_failed(self, hook: str, data: Any, e: Exception) -> None:
        what = f"{type(e).__name__}: {e}"
        log.error("mitmproxy engine: the %s hook failed: %s", hook, what, exc_info=e)
        if isinstance(data, http.HTTPFlow):
            model = self.world.model
            decision = refused(model, 502, "edge-error", f"{model}: the mitmproxy engine failed in its {hook} hook: "
                                                         f"{what}")
            accept = data.request.headers.get("accept") if data.request else None
            data.response = _mitm_response(data, *pages.refusal(decision, accept))
            return
        if isinstance(data, connection.Client):
            client = data
        else:
            context = getattr(data, "context", None)
            client = getattr(context, "client", None)
        if isinstance(client, connection.Client):
            st = self._conn(client)
            st.failure = st.failure or f"edge error in {hook}: {what}"
            if hook.startswith("tls_"):
                st.tls_error(st.failure)


def _bind_error(listener: Listener, port: int, exc: BaseException | None) -> OSError:
    # mitmproxy wraps asyncio's OSError in its own, with advice for its CLI; the lab says it
    # the native engine's way, from the original error.
    cause = exc.__cause__ if exc is not None and isinstance(exc.__cause__, OSError) else exc
    if not isinstance(cause, OSError) or not cause.errno:
        cause = OSError(errno.EADDRNOTAVAIL, str(cause) if cause else "")
    return bind_error(f"edge listener {listener.name}", listener.host, port, cause)


def _mitmproxy_tasks() -> set[asyncio.Task]:
    current = asyncio.current_task()
    out = set()
    for task in asyncio.all_tasks():
        code = getattr(task.get_coro(), "cr_code", None)
        if task is not current and not task.done() and code is not None and code.co_filename.startswith(_MITMPROXY_DIR):
            out.add(task)
    return out
