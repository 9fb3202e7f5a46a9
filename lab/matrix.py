"""`sni-lab run | matrix | explain`: pick a lab (the running one, or a fresh in-process one per
engine), run scenarios through `scenarios.Runner`, print with `report` and `explain`."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lab import report
from lab.explain import explain
from lab.remote import RemoteError, endpoints as read_endpoints
from lab.results import to_json
from lab.run import ENGINES, Lab, run_loop
from lab.scenarios import DEFAULT_DIR, Runner, Scenario, ScenarioError, discover
from lab.target import Target, TargetError, check_answers, from_endpoints, parse_edges
from lab.topology import MODELS, World
from lab.world import load


def parse_list(value: str | None, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    if not value:
        return ()
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad:
        raise ScenarioError(f"unknown {what} {', '.join(bad)} (choose from {', '.join(allowed)})")
    return items


async def running_lab(state: str | Path, timeout: float = 1.0) -> dict | None:
    """The endpoints of the lab running for `state`, if its control plane answers its health check."""
    try:
        ep = read_endpoints(state)
    except RemoteError:
        return None
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(ep["control"]["url"] + "/health") as r:
                return ep if r.status == 200 else None
    except (aiohttp.ClientError, OSError, KeyError, TypeError, TimeoutError):  # TypeError: an odd endpoints file
        return None


class Progress:
    """One live status line on a terminal; silent when stderr is not one."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.done, self.failed = total, 0, 0
        self.enabled = enabled and sys.stderr.isatty()
        self.started = time.perf_counter()

    def __call__(self, result) -> None:
        self.done += 1
        self.failed += not result.passed
        if self.enabled:
            width = 30
            filled = width * self.done // max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                             f"{self.failed} failed  {result.scenario[:30]}[{result.model}]\033[K")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


async def execute(args, scenarios: list[Scenario], models: tuple[str, ...], engines: tuple[str, ...],
                  progress: Progress | None = None, events: list | None = None) -> list:
    """Run against what was asked for: another edge (`--edge`, an edge-only endpoints file), the
    running lab, or else a fresh in-process lab per engine. A target asked for that does not
    answer is a TargetError, never a reason to test something else.
    With `events` given, the edge's and origins' events of every request are appended to it."""
    world = load(args.config)
    if getattr(args, "edge", None):
        for flag in ("model", "engine"):
            if getattr(args, flag, None):
                raise TargetError(f"--{flag} is the lab's own edge's; another edge runs its config (--flavour)", 2)
        target = parse_edges(args.edge, world, flavour=getattr(args, "flavour", None) or "deployed")
        return await against(target, world, args, scenarios, progress, events)
    running = None if args.fresh or len(engines) > 1 else await asked_lab(args)
    flavour = getattr(args, "flavour", None)
    if running is not None and "control" not in running:  # an edge-only endpoints file: the lab serves it
        return await against(from_endpoints(running, world, flavour), world, args, scenarios, progress, events)
    if running is not None and running.get("engine") not in ENGINES:  # `sni-lab edges up`: another edge
        target = from_endpoints(running, world, flavour)
        results = await Runner(running, target.place(world), target=target).run(scenarios, models, progress)
        if events is not None:
            events += await _remote_events(running, results)
        return results
    if flavour:
        raise TargetError("--flavour says what another edge's config claims: give it with --edge", 2)
    if running and (not engines or running.get("engine") in engines):
        results = await Runner(running, world).run(scenarios, models, progress)
        if events is not None:
            events += await _remote_events(running, results)
        return results
    results = []
    for engine in engines or ("native",):
        async with Lab.ephemeral(world, args.certs, engine=engine) as lab:
            runner = Runner({**lab.endpoints, "engine": engine}, lab.world, engine)
            batch = await runner.run(scenarios, models, progress)
            if events is not None:
                events += [e for r in batch for q in r.requests if q.trace for e in _story(lab.events.trace, q.trace)]
            results += batch
    return results


async def asked_lab(args) -> dict | None:
    """The endpoints of the lab `--state` names, None when there is none to ask (no `--state`
    and no endpoints file in .lab/). An endpoints file whose control plane does not answer, or
    a `--state` with no lab in it, is a TargetError: it names something to test."""
    state = args.state or ".lab"
    try:
        ep = read_endpoints(state)
    except RemoteError as e:
        if args.state is None and not (Path(state) / "endpoints.json").exists():
            return None
        raise TargetError(f"{e}; nothing was tested (--fresh runs a lab of its own)") from None
    if not isinstance(ep, dict):
        raise TargetError(f"{Path(state) / 'endpoints.json'}: not an endpoints file; nothing was tested")
    if "control" not in ep:
        return ep
    if await running_lab(state) is None:
        url = ep["control"].get("url") if isinstance(ep["control"], dict) else None
        raise TargetError(f"the lab of {state} does not answer at {url} (stopped, with its endpoints.json left "
                          f"behind?); nothing was tested: start it with `sni-lab up`, or pass --fresh")
    return ep


