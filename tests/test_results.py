"""lab.results: the one reader of X-Lab-Decision reads back what the policy writes."""
from __future__ import annotations

import dataclasses
import itertools

from lab.policy import Target, decide
from lab.results import matches, parse_decision
from lab.topology import MODELS, CustomHostname


def _decisions(world):
    """Every model's decision on every listener for the names of the default world (zones,
    their www, custom hostnames in each status, an unknown name), sent cleanly and oddly."""
    saas = next(z.name for z in world.zones if z.saas)
    world = world.with_hostnames(tuple(CustomHostname(f"{s}.custom.example", saas, s)
                                       for s in ("active", "pending", "moved")))
    names = [n for z in world.zones for n in (z.name, f"www.{z.name}")]
    names += [c.name for c in world.custom_hostnames] + ["nobody.example", "127.0.0.1"]
    targets = [Target()]
    for a, b in zip(names, names[1:] + names[:1]):
        targets += [Target(hosts=(a, a)), Target(hosts=(a,)), Target(hosts=(a, b)), Target(hosts=(a,), authority=b),
                    Target(absolute=f"{a}:443", path="/admin")]
    targets += [Target(hosts=("bad host",)), Target(hosts=(f"{names[0].upper()}.",))]
    for model, listener, sni in itertools.product(MODELS, world.listeners, [None, *names, "Über.example"]):
        for target in targets:
            yield decide(listener, sni, target, world, model)


def test_parse_decision_reads_back_every_header_the_policy_writes(world):
    seen = set()
    for d in _decisions(world):
        assert parse_decision(d.header()) == dataclasses.replace(d, host=None), d.header()
        seen.add((d.model, d.routed))
    # the round trip covered routed and refused decisions under every model
    assert seen == {(m, routed) for m in MODELS for routed in (True, False)}


def test_parse_decision_of_no_or_a_foreign_header():
    for header in (None, "", "nginx", "model=v1; rule=r", "origin=saas; model=v1; rule=r; reason=x"):
        assert parse_decision(header) is None


def test_matches_an_expectation_by_prefix_of_whole_parts():
    assert matches("refused", "refused:403:waf-block") and matches("refused:403", "refused:403:waf-block")
    assert matches("victim", "victim")
    assert not matches("refused:40", "refused:403:waf-block") and not matches("saas", "saas2")
