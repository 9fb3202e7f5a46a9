"""Many custom hostnames (issue [13]): a change of one is O(1) rows and never a new world, the
list is paged, a batch is all or nothing, the edge learns a name by name, and the verifier
asks only about the hostnames whose check is due. Real lab, real sockets; counts, not timings."""
import asyncio
import contextlib
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time

import aiohttp
import pytest

from lab import policy
from lab.client import probe
from lab.edge.certstore import CertStore
from lab.hostnames import Hostname, from_world
from lab.run import Lab, write_endpoints
from lab.state import State
from lab.topology import CustomHostname, Hostnames, World

ZONE = "saas.example"


def seeded(i: int, status: str = "pending", now: float = 1000.0) -> Hostname:
    return Hostname(f"ch-seed{i:06d}", f"h{i:06d}.newshop.test", ZONE, status, f"txt-{i}", f"http-{i}", "seeded",
                    now, now, "txt" if status == "active" else None)


@contextlib.asynccontextmanager
async def lab_with(tmp_path, world, certs, hostnames):
    """A lab whose state holds `hostnames` (written before it starts) besides the world's."""
    state = tmp_path / "state"
    declared = [from_world(c, id=f"ch-world{i}", txt_token=f"t{i}", http_token=f"h{i}", now=time.time())
                for i, c in enumerate(world.custom_hostnames)]
    with State(state) as st:
        st.add_hostnames(declared + list(hostnames))
    async with Lab(world.with_free_ports(), certs, state_dir=state, verify_in_background=False) as lab:
        yield lab


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


async def api(lab, method, path, body=None):
    ep = lab.endpoints["control"]
    async with aiohttp.ClientSession() as s:
        async with s.request(method, ep["url"] + path, json=body,
                             headers={"Authorization": f"Bearer {ep['token']}"}) as r:
            return r.status, await r.json()


async def _one_of_each(lab, name):
    """Add, verify now, delete one hostname through the API, counting what each asks of SQLite."""
    counted = {}
    for step, (method, path, body, status) in {
        "add": ("POST", "/hostnames", {"hostname": name, "zone": ZONE}, 201),
        "verify": ("POST", f"/hostnames/{name}/verify", None, 200),
        "delete": ("DELETE", f"/hostnames/{name}", None, 200),
    }.items():
        with lab.state.counting() as seen:
            got, body = await api(lab, method, path, body)
        assert got == status, body
        counted[step] = seen
    return counted


async def test_a_change_of_one_hostname_reads_and_writes_the_same_rows_at_100_and_10k(tmp_path, world, certs,
                                                                                       monkeypatch):
    """The acceptance test of issue [13]: the same SQL statements, and the same work inside SQLite
    (virtual-machine steps: a scan costs some per row, an index seek a constant few), whether the
    lab holds 100 or 10,000 hostnames; no new World, no world set on the edge; and the edge routes
    the new name at once (under `host`, which routes a registration)."""
    made: list[int] = []
    real = World.with_hostnames
    monkeypatch.setattr(World, "with_hostnames", lambda self, hs: made.append(1) or real(self, hs))
    counts = {}
    for n in (100, 10_000):
        async with lab_with(tmp_path / str(n), world, certs, [seeded(i) for i in range(n)]) as lab:
            assert len(lab.world.hostnames) == n + len(world.hostnames)
            lab.set_model("host")
            set_worlds: list[World] = []
            monkeypatch.setattr(lab, "set_world", set_worlds.append)
            made.clear()
            name = "www.newshop.test"
            added = await _one_of_each(lab, name)
            assert made == [] and set_worlds == [], "a change of one hostname made a new world"
            counts[n] = added
            # The name reached the edge by name: registered, then deleted.
            assert lab.world.hostnames.get(name) is None and lab.state.hostname(name).status == "deleted"
            await api(lab, "DELETE", f"/hostnames/{name}?purge=1")
            await api(lab, "POST", "/hostnames", {"hostname": name, "zone": ZONE})
            anycast = lab.world.listener_by_name["anycast"]
            out = await probe(anycast.host, anycast.port, "app.saas.example", [{"host": name}], lab.endpoints["ca"])
            assert out.response.origin == "saas" and f"host {name} is a pending custom hostname" in out.response.decision
    for step in ("add", "verify", "delete"):
        small, big = counts[100][step], counts[10_000][step]
        assert [_shape(q) for q in small["statements"]] == [_shape(q) for q in big["statements"]], step
        assert 0 < big["steps"] <= small["steps"] * 1.1 + 20, (step, small["steps"], big["steps"])
    # What an add is: the row and its event, in one transaction (the name's live registration
    # is looked up in the world's index, a dict).
    assert [s.split()[0] for s in counts[10_000]["add"]["statements"]] == ["BEGIN", "INSERT", "INSERT", "COMMIT"]


