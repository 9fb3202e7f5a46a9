"""The custom hostname state machine (issue [4]): a registration routes nothing until its
owner proves control of the name, and DNS pointing at the target is never proof."""
import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.hostnames import (CONCLUSIVE, Evidence, Hostname, HostnameError, Recheck, create, delete, from_world,
                           http_path, routable, txt_name, verify)

TARGET = "customers.saas.example"
POISONED = Evidence(txt=(), http=None, points_to_target=True, dns="A 127.0.0.11 (override)")
_ids = itertools.count(1)


def new(world, name="www.newshop.test", zone="saas.example", existing=(), now=100.0):
    n = next(_ids)
    return create(name, zone, world=world, existing=existing, id=f"h{n}", txt_token=f"txt-{n}",
                  http_token=f"http-{n}", now=now)


def owned_txt(h, points=True, dns="CNAME customers.saas.example"):
    return Evidence(txt=("v=spf1 -all", h.txt_token), http=None, points_to_target=points, dns=dns)


def test_create_is_pending_and_says_what_to_do(world):
    h = new(world, "WWW.NewShop.Test.")
    assert (h.name, h.zone, h.status, h.ownership) == ("www.newshop.test", "saas.example", "pending", None)
    assert h.created == h.updated == 100.0
    assert not routable(h)
    assert txt_name(h.name) == "_sni-lab-custom-hostname.www.newshop.test"
    assert http_path(h) == f"/.well-known/sni-lab-custom-hostname-challenge/{h.id}"
    assert f"add TXT {txt_name(h.name)} = {h.txt_token}" in h.reason
    assert http_path(h) in h.reason and h.http_token in h.reason
    assert h.reason.endswith(f"point www.newshop.test at {TARGET}")
    d = h.to_dict()
    assert d["txt_name"] == txt_name(h.name) and d["http_path"] == http_path(h) and d["routable"] is False
    assert Hostname.from_dict(d) == h
    c = h.as_custom_hostname()
    assert (c.name, c.zone, c.status) == ("www.newshop.test", "saas.example", "pending")


def test_attacker_claiming_the_victim_stays_pending(world):
    # v1 never checked: registering another zone's name is allowed, it just never routes.
    h = new(world, "www.victim.example")
    forged = [
        POISONED,
        Evidence(txt=("txt-guess", h.txt_token.upper(), " " + h.txt_token), http="<html>attacker page</html>",
                 points_to_target=True, dns="CNAME customers.saas.example"),
        Evidence(txt=(), http="", points_to_target=True, dns="A 127.0.0.11"),
        Evidence(txt=(h.http_token,), http=h.txt_token, points_to_target=True, dns="A 127.0.0.11"),
        Evidence(txt=(), http=None, points_to_target=False, dns="A 127.0.0.10"),
    ]
    for i in range(50):
        h, t = verify(h, forged[i % len(forged)], target=TARGET, now=200.0 + i)
        assert t is None and h.status == "pending" and not routable(h)
        assert h.ownership is None
    assert "ownership not proven" in h.reason


def test_not_owned_reason_names_what_was_looked_for_and_found(world):
    h = new(world, "www.victim.example")
    ev = Evidence(txt=("something-else\nsecond line",), http="x" * 500, points_to_target=True, dns="A 127.0.0.11")
    h2, t = verify(h, ev, target=TARGET, now=101.0)
    assert t is None and h2.status == "pending" and h2.updated == 101.0
    assert txt_name(h.name) in h2.reason and h.txt_token in h2.reason and http_path(h) in h2.reason
    assert "something-else?second line" in h2.reason and "A 127.0.0.11" in h2.reason
    assert "\n" not in h2.reason and len(h2.reason) < 400  # one line, evidence truncated
    # Same evidence again: the reason and its time stay; only the schedule moves on.
    h3, t = verify(h2, ev, target=TARGET, now=102.0)
    assert t is None and (h3.reason, h3.updated) == (h2.reason, h2.updated)
    assert dataclasses.replace(h3, checks=h2.checks, next_check=h2.next_check) == h2
    assert h3.checks == h2.checks + 1 and h3.next_check - 102.0 > h2.next_check - 101.0


