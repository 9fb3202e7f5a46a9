"""HTTP/2 on the edge: each stream is decided on its own.

One connection may carry requests for several hosts (connection coalescing); the
certificate was chosen once, by SNI, but every `:authority` goes through the policy.

Request headers are checked by `contract.h2_head`, as on the mitmproxy engine.
What a connection may cost is bounded by the world's limits, as nginx bounds it:
- request bodies: the connection window is `h2_max_buffered` (at least one `max_body` and
  a byte), handed back when a stream is done with its body, never on arrival, so flow
  control holds a peer to it (nginx too refills windows as the body is consumed); a
  stream's own window is `max_body` + 1, so a body one byte over gets the edge's 413.
  Bodies are forwarded whole, so when partial bodies fill the window and none can finish,
  the newest stream is refused (REFUSED_STREAM: not processed, safe to retry);
- streams: the stream beyond `h2_max_streams` is refused, the others carry on;
- control frames (SETTINGS, PING, RST_STREAM, PRIORITY, empty DATA, unknown): more than
  `h2_control_frames` in 10 s is a flood (rapid reset, CVE-2023-44487): GOAWAY
  ENHANCE_YOUR_CALM. Input is fed to h2conn in slices, so a flood stops mid-read;
- a peer that does not read: while the transport is paused nothing is read, and so
  nothing (PING answers, responses) is generated;
- idle: no stream for `idle_timeout`: GOAWAY and close.

The framing is `h2conn`'s (why not h2: see there); the checks of a request are `h2_head`'s,
the framing of an answer `response_fields`', cookie crumbs joined by `join_cookies`, and
what a connection has to send goes out in one write per read or per loop iteration, not one
per frame.
"""
from __future__ import annotations

import asyncio

from lab.edge import h2conn as hc
from lab.edge.contract import H2Head, body_too_large, h2_head, join_cookies, new_request, response_fields, sent_body
from lab.edge.core import EdgeCore, Malformed
from lab.policy import Target

CONTROL_PERIOD = 10.0  # seconds over which h2_control_frames are counted
_SLICE = 16 * 1024  # bytes handed to h2conn at a time: a flood is cut off within one slice
_FLUSH_AT = 64 * 1024  # response bytes queued in h2conn before they are written at once (backpressure stays prompt)
_HEADS = 16  # header blocks a connection remembers the check of
_HEAD_BYTES = 4096  # ... when they are no larger than this


class _Stream:
    __slots__ = ("headers", "head", "body", "held", "ended", "receiving", "exchange", "out")

    def __init__(self, headers: list[tuple[str, str]], head: H2Head) -> None:
        self.headers = headers
        self.head = head
        self.body: bytearray | None = bytearray()
        self.held = 0  # flow-controlled bytes received and not yet acknowledged
        self.ended = False  # the client's side is done
        self.receiving = True  # its body still counts towards a request (not yet answered)
        self.exchange = None  # the origin leg, cancelled if the stream goes away
        self.out: bytes | memoryview | None = None  # response body still to send


