"""One request through the edge, whatever carried it: decide, then forward or refuse.

HTTP/1.1 and HTTP/2 both hand a request here as plain values and get back
(status, headers, body); the decision itself is `policy.decide`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import aiohttp

from lab.edge import pages
from lab.events import Events
from lab.policy import Decision, Target, decide
from lab.topology import Listener, World

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
                        "upgrade", "proxy-authenticate", "proxy-authorization", "host", "content-length"})
MAX_BODY = 16 * 1024 * 1024
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
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=512, limit_per_host=256, keepalive_timeout=30, use_dns_cache=False,
                                         force_close=False, enable_cleanup_closed=False)
        self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
                                             skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                                             timeout=aiohttp.ClientTimeout(total=30, connect=5))

    async def stop(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

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

    async def handle(self, listener: Listener, req: Request) -> Response:
        decision = self.decide(listener, req)
        accept = next((v for k, v in req.headers if k.lower() == "accept"), None)
        if not decision.routed:
            return pages.refusal(decision, accept)
        return await self.forward(decision, req, accept)

    async def forward(self, decision: Decision, req: Request, accept: str | None) -> Response:
        origin = self.world.origin_by_name[decision.origin]
        headers = _forward_headers(req, decision.host)
        try:
            async with self.session.request(req.method, origin.url + req.path_qs, headers=headers,
                                            data=req.body or None, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_BODY + 1)
                if len(body) > MAX_BODY:
                    raise aiohttp.ClientPayloadError(f"response larger than {MAX_BODY} bytes")
                out = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers
                       if k.lower().decode("latin-1") not in HOP_BY_HOP]
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            error = str(e) or type(e).__name__
            self.events.emit("origin.error", trace=req.trace, conn=req.conn, origin=decision.origin, error=error)
            return pages.upstream_failure(decision, error, accept)
        out.append(("X-Lab-Decision", decision.header()))
        return status, out, body


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
