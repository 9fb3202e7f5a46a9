"""PURE: the live page's strips, folded from the lab's events, with the oracle's verdict.

One strip per client request: client, DNS answer, edge listener, SNI, certificate served,
decision, origin reached, verdict. Events are joined by ids, never by order:

- `route.decision` starts a request strip, keyed by its `trace`; `origin.hit` and
  `origin.error` with that `trace` are its origin.
- `tls.clienthello`, `tls.cert`, `tls.error` carry `conn`; a decision's `conn` joins them
  to every request made on that connection. A connection with no request (a failed
  handshake) is a strip of its own.
- `dns.answer` with a `trace` (the asking client's, sent in an EDNS0 option) joins the
  request with that trace.
- `proxy.tunnel` carries the `trace` of the proxy's DNS query and `local`, the proxy's
  upstream "ip:port"; a `tls.clienthello` whose `peer` is that "ip:port" names the edge
  connection the tunnel carried, so the DNS answer joins every request on it.
- A DNS answer or tunnel that joins nothing (yet) is a strip of its own; so is an
  `origin.hit` that no decision announced: it went to the origin directly, not through the
  edge, so it has no verdict (the oracle judges what the edge did).
  A later event that joins them takes them into the request's strip, so the strips do not
  depend on the order the events come in.

Nobody watching costs little: `defer` keeps a request's events (`route.decision`,
`origin.*`, one or two per request) with their world in a deque of the newest
`4 * keep`, and a connection's (`tls.*`, at most three per connection) in one of the
newest `6 * keep`, which outlives the `2 * keep` connections folding at once remembers;
both are folded, in the order they came, when the strips are next read. The rest (DNS,
tunnels: few, and joined to requests long after) is folded at once; the strips do not
depend on the order of events. The strips read are the ones folding everything at once
would show.

The lab's own traffic is `internal`, hidden unless asked for: a trace that starts with
`INTERNAL`, and a DNS answer with no trace asked from one of the lab's own addresses (the
hostname verifier). The verdict is the oracle's, judged with the world as it was when the
request completed (kept with the strip): a setup undone later must not change what happened.
"""
from __future__ import annotations

import heapq
from collections import deque
from typing import Any, Iterable

from lab import oracle
from lab.hostnorm import wildcard_of
from lab.topology import World

INTERNAL = "lab-internal-"  # trace prefix of the lab's own requests (the live page's loot fetch)
KEEP = 1000  # strips kept; each index holds at most twice that
_PER_REQUEST = frozenset({"route.decision", "origin.hit", "origin.error"})
_TLS_SLOTS = {"tls.clienthello": "hello", "tls.cert": "cert", "tls.error": "error"}  # where a connection keeps each

Event = dict[str, Any]


def covers(names: Iterable[str], name: str | None) -> bool:
    """The certificate names cover `name`: exactly, or by the one wildcard that may (RFC 6125)."""
    if not name:
        return False
    names = set(names)
    return name in names or (wildcard_of(name) or "\0") in names


