"""The lab's CONNECT proxy against a real in-process lab: real DNS queries, real TLS verified
against the lab CA through the tunnel, real HTTP through the edge."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import random
import ssl
import time

import pytest

from lab.proxy import Proxy, answer_address
from lab.run import Lab

VICTIM = "www.victim.example"


async def start_lab(world, tmp_path, **kwargs) -> Lab:
    """A lab whose edge listeners share one port, as in the world file (all 8443): a poisoned
    answer then sends https://www.victim.example:PORT/ to another listener at the same port.
    Ports are tried, not probed: a busy one fails the start and another is tried."""
    others = {n: 0 for n in [*world.origin_by_name, "resolver", "control", "proxy"]}
    for _ in range(20):
        port = random.randrange(10000, 30000)  # below Linux's ephemeral range
        lab = Lab(world.with_ports({**others, **{l.name: port for l in world.listeners}}), tmp_path / "certs",
                  **kwargs)
        try:
            await lab.start()
            return lab
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError("no port free on every listener address after 20 tries")


def lookup_of(lab: Lab):
    return lambda name, client: answer_address(lab.resolver.zones, name, client, time.time())


@pytest.fixture
async def lab(world, tmp_path):
    lab = await start_lab(world, tmp_path)
    yield lab
    await lab.stop()


@pytest.fixture
def proxy(lab):
    """The lab's own proxy, as `sni-lab up` runs it."""
    return lab.proxy


def port_of(lab: Lab) -> int:
    return lab.world.listener_by_name["anycast"].port


async def connect(proxy: Proxy, head: bytes, source: str = "127.0.0.5"):
    """Send a raw head to the proxy; returns (status, response head, reader, writer)."""
    reader, writer = await asyncio.open_connection(*proxy.address, local_addr=(source, 0))
    writer.write(head)
    await writer.drain()
    got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return int(got.split(b" ", 2)[1]), got.decode("latin-1"), reader, writer


async def tunnel(proxy: Proxy, name: str, port: int, source: str = "127.0.0.5"):
    status, head, reader, writer = await connect(proxy, f"CONNECT {name}:{port} HTTP/1.1\r\nHost: {name}:{port}\r\n\r\n".encode(), source)
    assert status == 200, head
    return reader, writer


async def https_get(reader, writer, lab: Lab, host: str, tls: bool = True, path: str = "/", headers: str = "") -> dict:
    """TLS verified against the lab CA for `host` (first call), then one keep-alive GET: status, headers, body."""
    if tls:
        ctx = ssl.create_default_context(cafile=str(lab.ca.cert_path))
        ctx.set_alpn_protocols(["http/1.1"])
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname=host), 5)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}\r\n".encode())
    await writer.drain()
    head = (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1")
    got = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in head.split("\r\n")[1:] if l)}
    body = await asyncio.wait_for(reader.readexactly(int(got["content-length"])), 5)
    return {"status": int(head.split()[1]), "body": body.decode("utf-8", "replace"), **got}


def events_of(lab: Lab, kind: str, trace: str | None = None) -> list[dict]:
    return [e for e in lab.events.since(0) if e["kind"] == kind and (trace is None or e["trace"] == trace)]


async def closed(lab: Lab, trace: str, within: float = 5.0) -> dict:
    deadline = time.monotonic() + within
    while not (found := events_of(lab, "proxy.closed", trace)):
        if time.monotonic() > deadline:
            raise AssertionError(f"tunnel {trace} still open after {within}s")
        await asyncio.sleep(0.02)
    return found[0]


async def test_connect_resolves_as_the_client_and_tls_stays_end_to_end(lab, proxy):
    reader, writer = await tunnel(proxy, VICTIM, port_of(lab))
    tcp = writer.transport
    resp = await https_get(reader, writer, lab, VICTIM)  # verified against the lab CA, for the name: end to end
    assert resp["status"] == 200 and resp["x-lab-origin"] == "victim"
    (t,) = events_of(lab, "proxy.tunnel")
    assert (t["client"], t["name"], t["port"], t["address"], t["poisoned"]) == ("127.0.0.5", VICTIM, port_of(lab),
                                                                                 "127.0.0.10", False)
    # its DNS query was the client's own: from its address, carrying the tunnel's trace
    (answer,) = events_of(lab, "dns.answer", t["trace"])
    assert answer["client"] == "127.0.0.5" and answer["answers"] == ["127.0.0.10"] and t["dns_client"] == "127.0.0.5"
    # the edge's connection comes from the tunnel's local address, the client's own
    host, port = t["local"].rsplit(":", 1)
    assert host == "127.0.0.5" and int(port) > 0
    assert {e["client"] for e in events_of(lab, "tls.clienthello")} == {"127.0.0.5"}
    tcp.close()  # the client's FIN, under TLS
    done = await closed(lab, t["trace"])
    assert done["reason"] == "client closed" and done["bytes_up"] > 0 and done["bytes_down"] > 0


