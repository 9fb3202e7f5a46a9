"""One small interface for every event of the lab (DESIGN.md, "Rules of the house").

Adapters call `events.emit("route.decision", trace=..., **fields)`; the control plane,
`explain` and the live page read the same ring buffer or subscribe to it. Emitting is on
the hot path of every request, so it only appends to a deque and calls subscribers.
"""
from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any, Callable

KINDS = ("dns.answer", "dns.error", "tls.clienthello", "tls.cert", "tls.error", "route.decision",
         "origin.hit", "origin.error", "hostname.status", "lab.model",
         "proxy.tunnel", "proxy.closed", "proxy.refused")

Event = dict[str, Any]
Subscriber = Callable[[Event], None]


_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)


def new_trace() -> str:
    # Unique per process run without a syscall per request: random prefix, then a counter.
    return f"{_PREFIX}{next(_COUNTER):08x}"


class Events:
    def __init__(self, maxlen: int = 20000, start_id: int = 1) -> None:
        self._buf: deque[Event] = deque(maxlen=maxlen)
        self._ids = itertools.count(start_id)  # continue after the stored log, so ids stay unique
        self._subscribers: list[Subscriber] = []

    def emit(self, kind: str, trace: str | None = None, **data: Any) -> Event:
        event = {"id": next(self._ids), "ts": time.time(), "kind": kind, "trace": trace, **data}
        self._buf.append(event)
        for sub in self._subscribers:
            sub(event)
        return event

    def since(self, last_id: int = 0, limit: int | None = None) -> list[Event]:
        out = [e for e in self._buf if e["id"] > last_id]
        return out[:limit] if limit else out

    def oldest_id(self) -> int | None:
        return self._buf[0]["id"] if self._buf else None

    def trace(self, trace: str) -> list[Event]:
        return [e for e in self._buf if e["trace"] == trace]

    def subscribe(self, sub: Subscriber) -> Callable[[], None]:
        self._subscribers.append(sub)
        return lambda: self._subscribers.remove(sub)


class NullEvents(Events):
    """For callers that want no record (benchmarks of the bare carrier, unit tests)."""

    def emit(self, kind: str, trace: str | None = None, **data: Any) -> Event:
        return {}
