"""The `native` engine: asyncio + stdlib ssl, one TLS listener per edge address."""
from __future__ import annotations

import asyncio

from lab.binding import bind_error
from lab.edge.admission import ConnectionCaps, Refusals, descriptor_cap
from lab.edge.certstore import CertStore
from lab.edge.core import EdgeCore
from lab.edge.http1 import H1Protocol
from lab.edge.http2 import H2Protocol
from lab.edge.tls import SessionContexts, TLSConnection
from lab.events import Events
from lab.pki import LabCA
from lab.topology import Listener, World


class NativeEdge:
    engine = "native"

    def __init__(self, world: World, events: Events, ca: LabCA) -> None:
        self.events = events
        self.certs = CertStore(ca)
        self.certs.load(world)
        self.core = EdgeCore(world, events)
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[TLSConnection] = set()
        # A connection starts on a context holding no certificate: the one for its SNI is
        # switched in, and without SNI, or with an unknown one, the handshake fails instead
        # of falling back to some default certificate.
        self.contexts = SessionContexts()
        self.caps = ConnectionCaps()
        self.refusals = Refusals(events)

    @property
    def world(self) -> World:
        return self.core.world

    def set_world(self, world: World) -> None:
        """Switch model or hostnames at run time; certificates follow what the world allows."""
        self.certs.load(world)
        self.core.world = world

    def _app(self, conn: TLSConnection, alpn: str) -> asyncio.Protocol:
        return H2Protocol(self.core, conn) if alpn == "h2" else H1Protocol(self.core, conn)

    def _admit(self, conn: TLSConnection) -> bool:
        client = conn.peer[0]
        why = self.caps.admit(client, self.world.limits)
        if why is None:
            self.connections.add(conn)
            return True
        self.refusals.connection(client=client, listener=conn.listener.name, conn=conn.conn_id, why=why)
        return False

    def _closed(self, conn: TLSConnection) -> None:
        if conn.admitted:
            self.connections.discard(conn)
            self.caps.release(conn.peer[0])

    def _protocol(self, listener: Listener):
        def factory() -> TLSConnection:
            return TLSConnection(listener, lookup=self.certs.lookup, contexts=self.contexts, events=self.events,
                                 refusals=self.refusals, handshake_timeout=self.world.limits.handshake_timeout, app_factory=self._app,
                                 admit=self._admit, on_close=self._closed)
        return factory

    async def start(self) -> dict[str, tuple[str, int]]:
        """Bind every listener of the world; returns name -> (host, port) actually bound."""
        self.caps = ConnectionCaps(descriptor_cap(self.world.limits.descriptor_reserve))
        await self.core.start()
        loop = asyncio.get_running_loop()
        bound = {}
        try:
            for listener in self.world.listeners:
                try:
                    server = await loop.create_server(self._protocol(listener), listener.host, listener.port,
                                                      reuse_address=True, backlog=1024)
                except OSError as e:
                    raise bind_error(f"edge listener {listener.name}", listener.host, listener.port, e) from None
                self.servers.append(server)
                bound[listener.name] = server.sockets[0].getsockname()[:2]
        except BaseException:
            await self.stop()
            raise
        return bound

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            conn.abort()
        for server in self.servers:
            await server.wait_closed()
        self.servers.clear()
        self.connections.clear()
        await self.core.stop()
