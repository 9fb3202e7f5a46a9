"""A raw HTTP/2 client for hostile-input tests: real TLS against the lab CA, h2 with its
outbound checks off, so it sends what a polite client would not."""
from __future__ import annotations

import asyncio
import ssl

import h2.config
import h2.connection
import h2.events

TIMEOUT = 5.0


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding="utf-8", validate_outbound_headers=False,
            normalize_outbound_headers=False, validate_inbound_headers=False))
        self.status: dict[int, int] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.body: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.terminated: h2.events.ConnectionTerminated | None = None
        self.pongs = 0

    @classmethod
    async def open(cls, lab, listener: str = "anycast", sni: str = "www.victim.example") -> "Peer":
        l = lab.world.listener_by_name[listener]
        ctx = ssl.create_default_context(cafile=str(lab.ca.cert_path))
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.wait_for(asyncio.open_connection(l.host, l.port, ssl=ctx, server_hostname=sni),
                                                TIMEOUT)
        peer = cls(reader, writer)
        peer.h2.initiate_connection()
        peer.flush()
        return peer

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.writer.write(data)

    def request(self, headers, *, end: bool = True) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers, end_stream=end)
        return sid

    async def until(self, done, timeout: float = TIMEOUT) -> None:
        """Read and answer frames until `done()` or the edge closes; bounded by `timeout`."""
        async def loop():
            while not done():
                self.flush()
                await self.writer.drain()
                data = await self.reader.read(65536)
                if not data:
                    return
                self.feed(data)
        await asyncio.wait_for(loop(), timeout)
        self.flush()

    def feed(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                headers = dict(event.headers)
                self.status[event.stream_id] = int(headers[":status"])
                self.headers[event.stream_id] = headers
            elif isinstance(event, h2.events.DataReceived):
                self.body.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.reset[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.PingAckReceived):
                self.pongs += 1
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.terminated = event

    async def sync(self) -> None:
        """One PING round trip: the edge has processed everything sent before it."""
        want = self.pongs + 1
        self.h2.ping(b"syncsync")
        await self.until(lambda: self.pongs >= want or self.terminated is not None)

    def done(self, sid: int) -> bool:
        return sid in self.ended or sid in self.reset

    def close(self) -> None:
        # The client goes away (a closed tab): asyncio's graceful close would wait for the peer first.
        self.writer.transport.abort()


def get(path: str = "/", method: str = "GET", authority: str = "www.victim.example"):
    return [(":method", method), (":scheme", "https"), (":authority", authority), (":path", path)]
