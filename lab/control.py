"""The control plane: custom hostnames with real verification, DNS admin, zones, model,
validation, events.

A thin aiohttp adapter around the pure `hostnames` state machine: the verifier asks the
lab resolver and fetches HTTP tokens for real, then `hostnames.verify` decides. How it
asks is the validation mode: `single`, one lookup from the control plane's own address
(what a targeted poisoning fools), or `multi` (the default), every lookup from each of the
world's vantage points (distinct source addresses) that must agree, and for a name already
on the edge DNS proof only, never an HTTP token fetched through the edge itself. Every
change is saved in `State` first, then applied to the running lab (edge certificates,
routing, resolver), then told as an event: a change the disk refuses (full, read-only)
is a 503 that leaves the running lab as it was. A hostname's status and its
`hostname.status` event are saved in one transaction.

Scale: a change of one hostname is one indexed row in `State` and one name in the world's
hostname index (`topology.Hostnames`, read by name by the policy and the certificate
store), never a reload or a new world; `GET /hostnames` is paged; `POST /hostnames` takes a
list, all or nothing. The background verifier asks only about the hostnames whose check is
due (`hostnames.next_check` says when), at most `limits.verify_rate` a second, and its DNS
lookups leave no event each.

Every request body and query is checked against its table in `lab.schema` (which the
OpenAPI document is made from) before anything happens. Only the lab's own names may
appear in `Host` (a DNS-rebinding page must not read the verification tokens), and a
change needs the Bearer token.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import secrets
import time
from typing import Any, Callable, Iterable, Protocol

import aiohttp
from aiohttp import web

from lab import hostnames as hn
from lab import live, policy, schema
from lab.binding import bind_error
from lab.dns import query
from lab.events import Events
from lab.hostnorm import HostError, normalize
from lab.openapi import spec
from lab.serverlog import server_logger
from lab.state import State, StateError
from lab.strips import INTERNAL
from lab.topology import MODELS, VALIDATION_MODES, World, WorldError, Zone

log = logging.getLogger(__name__)

VERIFY_INTERVAL = 10.0
BATCH_BODY_MAX = 256 * 1024  # POST /hostnames with a list; every other body stays within the app's 64 KiB
WRITE_WAIT = 0.001      # s: how soon a save that another thread's write held up is tried again
WRITE_WAIT_MAX = 1.0    # s: then it waits for the lock
SSE_QUEUE = 1000
SHUTDOWN_TIMEOUT = 0.5
RCODES = {1: "FORMERR", 2: "SERVFAIL", 4: "NOTIMP", 5: "REFUSED"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def _dumps(data: Any) -> str:
    # Strict JSON: no Infinity, ever. Compact: the C encoder (an indent takes the Python one).
    return json.dumps(data, allow_nan=False, separators=(",", ":"))


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=_dumps)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code  # a refusal's lab code, as in X-Lab-Decision (docs/design.md, "Refusal codes")


class DnsAdmin(Protocol):
    """What the control plane changes in the resolver."""
    internal_mark: bytes  # the verifier's queries carry it: no event each, the answer kept for us
    def internal_answer(self, trace: str) -> dict | None: ...
    def set_record(self, name: str, rtype: str, value: list[str], ttl: int | None = None) -> None: ...
    def delete_record(self, name: str, rtype: str | None = None) -> int: ...
    def records(self) -> list[dict]: ...
    def set_override(self, name: str, rtype: str, value: list[str], client: str | None = None,
                     expires: float | None = None, ttl: int = 5) -> str: ...
    def remove_override(self, ref: str) -> int: ...
    def overrides(self) -> list[dict]: ...


class Running(Protocol):
    """What the control plane needs of the running lab (`lab.run.Lab` is one)."""
    world: World
    engine_name: str
    events: Events
    resolver: DnsAdmin
    def set_world(self, world: World) -> None: ...
    def set_model(self, model: str) -> None: ...
    def hostnames_changed(self, names: Iterable[str]) -> None: ...  # after a change of `world.hostnames` in place


class Control:
    def __init__(self, lab: Running, state: State, token: str | None = None, interval: float = VERIFY_INTERVAL,
                 clock: Callable[[], float] = time.time, allow_remote: bool = False) -> None:
        self.lab = lab
        self.state = state
        self.token = token or secrets.token_urlsafe(24)
        self.interval = interval
        self.clock = clock
        self.allow_remote = allow_remote
        self.runner: web.AppRunner | None = None
        self.url = ""
        self._hosts: frozenset[str] = frozenset()
        self._worker: asyncio.Task | None = None
        self._verify_lock = asyncio.Lock()
        self._http: dict[str | None, aiohttp.ClientSession] = {}  # one per source address
        self.validation = VALIDATION_MODES[0]
        self._override_ids: dict[str, Any] = {}  # resolver id -> saved id (resolver ids restart with the process)
        self._streams: set[asyncio.Queue] = set()  # one per SSE client: stop() wakes each to end it
        self._queued: list[tuple[list[dict], bool, asyncio.Future]] = []  # registrations of this turn (_register)

    # ---- state <-> running lab -------------------------------------------------
    def restore(self) -> None:
        """Seed the hostnames from the world file on first start, then push saved state into the lab."""
        saved = self.state.get("validation")
        self.validation = saved if saved in VALIDATION_MODES else VALIDATION_MODES[0]
        added = tuple(Zone.from_dict(d) for d in self.state.zones())
        if added:
            try:
                self.lab.set_world(self.lab.world.with_zones(added))
            except WorldError as e:  # the world file changed under saved zones: keep the file's
                log.warning("zones added at run time not restored: %s", e)
        seeded: list[dict] = []
        if not self.state.has_hostnames() and not self.state.get("seeded"):
            now = self.clock()
            seeds = [hn.from_world(c, id=_new_id(), txt_token=_token(), http_token=_token(), now=now)
                     for c in self.lab.world.custom_hostnames]
            seeded = [self._status_event(h, _registered(h)) for h in seeds]
            self.state.add_hostnames(seeds, seeded)
            self.state.set("seeded", "1")
        # The edge's hostname index, made once from what is saved; from here on a change is one name.
        self.lab.set_world(self.lab.world.with_hostnames(self.state.edge_hostnames()))
        for event in seeded:
            self.lab.events.publish(event)
        self.state.purge_expired(self.clock())
        resolver = self.lab.resolver
        for r in self.state.records():
            resolver.set_record(r["name"], r["type"], r["value"], r["ttl"])
        for o in self.state.overrides():
            rid = resolver.set_override(o["name"], o["type"], json.loads(o["value"]), o["client"], o["expires"], o["ttl"])
            self._override_ids[rid] = o["id"]

    def _status_event(self, h: hn.Hostname, t: hn.Transition, purge: bool = False) -> dict:
        return self.lab.events.prepare("hostname.status", hostname=t.hostname, zone=t.zone, old=t.old, new=t.new,
                                       reason=t.reason, hostname_id=h.id, **({"purged": True} if purge else {}))

    def _apply(self, h: hn.Hostname) -> None:
        """The edge learns `h`'s status: one name of the world's index, changed in place. Only the
        live registration of a name is ever applied (a deleted row's status changes no more)."""
        index = self.lab.world.hostnames
        if h.status == "deleted":
            index.discard(h.name)
        else:
            index.put(h.as_custom_hostname())

    def _transition(self, h: hn.Hostname, t: hn.Transition | None, purge: bool = False) -> None:
        """Save `h` (with its event, if its status changed), then apply, then tell.
        `purge`: remove its row instead (a scenario's setup undone), with that event."""
        event = self._status_event(h, t, purge) if t is not None else None
        if purge:
            self.state.purge_hostname(h.id, event)
        else:
            self.state.save_hostname(h, event)
        if event is not None:
            self._apply(h)
            self.lab.hostnames_changed((h.name,))
            self.lab.events.publish(event)

    # ---- verification (I/O: gathers evidence; hostnames.verify decides) ---------
    def vantages(self) -> tuple[str, ...]:
        """The source addresses the verifier asks from in the current mode."""
        if self.validation == "single":
            return (self.lab.world.control.host,)
        return self.lab.world.vantages

    async def evidence(self, h: hn.Hostname) -> hn.Evidence:
        world = self.lab.world
        if self.validation == "single":
            return await self._evidence(h, world.control.host, None)
        refused = "its name is already served by the edge: DNS (TXT) proof only" if hn.served_by_edge(world, h) else None
        views = await asyncio.gather(*(self._evidence(h, src, refused) for src in world.vantages))
        return hn.agree(dict(zip(world.vantages, views)))

    async def _evidence(self, h: hn.Hostname, source: str, http_refused: str | None) -> hn.Evidence:
        """What one vantage point (`source`) sees of `h`."""
        world = self.lab.world
        target = world.zone_by_name[h.zone].cname_target
        errors: list[str] = []
        poisoned: list[str] = []
        txt: tuple[str, ...] = ()
        reply, error = await self._ask(hn.txt_name(h.name), "TXT", source, poisoned)
        if error:
            errors.append(error)
        elif reply is not None:
            txt = tuple(b"".join(rr.rdata.data).decode("utf-8", "replace") for rr in reply.rr if rr.rtype == 16)
        # A wildcard registration's own record (*.x): what the names it covers resolve by.
        chain, addrs, desc, error = await self._resolve(h.name, source, poisoned)
        errors += [error] if error else []
        points = False
        if target:
            _, target_addrs, _, error = await self._resolve(target, source, poisoned)
            errors += [error] if error else []
            points = target in chain or (bool(addrs) and set(addrs) == set(target_addrs))
        edge = {l.host for l in world.listeners}
        if self.validation == "multi" and http_refused is None and addrs and addrs[0] in edge:
            http_refused = f"{h.name} resolves to the edge's own address {addrs[0]}: never fetched through the edge"
        http = None if http_refused or h.name.startswith("*.") else await self._http_token(h, addrs, source)
        return hn.Evidence(txt=txt, http=http, points_to_target=points, dns=desc, error="; ".join(errors) or None,
                           http_refused=http_refused, poisoned=tuple(dict.fromkeys(poisoned)))

    async def _ask(self, name: str, rtype: str, source: str, poisoned: list[str]):
        """(reply, None) for a real answer (NOERROR or NXDOMAIN), else (None, why not). What the
        resolver kept of the lookup's answer says whether an override answered it (into `poisoned`)."""
        dns = self.lab.world.resolver
        trace = f"{INTERNAL}verify-{secrets.token_hex(6)}"  # the live page hides the lab's own traffic
        try:
            # Over real DNS, as any client (a poisoned resolver misleads the verifier too), marked as
            # the lab's own: the resolver tells no event of it (the verifier asks thousands).
            reply = await query(name, rtype, dns.host, dns.port, source=_source(source), trace=trace,
                                mark=self.lab.resolver.internal_mark)
        except Exception as e:  # noqa: BLE001 - no answer is no answer, whatever the client library raised
            return None, (f"{rtype} {name}: no answer from the lab resolver at {dns.host}:{dns.port} "
                          f"asked from {source} ({type(e).__name__})")
        told = self.lab.resolver.internal_answer(trace) or {}
        if told.get("poisoned") and told.get("override"):
            poisoned.append(told["override"])
        rcode = reply.header.rcode
        if rcode not in (0, 3):
            return None, f"{rtype} {name}: the lab resolver answered {RCODES.get(rcode, f'rcode {rcode}')}"
        return reply, None

    async def _resolve(self, name: str, source: str, poisoned: list[str]) -> tuple[list[str], list[str], str, str | None]:
        reply, error = await self._ask(name, "A", source, poisoned)
        if reply is None:
            return [], [], "no answer", error
        chain = [str(rr.rdata).rstrip(".") for rr in reply.rr if rr.rtype == 5]
        addrs = [str(rr.rdata) for rr in reply.rr if rr.rtype == 1]
        if reply.header.rcode == 3:
            return chain, addrs, "NXDOMAIN", None
        desc = " -> ".join(["CNAME " + c for c in chain] + (["A " + ",".join(addrs)] if addrs else ["no A record"]))
        return chain, addrs, desc, None

    async def _http_token(self, h: hn.Hostname, addrs: list[str], source: str) -> str | None:
        if not addrs:
            return None
        session = self._http.get(source)
        if session is None:
            connector = aiohttp.TCPConnector(local_addr=(_source(source), 0) if _source(source) else None)
            session = self._http[source] = aiohttp.ClientSession(connector=connector,
                                                                 timeout=aiohttp.ClientTimeout(total=2))
        url = f"http://{addrs[0]}:{self.lab.world.challenge_port}{hn.http_path(h)}"
        try:
            async with session.get(url, headers={"Host": h.name}, allow_redirects=False) as resp:
                if resp.status != 200:
                    return None
                return (await resp.content.read(1024)).decode("utf-8", "replace")
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None

    async def verify(self, h: hn.Hostname, *, conclusive: bool = False) -> hn.Hostname:
        """One round for `h`. `conclusive` (the operator's "verify now"): one real answer decides;
        otherwise the world's limits say how many negative answers, over how long, move it."""
        async with self._verify_lock:
            current = self.state.hostname(h.id)
            if current is None or current.status == "deleted":
                return current or h
            world = self.lab.world
            target = world.zone_by_name[current.zone].cname_target or ""
            ev = await self.evidence(current)
            latest = self.state.hostname(h.id)
            if latest != current:  # deleted or purged while we asked: saving this round would undo that
                return latest or current
            recheck = hn.Recheck.of(world.limits, self.interval)
            new, transition = hn.verify(current, ev, target=target, now=self.clock(),
                                        recheck=recheck.conclusive() if conclusive else recheck)
            if new is not current:
                self._transition(new, transition)
            if ev.error is not None:
                self.lab.events.emit("hostname.error", hostname=new.name, hostname_id=new.id, error=new.last_error,
                                     next_check=new.next_check)
            return new

    async def verify_due(self, limit: int = 1000, pace: float = 0.0) -> int:
        """One round of the background verifier: the hostnames whose check is due, the longest
        due first, at most `limit`, one every `pace` seconds at most. Returns how many."""
        due = self.state.due_hostnames(self.clock(), limit)
        loop = asyncio.get_running_loop()
        for h in due:
            started = loop.time()
            try:
                await self.verify(h)
            except StateError as e:
                self.lab.events.emit("hostname.error", hostname=h.name, hostname_id=h.id, error=str(e))
            if pace:
                await asyncio.sleep(max(0.0, pace - (loop.time() - started)))
        return len(due)

    async def _verify_forever(self) -> None:
        """`limits.verify_rate` hostnames a second at most; a look every `interval` when none is due
        (the first one `interval` after the start)."""
        checked = 0
        while True:
            if not checked:
                await asyncio.sleep(self.interval)
            rate = self.lab.world.limits.verify_rate
            try:
                checked = await self.verify_due(limit=max(1, round(rate * self.interval)), pace=1 / rate)
            except StateError as e:
                log.warning("verifier: %s", e)
                checked = 0

    # ---- HTTP API --------------------------------------------------------------
    @web.middleware
    async def _middleware(self, request: web.Request, handler):
        host = request.headers.get("Host")
        if host is None:
            return _json({"error": "missing Host header"}, 400)
        if not self._host_allowed(host):
            return _json({"error": f"Host {schema.show(host)} is not a name of this lab's control plane "
                                   f"(use {self.url})"}, 403)
        if request.method not in ("GET", "HEAD", "OPTIONS") and not self._authorized(request):
            return _json({"error": "missing or wrong token: send Authorization: Bearer <token> "
                                   "(the token is in .lab/endpoints.json)"}, 401)
        try:
            return await handler(request)
        except ApiError as e:
            return _json({"error": str(e), **({"code": e.code} if e.code else {})}, e.status)
        except (hn.HostnameError, ValueError) as e:
            return _json({"error": str(e)}, 400)
        except StateError as e:
            return _json({"error": f"not saved, nothing changed: {e}"}, 503)

    def _authorized(self, request: web.Request) -> bool:
        scheme, _, credentials = request.headers.get("Authorization", "").strip().partition(" ")
        # RFC 7235: the scheme is case-insensitive. Header bytes beyond ASCII never match, never raise.
        given = credentials.strip().encode("utf-8", "replace")
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self.token.encode())

    def _host_allowed(self, value: str) -> bool:
        host = value.strip().lower()
        if host in self._hosts:
            return True
        if not self.allow_remote:
            return False
        # Reached from elsewhere by address: a literal IP cannot be rebound the way a name can.
        name, _, port = host.rpartition(":") if not host.endswith("]") else (host, "", "")
        if port and not port.isdigit():
            return False
        try:
            ipaddress.ip_address((name or host).strip("[]"))
        except ValueError:
            return False
        return True

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=64 * 1024)
        app.on_shutdown.append(self._end_streams)
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
        r.add_get("/validation", self.get_validation)
        r.add_put("/validation", self.set_validation)
        r.add_get("/zones", self.list_zones)
        r.add_post("/zones", self.add_zone)
        r.add_delete("/zones/{name}", self.delete_zone)
        r.add_get("/events", self.events)
        live.setup(app, self)  # the live page at /, and its cookie auth for the page's mutations
        from lab import rules
        from lab.workshop import server as workshop  # imports this module: not at the top

        rules.setup(app, self)  # WAF rules at run time
        workshop.setup(app, self)  # exercises, progress, room mode
        return app

    async def start(self, host: str, port: int, background: bool = True) -> tuple[str, int]:
        """Serve the API; `background`: also re-verify every hostname every `interval` seconds."""
        # shutdown_timeout bounds the wait for requests still running when the lab stops (a
        # "verify now" waiting on DNS); SSE streams end at once (_end_streams).
        self.runner = web.AppRunner(self.app(), access_log=None, handle_signals=False,
                                    shutdown_timeout=SHUTDOWN_TIMEOUT, logger=server_logger("lab.control"))
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            self.runner = None
            raise bind_error("control plane", host, port, e) from None
        bound = self.runner.addresses[0][:2]
        shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
        self.url = f"http://{shown}:{bound[1]}"
        self._hosts = frozenset(f"{n}{p}" for n in {*LOOPBACK_NAMES, shown} for p in ("", f":{bound[1]}"))
        if background:
            self._worker = asyncio.create_task(self._verify_forever())
        return bound

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None
        for session in self._http.values():
            await session.close()
        self._http.clear()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _body(self, request: web.Request, fields: tuple[schema.Field, ...]) -> dict:
        return schema.validate(fields, await self._json_body(request))

    async def _json_body(self, request: web.Request) -> Any:
        try:
            # parse_constant: NaN and Infinity are not JSON, whatever Python's parser accepts.
            return json.loads(await request.text(), parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nesting too deep
            raise ApiError(400, "body is not valid JSON") from None

    def _hostname(self, request: web.Request) -> hn.Hostname:
        h = self.state.hostname(request.match_info["ref"])
        if h is None:
            raise ApiError(404, f"no custom hostname {schema.show(request.match_info['ref'])}")
        return h

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(spec())

    async def health(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "model": self.lab.world.model, "engine": self.lab.engine_name})

    async def list_hostnames(self, request: web.Request) -> web.Response:
        q = schema.validate_query(schema.LIST_HOSTNAMES, request.query)
        statuses = [s for s in (q["status"] or "").split(",") if s]
        unknown = [s for s in statuses if s not in hn.STATUSES]
        if unknown:
            raise ApiError(400, f"parameter 'status': {schema.show(unknown[0])} is not one of {', '.join(hn.STATUSES)}")
        cursor = q["cursor"]
        if cursor is not None and not (cursor.isascii() and cursor.isdigit()):
            raise ApiError(400, f"parameter 'cursor': {schema.show(cursor)} is not a cursor of this API (a `next`)")
        zone = _name(q["zone"], "zone") if q["zone"] else None
        found, after = self.state.hostname_page(int(cursor or 0), q["limit"], statuses, zone,
                                                q["prefix"].lower() if q["prefix"] else None)
        return _json({"hostnames": [h.to_dict() for h in found], "next": None if after is None else str(after)})

    async def create_hostname(self, request: web.Request) -> web.Response:
        """One registration (an object), or several (a list): checked item by item, each as a
        single add would be, then saved in one transaction, all or none."""
        body = await self._json_body(request.clone(client_max_size=BATCH_BODY_MAX))
        if not isinstance(body, list):
            return _json((await self._register([schema.validate(schema.NEW_HOSTNAME, body)]))[0].to_dict(), 201)
        items = schema.validate_items(schema.NEW_HOSTNAME, body, schema.HOSTNAMES_BATCH_MAX)
        return _json({"hostnames": [h.to_dict() for h in await self._register(items, batch=True)]}, 201)

    async def _register(self, items: list[dict], batch: bool = False) -> list[hn.Hostname]:
        """The registrations of one request, saved together with those of every other request
        that reached this point in the same turn of the loop (or while the state was busy): one
        commit for all of them (a commit is most of an add's time on the loop, which the edge
        shares), each request still checked, answered and failed on its own. Durable before the
        answer, as one add alone."""
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        self._queued.append((items, batch, answer))
        if len(self._queued) == 1:
            loop.call_soon(self._register_queued, loop.time())  # after the handlers runnable in this turn
        return await answer

    def _register_queued(self, since: float) -> None:
        """Save what is queued, unless another thread is writing the state (the event sink's
        batch, up to ~15 ms): then again in a moment, the loop serving the edge meanwhile rather
        than waiting for the lock (at most WRITE_WAIT_MAX, then it waits as any write does)."""
        loop = asyncio.get_running_loop()
        with self.state.free_to_write() as free:
            if not free and loop.time() - since < WRITE_WAIT_MAX:
                loop.call_later(WRITE_WAIT, self._register_queued, since)
                return
            queued = self._queued
            try:
                self._save_queued()
            except Exception as e:  # a bug, not a refusal: each request gets the error, none waits forever
                for _, _, answer in queued:
                    if not answer.done():
                        answer.set_exception(e)
                raise

    def _save_queued(self) -> None:
        """Check, save (one transaction), apply, tell: with no pause in between, so the events are
        told in the order of their ids (a turn's requests are few, each list short enough:
        HOSTNAMES_BATCH_MAX)."""
        queued, self._queued = self._queued, []
        world, now = self.lab.world, self.clock()
        made: dict[str, hn.Hostname] = {}  # made by this turn's earlier requests: not in the index yet
        accepted = []
        for items, batch, answer in queued:
            if answer.done():  # its client went away before the turn came: nothing saved for it
                continue
            try:
                accepted.append((self._check(items, batch, world, now, made), answer))
            except ApiError as e:
                answer.set_exception(e)
        if not accepted:
            return
        try:
            self._save([h for hostnames, _ in accepted for h in hostnames])
        except (StateError, hn.HostnameError) as e:
            if len(accepted) == 1:
                accepted[0][1].set_exception(e)
                return
            # A refusal of one request must not fail the others: each alone, as if it came alone.
            saved = []
            for hostnames, answer in accepted:
                try:
                    self._save(hostnames)
                except (StateError, hn.HostnameError) as e:
                    answer.set_exception(e)
                else:
                    saved.append((hostnames, answer))
            accepted = saved
        for hostnames, answer in accepted:
            answer.set_result(hostnames)

    def _check(self, items: list[dict], batch: bool, world: World, now: float,
               made: dict[str, hn.Hostname]) -> list[hn.Hostname]:
        """One request's registrations, checked as a single add is (ApiError for the first bad
        item); they join `made`."""
        first_saas = next((z.name for z in world.zones if z.saas), None)
        mine: dict[str, hn.Hostname] = {}
        for i, body in enumerate(items):
            # The live registrations are the world's index (the state's, applied): create() reads
            # the name there. The unique index of State catches what could race past it.
            earlier = made.get(_normal(body["hostname"]))
            try:
                h = hn.create(body["hostname"], str(body["zone"] or first_saas), world=world,
                              existing=[earlier] if earlier else [], id=_new_id(), txt_token=_token(),
                              http_token=_token(), now=now)
            except hn.HostnameError as e:
                raise ApiError(400, f"item {i}: {e}" if batch else str(e)) from None
            mine[h.name] = made[h.name] = h
        return list(mine.values())

    def _save(self, hostnames: list[hn.Hostname]) -> None:
        """Save new registrations with their events (one transaction), then apply and tell."""
        events = [self._status_event(h, _registered(h)) for h in hostnames]
        self.state.add_hostnames(hostnames, events)
        for h, event in zip(hostnames, events):
            self._apply(h)  # the edge learns it is pending: refused as such, never routed
            self.lab.events.publish(event)
        self.lab.hostnames_changed([h.name for h in hostnames])

    async def get_hostname(self, request: web.Request) -> web.Response:
        return _json(self._hostname(request).to_dict())

    async def verify_hostname(self, request: web.Request) -> web.Response:
        return _json((await self.verify(self._hostname(request), conclusive=True)).to_dict())

    async def delete_hostname(self, request: web.Request) -> web.Response:
        purge = schema.validate_query(schema.DELETE_HOSTNAME, request.query)["purge"]
        h, t = self._hostname(request), None
        if not (purge and h.status == "deleted"):  # purging a deleted row changes no status
            h, t = hn.delete(h, now=self.clock())
        self._transition(h, t, purge=bool(purge))
        return _json(h.to_dict())

    async def list_records(self, request: web.Request) -> web.Response:
        return _json(self.lab.resolver.records())

    async def set_record(self, request: web.Request) -> web.Response:
        body = await self._body(request, schema.RECORD)
        name, rtype, values = _name(body["name"]), body["type"], body["value"]
        ttl = self.lab.world.ttl if body["ttl"] is None else body["ttl"]
        before = [r for r in self.state.records() if (r["name"], r["type"]) == (name, rtype)]
        self.state.set_record(name, rtype, values, ttl)
        try:
            self.lab.resolver.set_record(name, rtype, values, ttl)
        except ValueError:
            # The resolver has the last word on values (addresses, listener: names): undo the save.
            if before:
                self.state.set_record(name, rtype, [r["value"] for r in before], before[0]["ttl"])
            else:
                self.state.delete_record(name, rtype)
            raise
        return _json({"name": name, "type": rtype, "value": values, "ttl": ttl}, 201)

    async def delete_record(self, request: web.Request) -> web.Response:
        q = schema.validate_query(schema.DELETE_RECORD, request.query)
        name = _name(q["name"])
        self.state.delete_record(name, q["type"])
        return _json({"removed": self.lab.resolver.delete_record(name, q["type"])})

    async def list_overrides(self, request: web.Request) -> web.Response:
        return _json(self.lab.resolver.overrides())

    async def set_override(self, request: web.Request) -> web.Response:
        body = await self._body(request, schema.NEW_OVERRIDE)
        name, rtype = _name(body["name"]), body["type"]
        expires = self.clock() + body["expires_in"] if body["expires_in"] is not None else None
        saved_id = "ovr-" + secrets.token_hex(6)
        self.state.save_override({"id": saved_id, "name": name, "type": rtype, "client": body["client"],
                                  "value": json.dumps(body["value"], allow_nan=False), "expires": expires,
                                  "ttl": body["ttl"]})
        try:
            oid = self.lab.resolver.set_override(name, rtype, body["value"], body["client"], expires, body["ttl"])
        except ValueError:
            self.state.delete_override(saved_id)
            raise
        self._override_ids[oid] = saved_id
        return _json(next(o for o in self.lab.resolver.overrides() if o["id"] == oid), 201)

    async def delete_override(self, request: web.Request) -> web.Response:
        ref = request.match_info["ref"]
        live = self.lab.resolver.overrides()
        gone = [o["id"] for o in live if o["id"] == ref]
        if not gone:
            try:
                name = normalize(ref, allow_wildcard=True)
            except HostError:
                name = None
            gone = [o["id"] for o in live if o["name"] == name]
        if not gone:
            raise ApiError(404, f"no override {schema.show(ref)}")
        self.state.delete_overrides([self._override_ids.get(oid, oid) for oid in gone])
        for oid in gone:
            self._override_ids.pop(oid, None)
        return _json({"removed": self.lab.resolver.remove_override(ref)})

    async def get_model(self, request: web.Request) -> web.Response:
        return _json({"model": self.lab.world.model, "models": list(MODELS)})

    async def set_model(self, request: web.Request) -> web.Response:
        model = (await self._body(request, schema.MODEL))["model"]
        self.state.set("model", model)
        self.lab.set_model(model)
        return _json({"model": model})

    def _validation(self) -> dict:
        return {"mode": self.validation, "modes": list(VALIDATION_MODES), "vantages": list(self.vantages()),
                "http_through_edge": self.validation == "single"}

    async def get_validation(self, request: web.Request) -> web.Response:
        return _json(self._validation())

    async def set_validation(self, request: web.Request) -> web.Response:
        mode = (await self._body(request, schema.VALIDATION))["mode"]
        self.state.set("validation", mode)
        self.validation = mode
        self.lab.events.emit("lab.validation", mode=mode, vantages=list(self.vantages()))
        return _json(self._validation())

    async def list_zones(self, request: web.Request) -> web.Response:
        return _json([z.to_dict() for z in self.lab.world.zones])

    async def add_zone(self, request: web.Request) -> web.Response:
        body = await self._body(request, schema.NEW_ZONE)
        world = self.lab.world
        name = _name(body["name"])
        if not any(name == t or name.endswith("." + t) for t in world.tlds):
            raise ApiError(400, f"{name} is outside the lab's TLDs ({', '.join('.' + t for t in world.tlds)})")
        hosts = tuple(dict.fromkeys(_name(h) for h in (body["hosts"] or [name])))
        outside = [h for h in hosts if h != name and not h.endswith("." + name)]
        if outside:
            raise ApiError(400, f"field 'hosts': {outside[0]} is not inside zone {name}")
        if body["origin"] not in world.origin_by_name:
            raise ApiError(400, f"field 'origin': unknown origin {schema.show(body['origin'])} "
                                f"(choose from {', '.join(world.origin_by_name)})")
        if (body["v1_listener"] or body["cname_target"]) and not body["saas"]:
            raise ApiError(400, "only a SaaS zone (saas: true) has a v1_listener or a cname_target")
        for other in world.zones:
            if name == other.name or name.endswith("." + other.name) or other.name.endswith("." + name):
                raise ApiError(409, f"zone {name} overlaps zone {other.name}, already on the edge")
        zone = Zone(name, body["origin"], hosts, body["saas"], _name(body["cname_target"]) if body["cname_target"] else None,
                    body["v1_listener"], added=True)
        refused = policy.admit_zone(world, zone)
        if refused is not None:
            self.lab.events.emit("zone.refused", zone=name, code=refused.code, reason=refused.reason, model=world.model)
            raise ApiError(refused.status, refused.reason, refused.code)
        added = tuple(z for z in world.zones if z.added) + (zone,)
        try:
            new = world.with_zones(added)
        except WorldError as e:
            raise ApiError(400, str(e).split(": ", 1)[-1]) from None
        self.state.save_zone(zone.to_dict())
        self.lab.set_world(new)
        self.lab.events.emit("zone.added", zone=name, origin=zone.origin, saas=zone.saas, v1_listener=zone.v1_listener)
        return _json(new.zone_by_name[name].to_dict(), 201)

    async def delete_zone(self, request: web.Request) -> web.Response:
        world = self.lab.world
        try:
            name = normalize(request.match_info["name"])
        except HostError:
            name = None
        zone = world.zone_by_name.get(name) if name else None
        if zone is None:
            raise ApiError(404, f"no zone {schema.show(request.match_info['name'])}")
        if not zone.added:
            raise ApiError(400, f"zone {name} is from the world file; only zones added at run time can be removed")
        live = [h.name for h in self.state.hostname_page(limit=3, zone=name,
                                                          statuses=("pending", "active", "moved", "blocked"))[0]]
        if live:
            raise ApiError(409, f"zone {name} still has custom hostnames ({', '.join(live[:3])}): delete them first")
        new = world.with_zones(tuple(z for z in world.zones if z.added and z.name != name))
        self.state.delete_zone(name)
        self.lab.set_world(new)
        self.lab.events.emit("zone.removed", zone=name)
        return _json(zone.to_dict())

    async def events(self, request: web.Request) -> web.StreamResponse:
        params = dict(request.query)
        if "since" not in params and "Last-Event-ID" in request.headers:
            # An EventSource reconnecting: everything after what it saw, not the newest again.
            params["since"] = request.headers["Last-Event-ID"]
            params.pop("newest", None)
        q = schema.validate_query(schema.EVENTS, params)
        since, limit, newest, trace, kind, internal = (q[k] for k in ("since", "limit", "newest", "trace", "kind",
                                                                        "internal"))
        if newest is not None and "limit" in params:
            raise ApiError(400, "give limit (the oldest after since) or newest, not both")

        def wanted(e: dict) -> bool:
            return ((trace is None or e.get("trace") == trace) and (kind is None or e["kind"].startswith(kind))
                    and (internal or not e.get("internal")))

        async def told() -> list[dict]:
            if newest is not None:
                return await self._newest(newest, since, wanted, kind=kind, trace=trace, internal=bool(internal))
            if trace is not None:  # a trace has few events: find them all before the limit cuts
                mine = [e for e in self.lab.events.trace(trace) if e["id"] > since and wanted(e)]
                if mine:
                    return mine[:limit]
            return [e for e in self._history(since, limit) if wanted(e)]

        if "text/event-stream" not in request.headers.get("Accept", ""):
            return _json(await told())
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        # Bounded by push(), not by the queue: there is always room for the None that ends it.
        queue: asyncio.Queue = asyncio.Queue()
        overflow = False

        def push(e: dict) -> None:
            nonlocal overflow
            if wanted(e) and not overflow:
                # A reader this slow loses the stream, not the lab its memory.
                overflow = queue.qsize() >= SSE_QUEUE
                queue.put_nowait(None if overflow else e)

        unsubscribe = self.lab.events.subscribe(push)  # before reading the past: nothing falls in between
        self._streams.add(queue)
        try:
            last = since
            for e in await told():
                await resp.write(_sse(e))
                last = e["id"]
            while True:
                try:
                    e = await asyncio.wait_for(queue.get(), 15)
                except TimeoutError:
                    await resp.write(b": keep-alive\n\n")
                    continue
                if e is None:  # overflowed, or the lab is stopping
                    break
                if e["id"] > last:  # else already sent with the past
                    await resp.write(_sse(e))
        except ConnectionResetError:
            pass
        finally:
            self._streams.discard(queue)
            unsubscribe()
        return resp

    async def _end_streams(self, app: web.Application) -> None:
        """aiohttp's on_shutdown: every SSE handler returns, so its response ends cleanly."""
        for queue in self._streams:
            queue.put_nowait(None)

    async def _newest(self, n: int, since: int, wanted: Callable[[dict], bool], **filters: Any) -> list[dict]:
        """The newest `n` wanted events after `since`: the ring buffer, then the stored log if it
        does not reach back that far (`filters` say in SQL what `wanted` says in Python)."""
        found = self.lab.events.newest(n, since, wanted)
        oldest = self.lab.events.oldest_id()
        if len(found) < n and (oldest is None or oldest > since + 1):
            found = await asyncio.to_thread(self.state.newest_events, n - len(found), since, oldest,
                                            **filters) + found
        return found

    def _history(self, since: int, limit: int) -> list[dict]:
        oldest = self.lab.events.oldest_id()
        if oldest is not None and since >= oldest - 1:
            return self.lab.events.since(since, limit)
        return self.state.events(since, limit)  # older than the ring buffer: from the stored log


def _sse(e: dict) -> bytes:
    return f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e, allow_nan=False)}\n\n".encode()


def _name(value: str, field: str = "name") -> str:
    """A DNS name as the resolver will hold it, so what is saved is what is served."""
    try:
        return normalize(value, allow_wildcard=True)
    except HostError as e:
        raise ApiError(400, f"field {field!r}: {e}") from None


def _normal(name: str) -> str | None:
    try:
        return normalize(name, allow_wildcard=True)
    except HostError:
        return None  # create() says why


def _registered(h: hn.Hostname) -> hn.Transition:
    return hn.Transition(h.name, h.zone, None, h.status, h.reason)


def _source(address: str) -> str | None:
    """A source address to bind to; None for an unspecified one (0.0.0.0 with --allow-remote)."""
    return None if ipaddress.ip_address(address).is_unspecified else address


def _new_id() -> str:
    return "ch-" + secrets.token_hex(6)


def _token() -> str:
    """An ownership token: hex, so `sni-lab dns set NAME TXT TOKEN` never reads it as a flag."""
    return secrets.token_hex(16)
