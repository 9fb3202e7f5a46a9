"""Real edges (nginx, Caddy, HAProxy, mitmproxy) serving the world's listeners in front of the
lab's origins: the write-up's attack lands under `default` and not under `fixed`, legitimate
requests reach their origins under both, and the edge process never outlives its context.
Each test is skipped, with the reason, when its edge is not installed."""
import asyncio
import os
import socket
import stat
import tomllib

import pytest
import pytest_asyncio

from lab.client import probe
from lab.edges import EDGES, FLAVOURS
from lab.edges.process import EdgeError, available, check, prepare, running
from lab.oracle import MISROUTED, judge
from lab.policy import certificate_names
from lab.run import Lab
from lab.topology import default_path, parse
from tests.test_edges import other_world

on_lab = pytest.mark.asyncio(loop_scope="module")  # the module's lab runs on the module's loop
CHECKED = [e for e in EDGES if EDGES[e].check()]  # mitmdump has no config check of its own


def need(edge: str) -> None:
    reason = available(edge)
    if reason:
        pytest.skip(reason)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(world):
    """The lab without its own edge: origins, resolver and control plane, listeners' ports free
    (not the world file's 8443: a lab the user has running there must not meet these edges)."""
    async with Lab.ephemeral(world.with_free_ports(), run_edge=False) as running_lab:
        yield running_lab


async def ask(lab, started, listener: str, sni: str, host: str, http2: bool):
    l = next(l for l in started.listeners if l["name"] == listener)
    return await probe(l["host"], l["port"], sni, [{"host": host}], lab.endpoints["ca"], http2=http2)


def verdict(lab, outcome, name: str) -> str:
    r = outcome.response
    return judge(lab.world, name, reached_origin=r.origin if r else None, cert_valid=outcome.cert_valid_for(name),
                 tls_failed=outcome.tls_error is not None)[0]


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)  # the edge's whole group: nginx's workers too
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("edge", CHECKED)
def test_generated_config_passes_the_edges_own_check(edge, flavour, world, ca, tmp_path):
    need(edge)
    check(prepare(edge, world, flavour, ca, tmp_path), tmp_path)


BROKEN = {"nginx": ("this_is_not_a_directive on;\n", 'unknown directive "this_is_not_a_directive"'),
          "caddy": ("{", "invalid character"),
          "haproxy": ("this_is_not_a_keyword\n", "this_is_not_a_keyword")}


@pytest.mark.parametrize("edge", CHECKED)
def test_a_broken_config_is_refused_in_the_edges_own_words(edge, world, ca, tmp_path):
    need(edge)
    rendered = prepare(edge, world, "fixed", ca, tmp_path)
    junk, said = BROKEN[edge]
    with open(tmp_path / rendered.main, "a") as f:
        f.write(junk)
    with pytest.raises(EdgeError, match="rejected its config") as e:
        check(rendered, tmp_path)
    assert said in str(e.value)


@on_lab
@pytest.mark.parametrize("edge", EDGES)
async def test_default_flavour_lands_the_write_ups_attack(edge, lab):
    need(edge)
    async with running(edge, lab.world, "default", lab.ca) as started:
        for http2 in (False, True):
            out = await ask(lab, started, "saas-v1", "www.victim.example", "www.victim.example", http2)
            assert out.alpn == ("h2" if http2 else "http/1.1")
            assert out.cert_valid_for("www.victim.example"), out
            assert out.response.origin == "saas" and b"document.cookie" in out.response.body  # the attacker's page
            assert verdict(lab, out, "www.victim.example") == MISROUTED


@on_lab
@pytest.mark.parametrize("edge", EDGES)
async def test_fixed_flavour_keeps_the_attack_from_the_saas_origin(edge, lab):
    need(edge)
    async with running(edge, lab.world, "fixed", lab.ca) as started:
        for http2 in (False, True):
            out = await ask(lab, started, "saas-v1", "www.victim.example", "www.victim.example", http2)
            assert out.response is None or out.response.origin != "saas", out
            assert verdict(lab, out, "www.victim.example") != MISROUTED


LEGIT = [("saas-v1", "app.saas.example", "saas"), ("saas-v1", "shop.customer.example", "saas"),
         ("anycast", "www.victim.example", "victim"), ("anycast", "saas.example", "saas"),
         ("saas2-v1", "app.saas2.example", "saas2")]


