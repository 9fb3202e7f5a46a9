"""One small interface for every event of the lab (docs/design.md, "Architecture").

Adapters call `events.emit("route.decision", trace=..., **fields)`; the control plane,
`explain` and the live page read the same ring buffer or subscribe to it. Emitting is on
the hot path of every request, so it only appends to a deque and calls subscribers.

A field's text is whatever a client sent (a path, an SNI, a header): each is cut to
`field_limit` characters, marked, so one long request cannot make a long event in memory,
on disk or on screen. Non-finite numbers become text: every reader expects strict JSON.
"""
from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any, Callable

KINDS = ("dns.answer", "dns.error", "tls.clienthello", "tls.cert", "tls.error", "route.decision",
         "origin.hit", "origin.error", "hostname.status", "hostname.error", "lab.model",
         "proxy.tunnel", "proxy.closed", "proxy.refused")
FIELD_LIMIT = 512  # topology.Limits.event_field

Event = dict[str, Any]
Subscriber = Callable[[Event], None]


_PREFIX = os.urandom(4).hex()
_COUNTER = itertools.count(1)


def new_trace() -> str:
    # Unique per process run without a syscall per request: random prefix, then a counter.
    return f"{_PREFIX}{next(_COUNTER):08x}"


def bounded(value: Any, limit: int = FIELD_LIMIT) -> Any:
    """`value` as stored in an event: text cut to `limit` characters (marked), strict-JSON numbers."""
    t = type(value)
    if t is str:
        return value if len(value) <= limit else f"{value[:limit]}...[{len(value) - limit} more characters]"
    if t is float:
        return value if value - value == 0 else str(value)  # inf - inf and nan - nan are nan
    if t is list or t is tuple:
        if len(value) > limit:
            value = [*value[:limit], f"...[{len(value) - limit} more items]"]
        return [bounded(v, limit) for v in value]
    return value


class Events:
    def __init__(self, maxlen: int = 20000, start_id: int = 1, field_limit: int = FIELD_LIMIT) -> None:
        self._buf: deque[Event] = deque(maxlen=maxlen)
        self._ids = itertools.count(start_id)  # continue after the stored log, so ids stay unique
        self._subscribers: list[Subscriber] = []
        self.field_limit = field_limit

    def emit(self, kind: str, trace: str | None = None, **data: Any) -> Event:
        # `prepare` and `publish` in one frame: on every connection's path, several times.
        limit = self.field_limit
        if trace is not None and (type(trace) is not str or len(trace) > limit):
            trace = bounded(trace, limit)
        event = {"id": next(self._ids), "ts": time.time(), "kind": kind, "trace": trace}
        for k, v in data.items():  # `bound`, the common cases without a call
            t = type(v)
            if t is str:
                event[k] = v if len(v) <= limit else bounded(v, limit)
            elif t is int or v is None or t is bool:
                event[k] = v
            else:
                event[k] = bounded(v, limit)
        self._buf.append(event)
        for sub in self._subscribers:
            sub(event)
        return event

    def prepare(self, kind: str, trace: str | None = None, **data: Any) -> Event:
        """An event with its id and time, not yet told: to store it first (State.save_hostname)."""
        return self.stamp(kind, bounded(trace, self.field_limit), self.bound(data))

    def bound(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` as events store it, each field bounded (`bounded`): done once, `stamp`ed many times."""
        limit = self.field_limit
        for k, v in data.items():  # on every request's path: the common cases without a call
            t = type(v)
            if t is str:
                if len(v) > limit:
                    data[k] = bounded(v, limit)
            elif t is not int and v is not None and t is not bool:
                data[k] = bounded(v, limit)
        return data

    def stamp(self, kind: str, trace: str | None, data: dict[str, Any]) -> Event:
        """An event of fields already bounded (`bound`): the resolver's cached answers tell theirs so."""
        return {"id": next(self._ids), "ts": time.time(), "kind": kind, "trace": trace, **data}

    def again(self, told: Event) -> Event:
        """Tell `told` once more, with an id and time of its own: a copy of the dict is cheaper
        than building it again (the resolver tells each cached answer so), and `publish` in
        this frame, once per UDP query."""
        event = told.copy()
        event["id"] = next(self._ids)
        event["ts"] = time.time()
        self._buf.append(event)
        for sub in self._subscribers:
            sub(event)
        return event

    def publish(self, event: Event) -> Event:
        self._buf.append(event)
        for sub in self._subscribers:
            sub(event)
        return event

    def since(self, last_id: int = 0, limit: int | None = None) -> list[Event]:
        out = [e for e in self._buf if e["id"] > last_id]
        return out[:limit] if limit else out

    def newest(self, n: int, since: int = 0, wanted: Callable[[Event], bool] = lambda e: True) -> list[Event]:
        """The newest `n` wanted events after `since`, oldest first: read from the newest end."""
        out = []
        for e in reversed(self._buf):
            if len(out) >= n or e["id"] <= since:
                break
            if wanted(e):
                out.append(e)
        out.reverse()
        return out

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

    def publish(self, event: Event) -> Event:
        return event

    def again(self, told: Event) -> Event:
        return {}