def test_legit_txt_and_cname_is_active_in_one_verify(world):
    h = new(world)
    h2, t = verify(h, owned_txt(h), target=TARGET, now=150.0)
    assert h2.status == "active" and h2.ownership == "txt" and routable(h2)
    assert h2.updated == 150.0 and h2.created == h.created
    assert t is not None and (t.hostname, t.zone, t.old, t.new) == (h.name, "saas.example", "pending", "active")
    assert t.reason == h2.reason and "TXT" in t.reason and TARGET in t.reason


def test_http_token_proves_ownership(world):
    h = new(world)
    ev = Evidence(txt=(), http=f"  {h.http_token}\n", points_to_target=True, dns="CNAME customers.saas.example")
    h2, t = verify(h, ev, target=TARGET, now=150.0)
    assert h2.status == "active" and h2.ownership == "http" and t.new == "active"


def test_owned_but_not_pointing_stays_pending(world):
    h = new(world)
    h2, t = verify(h, owned_txt(h, points=False, dns="A 203.0.113.9"), target=TARGET, now=150.0)
    assert t is None and h2.status == "pending" and not routable(h2)
    assert h2.reason == (f"ownership proven by TXT; www.newshop.test does not point at {TARGET} yet "
                         "(A 203.0.113.9)")
    h3, t = verify(h2, owned_txt(h), target=TARGET, now=160.0)
    assert h3.status == "active" and t.old == "pending"


def test_active_moves_when_dns_changes_and_comes_back(world):
    h = new(world)
    active, _ = verify(h, owned_txt(h), target=TARGET, now=150.0)
    # Still pointing, token gone: activation does not depend on keeping the TXT.
    same, t = verify(active, Evidence((), None, True, "CNAME customers.saas.example"), target=TARGET, now=151.0)
    assert t is None and dataclasses.replace(same, checks=0, next_check=active.next_check) == active
    # The operator's "verify now": one real answer decides (the background verifier waits, below).
    moved, t = verify(active, Evidence((), None, False, "CNAME elsewhere.example"), target=TARGET, now=160.0,
                      recheck=CONCLUSIVE)
    assert moved.status == "moved" and not routable(moved)
    assert (t.old, t.new) == ("active", "moved")
    assert t.reason == f"DNS no longer points at {TARGET} (CNAME elsewhere.example)"
    still, t = verify(moved, Evidence((), None, False, "NXDOMAIN"), target=TARGET, now=161.0)
    assert still.status == "moved" and t is None and "NXDOMAIN" in still.reason
    # Back at the target but without proof: the name may have changed hands.
    back, t = verify(still, Evidence((), None, True, "CNAME customers.saas.example"), target=TARGET, now=162.0)
    assert back.status == "moved" and t is None and "ownership not proven" in back.reason
    again, t = verify(back, owned_txt(h), target=TARGET, now=170.0)
    assert again.status == "active" and (t.old, t.new) == ("moved", "active") and routable(again)


UNREACHABLE = Evidence((), None, False, "no answer",
                       error="A www.newshop.test: no answer from the lab resolver at 127.0.0.2:5353 (TimeoutError)")
MOVED_AWAY = Evidence((), None, False, "CNAME elsewhere.example")
POINTING = Evidence((), None, True, "CNAME customers.saas.example")


@pytest.mark.parametrize("status", ["pending", "active", "moved"])
def test_a_failed_lookup_is_not_evidence(world, status):
    """Resolver down, timeout, SERVFAIL: the state stays, the error is kept, retries back off."""
    h = dataclasses.replace(new(world), status=status)
    recheck = Recheck(retry=10.0, retry_max=600.0)
    waits = []
    for i in range(12):
        now = 1000.0 + i
        h2, t = verify(h, UNREACHABLE, target=TARGET, now=now, recheck=recheck)
        assert t is None and h2.status == status and h2.reason == h.reason
        assert h2.failures == i + 1 and "no answer from the lab resolver" in h2.last_error
        waits.append(h2.next_check - now)
        h = h2
    assert waits == [10, 20, 40, 80, 160, 320, 600, 600, 600, 600, 600, 600]
    # The first real answer clears the errors and is evidence again: owned and pointing is active.
    h, _ = verify(h, owned_txt(h), target=TARGET, now=2000.0, recheck=recheck)
    assert (h.failures, h.last_error, h.status) == (0, None, "active")
    assert 2000.0 + 0.9 * 86400 <= h.next_check <= 2000.0 + 1.1 * 86400  # back on the schedule: a day


