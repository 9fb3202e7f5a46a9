"""Who may open a connection to the edge, decided at accept, before any TLS work.

Caps per client address (nginx `limit_conn`) and in all (`worker_connections`), the latter
kept below the process's descriptor limit with a reserve, so a flood of edge connections
leaves descriptors for the control plane, the resolver, the origin leg and the event log.
Both engines count with `ConnectionCaps`; it is state as data, the limits are passed in.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from lab.caps import Caps
from lab.events import Events
from lab.topology import Limits

log = logging.getLogger("lab.edge")


def descriptor_cap(reserve: int) -> int | None:
    """Raise the soft descriptor limit as far as the hard one allows; how many the edge may use.

    None where the platform has no such limit (no `resource` module). A soft limit too
    small for the reserve still leaves half of it to the edge: refusing every client would
    be worse than a thin reserve.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return None
    # macOS reports an unlimited hard limit but refuses a soft limit above OPEN_MAX (10240).
    for target in ([hard] if hard != resource.RLIM_INFINITY else []) + [10240]:
        if soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
            break
        except (OSError, ValueError):
            continue
    return max(soft - reserve, soft // 2)


class ConnectionCaps:
    """The edge's caps: `Caps` with the edge's limits and wording, below the descriptor cap."""

    def __init__(self, descriptors: int | None = None) -> None:
        self.descriptors = descriptors
        self.count = Caps()

    def admit(self, client: str, limits: Limits) -> str | None:
        """Count a new connection from `client` in, or say why it is refused."""
        cap = limits.max_connections if self.descriptors is None else min(limits.max_connections, self.descriptors)
        met = self.count.admit(client, cap, limits.max_connections_per_client)
        if met == "total":
            return f"connection limit: the edge holds {self.count.total} connections (max_connections {cap})"
        if met == "client":
            return (f"connection limit: {client} holds {self.count.open[client]} connections "
                    f"(max_connections_per_client {limits.max_connections_per_client})")
        return None

    def release(self, client: str) -> None:
        self.count.release(client)


class Throttle:
    """At most one report per key and interval: a flood gets a line, not a line per packet."""

    def __init__(self, interval: float = 10.0, clock: Callable[[], float] = time.monotonic,
                 max_keys: int = 1024) -> None:
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._next: dict[object, tuple[float, int]] = {}  # key -> (when the next report is due, hits held back)

    def hit(self, key: object) -> int | None:
        """None to stay quiet; else report now, and this many more happened since the last report."""
        now = self.clock()
        due, held = self._next.get(key, (now, 0))
        if now < due:
            self._next[key] = (due, held + 1)
            return None
        if len(self._next) >= self.max_keys and key not in self._next:
            self._next = {k: v for k, v in self._next.items() if v[0] > now}  # forget the quiet ones
            if len(self._next) >= self.max_keys:
                self._next.clear()  # many keys at once: a flood; a second line beats unbounded memory
        self._next[key] = (now + self.interval, 0)
        return held


class Refusals:
    """How both engines tell about what they refuse before TLS: a flood gets a line, not a line per packet.

    A refused connection: one warning and one `tls.error` per client and interval, counting
    the ones held back. A non-ASCII SNI (alert 112): one warning per minute, whoever sent it.
    """

    def __init__(self, events: Events, clock: Callable[[], float] = time.monotonic) -> None:
        self.events = events
        self._connections = Throttle(10.0, clock)
        self._names = Throttle(60.0, clock)

    def connection(self, *, client: str, listener: str, conn: str, why: str) -> None:
        held = self._connections.hit(client)
        if held is None:
            return
        log.warning("edge: refused a connection from %s: %s%s", client, why,
                    f" ({held} more refused since the last such line)" if held else "")
        self.events.emit("tls.error", trace=conn, conn=conn, listener=listener, sni=None, client=client, error=why,
                         refused=held + 1)

    def non_ascii_sni(self, *, client: str, sni: str | None) -> None:
        held = self._names.hit("non-ascii")
        if held is not None:
            log.warning("edge: alert 112 to %s for a non-ASCII SNI %s%s", client, sni,
                        f" ({held} more since the last such line)" if held else "")
