"""lab.waf: the v1 host allowlist and per-zone CEL rules, without a socket."""
from __future__ import annotations

import builtins
import dataclasses

import cel
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab import topology, waf
from lab.hostnorm import normalize
from lab.topology import CustomHostname, WafRule
from lab.world import load

SAAS = "saas.example"


def with_rules(world: topology.World, *rules: WafRule, zone: str = SAAS) -> tuple[topology.World, topology.Zone]:
    zones = tuple(dataclasses.replace(z, rules=rules) if z.name == zone else z for z in world.zones)
    w = dataclasses.replace(world, zones=zones)
    return w, w.zone_by_name[zone]


def check(world, zone, host, *, path="/", sni=None, dst="127.0.0.11", allowlist=True):
    return waf.evaluate(zone.rules, zone=zone.name, authorized=world.authorized_hosts(zone), host=host,
                        sni=host if sni is None else sni, dst=dst, path=path, include_allowlist=allowlist)


# --- the built-in allowlist -------------------------------------------------------------

def test_allowlist_blocks_the_victims_name_on_the_saas_zone(world):
    hit = check(world, world.zone_by_name[SAAS], "www.victim.example")
    assert hit == waf.RuleHit(waf.ALLOWLIST_RULE_ID, "block", waf.ALLOWLIST_DESCRIPTION)


@pytest.mark.parametrize("host", ["app.saas.example", "saas.example", "customers.saas.example",
                                  "shop.customer.example"])  # the last: an ACTIVE custom hostname
def test_allowlist_lets_authorized_hosts_through(world, host):
    assert check(world, world.zone_by_name[SAAS], host) is None


@pytest.mark.parametrize("host", ["shop.customer.example", "SHOP.customer.example", "shop.customer.example.",
                                  "www.victim.example", "", "saas.example", "app.saas.example "])
def test_the_allowlist_answers_as_its_expression_does_in_cel(world, host):
    # The rule users see is CEL text; the WAF answers it as a set lookup: the same verdict.
    zone = world.zone_by_name[SAAS]
    authorized = world.authorized_hosts(zone)
    in_cel = cel.compile(waf.ALLOWLIST_EXPRESSION).execute(
        {"http": {"host": host, "path": "/"}, "zone": {"name": SAAS, "authorized": list(authorized)}})
    by_set = waf.evaluate((), zone=SAAS, authorized=authorized, host=host, sni="", dst="127.0.0.11", path="/",
                          include_allowlist=True)
    assert in_cel == (by_set is not None)


def test_allowlist_is_only_applied_when_asked(world):
    # policy.decide asks for it only under v1-waf on allowlisted zones.
    assert check(world, world.zone_by_name[SAAS], "www.victim.example", allowlist=False) is None


@pytest.mark.parametrize("status", ["pending", "moved", "deleted"])
def test_a_registration_that_is_not_active_authorizes_nothing(world, status):
    w = world.with_hostnames(world.custom_hostnames + (CustomHostname("newshop.test", SAAS, status),))
    hit = check(w, w.zone_by_name[SAAS], "newshop.test")
    assert hit is not None and hit.rule_id == waf.ALLOWLIST_RULE_ID


def test_activating_a_hostname_authorizes_it_in_the_next_snapshot(world):
    pending = world.with_hostnames(world.custom_hostnames + (CustomHostname("newshop.test", SAAS, "pending"),))
    active = world.with_hostnames(world.custom_hostnames + (CustomHostname("newshop.test", SAAS, "active"),))
    assert check(pending, pending.zone_by_name[SAAS], "newshop.test") is not None
    assert check(active, active.zone_by_name[SAAS], "newshop.test") is None
    # ...and the older snapshot still says no: the cached context is per authorized list.
    assert check(pending, pending.zone_by_name[SAAS], "newshop.test") is not None


@pytest.mark.parametrize("host", ["", "app.saas.example.evil.test", "xapp.saas.example", "saas.example.",
                                  "APP.SAAS.EXAMPLE", "app.saas.example:8443"])
def test_empty_lookalike_and_unnormalised_hosts_are_blocked(world, host):
    # The caller normalises (lab.hostnorm); the rule compares exactly, so anything it
    # did not normalise fails closed instead of slipping through.
    assert check(world, world.zone_by_name[SAAS], host) is not None


@pytest.mark.parametrize("raw", ["APP.SAAS.EXAMPLE", "app.saas.example.", "App.Saas.Example:8443"])
def test_normalised_spellings_of_an_authorized_host_pass(world, raw):
    assert check(world, world.zone_by_name[SAAS], normalize(raw)) is None