@on_lab
@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("edge", EDGES)
async def test_legitimate_requests_reach_their_origin(edge, flavour, lab):
    need(edge)
    async with running(edge, lab.world, flavour, lab.ca) as started:
        for listener, name, origin in LEGIT:
            for http2 in (False, True):
                out = await ask(lab, started, listener, name, name, http2)
                assert out.cert_valid_for(name), (listener, name, out)
                assert out.response.status == 200 and out.response.origin == origin, (listener, name, http2)
        if EDGES[edge].BUNDLES:
            bundles = sorted((started.directory / "bundles").iterdir())
            assert len(bundles) == len(certificate_names(lab.world))
            assert {stat.S_IMODE(p.stat().st_mode) for p in bundles} == {0o600}
            assert b"PRIVATE KEY" in bundles[0].read_bytes()


@on_lab
@pytest.mark.parametrize("edge", EDGES)
async def test_the_edge_is_gone_after_its_context_whatever_ends_it(edge, lab):
    need(edge)
    async with running(edge, lab.world, "fixed", lab.ca) as started:
        assert group_alive(started.pid)
    assert not group_alive(started.pid) and not started.directory.exists()

    with pytest.raises(RuntimeError, match="boom"):
        async with running(edge, lab.world, "default", lab.ca) as started:
            pid, directory = started.pid, started.directory
            assert group_alive(pid)
            raise RuntimeError("boom")
    assert not group_alive(pid) and not directory.exists()

    up = asyncio.Event()
    seen = {}

    async def serve():  # as `sni-lab edges up` waits for Ctrl-C: asyncio.run cancels it
        async with running(edge, lab.world, "default", lab.ca) as s:
            seen["pid"] = s.pid
            up.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(serve())
    await asyncio.wait_for(up.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not group_alive(seen["pid"])


@on_lab
async def test_a_listener_it_cannot_bind_is_a_clear_error_and_leaves_no_process(lab, tmp_path):
    need("nginx")
    anycast = lab.world.listener_by_name["anycast"]
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind((anycast.host, anycast.port))
        taken.listen()
        with pytest.raises(EdgeError, match=r"nginx exited .*Address already in use"):
            async with running("nginx", lab.world, "default", lab.ca, tmp_path):
                pass
    assert running_in(tmp_path) == []


def running_in(directory) -> list[int]:
    """Processes whose working directory is `directory` (the edge runs in its own)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.readlink(f"/proc/{entry}/cwd") == str(directory):
                found.append(int(entry))
        except OSError:
            pass
    return found


@on_lab
async def test_the_configs_follow_a_world_moved_to_another_24():
    installed = [e for e in EDGES if available(e) is None]
    if not installed:
        pytest.skip("no real edge is installed")
    moved = parse(tomllib.loads(default_path().read_text().replace('"127.0.0.', '"127.0.5.')), "moved.toml")
    async with Lab.ephemeral(moved.with_free_ports(), run_edge=False) as other:
        for edge in installed:
            async with running(edge, other.world, "default", other.ca) as started:
                out = await ask(other, started, "saas-v1", "www.victim.example", "www.victim.example", False)
                assert out.address.startswith("127.0.5.") and out.response.origin == "saas", (edge, out)


@on_lab
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_another_v1_zone_and_a_wildcard_custom_hostname_on_every_edge(flavour, world):
    installed = [e for e in EDGES if available(e) is None]
    if not installed:
        pytest.skip("no real edge is installed")
    async with Lab.ephemeral(other_world(world).with_free_ports(), run_edge=False) as other:
        for edge in installed:
            async with running(edge, other.world, flavour, other.ca) as started:
                for listener, name, origin in [("spare-v1", "app.other.example", "saas2"),
                                               ("spare-v1", "any.fleet.example", "saas2"),
                                               ("anycast", "any.fleet.example", "saas2"),
                                               ("saas-v1", "www.victim.example", "saas")]:  # proven: authorized
                    out = await ask(other, started, listener, name, name, True)
                    assert out.cert_valid_for(name) and out.response.origin == origin, (edge, listener, name, out)
                    assert verdict(other, out, name) != MISROUTED
                # a pending registration proves nothing: no certificate anywhere, not routed by Host (a v1
                # address under default sends everything to its zone, where the edge completes the handshake)
                for listener in ("anycast", "spare-v1"):
                    out = await ask(other, started, listener, "claim.tenant.example", "claim.tenant.example", False)
                    assert not out.cert_valid_for("claim.tenant.example"), (edge, listener, out)
                    if listener == "anycast" or flavour == "fixed":
                        assert out.response is None or out.response.origin is None, (edge, listener, out)