def _shape(sql: str) -> str:
    """A statement without its values (the trace shows them bound)."""
    return re.sub(r"'(?:[^']|'')*'|\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b|NULL", "?", sql)


async def test_the_list_is_paged_and_filtered(tmp_path, world, certs):
    hostnames = [seeded(i, "active" if i % 10 == 0 else "pending") for i in range(250)]
    async with lab_with(tmp_path, world, certs, hostnames) as lab:
        seen, cursor, pages = [], None, 0
        while True:
            status, page = await api(lab, "GET", f"/hostnames?limit=100{'&cursor=' + cursor if cursor else ''}")
            assert status == 200 and len(page["hostnames"]) <= 100
            seen += [h["name"] for h in page["hostnames"]]
            pages += 1
            cursor = page["next"]
            if cursor is None:
                break
        everything = list(lab.state.edge_hostnames())  # the live names, in the order they were saved
        assert seen == everything and pages == 3 and len(seen) == 251  # and the world's shop.customer.example
        status, page = await api(lab, "GET", "/hostnames")
        assert len(page["hostnames"]) == 100 and page["next"] is not None  # a page by default, never everything
        status, page = await api(lab, "GET", "/hostnames?status=active&limit=1000")
        assert {h["status"] for h in page["hostnames"]} == {"active"} and len(page["hostnames"]) == 26
        status, page = await api(lab, "GET", "/hostnames?status=active,pending&prefix=H00001&zone=SAAS.example")
        assert [h["name"] for h in page["hostnames"]] == [f"h{i:06d}.newshop.test" for i in range(10, 20)]
        for query, error in (("limit=0", "field 'limit': must be at least 1"),
                             ("limit=1001", "field 'limit': must be at most 1000"),
                             ("status=actve", "parameter 'status': 'actve' is not one of"),
                             ("cursor=abc", "parameter 'cursor': 'abc' is not a cursor"),
                             ("colour=red", "unknown field(s): 'colour'")):
            status, body = await api(lab, "GET", f"/hostnames?{query}")
            assert status == 400 and error in body["error"], (query, body)


async def test_a_list_of_registrations_is_all_or_nothing(tmp_path, world, certs):
    async with lab_with(tmp_path, world, certs, [seeded(0)]) as lab:
        before = lab.state.hostnames()
        names = [f"b{i}.newshop.test" for i in range(5)]
        for items, error in (
            ([{"hostname": n} for n in names] + [{"hostname": "h000000.newshop.test"}],
             "item 5: h000000.newshop.test is already registered as a custom hostname of saas.example (pending)"),
            ([{"hostname": n} for n in names] + [{"hostname": names[1].upper()}],
             "item 5: b1.newshop.test is already registered as a custom hostname of saas.example (pending)"),
            ([{"hostname": n} for n in names[:2]] + [{"hostname": "www.example.org"}],
             "item 2: www.example.org is outside the lab's TLDs"),
            ([{"hostname": names[0]}, {"zone": ZONE}], "item 1: missing field(s): hostname"),
            ([{"hostname": names[0]}, "b2.newshop.test"], "item 1: body must be a JSON object"),
            ([], "expected an object or a list of 1 to 100 objects, got 0 items"),
            ([{"hostname": f"x{i}.newshop.test"} for i in range(101)], "got 101 items"),
        ):
            status, body = await api(lab, "POST", "/hostnames", items)
            assert status == 400 and error in body["error"], body
            assert lab.state.hostnames() == before and all(n not in lab.world.hostnames for n in names)
        status, body = await api(lab, "POST", "/hostnames", [{"hostname": n} for n in names] + [
            {"hostname": "x.bank.test", "zone": ZONE}])
        assert status == 201 and [h["status"] for h in body["hostnames"]] == ["pending"] * 5 + ["blocked"]
        assert [lab.world.hostnames[n].status for n in names] == ["pending"] * 5
        told = [e for e in lab.events.since(0) if e["kind"] == "hostname.status" and e["old"] is None]
        assert {e["hostname"] for e in told} >= {*names, "x.bank.test"}
        longest = [{"hostname": f"{'y' * 60}.{'z' * 60}.{'w' * 60}{i}.newshop.test", "zone": ZONE} for i in range(100)]
        status, body = await api(lab, "POST", "/hostnames", longest)
        assert status == 201 and len(body["hostnames"]) == 100  # the longest list, of long names