def hosts(names):
    return st.one_of(
        st.sampled_from(names),
        st.tuples(st.sampled_from(["x", "www.", "-", "a.b."]), st.sampled_from(names)).map("".join),
        st.sampled_from(names).map(lambda n: n + ".evil.test"),
        st.from_regex(r"[a-z0-9-]{1,10}(\.[a-z0-9-]{1,10}){0,3}", fullmatch=True),
        st.text(max_size=30),
    )


_WORLD = load().with_hostnames(load().custom_hostnames + (CustomHostname("pending.test", SAAS, "pending"),))
_NAMES = sorted({h for z in _WORLD.zones for h in z.hosts} | {c.name for c in _WORLD.custom_hostnames})


@settings(max_examples=300, deadline=None)
@given(host=hosts(_NAMES), zone=st.sampled_from(_WORLD.zones))
def test_property_blocked_iff_host_not_authorized(host, zone):
    hit = check(_WORLD, zone, host)
    assert (hit is not None) == (host not in _WORLD.authorized_hosts(zone))


# --- custom rules -----------------------------------------------------------------------

def test_a_custom_rule_blocks_with_its_id_and_description(world):
    w, z = with_rules(world, WafRule("no-admin", 'http.path.startsWith("/admin")', "block", "admin is internal"))
    assert check(w, z, "app.saas.example", path="/admin/users") == waf.RuleHit("no-admin", "block", "admin is internal")
    assert check(w, z, "app.saas.example", path="/shop") is None


def test_rules_run_in_order_and_the_allowlist_comes_last(world):
    w, z = with_rules(world, WafRule("first", 'http.path == "/x"'), WafRule("second", "true"))
    assert check(w, z, "www.victim.example", path="/x").rule_id == "first"
    assert check(w, z, "www.victim.example", path="/y").rule_id == "second"


def test_an_allow_match_stops_evaluation(world):
    w, z = with_rules(world, WafRule("health", 'http.path == "/health"', "allow"), WafRule("all", "true"))
    assert check(w, z, "www.victim.example", path="/health") is None  # skips "all" and the allowlist
    assert check(w, z, "www.victim.example", path="/").rule_id == "all"


def test_an_allow_rule_that_does_not_match_changes_nothing(world):
    w, z = with_rules(world, WafRule("ops", 'ssl.sni == "ops.saas.example"', "allow"))
    assert check(w, z, "www.victim.example").rule_id == waf.ALLOWLIST_RULE_ID
    assert check(w, z, "www.victim.example", sni="ops.saas.example") is None


def test_every_field_is_visible_to_rules(world):
    w, z = with_rules(world, WafRule("all-fields", 'http.host == "app.saas.example" && ssl.sni == "s.test" && '
                                     'ip.dst == "127.0.0.11" && http.path == "/p" && zone.name == "saas.example" && '
                                     '"shop.customer.example" in zone.authorized'))
    assert check(w, z, "app.saas.example", sni="s.test", path="/p", allowlist=False).rule_id == "all-fields"
    assert check(w, z, "app.saas.example", sni="s.test", path="/q", allowlist=False) is None


def test_absent_sni_is_the_empty_string(world):
    w, z = with_rules(world, WafRule("no-sni", 'ssl.sni == ""'))
    assert check(w, z, "app.saas.example", sni="", allowlist=False).rule_id == "no-sni"
    assert check(w, z, "app.saas.example", sni="app.saas.example", allowlist=False) is None


# --- failures ---------------------------------------------------------------------------

def test_a_broken_expression_raises_waferror_with_the_compilers_message(world):
    w, z = with_rules(world, WafRule("ok", "true"), WafRule("bad", "http.host =="))
    with pytest.raises(waf.WafError) as e:
        waf.compile_rules(z.name, z.rules)
    assert str(e.value).startswith("zone saas.example rule 'bad': ")
    assert "Syntax error" in str(e.value) and "http.host ==" in str(e.value)
    assert isinstance(e.value, ValueError) and e.value.rule_id == "bad"


def test_evaluate_never_raises_even_on_a_broken_expression(world):
    w, z = with_rules(world, WafRule("bad", "http.host =="))
    hit = check(w, z, "app.saas.example")
    assert hit.rule_id == "bad" and hit.action == "block" and "fail" in hit.description


@pytest.mark.parametrize("expression", ['http.nosuch == "x"', 'nosuch.field == "x"', "http.host + 1 == 2",
                                        "1 / 0 == 1", "http.host"])  # the last is not a bool
@pytest.mark.parametrize("action", ["block", "allow"])
def test_a_rule_that_fails_at_evaluation_blocks(world, expression, action):
    w, z = with_rules(world, WafRule("oops", expression, action, "would be fine"))
    hit = check(w, z, "app.saas.example", allowlist=False)
    assert hit is not None and hit.rule_id == "oops" and hit.action == "block"
    assert "fail closed" in hit.description


