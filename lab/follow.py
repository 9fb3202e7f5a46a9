"""The lab split over containers: a control plane that holds the state, and followers.

One process (`lab.run.Lab`) changes its edge and resolver by calling them. Here they run
in other containers, so the control plane side is a `Hub`: what `Control` needs of a
running lab (world, resolver, events, set_world, set_model), with no socket of its own
but the API's. Every change bumps a generation. A follower (the edge, the resolver)
long-polls `GET /follow/snapshot?role=R&after=N`: the answer comes as soon as the
generation passes N, and the follower's next poll, `after` the generation it applied,
is its acknowledgement. A change through the API (a poisoning, a model switch, a
verification) answers once every follower seen lately has applied it, so a client's next
request meets the new state, as in one process. Followers' events (DNS answers, TLS,
decisions, origin hits) are pushed to `POST /follow/events` with the token and told again
by the hub's event bus: the live page, `events` and `explain` see one story.

A snapshot is small but for the hostnames (100,000 of them are some 7 MB): a follower that
applied generation N gets only the hostnames changed since (`changes`, read by name from the
hub's index) and changes its index in place, as `lab.run.Lab` does; the whole list
(`hostnames`) only on its first poll or when it fell further behind than the hub remembers.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import aiohttp
from aiohttp import web

from lab.control import Control
from lab.dns import Resolver
from lab.events import KINDS, Events
from lab.topology import CustomHostname, Hostnames, World, Zone

log = logging.getLogger("lab.follow")

POLL = 20.0             # s: longest a snapshot poll is held open with nothing new
SETTLE = 3.0            # s: longest a change waits for the followers to apply it
FOLLOWER_GONE = 30.0    # s: a follower silent this long is not waited for
PUSH_BATCH_BYTES = 48 * 1024  # below the control plane's request body limit (64 KiB)
PUSH_BUFFER = 10000     # events held while the control plane is away; the oldest go first
CHANGES_KEPT = 1000     # hostname changes (generations) the hub remembers for followers behind
CHANGES_MAX = 2000      # names in one answer's `changes`; further behind, the whole list
# What followers tell: the hub tells its own (hostnames, model) and believes no follower about them.
FOLLOWER_KINDS = tuple(k for k in KINDS if k.split(".")[0] in ("dns", "tls", "route", "origin"))


# ---- the control plane's side ---------------------------------------------------------

class Generations:
    """A change counter, and which follower applied which generation (its last poll's `after`);
    for the generations that changed hostnames, which names."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.current = 0
        self.clock = clock
        self.applied: dict[str, tuple[int, float]] = {}  # role -> (generation, when seen)
        self._changed = asyncio.Event()
        self._acked = asyncio.Event()
        self._names: deque[tuple[int, tuple[str, ...]]] = deque()  # (generation, hostnames it changed)
        self._forgotten = 0  # the newest generation whose hostname change is no longer in _names

    def bump(self, names: Iterable[str] = ()) -> None:
        """A new generation; `names`: the hostnames it changed (none: something else changed)."""
        self.current += 1
        names = tuple(names)
        if names:
            self._names.append((self.current, names))
            if len(self._names) > CHANGES_KEPT:
                self._forgotten = self._names.popleft()[0]
        self._changed.set()
        self._changed = asyncio.Event()

    def hostnames_replaced(self) -> None:
        self._names.clear()
        self._forgotten = self.current

    def hostnames_since(self, after: int) -> set[str] | None:
        """The hostnames changed after generation `after`; None when they are not all known (a
        first poll, or one from further back than the changes kept, or too many to list)."""
        if after < 0 or after < self._forgotten or after > self.current:
            return None
        names: set[str] = set()
        for generation, changed in reversed(self._names):
            if generation <= after:
                break
            names.update(changed)
            if len(names) > CHANGES_MAX:
                return None
        return names

    def seen(self, role: str, applied: int) -> None:
        self.applied[role] = (applied, self.clock())
        self._acked.set()
        self._acked = asyncio.Event()

    def behind(self, generation: int) -> list[str]:
        """The followers seen lately that have not applied `generation` yet."""
        now = self.clock()
        return sorted(r for r, (g, when) in self.applied.items() if g < generation and now - when < FOLLOWER_GONE)

    async def newer_than(self, after: int, timeout: float) -> None:
        if self.current <= after:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass

    async def settled(self, generation: int, timeout: float) -> list[str]:
        """Wait until every live follower applied `generation`; returns those still behind."""
        deadline = self.clock() + timeout
        while self.behind(generation) and (left := deadline - self.clock()) > 0:
            try:
                await asyncio.wait_for(self._acked.wait(), left)
            except TimeoutError:
                break
        return self.behind(generation)


class _Source(Resolver):
    """The hub's copy of the resolver's admin state: never bound, it checks and holds what
    the API sets; every change is a new generation for the resolver that serves."""

    def __init__(self, world: World, generations: Generations) -> None:
        self.generations = generations
        super().__init__(world)

    def _rebuild(self) -> None:
        super()._rebuild()
        self.generations.bump()


@dataclass(frozen=True)
class PublicCA:
    """The lab CA as the control plane needs it: the certificate only (the key stays with the edge)."""
    cert_path: Path


class Hub:
    """`Running` for the control plane of the compose stack (see the module's docstring)."""

    def __init__(self, world: World, state, ca_path: str | Path, engine: str = "native") -> None:
        saved = state.get("model")
        self.state = state
        self.world = world.with_model(saved or world.model)
        self.engine_name = engine
        self.ca = PublicCA(Path(ca_path))
        self.events = Events(start_id=state.last_event_id() + 1, field_limit=world.limits.event_field)
        self.generations = Generations()
        self.resolver = _Source(self.world, self.generations)
        self.endpoints: dict = {}

    def set_world(self, world: World) -> None:
        replaced = world.hostnames is not self.world.hostnames
        self.world = world
        self.resolver.update_world(world)  # a new generation
        if replaced:  # not one name changed: every follower needs the whole list
            self.generations.hostnames_replaced()

    def set_model(self, model: str) -> None:
        self.set_world(self.world.with_model(model))
        self.endpoints["model"] = model
        self.events.emit("lab.model", model=model)

    def hostnames_changed(self, names: Iterable[str]) -> None:
        self.generations.bump(names)  # the followers' snapshot holds the hostnames

    def snapshot(self, after: int = -1) -> dict:
        """What a follower that applied generation `after` needs: everything but the hostnames,
        and of those the ones changed since (`changes`; a deleted one has status "deleted") or,
        when the hub cannot say, all of them (`hostnames`)."""
        overrides = self.resolver.overrides()  # first: dropping the expired ones is a change too
        snap = {"generation": self.generations.current, "model": self.world.model,
                "zones": [z.to_dict() for z in self.world.zones if z.added],
                "records": self.resolver.records(), "overrides": overrides}
        index = self.world.hostnames
        changed = self.generations.hostnames_since(after)
        if changed is None:
            snap["hostnames"] = [_told(c) for c in index.values()]
        else:
            snap["changes"] = [_told(c) if (c := index.get(n)) else {"name": n, "status": "deleted"} for n in changed]
        return snap

    def told(self, events: list) -> int:
        """Tell a follower's events again on the hub's bus (new ids, their own time)."""
        count = 0
        for e in events:
            if not isinstance(e, dict) or e.get("kind") not in FOLLOWER_KINDS:
                continue
            trace = e.get("trace")
            fields = {k: v for k, v in e.items() if k not in ("id", "ts", "kind", "trace")}
            event = self.events.prepare(e["kind"], trace if isinstance(trace, str) else None, **fields)
            if isinstance(e.get("ts"), (int, float)):
                event["ts"] = float(e["ts"])
            self.events.publish(event)
            count += 1
        return count


class HubControl(Control):
    """The control plane's API and live page, plus the followers' two endpoints. `published`
    is the address browsers use (the host's port): the live page's own origin."""

    def __init__(self, hub: Hub, published: str, **options) -> None:
        super().__init__(hub, hub.state, **options)
        self.hub = hub
        self.published = published
        self._stopping = asyncio.Event()

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_get("/follow/snapshot", self.follow_snapshot)
        app.router.add_post("/follow/events", self.follow_events)
        app.middlewares.append(self._settle)  # innermost: after the change is applied
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def start(self, host: str, port: int, background: bool = True) -> tuple[str, int]:
        bound = await super().start(host, port, background)
        self.url = self.published  # what browsers reach; the API still answers on `bound`
        return bound

    async def _on_shutdown(self, app) -> None:
        self._stopping.set()

    @web.middleware
    async def _settle(self, request: web.Request, handler):
        before = self.hub.generations.current
        response = await handler(request)
        now = self.hub.generations.current
        if now != before and not request.path.startswith("/follow/"):
            late = await self.hub.generations.settled(now, SETTLE)
            if late:
                log.warning("%s %s: %s had not applied the change after %.0f s", request.method, request.path,
                            ", ".join(late), SETTLE)
                response.headers["X-Lab-Followers-Behind"] = ", ".join(late)
        return response

    async def follow_snapshot(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return web.json_response({"error": "missing or wrong token"}, status=401)
        role = request.query.get("role", "")
        try:
            after = int(request.query.get("after", "-1"))
        except ValueError:
            return web.json_response({"error": "after: expected an integer"}, status=400)
        if not role.isidentifier() or len(role) > 40:
            return web.json_response({"error": "role: expected a short name"}, status=400)
        self.hub.generations.seen(role, after)
        waits = [asyncio.ensure_future(self.hub.generations.newer_than(after, POLL)),
                 asyncio.ensure_future(self._stopping.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        self.hub.generations.seen(role, after)  # still there, still at `after`
        return web.json_response(self.hub.snapshot(after), dumps=lambda d: json.dumps(d, allow_nan=False))

    async def follow_events(self, request: web.Request) -> web.Response:
        # the middleware checked the token (a POST)
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError, RecursionError):
            return web.json_response({"error": "body is not valid JSON"}, status=400)
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            return web.json_response({"error": "expected {\"events\": [...]}"}, status=400)
        return web.json_response({"told": self.hub.told(body["events"])})


def _told(c: CustomHostname) -> dict:
    return {"name": c.name, "zone": c.zone, "status": c.status}


# ---- the followers' side --------------------------------------------------------------

def world_of(base: World, snapshot: dict, hostnames: Hostnames | None = None) -> World:
    """The base world (the file, on the bridge) with the control plane's model, zones added at
    run time and hostnames (those of the snapshot, else the index `hostnames`)."""
    if hostnames is None:
        hostnames = Hostnames(CustomHostname(h["name"], h["zone"], h["status"]) for h in snapshot["hostnames"])
    zones = tuple(Zone.from_dict(z) for z in snapshot.get("zones", ()))
    return base.with_model(snapshot["model"]).with_zones(zones).with_hostnames(hostnames)


class WorldFollower:
    """The world a follower serves, in step with the hub's snapshots: a hostname change is
    one name of its index changed in place (what the edge reads by name); the model, the
    zones or the whole list of hostnames make a new world from the base."""

    def __init__(self, base: World) -> None:
        self.base = base
        self.world: World | None = None
        self._made_of: tuple = ()  # the model and zones self.world was made with

    def apply(self, snapshot: dict) -> bool:
        """Apply `snapshot`; True when that made a new world (to hand to the edge or resolver)."""
        made_of = (snapshot["model"], snapshot.get("zones", []))
        if "changes" in snapshot and self.world is not None:
            index = self.world.hostnames
            for c in snapshot["changes"]:
                if c["status"] == "deleted":
                    index.discard(c["name"])
                else:
                    index.put(CustomHostname(c["name"], c["zone"], c["status"]))
            if made_of == self._made_of:
                return False
            self.world = world_of(self.base, snapshot, index)
        else:
            self.world = world_of(self.base, snapshot)
        self._made_of = made_of
        return True


def edge_follower(base: World, edge) -> Callable[[dict], None]:
    """A Follower's `apply` for an edge (anything with `set_world`)."""
    world = WorldFollower(base)
    return lambda snapshot: world.apply(snapshot) and edge.set_world(world.world)


class DnsFollower:
    """Makes a serving `Resolver` say what the hub's says: world, records, overrides."""

    def __init__(self, base: World, resolver: Resolver) -> None:
        self.world = WorldFollower(base)
        self.resolver = resolver
        self.local: dict[str, str] = {}  # hub override id -> this resolver's id

    def apply(self, snapshot: dict) -> None:
        r = self.resolver
        if self.world.apply(snapshot):  # the resolver reads no hostname: a change of one is nothing here
            r.update_world(self.world.world)
        want: dict[tuple[str, str], tuple[list[str], int]] = {}
        for rec in snapshot["records"]:
            values, _ = want.setdefault((rec["name"], rec["type"]), ([], rec["ttl"]))
            values.append(rec["value"])
        have: dict[tuple[str, str], tuple[list[str], int]] = {}
        for rec in r.records():
            values, _ = have.setdefault((rec["name"], rec["type"]), ([], rec["ttl"]))
            values.append(rec["value"])
        for name, rtype in have.keys() - want.keys():
            r.delete_record(name, rtype)
        for (name, rtype), (values, ttl) in want.items():
            if have.get((name, rtype)) != (values, ttl):
                r.set_record(name, rtype, values, ttl)
        hub_ids = {o["id"]: o for o in snapshot["overrides"]}
        for hub_id in list(self.local):
            if hub_id not in hub_ids:
                r.remove_override(self.local.pop(hub_id))
        for hub_id, o in hub_ids.items():
            if hub_id not in self.local:
                self.local[hub_id] = r.set_override(o["name"], o["type"], o["values"], o["client"], o["expires"], o["ttl"])

    def hub_event(self, event: dict) -> dict:
        """A `dns.answer` names the hub's override id, the one the API and the live page know."""
        if event.get("override"):
            back = {v: k for k, v in self.local.items()}
            event = {**event, "override": back.get(event["override"], event["override"])}
        return event


class Follower:
    """Polls the hub's snapshots and applies each; `ready` is set after the first."""

    def __init__(self, url: str, token: str, role: str, apply: Callable[[dict], None]) -> None:
        self.url, self.token, self.role, self.apply = url, token, role, apply
        self.generation = -1
        self.ready = asyncio.Event()

    async def run(self) -> None:
        delay = 0.2
        timeout = aiohttp.ClientTimeout(total=POLL + 10)
        async with aiohttp.ClientSession(timeout=timeout, headers={"Authorization": f"Bearer {self.token}"}) as s:
            while True:
                try:
                    async with s.get(f"{self.url}/follow/snapshot",
                                     params={"role": self.role, "after": str(self.generation)}) as resp:
                        if resp.status != 200:
                            raise RuntimeError(f"{resp.status} {(await resp.text())[:200]}")
                        snapshot = await resp.json()
                except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError) as e:
                    log.warning("%s: no snapshot from the control plane at %s (%s); again in %.1f s",
                                self.role, self.url, e or type(e).__name__, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    continue
                delay = 0.2
                if snapshot["generation"] != self.generation:
                    try:
                        self.apply(snapshot)
                    except (ValueError, KeyError, TypeError) as e:
                        log.error("%s: could not apply generation %s: %s", self.role, snapshot.get("generation"), e)
                        await asyncio.sleep(1)
                        continue
                    self.generation = snapshot["generation"]
                self.ready.set()


class Pusher:
    """Sends the events of this container to the hub, in batches, with the token.

    Bounded: while the hub is away the newest PUSH_BUFFER events wait, older ones are dropped
    (and counted in the log), so a lost control plane never costs the follower its memory."""

    def __init__(self, events: Events, url: str, token: str, transform: Callable[[dict], dict] = lambda e: e) -> None:
        self.url, self.token, self.transform = url, token, transform
        self.queue: deque[dict] = deque(maxlen=PUSH_BUFFER)
        self.dropped = 0
        self.wake = asyncio.Event()
        self._unsubscribe = events.subscribe(self._add)

    def _add(self, event: dict) -> None:
        if len(self.queue) == self.queue.maxlen:
            self.dropped += 1
        self.queue.append(event)
        self.wake.set()

    def batch(self) -> list[dict]:
        out, size = [], 0
        for e in self.queue:
            size += len(json.dumps(e, allow_nan=False)) + 1
            if out and size > PUSH_BATCH_BYTES:
                break
            out.append(e)
        return out

    async def run(self) -> None:
        delay = 0.2
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10),
                                         headers={"Authorization": f"Bearer {self.token}"}) as s:
            try:
                while True:
                    await self.wake.wait()
                    self.wake.clear()
                    while self.queue:
                        batch = self.batch()
                        try:
                            async with s.post(f"{self.url}/follow/events",
                                              json={"events": [self.transform(e) for e in batch]}) as resp:
                                if 400 <= resp.status < 500:  # will not heal by sending it again
                                    log.error("events: the control plane refused %d: %s %s", len(batch), resp.status,
                                              (await resp.text())[:200])
                                elif resp.status != 200:
                                    raise RuntimeError(f"{resp.status} {(await resp.text())[:200]}")
                        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as e:
                            log.warning("events: the control plane at %s did not take them (%s); again in %.1f s",
                                        self.url, e or type(e).__name__, delay)
                            await asyncio.sleep(delay)
                            delay = min(delay * 2, 5.0)
                            continue
                        delay = 0.2
                        for _ in batch:
                            self.queue.popleft()
                        if self.dropped:
                            log.warning("events: %d dropped while the control plane was away", self.dropped)
                            self.dropped = 0
            finally:
                self._unsubscribe()
