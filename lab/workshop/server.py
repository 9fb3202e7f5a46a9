"""The workshop on the control plane: exercises, progress, checks, and room mode.

Mounted like the live page (`setup(app, control)`). Progress lives in the lab's state
(settings), so a restart keeps it. A check gathers the running lab's own facts (events,
the live page's strips, the collector, hostnames, a catalog run) and `checks.judge`
decides. Starting states are applied through this control plane's own API, as a user's
commands would be. Prediction files live in `<state>/workshop/`, never in the package.

Room mode: the instructor's lab opens a room (a class token); an attendee's lab joins it
and, after every check, sends the instructor's lab the result (exercise id, passed, time)
with the class token as its credential — never the lab's token, a cookie or a hostname's
verification token. The instructor's `/workshop` page shows the scoreboard.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import ssl
import tomllib
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lab.control import ApiError
from lab.live import LIVE_KEY
from lab.remote import every
from lab.results import matches
from lab.scenarios import DEFAULT_DIR as CATALOG_DIR, LabApi, Runner, ScenarioError, discover, parse
from lab.strips import INTERNAL
from lab.workshop import ExerciseError, fill, find, load_all
from lab.workshop import checks, room

PROGRESS = "workshop.progress"
JOINED = "workshop.joined"      # this lab's membership of a room: {url, name, token}
ROOM = "workshop.room"          # the room this lab hosts: {token, attendees}
STATIC = Path(__file__).resolve().parent / "static"
PAGE_FILES = {"board.css": "text/css", "board.js": "text/javascript"}
ROOM_TIMEOUT = 3.0
STRIPS = 1000
_HEADERS = {"Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"}


def setup(app: web.Application, control) -> "Workshop":
    w = Workshop(control, app)
    app.middlewares.insert(0, w.middleware)  # outermost: a room report carries the class token, not the lab's
    r = app.router
    r.add_get("/workshop", w.page)
    r.add_get("/workshop/static/{file}", w.static)
    r.add_get("/workshop/exercises", w.list)
    r.add_get("/workshop/exercises/{ref}", w.detail)
    for action in ("start", "hint", "check", "reset", "solution"):
        r.add_post(f"/workshop/exercises/{{ref}}/{action}", getattr(w, action))
    r.add_get("/workshop/progress", w.progress)
    r.add_get("/workshop/room", w.board)
    r.add_post("/workshop/room", w.open_room)
    r.add_delete("/workshop/room", w.close_room)
    r.add_put("/workshop/joined", w.join)
    r.add_delete("/workshop/joined", w.leave)
    app.on_shutdown.append(w.on_shutdown)
    return w


def class_token() -> str:
    """The token attendees type from the projector: hex, so it never starts with '-'.

    A URL-safe token starts with '-' one time in 64, and `--token -x...` then reads as a
    missing argument to every attendee's shell and argparse.
    """
    return secrets.token_hex(8)


class Workshop:
    def __init__(self, control, app: web.Application) -> None:
        self.control, self.app = control, app
        self.lab, self.state = control.lab, control.state
        self.dir = Path(self.state.directory) / "workshop"
        self._busy = asyncio.Lock()  # one start/check at a time: a catalog run switches the model
        self._http: aiohttp.ClientSession | None = None

    @property
    def exercises(self) -> list:
        """Read each time: an instructor's new or edited exercise shows without a restart.
        A broken folder is a 503 naming the file and key, for every workshop call but the board."""
        try:
            return load_all()
        except ExerciseError as e:
            raise ApiError(503, str(e)) from None

    # ---- plumbing -------------------------------------------------------------------
    def _get(self, key: str, default: Any) -> Any:
        try:
            value = json.loads(self.state.get(key) or "null")
        except ValueError:
            return default
        return value if isinstance(value, type(default)) else default

    def _put(self, key: str, value: Any) -> None:
        self.state.set(key, None if value is None else json.dumps(value))

    def _exercise(self, request: web.Request):
        try:
            return find(self.exercises, request.match_info["ref"])
        except ExerciseError as e:
            raise ApiError(404, str(e)) from None

    def _file(self, ex) -> Path:
        return self.dir / f"{ex.id}.toml"

    def _last_event(self) -> int:
        newest = self.lab.events.newest(1)
        return newest[0]["id"] if newest else 0

    @staticmethod
    def _own_api() -> aiohttp.ClientSession:
        """A session for calls to this control plane's own API (LabApi adds the token)."""
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))

    def _view(self, ex, p: dict | None) -> dict:
        p = p or {}
        return {**ex.summary(), "started": p.get("started"), "passed": bool(p.get("passed")),
                "passed_at": p.get("passed_at"), "tries": p.get("tries", 0), "hints": p.get("hints", 0),
                "solution": bool(p.get("solution")), "last": p.get("last")}

    async def on_shutdown(self, app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            ca = ssl.create_default_context(cafile=str(self.lab.ca.cert_path))
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=ROOM_TIMEOUT),
                                               connector=aiohttp.TCPConnector(ssl=ca))
        return self._http

    # ---- the page -------------------------------------------------------------------
    async def page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "board.html", headers={**_HEADERS, "Content-Type": "text/html; charset=utf-8"})

    async def static(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["file"]
        if name not in PAGE_FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(STATIC / name, headers={**_HEADERS, "Content-Type": f"{PAGE_FILES[name]}; charset=utf-8"})

    # ---- exercises ------------------------------------------------------------------
    async def list(self, request: web.Request) -> web.Response:
        progress = self._get(PROGRESS, {})
        return web.json_response([self._view(e, progress.get(e.id)) for e in self.exercises])

    async def detail(self, request: web.Request) -> web.Response:
        ex = self._exercise(request)
        p = self._get(PROGRESS, {}).get(ex.id) or {}
        ep = self.lab.endpoints
        file = str(self._file(ex).resolve()) if ex.prediction else None
        d = ex.detail()
        d["steps"] = [fill(s, ep, file) for s in d["steps"]]
        d["story"] = fill(d["story"], ep, file)
        return web.json_response({**d, **self._view(ex, p), "file": file,
                                  "hints_shown": [fill(h, ep, file) for h in ex.hints[:p.get("hints", 0)]]})

    async def progress(self, request: web.Request) -> web.Response:
        progress = self._get(PROGRESS, {})
        joined = self._get(JOINED, {})
        hosted = self._get(ROOM, {})
        return web.json_response({
            "exercises": [self._view(e, progress.get(e.id)) for e in self.exercises],
            "joined": {"url": joined["url"], "name": joined["name"], "error": joined.get("error")} if joined else None,
            "hosting": bool(hosted.get("token"))})

    async def start(self, request: web.Request) -> web.Response:
        return await self._start(self._exercise(request), reset=False)

    async def reset(self, request: web.Request) -> web.Response:
        return await self._start(self._exercise(request), reset=True)

    async def _start(self, ex, reset: bool) -> web.Response:
        missing = await self._missing(ex)
        if missing:
            raise ApiError(409, f"exercise {ex.number} needs the control plane's {', '.join(missing)} API, which this "
                                f"lab does not have yet")
        async with self._busy:
            async with self._own_api() as s:
                await self._apply(LabApi(self.lab.endpoints, s), ex.start)
            file = self._file(ex)
            if ex.prediction and (reset or not file.exists()):
                self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                file.write_text((ex.folder / ex.prediction).read_text(encoding="utf-8"), encoding="utf-8")
            progress = self._get(PROGRESS, {})
            before = progress.get(ex.id) or {}
            progress[ex.id] = {"started": self.control.clock(), "since": self._last_event(),
                               "hints": 0 if reset else before.get("hints", 0), "tries": 0 if reset else before.get("tries", 0),
                               "passed": False if reset else bool(before.get("passed")),
                               "passed_at": None if reset else before.get("passed_at"),
                               "solution": False if reset else bool(before.get("solution"))}
            self._put(PROGRESS, progress)
        self.lab.events.emit("workshop.start", exercise=ex.id, reset=reset)
        return web.json_response({**self._view(ex, progress[ex.id]),
                                  "file": str(file.resolve()) if ex.prediction else None})

    async def _missing(self, ex) -> list[str]:
        out = []
        for api in ex.requires:
            path = {"validation": "/validation", "zones": "/zones"}[api]
            if not any(getattr(r, "canonical", None) == path for r in self.app.router.resources()):
                out.append(f"{path} ({api})")
        return out

    async def _apply(self, api: LabApi, start: dict) -> None:
        """The starting state, through this control plane's own API."""
        if "model" in start:
            await api.call("PUT", "/model", {"model": start["model"]})
        if "validation" in start:
            await api.call("PUT", "/validation", {"mode": start["validation"]})
        names = set(start.get("clear_overrides", ()))
        if names:
            for name in {o["name"] for o in await api.call("GET", "/dns/overrides")} & names:
                await api.call("DELETE", f"/dns/overrides/{name}")
        purge = set(start.get("purge_hostnames", ()))
        for h in await every(api.call, "/hostnames") if purge else ():
            if h["name"] in purge:
                await api.call("DELETE", f"/hostnames/{h['id']}?purge=1")
        for r in start.get("delete_records", ()):
            await api.call("DELETE", f"/dns/records?name={r['name']}&type={r['type']}")
        for r in start.get("records", ()):
            await api.call("POST", "/dns/records", {"name": r["name"], "type": r["type"], "value": r["value"]})
        for zone, rules in start.get("rules", {}).items():
            await api.call("PUT", f"/zones/{zone}/rules", {"rules": rules})
        gone = set(start.get("remove_zones", ()))
        if gone:
            for z in await api.call("GET", "/zones"):
                if z.get("name") in gone:
                    await api.call("DELETE", f"/zones/{z['name']}")

    async def hint(self, request: web.Request) -> web.Response:
        ex = self._exercise(request)
        progress = self._get(PROGRESS, {})
        p = progress.setdefault(ex.id, {})
        p["hints"] = min(int(p.get("hints", 0)) + 1, len(ex.hints))
        self._put(PROGRESS, progress)
        ep, file = self.lab.endpoints, str(self._file(ex).resolve()) if ex.prediction else None
        return web.json_response({"exercise": ex.id, "shown": p["hints"], "of": len(ex.hints),
                                  "hints": [fill(h, ep, file) for h in ex.hints[:p["hints"]]]})

    async def solution(self, request: web.Request) -> web.Response:
        ex = self._exercise(request)
        progress = self._get(PROGRESS, {})
        progress.setdefault(ex.id, {})["solution"] = True
        self._put(PROGRESS, progress)
        ep, file = self.lab.endpoints, str(self._file(ex).resolve()) if ex.prediction else None
        steps = [{k: (fill(v, ep, file) if isinstance(v, str) else v) for k, v in s.items()} for s in ex.solution]
        return web.json_response({"exercise": ex.id, "steps": steps, "file": file})

    # ---- checking -------------------------------------------------------------------
    async def check(self, request: web.Request) -> web.Response:
        ex = self._exercise(request)
        p = self._get(PROGRESS, {}).get(ex.id) or {}
        if not p.get("started"):
            raise ApiError(409, f"exercise {ex.number} is not started: `sni-lab workshop start {ex.number}` sets up "
                                f"its starting state first")
        async with self._busy:
            facts = await self._facts(ex, p)
        verdicts = [checks.judge(c, facts) for c in ex.checks]
        passed = all(v.passed for v in verdicts)
        now = self.control.clock()
        progress = self._get(PROGRESS, {})
        q = progress.setdefault(ex.id, p)
        q["tries"] = int(q.get("tries", 0)) + 1
        if passed and not q.get("passed"):
            q["passed"], q["passed_at"] = True, now
        q["last"] = {"time": now, "passed": passed}
        self._put(PROGRESS, progress)
        self.lab.events.emit("workshop.check", exercise=ex.id, passed=passed)
        sent = await self._report(ex.id, passed, now)
        return web.json_response({"exercise": ex.id, "title": ex.title, "passed": passed,
                                  "checks": [v.to_dict() for v in verdicts], "room": sent,
                                  **({"teaches": ex.teaches} if passed else {})})

    async def _facts(self, ex, p: dict) -> checks.Facts:
        kinds = {c["kind"] for c in ex.checks}
        facts = checks.Facts(since=int(p.get("since", 0)), started=float(p.get("started", 0)))
        if "event" in kinds:
            facts.events = [e for e in self.lab.events.since(facts.since) if not e.get("internal")]
        if "request" in kinds:
            live = self.app.get(LIVE_KEY)
            facts.strips = live.fold.strips(STRIPS) if live is not None else []
        if "collector" in kinds:
            facts.collected = await self._collected()
        if "hostname" in kinds:
            facts.hostnames = [h.to_dict() for h in self.state.hostnames()]
        async with self._own_api() as s:
            api = LabApi(self.lab.endpoints, s)
            if "zone" in kinds:
                with contextlib.suppress(ScenarioError, aiohttp.ContentTypeError):
                    facts.zones = await api.call("GET", "/zones")
            runner = Runner(self.lab.endpoints, self.lab.world, self.lab.engine_name, trace_prefix=INTERNAL)
            for c in ex.checks:
                if c["kind"] == "catalog":
                    scenarios = discover(None, CATALOG_DIR, self.lab.world)
                    tags = {s.name: list(s.tags) for s in scenarios}
                    try:
                        results = await runner.run(scenarios, (c["model"],))
                    except ScenarioError as e:  # a setup that cannot be made (a name already registered)
                        facts.catalog_error = str(e)
                        continue
                    facts.catalog = [{"scenario": r.scenario, "tags": tags.get(r.scenario, []), "model": r.model,
                                      "verdict": r.verdict, "passed": r.passed,
                                      "outcome": ", ".join(q.outcome for q in r.requests),
                                      "expected": ", ".join(q.expected for q in r.requests)} for r in results]
                elif c["kind"] == "predictions":
                    facts.predictions = await self._predictions(ex, c, runner)
        return facts

    async def _collected(self) -> list | None:
        collector = next((o for o in self.lab.world.origins if o.kind == "collector"), None)
        if collector is None:
            return None
        try:
            async with self._session().get(collector.url + "/collected",
                                           headers={"X-Lab-Trace": INTERNAL + "workshop"}) as resp:
                data = await resp.json(content_type=None) if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None
        return data if isinstance(data, list) else None

    async def _predictions(self, ex, check: dict, runner: Runner) -> dict:
        """The template's requests with the attendee's [expect], run under the check's models."""
        file = self._file(ex)
        models = tuple(check["models"])
        try:
            mine = tomllib.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {"error": f"{file}: missing; `sni-lab workshop reset {ex.number}` makes it again"}
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            return {"error": f"{file}: not valid TOML: {e}"}
        template = tomllib.loads((ex.folder / ex.prediction).read_text(encoding="utf-8"))
        expect = mine.get("expect") if isinstance(mine.get("expect"), dict) else {}
        missing = [m for m in models if m not in expect]
        if missing:
            return {"error": f"{file}: [expect] has no prediction for {', '.join(missing)}"}
        left = sum(1 for m in models for v in (expect[m] if isinstance(expect[m], list) else [expect[m]]) if v == "?")
        if left:
            # Nothing runs until every prediction is made: no outcome is shown before.
            return {"error": f"{file}: {left} prediction(s) still \"?\": make them all first (nothing was run)"}
        data = {**template, "expect": {**{m: expect[m] for m in models}, "*": expect[models[0]]}}
        try:
            scenario = parse(data, file)
            results = await runner.run([scenario], models)
        except ScenarioError as e:
            return {"error": str(e).replace(str(file) + ": ", f"{file.name}: ")}
        return {"models": {r.model: [(q.expected, matches(q.expected, q.outcome)) for q in r.requests]
                           for r in results}}

    # ---- room mode: the attendee's side ---------------------------------------------
    async def _send(self, joined: dict, exercise: str | None, passed: bool, when: float) -> str | None:
        """None when the instructor's lab took it, else why not (one line)."""
        body = {"name": joined["name"], "exercise": exercise, "passed": passed, "time": when}
        url = joined["url"] + "/workshop/room/report"
        try:
            async with self._session().post(url, json=body, headers={"Authorization": f"Bearer {joined['token']}"},
                                            allow_redirects=False) as resp:
                if resp.status == 200:
                    return None
                try:
                    why = (await resp.json(content_type=None)).get("error")
                except (ValueError, AttributeError):
                    why = None
                return f"the room at {joined['url']} refused it: {resp.status} {why or ''}".strip()
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            return f"the room at {joined['url']} did not answer ({type(e).__name__})"

    async def _report(self, exercise: str, passed: bool, when: float) -> str | None:
        joined = self._get(JOINED, {})
        if not joined:
            return None
        error = await self._send(joined, exercise, passed, when)
        joined["error"] = error
        self._put(JOINED, joined)
        return error or "sent"

    async def join(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.text())
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(body, dict) or set(body) != {"url", "name", "token"}:
            raise ApiError(400, "expected {url, name, token}")
        try:
            joined = {"url": room.check_url(body["url"]), "name": room.check_name(body["name"]),
                      "token": room.check_token(body["token"])}
        except room.RoomError as e:
            raise ApiError(e.status, str(e)) from None
        error = await self._send(joined, None, False, self.control.clock())
        if error:
            raise ApiError(502, error)  # nothing saved: a wrong token or address changes nothing here
        progress = self._get(PROGRESS, {})
        for ex in self.exercises:  # what was checked before joining
            p = progress.get(ex.id) or {}
            if p.get("last"):
                await self._send(joined, ex.id, bool(p.get("passed")), p.get("passed_at") or p["last"]["time"])
        self._put(JOINED, joined)
        return web.json_response({"url": joined["url"], "name": joined["name"]})

    async def leave(self, request: web.Request) -> web.Response:
        self._put(JOINED, None)
        return web.json_response({"left": True})

    # ---- room mode: the instructor's side -------------------------------------------
    async def open_room(self, request: web.Request) -> web.Response:
        hosted = self._get(ROOM, {})
        if not hosted.get("token"):
            hosted = {"token": class_token(), "attendees": {}}
            self._put(ROOM, hosted)
        return web.json_response({"token": hosted["token"], "url": self.control.url,
                                  "attendees": len(hosted.get("attendees", {}))})

    async def close_room(self, request: web.Request) -> web.Response:
        self._put(ROOM, None)
        return web.json_response({"closed": True})

    async def board(self, request: web.Request) -> web.Response:
        hosted = self._get(ROOM, {})
        exercises = [{"id": e.id, "number": e.number, "title": e.title} for e in self.exercises]
        return web.json_response({"open": bool(hosted.get("token")),
                                  **room.scoreboard(hosted.get("attendees", {}), exercises)})

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        if request.path != "/workshop/room/report":
            return await handler(request)
        if request.method != "POST":
            return web.json_response({"error": "POST a report"}, status=405)
        if not self.control._host_allowed(request.headers.get("Host", "")):
            return web.json_response({"error": "Host is not a name of this lab's control plane"}, status=403)
        try:
            return await self._take_report(request)
        except (room.RoomError, ApiError) as e:
            return web.json_response({"error": str(e)}, status=e.status)

    async def _take_report(self, request: web.Request) -> web.Response:
        hosted = self._get(ROOM, {})
        if not hosted.get("token"):
            raise room.RoomError("this lab hosts no room (`sni-lab workshop room` opens one)", 404)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("utf-8", "replace"),
                                                                  hosted["token"].encode()):
            raise room.RoomError("wrong class token", 403)
        raw = await request.content.read(room.MAX_BODY + 1)
        if len(raw) > room.MAX_BODY:
            raise room.RoomError(f"a report is at most {room.MAX_BODY} bytes", 413)
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise room.RoomError("body is not valid JSON") from None
        report = room.parse_report(body, {e.id for e in self.exercises})
        hosted["attendees"] = room.record(hosted.get("attendees", {}), report, self.control.clock())
        self._put(ROOM, hosted)
        self.lab.events.emit("workshop.room", attendee=report["name"], exercise=report["exercise"],
                             passed=report["passed"])
        return web.json_response({"ok": True})
