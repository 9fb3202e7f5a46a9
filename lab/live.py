"""The live page at the control plane's `/`: strips as they happen, a model switch, scenario
buttons, the collector's loot and the custom hostnames, for a projector at the back of a room.

Auth as Jupyter does it: `up` prints `/?token=TOKEN`; opening it sets a SameSite=Strict,
HttpOnly cookie (derived from the token, never the token itself) and redirects to `/`.
A mutation that carries the cookie goes on as if it had the Bearer token, unless its
`Origin` is not the control plane's own (or, with no Origin, Sec-Fetch-Site says another
site): then 403. Without the cookie the page is read-only; Bearer calls are untouched.
The folding and judging are `lab.strips`' (pure); this module only carries them.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import ssl
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from lab.results import to_json
from lab.scenarios import DEFAULT_DIR, Runner, ScenarioError, discover
from lab.strips import INTERNAL, Fold

STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"live.css": "text/css", "live.js": "text/javascript"}
SHOWN = 200  # strips in a snapshot
LOOT_SHOWN = 50
STREAM_QUEUE = 500  # messages a slow page may fall behind before it is dropped (it reconnects)
KEEPALIVE = 15.0
COALESCE = 0.05  # s: a burst of events becomes one message per changed strip
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; "
                               "base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_END = object()  # tells a stream the lab is stopping
LIVE_KEY = web.AppKey("live", object)


def setup(app: web.Application, control) -> "Live":
    """Mount the page on the control plane's app; its middleware goes first (it adds the Bearer)."""
    live = Live(control)
    app[LIVE_KEY] = live
    app.middlewares.insert(0, live.middleware)
    r = app.router
    r.add_get("/", live.page)
    r.add_get("/live/static/{file}", live.static)
    r.add_get("/live/state", live.state)
    r.add_get("/live/strips", live.strips)
    r.add_get("/live/stream", live.stream)
    r.add_get("/live/scenarios", live.scenarios)
    r.add_post("/live/scenarios/{name}/run", live.run)
    r.add_get("/live/loot", live.loot)
    app.on_shutdown.append(live.on_shutdown)  # runs before aiohttp waits for handlers: streams end first
    return live