async def test_a_targeted_override_poisons_that_client_only(lab, proxy):
    oid = lab.resolver.set_override(VICTIM, "A", "listener:saas-v1", client="127.0.0.5")
    poisoned = await https_get(*await tunnel(proxy, VICTIM, port_of(lab), "127.0.0.5"), lab, VICTIM)
    clean = await https_get(*await tunnel(proxy, VICTIM, port_of(lab), "127.0.0.6"), lab, VICTIM)
    # v1: the SaaS address answers with the SaaS origin, under a valid certificate for the victim's name
    assert poisoned["x-lab-origin"] == "saas" and clean["x-lab-origin"] == "victim"
    first, second = events_of(lab, "proxy.tunnel")
    assert (first["address"], first["poisoned"], first["override"]) == ("127.0.0.11", True, oid)
    assert (second["address"], second["poisoned"], second["override"]) == ("127.0.0.10", False, None)


async def test_an_answer_change_closes_that_names_tunnels_only(lab, proxy):
    victim = await tunnel(proxy, VICTIM, port_of(lab))
    other = await tunnel(proxy, "app.saas.example", port_of(lab))
    assert (await https_get(*victim, lab, VICTIM))["x-lab-origin"] == "victim"
    assert (await https_get(*other, lab, "app.saas.example"))["x-lab-origin"] == "saas"
    assert proxy.dns_changed(VICTIM) == 0  # nothing changed yet
    lab.resolver.set_override(VICTIM, "A", "listener:saas-v1")
    assert proxy.dns_changed(VICTIM) == 0  # the lab closed it already, on the resolver's change
    victim_trace, other_trace = (t["trace"] for t in events_of(lab, "proxy.tunnel"))
    assert "DNS changed" in (await closed(lab, victim_trace))["reason"]
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(victim[0].read(), 5) == b""
    # the other name's tunnel still carries requests
    assert (await https_get(*other, lab, "app.saas.example", tls=False))["x-lab-origin"] == "saas"
    assert not events_of(lab, "proxy.closed", other_trace)
    # and the client's next tunnel follows the new answer
    assert (await https_get(*await tunnel(proxy, VICTIM, port_of(lab)), lab, VICTIM))["x-lab-origin"] == "saas"
    assert events_of(lab, "proxy.tunnel")[-1]["address"] == "127.0.0.11"


async def test_the_lab_lists_its_proxy_and_it_follows_every_dns_change(lab, proxy):
    assert lab.endpoints["proxy"] == {"host": "127.0.0.1", "port": proxy.address[1]} and proxy.address[1] > 0
    for change in (lambda: lab.resolver.set_override(VICTIM, "A", "listener:saas-v1"),
                   lambda: lab.resolver.remove_override(VICTIM),
                   lambda: lab.resolver.set_record(VICTIM, "A", "listener:saas-v1"),
                   lambda: lab.resolver.delete_record(VICTIM, "A")):
        held = await tunnel(proxy, VICTIM, port_of(lab))
        trace = events_of(lab, "proxy.tunnel")[-1]["trace"]
        change()
        assert proxy.dns_changed() == 0  # closed by the change itself, not by a later check
        assert (await closed(lab, trace))["reason"].startswith(f"DNS changed: {VICTIM} now ")
        held[1].close()


async def test_an_override_expiring_closes_its_tunnels_unannounced(lab):
    proxy = Proxy(lab.world, lab.events, lookup_of(lab), check_interval=0.1)
    await proxy.start("127.0.0.1", 0)
    try:
        lab.resolver.set_override(VICTIM, "A", "listener:saas-v1", expires=1.0)
        held = await tunnel(proxy, VICTIM, port_of(lab))  # noqa: F841 - open until the proxy closes it
        (t,) = events_of(lab, "proxy.tunnel")
        assert t["poisoned"]
        done = await closed(lab, t["trace"], within=10)  # nobody calls dns_changed(): the timer sees the expiry
        assert done["reason"] == f"DNS changed: {VICTIM} now 127.0.0.10 (was 127.0.0.11)"
    finally:
        await proxy.stop()