def test_compiled_rules_are_reused_not_recompiled(world, monkeypatch):
    w, z = with_rules(world, WafRule("no-admin", 'http.path.startsWith("/admin")'))
    assert waf.compile_rules(z.name, z.rules) is waf.compile_rules(z.name, z.rules)

    def boom(expression):
        raise AssertionError(f"recompiled {expression!r}")

    monkeypatch.setattr(cel, "compile", boom)
    assert check(w, z, "app.saas.example", path="/admin").rule_id == "no-admin"
    assert check(w, z, "www.victim.example").rule_id == waf.ALLOWLIST_RULE_ID


# ---- at scale: the allowlist is a set made once per change, never a list handed to CEL ------------

def test_the_allowlist_of_10k_names_is_converted_once_per_index_change(world, monkeypatch):
    names = [f"h{i:05d}.newshop.test" for i in range(10_000)]
    w = world.with_hostnames(world.custom_hostnames + tuple(CustomHostname(n, SAAS, "active") for n in names))
    z = w.zone_by_name[SAAS]
    sets, contexts = _count(monkeypatch, topology, "frozenset"), _count(monkeypatch, cel, "Context")

    assert all(check(w, z, names[i]) is None for i in range(0, 10_000, 100))  # 100 requests
    assert check(w, z, "www.victim.example").rule_id == waf.ALLOWLIST_RULE_ID
    assert (len(sets), len(contexts)) == (1, 0)  # one set of the names; the list never reaches CEL

    w.hostnames.put(CustomHostname("late.newshop.test", SAAS, "active"))  # the index changes in place
    assert check(w, z, "late.newshop.test") is None and check(w, z, names[7]) is None
    w.hostnames.put(CustomHostname(names[7], SAAS, "moved"))
    assert check(w, z, names[7]).rule_id == waf.ALLOWLIST_RULE_ID
    assert all(check(w, z, n) is None for n in names[8:50])
    assert (len(sets), len(contexts)) == (3, 0)


def test_a_rule_that_reads_zone_authorized_gets_the_list_once_per_index_change(world, monkeypatch):
    names = [f"h{i:05d}.newshop.test" for i in range(10_000)]
    w = world.with_hostnames(world.custom_hostnames + tuple(CustomHostname(n, SAAS, "active") for n in names))
    w, z = with_rules(w, WafRule("known", 'http.host in zone.authorized && http.path == "/known"'))
    contexts = _count(monkeypatch, cel, "Context")
    assert [check(w, z, names[i], path="/known", allowlist=False).rule_id for i in (1, 2, 3)] == ["known"] * 3
    assert check(w, z, "www.victim.example", path="/known", allowlist=False) is None
    w.hostnames.put(CustomHostname("late.newshop.test", SAAS, "active"))
    assert check(w, z, "late.newshop.test", path="/known", allowlist=False).rule_id == "known"
    assert len(contexts) == 2  # one per version of the index


def _count(monkeypatch, module, name: str) -> list:
    """Calls of `module.<name>` (a builtin is looked up in the module first) from here on."""
    real = getattr(module, name, None) or getattr(builtins, name)
    calls: list = []

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counting, raising=False)
    return calls


def test_a_name_an_active_wildcard_covers_passes_without_copying_the_allowlist(world, monkeypatch):
    from lab.policy import Target, decide
    names = [f"h{i:05d}.newshop.test" for i in range(10_000)]
    hostnames = tuple(CustomHostname(n, SAAS, "active") for n in names) + (CustomHostname("*.wild.test", SAAS, "active"),)
    w = world.with_hostnames(world.custom_hostnames + hostnames)
    saas_v1 = w.listener_by_name["saas-v1"]
    sets = _count(monkeypatch, topology, "frozenset")
    handed, real_evaluate = [], waf.evaluate
    monkeypatch.setattr(waf, "evaluate", lambda *a, **kw: handed.append(kw["authorized"]) or real_evaluate(*a, **kw))
    for i in range(50):
        d = decide(saas_v1, "app.saas.example", Target((f"shop{i}.wild.test",)), w, "v1-waf")
        assert d.origin == "saas", d
    assert decide(saas_v1, "app.saas.example", Target(("wild.test",)), w, "v1-waf").status == 403  # not covered
    assert len(sets) == 1  # one set of the zone's names for all 51 requests, never a copy of them
    assert all(a is w.authorized_hosts(w.zone_by_name[SAAS]) for a in handed) and len(handed) == 51
    # a rule that reads zone.authorized sees the covered name too
    w, z = with_rules(w, WafRule("known", 'http.host in zone.authorized && http.path == "/known"'))
    assert waf.evaluate(z.rules, zone=SAAS, authorized=w.authorized_hosts(z), host="a.wild.test", sni="", dst="",
                        path="/known", include_allowlist=False, covered="a.wild.test").rule_id == "known"