class Live:
    def __init__(self, control) -> None:
        self.control = control
        self.lab = control.lab
        self.fold = Fold(internal_clients={self.lab.world.control.host})
        self._clients: set[asyncio.Queue] = set()
        self._dirty: set[str] = set()
        self._gone: set[str] = set()
        self._notes: dict[str, dict] = {}  # model / hostnames / loot: the newest of each
        self._flush: asyncio.TimerHandle | None = None
        self._running = asyncio.Lock()  # one scenario at a time: two would fight over the model
        self._runs: set[asyncio.Task] = set()
        self._http: aiohttp.ClientSession | None = None
        for e in self.lab.events.since(0):  # what happened before the page was mounted
            self.fold.defer(e, self.lab.world)
        self._unsubscribe = self.lab.events.subscribe(self._on_event)  # no await in between: no event missed

    # ---- auth ---------------------------------------------------------------------
    @property
    def own_origin(self) -> str:
        return self.control.url

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: two labs on one address must not overwrite each other's.
        return f"sni-lab-{urlsplit(self.control.url).port or 0}"

    def cookie_value(self) -> str:
        return hmac.new(self.control.token.encode(), b"sni-lab live page", hashlib.sha256).hexdigest()

    def has_cookie(self, request: web.Request) -> bool:
        given = request.cookies.get(self.cookie_name)
        return given is not None and hmac.compare_digest(given.encode(), self.cookie_value().encode())

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.method in SAFE_METHODS or "Authorization" in request.headers or not self.has_cookie(request):
            return await handler(request)  # the control plane's own rules (a Bearer token for mutations)
        origin = request.headers.get("Origin")
        site = request.headers.get("Sec-Fetch-Site")
        if origin is not None and origin != self.own_origin:
            return _refused(f"cross-origin request refused: Origin {origin} is not the control plane's "
                            f"own ({self.own_origin})")
        if origin is None and site not in (None, "same-origin", "none"):
            return _refused(f"cross-site request refused (Sec-Fetch-Site: {site})")
        headers = request.headers.copy()
        headers["Authorization"] = f"Bearer {self.control.token}"
        return await handler(request.clone(headers=headers))

    # ---- the page -----------------------------------------------------------------
    async def page(self, request: web.Request) -> web.StreamResponse:
        if "token" in request.query:
            # Never leave the token in the address bar, the history or a Referer.
            resp = web.Response(status=303, headers={**_HEADERS, "Location": "/"})
            if hmac.compare_digest(request.query["token"].encode(), self.control.token.encode()):
                resp.set_cookie(self.cookie_name, self.cookie_value(), httponly=True, samesite="Strict", path="/")
            return resp
        return web.FileResponse(STATIC / "index.html", headers={**_HEADERS, "Content-Type": "text/html; charset=utf-8"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in PAGE_FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={**_HEADERS, "Content-Type": f"{PAGE_FILES[name]}; charset=utf-8"})

    async def state(self, request: web.Request) -> web.Response:
        from lab.topology import MODELS

        return web.json_response({"model": self.lab.world.model, "models": list(MODELS), "write": self.has_cookie(request),
                                  "engine": self.lab.engine_name})

    async def strips(self, request: web.Request) -> web.Response:
        try:
            limit = max(1, min(int(request.query.get("limit", SHOWN)), self.fold.keep))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        internal = request.query.get("internal") in ("1", "true", "yes")
        return web.json_response(self.fold.strips(limit, internal=internal))

    # ---- the stream ---------------------------------------------------------------
    def _on_event(self, e: dict) -> None:
        # On the hot path of every request. Nobody watching: the fold takes it when next read.
        if not self._clients:
            self.fold.defer(e, self.lab.world)
            return
        # Someone is: fold, note, and leave the sending to one timer.
        changed, gone = self.fold.add(e, self.lab.world)
        self._dirty |= changed
        self._gone |= gone
        self._dirty -= gone
        kind = e.get("kind")
        if kind == "lab.model":
            self._notes["model"] = {"model": e.get("model")}
        elif kind == "hostname.status":
            self._notes["hostnames"] = {"hostname": e.get("hostname"), "status": e.get("new")}
        elif kind == "origin.hit" and e.get("path") == "/collect" and not str(e.get("trace") or "").startswith(INTERNAL):
            self._notes["loot"] = {"origin": e.get("origin")}
        if self._flush is None and (self._dirty or self._gone or self._notes):
            self._flush = asyncio.get_running_loop().call_later(COALESCE, self._send)

    def _send(self) -> None:
        self._flush = None
        messages = [_sse("drop", {"key": k}) for k in self._gone]
        for key in self._dirty:
            s = self.fold.strip(key)
            if s is not None and not s["internal"]:
                messages.append(_sse("strip", s))
        messages += [_sse(kind, data) for kind, data in self._notes.items()]
        self._dirty, self._gone, self._notes = set(), set(), {}
        for q in list(self._clients):
            for m in messages:
                try:
                    q.put_nowait(m)
                except asyncio.QueueFull:  # a page this slow starts over with a snapshot, not the lab its memory
                    _end(q)
                    self._clients.discard(q)
                    break

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        q: asyncio.Queue = asyncio.Queue(STREAM_QUEUE)
        self._clients.add(q)
        try:
            await resp.write(_sse("snapshot", {"strips": self.fold.strips(SHOWN), "model": self.lab.world.model}))
            while True:
                try:
                    m = await asyncio.wait_for(q.get(), KEEPALIVE)
                except TimeoutError:
                    m = b": keep-alive\n\n"
                if m is _END:
                    break
                await resp.write(m)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self._clients.discard(q)
        return resp

    async def on_shutdown(self, app: web.Application) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for q in list(self._clients):
            _end(q)
        self._clients.clear()
        for task in list(self._runs):
            task.cancel()
        await asyncio.gather(*self._runs, return_exceptions=True)
        if self._http is not None:
            await self._http.close()
            self._http = None

    # ---- scenarios ----------------------------------------------------------------
    def _catalog(self) -> dict:
        return {s.name: s for s in discover(None, DEFAULT_DIR, self.lab.world)}

    async def scenarios(self, request: web.Request) -> web.Response:
        try:
            catalog = self._catalog()
        except ScenarioError as e:
            return web.json_response({"error": str(e)}, status=503)
        return web.json_response([{"name": s.name, "title": s.title, "tags": list(s.tags)} for s in catalog.values()])

    async def run(self, request: web.Request) -> web.Response:
        """Run one catalog scenario under the lab's current model, against this lab, as `sni-lab run` does."""
        try:
            catalog = self._catalog()
        except ScenarioError as e:
            return web.json_response({"error": str(e)}, status=503)
        scenario = catalog.get(request.match_info["name"])
        if scenario is None:
            return web.json_response({"error": f"no scenario {request.match_info['name']!r}"}, status=404)
        if self._running.locked():
            return web.json_response({"error": "a scenario is already running; try again when it ends"}, status=409)
        async with self._running:
            runner = Runner(self.lab.endpoints, self.lab.world, self.lab.engine_name)
            task = asyncio.create_task(runner.run([scenario], (self.lab.world.model,)))
            self._runs.add(task)
            try:
                results = await task
            except ScenarioError as e:
                return web.json_response({"error": str(e)}, status=502)
            except asyncio.CancelledError:
                return web.json_response({"error": "the lab is stopping"}, status=503)
            finally:
                self._runs.discard(task)
        return web.Response(text=to_json(results), content_type="application/json")

    # ---- the collector's loot -----------------------------------------------------
    async def loot(self, request: web.Request) -> web.Response:
        collector = next((o for o in self.lab.world.origins if o.kind == "collector"), None)
        if collector is None:
            return web.json_response({"error": "this world has no collector"}, status=404)
        if self._http is None:
            ca = ssl.create_default_context(cafile=str(self.lab.ca.cert_path))
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2),
                                               connector=aiohttp.TCPConnector(ssl=ca))
        url = collector.url + "/collected"
        try:
            # The lab's own request: the strips leave it out.
            async with self._http.get(url, headers={"X-Lab-Trace": INTERNAL + "loot"}) as resp:
                entries = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            return web.json_response({"error": f"the collector at {url} did not answer ({type(e).__name__})"}, status=502)
        if not isinstance(entries, list):
            return web.json_response({"error": f"the collector at {url} answered no list"}, status=502)
        return web.json_response([_loot(x) for x in reversed(entries[-LOOT_SHOWN:]) if isinstance(x, dict)])


def _loot(entry: dict) -> dict:
    data = entry.get("data") if isinstance(entry.get("data"), dict) else {}
    return {"time": entry.get("time"), "cookie": data.get("cookie", entry.get("body")),
            "page": data.get("origin") or entry.get("origin"), "href": data.get("href"),
            "source": entry.get("source"), "method": entry.get("method")}


def _refused(message: str) -> web.Response:
    return web.json_response({"error": message}, status=403)


def _end(q: asyncio.Queue) -> None:
    while not q.empty():
        q.get_nowait()
    q.put_nowait(_END)


def _sse(kind: str, data) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()
