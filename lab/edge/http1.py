"""HTTP/1.1 over the edge's TLS connection, served by aiohttp's own server protocol."""
from __future__ import annotations

import asyncio

from aiohttp import web, web_protocol, web_server
from multidict import CIMultiDict

from lab.edge import pages
from lab.edge.core import EdgeCore, Request, absolute_authority
from lab.policy import Decision, Target, decide


class _Handler(web_protocol.RequestHandler):
    """aiohttp's protocol, with the edge's error page for requests its parser refuses."""

    edge: "HTTP1Server"

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            return super().handle_error(request, status, exc, message)
        text = str(getattr(exc, "message", None) or message or exc or "bad request")
        conn = self.transport
        listener = conn.listener
        if "Duplicate 'Host'" in text:
            # The parser saw two Host headers; the policy owns what that means.
            decision = decide(listener, conn.sni, Target(hosts=("?", "?")), self.edge.core.world)
        else:
            decision = Decision(model=self.edge.core.world.model, rule="bad-request", status=400, code="bad-request",
                                reason=f"malformed request: {text}")
        self.edge.core.events.emit("route.decision", trace=conn.next_trace(), conn=conn.conn_id,
                                   listener=listener.name, sni=conn.sni, host=None, model=decision.model,
                                   rule=decision.rule, origin=None, status=decision.status, code=decision.code,
                                   reason=decision.reason)
        st, headers, body = pages.refusal(decision)
        resp = web.Response(status=st, body=body, headers=CIMultiDict(headers))
        resp.force_close()
        return resp


class HTTP1Server:
    def __init__(self, core: EdgeCore) -> None:
        self.core = core
        self.server: web_server.Server | None = None

    def protocol(self, conn) -> asyncio.Protocol:
        if self.server is None:
            self.server = web_server.Server(self.handle, access_log=None)
        handler = _Handler(self.server, loop=asyncio.get_running_loop(), access_log=None, keepalive_timeout=75)
        handler.edge = self
        return handler

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        conn = request.transport
        raw = request.raw_path
        absolute = absolute_authority(raw)
        path_qs = request.rel_url.raw_path_qs if absolute else raw
        req = Request(method=request.method,
                      target=Target(hosts=tuple(request.headers.getall("Host", ())), absolute=absolute,
                                    path=request.rel_url.raw_path),
                      path_qs=path_qs, headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.raw_headers],
                      body=await request.read() if request.body_exists else b"", client=conn.peer[0], sni=conn.sni,
                      conn=conn.conn_id, trace="")
        req.trace = self.core.trace_of(req.headers, conn.next_trace())
        status, headers, body = await self.core.handle(conn.listener, req)
        return web.Response(status=status, body=body, headers=CIMultiDict(headers))

    async def shutdown(self) -> None:
        if self.server is not None:
            await self.server.shutdown(0.5)
