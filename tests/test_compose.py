"""The compose stack without Docker: the file made from the world, and the lab split into a
control plane and followers (edge, resolver, origins), wired as the containers wire them but
in one process, over real sockets. `make compose-test` brings the real stack up."""
from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from lab import compose
from lab.client import probe
from lab.dns import Resolver, query
from lab.edge.native import NativeEdge
from lab.events import Events
from lab.follow import DnsFollower, Follower, Hub, HubControl, Pusher, edge_follower
from lab.origins import Origins
from lab.scenarios import Runner, discover
from lab.state import State
from lab.topology import MODELS, WorldError, parse
from lab.world import load

ROOT = Path(__file__).resolve().parents[1]


# ---- the file -------------------------------------------------------------------------

def test_the_committed_compose_file_is_the_generated_one(world):
    assert (ROOT / "docker-compose.yml").read_text() == compose.render(world), \
        "docker-compose.yml is stale: run `sni-lab compose > docker-compose.yml`"


def test_the_file_is_yaml_saying_what_the_data_says(world):
    assert yaml.safe_load(compose.render(world)) == compose.services(world)


def test_every_actor_keeps_its_number_on_the_bridge(world):
    bw = compose.bridge_world(world)
    net = ipaddress.ip_network(world.compose.subnet)
    pairs = [(a.host, b.host) for a, b in zip(world.listeners + world.origins, bw.listeners + bw.origins)]
    pairs += [(world.resolver.host, bw.resolver.host), (world.control.host, bw.control.host)]
    for local, bridge in pairs:
        assert ipaddress.ip_address(bridge) in net
        assert local.rsplit(".", 1)[1] == bridge.rsplit(".", 1)[1]
    assert {l.port for l in bw.listeners} == {443} and bw.resolver.port == 53
    assert bw.control.port == world.control.port  # published on the host as the same port


def test_only_the_control_plane_is_published_and_only_on_the_hosts_loopback(world):
    svcs = compose.services(world)["services"]
    published = {name: s["ports"] for name, s in svcs.items() if "ports" in s}
    assert published == {"control": [f"127.0.0.1:{world.control.port}:{world.control.port}"]}


def test_fixed_addresses_stay_out_of_dockers_range_and_the_edge_holds_every_listener(world):
    data = compose.services(world)
    (pool,) = data["networks"]["lab"]["ipam"]["config"]
    dynamic = ipaddress.ip_network(pool["ip_range"])
    fixed = [s["networks"]["lab"]["ipv4_address"] for s in data["services"].values() if isinstance(s.get("networks"), dict)]
    edge = data["services"]["edge"]
    aliases = edge["environment"]["LAB_ADDRESSES"].split()
    extra = aliases + data["services"]["control"]["environment"]["LAB_ADDRESSES"].split()
    assert not any(ipaddress.ip_address(a) in dynamic for a in fixed + extra)
    assert len(set(fixed + extra)) == len(fixed + extra)
    bw = compose.bridge_world(world)
    assert {edge["networks"]["lab"]["ipv4_address"], *aliases} == {l.host for l in bw.listeners}
    control = data["services"]["control"]
    vantages = control["environment"]["LAB_ADDRESSES"].split()
    assert vantages == list(bw.vantages) and "NET_ADMIN" in control["cap_add"]  # the verifier's vantage points
    assert set(pool["aux_addresses"].values()) == set(aliases) | set(vantages)  # Docker never hands them out
    assert "NET_ADMIN" in edge["cap_add"]


def test_services_come_up_in_order(world):
    svcs = compose.services(world)["services"]
    for name, s in svcs.items():
        for dep, cond in s.get("depends_on", {}).items():
            assert dep in svcs, f"{name} depends on unknown {dep}"
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in svcs[dep], f"{name} waits for {dep}'s health, which has no check"
    assert svcs["control"]["depends_on"] == {"init": {"condition": "service_completed_successfully"}}
    assert svcs["client"]["dns"] == [compose.bridge_world(world).resolver.host]


def test_a_world_elsewhere_is_mounted_into_every_lab_service(world, tmp_path):
    svcs = compose.services(world, "my-world.toml")["services"]
    for name, s in svcs.items():
        assert f"my-world.toml:{compose.WORLD}:ro" in s["volumes"], name
        if name != "client":
            assert s["command"][-2:] == ["--config", compose.WORLD], name


def _world_with(compose_table: dict, **changes):
    import tomllib

    data = tomllib.loads((ROOT / "lab" / "lab.toml").read_text())
    data["compose"] = compose_table
    for key, value in changes.items():
        data[key] = value
    return parse(data, "w.toml")