def test_active_is_moved_only_after_negative_answers_in_a_row_over_time(world):
    recheck = Recheck(moved_after=3, moved_span=600.0)
    h = dataclasses.replace(new(world), status="active", ownership="txt")
    # Three negative answers within a minute: not yet (a flapping resolver, a DNS change in flight).
    for now in (100.0, 130.0, 160.0):
        h, t = verify(h, MOVED_AWAY, target=TARGET, now=now, recheck=recheck)
        assert t is None and h.status == "active" and routable(h)
    assert (h.negatives, h.negative_since) == (3, 100.0)
    assert "answer 3 in a row; moved after 3 over at least 600 s" in h.reason
    # An error in between is no answer: it neither counts nor breaks the run.
    h, t = verify(h, UNREACHABLE, target=TARGET, now=400.0, recheck=recheck)
    assert t is None and (h.status, h.negatives) == ("active", 3)
    # A positive answer starts over.
    h, t = verify(h, POINTING, target=TARGET, now=500.0, recheck=recheck)
    assert t is None and (h.status, h.negatives, h.negative_since) == ("active", 0, None)
    for now in (600.0, 900.0, 1199.0):
        h, t = verify(h, MOVED_AWAY, target=TARGET, now=now, recheck=recheck)
        assert t is None and h.status == "active"
    h, t = verify(h, MOVED_AWAY, target=TARGET, now=1200.0, recheck=recheck)
    assert h.status == "moved" and (t.old, t.new) == ("active", "moved") and not routable(h)
    assert (h.negatives, h.negative_since) == (0, None)


def test_deleted_is_terminal(world):
    h = new(world)
    active, _ = verify(h, owned_txt(h), target=TARGET, now=150.0)
    gone, t = delete(active, now=200.0)
    assert gone.status == "deleted" and (t.old, t.new) == ("active", "deleted") and not routable(gone)
    for ev in (owned_txt(h), POISONED, owned_txt(h, points=False)):
        same, t = verify(gone, ev, target=TARGET, now=300.0)
        assert same is gone and t is None
    with pytest.raises(HostnameError, match="already deleted"):
        delete(gone, now=301.0)


def test_duplicate_registration_refused_unless_deleted(world):
    h = new(world)
    with pytest.raises(HostnameError, match="www.newshop.test is already registered .* saas.example"):
        new(world, "www.NEWSHOP.test", existing=[h])
    with pytest.raises(HostnameError, match="already registered"):
        new(world, "www.newshop.test", zone="saas2.example", existing=[h])  # any zone
    gone, _ = delete(h, now=101.0)
    again = new(world, "www.newshop.test", zone="saas2.example", existing=[gone])
    assert again.status == "pending" and again.zone == "saas2.example" and again.id != h.id


def test_world_declared_hostnames_count_unless_state_knows_them(world):
    with pytest.raises(HostnameError, match="shop.customer.example is already registered"):
        new(world, "shop.customer.example")
    seed = from_world(world.hostnames["shop.customer.example"], id="seed1", txt_token="t", http_token="u",
                      now=1.0, source="lab.toml")
    assert seed.status == "active" and seed.ownership == "world" and routable(seed)
    assert seed.reason == "declared active in lab.toml"
    gone, _ = delete(seed, now=2.0)
    assert new(world, "shop.customer.example", existing=[gone]).status == "pending"


@pytest.mark.parametrize("zone,message", [
    ("nope.example", "unknown zone 'nope.example'"),
    ("not a zone", "unknown zone"),
    ("victim.example", "zone victim.example is not a SaaS zone"),
])
def test_unknown_or_non_saas_zone_refused(world, zone, message):
    with pytest.raises(HostnameError, match=message):
        new(world, zone=zone)


def test_zone_names_are_normalised(world):
    assert new(world, "a.newshop.test", zone="SaaS.Example.").zone == "saas.example"


