"""HTTP/1.1 on the edge: httptools (llhttp, strict mode), answers in order, no task per request.

Requests on one connection are answered strictly in order (pipelining); each is decided
and forwarded straight from `data_received` once the one before it is answered.

Hostile input is bounded the nginx way, every bound from `world.limits`:
- llhttp's strict defaults refuse what nginx refuses (obs-fold, bare CR or LF, Content-Length
  with Transfer-Encoding, two Content-Lengths, an unknown Transfer-Encoding): the lab's 400;
  the rest of the head is `contract.h1_head`'s, as on the mitmproxy engine (a coding other
  than plain "chunked" 501, CONNECT, no Host, an Upgrade with a body, a version other than
  1.0 and 1.1 505, a declared body over `max_body` 413);
- request line over `max_request_line`: 414; a field over `max_field`, all fields over
  `max_header_bytes` or more than `max_headers` of them: 431; a body over `max_body`: 413,
  at once for a declared length, as soon as a chunked body crosses it; never buffered past it;
- at most `max_pipelined` requests read ahead of their answers: past that, bytes stay unparsed
  and the socket stops being read; while the peer reads none of our answers nothing more
  is dispatched;
- `header_timeout` for a request head, `body_timeout` between body reads (both answer 408
  and close: the client learns why), `idle_timeout` between keep-alive requests (closed
  silently, as a client expects of an idle connection), `send_timeout` for a peer that stops
  reading our answers.

After a refusal the client may still be sending: the rest is read and dropped for a while
(nginx's lingering close), so the client's TCP stack does not reset away the answer.
"""
from __future__ import annotations

import asyncio
from collections import deque

import httptools

from lab.edge.contract import body_too_large, h1_head, new_request, reason, response_fields, sent_body
from lab.edge.core import EdgeCore, Malformed, Response, absolute_authority
from lab.policy import Target

# "GET / HTTP/1.1\r\n\r\n": llhttp wants CRLF, so no complete request is shorter. Feeding at
# most (room - 1) * _MIN_REQUEST bytes at a time can complete at most `room` requests.
_MIN_REQUEST = 18
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_EMPTY = memoryview(b"")


class _Stop(Exception):
    """Raised in a parser callback to stop llhttp at once; what to answer is already queued."""


class _Message:
    """The request being parsed."""

    __slots__ = ("started", "url", "raw", "fields", "field_bytes", "fed", "in_body", "remaining", "body", "expect",
                 "keep_alive", "version")

    def __init__(self, now: float) -> None:
        self.started = now
        self.url = b""
        self.raw: list[tuple[bytes, bytes]] = []  # header fields as received (trailers are not kept)
        self.fields = self.field_bytes = 0  # trailers included
        self.fed = 0  # bytes fed while this head was being read (an upper bound of its size)
        self.in_body = False
        self.remaining = 0  # of a declared Content-Length
        self.body = bytearray()
        self.expect = False  # Expect: 100-continue, no 100 sent yet
        self.keep_alive = True
        self.version = "1.1"