@pytest.mark.parametrize("table, says", [
    ({"subnet": "10.213.37.0/33"}, "compose.subnet: not a network"),
    ({"subnet": "8.8.8.0/24"}, "compose.subnet: 8.8.8.0/24: expected a private IPv4 network"),
    ({"subnet": "10.1.2.0/28"}, "expected a private IPv4 network of at least /24"),
    ({"subnet": "127.5.0.0/16"}, "not loopback"),
    ({"edge_port": 0}, "compose.edge_port: out of range"),
    ({"dns_port": "53"}, "compose.dns_port: expected int"),
    ({"bridge": "x"}, "compose.bridge: unknown key"),
])
def test_a_broken_compose_table_is_one_line_naming_the_key(table, says):
    with pytest.raises(WorldError, match="^w.toml: " + ".*" + says.replace("(", r"\(").replace("/", "/")):
        _world_with(table)


def test_an_actor_that_does_not_fit_the_bridge_is_refused_naming_it():
    w = _world_with({})
    far = dataclasses.replace(w, origins=(dataclasses.replace(w.origins[0], host="127.0.0.200"), *w.origins[1:]))
    with pytest.raises(WorldError, match="origin.victim: 127.0.0.200 does not fit the lower half"):
        compose.bridge_world(far)
    shared = dataclasses.replace(w, listeners=(w.listeners[0], dataclasses.replace(w.listeners[1], host="127.0.0.10", port=9443),
                                               *w.listeners[2:]))
    with pytest.raises(WorldError, match="listener saas-v1: bridge address 10.213.37.10 is also listener anycast's"):
        compose.bridge_world(shared)


def test_the_cli_prints_the_file(world, capsys):
    from lab.cli import main

    assert main(["compose"]) == 0
    assert capsys.readouterr().out == compose.render(world)
    assert main(["compose", "victim"]) == 2  # an origin name without --role origin


# ---- the lab split into a control plane and followers ---------------------------------

class Split:
    """Origins, a resolver and an edge that follow a hub's control plane, as in the stack."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path

    async def __aenter__(self) -> "Split":
        from lab.pki import LabCA

        world = load().with_free_ports()
        ca = LabCA.open(self.tmp / "certs", tuple(world.tlds))
        self.resolver_events, self.edge_events, self.origin_events = Events(), Events(), Events()
        self.origins = Origins(world, self.origin_events, ca=ca)
        world = world.with_ports({n: p for n, (_, p) in (await self.origins.start()).items()})
        self.resolver = Resolver(world, self.resolver_events)
        world = world.with_ports({"resolver": (await self.resolver.start())[1]})
        self.edge = NativeEdge(world, self.edge_events, ca)
        world = world.with_ports({n: p for n, (_, p) in (await self.edge.start()).items()})
        self.state = State(self.tmp / "state", exclusive=True)
        self.hub = Hub(world, self.state, ca.cert_path)
        self.control = HubControl(self.hub, "http://127.0.0.1:1", interval=3600)
        self.control.restore()
        host, port = await self.control.start(world.control.host, 0, background=False)
        world = world.with_ports({"control": port})
        self.hub.world = self.hub.world.with_ports({"control": port})
        self.url, self.token, self.world = f"http://{host}:{port}", self.control.token, world
        self.dns = DnsFollower(world, self.resolver)
        self.edge_follower = Follower(self.url, self.token, "edge", edge_follower(world, self.edge))
        self.dns_follower = Follower(self.url, self.token, "resolver", self.dns.apply)
        self.tasks = [asyncio.ensure_future(t) for t in (
            self.edge_follower.run(), self.dns_follower.run(),
            Pusher(self.resolver_events, self.url, self.token, transform=self.dns.hub_event).run(),
            Pusher(self.edge_events, self.url, self.token).run(), Pusher(self.origin_events, self.url, self.token).run())]
        await asyncio.wait_for(asyncio.gather(self.edge_follower.ready.wait(), self.dns_follower.ready.wait()), 10)
        self.http = aiohttp.ClientSession()
        self.endpoints = {
            "model": world.model, "engine": "native", "ca": str(ca.cert_path),
            "edge": [{"name": l.name, "host": l.host, "port": l.port, "zone": l.zone} for l in world.listeners],
            "dns": {"host": world.resolver.host, "port": world.resolver.port},
            "control": {"url": self.url, "token": self.token}}
        self.hub.endpoints = self.endpoints
        return self

    async def __aexit__(self, *exc) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.http.close()
        for part in (self.control, self.edge, self.resolver, self.origins):
            await part.stop()
        self.state.close()

    async def api(self, method: str, path: str, body=None, token: str | None = "", headers=None):
        auth = {"Authorization": f"Bearer {self.token if token == '' else token}"} if token is not None else {}
        async with self.http.request(method, self.url + path, json=body, headers={**auth, **(headers or {})}) as r:
            return r.status, await r.json(), r.headers

    async def get(self, listener: str, sni: str):
        l = self.world.listener_by_name[listener]
        return await probe(l.host, l.port, sni, [{"host": sni, "headers": [("X-Lab-Trace", f"t-{time.monotonic_ns()}")]}],
                           self.endpoints["ca"])

    async def lookup(self, name: str) -> list[str]:
        reply = await query(name, "A", self.world.resolver.host, self.world.resolver.port)
        return [str(rr.rdata) for rr in reply.rr if rr.rtype == 1]

    async def told(self, predicate, within: float = 5.0) -> list[dict]:
        """The hub's events matching `predicate`, once there is one (pushes are asynchronous)."""
        deadline = time.monotonic() + within
        while True:
            _, events, _ = await self.api("GET", "/events?limit=5000")
            found = [e for e in events if predicate(e)]
            if found or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.05)