@pytest.mark.parametrize("name,message", [
    ("", "empty host"),
    ("   ", "empty host"),
    ("bad host.example", "bad host"),
    ("-x.example", "bad host"),
    ("*.*.newshop.test", "bad host"),
    ("www.*.newshop.test", "bad host"),
    ("*.test", "not a fully qualified name"),
    ("127.0.0.11", "IP address"),
    ("::1", "IP address"),
    ("localhost", "not a fully qualified name"),
    ("_acme.newshop.test", "underscores"),
    ("www.newshop.com", "outside the lab's TLDs"),
    (("a" * 60 + ".") * 3 + "b" * 40 + ".newshop.test", "too long for its TXT record name"),
    ("app.saas.example", "already a name of zone saas.example"),
    (TARGET, "already a name of zone saas.example"),
])
def test_bad_names_refused(world, name, message):
    with pytest.raises(HostnameError, match=message):
        new(world, name)


def test_another_zones_names_may_be_registered(world):
    # The SaaS provider's own names under another SaaS zone: allowed, pending like any other.
    assert new(world, "app.saas.example", zone="saas2.example").status == "pending"


def test_empty_tokens_are_a_programming_error(world):
    with pytest.raises(ValueError, match="non-empty"):
        create("x.newshop.test", "saas.example", world=world, existing=(), id="x", txt_token="", http_token="h",
               now=0.0)
    # Even a hand-built record with empty tokens is never "proven" by empty evidence.
    h = dataclasses.replace(new(world), txt_token="", http_token="")
    h2, _ = verify(h, Evidence(("",), "", True, "A 127.0.0.11"), target=TARGET, now=1.0)
    assert h2.status == "pending"


# -- property: no evidence without the token ever activates -------------------------

TOKEN_TXT, TOKEN_HTTP = "txt-secret-token", "http-secret-token"
no_token_txt = st.lists(st.text(max_size=30).filter(lambda s: s != TOKEN_TXT), max_size=4).map(tuple)
no_token_http = st.none() | st.text(max_size=30).filter(lambda s: s.strip() != TOKEN_HTTP)
forged_evidence = st.builds(Evidence, txt=no_token_txt, http=no_token_http, points_to_target=st.booleans(),
                            dns=st.text(max_size=40))


def _hostname(world, status):
    h = create("www.victim.example", "saas.example", world=world, existing=(), id="p", txt_token=TOKEN_TXT,
               http_token=TOKEN_HTTP, now=0.0)
    return dataclasses.replace(h, status=status)


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from(["pending", "moved", "deleted"]), evidence=st.lists(forged_evidence, max_size=20))
def test_no_forged_evidence_ever_activates(world, start, evidence):
    h = _hostname(world, start)
    for i, ev in enumerate(evidence):
        h, t = verify(h, ev, target=TARGET, now=float(i + 1))
        assert h.status != "active" and not routable(h)
        assert t is None or t.new != "active"
        assert "\n" not in h.reason


@settings(max_examples=300, deadline=None)
@given(start=st.sampled_from(["pending", "active", "moved"]), evidence=st.lists(
    st.builds(Evidence, txt=st.lists(st.text(max_size=30), max_size=3).map(tuple), http=st.none() | st.text(max_size=30),
              points_to_target=st.booleans(), dns=st.text(max_size=40), error=st.text(min_size=1, max_size=60)),
    max_size=20))
def test_no_failed_lookup_ever_changes_a_status(world, start, evidence):
    h = _hostname(world, start)
    for i, ev in enumerate(evidence):
        h, t = verify(h, ev, target=TARGET, now=float(i + 1), recheck=CONCLUSIVE)
        assert t is None and h.status == start and "\n" not in h.last_error


def test_vantage_points_that_disagree_are_no_evidence(world):
    from lab.hostnames import agree

    h = new(world, "www.victim.example")
    forged = dataclasses.replace(owned_txt(h), poisoned=("ovr-1", "ovr-2"))
    honest = Evidence(txt=(), http=None, points_to_target=False, dns="A 127.0.0.10")
    ev = agree({"127.0.0.41": forged, "127.0.0.42": honest, "127.0.0.43": honest})
    assert ev.error.startswith("not evidence: the vantage points disagree on TXT, DNS target")
    assert ev.poisoned == ("ovr-1", "ovr-2")
    h2, t = verify(h, ev, target=TARGET, now=200.0)
    assert t is None and h2.status == "pending" and h2.failures == 1
    # an active name is not moved by one poisoned vantage point either
    active, _ = verify(h, owned_txt(h), target=TARGET, now=200.0, recheck=CONCLUSIVE)
    gone = agree({"a": Evidence(txt=(), http=None, points_to_target=False, dns="A 127.0.0.66"), "b": owned_txt(h)})
    assert verify(active, gone, target=TARGET, now=300.0, recheck=CONCLUSIVE)[0].status == "active"
    # agreement is evidence, whatever order the TXT strings came in
    same = agree({"a": owned_txt(h), "b": dataclasses.replace(owned_txt(h), txt=tuple(reversed(owned_txt(h).txt)))})
    assert same.error is None and verify(h, same, target=TARGET, now=400.0)[0].status == "active"