async def against(target: Target, world: World, args, scenarios: list[Scenario], progress=None,
                  events: list | None = None) -> list:
    """The catalog against another edge, with an in-process lab's resolver, origins and control
    plane around it: the origins where the world file says (that edge's config points there)."""
    await check_answers(target)
    # The CA that edge's certificates come from: the lab's usual certs/ unless told (`--certs`).
    async with target.lab(world, args.certs or "certs") as lab:
        results = await Runner(target.endpoints(lab.endpoints), lab.world, target=target).run(
            scenarios, (target.flavour,), progress)
        if events is not None:
            events += [e for r in results for q in r.requests if q.trace for e in _story(lab.events.trace, q.trace)]
    return results


def _story(by_trace, trace: str) -> list[dict]:
    """A request's events, with the TLS events of its connection (told under the connection's id)."""
    events = by_trace(trace)
    conns = {e["conn"] for e in events if e.get("conn") and e["conn"] != trace}
    tls = [e for c in conns for e in by_trace(c) if e["kind"].startswith("tls.")]
    return sorted(tls + events, key=lambda e: e["id"])


async def _remote_events(ep: dict, results: list) -> list[dict]:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async def fetch(trace: str) -> list[dict]:
            async with s.get(ep["control"]["url"] + "/events", params={"trace": trace}) as resp:
                return await resp.json()

        cache = {}
        for r in results:
            for q in r.requests:
                if q.trace:
                    cache[q.trace] = await fetch(q.trace)
                    for conn in {e.get("conn") for e in cache[q.trace]} - {None, q.trace}:
                        cache[conn] = await fetch(conn)
    return [e for r in results for q in r.requests if q.trace for e in _story(lambda t: cache.get(t, []), q.trace)]


def _select(args, world: World) -> list[Scenario]:
    directory = Path(args.scenarios) if args.scenarios else DEFAULT_DIR
    scenarios = discover(getattr(args, "names", None), directory, world)
    tags = set(getattr(args, "tag", None) or ())
    if tags:
        scenarios = [s for s in scenarios if tags & set(s.tags)]
    if not scenarios:
        raise ScenarioError(f"no scenarios selected in {directory}")
    return scenarios


def run_command(args) -> int:
    world = load(args.config)
    scenarios = _select(args, world)
    models = parse_list(args.model, MODELS, "model") or MODELS
    engines = parse_list(args.engine, ENGINES, "engine")
    progress = Progress(len(scenarios) * len(models) * max(len(engines), 1), not args.json)
    started = time.perf_counter()
    try:
        results = run_loop(execute(args, scenarios, models, engines, progress))
    finally:
        progress.close()
    wall = time.perf_counter() - started
    if args.junit:
        Path(args.junit).write_text(report.junit(results))
    if args.markdown:
        Path(args.markdown).write_text(report.markdown(results))
    if args.json:
        data = json.loads(to_json(results))
        data["summary"]["wall_s"] = round(wall, 2)
        print(json.dumps(data, indent=2))
    else:
        print(report.table(results, color=sys.stdout.isatty(), engines=list(engines) or None))
        print(f"{len(results)} cases in {wall:.1f} s")
    return 0 if all(r.passed for r in results) else 1


def explain_command(args) -> int:
    world = load(args.config)
    directory = Path(args.scenarios) if args.scenarios else DEFAULT_DIR
    (scenario,) = discover([args.name], directory, world)
    model = parse_list(args.model, MODELS, "model") or (world.model,)
    if len(model) != 1:
        raise ScenarioError("explain tells one case: give one --model")
    engines = parse_list(args.engine, ENGINES, "engine")

    events: list[dict] = []
    (result,) = run_loop(execute(args, [scenario], model, engines[:1], events=events))
    if args.json:
        print(json.dumps({"case": json.loads(to_json([result]))["cases"][0], "events": events,
                          "story": scenario.story, "lesson": scenario.lesson}, indent=2))
    else:
        print(explain(result, scenario.story, scenario.lesson, events or None, color=sys.stdout.isatty()))
    return 0 if result.passed else 1