@pytest.fixture
async def split(tmp_path):
    async with Split(tmp_path) as lab:
        yield lab


async def test_a_poisoning_answers_once_the_resolver_serves_it(split):
    saas_v1 = split.world.listener_by_name["saas-v1"].host
    assert await split.lookup("www.victim.example") == [split.world.listener_by_name["anycast"].host]
    status, made, headers = await split.api("POST", "/dns/overrides", {"name": "www.victim.example", "type": "A",
                                                                        "value": "listener:saas-v1"})
    assert status == 201 and "X-Lab-Followers-Behind" not in headers
    assert await split.lookup("www.victim.example") == [saas_v1]  # no wait: the API waited for the follower
    # the resolver's event reaches the hub, naming the override as the API knows it
    answers = await split.told(lambda e: e["kind"] == "dns.answer" and e.get("poisoned"))
    assert answers and answers[-1]["override"] == made["id"]
    status, _, _ = await split.api("DELETE", f"/dns/overrides/{made['id']}")
    assert status == 200 and await split.lookup("www.victim.example") != [saas_v1]


async def test_records_set_and_deleted_through_the_hub_are_served(split):
    status, _, _ = await split.api("POST", "/dns/records", {"name": "new.newshop.test", "type": "A", "value": ["127.0.0.10"]})
    assert status == 201 and await split.lookup("new.newshop.test") == ["127.0.0.10"]
    status, _, _ = await split.api("POST", "/dns/records", {"name": "new.newshop.test", "type": "CNAME",
                                                             "value": "customers.saas.example"})
    assert status == 201 and await split.lookup("new.newshop.test") == [split.world.listener_by_name["saas-v1"].host]
    status, _, _ = await split.api("DELETE", "/dns/records?name=new.newshop.test&type=CNAME")
    assert status == 200 and await split.lookup("new.newshop.test") == []
    assert split.resolver.records() == split.hub.resolver.records()


async def test_the_model_switch_reaches_the_edge_before_the_answer(split):
    await split.api("POST", "/dns/overrides", {"name": "www.victim.example", "type": "A", "value": "listener:saas-v1"})
    seen = {}
    for model in ("v1", "v1-waf", "v2", "v1"):
        status, _, _ = await split.api("PUT", "/model", {"model": model})
        assert status == 200 and split.edge.world.model == model
        out = await split.get("saas-v1", "www.victim.example")
        seen[model] = (out.responses[0].status, out.responses[0].origin)
    assert seen == {"v1": (200, "saas"), "v1-waf": (403, None), "v2": (200, "victim")}


async def test_the_edges_and_origins_events_make_one_trace_at_the_hub(split):
    out = await split.get("anycast", "www.victim.example")
    assert out.responses[0].origin == "victim"
    decisions = await split.told(lambda e: e["kind"] == "route.decision" and e.get("sni") == "www.victim.example")
    trace = decisions[-1]["trace"]
    hits = await split.told(lambda e: e["kind"] == "origin.hit" and e["trace"] == trace)
    assert [h["origin"] for h in hits] == ["victim"]


