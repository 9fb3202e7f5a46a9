"""HTTP/2 on the edge with the h2 state machine: each stream is decided on its own.

One connection may carry requests for several hosts (connection coalescing); the
certificate was chosen once, by SNI, but every `:authority` goes through the policy.
"""
from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from lab.edge.core import EdgeCore, Request
from lab.policy import Target

MAX_REQUEST_BODY = 1024 * 1024
_CONNECTION_SPECIFIC = frozenset({"connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade"})


_PSEUDO = frozenset({":method", ":scheme", ":path", ":authority"})


def malformed(headers: list[tuple[str, str]]) -> str | None:
    """What h2's inbound validation would have said (RFC 9113 8.2-8.3), minus the host check."""
    seen_regular = False
    pseudo = {}
    for name, value in headers:
        if not name or name != name.lower() or any(c in name for c in "\r\n\0 ") or ":" in name[1:]:
            return f"bad header name {name!r}"
        if any(c in value for c in "\r\n\0"):
            return f"bad value in header {name}"
        if name.startswith(":"):
            if seen_regular or name not in _PSEUDO or name in pseudo:
                return f"misplaced or unknown pseudo-header {name}"
            pseudo[name] = value
        else:
            seen_regular = True
            if name in _CONNECTION_SPECIFIC or (name == "te" and value != "trailers"):
                return f"connection-specific header {name}"
    missing = [p for p in (":method", ":scheme", ":path") if p not in pseudo]
    if missing and pseudo.get(":method") != "CONNECT":
        return f"missing {', '.join(missing)}"
    return None


class H2Protocol(asyncio.Protocol):
    def __init__(self, core: EdgeCore, conn) -> None:
        self.core = core
        self.conn = conn  # the TLSConnection: our transport
        # h2 would kill the whole connection over a host header that disagrees with :authority;
        # the policy answers that request with a 400 instead, so the edge checks headers itself.
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding="utf-8", validate_inbound_headers=False))
        self.streams: dict[int, tuple[list, bytearray]] = {}
        self.tasks: dict[int, asyncio.Task] = {}
        self.window_open = asyncio.Event()

    def connection_made(self, transport) -> None:
        self.h2.initiate_connection()
        self._flush()

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.conn.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._flush()  # GOAWAY with the error h2 chose
            self.conn.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.streams[event.stream_id] = (event.headers, bytearray())
                if event.stream_ended:
                    self._start(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                stream = self.streams.get(event.stream_id)
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if stream is not None:
                    stream[1].extend(event.data)
                    if len(stream[1]) > MAX_REQUEST_BODY:
                        self.h2.reset_stream(event.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                        del self.streams[event.stream_id]
                if event.stream_ended:
                    self._start(event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                self._start(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.streams.pop(event.stream_id, None)
                task = self.tasks.pop(event.stream_id, None)
                if task:
                    task.cancel()
            elif isinstance(event, h2.events.WindowUpdated):
                self.window_open.set()
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush()
                self.conn.close()
                return
        self._flush()

    def _start(self, stream_id: int) -> None:
        if stream_id in self.streams and stream_id not in self.tasks:
            self.tasks[stream_id] = asyncio.get_running_loop().create_task(self._respond(stream_id))

    async def _respond(self, stream_id: int) -> None:
        headers, body = self.streams.pop(stream_id)
        problem = malformed(headers)
        if problem:
            self._refuse_malformed(stream_id, problem)
            return
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        plain = [(k, v) for k, v in headers if not k.startswith(":")]
        path = pseudo.get(":path", "/")
        req = Request(method=pseudo.get(":method", "GET"),
                      target=Target(hosts=tuple(v for k, v in plain if k == "host"), authority=pseudo.get(":authority"),
                                    path=path.split("?", 1)[0]),
                      path_qs=path, headers=plain, body=bytes(body), client=self.conn.peer[0], sni=self.conn.sni,
                      conn=self.conn.conn_id, trace="")
        req.trace = self.core.trace_of(plain, self.conn.next_trace())
        try:
            status, out, payload = await self.core.handle_async(self.conn.listener, req)
            response = [(":status", str(status))] + [(k.lower(), v) for k, v in out
                                                     if k.lower() not in _CONNECTION_SPECIFIC]
            response.append(("content-length", str(len(payload))))
            self.h2.send_headers(stream_id, response, end_stream=not payload)
            self._flush()
            await self._send_body(stream_id, payload)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.tasks.pop(stream_id, None)

    def _refuse_malformed(self, stream_id: int, problem: str) -> None:
        conn = self.conn
        status, out, payload = self.core.refuse_malformed(conn.listener, trace=conn.next_trace(), conn=conn.conn_id,
                                                          sni=conn.sni, problem=problem, http2=True)
        try:
            self.h2.send_headers(stream_id, [(":status", str(status))] + [(k.lower(), v) for k, v in out]
                                 + [("content-length", str(len(payload)))])
            self.h2.send_data(stream_id, payload, end_stream=True)
        except (h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError, h2.exceptions.FlowControlError):
            pass
        self._flush()

    async def _send_body(self, stream_id: int, payload: bytes) -> None:
        view = memoryview(payload)
        while view:
            window = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if window <= 0:
                self.window_open.clear()
                await self.window_open.wait()
                continue
            chunk, view = view[:window], view[window:]
            self.h2.send_data(stream_id, bytes(chunk), end_stream=not view)
            self._flush()

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc) -> None:
        for task in self.tasks.values():
            task.cancel()
        self.tasks.clear()
        self.window_open.set()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass
