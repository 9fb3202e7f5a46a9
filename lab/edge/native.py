"""The `native` engine: asyncio + stdlib ssl, one TLS listener per edge address."""
from __future__ import annotations

import asyncio

from lab.binding import bind_error
from lab.edge.certstore import CertStore, server_context
from lab.edge.core import EdgeCore
from lab.edge.http1 import H1Protocol
from lab.edge.http2 import H2Protocol
from lab.edge.tls import TLSConnection, sni_callback
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
        # No certificate on the listener's own context: without SNI, or with an unknown
        # one, the handshake fails instead of falling back to some default certificate.
        self.base = server_context()
        self.base.sni_callback = sni_callback(self)

    @property
    def world(self) -> World:
        return self.core.world

    def set_world(self, world: World) -> None:
        """Switch model or hostnames at run time; certificates follow what the world allows."""
        self.certs.load(world)
        self.core.world = world

    def _app(self, conn: TLSConnection, alpn: str) -> asyncio.Protocol:
        return H2Protocol(self.core, conn) if alpn == "h2" else H1Protocol(self.core, conn)

    def _protocol(self, listener: Listener):
        def factory() -> TLSConnection:
            conn = TLSConnection(self, listener, self.base, self._app)
            self.connections.add(conn)
            return conn
        return factory

    async def start(self) -> dict[str, tuple[str, int]]:
        """Bind every listener of the world; returns name -> (host, port) actually bound."""
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