def test_a_forged_activation_is_recorded_for_the_oracle_only(world):
    h = new(world, "www.victim.example")
    h, t = verify(h, dataclasses.replace(owned_txt(h), poisoned=("ovr-7",)), target=TARGET, now=200.0)
    assert h.status == "active" and t.new == "active" and h.poisoned_by == "ovr-7"
    assert h.as_custom_hostname().poisoned_by == "ovr-7"
    honest, _ = verify(new(world), owned_txt(new(world)), target=TARGET, now=200.0)
    assert honest.poisoned_by is None


def test_a_blocked_name_is_registered_blocked_and_stays_blocked(world):
    h = new(world, "www.bank.test")
    assert h.status == "blocked" and "block list" in h.reason and not routable(h)
    assert verify(h, owned_txt(h), target=TARGET, now=200.0) == (h, None)
    h, t = delete(h, now=300.0)
    assert (t.old, t.new) == ("blocked", "deleted")
    assert new(world, "bank.test").status == "blocked" and new(world, "notbank.test").status == "pending"


def test_a_wildcard_is_proven_at_its_base_by_txt_only(world):
    h = new(world, "*.newshop.test")
    assert txt_name(h.name) == "_sni-lab-custom-hostname.newshop.test"
    assert h.http_token not in h.reason and h.reason.endswith(f"point *.newshop.test at {TARGET}")
    by_http = Evidence(txt=(), http=h.http_token, points_to_target=True, dns="CNAME customers.saas.example")
    assert verify(h, by_http, target=TARGET, now=200.0)[0].status == "pending"
    assert verify(h, owned_txt(h), target=TARGET, now=200.0)[0].status == "active"


def test_served_by_edge(world):
    from lab.hostnames import served_by_edge

    assert served_by_edge(world, new(world, "www.victim.example"))
    assert served_by_edge(world, new(world, "*.victim.example"))  # its base is a zone's own host
    assert not served_by_edge(world, new(world, "www.newshop.test"))


def test_the_pending_schedule_is_cloudflares_backoff():
    """Cloudflare's published table: 60 s growing 5% a check for ten, then 15%, capped at 4 h."""
    r = Recheck()
    assert [r.pending(n) for n in range(12)] == [60, 63, 66, 69, 72, 76, 80, 84, 88, 93, 242, 279]
    assert r.pending(39) < 14400 == r.pending(40) == r.pending(75) == r.pending(10 ** 6)


def test_the_background_schedule_over_a_week(world):
    """Asked at each next_check: a pending hostname gets Cloudflare's 75 checks in 7 days, ten of
    them in its first 20 minutes; an active one whose DNS leaves is asked again the next day,
    then moved 600 s (three negative answers) later."""
    h = new(world, now=0.0)
    times = []
    while h.next_check < 7 * 86400:
        times.append(h.next_check)
        h, t = verify(h, MOVED_AWAY, target=TARGET, now=h.next_check)
        assert t is None and h.status == "pending"
    assert 74 <= len(times) <= 76 and sum(1 for x in times if x <= 20 * 60) >= 10
    active, _ = verify(h, owned_txt(h), target=TARGET, now=times[-1] + 1)
    assert 0.9 * 86400 <= active.next_check - (times[-1] + 1) <= 1.1 * 86400
    h, asked = active, []
    while h.status == "active":
        asked.append(h.next_check)
        h, t = verify(h, MOVED_AWAY, target=TARGET, now=h.next_check)
    assert h.status == "moved" and t.new == "moved" and len(asked) == 3 and asked[-1] - asked[0] == 600
    assert h.next_check - asked[-1] == 60  # and back on the pending schedule, from its start
