"""decide() over a table: every model, the write-up's attack, and the tricky targets; the
model table itself, and that every model earns its place in the catalog."""
import dataclasses
import itertools

import pytest

from lab import models
from lab.models import MODELS
from lab.policy import Target, certificate_names, decide
from lab.scenarios import discover
from lab.topology import CustomHostname, WafRule

ANY, SAAS, SAAS2 = "anycast", "saas-v1", "saas2-v1"
R = lambda origin: ("origin", origin)  # routed to
X = lambda status, code: ("refused", status, code)  # refused by the edge

CASES = [
    # (model, listener, sni, target, expected)
    # legit traffic reaches the right origin in every model
    *[(m, ANY, "www.victim.example", Target(("www.victim.example",)), R("victim")) for m in MODELS],
    *[(m, SAAS, "app.saas.example", Target(("app.saas.example",)), R("saas")) for m in MODELS],
    *[(m, SAAS, "shop.customer.example", Target(("shop.customer.example",)), R("saas")) for m in MODELS],
    *[(m, SAAS2, "app.saas2.example", Target(("app.saas2.example",)), R("saas2")) for m in MODELS],
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


def registered(world, name, status, zone="saas.example"):
    return world.with_hostnames(world.custom_hostnames + (CustomHostname(name, zone, status),))


@pytest.mark.parametrize("status", ["pending", "moved", "deleted"])
def test_unverified_hostname_never_routed_by_a_verifying_model(world, status):
    w = registered(world, "www.newshop.test", status)
    for model in ("v1", "v1-waf", "v2", "v2-strict"):
        d = decide(w.listener_by_name[ANY], "www.newshop.test", Target(("www.newshop.test",)), w, model)
        assert (d.status, d.code) == (421, "unknown-host" if status == "deleted" else "hostname-not-active"), d.reason
    d = decide(w.listener_by_name[SAAS], "app.saas.example", Target(("www.newshop.test",)), w, "v1-waf")
    assert d.status == 403
    assert ("www.newshop.test",) not in certificate_names(w)


@pytest.mark.parametrize("status", ["pending", "moved"])
def test_host_routes_a_registration_without_proof(world, status):
    w = registered(world, "login.victim.example", status)
    d = decide(w.listener_by_name[ANY], "login.victim.example", Target(("login.victim.example",)), w, "host")
    assert (d.origin, d.rule) == ("saas", "custom-hostname")
    assert d.reason == (f"host: host login.victim.example is a {status} custom hostname of saas.example, "
                        "routed on its registration alone (no ownership proof)")
    # ...but a registration still gets no certificate of its own: the name is only
    # reachable on a certificate that already covers it (here *.victim.example).
    assert ("login.victim.example",) not in certificate_names(w)


def test_host_forgets_a_deleted_registration(world):
    w = registered(world, "login.victim.example", "deleted")
    d = decide(w.listener_by_name[ANY], "login.victim.example", Target(("login.victim.example",)), w, "host")
    assert (d.status, d.code) == (421, "unknown-host")
    assert d.reason == "host: no zone or registered custom hostname for host login.victim.example"


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("status", ["pending", "moved", "blocked"])
def test_a_zone_own_host_wins_over_a_registration_that_proved_nothing(world, model, status):
    # www.victim.example registered on the SaaS zone (the attacker's claim): by Host, the
    # victim's zone keeps its own name, even under `host`, which trusts registrations.
    w = registered(world, "www.victim.example", status)
    d = decide(w.listener_by_name[ANY], "www.victim.example", Target(("www.victim.example",)), w, model)
    assert (d.origin, d.rule) == ("victim", "zone-host")


@pytest.mark.parametrize("model", MODELS)
def test_an_exact_active_custom_hostname_beats_the_zone(world, model):
    # Cloudflare's hostname priority: among exact matches the custom hostname wins, so the
    # owner of www.victim.example can hand it to a SaaS by proving it (and so can a poisoned validator).
    w = registered(world, "www.victim.example", "active")
    d = decide(w.listener_by_name[ANY], "www.victim.example", Target(("www.victim.example",)), w, model)
    assert (d.origin, d.rule) == ("saas", "custom-hostname")
    assert "an exact custom hostname beats zone victim.example's own host" in d.reason
    # the zone's other names stay the zone's
    d = decide(w.listener_by_name[ANY], "victim.example", Target(("victim.example",)), w, model)
    assert (d.origin, d.rule) == ("victim", "zone-host")


@pytest.mark.parametrize("model", MODELS)
def test_for_wildcards_the_zone_wins(world, model):
    w = registered(world, "*.victim.example", "active")
    anycast = w.listener_by_name[ANY]
    d = decide(anycast, "www.victim.example", Target(("www.victim.example",)), w, model)
    assert (d.origin, d.rule) == ("victim", "zone-host")
    # a name the zone does not serve is the wildcard custom hostname's
    d = decide(anycast, "login.victim.example", Target(("login.victim.example",)), w, model)
    assert (d.origin, d.rule) == ("saas", "custom-hostname")
    assert "(by *.victim.example)" in d.reason
    # and a zone's own wildcard beats a wildcard custom hostname
    zones = tuple(dataclasses.replace(z, hosts=z.hosts + ("*.victim.example",)) if z.name == "victim.example" else z
                  for z in w.zones)
    d = decide(anycast, "login.victim.example", Target(("login.victim.example",)), dataclasses.replace(w, zones=zones),
               model)
    assert (d.origin, d.rule) == ("victim", "zone-host")


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
    zones = tuple(dataclasses.replace(z, rules=(WafRule("no-admin", 'http.path.startsWith("/admin")'),))
                  if z.name == "victim.example" else z for z in world.zones)
    w = dataclasses.replace(world, zones=zones)
    for model in ("host", "v1", "v2"):
        d = decide(w.listener_by_name[ANY], "www.victim.example", Target(("www.victim.example",), path="/admin/x"), w, model)
        assert d.status == 403 and d.rule == "no-admin"
        d = decide(w.listener_by_name[ANY], "www.victim.example", Target(("www.victim.example",), path="/"), w, model)
        assert d.origin == "victim"


def test_v1_zone_not_on_the_allowlist_is_routed_by_host(world):
    d = decide(world.listener_by_name[SAAS2], "www.victim.example", Target(("www.victim.example",)), world, "v1-waf")
    assert (d.origin, d.rule) == ("victim", "zone-host")
    # ...and on the list it would keep v1 routing, behind the WAF allowlist.
    zones = tuple(dataclasses.replace(z, v1_allowlisted=True) if z.name == "saas2.example" else z for z in world.zones)
    w = dataclasses.replace(world, zones=zones)
    d = decide(w.listener_by_name[SAAS2], "www.victim.example", Target(("www.victim.example",)), w, "v1-waf")
    assert (d.status, d.rule) == (403, "v1-host-allowlist")
    assert d.reason == ("v1-waf: rule v1-host-allowlist of zone saas2.example blocked the request "
                        "(host www.victim.example is not an authorized hostname of saas2.example)")


# --- the model table ----------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(CASES)))
def test_decide_reads_the_row_not_the_name(world, monkeypatch, index):
    """A copy of a row under another name decides every case the same way."""
    model, listener, sni, target, expected = CASES[index]
    monkeypatch.setitem(models.BY_NAME, "renamed", dataclasses.replace(models.get(model), name="renamed"))
    d = decide(world.listener_by_name[listener], sni, target, world, "renamed")
    assert (R(d.origin) if d.routed else X(d.status, d.code)) == expected, d.reason
    assert d.model == "renamed" and d.reason.startswith("renamed: ")


def test_unknown_model_is_a_clear_error(world):
    with pytest.raises(ValueError, match="unknown model 'v3' \\(choose from host, v1, v1-waf, v2, v2-strict\\)"):
        decide(world.listener_by_name[ANY], "www.victim.example", Target(), world, "v3")


@pytest.mark.parametrize("row", models.TABLE, ids=lambda m: m.name)
def test_a_protected_model_routes_only_what_was_verified(row):
    # The table's own invariant: a protected model trusts no unproven registration, and
    # never hands a dedicated address's traffic over without the host allowlist.
    if row.protected:
        assert row.trusts == models.VERIFIED
        assert not row.by_listener or (row.host_allowlist and row.v1_allowlist)
    assert row.description


def test_the_table_prints_one_row_per_model():
    lines = models.markdown().splitlines()
    for m in models.TABLE:
        row = next(line for line in lines if line.startswith(f"| `{m.name}` |"))
        assert ", ".join(m.trusts) in row and row.endswith("| yes |" if m.protected else "| no |")
        assert f"- `{m.name}`: {m.description}" in lines
    assert "| `host` | by Host | pending, active, moved | none | no |" in lines
    assert "| `v2-strict` | by Host | active | Host must equal SNI (421) | yes |" in lines


def test_every_model_differs_from_every_other_on_some_scenario():
    catalog = discover()
    same = [(a, b) for a, b in itertools.combinations(MODELS, 2)
            if all(sc.expect[a] == sc.expect[b] for sc in catalog)]
    assert not same, f"models with identical expectations on all {len(catalog)} scenarios: {same}"


@pytest.mark.parametrize("model", MODELS)
def test_a_new_zone_on_v1_is_refused_only_by_the_v1_allowlist_control(world, model):
    from lab.policy import admit_zone
    from lab.topology import Zone

    new = Zone("saas3.example", "saas2", ("saas3.example",), saas=True, v1_listener="spare-v1", added=True)
    d = admit_zone(world.with_model(model), new)
    if models.get(model).v1_allowlist:
        assert (d.status, d.code) == (403, "v1-closed") and "no new zone goes on v1" in d.reason
    else:
        assert d is None
    assert admit_zone(world.with_model(model), dataclasses.replace(new, v1_listener=None)) is None
    # once added (where allowed), the listener is the zone's, though the engine bound it before
    w = world.with_model(model).with_zones((new,))
    bound = world.listener_by_name["spare-v1"]
    assert bound.zone is None and w.listener_by_name["spare-v1"].zone == "saas3.example"
    d = decide(bound, "www.victim.example", Target(("www.victim.example",)), w, model)
    assert d.origin == ("saas2" if model == "v1" else "victim")