class _Bounded(dict):
    """A dict that forgets its oldest entries past `cap`: a flood costs the page history, not memory."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def __setitem__(self, key, value) -> None:
        dict.__setitem__(self, key, value)
        if len(self) > self.cap:  # one entry at a time comes in
            del self[next(iter(self))]


class Fold:
    """Events in (`add`), strips out (`strip`, `strips`). State is data; the world is passed in."""

    def __init__(self, internal_clients: Iterable[str] = (), keep: int = KEEP) -> None:
        self.internal_clients = frozenset(internal_clients)
        self.keep = keep
        cap = 2 * keep
        self._requests: _Bounded = _Bounded(cap)   # trace -> route.decision
        self._conns: _Bounded = _Bounded(cap)      # conn -> {"hello", "cert", "error", "requests": [trace]}
        self._dns: _Bounded = _Bounded(cap)        # trace -> dns.answer
        self._tunnels: _Bounded = _Bounded(cap)    # trace -> proxy.tunnel
        self._tunnel_at: _Bounded = _Bounded(cap)  # tunnel's local "ip:port" -> its trace
        self._conn_at: _Bounded = _Bounded(cap)    # tls.clienthello's peer "ip:port" -> conn
        self._alone: _Bounded = _Bounded(cap)      # key -> the one event of a strip nothing else joins
        self._origin: _Bounded = _Bounded(cap)     # trace -> origin.hit or origin.error
        self._worlds: _Bounded = _Bounded(cap)     # key -> the world when its request completed
        self._at: _Bounded = _Bounded(cap)         # key -> id of the event that made it a strip
        # A request's events, not folded yet, with the world at each: at most `cap` requests' worth;
        # a connection's the same way, at least `cap` connections' worth.
        self._later: deque[tuple[Event, World]] = deque(maxlen=2 * cap)
        self._later_conns: deque[tuple[Event, World]] = deque(maxlen=3 * cap)

    # ---- folding ------------------------------------------------------------------
    def add(self, e: Event, world: World) -> tuple[set[str], set[str]]:
        """Fold one event; returns (keys of strips changed, keys of strips no longer shown)."""
        if self._later or self._later_conns:
            self._catch_up()
        return self._add(e, world)

    def defer(self, e: Event, world: World) -> None:
        """Fold `e` when the strips are next read (nobody is told what changed)."""
        kind = e.get("kind")
        if kind in _PER_REQUEST:
            self._later.append((e, world))
        elif kind in _TLS_SLOTS:
            self._later_conns.append((e, world))
        else:
            self._add(e, world)

    def _catch_up(self) -> None:
        later, self._later = self._later, deque(maxlen=self._later.maxlen)
        conns, self._later_conns = self._later_conns, deque(maxlen=self._later_conns.maxlen)
        for e, world in heapq.merge(conns, later, key=_event_id):  # as they came: ids grow
            self._add(e, world)

    def _add(self, e: Event, world: World) -> tuple[set[str], set[str]]:
        kind, trace = e.get("kind"), e.get("trace")
        if kind == "route.decision" and trace:
            return self._decision(e, trace, world)
        if kind in ("origin.hit", "origin.error"):
            if not trace:  # straight to an origin, naming no request: a strip of its own
                key = f"e:{e['id']}"
                self._alone[key] = e
                self._show(key, e["id"])
                return {key}, set()
            self._origin[trace] = e
            if trace in self._requests:
                key = "r:" + trace
                self._complete(key, world)
                return {key}, set()
            key = "o:" + trace  # until a decision with this trace shows it went through the edge
            self._show(key, e["id"])
            return {key}, set()
        if kind in ("tls.clienthello", "tls.cert", "tls.error") and e.get("conn"):
            return self._tls(e, e["conn"], world)
        if kind == "dns.answer":
            if not trace:  # nothing names the request it served: a strip of its own
                key = f"e:{e['id']}"
                self._alone[key] = e
                self._show(key, e["id"])
                return {key}, set()
            kept = self._dns.get(trace)
            if kept is None or _rank(e) < _rank(kept):
                self._dns[trace] = e
            return self._joined(trace, e["id"])
        if kind == "proxy.tunnel" and trace:
            self._tunnels[trace] = e
            removed: set[str] = set()
            if e.get("local"):
                self._tunnel_at[e["local"]] = trace
                if e["local"] in self._conn_at:  # the edge saw the connection first
                    removed = self._hide("d:" + trace)
            changed, gone = self._joined(trace, e["id"])
            return changed, gone | removed
        return set(), set()

    def _decision(self, e: Event, trace: str, world: World) -> tuple[set[str], set[str]]:
        self._requests[trace] = e
        key = "r:" + trace
        self._at[key] = e["id"]
        removed = self._hide("d:" + trace) | self._hide("o:" + trace)
        conn = e.get("conn")
        if conn:
            c = self._conn(conn)
            if not c["requests"]:  # its first request: the connection is no strip of its own any more
                removed |= self._hide("c:" + conn)
                c["requests"] = _Bounded(self._requests.cap)
            c["requests"][trace] = None
        if not e.get("origin") or trace in self._origin:  # the edge answered itself, or the origin already did
            self._complete(key, world)
        return {key}, removed

    def _tls(self, e: Event, conn: str, world: World) -> tuple[set[str], set[str]]:
        c = self._conn(conn)
        kind = e["kind"]
        c[_TLS_SLOTS[kind]] = e
        removed: set[str] = set()
        if kind == "tls.clienthello" and e.get("peer"):
            self._conn_at[e["peer"]] = conn
            tunnel = self._tunnel_at.get(e["peer"])
            if tunnel is not None:
                removed = self._hide("d:" + tunnel)
        if c["requests"]:
            return {"r:" + t for t in c["requests"] if t in self._requests}, removed
        key = "c:" + conn
        self._show(key, e["id"], world if kind == "tls.error" else None)
        return {key}, removed

    def _conn(self, conn: str) -> dict:
        c = self._conns.get(conn)
        # Its requests, from the first: trace -> None, the newest kept (an HTTP/2 connection may carry millions).
        if c is None:
            c = self._conns[conn] = {"requests": ()}
        return c

    def _show(self, key: str, event_id: int, completed: World | None = None) -> None:
        """`key` is a strip, placed by its earliest event (whatever order they came in)."""
        if key not in self._at or event_id < self._at[key]:
            self._at[key] = event_id
        if completed is not None:
            self._complete(key, completed)

    def _complete(self, key: str, world: World) -> None:
        if key not in self._worlds:
            # What the world says now of the names the strip is about: the running lab's hostname
            # index changes in place, and the verdict is the world's as it was when it completed.
            self._worlds[key] = world.frozen(self._names(key))

    def _names(self, key: str) -> set[str]:
        """Every name a strip's verdict may be about (the oracle's N, whichever events name it)."""
        kind, _, ref = key.partition(":")
        decision = (self._requests.get(ref) if kind == "r" else None) or {}
        origin = (self._origin.get(ref) if kind == "r" else None) or {}
        conn = self._conns.get(decision.get("conn") if kind == "r" else ref) or {}
        values = (decision.get("host"), decision.get("sni"), origin.get("host"),
                  (conn.get("hello") or {}).get("sni"), (conn.get("error") or {}).get("sni"))
        return {oracle.name_asked(None, v) for v in values if v}

    def _hide(self, key: str) -> set[str]:
        return {key} if self._at.pop(key, None) is not None else set()

    def _joined(self, trace: str, event_id: int) -> tuple[set[str], set[str]]:
        """The strips that show the DNS answer / tunnel of `trace`; its own strip when none does."""
        if trace in self._requests:
            return {"r:" + trace}, set()
        conn = self._tunnel_conn(trace)
        if conn is not None:
            c = self._conns.get(conn)
            if c and c["requests"]:
                return {"r:" + t for t in c["requests"] if t in self._requests}, set()
            return {"c:" + conn}, set()
        key = "d:" + trace
        self._show(key, event_id)
        return {key}, set()

    def _tunnel_conn(self, trace: str) -> str | None:
        tunnel = self._tunnels.get(trace)
        return self._conn_at.get(tunnel.get("local")) if tunnel and tunnel.get("local") else None

    def _conn_tunnel(self, conn: str) -> Event | None:
        hello = self._conns.get(conn, {}).get("hello")
        trace = self._tunnel_at.get(hello.get("peer")) if hello and hello.get("peer") else None
        return self._tunnels.get(trace) if trace else None

    # ---- the oracle ---------------------------------------------------------------
    def _verdict(self, key: str, decision: Event | None, conn: dict | None, origin: Event | None) -> tuple:
        """(verdict, why, N, certificate valid for N); no verdict before the request completed."""
        hello = (conn or {}).get("hello") or {}
        sni = (decision or {}).get("sni") or hello.get("sni")
        host = (decision or {}).get("host") or (origin or {}).get("host") or None
        name = oracle.name_asked(sni, host)
        names = ((conn or {}).get("cert") or {}).get("names") or ()
        valid = covers(names, name)
        world = self._worlds.get(key)
        if world is None:
            return None, None, name, valid if conn else None
        reached = origin.get("origin") if origin and origin["kind"] == "origin.hit" else None
        failed = key.startswith("c:") and bool((conn or {}).get("error"))
        verdict, why = oracle.judge(world, name, reached_origin=reached, cert_valid=valid, tls_failed=failed)
        return verdict, why, name, valid

    # ---- reading ------------------------------------------------------------------
    def strips(self, limit: int = 200, internal: bool = False) -> list[dict]:
        """Newest first."""
        if self._later or self._later_conns:
            self._catch_up()
        out = []
        for key in sorted(self._at, key=self._at.__getitem__, reverse=True):
            s = self.strip(key)
            if s is not None and (internal or not s["internal"]):
                out.append(s)
                if len(out) >= limit:
                    break
        return out

    def strip(self, key: str) -> dict | None:
        """The strip as the page shows it, or None when it is no longer shown."""
        if self._later or self._later_conns:
            self._catch_up()
        if key not in self._at:
            return None
        kind, _, ref = key.partition(":")
        decision = conn = dns = tunnel = origin = None
        if kind == "r":
            decision = self._requests.get(ref)
            if decision is None:
                return None
            conn = decision.get("conn")
            dns, tunnel, origin = self._dns.get(ref), self._tunnels.get(ref), self._origin.get(ref)
        elif kind == "c":
            conn = ref
            if conn not in self._conns:
                return None
        elif kind == "d":
            dns, tunnel = self._dns.get(ref), self._tunnels.get(ref)
        elif kind == "o":
            origin = self._origin.get(ref)
        else:
            alone = self._alone.get(key)
            if alone is None:
                return None
            if alone["kind"] == "dns.answer":
                dns = alone
            else:
                origin = alone
        c = self._conns.get(conn) if conn else None
        if c is not None and tunnel is None:
            tunnel = self._conn_tunnel(conn)
            if tunnel is not None and dns is None:
                dns = self._dns.get(tunnel["trace"])
        verdict = self._verdict(key, decision, c, origin)
        return _view(key, self._at[key], decision, c, dns, tunnel, origin, verdict,
                     self._internal(decision, dns, tunnel, origin))

    def _internal(self, decision, dns, tunnel, origin) -> bool:
        if any(x and (x.get("trace") or "").startswith(INTERNAL) for x in (decision, dns, tunnel, origin)):
            return True
        # The verifier asks from the lab's own address and names no request.
        return bool(dns and not dns.get("trace") and dns.get("client") in self.internal_clients and not decision)


def _event_id(later: tuple[Event, World]) -> int:
    return later[0]["id"]


def _rank(dns: Event) -> tuple:
    """Which of a trace's DNS answers the strip shows: one with addresses, then the first asked."""
    return (not dns.get("answers"), dns["id"])


