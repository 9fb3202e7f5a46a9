"""Keep-alive connections from the edge to the lab's origins, callback style.

The forwarding hot path: no task, no client session object per request; a pooled
connection writes the request bytes and calls back once the whole response is in.
Origins are the lab's own HTTP/1.1 servers, so responses are framed by Content-Length,
chunked encoding or connection close, and nothing else.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Callable

MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024
TIMEOUT = 30.0
IDLE_PER_ORIGIN = 256

# done(status, headers, body) on success; done(None, error_text, b"") on failure.
Done = Callable[[int | None, object, bytes], None]


class _ResponseReader:
    """Incremental HTTP/1.1 response framing."""

    def __init__(self, head_only: bool) -> None:
        self.head_only = head_only
        self.buf = bytearray()
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self.length: int | None = None
        self.chunked = False
        self.until_close = False
        self.keep_alive = True
        self.body = bytearray()
        self.in_head = True

    def feed(self, data: bytes) -> bool:
        """Returns True when the response is complete."""
        self.buf += data
        while self.in_head:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buf) > MAX_HEAD:
                    raise ValueError("response head too large")
                return False
            lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
            del self.buf[:end + 4]
            parts = lines[0].split(" ", 2)
            if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
                raise ValueError(f"bad status line {lines[0][:60]!r}")
            status = int(parts[1])
            if 100 <= status < 200:
                continue  # interim response: the final one follows
            self.status = status
            http10 = parts[0] == "HTTP/1.0"
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep:
                    raise ValueError("bad header line")
                name, value = name.strip(), value.strip()
                low = name.lower()
                if low == "content-length":
                    self.length = int(value)
                elif low == "transfer-encoding":
                    self.chunked = "chunked" in value.lower()
                elif low == "connection":
                    self.keep_alive = "close" not in value.lower() and (not http10 or "keep-alive" in value.lower())
                self.headers.append((name, value))
            if http10 and not any(n.lower() == "connection" for n, _ in self.headers):
                self.keep_alive = False
            self.in_head = False
            if self.head_only or status in (204, 304):
                return True
            if not self.chunked and self.length is None:
                self.until_close = True
                self.keep_alive = False
        if self.chunked:
            return self._chunks()
        if self.until_close:
            self.body += self.buf
            self.buf.clear()
            if len(self.body) > MAX_BODY:
                raise ValueError("response body too large")
            return False
        if len(self.buf) >= self.length:
            if self.length > MAX_BODY:
                raise ValueError("response body too large")
            self.body = self.buf[:self.length]
            del self.buf[:self.length]
            return True
        return False

    def _chunks(self) -> bool:
        while True:
            line_end = self.buf.find(b"\r\n")
            if line_end < 0:
                return False
            size = int(bytes(self.buf[:line_end]).split(b";")[0], 16)
            if size == 0:
                rest = self.buf[line_end + 2:]
                if not rest.startswith(b"\r\n") and rest.find(b"\r\n\r\n") < 0:
                    return False  # trailers still coming
                self.buf.clear()
                self.headers = [(n, v) for n, v in self.headers if n.lower() != "transfer-encoding"]
                return True
            if len(self.buf) < line_end + 2 + size + 2:
                return False
            self.body += self.buf[line_end + 2:line_end + 2 + size]
            del self.buf[:line_end + 2 + size + 2]
            if len(self.body) > MAX_BODY:
                raise ValueError("response body too large")


class _OriginConnection(asyncio.Protocol):
    def __init__(self, pool: "OriginPool", key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.reader: _ResponseReader | None = None
        self.done: Done | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.used = False
        self.received = False

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, data: bytes, head_only: bool, done: Done) -> None:
        self.reader = _ResponseReader(head_only)
        self.done = done
        self.received = False
        self.timer = self.pool.loop.call_later(TIMEOUT, self._timeout)
        self.transport.write(data)

    def _finish(self, status, headers, body) -> None:
        done, self.done = self.done, None
        if self.timer:
            self.timer.cancel()
        if done is not None:
            done(status, headers, body)

    def data_received(self, data: bytes) -> None:
        if self.reader is None:
            self.transport.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self.received = True
        try:
            complete = self.reader.feed(data)
        except ValueError as e:
            self.transport.close()
            self._finish(None, f"bad response from origin: {e}", b"")
            return
        if complete:
            reader, self.reader = self.reader, None
            self.used = True
            if reader.keep_alive and not reader.buf:
                self.pool._release(self)
            else:
                self.transport.close()
            self._finish(reader.status, reader.headers, bytes(reader.body))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self.pool._forget(self)
        if self.done is None:
            return
        reader = self.reader
        if reader is not None and reader.until_close and not reader.in_head:
            self.reader = None
            self._finish(reader.status, reader.headers, bytes(reader.body))
        elif reader is not None and self.used and not self.received:
            self.pool._retry(self)  # a reused keep-alive connection the origin had just closed
        else:
            self._finish(None, f"origin closed the connection{': ' + str(exc) if exc else ''}", b"")

    def _timeout(self) -> None:
        if self.transport:
            self.transport.abort()
        self._finish(None, f"no response within {TIMEOUT:.0f} s", b"")


class OriginPool:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle: dict[tuple[str, int], list[_OriginConnection]] = defaultdict(list)
        self.all: set[_OriginConnection] = set()
        self._requests: dict[_OriginConnection, tuple[bytes, bool]] = {}

    def request(self, host: str, port: int, data: bytes, head_only: bool, done: Done) -> None:
        key = (host, port)
        idle = self.idle[key]
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                self._requests[conn] = (data, head_only)
                conn.send(data, head_only, done)
                return
        self.loop.create_task(self._connect(key, data, head_only, done))

    async def _connect(self, key, data, head_only, done) -> None:
        try:
            _, conn = await asyncio.wait_for(self.loop.create_connection(lambda: _OriginConnection(self, key), *key), 5)
        except (OSError, asyncio.TimeoutError) as e:
            done(None, f"cannot connect to {key[0]}:{key[1]}: {getattr(e, 'strerror', None) or type(e).__name__}", b"")
            return
        self.all.add(conn)
        self._requests[conn] = (data, head_only)
        conn.send(data, head_only, done)

    def _release(self, conn: _OriginConnection) -> None:
        self._requests.pop(conn, None)
        idle = self.idle[conn.key]
        if len(idle) < IDLE_PER_ORIGIN:
            idle.append(conn)
        else:
            conn.transport.close()

    def _forget(self, conn: _OriginConnection) -> None:
        self.all.discard(conn)
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)

    def _retry(self, conn: _OriginConnection) -> None:
        data, head_only = self._requests.pop(conn, (b"", False))
        done, conn.done = conn.done, None
        if conn.timer:
            conn.timer.cancel()
        self.loop.create_task(self._connect(conn.key, data, head_only, done))

    def close(self) -> None:
        for conn in list(self.all):
            if conn.transport:
                conn.transport.abort()
        self.all.clear()
        self.idle.clear()
