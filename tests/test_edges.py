"""The real edges' plan and configs, pure: which names each address serves, with which
certificate and origin, and what each edge's `fixed` flavour adds. (Running them: test_edges_live.)"""
import pytest

from lab.edges import EDGES, CertFiles, PlanError, render
from lab.edges.plan import make
from lab.policy import Target, certificate_names, decide
from lab.topology import CustomHostname, Zone

SAAS_NAMES = ("app.saas.example", "customers.saas.example", "saas.example", "shop.customer.example")
SAAS_CERTS = (("saas.example", "*.saas.example"), ("shop.customer.example",))


def files_for(world):
    """Certificate files as render takes them (named only: render reads no file)."""
    return {names: CertFiles(f"/certs/{names[0]}.pem", f"/certs/{names[0]}.key", f"/w/bundles/{names[0]}.pem")
            for names in certificate_names(world)}


def listeners(world, flavour):
    return {lp.name: lp for lp in make(world, flavour).listeners}


def other_world(world):
    """The default world plus a SaaS zone on the spare v1 address, an active and a pending custom
    hostname of it, an active wildcard one, and www.victim.example handed to saas.example by proof."""
    world = world.with_zones((Zone("other.example", "saas2", ("other.example", "app.other.example"), saas=True,
                                   cname_target="app.other.example", v1_listener="spare-v1"),))
    return world.with_hostnames(world.custom_hostnames + (
        CustomHostname("shop.tenant.example", "other.example", "active"),
        CustomHostname("claim.tenant.example", "other.example", "pending"),
        CustomHostname("*.fleet.example", "other.example", "active"),
        CustomHostname("www.victim.example", "saas.example", "active"),
    ))


def test_default_flavour_v1_address_sends_everything_to_its_zone_with_every_certificate(world):
    plan = listeners(world, "default")
    v1 = plan["saas-v1"]
    assert (v1.zone, v1.everything_to, v1.routes, v1.strict) == ("saas.example", "saas", (), False)
    assert v1.certificates == tuple(certificate_names(world))  # the victim's certificate too: the write-up
    shared = plan["anycast"]
    assert shared.everything_to is None and shared.not_routed == 404
    assert dict(shared.routes)["www.victim.example"] == "victim"
    assert dict(shared.routes)["shop.customer.example"] == "saas"


def test_fixed_flavour_authorizes_a_v1_address_for_its_zone_only(world):
    plan = listeners(world, "fixed")
    v1 = plan["saas-v1"]
    assert v1.names == SAAS_NAMES
    assert set(v1.routes) == {(n, "saas") for n in SAAS_NAMES}
    assert v1.certificates == SAAS_CERTS
    assert (v1.everything_to, v1.strict, v1.not_routed) == (None, True, 421)
    assert plan["saas2-v1"].names == ("app.saas2.example", "customers.saas2.example", "saas2.example")
    # the shared listeners serve every zone's authorized names, by Host
    every = {n for z in world.zones for n in world.authorized_hosts(z)}
    assert set(plan["anycast"].names) == every == set(plan["spare-v1"].names)
    assert "www.victim.example" not in plan["saas-v1"].names


def test_another_zone_authorizes_its_own_names_and_active_hostnames_only(world):
    world = other_world(world)
    plan = listeners(world, "fixed")
    spare = plan["spare-v1"]
    assert spare.zone == "other.example"
    assert spare.names == ("app.other.example", "other.example", "shop.tenant.example", "*.fleet.example")
    assert {o for _, o in spare.routes} == {"saas2"}
    assert spare.certificates == (("other.example", "*.other.example"), ("shop.tenant.example",),
                                  ("*.fleet.example",))
    assert "claim.tenant.example" not in plan["anycast"].names  # pending proves nothing
    # www.victim.example, proven by saas.example: on its address now, and routed there on the shared one
    assert "www.victim.example" in plan["saas-v1"].names
    assert dict(plan["anycast"].routes)["www.victim.example"] == "saas"
    assert listeners(world, "default")["spare-v1"].everything_to == "saas2"


def test_plan_routes_agree_with_the_lab_policy_under_v2(world):
    """The real edges route each name where the lab's v2 would (the hostname priority rule included)."""
    world = other_world(world)
    shared = world.listener_by_name["anycast"]
    for lp in make(world, "fixed").listeners:
        for name, origin in lp.routes:
            probe = name.replace("*", "any", 1)
            decision = decide(shared, probe, Target((probe,)), world, model="v2")
            assert decision.origin == origin, (lp.name, name, decision.reason)


def test_unknown_flavour_and_edge_are_one_line_errors(world):
    with pytest.raises(PlanError, match="unknown flavour 'strict'"):
        make(world, "strict")
    with pytest.raises(PlanError, match="unknown edge 'squid'"):
        render("squid", world, "default", files_for(world))
    with pytest.raises(PlanError, match="no certificate files for victim.example"):
        render("nginx", world, "default", {})


def test_an_https_origin_behind_a_zone_is_refused_with_the_reason(world):
    world = world.with_zones((Zone("loot.example", "collector", ("loot.example",)),))
    with pytest.raises(PlanError, match="origin collector is reached over https"):
        make(world, "default")


FIXED_MECHANISM = {  # the line of each edge's own control that `fixed` must add on every listener
    "nginx": "ssl_reject_handshake on;",
    "caddy": '"strict_sni_host": true',
    "haproxy": "strict-sni",
    "mitmproxy": '"sni": {',
}


@pytest.mark.parametrize("edge", EDGES)
def test_fixed_adds_the_edges_own_controls_and_the_allowlist_on_every_listener(edge, world):
    certs = files_for(world)
    default = render(edge, world, "default", certs)
    fixed = render(edge, world, "fixed", certs)
    assert default.added == {l.name: () for l in world.listeners}
    assert set(fixed.added) == set(world.listener_by_name)
    for name, lines in fixed.added.items():
        assert any(FIXED_MECHANISM[edge] in line for line in lines), (name, lines)
        assert any("421" in line for line in lines), (name, lines)
    v1 = "\n".join(fixed.added["saas-v1"])
    assert "app.saas.example" in v1 and "victim" not in v1
    assert fixed.main in fixed.files and fixed.command[0] == EDGES[edge].BINARY


@pytest.mark.parametrize("edge", EDGES)
def test_configs_name_key_files_and_never_hold_a_key(edge, world):
    certs = files_for(world)
    for flavour in ("default", "fixed"):
        text = "\n".join(render(edge, world, flavour, certs).files.values())
        assert "PRIVATE KEY" not in text
        wanted = "/w/bundles/" if EDGES[edge].BUNDLES else "/certs/"
        assert wanted + "victim.example" in text


@pytest.mark.parametrize("edge", EDGES)
def test_every_address_and_origin_of_the_world_is_in_the_config(edge, world):
    moved = world.with_ports({"anycast": 9443, "saas": 9080})
    text = "\n".join(render(edge, moved, "default", files_for(moved)).files.values())
    assert "127.0.0.10:9443" in text or "('127.0.0.10', 9443)" in text
    assert "127.0.0.32:9080" in text or "('127.0.0.32', 9080)" in text
