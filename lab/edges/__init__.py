"""Real edges (nginx, Caddy, HAProxy, mitmproxy) configured from the world, in two flavours.

PURE: `render(edge, world, flavour, certs)` turns the world's plan (lab.edges.plan) into the
edge's files and command line; starting and stopping the edge is lab.edges.process.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Mapping

from lab.edges import caddy, haproxy, mitm, nginx
from lab.edges.plan import FLAVOURS, CertFiles, Plan, PlanError, make
from lab.topology import World

__all__ = ["EDGES", "FLAVOURS", "CertFiles", "Plan", "PlanError", "Rendered", "render"]

# The edge's name -> its writer module: BINARY, INSTALL (how to get it), VERSION (argv), MAIN (the main
# file), BUNDLES (wants certificate and key in one file), write(plan, certs, **options) -> (files, lines
# per listener), command(), check() (argv, or None), env().
EDGES = {"nginx": nginx, "caddy": caddy, "haproxy": haproxy, "mitmproxy": mitm}


@dataclass(frozen=True)
class Rendered:
    """An edge's config for one world and flavour. Paths inside are relative to the directory the
    files are written to, where the command runs; argv[0] is the edge's binary name."""
    edge: str
    flavour: str
    plan: Plan
    main: str  # the main config file, a key of `files`
    files: dict[str, str]  # relative path -> text
    command: tuple[str, ...]
    check: tuple[str, ...] | None  # the edge's own config check, when it has one
    env: dict[str, str] = field(default_factory=dict)  # set for both (relative paths: the files' directory)
    # Per listener: the config lines `fixed` adds over `default`, the lines that make the difference
    # (empty under `default`).
    added: dict[str, tuple[str, ...]] = field(default_factory=dict)


def added_lines(before: list[str], after: list[str]) -> tuple[str, ...]:
    """The lines of `after` that `before` lacks, in order (a line diff, the config's structure
    left out: braces, brackets and blanks say nothing)."""
    old, new = ([line.strip() for line in lines if line.strip().strip("{}[](),;").strip()] for lines in (before, after))
    ops = difflib.SequenceMatcher(a=old, b=new, autojunk=False).get_opcodes()
    return tuple(line for op, _, _, j1, j2 in ops if op in ("insert", "replace") for line in new[j1:j2])


def render(edge: str, world: World, flavour: str, certs: Mapping[tuple[str, ...], CertFiles],
           **options) -> Rendered:
    """`certs` maps every certificate of the world (named by its names, as
    lab.policy.certificate_names lists them) to its files. `options` go to the writer (nginx:
    `user`, the account its workers run as when it is started as root)."""
    if edge not in EDGES:
        raise PlanError(f"unknown edge {edge!r} (choose from {', '.join(EDGES)})")
    writer = EDGES[edge]
    plan = make(world, flavour)
    missing = [names for names in plan.certificates if names not in certs]
    if missing:
        raise PlanError(f"no certificate files for {', '.join(missing[0])}")
    files, sections = writer.write(plan, certs, **options)
    added: dict[str, tuple[str, ...]] = {l.name: () for l in plan.listeners}
    if flavour == "fixed":
        _, before = writer.write(make(world, "default"), certs, **options)
        for name, lines in sections.items():
            added[name] = added_lines(before.get(name, []), lines)
    return Rendered(edge, flavour, plan, writer.MAIN, files, tuple(writer.command()),
                    tuple(writer.check()) if writer.check() else None, dict(writer.env()), added)
