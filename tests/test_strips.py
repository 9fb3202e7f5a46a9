"""The live page's strips (lab/strips.py), folded from events recorded from a real run of the catalog."""
import asyncio
import copy
import random

import pytest

from lab import oracle
from lab.run import Lab
from lab.scenarios import Runner, discover
from lab.strips import INTERNAL, Fold, covers
from lab.world import load

SCENARIOS = ["dns-poison-victim", "h2-attack", "unknown-sni", "waf-blocks-unlisted-host", "custom-hostname-active",
             "keepalive-second-host", "legit-victim"]
MODELS = ("v1", "v1-waf", "v2")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Events, results and a fold fed live (with the lab's world at each event), as the control plane does."""
    tmp = tmp_path_factory.mktemp("strips")

    async def record():
        world = load()
        async with Lab(world.with_free_ports(), tmp / "certs", state_dir=tmp / "state", verify_interval=3600) as lab:
            live = Fold({lab.world.control.host})
            seen = []

            def on_event(e):
                seen.append(e)
                live.add(e, lab.world)

            lab.events.subscribe(on_event)
            results = await Runner(lab.endpoints, lab.world).run(discover(SCENARIOS, world=lab.world), MODELS)
            before_verify = seen[-1]["id"]
            verified = [await lab.control.verify(h) for h in lab.control.state.hostnames(include_deleted=False)]
            verifier = {"verified": verified, "events": [e for e in seen if e["id"] > before_verify]}
            return {"events": list(seen), "results": results, "live": live, "world": lab.world,
                    "verifier": verifier, "endpoints": lab.endpoints}

    return asyncio.run(record())


def requests_of(results):
    return [q for r in results for q in r.requests]


def fold(events, world):
    f = Fold({world.control.host})
    for e in events:
        f.add(e, world)
    return f


def test_a_strip_per_request_tells_what_the_runner_saw(run):
    live, listeners = run["live"], {l["host"]: l["name"] for l in run["endpoints"]["edge"]}
    through_http = [q for q in requests_of(run["results"]) if not q.tls_error]
    assert len(through_http) >= len(SCENARIOS) * len(MODELS)
    for q in through_http:
        s = live.strip("r:" + q.trace)
        assert s is not None, q.trace
        assert (s["verdict"], s["origin"], s["sni"], s["listener"]) == (q.verdict, q.origin, q.sni, listeners[q.address])
        assert s["cert"]["names"] == q.cert_names and s["cert_valid"] == q.cert_valid
        assert s["name"] == q.name
        if q.origin is None:
            assert s["decision"]["status"] == q.status and s["decision"]["origin"] is None
    verdicts = {live.strip("r:" + q.trace)["verdict"] for q in through_http}
    assert verdicts == {oracle.MISROUTED, oracle.SAFE, oracle.REFUSED}


def test_a_failed_handshake_is_a_refused_strip_of_its_connection(run):
    failed = [q for q in requests_of(run["results"]) if q.tls_error]
    strips = [s for s in run["live"].strips(limit=10**6) if s["kind"] == "connection"]
    assert len(strips) == len(failed) == len(MODELS)  # unknown-sni, once per model
    for s in strips:
        assert s["verdict"] == oracle.REFUSED and s["tls_error"].startswith("unrecognized_name")
        assert s["sni"] == "nothing.example" and s["cert"] is None and s["decision"] is None


def test_requests_on_one_connection_share_its_certificate(run):
    keepalive = [r for r in run["results"] if r.scenario == "keepalive-second-host"]
    for case in keepalive:
        a, b = (run["live"].strip("r:" + q.trace) for q in case.requests)
        assert a["conn"] == b["conn"] and a["cert"] == b["cert"]
        assert a["name"] != b["name"]


def test_the_verdict_stays_what_it_was_when_the_setup_is_undone(run):
    """custom-hostname-active's name is active only during its run: judged now, it would be MISROUTED."""
    case = next(r for r in run["results"] if r.scenario == "custom-hostname-active" and r.model == "v2")
    (q,) = case.requests
    assert run["live"].strip("r:" + q.trace)["verdict"] == q.verdict == oracle.SAFE
    assert "www.newshop.test" not in run["world"].hostnames  # the run's undo took it away
    assert fold(run["events"], run["world"]).strip("r:" + q.trace)["verdict"] == oracle.MISROUTED


def test_strips_do_not_depend_on_the_order_of_events(run):
    world = run["world"]
    in_order = fold(run["events"], world).strips(limit=10**6, internal=True)
    shuffled = list(run["events"])
    random.Random(9).shuffle(shuffled)
    assert fold(shuffled, world).strips(limit=10**6, internal=True) == in_order


def test_the_verifier_s_own_queries_leave_no_event_and_no_strip(run):
    verified, after = run["verifier"]["verified"], run["verifier"]["events"]
    assert verified and all(h.checks or h.failures for h in verified), "the verifier asked the lab resolver nothing"
    assert not [e for e in after if e["kind"].startswith("dns.")]
    mine = {e["id"] for e in after}
    before = [e for e in run["events"] if e["id"] not in mine]
    assert fold(run["events"], run["world"]).strips(limit=10**6, internal=True) == \
        fold(before, run["world"]).strips(limit=10**6, internal=True)


def test_the_live_page_s_own_loot_fetch_is_internal():
    world = load()
    f = Fold()
    f.add({"id": 1, "ts": 0.0, "kind": "origin.hit", "trace": INTERNAL + "loot", "origin": "collector",
           "method": "GET", "host": "127.0.0.33", "path": "/collected", "status": 200}, world)
    assert f.strips() == [] and f.strips(internal=True)[0]["internal"]


# ---- joins the recorded run does not make yet: the DNS trace (issue [8]) and the proxy (issue [9]) ----
def _case(run, scenario, model):
    case = next(r for r in run["results"] if r.scenario == scenario and r.model == model)
    (q,) = case.requests
    events = copy.deepcopy(run["events"])
    decision = next(e for e in events if e["kind"] == "route.decision" and e["trace"] == q.trace)
    hello = next(e for e in events if e["kind"] == "tls.clienthello" and e["conn"] == decision["conn"])
    # The query this request's resolve made: the last answer for its name before its connection.
    answer = [e for e in events if e["kind"] == "dns.answer" and e["name"] == "www.victim.example"
              and e["id"] < hello["id"]][-1]
    return events, q, decision, hello, answer


def test_a_dns_answer_joins_the_request_that_names_its_trace(run):
    events, q, decision, hello, answer = _case(run, "dns-poison-victim", "v1")
    answer["trace"] = q.trace  # as the resolver tells it when the client sends the trace in EDNS0
    f = fold(events, run["world"])
    s = f.strip("r:" + q.trace)
    assert s["dns"] == {"name": "www.victim.example", "type": "A", "rcode": "NOERROR", "answers": ["127.0.0.11"],
                        "client": answer["client"], "poisoned": True, "override": answer["override"]}
    assert s["verdict"] == oracle.MISROUTED
    assert not [x for x in f.strips(limit=10**6, internal=True) if x["kind"] == "dns" and x["trace"] == q.trace]


def test_the_proxy_s_tunnel_joins_the_edge_connection_by_address(run):
    events, q, decision, hello, answer = _case(run, "dns-poison-victim", "v1")
    local = "127.0.0.1:50123"
    answer["trace"] = "proxy-query-1"
    hello["peer"] = local  # the edge's view of the proxy's upstream socket
    tunnel = {"id": hello["id"] - 0.5, "ts": hello["ts"], "kind": "proxy.tunnel", "trace": "proxy-query-1",
              "client": "127.0.0.5", "name": "www.victim.example", "port": 8443, "address": "127.0.0.11",
              "poisoned": True, "override": answer["override"], "dns_client": "127.0.0.5", "local": local}
    events.append(tunnel)
    for order in (sorted(events, key=lambda e: e["id"]), list(reversed(events))):
        f = fold(order, run["world"])
        s = f.strip("r:" + q.trace)
        assert s["dns"]["poisoned"] and s["dns"]["answers"] == ["127.0.0.11"]
        assert s["tunnel"]["address"] == "127.0.0.11" and s["client"] == "127.0.0.5"
        assert f.strip("d:proxy-query-1") is None

    hello["peer"] = "127.0.0.1:50124"  # another connection: same name, same time, but no join
    f = fold(events, run["world"])
    assert f.strip("r:" + q.trace)["dns"] is None
    assert f.strip("d:proxy-query-1")["dns"]["name"] == "www.victim.example"


def test_a_flood_costs_history_not_memory(run):
    f = Fold(keep=10)
    base = [e for e in run["events"] if e["kind"] in ("route.decision", "origin.hit")]
    for n in range(200):
        for e in base:
            f.add({**e, "id": e["id"] + n * 10**6, "trace": f"{e['trace']}-{n}"}, run["world"])
    assert 0 < len(f.strips(limit=10**6, internal=True)) <= 20


def test_a_fold_nobody_reads_shows_what_folding_at_once_shows(run):
    # The live page with no page open defers each request's events; read later, the strips are the same,
    # also after more requests than it keeps (a load test on one HTTP/2 connection).
    world = run["world"]
    flood = [e for e in run["events"] if e["kind"] in ("route.decision", "origin.hit")]
    events = list(run["events"]) + [{**e, "id": e["id"] + n * 10**6, "trace": f"{e['trace']}-{n}"}
                                    for n in range(1, 200) for e in flood]
    assert sum(e["kind"] in ("route.decision", "origin.hit") for e in events) > 4 * 1000  # more than it holds back
    for keep in (1000, 50):
        later, at_once = _folded_later_and_at_once(events, world, keep)
        assert later == at_once
        assert len(at_once) == keep


def test_a_fold_nobody_reads_shows_what_folding_at_once_shows_for_new_connections(run):
    # A handshake load: each request on a connection of its own, more connections than the fold keeps,
    # with the run's own (long-lived, and failed) connections first.
    world = run["world"]
    events = run["events"]
    conns = {e["conn"] for e in events if e["kind"] == "route.decision" and e.get("conn")}
    flood = [e for e in events if e["kind"] in ("route.decision", "origin.hit")
             or (e["kind"] in ("tls.clienthello", "tls.cert") and e.get("conn") in conns)]
    flood.sort(key=lambda e: e["id"])
    assert {"tls.clienthello", "tls.cert", "route.decision"} <= {e["kind"] for e in flood}

    def copied(e, n):
        conn = e.get("conn")
        return {**e, "id": e["id"] + n * 10**6, "trace": f"{e['trace']}-{n}",
                **({"conn": f"{conn}-{n}"} if conn else {}), **({"peer": f"{e['peer']}-{n}"} if e.get("peer") else {})}

    events = list(events) + [copied(e, n) for n in range(1, 200) for e in flood]
    assert sum(e["kind"] == "tls.clienthello" for e in events) > 6 * 50  # more than it holds back at keep=50
    for keep in (1000, 50):
        later, at_once = _folded_later_and_at_once(events, world, keep)
        assert later == at_once


def _folded_later_and_at_once(events, world, keep: int):
    """The strips of a fold nobody read while `events` came (deferred), and of one folding each at once."""
    at_once, later = Fold({world.control.host}, keep=keep), Fold({world.control.host}, keep=keep)
    for e in events:
        at_once.add(e, world)
        later.defer(e, world)
    return later.strips(limit=keep, internal=True), at_once.strips(limit=keep, internal=True)


@pytest.mark.parametrize("names, name, covered", [
    (["victim.example", "*.victim.example"], "www.victim.example", True),
    (["victim.example", "*.victim.example"], "victim.example", True),
    (["*.victim.example"], "a.www.victim.example", False),
    (["*.victim.example"], "victim.example", False),
    (["www.victim.example"], None, False),
])
def test_covers(names, name, covered):
    assert covers(names, name) is covered