class H2Protocol(asyncio.Protocol):
    def __init__(self, core: EdgeCore, conn) -> None:
        self.core = core
        self.conn = conn  # the TLSConnection: our transport
        self.state = conn.state
        self.limits = limits = core.world.limits  # a connection keeps the limits it started with
        # A body may reach max_body + 1 bytes without a window update: one byte over is how a
        # stream shows it is too large. The connection window bounds them all (connection_made).
        # A stream beyond h2_max_streams is refused here, alone (RFC 9113 5.1.2), not the connection.
        self.h2 = hc.ServerConnection({
            hc.MAX_CONCURRENT_STREAMS: limits.h2_max_streams,
            hc.INITIAL_WINDOW_SIZE: min(limits.max_body + 1, hc.MAX_WINDOW),
            hc.MAX_HEADER_LIST_SIZE: limits.max_header_bytes,
        })
        self.streams: dict[int, _Stream] = {}
        # A client repeats its header block from request to request, and its check is pure: a
        # block that passed is remembered (bounded), so a repeat costs one lookup.
        self.heads: dict[tuple, tuple[list[tuple[str, str]], H2Head]] = {}
        self.sending: dict[int, _Stream] = {}  # streams with response bytes still to send
        self.queued = 0  # response bytes handed to h2conn and not yet written
        self.flush_soon = False  # a write of what h2conn has to send is scheduled
        self.held = 0  # request body bytes held on this connection
        self.pending = bytearray()  # read, not yet given to h2conn (while the peer does not read)
        self.paused = False
        self.closed = False
        self.loop = asyncio.get_running_loop()
        self.control_count = 0
        self.control_since = self.loop.time()
        self.idle_since: float | None = self.loop.time()
        self.paused_since = 0.0
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        self.h2.initiate()
        # It starts at 65535 (RFC 9113 6.9.2). From here on the edge hands bytes back as bodies
        # are done with (_release), never on arrival.
        extra = self._window() - self.h2.in_window
        if extra > 0:
            self.h2.increment_window(extra)
        self._flush()
        self.timer = self.loop.call_later(self.limits.idle_timeout, self._tick)

    def _flush(self) -> None:
        self.queued = 0
        data = self.h2.data_to_send()
        if data:
            self.conn.write(data)

    def _soon(self) -> None:
        """Write what h2conn has to send once this loop iteration is done: the answers of every origin
        that replied in it go out in one TLS record and one system call."""
        if not self.flush_soon:
            self.flush_soon = True
            self.loop.call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self.flush_soon = False
        if not self.closed:
            self._flush()

    # ---- reading ----------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if not self.pending and len(data) <= _SLICE and not self.paused and not self.closed:
            self._receive(data)  # the usual read: one slice, nothing held back, no copy
        else:
            self.pending += data
        self._process()

    def _process(self) -> None:
        while self.pending and not self.paused and not self.closed:
            chunk = bytes(self.pending[:_SLICE])
            del self.pending[:_SLICE]
            self._receive(chunk)

    def _receive(self, chunk: bytes) -> None:
        try:
            happenings = self.h2.receive(chunk)
        except hc.ProtocolError:
            self._flush()  # the GOAWAY with its code
            self._close()
            return
        for happening in happenings:
            self._event(happening)
            if self.closed:
                return
        self._unstick()
        self._flush()

    def _event(self, happening: tuple) -> None:
        what, stream_id = happening[0], happening[1]
        if what is hc.ON_REQUEST:
            self._request(stream_id, happening[2])
        elif what is hc.ON_DATA:
            self._data(stream_id, happening[2], happening[3], happening[4])
        elif what is hc.ON_ENDED:
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.ended = True
                if stream.receiving:
                    self._dispatch(stream_id, stream)
        elif what is hc.ON_RESET:
            self._control()
            stream = self.streams.get(stream_id)
            if stream is not None:
                stream.ended = True
                self._finish(stream_id, stream)
        elif what is hc.ON_WINDOW:
            self._pump()
        elif what is hc.ON_GOAWAY:
            self._flush()
            self._close()
        else:  # SETTINGS, PING, their ACKs, PRIORITY, unknown frames
            self._control()

    def _control(self) -> None:
        now = self.loop.time()
        if now - self.control_since >= CONTROL_PERIOD:
            self.control_since, self.control_count = now, 0
        self.control_count += 1
        if self.control_count > self.limits.h2_control_frames:
            self._goaway(hc.ENHANCE_YOUR_CALM)

    def _request(self, stream_id: int, raw: list[tuple[bytes, bytes]]) -> None:
        if len(self.streams) >= self.limits.h2_max_streams:
            self.h2.reset(stream_id, hc.REFUSED_STREAM)
            self._control()  # a peer ignoring the limit on purpose is the rapid-reset pattern
            return
        key = tuple(raw)
        known = self.heads.get(key)
        if known is None:
            # As HTTP/1: bytes kept as latin-1, so any byte is a rule's matter, never a decode error.
            headers = join_cookies([(k.decode("latin-1"), v.decode("latin-1")) for k, v in raw])
            known = headers, h2_head(headers, self.limits)
            if known[1].problem is None and known[1].size <= _HEAD_BYTES:
                if len(self.heads) >= _HEADS:
                    self.heads.clear()
                self.heads[key] = known
        headers, head = known
        stream = self.streams[stream_id] = _Stream(headers, head)
        self.idle_since = None
        if head.problem is not None:
            self._refuse(stream_id, stream, head.problem)

    def _window(self) -> int:
        """Request body bytes a connection may hold: h2_max_buffered, and one whole body at least."""
        return max(self.limits.h2_max_buffered, self.limits.max_body + 1, 65535)

    def _data(self, stream_id: int, data: bytes, length: int, ended: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or not stream.receiving:
            self._give_back(length)  # nobody wants it
            return
        if not length and not ended:
            self._control()  # empty DATA frames cost the edge work and the peer nothing
        stream.body += data
        stream.held += length
        self.held += length
        too_large = body_too_large(self.limits, len(stream.body))
        if too_large:
            self._refuse(stream_id, stream, too_large)

    def _unstick(self) -> None:
        """Every byte of the window is held by a body still arriving: none can finish, so one must go."""
        if self.h2.in_window > 0 or not self.held:
            return
        holders = [sid for sid, s in self.streams.items() if s.held]
        if len(holders) < 2 or any(not self.streams[sid].receiving or self.streams[sid].ended for sid in holders):
            return  # a finished body is on its way to an origin; its bytes come back when it is answered
        newest = max(holders)
        self.h2.reset(newest, hc.REFUSED_STREAM)
        self.streams[newest].ended = True
        self._finish(newest, self.streams[newest])

    # ---- answering --------------------------------------------------------------------
    def _dispatch(self, stream_id: int, stream: _Stream) -> None:
        head, body = stream.head, bytes(stream.body)
        stream.body = None
        stream.receiving = False
        if head.length is not None and head.length != len(body):
            self._refuse(stream_id, stream, Malformed(f"content-length {head.length} but a body of {len(body)} bytes"))
            return
        pseudo = head.pseudo
        path = pseudo[":path"]
        req = new_request(self.state, pseudo[":method"],
                          Target(hosts=tuple(head.hosts), authority=pseudo.get(":authority"),
                                 path=path.split("?", 1)[0]),
                          path, head.fields, body)
        exchange = self.core.handle(self.conn.listener, req, lambda response: self._answer(stream_id, response))
        if self.streams.get(stream_id) is stream and stream.out is None:
            stream.exchange = exchange  # still waiting for the origin

    def _refuse(self, stream_id: int, stream: _Stream, problem: Malformed) -> None:
        state = self.state
        accept = next((v for k, v in stream.headers if k == "accept"), None)
        stream.receiving = False
        stream.body = None
        self._release(stream)  # what it sent is not needed any more
        self._answer(stream_id, self.core.refuse_malformed(self.conn.listener, problem, trace=state.next_trace(),
                                                           conn=state.conn_id, sni=state.sni, http2=True,
                                                           accept=accept))

    def _answer(self, stream_id: int, response) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or self.closed:
            return
        stream.exchange = None
        status, out, payload = response
        head = [(b":status", str(status).encode())]
        head += [(k.encode("latin-1", "replace"), v.encode("latin-1", "replace"))
                 for k, v in response_fields(out, len(payload), http2=True)]
        payload = sent_body(stream.head.pseudo.get(":method", ""), payload)
        try:
            self.h2.send_headers(stream_id, head, end_stream=not payload)
        except hc.StreamClosed:
            self._finish(stream_id, stream)
            return
        if payload:
            stream.out = payload
            self._send(stream_id, stream)
            if stream.out is not None and not self.closed:
                self.sending[stream_id] = stream  # the rest when a window or the transport allows
        else:
            self._finish(stream_id, stream)
        self._soon()

    def _pump(self) -> None:
        """Send what windows and the transport allow of every pending response."""
        for stream_id, stream in list(self.sending.items()):
            self._send(stream_id, stream)

    def _send(self, stream_id: int, stream: _Stream) -> None:
        while stream.out is not None and not self.paused and not self.closed:
            out = stream.out
            try:
                window = min(self.h2.window(stream_id), self.h2.max_frame)
                if window <= 0:
                    break
                if len(out) <= window:  # the rest in one frame, as most answers are: no slicing
                    chunk, stream.out = bytes(out), None
                else:
                    view = memoryview(out)
                    chunk, stream.out = bytes(view[:window]), view[window:]
                self.h2.send_data(stream_id, chunk, end_stream=stream.out is None)
                self.queued += len(chunk)
            except hc.StreamClosed:
                stream.out = None
            if not stream.out:
                stream.out = None
                self._finish(stream_id, stream)
            if self.queued >= _FLUSH_AT:
                self._flush()  # the transport may pause us (pause_writing) before more is queued

    def _release(self, stream: _Stream) -> None:
        if stream.held:
            self.held -= stream.held
            self._give_back(stream.held)
            stream.held = 0

    def _give_back(self, length: int) -> None:
        if length and not self.closed:
            try:
                self.h2.increment_window(length)
            except hc.ProtocolError:
                pass

    def _finish(self, stream_id: int, stream: _Stream) -> None:
        """The stream is done (answered or reset): its origin leg stops and its window comes back."""
        self.streams.pop(stream_id, None)
        self.sending.pop(stream_id, None)
        if stream.exchange is not None:
            stream.exchange.cancel()
            stream.exchange = None
        if not stream.ended and stream.out is None and not self.closed:
            self.h2.reset(stream_id, hc.NO_ERROR)  # answered before the request was complete (RFC 9113 8.1)
        self._release(stream)
        if not self.streams:
            self.idle_since = self.loop.time()

    # ---- the connection ---------------------------------------------------------------
    def _tick(self) -> None:
        if self.closed:
            return
        now = self.loop.time()
        idle = self.limits.idle_timeout
        if self.paused and now - self.paused_since >= idle:
            self._close(abort=True)  # the peer stopped reading what it asked for
            return
        if self.idle_since is not None and now - self.idle_since >= idle:
            self._goaway(hc.NO_ERROR)
            return
        self.timer = self.loop.call_later(idle - (now - self.idle_since) if self.idle_since is not None else idle,
                                          self._tick)

    def _goaway(self, code: int) -> None:
        self.h2.goaway(code)
        self._flush()
        self._close()

    def _close(self, abort: bool = False) -> None:
        self._drop_all()
        if abort:
            self.conn.abort()
        else:
            self.conn.close()

    def _drop_all(self) -> None:
        self.closed = True
        self.pending.clear()
        if self.timer:
            self.timer.cancel()
        for stream in self.streams.values():
            if stream.exchange is not None:
                stream.exchange.cancel()
        self.streams.clear()
        self.sending.clear()

    def eof_received(self) -> None:
        pass

    def connection_lost(self, exc) -> None:
        self._drop_all()

    def pause_writing(self) -> None:
        self.paused = True
        self.paused_since = self.loop.time()
        self.conn.pause_reading()

    def resume_writing(self) -> None:
        if not self.paused:
            return
        self.paused = False
        self.conn.resume_reading()
        self._process()
        self._pump()
        self._flush()