async def test_adds_that_arrive_together_are_one_commit_each_answered_on_its_own(tmp_path, world, certs):
    """Requests whose handlers reach the save in one turn of the loop share a transaction (a
    commit is most of an add's time on the loop the edge shares); a refused one fails alone."""
    async with lab_with(tmp_path, world, certs, [seeded(0)]) as lab:
        control = lab.control
        requests = [[{"hostname": "t0.newshop.test", "zone": ZONE}], [{"hostname": "h000000.newshop.test", "zone": ZONE}],
                    [{"hostname": f"t{i}.newshop.test", "zone": ZONE} for i in (1, 2)],
                    [{"hostname": "T0.newshop.test", "zone": ZONE}], [{"hostname": "t3.newshop.test", "zone": ZONE}]]
        with lab.state.counting() as seen:
            got = await asyncio.gather(*(control._register(r) for r in requests), return_exceptions=True)
        assert [s.split()[0] for s in seen["statements"]].count("COMMIT") == 1
        assert [[h.name for h in g] if isinstance(g, list) else g.status for g in got] == [
            ["t0.newshop.test"], 400, ["t1.newshop.test", "t2.newshop.test"], 400, ["t3.newshop.test"]]
        assert "already registered" in str(got[1]) and "already registered" in str(got[3])
        told = [e for e in lab.events.since(0) if e["kind"] == "hostname.status" and e["hostname"].startswith("t")]
        assert [e["hostname"] for e in told] == [f"t{i}.newshop.test" for i in range(4)]
        assert [e["id"] for e in lab.events.since(0)] == sorted(e["id"] for e in lab.events.since(0))
        # A name the index does not know but the database holds (what a race past create() would
        # leave): the shared commit fails, so each request is saved alone, and only that one fails.
        lab.state.add_hostnames([Hostname("ch-race", "race.newshop.test", ZONE, "pending", "t", "h", "r", 1.0, 1.0)])
        got = await asyncio.gather(*(control._register([{"hostname": n, "zone": ZONE}]) for n in
                                     ("u1.newshop.test", "race.newshop.test", "u2.newshop.test")), return_exceptions=True)
        assert [g[0].name if isinstance(g, list) else type(g).__name__ for g in got] == [
            "u1.newshop.test", "HostnameError", "u2.newshop.test"]
        assert lab.state.hostname("u2.newshop.test").status == "pending" and "u2.newshop.test" in lab.world.hostnames
        assert lab.state.hostname("race.newshop.test").id == "ch-race"


