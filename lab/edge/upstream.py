"""Keep-alive connections from the edge to the lab's origins, callback style.

The forwarding hot path: no task, no client session object per request; a pooled
connection writes the request bytes and calls back once the whole response is in.
Origins are the lab's own HTTP/1.1 servers, so responses are framed by Content-Length,
chunked encoding or connection close, and nothing else.

Each origin gets at most `origin_max_connections` connections; requests beyond wait in a
bounded queue, so a burst of streams cannot overflow an origin's listen backlog. Every
request is an `Exchange` its client can cancel (a reset stream, a closed connection): a
queued one leaves the queue, one on the wire closes its connection, since HTTP/1.1 has
no other way to withdraw a request. Nothing is left running for a client that left.
"""
from __future__ import annotations

import asyncio
import os
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Callable

from lab.topology import Limits


@dataclass(frozen=True)
class Failure:
    """Why an origin gave no answer, as the edge will say it."""

    status: int  # 502 down or bad answer, 503 every connection busy and the queue full, 504 too slow
    code: str
    reason: str


Done = Callable[[object], None]  # called once, with (status, headers, body) or a Failure


class _ResponseReader:
    """Incremental HTTP/1.1 response framing."""

    def __init__(self, head_only: bool, max_head: int, max_body: int) -> None:
        self.head_only = head_only
        self.max_head = max_head
        self.max_body = max_body
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
                if len(self.buf) > self.max_head:
                    raise ValueError("response head too large")
                return False
            lines = self.buf[:end].decode("latin-1").split("\r\n")
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
            if self.length is not None and self.length > self.max_body:
                raise ValueError("response body too large")
        if self.chunked:
            return self._chunks()
        if self.until_close:
            self.body += self.buf
            self.buf.clear()
            if len(self.body) > self.max_body:
                raise ValueError("response body too large")
            return False
        if len(self.buf) >= self.length:
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
            if len(self.body) > self.max_body:
                raise ValueError("response body too large")


class Exchange:
    """One request to an origin, from queued to answered; `cancel()` when its client is gone."""

    __slots__ = ("pool", "key", "data", "head_only", "done", "limits", "conn", "task", "timer")

    def __init__(self, pool: "OriginPool", key: tuple[str, int], data: bytes, head_only: bool, done: Done,
                 limits: Limits) -> None:
        self.pool = pool
        self.key = key
        self.data = data
        self.head_only = head_only
        self.done: Done | None = done
        self.limits = limits
        self.conn: _OriginConnection | None = None
        self.task: asyncio.Task | None = None  # while connecting
        self.timer: asyncio.TimerHandle | None = None  # while queued, or on the wire

    def cancel(self) -> None:
        if self.done is not None:
            self.done = None
            self.pool._cancel(self)

    def _finish(self, result) -> None:
        done, self.done = self.done, None
        if self.timer:
            self.timer.cancel()
        self.pool.active.discard(self)
        if done is not None:
            done(result)


class _OriginConnection(asyncio.Protocol):
    def __init__(self, pool: "OriginPool", key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.reader: _ResponseReader | None = None
        self.exchange: Exchange | None = None
        self.used = False
        self.received = False
        self.idle_until = 0.0  # loop time at which an unused keep-alive connection is closed

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, ex: Exchange) -> None:
        limits = ex.limits
        self.reader = _ResponseReader(ex.head_only, limits.max_header_bytes, limits.origin_max_response)
        self.exchange, ex.conn = ex, self
        self.received = False
        ex.timer = self.pool.loop.call_later(limits.origin_timeout, self._timeout)
        self.transport.write(ex.data)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if self.reader is None or ex is None:
            self.transport.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        self.received = True
        try:
            complete = self.reader.feed(data)
        except ValueError as e:
            self._fail(Failure(502, "origin-bad-response", f"bad response from origin: {e}"))
            return
        if complete:
            reader, self.reader, self.exchange = self.reader, None, None
            self.used = True
            if reader.keep_alive and not reader.buf:
                self.pool._release(self, ex.limits.origin_idle_timeout)
            else:
                self.transport.close()
            ex._finish((reader.status, reader.headers, bytes(reader.body)))

    def _fail(self, failure: Failure) -> None:
        ex, self.exchange, self.reader = self.exchange, None, None
        self.transport.abort()
        if ex is not None:
            ex._finish(failure)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        ex, reader = self.exchange, self.reader
        self.exchange = self.reader = None
        self.pool._forget(self)
        if ex is None:
            return
        if reader is not None and reader.until_close and not reader.in_head:
            ex._finish((reader.status, reader.headers, bytes(reader.body)))
        elif self.used and not self.received:
            self.pool._retry(ex)  # a reused keep-alive connection the origin had just closed
        else:
            ex._finish(Failure(502, "origin-unreachable",
                               f"origin closed the connection{': ' + str(exc) if exc else ''}"))

    def _timeout(self) -> None:
        ex = self.exchange
        self._fail(Failure(504, "origin-timeout", f"no response within {ex.limits.origin_timeout:g} s"))


