"""decide() over a table: every model, the write-up's attack, and the tricky targets."""
import dataclasses

import pytest

from lab.policy import Target, certificate_names, decide
from lab.topology import CustomHostname

ANY, SAAS, SAAS2 = "anycast", "saas-v1", "saas2-v1"
R = lambda origin: ("origin", origin)  # routed to
X = lambda status, code: ("refused", status, code)  # refused by the edge

CASES = [
    # (model, listener, sni, target, expected)
    # legit traffic reaches the right origin in every model
    *[(m, ANY, "www.victim.example", Target(("www.victim.example",)), R("victim")) for m in ("host", "v1", "v1-waf", "v2", "v2-strict")],
    *[(m, SAAS, "app.saas.example", Target(("app.saas.example",)), R("saas")) for m in ("host", "v1", "v1-waf", "v2", "v2-strict")],
    *[(m, SAAS, "shop.customer.example", Target(("shop.customer.example",)), R("saas")) for m in ("host", "v1", "v1-waf", "v2", "v2-strict")],
    *[(m, SAAS2, "app.saas2.example", Target(("app.saas2.example",)), R("saas2")) for m in ("host", "v1", "v1-waf", "v2", "v2-strict")],
    # the write-up: SNI and Host www.victim.example on the SaaS v1 address
    ("v1", SAAS, "www.victim.example", Target(("www.victim.example",)), R("saas")),
    ("v1-waf", SAAS, "www.victim.example", Target(("www.victim.example",)), X(403, "waf-block")),
    ("v2", SAAS, "www.victim.example", Target(("www.victim.example",)), R("victim")),
    ("v2-strict", SAAS, "www.victim.example", Target(("www.victim.example",)), R("victim")),
    ("host", SAAS, "www.victim.example", Target(("www.victim.example",)), R("victim")),
    # saas2 is configured for v1 but not on the allowlist: v1-waf routes it as v2
    ("v1", SAAS2, "www.victim.example", Target(("www.victim.example",)), R("saas2")),
    ("v1-waf", SAAS2, "www.victim.example", Target(("www.victim.example",)), R("victim")),
    # host differing from SNI: v2-strict says 421, v2 routes by host
    ("v2-strict", ANY, "shop.customer.example", Target(authority="www.victim.example"), X(421, "sni-host-mismatch")),
    ("v2", ANY, "shop.customer.example", Target(authority="www.victim.example"), R("victim")),
    # unknown and unverified names
    ("v2", ANY, "nothing.example", Target(("nothing.example",)), X(421, "unknown-host")),
    ("v1", SAAS, "app.saas.example", Target(("evil.test",)), R("saas")),
    ("v1-waf", SAAS, "app.saas.example", Target(("evil.test",)), X(403, "waf-block")),
    # normalisation: case, trailing dot, port
    ("v1-waf", SAAS, "app.saas.example", Target(("APP.Saas.Example.:8443",)), R("saas")),
    ("v2", ANY, "www.victim.example", Target(("WWW.VICTIM.EXAMPLE.",)), R("victim")),
    ("v2-strict", ANY, "www.victim.example", Target(("www.victim.example:443",)), R("victim")),
    # self-contradicting targets are refused with 400, never guessed
    ("v1", SAAS, "app.saas.example", Target(("a.saas.example", "b.saas.example")), X(400, "duplicate-host")),
    ("v2", ANY, "www.victim.example", Target(("www.victim.example",), absolute="evil.test"), X(400, "host-mismatch")),
    ("v2", ANY, "www.victim.example", Target(("www.victim.example",), authority="app.saas.example"), X(400, "host-mismatch")),
    ("v2", ANY, "www.victim.example", Target(("bad host",)), X(400, "bad-host")),
    ("v2", ANY, "www.victim.example", Target(("www.victim.example",), absolute="www.victim.example:443"), R("victim")),
    # no host at all (HTTP/1.0): the SNI is the name; neither: 400
    ("v2", ANY, "www.victim.example", Target(), R("victim")),
    ("v2", ANY, None, Target(), X(400, "no-host")),
    ("v1", SAAS, None, Target(), R("saas")),
    # IP literal as host
    ("v2", ANY, "www.victim.example", Target(("127.0.0.10",)), X(421, "unknown-host")),
    ("v1-waf", SAAS, None, Target(("127.0.0.11",)), X(403, "waf-block")),
    # wildcard names of a zone: covered by its certificate, but not one of its hosts
    ("v2", ANY, "other.victim.example", Target(("other.victim.example",)), X(421, "unknown-host")),
]


@pytest.mark.parametrize("model,listener,sni,target,expected", CASES,
                         ids=[f"{c[0]}-{c[1]}-{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_decide(world, model, listener, sni, target, expected):
    d = decide(world.listener_by_name[listener], sni, target, world, model)
    got = R(d.origin) if d.routed else X(d.status, d.code)
    assert got == expected, d.reason
    assert d.model == model and d.reason.startswith(model)


def test_at_least_thirty_cases():
    assert len(CASES) >= 30 and {c[0] for c in CASES} == {"host", "v1", "v1-waf", "v2", "v2-strict"}


@pytest.mark.parametrize("status", ["pending", "moved", "deleted"])
def test_unverified_hostname_never_routed(world, status):
    w = world.with_hostnames(world.custom_hostnames + (CustomHostname("www.newshop.test", "saas.example", status),))
    for model in ("v2", "v2-strict", "host"):
        d = decide(w.listener_by_name[ANY], "www.newshop.test", Target(("www.newshop.test",)), w, model)
        assert not d.routed and d.status == 421
    d = decide(w.listener_by_name[SAAS], "app.saas.example", Target(("www.newshop.test",)), w, "v1-waf")
    assert d.status == 403
    assert ("www.newshop.test",) not in certificate_names(w)


def test_active_hostname_routed_and_certified(world):
    w = world.with_hostnames(world.custom_hostnames + (CustomHostname("www.newshop.test", "saas.example", "active"),))
    d = decide(w.listener_by_name[ANY], "www.newshop.test", Target(("www.newshop.test",)), w, "v2")
    assert d.origin == "saas" and d.rule == "custom-hostname"
    assert ("www.newshop.test",) in certificate_names(w)


def test_v1_reason_names_listener(world):
    d = decide(world.listener_by_name[SAAS], "www.victim.example", Target(("www.victim.example",)), world, "v1")
    assert d.reason == "v1: listener saas-v1 (127.0.0.11) belongs to zone saas.example; Host ignored"
    assert "\n" not in d.header() and d.header().startswith("model=v1; rule=v1-listener; origin=saas")


def test_zone_custom_rule_applies_in_every_model(world):
    from lab.topology import WafRule

    zones = tuple(dataclasses.replace(z, rules=(WafRule("no-admin", 'http.path.startsWith("/admin")'),))
                  if z.name == "victim.example" else z for z in world.zones)
    w = dataclasses.replace(world, zones=zones)
    for model in ("host", "v1", "v2"):
        d = decide(w.listener_by_name[ANY], "www.victim.example", Target(("www.victim.example",), path="/admin/x"), w, model)
        assert d.status == 403 and d.rule == "no-admin"
        d = decide(w.listener_by_name[ANY], "www.victim.example", Target(("www.victim.example",), path="/"), w, model)
        assert d.origin == "victim"