def _view(key, at, d, conn, dns, tunnel, origin, verdict, internal) -> dict:
    d = d or {}
    hello = (conn or {}).get("hello") or {}
    cert = (conn or {}).get("cert")
    tls_error = (conn or {}).get("error")
    hit = origin if origin and origin["kind"] == "origin.hit" else None
    failed = origin if origin and origin["kind"] == "origin.error" else None
    first = next((x for x in (d, dns, tunnel, hello, origin) if x), {})
    v, why, name, valid = verdict
    return {
        "key": key, "at": at, "ts": first.get("ts"),
        "kind": {"r": "request", "c": "connection", "d": "dns", "o": "direct"}.get(key[0], "direct" if origin else "dns"),
        "internal": internal,
        "client": (tunnel or {}).get("client") or hello.get("client") or (dns or {}).get("client"),
        "trace": d.get("trace") or (origin or dns or tunnel or {}).get("trace"),
        "conn": d.get("conn") or hello.get("conn"),
        "dns": None if dns is None else {
            "name": dns.get("name"), "type": dns.get("type"), "rcode": dns.get("rcode"),
            "answers": dns.get("answers") or [], "client": dns.get("client"),
            "poisoned": bool(dns.get("poisoned")), "override": dns.get("override")},
        "tunnel": None if tunnel is None else {
            "name": tunnel.get("name"), "port": tunnel.get("port"), "address": tunnel.get("address")},
        "listener": d.get("listener") or hello.get("listener") or (tls_error or {}).get("listener"),
        "sni": d.get("sni") or hello.get("sni"),
        "cert": None if cert is None else {"names": cert.get("names") or [], "alpn": cert.get("alpn"),
                                           "version": cert.get("version")},
        "tls_error": (tls_error or {}).get("error"),
        "request": None if not d and not origin else {
            "method": d.get("method") or (origin or {}).get("method"), "host": d.get("host") or (origin or {}).get("host"),
            "path": d.get("path") or (origin or {}).get("path")},
        "decision": None if not d else {k: d.get(k) for k in ("model", "rule", "origin", "status", "code", "reason")},
        "origin": (hit or {}).get("origin"),
        "origin_status": (hit or {}).get("status"),
        "origin_error": (failed or {}).get("error"),
        "name": name or (dns or {}).get("name"), "cert_valid": valid, "verdict": v, "why": why,
    }
