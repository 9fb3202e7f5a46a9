"""One request through the edge, whatever carried it: decide, then forward or refuse.

Every carrier (HTTP/1.1, HTTP/2, the mitmproxy engine) hands a request here as plain
values and gets (status, headers, body) back through a callback, or awaits it with
`handle_async`; the decision itself is `policy.decide`, and a request a carrier refused
is `policy.malformed`. Either way one `route.decision` event tells it, with the same fields.
A forwarded request returns its `Exchange`: the carrier cancels it when its client goes
away (a reset stream, a closed connection), so no origin request outlives the client
that asked for it.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

from lab.edge import pages
from lab.edge.upstream import Exchange, Failure, OriginPool
from lab.events import Events
from lab.policy import Decision, Target, decide, malformed, named_hosts
from lab.topology import Listener, World

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length"})
# Not passed on from an origin's answer: the edge speaks for itself (and hides what the origin runs).
_NOT_RETURNED = HOP_BY_HOP | {"server"}

Response = tuple[int, list[tuple[str, str]], bytes]


@dataclass(frozen=True)
class Malformed:
    """A request a carrier's header check refused, with the status that says why."""

    problem: str
    status: int = 400  # 414 for a too-long target, 413 for a too-large body, 431 for too-large headers
    code: str = "bad-request"


def excerpt(text: str | None, limit: int) -> str | None:
    """At most `limit` characters of client-controlled text, for the event log."""
    if text is None or len(text) <= limit:
        return text
    return f"{text[:max(limit - 20, 0)]}... ({len(text)} chars)"


@dataclass
class Request:
    method: str
    target: Target
    path_qs: str
    headers: list[tuple[str, str]]  # as received, minus pseudo-headers
    body: bytes
    client: str
    sni: str | None
    conn: str
    trace: str


def absolute_authority(raw_target: str) -> str | None:
    """`http://host:port/x` -> `host:port`; None for origin-form."""
    scheme, sep, rest = raw_target.partition("://")
    if not sep or "/" in scheme:
        return None
    return rest.split("/", 1)[0].split("?", 1)[0].rsplit("@", 1)[-1]


class EdgeCore:
    def __init__(self, world: World, events: Events) -> None:
        self.world = world
        self.events = events
        self.pool: OriginPool | None = None

    async def start(self) -> None:
        self.pool = OriginPool()

    async def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    def _tell(self, listener: Listener, decision: Decision, *, trace: str, conn: str, sni: str | None,
              method: str | None, path: str | None) -> Decision:
        """The one `route.decision` emitter, for a routed request and a refused one alike."""
        cap = self.world.limits.event_field
        self.events.emit("route.decision", trace=trace, conn=conn, listener=listener.name, sni=sni,
                         host=decision.host, model=decision.model, rule=decision.rule, origin=decision.origin,
                         status=decision.status or None, code=decision.code or None,
                         reason=excerpt(decision.reason, cap), method=excerpt(method, cap), path=excerpt(path, cap))
        return decision

    def decide(self, listener: Listener, req: Request) -> Decision:
        return self._tell(listener, decide(listener, req.sni, req.target, self.world), trace=req.trace, conn=req.conn,
                          sni=req.sni, method=req.method, path=req.target.path)

    def refuse_malformed(self, listener: Listener, problem: Malformed, *, trace: str, conn: str, sni: str | None,
                         http2: bool = False, accept: str | None = None) -> Response:
        """Every engine's answer to a request its parser refused: the edge's own page, told like any decision."""
        decision = malformed(self.world.model, problem.status, problem.code,
                             excerpt(problem.problem, self.world.limits.event_field), http2)
        self._tell(listener, decision, trace=trace, conn=conn, sni=sni, method=None, path=None)
        return pages.refusal(decision, accept)

    def handle(self, listener: Listener, req: Request, respond: Callable[[Response], None],
               decision: Decision | None = None) -> Exchange | None:
        """Decide (unless the carrier did), then answer through `respond`: at once for a refusal, later for
        a forward. Returns the origin exchange of a forwarded request (`.cancel()` it if the client goes away)."""
        decision = decision or self.decide(listener, req)
        if not decision.routed:
            respond(pages.refusal(decision, _accept(req)))
            return None
        origin = self.world.origin_by_name[decision.origin]

        def done(result) -> None:
            if isinstance(result, Failure):
                self.events.emit("origin.error", trace=req.trace, conn=req.conn, origin=decision.origin,
                                 status=result.status, error=result.reason)
                respond(pages.upstream_failure(decision, result, _accept(req)))
                return
            status, headers, body = result
            out = [(k, v) for k, v in headers if k.lower() not in _NOT_RETURNED]
            out += [pages.SERVER, ("X-Lab-Decision", decision.header())]
            respond((status, out, body))

        # A request naming no host (HTTP/1.0) still needs one upstream: the SNI is the name it asked for.
        return self.pool.request(origin.host, origin.port, _request_bytes(req, decision.host or req.sni),
                                 req.method == "HEAD", done, self.world.limits)

    async def handle_async(self, listener: Listener, req: Request, decision: Decision | None = None) -> Response:
        future = asyncio.get_running_loop().create_future()
        exchange = self.handle(listener, req, lambda r: future.done() or future.set_result(r), decision)
        try:
            return await future
        except asyncio.CancelledError:  # the carrier gave up on this request: so does the origin leg
            if exchange is not None:
                exchange.cancel()
            raise


def _accept(req: Request) -> str | None:
    return next((v for k, v in req.headers if k.lower() == "accept"), None)


def _request_bytes(req: Request, host: str | None) -> bytes:
    lines = [f"{req.method} {req.path_qs} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in _forward_headers(req, host)]
    if req.body or req.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(req.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + req.body


# Not forwarded as the client sent them: hop-by-hop, and what the edge itself says to the origin.
_DROPPED = HOP_BY_HOP | {"x-forwarded-for", "x-forwarded-proto", "x-lab-trace"}


def _forward_headers(req: Request, host: str | None) -> list[tuple[str, str]]:
    out = []
    xff = None
    named: set[str] = set()  # what the client's Connection header names is hop-by-hop too
    for name, value in req.headers:
        low = name.lower()
        if low in _DROPPED:
            if low == "connection":
                named.update(t.strip().lower() for t in value.split(","))
            elif low == "x-forwarded-for":
                xff = value
            continue
        out.append((name, value))
    if named:
        out = [(k, v) for k, v in out if k.lower() not in named]
        if "x-forwarded-for" in named:
            xff = None
    # The origin picks its tenant by host: the one the decision was about, as the client sent it.
    named_host = named_hosts(req.target)
    sent_host = named_host[0][1] if named_host else host
    if sent_host:
        out.append(("Host", sent_host))
    out.append(("X-Forwarded-For", f"{xff}, {req.client}" if xff is not None else req.client))
    out.append(("X-Forwarded-Proto", "https"))
    out.append(("X-Lab-Trace", req.trace))
    return out
