"""The oracle alone: verdicts from an outcome and the world, never from expectations."""
import pytest

from lab.oracle import MISROUTED, REFUSED, SAFE, authorized_origins, judge, name_asked, worst
from lab.topology import CustomHostname


def test_name_asked_prefers_host_over_sni():
    assert name_asked("shop.customer.example", "WWW.victim.example.:443") == "www.victim.example"
    assert name_asked("www.victim.example", None) == "www.victim.example"
    assert name_asked(None, None) is None


def test_authorized_origins(world):
    assert authorized_origins(world, "www.victim.example") == {"victim"}
    assert authorized_origins(world, "other.victim.example") == {"victim"}  # the zone owns it, served or not
    assert authorized_origins(world, "shop.customer.example") == {"saas"}  # active custom hostname
    assert authorized_origins(world, "nothing.test") == set()


@pytest.mark.parametrize("status", ["pending", "moved", "deleted"])
def test_a_registration_alone_authorizes_nothing(world, status):
    w = world.with_hostnames(world.custom_hostnames + (CustomHostname("www.newshop.test", "saas.example", status),))
    assert judge(w, "www.newshop.test", reached_origin="saas", cert_valid=True)[0] == MISROUTED


@pytest.mark.parametrize("status", ["pending", "moved"])
def test_a_registration_under_another_zone_leaves_the_name_to_that_zone(world, status):
    # What `host` routes on a registration alone: the zone that owns the name is still its owner.
    w = world.with_hostnames(world.custom_hostnames + (CustomHostname("login.victim.example", "saas.example", status),))
    assert authorized_origins(w, "login.victim.example") == {"victim"}
    verdict, why = judge(w, "login.victim.example", reached_origin="saas", cert_valid=True)
    assert verdict == MISROUTED and why.endswith("login.victim.example belongs to victim")


def test_the_write_up_is_misrouted(world):
    verdict, why = judge(world, "www.victim.example", reached_origin="saas", cert_valid=True)
    assert verdict == MISROUTED and "belongs to victim" in why


def test_domain_fronting_is_safe_not_a_victim(world):
    assert judge(world, "www.victim.example", reached_origin="saas", cert_valid=False)[0] == SAFE


def test_refusals(world):
    assert judge(world, "www.victim.example", reached_origin=None, cert_valid=True)[0] == REFUSED
    assert judge(world, "www.victim.example", reached_origin="saas", cert_valid=True, tls_failed=True)[0] == REFUSED


def test_worst():
    assert worst([SAFE, MISROUTED, REFUSED]) == MISROUTED and worst([REFUSED, SAFE]) == SAFE and worst([]) == REFUSED
