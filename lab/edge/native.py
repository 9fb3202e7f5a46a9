"""The `native` engine: asyncio + stdlib ssl, one TLS listener per edge address."""
from __future__ import annotations

import asyncio

from lab.binding import bind_error
from lab.edge.contract import Engine
from lab.edge.http1 import H1Protocol
from lab.edge.http2 import H2Protocol
from lab.edge.tls import SessionContexts, TLSConnection
from lab.events import Events
from lab.pki import LabCA
from lab.topology import Listener, World


class NativeEdge(Engine):
    engine = "native"

    def __init__(self, world: World, events: Events, ca: LabCA) -> None:
        super().__init__(world, events, ca)
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[TLSConnection] = set()
        # A connection starts on a context holding no certificate: the one for its SNI is
        # switched in, and without SNI, or with an unknown one, the handshake fails instead
        # of falling back to some default certificate.
        self.contexts = SessionContexts()

    def _app(self, conn: TLSConnection, alpn: str) -> asyncio.Protocol:
        return H2Protocol(self.core, conn) if alpn == "h2" else H1Protocol(self.core, conn)

    def _admit(self, conn: TLSConnection) -> bool:
        if self.admit(conn.state) is not None:
            return False
        self.connections.add(conn)
        return True

    def _closed(self, conn: TLSConnection) -> None:
        if conn.state.admitted:
            self.connections.discard(conn)
            self.release(conn.state)

    def _protocol(self, listener: Listener):
        def factory() -> TLSConnection:
            return TLSConnection(listener, lookup=self.certs.lookup, contexts=self.contexts, events=self.events,
                                 refusals=self.refusals, limits=self.world.limits, app_factory=self._app,
                                 admit=self._admit, on_close=self._closed)
        return factory

    async def start(self) -> dict[str, tuple[str, int]]:
        """Bind every listener of the world; returns name -> (host, port) actually bound."""
        await self._start_core()
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