class H1Protocol(asyncio.Protocol):
    def __init__(self, core: EdgeCore, conn) -> None:
        self.core = core
        self.conn = conn  # the TLSConnection: our transport
        self.state = conn.state
        self.limits = core.world.limits  # a connection keeps the limits it started with
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        # Parsed, not yet answered: (Request, close, HTTP version) or (None, Malformed, linger).
        self.queue: deque = deque()
        self.busy = False  # the queue's head went to the core; its answer is awaited
        self.msg: _Message | None = None
        self.pending = _EMPTY  # read but not parsed: held back while the queue is full
        self.stopped = False  # nothing more is parsed on this connection (refusal, close, upgrade)
        self.closed = False
        self.writable = True  # the peer reads what we write
        self.paused = False  # we stopped reading the socket
        self.lingering = False
        self._dropped = False  # input came after the last request: linger before closing
        self._pumping = self._again = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        now = self.loop.time()
        self._idle_since = self._last_read = self._send_since = self._linger_since = now
        self._first = True  # waiting for the connection's first request: header_timeout, not idle_timeout

    # ---- transport events ---------------------------------------------------
    def connection_made(self, transport) -> None:
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._last_read = self.loop.time()
        if self.lingering or self.stopped:
            self._dropped = True  # after a refusal or a last request: read and dropped
            self._arm()
            return
        self.pending = memoryview(bytes(self.pending) + data) if self.pending else memoryview(data)
        self._pump()

    def eof_received(self) -> None:
        self._close()

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._cancel_timer()
        self.queue.clear()
        self.msg = None
        self.pending = _EMPTY

    def pause_writing(self) -> None:
        self.writable = False
        self._send_since = self.loop.time()
        self._arm()

    def resume_writing(self) -> None:
        self.writable = True
        self._pump()

    # ---- the loop: parse while there is room, answer in order ----------------
    def _pump(self) -> None:
        if self._pumping:  # an answer given from inside the loop: go round once more
            self._again = True
            return
        self._pumping = True
        try:
            while not self.closed:
                self._again = False
                self._parse()
                self._dispatch()
                if not self._again:
                    break
        finally:
            self._pumping = False
        if not self.closed:
            self._flow()
            self._arm()

    def _parse(self) -> None:
        limits = self.limits
        while self.pending and not self.stopped:
            room = limits.max_pipelined - len(self.queue) - self.busy
            if room <= 0:
                return
            msg = self.msg
            if msg is not None and msg.remaining:
                n = msg.remaining  # the rest of a declared body: no other request can end inside it
            else:
                n = max(1, (room - 1) * _MIN_REQUEST)
            if n >= len(self.pending):
                view, self.pending = self.pending, _EMPTY
            else:
                view, self.pending = self.pending[:n], self.pending[n:]
            try:
                self.parser.feed_data(view)
            except httptools.HttpParserUpgrade:
                self.stopped = True  # what follows an Upgrade or CONNECT is not HTTP/1 we agreed on
            except httptools.HttpParserCallbackError:
                if not self.stopped:  # not one of our _Stop: a bug here, to be seen
                    raise
            except httptools.HttpParserError as e:
                if not self.stopped:  # else: bytes after a last request (llhttp refuses them), dropped
                    self._refuse(Malformed(str(e) or "bad request"))
            msg = self.msg
            if msg is not None and not msg.in_body and not self.stopped:
                # httptools holds a header field it has not finished; this bounds it.
                msg.fed += len(view)
                if msg.fed > _head_cap(limits):
                    self._refuse(Malformed(f"request head larger than {_head_cap(limits)} bytes "
                                           "(limits.max_header_bytes)", 431, "headers-too-large"))
        if self.stopped and self.pending:
            self.pending = _EMPTY
            self._dropped = True

    def _dispatch(self) -> None:
        while self.queue and not self.busy and not self.closed and self.writable:
            req, what, extra = self.queue.popleft()
            self.busy = True
            if req is None:
                self._respond(self._refusal(what), close=True, linger=extra)
            else:
                self.core.handle(self.conn.listener, req, lambda response, close=what, method=req.method,
                                 http10=extra == "1.0": self._respond(response, close, method=method, http10=http10))

    def _respond(self, response: Response, close: bool, *, method: str = "", http10: bool = False,
                 linger: bool = False) -> None:
        if self.closed:
            return
        status, headers, body = response
        lines = [f"HTTP/1.1 {status} {reason(status)}"]
        lines += [f"{k}: {v}" for k, v in response_fields(headers, len(body), http2=False, close=close,
                                                          keep_alive=http10)]
        self.conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + sent_body(method, body))
        self.busy = False
        self._idle_since = self.loop.time()
        self._first = False
        if close:
            self._finish(linger)
        else:
            self._pump()

    def _flow(self) -> None:
        """Read only while there is room; say 100 Continue once a body will be read."""
        held = bool(self.pending)
        if held and not self.paused:
            self.paused = True
            self.conn.pause_reading()
        elif not held and self.paused:
            self.paused = False
            self.conn.resume_reading()
        msg = self.msg
        if (msg is not None and msg.expect and not msg.body and not self.queue and not self.busy
                and self.writable and not self.stopped):
            msg.expect = False
            self.conn.write(_CONTINUE)

    # ---- parser callbacks (httptools) ---------------------------------------
    def on_message_begin(self) -> None:
        self.msg = _Message(self.loop.time())

    def on_url(self, fragment: bytes) -> None:
        msg = self.msg
        msg.url += fragment
        # The request line: method, target, " HTTP/1.1" and the spaces around the target.
        if len(self.parser.get_method()) + len(msg.url) + 10 > self.limits.max_request_line:
            self._stop(Malformed(f"request line longer than {self.limits.max_request_line} bytes "
                                 "(limits.max_request_line)", 414, "uri-too-long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        msg, limits = self.msg, self.limits
        size = len(name) + len(value)
        msg.fields += 1
        msg.field_bytes += size
        if size > limits.max_field or msg.fields > limits.max_headers or msg.field_bytes > limits.max_header_bytes:
            self._too_large(name, size)
        if not msg.in_body:  # a trailer is counted, never forwarded: it could name a second Host
            msg.raw.append((name, value))

    def _too_large(self, name: bytes, size: int) -> None:
        limits = self.limits
        if size > limits.max_field:
            why = f"header field {name[:64].decode('latin-1')} larger than {limits.max_field} bytes (limits.max_field)"
        elif self.msg.fields > limits.max_headers:
            why = f"more than {limits.max_headers} header fields (limits.max_headers)"
        else:
            why = f"header fields larger than {limits.max_header_bytes} bytes (limits.max_header_bytes)"
        self._stop(Malformed(why, 431, "headers-too-large"))

    def on_headers_complete(self) -> None:
        msg, parser = self.msg, self.parser
        msg.in_body = True
        msg.version = parser.get_http_version()
        upgrade = parser.should_upgrade()
        head = h1_head(parser.get_method(), msg.version, msg.raw, self.limits, upgrade)
        if head.problem is not None:
            self._stop(head.problem)
        # The lab upgrades nothing: answer, then close.
        msg.keep_alive = not upgrade and parser.should_keep_alive()
        msg.remaining = head.length or 0
        msg.expect = msg.version == "1.1" and head.expect == b"100-continue" and (head.chunked or bool(head.length))

    def on_body(self, chunk: bytes) -> None:
        msg = self.msg
        if msg.remaining:
            msg.remaining -= len(chunk)
        too_large = body_too_large(self.limits, len(msg.body) + len(chunk))
        if too_large:
            self._stop(too_large)
        msg.body += chunk

    def on_message_complete(self) -> None:
        msg, self.msg = self.msg, None
        raw = msg.url.decode("latin-1")
        absolute = absolute_authority(raw)
        path_qs = raw
        if absolute is not None:
            rest = raw.split("://", 1)[1]
            path_qs = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        headers = [(name.decode("latin-1"), value.decode("latin-1")) for name, value in msg.raw]
        req = new_request(self.state, self.parser.get_method().decode("latin-1"),
                          Target(hosts=tuple(v for k, v in headers if k.lower() == "host"), absolute=absolute,
                                 path=path_qs.split("?", 1)[0]),
                          path_qs, headers, bytes(msg.body))
        self.queue.append((req, not msg.keep_alive, msg.version))
        if not msg.keep_alive:
            # The last request: llhttp itself refuses what follows (no _Stop: raising through
            # the parser costs more than the rest of a small request's parse).
            self.stopped = True

    # ---- refusals -------------------------------------------------------------
    def _refuse(self, problem: Malformed, *, linger: bool = True) -> None:
        """Queue the lab's own answer to what cannot be served, in order; parse nothing more."""
        self.stopped = True
        self.msg = None
        self.queue.append((None, problem, linger))

    def _stop(self, problem: Malformed) -> None:
        self._refuse(problem)
        raise _Stop

    def _refusal(self, problem: Malformed) -> Response:
        state = self.state
        return self.core.refuse_malformed(self.conn.listener, problem, trace=state.next_trace(), conn=state.conn_id,
                                          sni=state.sni)

    # ---- closing and timers -----------------------------------------------------
    def _finish(self, linger: bool) -> None:
        """The last answer is written: close, or first drop what the client still sends."""
        if not (linger or self._dropped):
            self._close()
            return
        self.lingering = True
        self.msg = None
        self.queue.clear()
        self.pending = _EMPTY
        self._linger_since = self._last_read = self.loop.time()
        self._flow()  # resumes reading, if it was paused
        self._arm()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self._cancel_timer()
            self.conn.close()

    def _deadline(self) -> tuple[str, float] | None:
        limits = self.limits
        if self.closed:
            return None
        if self.lingering:
            return "linger", min(self._last_read + limits.lingering_timeout, self._linger_since + limits.lingering_time)
        if not self.writable:
            return "send", self._send_since + limits.send_timeout
        if self.pending:
            return None  # held back by us, not slow: no read timeout
        if self.msg is not None and not self.stopped:
            if self.msg.in_body:
                return "body", self._last_read + limits.body_timeout
            return "head", self.msg.started + limits.header_timeout
        if not self.queue and not self.busy:
            return "idle", self._idle_since + (limits.header_timeout if self._first else limits.idle_timeout)
        return None  # waiting on the origin: its own timeout applies

    def _arm(self) -> None:
        due = self._deadline()
        if due is None:
            self._cancel_timer()
            return
        # A later deadline keeps the timer: it re-checks when it fires (no re-arm per read).
        if self._timer is None or due[1] < self._timer_at:
            self._cancel_timer()
            self._timer_at = due[1]
            self._timer = self.loop.call_at(due[1], self._on_timer)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _on_timer(self) -> None:
        self._timer = None
        due = self._deadline()
        if due is None:
            return
        kind, when = due
        if when > self.loop.time():
            self._arm()
            return
        if kind in ("idle", "linger"):
            self._close()
        elif kind == "send":
            self.closed = True
            self.conn.abort()  # the peer reads nothing: no close_notify would reach it either
        else:
            limit = "header_timeout" if kind == "head" else "body_timeout"
            self._refuse(Malformed(f"request {kind} not received within {getattr(self.limits, limit):g} s "
                                   f"(limits.{limit})", 408, "request-timeout"), linger=False)
            self._pump()


def _head_cap(limits) -> int:
    # The request line, the fields, ": " and CRLF around each, plus one feed of the previous request.
    return limits.max_request_line + limits.max_header_bytes + 4 * (limits.max_headers + 1) \
        + limits.max_pipelined * _MIN_REQUEST