async def test_a_bug_in_the_shared_save_fails_every_waiting_add_and_keeps_the_next_working(tmp_path, world, certs,
                                                                                          monkeypatch):
    async with lab_with(tmp_path, world, certs, [seeded(0)]) as lab:
        control, real_save = lab.control, lab.control._save
        monkeypatch.setattr(control, "_save", lambda hostnames: 1 / 0)
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)  # the bug is also logged
        got = await asyncio.wait_for(asyncio.gather(*(control._register([{"hostname": n, "zone": ZONE}])
                                                      for n in ("b1.newshop.test", "b2.newshop.test")),
                                                    return_exceptions=True), 5)
        assert [type(g).__name__ for g in got] == ["ZeroDivisionError"] * 2
        assert lab.state.hostname("b1.newshop.test") is None and "b1.newshop.test" not in lab.world.hostnames
        monkeypatch.setattr(control, "_save", real_save)
        assert [h.name for h in await control._register([{"hostname": "b1.newshop.test", "zone": ZONE}])] == [
            "b1.newshop.test"]


async def test_an_add_waits_out_another_threads_write_with_the_loop_free(tmp_path, world, certs):
    """The event sink writes its batch from a worker thread; an add that comes meanwhile does not
    wait for the state's lock on the loop (the edge's too): it is saved once the batch is done."""
    async with lab_with(tmp_path, world, certs, []) as lab:
        writing, done = threading.Event(), threading.Event()

        def slow_batch() -> None:  # a write of another thread, held open until the test says
            if threading.current_thread() is not threading.main_thread():
                writing.set()
                done.wait(10)

        lab.state.before_write = slow_batch
        other = asyncio.ensure_future(asyncio.to_thread(lab.state.set, "note", "from a worker"))
        while not writing.is_set():
            await asyncio.sleep(0.001)
        add = asyncio.ensure_future(lab.control._register([{"hostname": "wait.newshop.test", "zone": ZONE}]))
        turns = 0
        for _ in range(50):  # the loop keeps turning (it would hang here if the add held it)
            await asyncio.sleep(0.001)
            turns += 1
        assert turns == 50 and not add.done() and "wait.newshop.test" not in lab.world.hostnames
        done.set()
        assert [h.name for h in await add] == ["wait.newshop.test"] and await other is None
        assert lab.state.hostname("wait.newshop.test").status == "pending"


def test_with_checkpoints_apart_a_commit_only_appends_and_the_checkpointer_copies(tmp_path):
    """What `sni-lab up` does (lab.run): the commits of adds never copy the WAL into the database
    themselves (the one past SQLite's threshold would, while the loop waits); checkpoint() does."""
    held = {}
    for apart in (False, True):
        with State(tmp_path / str(apart)) as st:
            if apart:
                st.checkpoint_apart()
            for i in range(300):  # some 3,000 WAL pages: three times SQLite's threshold
                st.add_hostnames([seeded(i)])
            held[apart] = st.checkpoint()
            assert len(st.hostnames()) == 300
    assert held[False] < 1100 < 2000 < held[True]  # SQLite's own: every 1,000 pages, by a commit


async def test_the_verifier_asks_only_about_what_is_due_the_longest_due_first(tmp_path, world, certs):
    now = [10_000.0]
    due = [dataclasses.replace(seeded(i), next_check=t) for i, t in enumerate((9_000.0, 9_999.0, 10_001.0, None,
                                                                               5_000.0))]
    async with lab_with(tmp_path, world, certs, due) as lab:
        lab.control.clock = lambda: now[0]
        world_seed = lab.state.hostname("shop.customer.example")
        assert world_seed.next_check > time.time() + 0.8 * 86400  # an active one: about a day away
        checked = await lab.control.verify_due(limit=3)
        assert checked == 3
        after = {h.name: h for h in lab.state.hostnames()}
        asked = [h.name for h in due if after[h.name].checks]
        # NULL (never scheduled) first, then by next_check: 5,000 and 9,000; 9,999 waits for the next round.
        assert asked == ["h000000.newshop.test", "h000003.newshop.test", "h000004.newshop.test"]
        for name in asked:  # NXDOMAIN is a real answer: back on the pending schedule, 63 s after the first
            assert after[name].status == "pending" and after[name].next_check == now[0] + 63
        assert await lab.control.verify_due(limit=10) == 1  # h000001; h000002 is not due until 10,001
        now[0] = 10_001.0
        assert await lab.control.verify_due(limit=10) == 1
        assert await lab.control.verify_due(limit=10) == 0


