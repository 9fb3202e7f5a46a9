"""`sni-lab edges matrix`: the catalog on every real edge (nginx, Caddy, HAProxy, mitmproxy)
under each flavour, next to the lab's own edge under `v1` and `v2`, in one report.

One lab (resolver, origins, control plane; no edge of its own) serves every edge in turn: each
is configured from the world (`lab.edges`), started on the world's listener addresses, run
through the catalog with the same oracle (`Runner` with a `Target`), and stopped. An edge that
is not installed is skipped with the reason, never silently.
"""
from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from lab import edgereport
from lab.binding import free_port
from lab.edges import EDGES, FLAVOURS
from lab.edges.process import EdgeError, available, prepare, running, version
from lab.matrix import Progress, _select, parse_list
from lab.results import to_json
from lab.run import Lab, run_loop
from lab.scenarios import Runner, Scenario
from lab.target import target_of
from lab.world import load

REFERENCE = ("v1", "v2")  # the lab's own edge under the models the flavours are compared with


async def edges_matrix(world, edges: tuple[str, ...], flavours: tuple[str, ...], scenarios: list[Scenario],
                       certs: str | Path | None, progress=None):
    """(results, configs {(edge, flavour): {version, lines}}, skipped {edge: reason})."""
    results, configs, skipped = [], {}, {}
    async with Lab.ephemeral(world, certs) as lab:  # the reference: the lab's own edge
        results += await Runner({**lab.endpoints, "engine": edgereport.LAB}, lab.world, edgereport.LAB).run(
            scenarios, REFERENCE, progress)
    async with Lab.ephemeral(world, certs, run_edge=False) as lab:
        for edge in edges:
            reason = available(edge)
            if reason:
                skipped[edge] = reason
                continue
            for flavour in flavours:
                try:
                    async with running(edge, lab.world, flavour, lab.ca) as started:
                        listeners = {l["name"]: (l["host"], l["port"]) for l in started.listeners}
                        target = target_of(listeners, lab.world, edge, flavour)
                        results += await Runner(target.endpoints(lab.endpoints), target.place(lab.world),
                                                target=target).run(
                            scenarios, (flavour,), progress)
                        configs[(edge, flavour)] = {"version": version(edge) or "",
                                                    "lines": fixed_lines(edge, lab.world, lab.ca)}
                except EdgeError as e:
                    skipped[f"{edge} {flavour}"] = str(e)
    return results, configs, skipped


def fixed_lines(edge: str, world, ca) -> dict[str, tuple[str, ...]]:
    """Per listener, the lines `fixed` adds over `default`: what makes the difference, shown under
    both flavours (under `default`, as what that config lacks)."""
    with tempfile.TemporaryDirectory(prefix=f"sni-lab-{edge}-") as d:
        return dict(prepare(edge, world, "fixed", ca, Path(d)).added)


def command(args) -> int:
    # Real edges forward what the lab's edge refuses (no Host, two Hosts): the origins' parser
    # refusals are the outcome, told in the report, not a line on stderr each.
    logging.getLogger("lab.origins").setLevel(logging.ERROR)
    world = load(args.config)
    if getattr(args, "free_ports", True):
        world = world.with_free_ports()
        world = world.with_ports({l.name: free_port(l.host) for l in world.listeners})
    edges = parse_list(args.edge, tuple(EDGES), "edge") or tuple(EDGES)
    flavours = parse_list(args.flavour, FLAVOURS, "flavour") or FLAVOURS
    scenarios = _select(args, world)
    progress = Progress(len(scenarios) * (len(REFERENCE) + len(edges) * len(flavours)), not args.json)
    started = time.perf_counter()
    try:
        results, configs, skipped = run_loop(edges_matrix(world, edges, flavours, scenarios, args.certs, progress))
    finally:
        progress.close()
    wall = time.perf_counter() - started
    source = str(world.source)
    if args.markdown:
        Path(args.markdown).write_text(edgereport.markdown(results, configs, skipped, source))
    if args.html:
        Path(args.html).write_text(edgereport.to_html(results, configs, skipped, source))
    cols = edgereport.columns(results, configs)
    if args.json:
        data = json.loads(to_json(results))
        data["edges"] = edgereport.summary_rows(cols)
        data["skipped"] = skipped
        data["summary"]["wall_s"] = round(wall, 2)
        print(json.dumps(data, indent=2))
    else:
        print(edgereport.summary_table(cols))
        for what, why in skipped.items():
            print(f"skipped {what}: {why}")
        print(f"{len(results)} cases in {wall:.1f} s" + ("" if args.markdown or args.html else
                                                          "; --markdown F / --html F for the whole report"))
    # Like `matrix`: 1 when a case failed (MISROUTED under `fixed`, or a legitimate request refused).
    return 0 if all(r.passed for r in results) else 1