async def test_followers_need_the_token_and_cannot_tell_the_hubs_own_events(split):
    status, _, _ = await split.api("GET", "/follow/snapshot?role=edge&after=-1", token=None)
    assert status == 401
    status, _, _ = await split.api("POST", "/follow/events", {"events": []}, token="wrong")
    assert status == 401
    status, body, _ = await split.api("POST", "/follow/events", {"events": [
        {"kind": "hostname.status", "hostname": "www.victim.example", "new": "active"},
        {"kind": "lab.model", "model": "host"}, "not an event", {"kind": "route.decision", "trace": "forged-1"}]})
    assert status == 200 and body == {"told": 1}
    for bad in ({"events": "x"}, [1], None):
        status, _, _ = await split.api("POST", "/follow/events", bad)
        assert status == 400
    status, _, _ = await split.api("GET", "/follow/snapshot?role=edge&after=x")
    assert status == 400


async def test_a_hostname_change_reaches_the_edge_as_that_name_alone(split):
    """O(1) in the hostnames the lab holds: the edge follower's answer names the changed hostname
    only, and its index changes in place (no new world on the edge)."""
    for b in range(20):  # 2,000 hostnames, each list a generation
        status, _, _ = await split.api("POST", "/hostnames", [{"hostname": f"h{b:02d}x{i:02d}.newshop.test"}
                                                              for i in range(100)])
        assert status == 201
    assert len(split.edge.world.hostnames) > 2000
    status, _, _ = await split.api("PUT", "/model", {"model": "host"})  # routes by Host: a registration counts
    answers, worlds = [], []
    real = split.edge_follower.apply
    split.edge_follower.apply = lambda snap: answers.append(snap) or real(snap)
    split.edge.set_world = worlds.append
    before = split.edge.world
    status, made, headers = await split.api("POST", "/hostnames", {"hostname": "one.newshop.test"})
    assert status == 201 and "X-Lab-Followers-Behind" not in headers
    assert [a.get("changes") for a in answers] == [[{"name": "one.newshop.test", "zone": "saas.example",
                                                      "status": "pending"}]]
    assert "hostnames" not in answers[0] and worlds == [] and split.edge.world is before
    assert split.edge.world.hostnames["one.newshop.test"].status == "pending"
    anycast = split.world.listener_by_name["anycast"]
    out = await probe(anycast.host, anycast.port, "app.saas.example", [{"host": "one.newshop.test"}],
                      split.endpoints["ca"])
    assert "host one.newshop.test is a pending custom hostname" in out.response.decision
    status, _, _ = await split.api("DELETE", f"/hostnames/{made['id']}")
    assert status == 200 and answers[-1]["changes"] == [{"name": "one.newshop.test", "status": "deleted"}]
    assert "one.newshop.test" not in split.edge.world.hostnames and worlds == []
    # A model switch is a new world, with the same index.
    status, _, _ = await split.api("PUT", "/model", {"model": "v1"})
    assert status == 200 and len(worlds) == 1 and worlds[0].model == "v1" and worlds[0].hostnames is before.hostnames
    assert answers[-1]["changes"] == []


def test_the_hub_lists_every_hostname_to_a_follower_it_cannot_tell_what_changed():
    from lab.follow import CHANGES_KEPT, Generations

    g = Generations()
    assert g.hostnames_since(-1) is None  # a first poll: everything
    g.bump(["a.test"])
    g.bump()  # a record, an override: no hostname
    g.bump(["b.test", "a.test"])
    assert g.hostnames_since(0) == {"a.test", "b.test"} and g.hostnames_since(2) == {"b.test", "a.test"}
    assert g.hostnames_since(1) == {"a.test", "b.test"} and g.hostnames_since(3) == set()
    for i in range(CHANGES_KEPT):
        g.bump([f"n{i}.test"])
    assert g.hostnames_since(0) is None and g.hostnames_since(3) is not None and len(g.hostnames_since(3)) == 1000
    g.hostnames_replaced()
    assert g.hostnames_since(g.current - 1) is None and g.hostnames_since(g.current) == set()


async def test_a_stopped_follower_is_waited_for_then_not(split):
    """A change waits for a follower that polls; one gone silent is not waited for forever."""
    split.tasks[1].cancel()
    await asyncio.gather(split.tasks[1], return_exceptions=True)
    started = time.monotonic()
    status, _, headers = await split.api("POST", "/dns/overrides", {"name": "victim.example", "type": "A",
                                                                     "value": "listener:saas-v1"})
    assert status == 201 and headers["X-Lab-Followers-Behind"] == "resolver"
    assert time.monotonic() - started < 10


async def test_the_whole_catalog_passes_on_the_split_lab(split):
    world = split.world
    scenarios = discover(None, None, world)
    results = await Runner(split.endpoints, world).run(scenarios, MODELS)
    failed = [f"{r.scenario}[{r.model}]: {r.failure}" for r in results if not r.passed]
    assert failed == [] and len(results) == len(scenarios) * len(MODELS) > 300