@pytest.fixture
async def outsider():
    """A TCP server on a loopback address outside the lab: it must never be reached."""
    accepted = []
    server = await asyncio.start_server(lambda r, w: (accepted.append(w), w.close()), "127.0.0.99", 0)
    yield server.sockets[0].getsockname()[1], accepted
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("target, why", [
    ("evil.test:{port}", "evil.test is outside the lab's DNS zones"),
    ("example.com:443", "example.com is outside the lab's DNS zones"),
    ("127.0.0.99:{port}", "127.0.0.99 is not a lab address"),
    ("x.attacker.example:{port}", "127.0.0.99 is not a lab address"),
    ("127.0.0.10:{port}", "port {port} of 127.0.0.10 is not a lab listener or origin"),
])
async def test_targets_outside_the_lab_are_refused_and_never_connected(lab, proxy, outsider, target, why):
    port, accepted = outsider
    lab.resolver.set_record("x.attacker.example", "A", "127.0.0.99")  # a lab name answering a foreign address
    status, head, reader, _ = await connect(proxy, f"CONNECT {target.format(port=port)} HTTP/1.1\r\n\r\n".encode())
    body = (await asyncio.wait_for(reader.read(), 5)).decode()
    assert status == 403 and body.strip() == why.format(port=port)
    (refused,) = events_of(lab, "proxy.refused")
    assert refused["status"] == 403 and refused["reason"] == why.format(port=port)
    assert accepted == [] and not events_of(lab, "proxy.tunnel")
    if "outside" in why:  # not even asked
        assert not events_of(lab, "dns.answer")


async def test_nxdomain_is_refused_with_the_reason(lab, proxy):
    status, _, reader, _ = await connect(proxy, f"CONNECT nosuch.victim.example:{port_of(lab)} HTTP/1.1\r\n\r\n".encode())
    assert status == 502 and (await reader.read()).decode().strip() == "nosuch.victim.example does not resolve (NXDOMAIN)"
    (refused,) = events_of(lab, "proxy.refused")
    (answer,) = events_of(lab, "dns.answer", refused["trace"])
    assert answer["rcode"] == "NXDOMAIN" and not events_of(lab, "proxy.tunnel")


@pytest.mark.parametrize("head, status", [
    (b"GET http://www.victim.example/ HTTP/1.1\r\nHost: www.victim.example\r\n\r\n", 405),
    (b"POST http://127.0.0.33:8080/collect HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
    (b"CONNECT www.victim.example HTTP/1.1\r\n\r\n", 400),              # no port
    (b"CONNECT www.victim.example:0 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT www.victim.example:99999 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT ::1:443 HTTP/1.1\r\n\r\n", 400),                          # IPv6 without brackets
    (b"CONNECT www.vict\xc3\xadm.example:443 HTTP/1.1\r\n\r\n", 400),    # not ASCII
    (b"CONNECT a..b.example:443 HTTP/1.1\r\n\r\n", 400),
    (b"CONNECT www.victim.example:443 HTTP/2.0\r\n\r\n", 400),
    (b"CONNECT www.victim.example:443 HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"CONNECT  www.victim.example:443 HTTP/1.1\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400),      # TLS sent to the proxy itself
    (b"CONNECT www.victim.example:443 HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
])
async def test_anything_but_a_well_formed_connect_gets_a_4xx(lab, proxy, head, status):
    got, text, reader, _ = await connect(proxy, head)
    assert got == status, text
    assert (await asyncio.wait_for(reader.read(), 5)) is not None  # then the proxy closes
    assert not events_of(lab, "dns.answer") and not events_of(lab, "proxy.tunnel")
    assert events_of(lab, "proxy.refused")[0]["status"] == status


async def test_a_slow_head_times_out(lab):
    proxy = Proxy(lab.world, lab.events, lookup_of(lab), head_timeout=0.3)
    await proxy.start("127.0.0.1", 0)
    try:
        status, _, _, _ = await connect(proxy, b"CONNECT www.victim.example:")
        assert status == 408
    finally:
        await proxy.stop()


async def test_connections_are_bounded_per_client(lab):
    proxy = Proxy(lab.world, lab.events, lookup_of(lab), max_per_client=2)
    await proxy.start("127.0.0.1", 0)
    held = []
    try:
        for _ in range(2):  # heads not sent yet: they hold their slots
            held.append(await asyncio.open_connection(*proxy.address, local_addr=("127.0.0.5", 0)))
        await asyncio.sleep(0.05)  # let the proxy accept them
        status, _, reader, _ = await connect(proxy, b"")  # refused as it connects
        assert status == 429 and (await reader.read()).decode().strip() == "2 connections open from 127.0.0.5, the limit"
        # another client still gets through
        await https_get(*await tunnel(proxy, VICTIM, port_of(lab), "127.0.0.6"), lab, VICTIM)
    finally:
        for _, w in held:
            w.close()
        await proxy.stop()


async def test_stop_closes_open_tunnels_and_the_port(lab):
    proxy = Proxy(lab.world, lab.events, lookup_of(lab))
    host, port = await proxy.start("127.0.0.1", 0)
    reader, writer = await tunnel(proxy, VICTIM, port_of(lab))
    await asyncio.wait_for(proxy.stop(), 2)
    with contextlib.suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 2) == b""
    (t,) = events_of(lab, "proxy.tunnel")
    assert (await closed(lab, t["trace"], within=0))["reason"] == "proxy stopped"
    with pytest.raises(OSError):
        await asyncio.open_connection(host, port)