def test_the_index_changes_one_name_at_a_time():
    index = Hostnames([CustomHostname("a.newshop.test", ZONE, "active"), CustomHostname("b.newshop.test", ZONE)])
    assert index.active(ZONE) == ("a.newshop.test",) and len(index) == 2
    index.put(CustomHostname("b.newshop.test", ZONE, "active"))
    index.put(CustomHostname("a.newshop.test", ZONE, "moved"))
    assert index.active(ZONE) == ("b.newshop.test",) and index["a.newshop.test"].status == "moved"
    index.put(CustomHostname("b.newshop.test", ZONE, "deleted"))  # history, not a claim
    assert "b.newshop.test" not in index and index.active(ZONE) == ()
    index.discard("a.newshop.test")
    assert len(index) == 0


def test_certificates_follow_the_index_by_name(world, ca):
    """The store holds the zones' certificates from the start and a custom hostname's from its first
    handshake, and serves it only while the index says active; the policy's priority holds."""
    live = world.with_hostnames([*world.custom_hostnames, CustomHostname("www.newshop.test", ZONE, "active"),
                                 CustomHostname("victim.example", ZONE, "active")])
    store = CertStore(ca)
    store.load(live)
    assert set(store.names()) == {(z.name, f"*.{z.name}") for z in world.zones}  # no custom one issued yet
    assert store.lookup(b"www.newshop.test").names == ("www.newshop.test",)
    assert store.lookup("shop.customer.example").names == ("shop.customer.example",)
    assert store.lookup("victim.example").names == ("victim.example", "*.victim.example")  # the zone's apex wins
    assert store.lookup("www.victim.example").names == ("victim.example", "*.victim.example")
    live.hostnames.put(CustomHostname("www.newshop.test", ZONE, "moved"))
    assert store.lookup("www.newshop.test") is None and policy.certificate_for(live, "www.newshop.test") is None
    assert ("www.newshop.test",) not in policy.certificate_names(live)
    live.hostnames.put(CustomHostname("*.newshop.test", ZONE, "active"))
    assert store.lookup("www.newshop.test").names == ("*.newshop.test",)  # the one wildcard that covers it


async def test_the_cli_lists_a_page_and_says_how_to_see_the_next(tmp_path, world, certs):
    async with lab_with(tmp_path, world, certs, [seeded(i, "active" if i % 2 else "pending") for i in range(7)]) as lab:
        write_endpoints(tmp_path / "state", lab.endpoints)

        def cli(*args):
            return subprocess.run([sys.executable, "-m", "lab", "hostnames", "list", "--state", str(tmp_path / "state"),
                                   *args], capture_output=True, text=True, timeout=60)

        page = await asyncio.to_thread(cli, "--limit", "2", "--status", "pending")
        assert page.returncode == 0, page.stderr
        shown = [line.split()[0] for line in page.stdout.splitlines() if line.startswith("h0")]
        assert shown == ["h000000.newshop.test", "h000002.newshop.test"]
        more = page.stdout.splitlines()[-1]
        assert more.startswith("more: sni-lab hostnames list --status=pending --limit=2 --cursor ")
        rest = await asyncio.to_thread(cli, *more.removeprefix("more: sni-lab hostnames list ").split()[:-2])
        assert [line.split()[0] for line in rest.stdout.splitlines() if line.startswith("h0")] == \
            ["h000004.newshop.test", "h000006.newshop.test"] and "more:" not in rest.stdout
        every = json.loads((await asyncio.to_thread(cli, "--all", "--limit", "3", "--json")).stdout)
        assert every["next"] is None and len(every["hostnames"]) == 8  # and shop.customer.example
        bad = await asyncio.to_thread(cli, "--status", "actve")
        assert bad.returncode == 2 and "'actve' is not one of" in bad.stderr and "Traceback" not in bad.stderr
        bad = await asyncio.to_thread(cli, "--limit", "0")
        assert bad.returncode == 2 and "expected 1 to 1000" in bad.stderr
