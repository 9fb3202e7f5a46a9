"""The control plane: custom hostnames with real verification, DNS admin, model, events.

A thin aiohttp adapter around the pure `hostnames` state machine: the verifier asks the
lab resolver and fetches HTTP tokens for real, then `hostnames.verify` decides. Every
change is saved in `State` first, then applied to the running lab (edge certificates,
routing, resolver), then told as an event.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import secrets
import time
from typing import Any

import aiohttp
from aiohttp import web

from lab import hostnames as hn
from lab import live
from lab.binding import bind_error
from lab.dns import query
from lab.openapi import spec
from lab.state import State, StateError
from lab.topology import MODELS

VERIFY_INTERVAL = 10.0
SSE_QUEUE = 1000


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1))


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Control:
    def __init__(self, lab, state: State, token: str | None = None, interval: float = VERIFY_INTERVAL) -> None:
        self.lab = lab
        self.state = state
        self.token = token or secrets.token_urlsafe(24)
        self.interval = interval
        self.runner: web.AppRunner | None = None
        self.url = ""
        self._worker: asyncio.Task | None = None
        self._verify_lock = asyncio.Lock()
        self._http: aiohttp.ClientSession | None = None

    # ---- state <-> running lab -------------------------------------------------
    def restore(self) -> None:
        """Seed the hostnames from the world file on first start, then push saved state into the lab."""
        world = self.lab.world
        if not self.state.hostnames() and not self.state.get("seeded"):
            now = time.time()
            for c in world.custom_hostnames:
                self.state.save_hostname(hn.from_world(c, id=_new_id(), txt_token=_token(), http_token=_token(), now=now))
            self.state.set("seeded", "1")
        self.state.purge_expired(time.time())
        resolver = self.lab.resolver
        for r in self.state.records():
            resolver.set_record(r["name"], r["type"], r["value"], r["ttl"])
        for o in self.state.overrides():
            new_id = resolver.set_override(o["name"], o["type"], json.loads(o["value"]), o["client"], o["expires"], o["ttl"])
            if new_id != o["id"]:  # resolver ids restart with the process: keep the stored ones in step
                self.state.delete_override(o["id"])
                self.state.save_override({**o, "id": new_id})
        self._apply_hostnames()

    def _apply_hostnames(self) -> None:
        live = tuple(h.as_custom_hostname() for h in self.state.hostnames(include_deleted=False))
        self.lab.set_world(self.lab.world.with_hostnames(live))

    async def _transition(self, h: hn.Hostname, t: hn.Transition | None) -> None:
        self.state.save_hostname(h)
        if t is not None:
            self._apply_hostnames()
            await self._told(t.hostname, t.zone, t.old, t.new, t.reason, h.id)

    async def _told(self, hostname: str, zone: str, old: str | None, new: str, reason: str, hid: str) -> None:
        self.lab.events.emit("hostname.status", hostname=hostname, zone=zone, old=old, new=new, reason=reason,
                             hostname_id=hid)
        if self.lab.sink is not None:
            await self.lab.sink.flush()  # a hostname's history must survive even a kill -9 right after

    # ---- verification (I/O: gathers evidence; hostnames.verify decides) ---------
    async def evidence(self, h: hn.Hostname) -> hn.Evidence:
        dns = self.lab.world.resolver
        target = self.lab.world.zone_by_name[h.zone].cname_target
        txt: tuple[str, ...] = ()
        try:
            reply = await query(hn.txt_name(h.name), "TXT", dns.host, dns.port)
            txt = tuple(b"".join(rr.rdata.data).decode("utf-8", "replace") for rr in reply.rr if rr.rtype == 16)
        except (OSError, TimeoutError, ValueError):
            pass
        chain, addrs, desc = await self._resolve(h.name)
        points = False
        if target:
            _, target_addrs, _ = await self._resolve(target)
            points = target in chain or (bool(addrs) and set(addrs) == set(target_addrs))
        return hn.Evidence(txt=txt, http=await self._http_token(h, addrs), points_to_target=points, dns=desc)

    async def _resolve(self, name: str) -> tuple[list[str], list[str], str]:
        dns = self.lab.world.resolver
        try:
            reply = await query(name, "A", dns.host, dns.port)
        except (OSError, TimeoutError, ValueError) as e:
            return [], [], f"no answer from the lab resolver ({type(e).__name__})"
        chain = [str(rr.rdata).rstrip(".") for rr in reply.rr if rr.rtype == 5]
        addrs = [str(rr.rdata) for rr in reply.rr if rr.rtype == 1]
        if reply.header.rcode == 3:
            return chain, addrs, "NXDOMAIN"
        desc = " -> ".join(["CNAME " + c for c in chain] + (["A " + ",".join(addrs)] if addrs else ["no A record"]))
        return chain, addrs, desc

    async def _http_token(self, h: hn.Hostname, addrs: list[str]) -> str | None:
        if not addrs:
            return None
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        url = f"http://{addrs[0]}:{self.lab.world.challenge_port}{hn.http_path(h)}"
        try:
            async with self._http.get(url, headers={"Host": h.name}, allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                return (await resp.content.read(1024)).decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def verify(self, h: hn.Hostname) -> hn.Hostname:
        async with self._verify_lock:
            current = self.state.hostname(h.id) or h
            if current.status == "deleted":
                return current
            target = self.lab.world.zone_by_name[current.zone].cname_target or ""
            ev = await self.evidence(current)
            new, transition = hn.verify(current, ev, target=target, now=time.time())
            if new is not current:
                await self._transition(new, transition)
            return new

    async def _verify_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            for h in self.state.hostnames(include_deleted=False):
                try:
                    await self.verify(h)
                except (StateError, OSError) as e:
                    self.lab.events.emit("hostname.error", hostname=h.name, error=str(e))

    # ---- HTTP API --------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return _json({"error": "missing or wrong token: send Authorization: Bearer <token> "
                                       "(the token is in .lab/endpoints.json)"}, 401)
        try:
            return await handler(request)
        except ApiError as e:
            return _json({"error": str(e)}, e.status)
        except (hn.HostnameError, ValueError) as e:
            return _json({"error": str(e)}, 400)
        except StateError as e:
            return _json({"error": str(e)}, 503)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/hostnames", self.list_hostnames)
        r.add_post("/hostnames", self.create_hostname)
        r.add_get("/hostnames/{ref}", self.get_hostname)
        r.add_post("/hostnames/{ref}/verify", self.verify_hostname)
        r.add_delete("/hostnames/{ref}", self.delete_hostname)
        r.add_get("/dns/records", self.list_records)
        r.add_post("/dns/records", self.set_record)
        r.add_delete("/dns/records", self.delete_record)
        r.add_get("/dns/overrides", self.list_overrides)
        r.add_post("/dns/overrides", self.set_override)
        r.add_delete("/dns/overrides/{ref}", self.delete_override)
        r.add_get("/model", self.get_model)
        r.add_put("/model", self.set_model)
        r.add_get("/events", self.events)
        live.setup(app, self)  # the live page at /, and its cookie auth for the page's mutations
        return app

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            self.runner = None
            raise bind_error("control plane", host, port, e) from None
        bound = site._server.sockets[0].getsockname()[:2]
        self.url = f"http://{bound[0]}:{bound[1]}"
        self._worker = asyncio.create_task(self._verify_forever())
        return bound

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        if self._http is not None:
            await self._http.close()
            self._http = None
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _body(self, request: web.Request, *required: str) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        missing = [k for k in required if k not in body]
        if missing:
            raise ApiError(400, f"missing field(s): {', '.join(missing)}")
        return body

    def _hostname(self, request: web.Request) -> hn.Hostname:
        h = self.state.hostname(request.match_info["ref"])
        if h is None:
            raise ApiError(404, f"no custom hostname {request.match_info['ref']!r}")
        return h

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(spec())

    async def health(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "model": self.lab.world.model, "engine": self.lab.engine_name})

    async def list_hostnames(self, request: web.Request) -> web.Response:
        return _json([h.to_dict() for h in self.state.hostnames()])

    async def create_hostname(self, request: web.Request) -> web.Response:
        body = await self._body(request, "hostname")
        zone = body.get("zone") or next((z.name for z in self.lab.world.zones if z.saas), None)
        h = hn.create(str(body["hostname"]), str(zone), world=self.lab.world, existing=self.state.hostnames(),
                      id=_new_id(), txt_token=_token(), http_token=_token(), now=time.time())
        self.state.save_hostname(h)
        self._apply_hostnames()  # the edge knows it is pending: refused as such, never routed
        await self._told(h.name, h.zone, None, h.status, h.reason, h.id)
        return _json(h.to_dict(), 201)

    async def get_hostname(self, request: web.Request) -> web.Response:
        return _json(self._hostname(request).to_dict())

    async def verify_hostname(self, request: web.Request) -> web.Response:
        return _json((await self.verify(self._hostname(request))).to_dict())

    async def delete_hostname(self, request: web.Request) -> web.Response:
        h, t = hn.delete(self._hostname(request), now=time.time())
        await self._transition(h, t)
        return _json(h.to_dict())

    async def list_records(self, request: web.Request) -> web.Response:
        return _json(self.lab.resolver.records())

    async def set_record(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name", "type", "value")
        ttl = int(body.get("ttl", self.lab.world.ttl))
        self.lab.resolver.set_record(str(body["name"]), str(body["type"]), body["value"], ttl)
        self.state.set_record(str(body["name"]), str(body["type"]), body["value"], ttl)
        return _json({"name": body["name"], "type": str(body["type"]).upper(), "value": body["value"], "ttl": ttl}, 201)

    async def delete_record(self, request: web.Request) -> web.Response:
        name = request.query.get("name")
        if not name:
            raise ApiError(400, "missing query parameter: name")
        rtype = request.query.get("type")
        removed = self.lab.resolver.delete_record(name, rtype)
        self.state.delete_record(name, rtype)
        return _json({"removed": removed})

    async def list_overrides(self, request: web.Request) -> web.Response:
        return _json(self.lab.resolver.overrides())

    async def set_override(self, request: web.Request) -> web.Response:
        body = await self._body(request, "name", "value")
        rtype = str(body.get("type", "A"))
        expires = body.get("expires_in")
        values = body["value"] if isinstance(body["value"], list) else [body["value"]]
        oid = self.lab.resolver.set_override(str(body["name"]), rtype, values, body.get("client"),
                                             float(expires) if expires is not None else None, int(body.get("ttl", 5)))
        saved = next(o for o in self.lab.resolver.overrides() if o["id"] == oid)
        self.state.save_override({"id": oid, "name": saved["name"], "type": saved["type"],
                                  "value": json.dumps(saved["values"]), "client": saved["client"],
                                  "expires": saved["expires"], "ttl": saved["ttl"]})
        return _json(saved, 201)

    async def delete_override(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        before = {o["id"] for o in self.lab.resolver.overrides()}
        removed = self.lab.resolver.remove_override(ref)
        for oid in before - {o["id"] for o in self.lab.resolver.overrides()}:
            self.state.delete_override(oid)
        if not removed:
            raise ApiError(404, f"no override {ref!r}")
        return _json({"removed": removed})

    async def get_model(self, request: web.Request) -> web.Response:
        return _json({"model": self.lab.world.model, "models": list(MODELS)})

    async def set_model(self, request: web.Request) -> web.Response:
        model = (await self._body(request, "model"))["model"]
        if model not in MODELS:
            raise ApiError(400, f"unknown model {model!r} (choose from {', '.join(MODELS)})")
        self.lab.set_model(model)
        self.state.set("model", model)
        return _json({"model": model})

    async def events(self, request: web.Request) -> web.StreamResponse:
        try:
            since = int(request.query.get("since") or request.headers.get("Last-Event-ID") or 0)
            limit = min(int(request.query.get("limit", 1000)), 10000)
        except ValueError:
            raise ApiError(400, "since and limit must be integers") from None
        trace, kind = request.query.get("trace"), request.query.get("kind")

        def wanted(e: dict) -> bool:
            return (trace is None or e.get("trace") == trace) and (kind is None or e["kind"].startswith(kind))

        if "text/event-stream" not in request.headers.get("Accept", ""):
            return _json([e for e in self._history(since, limit) if wanted(e)])
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        queue: asyncio.Queue = asyncio.Queue(SSE_QUEUE)
        overflow = asyncio.Event()

        def push(e: dict) -> None:
            if wanted(e):
                try:
                    queue.put_nowait(e)
                except asyncio.QueueFull:
                    overflow.set()  # a reader this slow loses the stream, not the lab its memory

        unsubscribe = self.lab.events.subscribe(push)
        try:
            for e in self._history(since, limit):
                if wanted(e):
                    await resp.write(_sse(e))
            while not overflow.is_set():
                try:
                    e = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                await resp.write(_sse(e))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            unsubscribe()
        return resp

    def _history(self, since: int, limit: int) -> list[dict]:
        oldest = self.lab.events.oldest_id()
        if oldest is not None and since >= oldest - 1:
            return self.lab.events.since(since, limit)
        return self.state.events(since, limit)  # older than the ring buffer: from the stored log


def _sse(e: dict) -> bytes:
    return f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e)}\n\n".encode()


def _new_id() -> str:
    return "ch-" + secrets.token_hex(6)


def _token() -> str:
    return secrets.token_urlsafe(18)
