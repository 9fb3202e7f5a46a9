"""One request through the edge, whatever carried it: decide, then forward or refuse.

Every carrier (HTTP/1.1, HTTP/2, the mitmproxy engine) hands a request here as plain
values and gets (status, headers, body) back through a callback, or awaits it with
`handle_async`; the decision itself is `policy.decide`.
"""
from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from typing import Callable

from lab.edge import pages
from lab.edge.upstream import OriginPool
from lab.events import Events
from lab.policy import Decision, Target, decide
from lab.topology import Listener, World

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length"})
_TRACE = re.compile(r"^[0-9a-zA-Z_-]{1,64}$")

Response = tuple[int, list[tuple[str, str]], bytes]


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

    def trace_of(self, headers: list[tuple[str, str]], fallback: str) -> str:
        # A probe may name its own trace id so its DNS query and this request tell one story.
        for name, value in headers:
            if name.lower() == "x-lab-trace" and _TRACE.match(value):
                return value
        return fallback

    def decide(self, listener: Listener, req: Request) -> Decision:
        decision = decide(listener, req.sni, req.target, self.world)
        self.events.emit("route.decision", trace=req.trace, conn=req.conn, listener=listener.name, sni=req.sni,
                         host=decision.host, model=decision.model, rule=decision.rule, origin=decision.origin,
                         status=decision.status or None, code=decision.code or None, reason=decision.reason,
                         method=req.method, path=req.target.path)
        return decision

    def refuse_malformed(self, listener: Listener, *, trace: str, conn: str, sni: str | None, problem: str,
                         http2: bool = False, decision: Decision | None = None, accept: str | None = None) -> Response:
        """Every engine's answer to a request its parser refused: a 400 from the edge, told like any decision."""
        model = self.world.model
        decision = decision or Decision(model=model, rule="bad-request", status=400, code="bad-request",
                                        reason=f"{model}: malformed {'HTTP/2 ' if http2 else ''}request: {problem}")
        self.events.emit("route.decision", trace=trace, conn=conn, listener=listener.name, sni=sni, host=None,
                         model=decision.model, rule=decision.rule, origin=None, status=decision.status,
                         code=decision.code, reason=decision.reason)
        return pages.refusal(decision, accept)

    def handle(self, listener: Listener, req: Request, respond: Callable[[Response], None]) -> None:
        """Decide, then answer through `respond` (at once for a refusal, later for a forward)."""
        decision = self.decide(listener, req)
        accept = next((v for k, v in req.headers if k.lower() == "accept"), None)
        if not decision.routed:
            respond(pages.refusal(decision, accept))
            return
        origin = self.world.origin_by_name[decision.origin]

        def done(status, headers, body) -> None:
            if status is None:
                self.events.emit("origin.error", trace=req.trace, conn=req.conn, origin=decision.origin, error=headers)
                respond(pages.upstream_failure(decision, headers, accept))
                return
            out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
            out.append(("X-Lab-Decision", decision.header()))
            respond((status, out, body))

        # A request naming no host (HTTP/1.0) still needs one upstream: the SNI is the name it asked for.
        self.pool.request(origin.host, origin.port, _request_bytes(req, decision.host or req.sni), req.method == "HEAD",
                          done)

    async def handle_async(self, listener: Listener, req: Request) -> Response:
        future = asyncio.get_running_loop().create_future()
        self.handle(listener, req, lambda r: future.done() or future.set_result(r))
        return await future


def _request_bytes(req: Request, host: str | None) -> bytes:
    lines = [f"{req.method} {req.path_qs} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in _forward_headers(req, host)]
    if req.body or req.method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(req.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace") + req.body


def _forward_headers(req: Request, host: str | None) -> list[tuple[str, str]]:
    connection_named = {t.strip().lower() for k, v in req.headers if k.lower() == "connection" for t in v.split(",")}
    out = []
    xff = None
    for name, value in req.headers:
        low = name.lower()
        if low in HOP_BY_HOP or low in connection_named:
            continue
        if low == "x-forwarded-for":
            xff = f"{value}, {req.client}"
            continue
        if low in ("x-forwarded-proto", "x-lab-trace"):
            continue
        out.append((name, value))
    # The origin picks its tenant by host: send the one the decision was about.
    sent_host = req.target.authority or (req.target.hosts[0] if req.target.hosts else None) or req.target.absolute or host
    if sent_host:
        out.append(("Host", sent_host))
    out.append(("X-Forwarded-For", xff or req.client))
    out.append(("X-Forwarded-Proto", "https"))
    out.append(("X-Lab-Trace", req.trace))
    return out