class OriginPool:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.idle: dict[tuple[str, int], list[_OriginConnection]] = defaultdict(list)
        self.open: dict[tuple[str, int], int] = defaultdict(int)  # connecting or connected, per origin
        self.waiting: dict[tuple[str, int], deque[Exchange]] = defaultdict(deque)
        self.all: set[_OriginConnection] = set()
        self.active: set[Exchange] = set()  # connecting or on the wire
        self._sweep_at: asyncio.TimerHandle | None = None  # closes idle connections past their time

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    def request(self, host: str, port: int, data: bytes, head_only: bool, done: Done, limits: Limits) -> Exchange:
        ex = Exchange(self, (host, port), data, head_only, done, limits)
        self._dispatch(ex)
        return ex

    def _dispatch(self, ex: Exchange) -> None:
        key, limits = ex.key, ex.limits
        idle = self.idle[key]
        while idle:
            conn = idle.pop()
            if not conn.transport.is_closing():
                self.active.add(ex)
                conn.send(ex)
                return
        if self.open[key] < limits.origin_max_connections:
            self.open[key] += 1
            self.active.add(ex)
            ex.task = self.loop.create_task(self._connect(ex))
            return
        waiting = self.waiting[key]
        if len(waiting) >= limits.origin_max_queued:
            ex._finish(Failure(503, "origin-busy", f"{self.open[key]} connections to {key[0]}:{key[1]} busy and "
                                                   f"{len(waiting)} requests waiting for one"))
            return
        waiting.append(ex)
        ex.timer = self.loop.call_later(limits.origin_timeout, self._queue_timeout, ex)

    def _queue_timeout(self, ex: Exchange) -> None:
        self.waiting[ex.key].remove(ex)
        ex._finish(Failure(504, "origin-timeout", f"no free connection to the origin within "
                                                  f"{ex.limits.origin_timeout:g} s"))

    async def _connect(self, ex: Exchange) -> None:
        key = ex.key
        try:
            _, conn = await asyncio.wait_for(self.loop.create_connection(lambda: _OriginConnection(self, key), *key),
                                             ex.limits.origin_connect_timeout)
        except asyncio.TimeoutError:
            self._connect_failed(ex, Failure(504, "origin-timeout", f"cannot connect to {key[0]}:{key[1]}: no answer "
                                                                   f"within {ex.limits.origin_connect_timeout:g} s"))
            return
        except OSError as e:  # asyncio's strerror repeats the address: say what the kernel said
            why = os.strerror(e.errno) if e.errno else str(e) or type(e).__name__
            self._connect_failed(ex, Failure(502, "origin-unreachable", f"cannot connect to {key[0]}:{key[1]}: {why}"))
            return
        except asyncio.CancelledError:  # the pool is closing
            self.open[key] -= 1
            raise
        ex.task = None
        self.all.add(conn)
        if ex.done is None:  # cancelled just as the connection came up: keep it for the next request
            self._release(conn, ex.limits.origin_idle_timeout)
        else:
            conn.send(ex)

    def _connect_failed(self, ex: Exchange, failure: Failure) -> None:
        self.open[ex.key] -= 1
        ex.task = None
        ex._finish(failure)
        self._next(ex.key)

    def _next(self, key: tuple[str, int]) -> None:
        """A connection slot or an idle connection came free: the oldest waiting request takes it."""
        waiting = self.waiting.get(key)
        if waiting:
            ex = waiting.popleft()
            ex.timer.cancel()
            ex.timer = None
            self._dispatch(ex)

    def _release(self, conn: _OriginConnection, idle_timeout: float) -> None:
        # Appended in the order they came free (and taken from the end): the first is the oldest.
        conn.idle_until = self.loop.time() + idle_timeout
        self.idle[conn.key].append(conn)
        if self._sweep_at is None or conn.idle_until < self._sweep_at.when():  # a shorter limit came in
            if self._sweep_at is not None:
                self._sweep_at.cancel()
            self._sweep_at = self.loop.call_at(conn.idle_until, self._sweep)
        self._next(conn.key)

    def _sweep(self) -> None:
        """Close the idle connections whose time is up; come back when the next one's is."""
        self._sweep_at, now, due = None, self.loop.time(), float("inf")
        for idle in self.idle.values():
            while idle and idle[0].idle_until <= now:
                idle.pop(0).transport.close()  # connection_lost forgets it
            if idle:
                due = min(due, idle[0].idle_until)
        if due != float("inf"):
            self._sweep_at = self.loop.call_at(due, self._sweep)

    def _forget(self, conn: _OriginConnection) -> None:
        if conn in self.all:
            self.all.discard(conn)
            self.open[conn.key] -= 1
        idle = self.idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._next(conn.key)

    def _retry(self, ex: Exchange) -> None:
        if ex.timer:
            ex.timer.cancel()
        ex.conn = None
        self.active.discard(ex)
        self._dispatch(ex)

    def _cancel(self, ex: Exchange) -> None:
        self.active.discard(ex)
        if ex.timer:
            ex.timer.cancel()
        if ex.task is not None:
            pass  # let the connect finish (a cancelled connect may leak its socket): _connect keeps it idle
        elif ex.conn is not None and ex.conn.exchange is ex:
            ex.conn.exchange = ex.conn.reader = None
            ex.conn.transport.abort()
        else:
            waiting = self.waiting.get(ex.key)
            if waiting and ex in waiting:
                waiting.remove(ex)

    def close(self) -> None:
        if self._sweep_at is not None:
            self._sweep_at.cancel()
            self._sweep_at = None
        for q in self.waiting.values():
            for ex in q:
                ex.timer.cancel()
        self.waiting.clear()
        for ex in list(self.active):
            if ex.task is not None:
                ex.task.cancel()
        for conn in list(self.all):
            if conn.transport:
                conn.transport.abort()
        self.all.clear()
        self.idle.clear()
        self.open.clear()
