"""HTTP/1.1 on the edge: aiohttp's request parser (llhttp), responses in order, no task per request.

Requests on one connection are answered strictly in order (pipelining); a request
without a body is decided and forwarded straight from `data_received`.
"""
from __future__ import annotations

import asyncio
from collections import deque
from http import HTTPStatus

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD

from lab.edge.core import EdgeCore, Request, Response, absolute_authority
from lab.policy import Target, decide

_REASONS = {s.value: s.phrase for s in HTTPStatus}
MAX_BODY = 1024 * 1024


class H1Protocol(asyncio.Protocol):
    def __init__(self, core: EdgeCore, conn) -> None:
        self.core = core
        self.conn = conn  # the TLSConnection: our transport
        self.parser = HttpRequestParser(self, asyncio.get_running_loop(), 2 ** 16, max_line_size=8190,
                                        max_field_size=8190, auto_decompress=False)
        self.queue: deque = deque()
        self.busy = False
        self.closed = False
        self._reading_paused = False  # read by aiohttp's StreamReader for request bodies

    def connection_made(self, transport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            messages, _, _ = self.parser.feed_data(data)
        except HttpProcessingError as e:
            self.queue.append((None, e))
        else:
            self.queue.extend(messages)
        self._next()

    def _next(self) -> None:
        while self.queue and not self.busy and not self.closed:
            message, payload = self.queue.popleft()
            self.busy = True
            if message is None:
                self._malformed(payload)
            elif payload is EMPTY_PAYLOAD:
                self._dispatch(message, b"")
            else:
                asyncio.get_running_loop().create_task(self._with_body(message, payload))

    async def _with_body(self, message, payload) -> None:
        try:
            body = await payload.read()
        except Exception as e:  # a broken body is the client's mistake: answer it, do not crash
            self._malformed(e)
            return
        if len(body) > MAX_BODY:
            self._malformed(ValueError(f"request body larger than {MAX_BODY} bytes"))
            return
        self._dispatch(message, body)

    def _dispatch(self, message, body: bytes) -> None:
        conn = self.conn
        raw = message.path
        absolute = absolute_authority(raw)
        path_qs = raw
        if absolute is not None:
            rest = raw.split("://", 1)[1]
            path_qs = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.raw_headers]
        req = Request(method=message.method,
                      target=Target(hosts=tuple(v for k, v in headers if k.lower() == "host"), absolute=absolute,
                                    path=path_qs.split("?", 1)[0]),
                      path_qs=path_qs, headers=headers, body=body, client=conn.peer[0], sni=conn.sni,
                      conn=conn.conn_id, trace="")
        req.trace = self.core.trace_of(headers, conn.next_trace())
        close = message.should_close
        self.core.handle(conn.listener, req, lambda response: self._respond(response, close))

    def _respond(self, response: Response, close: bool) -> None:
        status, headers, body = response
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
        lines += [f"{k}: {v}" for k, v in headers]
        lines.append(f"Content-Length: {len(body)}")
        if close:
            lines.append("Connection: close")
        self.conn.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + body)
        self.busy = False
        if close:
            self.closed = True
            self.conn.close()
        else:
            self._next()

    def _malformed(self, exc: Exception) -> None:
        text = str(getattr(exc, "message", None) or exc or "bad request")
        conn = self.conn
        # Two Host headers stop the parser; what that means is the policy's call.
        decision = (decide(conn.listener, conn.sni, Target(hosts=("?", "?")), self.core.world)
                    if "Duplicate 'Host'" in text else None)
        self._respond(self.core.refuse_malformed(conn.listener, trace=conn.next_trace(), conn=conn.conn_id, sni=conn.sni,
                                                 problem=text, decision=decision), close=True)

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.conn.pause_reading()

    def resume_reading(self) -> None:
        self._reading_paused = False
        self.conn.resume_reading()

    def eof_received(self) -> None:
        try:
            self.parser.feed_eof()
        except HttpProcessingError:
            pass

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.queue.clear()

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass
