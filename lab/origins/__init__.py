"""The origins of the world (docs/design.md, "The world"): one aiohttp app per origin, by kind.

- victim (`victim.py`): www.victim.example's site, Victim Bank, with a login that sets a
  session cookie;
- saas (`saas.py`): the SaaS provider's app, one page per tenant chosen by the request's
  host; the attacker's tenant serves a copy of the bank's page carrying the payload;
- collector (`collector.py`): the attacker's collector, over https, recording what the
  payload sends and replaying stolen cookies against the victim.

Every response of every origin carries `X-Lab-Origin: <origin name>`: the oracle reads
it to tell which origin answered. Pages are rendered once where they can, because the
origins are benchmarked behind the edge.
"""
from __future__ import annotations

from typing import Any

from aiohttp import web

from lab.binding import bind_error
from lab.serverlog import server_logger
from lab.events import Events
from lab.origins import collector, saas, victim
from lab.origins.collector import COLLECT_MAX_BYTES, COLLECT_MAX_ENTRIES, COLLECTED_KEY
from lab.origins.common import ORIGIN_KEY, WORLD_KEY, WorldRef
from lab.origins.saas import collector_urls
from lab.pki import LabCA
from lab.topology import Origin, World

__all__ = ["COLLECT_MAX_BYTES", "COLLECT_MAX_ENTRIES", "ORIGIN_HEADER", "SERVER", "TRACE_HEADER", "Origins",
           "build_app", "collector_urls"]

ORIGIN_HEADER = "X-Lab-Origin"
# The edge may pass its trace id to the origin so `origin.hit` joins the client's trace.
TRACE_HEADER = "X-Lab-Trace"
SERVER = "sni-lab origin"  # instead of aiohttp's Python/... aiohttp/... banner


async def _health(request: web.Request) -> web.Response:
    origin = request.app[ORIGIN_KEY]
    return web.json_response({"ok": True, "origin": origin.name, "kind": origin.kind})


# --- the apps ---------------------------------------------------------------------------

def build_app(origin: Origin, world: World, events: Events | None = None, ca: LabCA | None = None) -> web.Application:
    """`ca`: the lab CA, which the collector verifies the victim's edge with when it replays."""
    is_collector = origin.kind == "collector"
    if is_collector and ca is None:
        raise ValueError(f"origin {origin.name}: a collector needs the lab CA")
    app = web.Application(client_max_size=COLLECT_MAX_BYTES if is_collector else 1024 ** 2)
    app[ORIGIN_KEY] = origin
    app[WORLD_KEY] = WorldRef(world)
    stamp = {ORIGIN_HEADER: origin.name, **(collector.CORS if is_collector else {})}

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
        victim.routes(app)
    elif origin.kind == "saas":
        saas.routes(app, origin, world)
    elif is_collector:
        collector.routes(app, origin, world, ca)
    return app


log = server_logger("lab.origins")


class Origins:
    """Runs every origin of the world on its own address; the collector over https with a
    certificate from `ca` (issued into the lab's certs dir)."""

    def __init__(self, world: World, events: Events | None = None, *, ca: LabCA,
                 only: tuple[str, ...] | None = None) -> None:
        """`only`: serve just these origins of the world (one container each, in the compose stack)."""
        self.world = world
        self.events = events
        self.ca = ca
        self.only = only
        self._runners: list[web.AppRunner] = []
        self._apps: list[web.Application] = []

    async def start(self) -> dict[str, tuple[str, int]]:
        if self._runners:
            raise RuntimeError("origins already started")
        self._apps = []
        bound: dict[str, tuple[str, int]] = {}
        world = self.world
        # Collectors first: the payload page needs the collector's bound port (port 0).
        chosen = [o for o in world.origins if self.only is None or o.name in self.only]
        for origin in sorted(chosen, key=lambda o: o.kind != "collector"):
            origin = world.origin_by_name[origin.name]  # with the ports bound so far
            app = build_app(origin, world, self.events, self.ca)
            try:
                tls = collector.tls_context(self.ca, origin, world) if origin.kind == "collector" else None
            except BaseException:
                await self.stop()
                raise
            runner = web.AppRunner(app, access_log=None, logger=log)
            await runner.setup()
            self._runners.append(runner)
            self._apps.append(app)
            try:  # backlog as the edge's: a burst of up to origin_max_connections new connections is accepted
                await web.TCPSite(runner, origin.host, origin.port, ssl_context=tls, reuse_address=True,
                                  backlog=1024).start()
            except OSError as e:
                await self.stop()
                raise bind_error(f"origin {origin.name}", origin.host, origin.port, e) from None
            host, port = runner.addresses[0][:2]
            bound[origin.name] = (host, port)
            world = world.with_ports({origin.name: port})
        self.set_world(world)
        return bound

    def set_world(self, world: World) -> None:
        """The world as it is bound now: the collector replays through the edge's real port."""
        self.world = world
        for app in self._apps:
            app[WORLD_KEY].world = world

    async def stop(self) -> None:
        # The apps are kept: what the collector received stays readable after stop.
        runners, self._runners = self._runners, []
        for runner in runners:
            await runner.cleanup()

    @property
    def collected(self) -> list[dict[str, Any]]:
        return [entry for app in self._apps if COLLECTED_KEY in app for entry in app[COLLECTED_KEY]]



