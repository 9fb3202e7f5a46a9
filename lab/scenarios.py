"""Scenario files: load them, run each under models against a lab, judge with the oracle.

Setup goes through the control plane's API (real hostname verification, real DNS
admin), so a scenario runs the same against an in-process lab or a running `sni-lab up`.

`[setup] validation = "single"` turns a control off for the scenario (the validation mode
is undone after it): its cases say so (`controls_off`), and only for them is a protected
model allowed to be MISROUTED. `[[setup.zone]]` puts a zone on the edge for each case, under
that case's model, since whether a zone is accepted depends on the model (`v1-closed`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import aiohttp

from lab import oracle
from lab.client import Outcome, probe
from lab.dns import query
from lab.remote import every
from lab.results import NOT_APPLICABLE, CaseResult, RequestResult, matches, parse_decision
from lab.target import Target, needs_control_plane
from lab.topology import HOSTNAME_STATUSES, MODELS, PROTECTED, VALIDATION_MODES, CustomHostname, World, Zone

_HERE = Path(__file__).resolve().parent
# A checkout keeps the catalog at its top; a wheel carries the same files as lab/catalog
# (pyproject's package-dir), so an installed lab runs it too.
DEFAULT_DIR = _HERE / "catalog" if (_HERE / "catalog").is_dir() else _HERE.parent / "scenarios"
_REQUEST_KEYS = {"resolve", "listener", "address", "client", "sni", "host", "path", "method", "headers", "http2",
                 "raw", "also"}
_TOP_KEYS = {"title", "story", "lesson", "tags", "setup", "request", "expect"}
_SETUP_KEYS = {"override", "record", "hostname", "zone", "validation"}


class ScenarioError(ValueError):
    """A broken scenario file: one line naming the file and the key."""


@dataclass(frozen=True)
class Request:
    resolve: str | None = None
    listener: str | None = None
    address: str | None = None
    client: str | None = None
    sni: str | None = None  # None: the resolved name; "": no SNI
    host: str | None = None  # None: the SNI; "": no host
    path: str = "/"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    http2: bool = False
    raw: str | None = None
    also: tuple[dict, ...] = ()


@dataclass(frozen=True)
class Scenario:
    name: str
    path: Path
    title: str
    story: str
    lesson: str
    tags: tuple[str, ...]
    overrides: tuple[dict, ...]
    records: tuple[dict, ...]
    hostnames: tuple[dict, ...]
    requests: tuple[Request, ...]
    expect: dict[str, tuple[str, ...]]  # model -> one expectation per request on the connection
    validation: str | None = None  # the validation mode its setup asks for (None: leave it)
    zones: tuple[dict, ...] = ()  # POST /zones bodies, applied per case

    @property
    def controls_off(self) -> tuple[str, ...]:
        """The controls this scenario turns off (a default changed by its setup)."""
        if self.validation is not None and self.validation != VALIDATION_MODES[0]:
            return (f"validation={self.validation}",)
        return ()


# ---- loading ------------------------------------------------------------------------
def load(path: str | Path, world: World | None = None, root: Path | None = None) -> Scenario:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    return parse(data, path, world, root)


def parse(data: dict, path: Path, world: World | None = None, root: Path | None = None) -> Scenario:
    """A scenario from its file's TOML data; `path` names it in errors."""
    fail = lambda key, msg: ScenarioError(f"{path}: {key}: {msg}")
    unknown = set(data) - _TOP_KEYS
    if unknown:
        raise fail(sorted(unknown)[0], f"unknown key (expected one of {', '.join(sorted(_TOP_KEYS))})")
    for key in ("title", "story", "lesson"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise fail(key, "missing (a non-empty string)")
    setup = data.get("setup", {})
    unknown = set(setup) - _SETUP_KEYS
    if unknown:
        raise fail(f"setup.{sorted(unknown)[0]}", f"unknown key (expected one of {', '.join(sorted(_SETUP_KEYS))})")
    overrides, records, hostnames, zones = (tuple(setup.get(k, ())) for k in ("override", "record", "hostname", "zone"))
    validation = setup.get("validation")
    if validation is not None and validation not in VALIDATION_MODES:
        raise fail("setup.validation", f"unknown mode {validation!r} (choose from {', '.join(VALIDATION_MODES)})")
    for i, h in enumerate(hostnames):
        if h.get("status", "active") not in HOSTNAME_STATUSES:
            raise fail(f"setup.hostname[{i}].status", f"unknown status {h.get('status')!r}")
        if "name" not in h:
            raise fail(f"setup.hostname[{i}].name", "missing")
        if h.get("proof", "real") not in ("real", "poisoned"):
            raise fail(f"setup.hostname[{i}].proof", "expected \"real\" or \"poisoned\"")
    for i, z in enumerate(zones):
        for key in ("name", "origin"):
            if key not in z:
                raise fail(f"setup.zone[{i}].{key}", "missing")
    for kind, items in (("override", overrides), ("record", records)):
        for i, item in enumerate(items):
            for key in ("name", "value") + (("type",) if kind == "record" else ()):
                if key not in item:
                    raise fail(f"setup.{kind}[{i}].{key}", "missing")
            _check_refs(item, f"setup.{kind}[{i}]", fail, world)
    raw_requests = data.get("request")
    if not isinstance(raw_requests, list) or not raw_requests:
        raise fail("request", "missing (at least one [[request]])")
    requests = tuple(_request(r, f"request[{i}]", fail, world) for i, r in enumerate(raw_requests))
    per_conn = [1 + len(r.also) for r in requests]
    expect_raw = data.get("expect")
    if not isinstance(expect_raw, dict) or not expect_raw:
        raise fail("expect", "missing (an expectation per model)")
    expect = {}
    for model in MODELS:
        value = expect_raw.get(model, expect_raw.get("*"))
        if value is None:
            raise fail("expect", f"no expectation for model {model} (name it, or give \"*\")")
        values = tuple(value) if isinstance(value, list) else (value,)
        total = sum(per_conn)
        if len(values) != total:
            raise fail(f"expect.{model}", f"{len(values)} expectation(s) for {total} request(s)")
        for v in values:
            if v == "?":
                # A prediction still to make: running it would show the outcome before it is made.
                raise fail(f"expect.{model}", "a prediction is still \"?\": replace each with what you expect, "
                                              "then run it")
            if not isinstance(v, str) or not re.fullmatch(r"[a-z0-9_-]+(:[a-z0-9_-]+){0,2}", v):
                raise fail(f"expect.{model}", f"bad expectation {v!r} (an origin, refused[:STATUS[:CODE]], tls[:ALERT])")
        expect[model] = values
    for key in set(expect_raw) - set(MODELS) - {"*"}:
        raise fail(f"expect.{key}", f"unknown model (choose from {', '.join(MODELS)})")
    name = str(path.relative_to(root)) if root and path.is_relative_to(root) else path.name
    _check_refs([data["story"], data["lesson"]], "story", fail, world)
    told = (lambda text: expand(text.strip(), world)) if world is not None else str.strip
    return Scenario(name=name.removesuffix(".toml"), path=path, title=data["title"], story=told(data["story"]),
                    lesson=told(data["lesson"]), tags=tuple(data.get("tags", ())), overrides=overrides,
                    records=records, hostnames=hostnames, requests=requests, expect=expect, validation=validation,
                    zones=zones)


# A world-relative form: `{listener:anycast}` in any request string stands for that actor's
# address, so a scenario that needs an address (an IP-literal Host) still fits any world.
_ACTOR = re.compile(r"\{((?:listener|origin|client):[A-Za-z0-9_.-]+)\}")
_REF = re.compile(r"(?:listener|origin|client):[A-Za-z0-9_.-]+")


def expand(text: str, world: World) -> str:
    """`text` with every `{kind:NAME}` replaced by that actor's address in `world`."""
    return _ACTOR.sub(lambda m: world.address_of(m.group(1)), text)


def _refs(value: Any) -> list[str]:
    """The actor references a scenario value holds: bare (`client:victim`) or templated."""
    if isinstance(value, str):
        return [value] if _REF.fullmatch(value) else _ACTOR.findall(value)
    if isinstance(value, dict):
        return [ref for v in value.values() for ref in _refs(v)]
    if isinstance(value, list):
        return [ref for v in value for ref in _refs(v)]
    return []


def _check_refs(value: Any, key: str, fail, world: World | None) -> None:
    for ref in _refs(value):
        if world is not None and not world.knows(ref):
            kind = ref.partition(":")[0]
            known = {"listener": world.listener_by_name, "origin": world.origin_by_name,
                     "client": world.client_by_name}[kind]
            raise fail(key, f"unknown {kind} {ref.partition(':')[2]!r} (the world has {', '.join(known) or 'none'})")


def _request(r: Any, key: str, fail, world: World | None) -> Request:
    if not isinstance(r, dict):
        raise fail(key, "expected a table")
    unknown = set(r) - _REQUEST_KEYS
    if unknown:
        raise fail(f"{key}.{sorted(unknown)[0]}", "unknown key")
    targets = [k for k in ("resolve", "listener", "address") if k in r]
    if len(targets) != 1:
        raise fail(key, "give exactly one of resolve, listener, address")
    if world is not None and "listener" in r and r["listener"] not in world.listener_by_name:
        raise fail(f"{key}.listener", f"unknown listener {r['listener']!r}")
    for field_ in sorted(r):
        _check_refs(r[field_], f"{key}.{field_}", fail, world)
    headers = r.get("headers", [])
    if not all(isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in headers):
        raise fail(f"{key}.headers", "expected a list of [name, value] pairs")
    also = r.get("also", [])
    if not isinstance(also, list) or not all(isinstance(a, dict) for a in also):
        raise fail(f"{key}.also", "expected a list of tables")
    return Request(resolve=r.get("resolve"), listener=r.get("listener"), address=r.get("address"),
                   client=r.get("client"), sni=r.get("sni"), host=r.get("host"), path=r.get("path", "/"),
                   method=r.get("method", "GET"), headers=tuple(tuple(h) for h in headers),
                   http2=bool(r.get("http2", False)), raw=r.get("raw"), also=tuple(also))


def discover(names: list[str] | None = None, directory: Path | None = None, world: World | None = None) -> list[Scenario]:
    """Every scenario of `directory` (not workshop/), or the named ones (a name, a path, or a directory)."""
    directory = directory or DEFAULT_DIR
    if not names:
        return [load(p, world, directory) for p in sorted(directory.glob("*.toml"))]
    out = []
    for name in names:
        candidates = [Path(name), directory / name, directory / f"{name}.toml"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None and Path(name).is_dir():
            out += [load(p, world, Path(name)) for p in sorted(Path(name).glob("*.toml"))]
            continue
        if path is None:
            known = ", ".join(p.stem for p in sorted(directory.glob("*.toml"))[:8])
            raise ScenarioError(f"{name}: no such scenario (in {directory}: {known}, ...)")
        out.append(load(path, world, directory))
    return out


# ---- running ------------------------------------------------------------------------
class LabApi:
    """The control plane of a running lab, as the runner needs it."""

    def __init__(self, endpoints: dict, session: aiohttp.ClientSession) -> None:
        self.ep = endpoints
        self.url = endpoints["control"]["url"]
        self.session = session
        self.headers = {"Authorization": f"Bearer {endpoints['control']['token']}"}

    async def call(self, method: str, path: str, body: Any = None) -> Any:
        async with self.session.request(method, self.url + path, json=body, headers=self.headers) as resp:
            data = await resp.json()
            if resp.status >= 400:
                code = f"{data['code']}: " if data.get("code") else ""
                raise ScenarioError(f"control plane: {method} {path}: {resp.status} {code}{data.get('error')}")
            return data


class _NotApplicable(Exception):
    """A case this edge cannot run (it lacks a listener the scenario connects to)."""


class Runner:
    def __init__(self, endpoints: dict, world: World, engine: str | None = None, trace_prefix: str = "",
                 target: Target | None = None) -> None:
        """`world` is the running lab's (ports included); hostnames are read live from the API.
        `trace_prefix` starts every trace (`strips.INTERNAL`: the lab's own run, kept off the live page).
        `target`: another edge, at the listeners of `endpoints["edge"]`; its cases run once, under its
        flavour, and are judged verdict first (`_judge_edge`)."""
        self.trace_prefix = trace_prefix
        self.ep = endpoints
        self.world = world
        self.target = target
        self.engine = target.name if target else (engine or endpoints.get("engine", "native"))
        self.edge_by_addr = {l["host"]: l for l in endpoints["edge"]}
        self.edge_by_name = {l["name"]: l for l in endpoints["edge"]}
        self.api: LabApi | None = None  # the running scenario's: reads the resolver's event of each lookup

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[LabApi]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            api = LabApi(self.ep, s)
            # Another edge has no model of the lab's to set or put back.
            before = (await api.call("GET", "/model"))["model"] if self.target is None else None
            validation = (await api.call("GET", "/validation"))["mode"]
            try:
                # Every case runs with the controls at their defaults, whatever the lab was left
                # in; a scenario that turns one off says so in its file.
                if validation != VALIDATION_MODES[0]:
                    await api.call("PUT", "/validation", {"mode": VALIDATION_MODES[0]})
                yield api
            finally:
                if before is not None:
                    await api.call("PUT", "/model", {"model": before})
                await api.call("PUT", "/validation", {"mode": validation})

    async def run(self, scenarios: list[Scenario], models: tuple[str, ...] = MODELS,
                  progress: Callable[[CaseResult], None] | None = None) -> list[CaseResult]:
        if self.target is not None:
            models = (self.target.flavour,)
        results = []
        async with self.session() as api:
            for sc in scenarios:
                for result in await self.run_scenario(api, sc, models):
                    results.append(result)
                    if progress:
                        progress(result)
        return results

    async def run_scenario(self, api: LabApi, sc: Scenario, models: tuple[str, ...]) -> list[CaseResult]:
        undo: list[tuple[str, str]] = []
        self.api = api
        if self.target is not None:
            reason = needs_control_plane(sc)
            if reason:
                return [self._not_applicable(sc, self.target.flavour, reason)]
        try:
            await self._setup(api, sc, undo)
            out = []
            for model in models:
                if self.target is None:
                    await api.call("PUT", "/model", {"model": model})
                gone: list[tuple[str, str]] = []
                try:
                    notes = await self._zones(api, sc, gone)
                    out.append(await self.run_case(sc, model, await self._world(api), notes))
                finally:
                    await self._undo(api, gone)
            return out
        finally:
            await self._undo(api, undo)

    async def _undo(self, api: LabApi, undo: list[tuple[str, str]]) -> None:
        for method, path, *body in reversed(undo):
            with contextlib.suppress(ScenarioError, aiohttp.ClientError):
                await api.call(method, path, *body)

    async def _world(self, api: LabApi) -> World:
        """The running lab's world as the oracle judges it: zones added at run time, live hostnames."""
        zones = tuple(Zone.from_dict(z) for z in await api.call("GET", "/zones") if z["added"])
        hostnames = await every(api.call, "/hostnames?status=pending,active,moved,blocked")
        return self.world.with_zones(zones).with_hostnames(tuple(
            CustomHostname(h["name"], h["zone"], h["status"], h.get("poisoned_by"))
            for h in hostnames if h["status"] != "deleted"))

    async def _zones(self, api: LabApi, sc: Scenario, undo: list) -> list[str]:
        """Put the scenario's zones on the edge under the current model; a refusal is told, not fatal."""
        notes = []
        for z in sc.zones:
            try:
                made = await api.call("POST", "/zones", dict(z))
            except ScenarioError as e:
                notes.append(f"zone {z['name']} refused: {str(e).split(': ', 2)[-1]}")
                continue
            undo.append(("DELETE", f"/zones/{made['name']}"))
            notes.append(f"zone {made['name']} added" + (f" on v1 listener {made['v1_listener']}"
                                                         if made["v1_listener"] else ""))
        return notes

    async def _setup(self, api: LabApi, sc: Scenario, undo: list) -> None:
        if sc.validation is not None:
            before = (await api.call("GET", "/validation"))["mode"]
            await api.call("PUT", "/validation", {"mode": sc.validation})
            undo.append(("PUT", "/validation", {"mode": before}))
        for r in sc.records:
            await self._record(api, r["name"], r["type"], r["value"], undo, r.get("ttl"))
        for h in sc.hostnames:
            await self._hostname(api, h, undo)
        for o in sc.overrides:
            value = self.world.address_of(o["value"]) if o.get("type", "A") in ("A", "AAAA") else o["value"]
            body = {"name": o["name"], "type": o.get("type", "A"), "value": value, "ttl": o.get("ttl", 1)}
            if "client" in o:
                body["client"] = self.world.address_of(o["client"])
            made = await api.call("POST", "/dns/overrides", body)
            undo.append(("DELETE", f"/dns/overrides/{made['id']}"))

    async def _hostname(self, api: LabApi, h: dict, undo: list) -> None:
        """Bring a custom hostname to a status the real way: register, prove, point, verify."""
        zone = h.get("zone", next(z.name for z in self.world.zones if z.saas))
        status = h.get("status", "active")
        made = await api.call("POST", "/hostnames", {"hostname": h["name"], "zone": zone})
        # Undo means gone: purged, not left behind in `hostnames list` as a deleted row.
        undo.append(("DELETE", f"/hostnames/{made['id']}?purge=1"))
        if (made["status"] == "blocked") != (status == "blocked"):
            raise ScenarioError(f"setup: {h['name']} was registered {made['status']}, not {status}: {made['reason']}")
        if status == "deleted":
            await api.call("DELETE", f"/hostnames/{made['id']}")
            return
        if h.get("proof") == "poisoned":
            return await self._forge(api, made, status, undo)
        if status in ("pending", "blocked"):
            return
        target = self.world.zone_by_name[zone].cname_target
        for rtype, name, value in (("TXT", made["txt_name"], made["txt_token"]), ("CNAME", made["name"], target)):
            await self._record(api, name, rtype, value, undo, first=True)
        verified = await api.call("POST", f"/hostnames/{made['id']}/verify")
        if verified["status"] != "active":
            raise ScenarioError(f"setup: {h['name']} did not become active: {verified['reason']}")
        if status == "moved":
            await api.call("POST", "/dns/records", {"name": made["name"], "type": "CNAME", "value": f"elsewhere.{zone}"})
            verified = await api.call("POST", f"/hostnames/{made['id']}/verify")
            if verified["status"] != "moved":
                raise ScenarioError(f"setup: {h['name']} did not become moved: {verified['reason']}")

    async def _record(self, api: LabApi, name: str, rtype: str, value, undo: list, ttl: int | None = None,
                      first: bool = False) -> None:
        """Set a record; its undo deletes it and puts back what it replaced (a CNAME replaces a
        name's A record: the victim's own www must come back after the scenario)."""
        before = [r for r in await api.call("GET", "/dns/records") if r["name"] == name]
        await api.call("POST", "/dns/records", {"name": name, "type": rtype, "value": value,
                                                **({"ttl": ttl} if ttl is not None else {})})
        steps = [("DELETE", f"/dns/records?name={name}&type={rtype}")]
        for t in dict.fromkeys(r["type"] for r in before):
            rrs = [r for r in before if r["type"] == t]
            steps.append(("POST", "/dns/records", {"name": name, "type": t, "value": [r["value"] for r in rrs],
                                                   "ttl": rrs[0]["ttl"]}))
        # Undo runs last to first, so the delete comes before the restores. `first`: undone after
        # everything else (a hostname's records outlive its purge).
        if first:
            for step in steps:
                undo.insert(0, step)
        else:
            undo.extend(reversed(steps))

    async def _forge(self, api: LabApi, made: dict, status: str, undo: list) -> None:
        """The attacker proves a name it does not own: targeted overrides, for the addresses it
        knows the validator asks from (the control plane's, and one vantage point), answer the
        ownership TXT with its token and point the name at the SaaS target. Then "verify now";
        the hostname must end `status` (active when validation is single, pending when multi)."""
        target = self.world.zone_by_name[made["zone"]].cname_target
        name = made["name"].removeprefix("*.")
        for client in (self.world.control.host, self.world.vantages[0]):
            for rtype, owner, value in (("TXT", made["txt_name"], made["txt_token"]), ("CNAME", name, target)):
                o = await api.call("POST", "/dns/overrides", {"name": owner, "type": rtype, "value": value,
                                                              "client": client, "ttl": 1})
                undo.insert(0, ("DELETE", f"/dns/overrides/{o['id']}"))
        verified = await api.call("POST", f"/hostnames/{made['id']}/verify")
        if verified["status"] != status:
            raise ScenarioError(f"setup: {made['name']} is {verified['status']}, not {status}, after the forged "
                                f"proof: {verified.get('last_error') or verified['reason']}")

    def _not_applicable(self, sc: Scenario, model: str, reason: str) -> CaseResult:
        return CaseResult(scenario=sc.name, title=sc.title, model=model, engine=self.engine,
                          verdict=NOT_APPLICABLE, passed=True, failure=None, ms=0.0,
                          controls_off=list(sc.controls_off), not_applicable=reason)

    async def run_case(self, sc: Scenario, model: str, world: World, setup: list[str] = ()) -> CaseResult:
        if self.target is None:
            world = world.with_model(model)
        started = time.perf_counter()
        results: list[RequestResult] = []
        reference = self.target.reference if self.target else model
        expectations = iter(sc.expect[reference])
        honest = legitimate(sc)
        for i, req in enumerate(sc.requests):
            trace = f"{self.trace_prefix}{re.sub(r'[^0-9a-zA-Z_-]', '-', sc.name)[:40]}-{model}-{i}-{os.urandom(3).hex()}"
            try:
                results += await self._request(req, world, trace, expectations)
            except _NotApplicable as e:
                return self._not_applicable(sc, model, str(e))
        for r, origin in zip(results, honest):
            r.legitimate = origin is not None
        verdict = oracle.worst(r.verdict for r in results)
        if self.target is not None:
            failures = self._judge_edge(results, honest)
        else:
            failures = [f"request {i + 1}: expected {r.expected}, got {r.outcome}" for i, r in enumerate(results)
                        if not matches(r.expected, r.outcome)]
            if model in PROTECTED and not sc.controls_off:  # a control turned off may let it through: that is the lesson
                failures += [f"MISROUTED under protected model {model}: {r.why}" for r in results
                             if r.verdict == oracle.MISROUTED]
        return CaseResult(scenario=sc.name, title=sc.title, model=model, engine=self.engine, verdict=verdict,
                          passed=not failures, failure="; ".join(failures) or None,
                          ms=round((time.perf_counter() - started) * 1000, 1), requests=results,
                          controls_off=list(sc.controls_off), setup=list(setup))

    def _expand(self, req: Request) -> Request:
        """The request with its actor references made addresses of the running world."""
        w = self.world
        at = lambda v: expand(w.address_of(v), w) if isinstance(v, str) else v
        return dataclasses.replace(
            req, address=at(req.address), client=at(req.client), sni=at(req.sni), host=at(req.host), path=at(req.path),
            headers=tuple((k, at(v)) for k, v in req.headers), raw=at(req.raw),
            also=tuple({k: (at(v) if k != "headers" else [[hk, at(hv)] for hk, hv in v]) for k, v in a.items()}
                       for a in req.also))

    def _judge_edge(self, results: list[RequestResult], wanted: list[str | None]) -> list[str]:
        """Verdict first, for an edge that is not the lab's: a case fails when a protected flavour
        is MISROUTED, or when a legitimate request does not reach its origin (over-blocking). How
        it refuses (its status, its alert) is told against the lab's reference model in the
        report, never a failure: the lab's own refusal codes are not another edge's."""
        failures = []
        for i, (r, want) in enumerate(zip(results, wanted)):
            if r.verdict == oracle.MISROUTED and self.target.protected:
                failures.append(f"request {i + 1}: MISROUTED under {self.target.flavour}: {r.why}")
            elif want is not None and r.outcome != want:
                failures.append(f"request {i + 1}: legitimate request for {r.name} got {r.outcome}, not origin {want}"
                                + (" (over-blocking)" if r.origin is None else ""))
        return failures

    async def _request(self, req: Request, world: World, trace: str, expectations) -> list[RequestResult]:
        req = self._expand(req)
        dns_text = None
        if req.resolve:
            address, dns_text = await self._resolve(req.resolve, req.client, trace)
        elif req.listener:
            on_edge = self.edge_by_name.get(req.listener)
            address = on_edge["host"] if on_edge else self.world.listener_by_name[req.listener].host
        else:
            address = req.address
        sni = req.sni if req.sni is not None else (req.resolve or None)
        sni = sni or None
        # "" in a scenario means "send no host at all"
        first = {"host": (req.host if req.host is not None else sni) or None, "path": req.path, "method": req.method,
                 "headers": [*req.headers, ("X-Lab-Trace", trace)]}
        if req.raw is not None:
            first = {"raw": req.raw.replace("{trace}", trace).encode("latin-1"), "host": _raw_host(req.raw)}
        more = [{"host": a.get("host", sni) or None, "path": a.get("path", "/"), "method": a.get("method", "GET"),
                 "headers": [*map(tuple, a.get("headers", [])), ("X-Lab-Trace", f"{trace}-{j + 1}")]}
                for j, a in enumerate(req.also)]
        wanted = [first, *more]
        listener = self.edge_by_addr.get(address) if address else None
        if listener is None and self.target is not None:
            gone = next((l.name for l in self.world.listeners if l.name in self.target.missing
                         and (l.host == address or l.name == req.listener)), None)
            if gone:
                raise _NotApplicable(f"connects to listener {gone}, which {self.target.name} does not have "
                                     f"(give --edge {gone}=HOST:PORT)")
        if listener is None:
            outcome = Outcome(address or "", 0, sni, error=f"{address or 'nothing'} is not an edge address")
        else:
            outcome = await probe(address, listener["port"], sni, wanted, self.ep["ca"], http2=req.http2,
                                  local_addr=req.client)
        out = []
        for j, w in enumerate(wanted):
            host = (w.get("host") or None) if req.raw is None or j else _raw_host(req.raw)
            target = _raw_target(req.raw) if req.raw is not None and not j else w.get("path")
            out.append(self._judge(world, outcome, j, sni, host or None, address, listener, dns_text,
                                   next(expectations, "?"), trace if j == 0 else f"{trace}-{j}",
                                   target if oracle.authority_of(target) else None))
        return out

    async def _resolve(self, name: str, client: str | None, trace: str) -> tuple[str | None, str]:
        dns = self.ep["dns"]
        try:
            reply = await query(name, "A", dns["host"], dns["port"], source=client, trace=trace)
        except (OSError, TimeoutError, ValueError) as e:
            return None, f"{name}: no answer ({e})"
        addrs = [str(rr.rdata) for rr in reply.rr if rr.rtype == 1]
        chain = [str(rr.rdata).rstrip(".") for rr in reply.rr if rr.rtype == 5]
        text = f"{name} " + " ".join([f"CNAME {c}" for c in chain] + [f"A {a}" for a in addrs] or ["no address"])
        # Poisoned, and by which override: the resolver's event of this very lookup says (a
        # truncated UDP answer asked again over TCP makes two; the last is the one used).
        told = await self.api.call("GET", f"/events?kind=dns.answer&trace={trace}") if self.api else []
        hit = told[-1].get("override") if told and told[-1].get("poisoned") else None
        text += f" (poisoned by override {hit})" if hit else ""
        return (addrs[0] if addrs else None), text + (f" (asked from {client})" if client else "")

    def _judge(self, world, outcome: Outcome, j: int, sni, host, address, listener, dns_text, expected, trace,
               target: str | None = None) -> RequestResult:
        name = oracle.name_asked(sni, host, target)
        tls_failed = bool(outcome.tls_error)
        resp = outcome.responses[j] if j < len(outcome.responses) else None
        origin = resp.origin if resp else None
        verdict, why = oracle.judge(world, name, reached_origin=origin, cert_valid=outcome.cert_valid_for(name),
                                    tls_failed=tls_failed)
        if tls_failed:
            short = outcome.tls_error.lower()
            short = "unrecognized_name" if "unrecognized_name" in short else re.sub(r"[^a-z0-9_-]+", "-", short)[:40]
            text = f"tls:{short}"
        elif resp is None:
            text = f"error:{re.sub(r'[^a-z0-9_-]+', '-', (outcome.error or 'no response').lower())[:40]}"
            why = outcome.error or "no response"
        elif origin:
            text = origin
        else:
            told = parse_decision(resp.decision)
            text = f"refused:{told.status}:{told.code}" if told and told.code else f"refused:{resp.status}"
        return RequestResult(sni=sni, host=host, address=address or "", port=listener["port"] if listener else 0,
                             dns=dns_text, cert_names=outcome.cert_names, cert_valid=outcome.cert_valid_for(name),
                             tls_error=outcome.tls_error, status=resp.status if resp else None, origin=origin,
                             decision=resp.decision if resp else None, verdict=verdict, why=why, outcome=text,
                             expected=expected, trace=trace, target=target,
                             listener=listener.get("name") if listener else None)


def legitimate(sc: Scenario) -> list[str | None]:
    """Per request of a scenario: the origin every lab model sends it to, when they all agree
    (an honest request: refusing it is over-blocking), else None."""
    per_request = zip(*(sc.expect[m] for m in MODELS))
    out = []
    for values in per_request:
        same = set(values)
        value = same.pop() if len(same) == 1 else None
        out.append(value if value and ":" not in value and value not in ("refused", "tls") else None)
    return out


def _raw_target(raw: str) -> str | None:
    """The request target of the request line of raw HTTP/1.x bytes."""
    parts = raw.split("\r\n", 1)[0].split(" ")
    return parts[1] if len(parts) >= 3 else None


def _raw_host(raw: str) -> str | None:
    m = re.search(r"(?im)^host:[ \t]*([^\r\n]*)", raw)
    return m.group(1).strip() if m else None
