"""The lab resolver, asked by clients nobody here wrote: dig, kdig and dnspython.

Each test starts the resolver on 127.0.0.1, a free port, in the test's own event loop,
so command-line clients run as asyncio subprocesses (the loop keeps serving).
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import shutil
import socket
import struct
import time
from types import SimpleNamespace

import dns.asyncquery
import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lab.dns import CACHE_MAX, Resolver, dig_command, query
from lab.events import Events
from lab.resolver import TRACE_OPTION, Override, Zones, wire_name, world_records
from lab.world import load

HOST = "127.0.0.1"
OTHER_CLIENT = "127.0.0.5"  # a second source address on loopback (Linux routes all of 127/8)
ANYCAST, SAAS_V1 = "127.0.0.10", "127.0.0.11"


class Clock:
    """A wall clock the test moves by hand: expiry without sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limited(**limits):
    """The default world with some `[limits]` changed, as a world file would."""
    world = load()
    return dataclasses.replace(world, limits=dataclasses.replace(world.limits, **limits))


async def serve(world, events, clock=time.time) -> SimpleNamespace:
    resolver = Resolver(world, events, clock=clock)
    host, port = await resolver.start(HOST, 0)
    return SimpleNamespace(resolver=resolver, events=events, host=host, port=port, clock=clock)


@pytest.fixture
async def lab(events, clock):
    running = await serve(load(), events, clock)
    yield running
    await running.resolver.stop()


def _need(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not installed (apt-get install "
                              f"{'bind9-dnsutils' if tool == 'dig' else 'knot-dnsutils'})")


@dataclasses.dataclass
class Answer:
    status: str
    flags: set[str]
    answer: list[tuple[str, str, str]]      # (owner, type, value)
    authority: list[tuple[str, str, str]]
    text: str


async def cli(tool: str, port: int, *args: str) -> Answer:
    """Run dig or kdig against the lab resolver and read its output like a user would."""
    extra = ("+time=2", "+tries=1") if tool == "dig" else ("+time=2", "+retry=0")
    proc = await asyncio.create_subprocess_exec(tool, f"@{HOST}", "-p", str(port), *extra, *args,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    status = re.search(r"status: (\w+)", out)
    assert status, out
    flags = re.search(r"[Ff]lags: ([a-z ]*);", out)
    return Answer(status.group(1), set(flags.group(1).split()), _section(out, "ANSWER"), _section(out, "AUTHORITY"), out)


def _section(out: str, name: str) -> list[tuple[str, str, str]]:
    rows, inside = [], False
    for line in out.splitlines():
        if line.startswith(f";; {name} SECTION:"):
            inside = True
        elif inside and (not line.strip() or line.startswith(";")):
            inside = False
        elif inside:
            owner, _ttl, _cls, rtype, value = line.split(None, 4)
            rows.append((owner.rstrip("."), rtype, value.strip()))
    return rows


async def ask(lab, name: str, rtype: str = "A", tcp: bool = False, source: str | None = None,
              use_edns: int | bool = 0, payload: int = 1232) -> dns.message.Message:
    q = dns.message.make_query(name, rtype, use_edns=use_edns, payload=payload)
    if tcp:
        return await dns.asyncquery.tcp(q, lab.host, timeout=2, port=lab.port, source=source)
    return await dns.asyncquery.udp(q, lab.host, timeout=2, port=lab.port, source=source)


def addresses(reply: dns.message.Message) -> list[str]:
    return [rd.address for rrset in reply.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rd in rrset]


def answers(events: Events, kind: str = "dns.answer") -> list[dict]:
    return [e for e in events.since(0) if e["kind"] == kind]


# ---- answers, as dig and kdig see them ----------------------------------------------------

@pytest.mark.parametrize("tool", [pytest.param("dig", marks=_need("dig")), pytest.param("kdig", marks=_need("kdig"))])
@pytest.mark.parametrize("transport", ["udp", "tcp"])
async def test_cname_chain_is_followed_into_the_answer(lab, tool, transport):
    got = await cli(tool, lab.port, "shop.customer.example", "A", *(["+tcp"] if transport == "tcp" else []))
    assert got.status == "NOERROR"
    assert "aa" in got.flags
    assert got.answer == [("shop.customer.example", "CNAME", "customers.saas.example."),
                          ("customers.saas.example", "A", SAAS_V1)]
    event = answers(lab.events)[-1]
    assert (event["name"], event["type"], event["rcode"], event["transport"]) == \
           ("shop.customer.example", "A", "NOERROR", transport)
    assert event["answers"] == ["customers.saas.example", SAAS_V1]


@_need("dig")
async def test_txt_record(lab):
    lab.resolver.set_record("_lab.victim.example", "TXT", "v=lab1 hello world")
    got = await cli("dig", lab.port, "_lab.victim.example", "TXT")
    assert got.status == "NOERROR"
    assert got.answer == [("_lab.victim.example", "TXT", '"v=lab1 hello world"')]


@_need("dig")
async def test_unknown_name_in_a_lab_zone_is_nxdomain_with_the_zone_soa(lab):
    got = await cli("dig", lab.port, "nope.victim.example")
    assert got.status == "NXDOMAIN"
    assert "aa" in got.flags
    assert [(o, t) for o, t, _ in got.authority] == [("victim.example", "SOA")]
    reply = await ask(lab, "nope.victim.example", tcp=True)
    assert reply.rcode() == dns.rcode.NXDOMAIN
    assert reply.authority[0].rdtype == dns.rdatatype.SOA and str(reply.authority[0].name) == "victim.example."


async def test_known_name_without_that_type_is_nodata_with_soa(lab):
    reply = await ask(lab, "www.victim.example", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR
    assert reply.answer == []
    assert reply.authority[0].rdtype == dns.rdatatype.SOA


@_need("dig")
@pytest.mark.parametrize("name", ["www.google.com", "example", "evil-victim.example"])
async def test_names_outside_the_lab_zones_are_refused(lab, name):
    got = await cli("dig", lab.port, name)
    assert got.status == "REFUSED"
    assert got.answer == []
    assert answers(lab.events)[-1]["rcode"] == "REFUSED"


@_need("dig")
async def test_ns_and_soa_are_synthesised_for_each_lab_zone(lab):
    ns = await cli("dig", lab.port, "customer.example", "NS")
    assert ns.answer == [("customer.example", "NS", "ns.customer.example.")]
    glue = await cli("dig", lab.port, "ns.customer.example")
    assert glue.answer == [("ns.customer.example", "A", load().resolver.host)]
    soa = await cli("dig", lab.port, "customer.example", "SOA")
    assert soa.answer[0][:2] == ("customer.example", "SOA")
    assert soa.answer[0][2].startswith("ns.customer.example. hostmaster.customer.example.")


async def test_aaaa_record_and_ttl_from_the_world(lab):
    lab.resolver.set_record("v6.victim.example", "AAAA", "::1", ttl=42)
    reply = await ask(lab, "v6.victim.example", "AAAA")
    assert addresses(reply) == ["::1"]
    assert reply.answer[0].ttl == 42
    reply = await ask(lab, "www.victim.example")
    assert reply.answer[0].ttl == load().ttl


@_need("dig")
async def test_unknown_edns_version_gets_badvers(lab):
    got = await cli("dig", lab.port, "www.victim.example", "+edns=1", "+noednsnegotiation")
    assert got.status == "BADVERS" and got.answer == []
    assert answers(lab.events)[-1]["rcode"] == "BADVERS"


# ---- size: TC over UDP, all of it over TCP, EDNS0 -------------------------------------------

def _many_addresses(n: int) -> list[str]:
    return [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(n)]


@_need("dig")
async def test_too_large_for_udp_sets_tc_and_tcp_gets_everything(lab):
    lab.resolver.set_record("big.victim.example", "A", _many_addresses(60))
    udp = await ask(lab, "big.victim.example", use_edns=False)
    assert udp.flags & dns.flags.TC
    assert udp.answer == []
    tcp = await ask(lab, "big.victim.example", tcp=True)
    assert not tcp.flags & dns.flags.TC
    assert sorted(addresses(tcp)) == sorted(_many_addresses(60))
    # dig does what a stub resolver does: sees TC, asks again over TCP.
    got = await cli("dig", lab.port, "big.victim.example", "+noedns")
    assert "Truncated, retrying in TCP mode" in got.text
    assert len(got.answer) == 60


async def test_big_txt_over_tcp(lab):
    texts = [f"record {i} " + "x" * 200 for i in range(10)]
    lab.resolver.set_record("big.victim.example", "TXT", texts)
    assert (await ask(lab, "big.victim.example", "TXT")).flags & dns.flags.TC
    tcp = await ask(lab, "big.victim.example", "TXT", tcp=True)
    assert sorted(b"".join(rd.strings).decode() for rd in tcp.answer[0]) == sorted(texts)


async def test_edns0_payload_size_is_honoured_and_opt_echoed(lab):
    lab.resolver.set_record("big.victim.example", "A", _many_addresses(60))  # about 1 KB
    small = await ask(lab, "big.victim.example", payload=512)
    assert small.flags & dns.flags.TC and small.edns == 0
    roomy = await ask(lab, "big.victim.example", payload=1232)
    assert not roomy.flags & dns.flags.TC and len(addresses(roomy)) == 60
    assert roomy.edns == 0 and roomy.payload >= 512
    plain = await ask(lab, "www.victim.example", use_edns=False)
    assert plain.edns == -1  # no OPT asked, none given


async def test_edns0_payload_above_ours_is_capped(lab):
    lab.resolver.set_record("huge.victim.example", "A", _many_addresses(120))  # about 2 KB
    reply = await ask(lab, "huge.victim.example", payload=4096)
    assert reply.flags & dns.flags.TC
    assert reply.payload <= 1232 < 4096


# ---- poisoning -------------------------------------------------------------------------

@_need("dig")
async def test_poisoning_then_removal(lab):
    before = await cli("dig", lab.port, "www.victim.example")
    assert before.answer == [("www.victim.example", "A", ANYCAST)]

    oid = lab.resolver.set_override("www.victim.example", "A", "listener:saas-v1")
    poisoned = await cli("dig", lab.port, "www.victim.example")
    assert poisoned.answer == [("www.victim.example", "A", SAAS_V1)]
    event = answers(lab.events)[-1]
    assert event["poisoned"] is True and event["override"] == oid
    assert [o["id"] for o in lab.resolver.overrides()] == [oid]

    assert lab.resolver.remove_override(oid) == 1
    after = await cli("dig", lab.port, "www.victim.example")
    assert after.answer == [("www.victim.example", "A", ANYCAST)]
    event = answers(lab.events)[-1]
    assert event["poisoned"] is False and event["override"] is None
    assert lab.resolver.overrides() == []


async def test_targeted_poisoning_only_fools_that_client(lab):
    oid = lab.resolver.set_override("www.victim.example", "A", SAAS_V1, client=OTHER_CLIENT)
    victim = await ask(lab, "www.victim.example", source=OTHER_CLIENT)
    bystander = await ask(lab, "www.victim.example", source=HOST)
    assert addresses(victim) == [SAAS_V1]
    assert addresses(bystander) == [ANYCAST]
    by_client = {e["client"]: e for e in answers(lab.events)}
    assert by_client[OTHER_CLIENT]["poisoned"] and by_client[OTHER_CLIENT]["override"] == oid
    assert not by_client[HOST]["poisoned"] and by_client[HOST]["override"] is None
    # Over TCP too, and again (answered from the cache: still per client).
    assert addresses(await ask(lab, "www.victim.example", tcp=True, source=OTHER_CLIENT)) == [SAAS_V1]
    assert addresses(await ask(lab, "www.victim.example", source=HOST)) == [ANYCAST]
    assert addresses(await ask(lab, "www.victim.example", source=OTHER_CLIENT)) == [SAAS_V1]


@_need("dig")
async def test_targeted_poisoning_seen_from_dig(lab):
    lab.resolver.set_override("www.victim.example", "A", SAAS_V1, client=OTHER_CLIENT)
    assert (await cli("dig", lab.port, "-b", OTHER_CLIENT, "www.victim.example")).answer[0][2] == SAAS_V1
    assert (await cli("dig", lab.port, "-b", HOST, "www.victim.example")).answer[0][2] == ANYCAST


async def test_poisoning_expires(lab):
    lab.resolver.set_override("www.victim.example", "A", SAAS_V1, expires=30)
    assert addresses(await ask(lab, "www.victim.example")) == [SAAS_V1]
    lab.clock.now += 29.9
    assert addresses(await ask(lab, "www.victim.example")) == [SAAS_V1]  # from the cache, still valid
    lab.clock.now += 0.1
    assert addresses(await ask(lab, "www.victim.example")) == [ANYCAST]
    assert lab.resolver.overrides() == []


async def test_poisoning_with_absolute_expiry(lab):
    lab.resolver.set_override("www.victim.example", "A", SAAS_V1, expires=lab.clock.now + 30)
    assert addresses(await ask(lab, "www.victim.example")) == [SAAS_V1]
    lab.clock.now += 31
    assert addresses(await ask(lab, "www.victim.example")) == [ANYCAST]


async def test_override_with_an_absolute_expiry_already_past_never_applies(lab):
    lab.resolver.set_override("www.victim.example", "A", SAAS_V1, expires=lab.clock.now - 5)
    assert addresses(await ask(lab, "www.victim.example")) == [ANYCAST]
    assert lab.resolver.overrides() == []


async def test_query_client_asks_from_a_chosen_source_address(lab):
    lab.resolver.set_override("www.victim.example", "A", SAAS_V1, client=OTHER_CLIENT)
    for tcp in (False, True):
        fooled = await query("www.victim.example", "A", lab.host, lab.port, tcp=tcp, source=OTHER_CLIENT)
        assert [str(rr.rdata) for rr in fooled.rr] == [SAAS_V1]
        plain = await query("www.victim.example", "A", lab.host, lab.port, tcp=tcp)
        assert [str(rr.rdata) for rr in plain.rr] == [ANYCAST]


async def test_cname_poisoning_sends_the_victim_name_to_the_saas_address(lab):
    oid = lab.resolver.set_override("www.victim.example", "CNAME", "customers.saas.example")
    reply = await ask(lab, "www.victim.example")
    assert [rrset.rdtype for rrset in reply.answer] == [dns.rdatatype.CNAME, dns.rdatatype.A]
    assert addresses(reply) == [SAAS_V1]
    assert answers(lab.events)[-1]["override"] == oid


async def test_remove_override_by_name(lab):
    lab.resolver.set_override("www.victim.example", "A", SAAS_V1)
    lab.resolver.set_override("www.victim.example", "A", "127.0.0.12", client=OTHER_CLIENT)
    assert lab.resolver.remove_override("WWW.Victim.Example.") == 2
    assert addresses(await ask(lab, "www.victim.example", source=OTHER_CLIENT)) == [ANYCAST]


async def test_override_can_invent_a_name_and_answer_nodata(lab):
    lab.resolver.set_override("new.victim.example", "A", SAAS_V1)
    assert addresses(await ask(lab, "new.victim.example")) == [SAAS_V1]
    lab.resolver.set_override("victim.example", "A", None)
    empty = await ask(lab, "victim.example")
    assert empty.rcode() == dns.rcode.NOERROR and empty.answer == []


def test_override_arguments_are_checked():
    r = Resolver(load())
    for bad in (dict(name="www.google.com", rtype="A", value="127.0.0.1"),
                dict(name="www.victim.example", rtype="MX", value="x"),
                dict(name="www.victim.example", rtype="A", value="not-an-ip"),
                dict(name="www.victim.example", rtype="A", value="::1"),
                dict(name="www.victim.example", rtype="A", value="127.0.0.1", client="nobody"),
                dict(name="www.victim.example", rtype="A", value="127.0.0.1", expires=-1)):
        with pytest.raises(ValueError):
            r.set_override(**bad)
    assert r.overrides() == []


# ---- records, world, cache invalidation ---------------------------------------------------

async def test_set_and_delete_record_change_the_answer_at_once(lab):
    assert addresses(await ask(lab, "app.saas.example")) == [SAAS_V1]  # now cached
    lab.resolver.set_record("app.saas.example", "A", ["127.0.0.40", "127.0.0.41"])
    assert sorted(addresses(await ask(lab, "app.saas.example"))) == ["127.0.0.40", "127.0.0.41"]
    assert lab.resolver.delete_record("app.saas.example") == 2
    assert (await ask(lab, "app.saas.example")).rcode() == dns.rcode.NXDOMAIN
    assert lab.resolver.delete_record("app.saas.example") == 0


async def test_setting_a_cname_replaces_the_address_records(lab):
    lab.resolver.set_record("www.victim.example", "CNAME", "app.saas.example")
    reply = await ask(lab, "www.victim.example")
    assert addresses(reply) == [SAAS_V1] and reply.answer[0].rdtype == dns.rdatatype.CNAME
    listed = [(r["name"], r["type"]) for r in lab.resolver.records()]
    assert ("www.victim.example", "CNAME") in listed and ("www.victim.example", "A") not in listed


async def test_update_world_moves_listener_addresses(lab):
    assert addresses(await ask(lab, "www.victim.example")) == [ANYCAST]
    world = load()
    moved = tuple(dataclasses.replace(l, host="127.0.0.20") if l.name == "anycast" else l for l in world.listeners)
    lab.resolver.update_world(dataclasses.replace(world, listeners=moved))
    assert addresses(await ask(lab, "www.victim.example")) == ["127.0.0.20"]


async def test_wildcard_record_covers_unknown_names_only(lab):
    lab.resolver.set_record("*.victim.example", "A", "listener:saas2-v1")
    assert addresses(await ask(lab, "anything.victim.example")) == ["127.0.0.12"]
    assert addresses(await ask(lab, "www.victim.example")) == [ANYCAST]


async def test_cname_loop_is_bounded(lab):
    lab.resolver.set_record("a.victim.example", "CNAME", "b.victim.example")
    lab.resolver.set_record("b.victim.example", "CNAME", "a.victim.example")
    assert (await ask(lab, "a.victim.example")).rcode() == dns.rcode.SERVFAIL
    assert addresses(await ask(lab, "www.victim.example")) == [ANYCAST]


def test_record_arguments_are_checked():
    r = Resolver(load())
    with pytest.raises(ValueError, match="outside the lab zones"):
        r.set_record("www.example.com", "A", "127.0.0.1")
    with pytest.raises(ValueError):
        r.set_record("www.victim.example", "A", "300.1.1.1")
    with pytest.raises(ValueError):
        r.set_record("www.victim.example", "CNAME", ["a.victim.example", "b.victim.example"])


def test_answer_cache_stays_bounded():
    r = Resolver(load(), Events(maxlen=10))
    for i in range(CACHE_MAX * 2):
        wire = r.respond(bytes(dns.message.make_query(f"n{i}.victim.example", "A").to_wire()), HOST)
        assert wire is not None
    assert len(r._udp_cache) <= CACHE_MAX


def test_an_answer_from_the_cache_is_an_event_of_its_own_each_time():
    events = Events()
    r = Resolver(load(), events)
    q = dns.message.make_query("www.victim.example", "A").to_wire()
    wires = [r.respond(q, HOST) for _ in range(3)]
    told = [e for e in events.since(0) if e["kind"] == "dns.answer"]
    assert len(set(wires)) == 1 and len(told) == 3 and len({e["id"] for e in told}) == 3
    told[0]["client"] = "mutated"  # a reader changing the first, the one the cache was made from...
    r.respond(q, HOST)
    last = events.since(told[2]["id"])[0]  # ...changes no later event
    assert last["client"] == HOST and last["name"] == "www.victim.example"
    assert [k for k in last if k not in ("id", "ts")] == [k for k in told[0] if k not in ("id", "ts")]


async def test_a_repeated_udp_query_gets_its_own_id_and_event_and_a_change_at_once(lab):
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect((lab.host, lab.port))

        async def exchange(qid: int) -> dns.message.Message:
            s.send(_good_query(qid))
            return dns.message.from_wire(await asyncio.wait_for(loop.sock_recv(s, 65535), 5))

        replies = [await exchange(qid) for qid in (1, 2, 3)]  # the last two from the cache
        lab.resolver.set_record("www.victim.example", "A", "127.0.0.77")
        changed = await exchange(4)
    assert [r.id for r in replies] == [1, 2, 3] and all(addresses(r) == [ANYCAST] for r in replies)
    assert changed.id == 4 and addresses(changed) == ["127.0.0.77"]
    told = [e for e in answers(lab.events) if e["name"] == "www.victim.example"]
    assert len(told) == 4 and len({e["id"] for e in told}) == 4
    assert [e["answers"] for e in told] == [[ANYCAST]] * 3 + [["127.0.0.77"]]
    assert all(e["transport"] == "udp" and e["client"] == HOST for e in told)


async def test_stop_frees_both_udp_and_tcp_and_hangs_up_on_clients(events):
    running = await serve(limited(dns_tcp_idle_timeout=60), events)  # so only stop() can be what hangs up
    resolver, host, port = running.resolver, running.host, running.port
    reader, writer = await asyncio.open_connection(host, port)
    await until(lambda: resolver.tcp_clients == 1)  # the server has taken the connection in
    await resolver.stop()
    assert await _closed_by_server(reader)
    writer.close()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
        u.bind((host, port))
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind((host, port))


# ---- hostile input -----------------------------------------------------------------------

def _errors(lab) -> list[dict]:
    return answers(lab.events, "dns.error")


def _good_query(qid: int = 0x4242) -> bytes:
    q = dns.message.make_query("www.victim.example", "A")
    q.id = qid
    return q.to_wire()


async def udp_exchange(lab, bad: bytes) -> bytes:
    """Send a bad packet then a good one; return the first datagram back.

    The server handles packets in order, so if the bad one got a reply it comes first."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect((lab.host, lab.port))
        s.send(bad)
        s.send(_good_query())
        return await asyncio.wait_for(loop.sock_recv(s, 65535), 5)


def _header(qid: int, qd: int, flags: int = 0x0100) -> bytes:
    return struct.pack("!6H", qid, flags, qd, 0, 0, 0)


def _question(name: str) -> bytes:
    return b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack("!HH", 1, 1)


@pytest.mark.parametrize("bad, formerr", [
    (b"\x12\x34\x01", False),                                                  # truncated header
    (_header(0x1111, 1, flags=0x8100) + _question("www.victim.example"), False),  # a response, not a query
    (_header(0x1111, 1000) + _question("www.victim.example") * 1000, True),   # a thousand questions
    (_header(0x1111, 1) + b"\xc0\x0c" + struct.pack("!HH", 1, 1), True),       # pointer to itself
    (_header(0x1111, 1) + b"\x01a\xc0\x0c" + struct.pack("!HH", 1, 1), True),  # pointer back into itself
    (_header(0x1111, 1) + b"\x05abc", True),                                   # name runs off the end
    (_header(0x1111, 1) + b"\x3fabc" * 100, True),                             # label garbage
], ids=["short", "response", "1000-questions", "pointer-self", "pointer-loop", "cut-name", "garbage-labels"])
async def test_hostile_udp_packet_then_good_query(lab, bad, formerr):
    before = len(_errors(lab))
    first = await udp_exchange(lab, bad)
    if formerr:
        reply = dns.message.from_wire(first, question_only=True)
        assert reply.id == 0x1111 and reply.rcode() == dns.rcode.FORMERR
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # and the good one is still answered
            s.setblocking(False)
            s.connect((lab.host, lab.port))
            s.send(_good_query())
            first = await asyncio.wait_for(loop.sock_recv(s, 65535), 5)
    good = dns.message.from_wire(first)
    assert good.id == 0x4242 and addresses(good) == [ANYCAST]
    assert len(_errors(lab)) == before + 1


async def flood(lab, packets) -> None:
    """Send packets fast, pausing now and then: a flood, not a kernel buffer overflow test."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((lab.host, lab.port))
        for i, p in enumerate(packets):
            s.send(p)
            if i % 50 == 49:
                await asyncio.sleep(0.005)


async def ask_like_a_stub(lab) -> dns.message.Message:
    """A good query, retried like any UDP client would if the flood cost it its datagram."""
    for attempt in range(3):
        try:
            return await dns.asyncquery.udp(dns.message.make_query("www.victim.example", "A"), lab.host,
                                            timeout=2, port=lab.port)
        except dns.exception.Timeout:
            if attempt == 2:
                raise


async def test_random_bytes_never_stop_it(lab):
    rng = random.Random(7)
    await flood(lab, [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 600))) for _ in range(300)])
    assert addresses(await ask_like_a_stub(lab)) == [ANYCAST]
    assert _errors(lab)


@settings(max_examples=300, deadline=None, database=None)  # no example database to write
@given(st.binary(max_size=700))
def test_any_bytes_get_a_formerr_or_nothing_never_an_exception(data):
    r = Resolver(load(), Events(maxlen=50))
    wire = r.respond(data, HOST)
    assert wire is None or wire[:2] == data[:2]


async def test_error_events_are_rate_limited_under_a_flood(lab):
    await flood(lab, [b"\x00"] * 2000)
    assert addresses(await ask_like_a_stub(lab)) == [ANYCAST]
    errors = _errors(lab)
    assert 0 < len(errors) < 2000
    lab.clock.now += 0.2  # the bucket refills a little
    await udp_exchange(lab, b"\x00")
    assert _errors(lab)[-1]["suppressed"] > 0


async def tcp_good_query(lab) -> dns.message.Message:
    return await ask(lab, "www.victim.example", tcp=True)


async def _closed_by_server(reader: asyncio.StreamReader, within: float = 10) -> bool:
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


async def until(condition, seconds: float = 5.0) -> None:
    """Wait, bounded, for something the server does on its own schedule."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():
        assert loop.time() < deadline, f"not within {seconds}s"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("payload", [
    b"\xff\xff" + b"\0" * 100,    # says 65535 bytes follow: more than any query
    b"\x00\x05hello",             # says 5 bytes: less than a header
])
async def test_tcp_bad_length_prefix_is_dropped(lab, payload):
    before = len(_errors(lab))
    reader, writer = await asyncio.open_connection(lab.host, lab.port)
    writer.write(payload)
    assert await _closed_by_server(reader)
    writer.close()
    assert len(_errors(lab)) == before + 1
    assert addresses(await tcp_good_query(lab)) == [ANYCAST]


@pytest.mark.parametrize("payload", [b"", b"\x00", b"\x00\x28" + b"\0" * 10],
                         ids=["silent", "half-prefix", "half-message"])
async def test_tcp_idle_or_half_message_times_out(events, payload):
    lab = await serve(limited(dns_tcp_idle_timeout=0.3), events)  # set where a user sets it: the world
    try:
        reader, writer = await asyncio.open_connection(lab.host, lab.port)
        writer.write(payload)
        assert await _closed_by_server(reader, within=5)
        writer.close()
        assert len(_errors(lab)) == 1
        assert addresses(await tcp_good_query(lab)) == [ANYCAST]
    finally:
        await lab.resolver.stop()


async def test_tcp_idle_timeout_after_answers_frees_the_slot(events):
    lab = await serve(limited(dns_tcp_idle_timeout=0.3), events)
    try:
        reader, writer = await asyncio.open_connection(lab.host, lab.port)
        assert await tcp_exchange(reader, writer)
        assert await _closed_by_server(reader, within=5)
        writer.close()
        await until(lambda: lab.resolver.tcp_clients == 0)
    finally:
        await lab.resolver.stop()


async def test_tcp_half_message_then_hang_up(lab):
    before = len(_errors(lab))
    reader, writer = await asyncio.open_connection(lab.host, lab.port)
    writer.write(b"\x00\x28" + b"\0" * 10)
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    for _ in range(100):  # the server notices the hang-up on its own schedule
        if len(_errors(lab)) > before:
            break
        await asyncio.sleep(0.02)
    assert len(_errors(lab)) == before + 1
    assert addresses(await tcp_good_query(lab)) == [ANYCAST]


async def test_tcp_pipelined_queries_on_one_connection(lab):
    reader, writer = await asyncio.open_connection(lab.host, lab.port)
    for qid in (1, 2, 3):
        wire = _good_query(qid)
        writer.write(len(wire).to_bytes(2, "big") + wire)
    got = []
    for _ in range(3):
        size = int.from_bytes(await reader.readexactly(2), "big")
        got.append(dns.message.from_wire(await reader.readexactly(size)).id)
    writer.close()
    assert got == [1, 2, 3]


async def tcp_exchange(reader, writer) -> bool:
    """One query on an open connection: True when answered, False when the server hung up."""
    wire = _good_query()
    try:
        writer.write(len(wire).to_bytes(2, "big") + wire)
        size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), 5), "big")
        return dns.message.from_wire(await reader.readexactly(size)).id == 0x4242
    except (asyncio.IncompleteReadError, ConnectionError):
        return False


async def held_connections(lab, source: str, n: int) -> list[tuple]:
    """n connections from `source`, each asked once: (reader, writer, answered)."""
    out = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(lab.host, lab.port, local_addr=(source, 0))
        out.append((reader, writer, await tcp_exchange(reader, writer)))
    return out


async def test_tcp_connections_are_bounded_per_client_and_in_all(events):
    lab = await serve(limited(dns_tcp_max_connections=4, dns_tcp_per_client=3), events)
    conns = []
    try:
        conns += await held_connections(lab, "127.0.0.5", 4)
        assert [ok for *_, ok in conns] == [True, True, True, False]  # the fourth from one client is refused
        conns += await held_connections(lab, "127.0.0.6", 2)
        assert [ok for *_, ok in conns[4:]] == [True, False]  # the one slot left, then the total is reached
        reasons = [e["reason"] for e in _errors(lab)]
        assert reasons == ["more than 3 TCP connections from one client", "4 TCP connections open, the limit"]
        for _, writer, _ in conns:
            writer.close()
        await until(lambda: lab.resolver.tcp_clients == 0)  # the server sees the hang-ups, then has room again
        assert addresses(await tcp_good_query(lab)) == [ANYCAST]
    finally:
        for _, writer, _ in conns:
            writer.close()
        await lab.resolver.stop()


@_need("dig")
async def test_one_client_holding_every_connection_cannot_starve_others(lab):
    """The probe's finding: 128 connections from one address made every `dig +tcp` fail."""
    hog = await held_connections(lab, "127.0.0.5", 128)
    try:
        assert sum(ok for *_, ok in hog) == load().limits.dns_tcp_per_client
        got = await cli("dig", lab.port, "+tcp", "-b", "127.0.0.6", "www.victim.example")
        assert got.status == "NOERROR" and got.answer == [("www.victim.example", "A", ANYCAST)]
    finally:
        for _, writer, _ in hog:
            writer.close()


# ---- the answer, without sockets or clocks -------------------------------------------------

def _addresses_in(wire: bytes) -> list[str]:
    return addresses(dns.message.from_wire(wire))


def test_the_answer_is_a_function_of_query_client_and_time():
    world = load()
    poison = Override("ovr-7", "www.victim.example", "A", ("listener:saas-v1",), expires_at=1000.0)
    targeted = Override("ovr-8", "www.victim.example", "A", ("127.0.0.12",), client=OTHER_CLIENT)
    zones = Zones.build(world, world_records(world), (poison, targeted))
    q = _good_query()
    wire, info = zones.answer(q, HOST, now=999.0)
    assert _addresses_in(wire) == [SAAS_V1]
    assert (info["name"], info["rcode"], info["poisoned"], info["override"]) == ("www.victim.example", "NOERROR", True, "ovr-7")
    assert zones.answer(q, HOST, now=999.0) == (wire, info)  # same inputs, same answer
    wire, info = zones.answer(q, HOST, now=1000.0)  # expired at exactly expires_at
    assert _addresses_in(wire) == [ANYCAST] and (info["poisoned"], info["override"]) == (False, None)
    wire, info = zones.answer(q, OTHER_CLIENT, now=5000.0)
    assert _addresses_in(wire) == ["127.0.0.12"] and info["override"] == "ovr-8"
    assert zones.valid_until == 1000.0


def test_the_answer_tells_errors_apart_from_answers():
    zones = Zones.build(load(), world_records(load()))
    assert zones.answer(b"\x12\x34\x01", HOST, 0.0) == (None, {"error": "truncated header"})
    wire, info = zones.answer(_header(0x1111, 2) + _question("www.victim.example") * 2, HOST, 0.0)
    assert dns.message.from_wire(wire, question_only=True).rcode() == dns.rcode.FORMERR and "malformed" in info["error"]


def test_the_answer_module_is_pure():
    import ast
    import inspect

    import lab.resolver

    tree = ast.parse(inspect.getsource(lab.resolver))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"asyncio", "socket", "time", "selectors", "threading", "aiohttp", "sqlite3", "logging",
                           "lab.dns", "lab.events", "lab.state", "lab.control", "lab.run"}, imported


# ---- joins: the trace a query carries (EDNS0 option) --------------------------------------

async def test_trace_option_puts_the_requests_trace_on_its_answer(lab):
    lab.resolver.set_record("huge.victim.example", "A", _many_addresses(120))  # truncated over UDP: asked again on TCP
    for name, trace in (("www.victim.example", "req-1_A"), ("huge.victim.example", "x" * 64)):
        await query(name, "A", lab.host, lab.port, trace=trace)
        await query(name, "A", lab.host, lab.port)  # the same question with no trace, from the cache
        mine = lab.events.trace(trace)
        assert {e["name"] for e in mine} == {name} and all(e["kind"] == "dns.answer" for e in mine)
        assert [e["transport"] for e in mine] == (["udp"] if name.startswith("www") else ["udp", "tcp"])
        assert answers(lab.events)[-1]["trace"] is None
    with pytest.raises(ValueError, match="trace"):
        await query("www.victim.example", "A", lab.host, lab.port, trace="bad trace")


BAD_TRACE_OPTIONS = {
    "space": [dns.edns.GenericOption(TRACE_OPTION, b"has space")],
    "65-chars": [dns.edns.GenericOption(TRACE_OPTION, b"x" * 65)],
    "empty": [dns.edns.GenericOption(TRACE_OPTION, b"")],
    "non-ascii": [dns.edns.GenericOption(TRACE_OPTION, "caf\u00e9".encode())],
    "twice": [dns.edns.GenericOption(TRACE_OPTION, b"one"), dns.edns.GenericOption(TRACE_OPTION, b"two")],
    "other-option": [dns.edns.GenericOption(TRACE_OPTION + 1, b"not-ours")],
}


async def test_a_bad_trace_option_is_ignored_and_the_query_answered(lab):
    async def trace_of(options) -> str | None:
        q = dns.message.make_query("www.victim.example", "A", use_edns=0, options=options)
        reply = await dns.asyncquery.udp(q, lab.host, timeout=2, port=lab.port)
        assert addresses(reply) == [ANYCAST]
        event = answers(lab.events)[-1]
        assert event["rcode"] == "NOERROR"
        return event["trace"]

    assert await trace_of([dns.edns.GenericOption(TRACE_OPTION, b"good-1")]) == "good-1"  # dnspython's, not ours
    assert {kind: await trace_of(options) for kind, options in BAD_TRACE_OPTIONS.items()} == \
           dict.fromkeys(BAD_TRACE_OPTIONS)


# ---- names and types the lab does not serve ------------------------------------------------

def test_wire_name_is_the_one_conversion():
    assert wire_name((b"WWW", b"Victim", b"example")) == "www.victim.example"
    assert wire_name(()) == ""
    assert wire_name((b"a.b", b"victim", b"example")) is None
    assert wire_name((b"a\x00b", b"example")) is None


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("labels, rcode, shown", [
    ((b"a.b", b"victim", b"example"), dns.rcode.NXDOMAIN, "a\\.b.victim.example"),
    ((b"www.victim", b"example"), dns.rcode.REFUSED, "www\\.victim.example"),
    ((b"www", b"victim.example"), dns.rcode.REFUSED, "www.victim\\.example"),
], ids=["below-the-zone", "zone-split", "zone-as-one-label"])
async def test_a_label_holding_a_dot_is_not_two_labels(lab, tcp, labels, rcode, shown):
    lab.resolver.set_record("a.b.victim.example", "A", "127.0.0.50")  # the two-label reading exists
    q = dns.message.make_query(dns.name.Name(labels + (b"",)), "A")
    reply = await (dns.asyncquery.tcp if tcp else dns.asyncquery.udp)(q, lab.host, timeout=2, port=lab.port)
    assert reply.rcode() == rcode and reply.answer == []
    if rcode == dns.rcode.NXDOMAIN:
        assert str(reply.authority[0].name) == "victim.example." and reply.flags & dns.flags.AA
    assert answers(lab.events)[-1]["name"] == shown
    assert addresses(await ask(lab, "a.b.victim.example", tcp=tcp)) == ["127.0.0.50"]


@pytest.mark.parametrize("tcp", [False, True])
@pytest.mark.parametrize("qtype, rcode", [("AXFR", dns.rcode.REFUSED), ("IXFR", dns.rcode.REFUSED),
                                          ("MAILB", dns.rcode.NOTIMP)])
async def test_zone_transfers_are_refused(lab, tcp, qtype, rcode):
    reply = await ask(lab, "victim.example", qtype, tcp=tcp)
    assert reply.rcode() == rcode and reply.answer == [] and not reply.flags & dns.flags.AA
    assert answers(lab.events)[-1]["rcode"] == dns.rcode.to_text(rcode)


@_need("dig")
async def test_dig_axfr_is_refused(lab):
    proc = await asyncio.create_subprocess_exec("dig", f"@{HOST}", "-p", str(lab.port), "+time=2", "+tries=1",
                                                "victim.example", "AXFR", stdout=asyncio.subprocess.PIPE)
    out = (await asyncio.wait_for(proc.communicate(), 20))[0].decode()
    assert "Transfer failed" in out and "SOA" not in out


# ---- the client and `sni-lab dig` ----------------------------------------------------------

async def test_query_client_falls_back_to_tcp_on_tc(lab):
    lab.resolver.set_record("huge.victim.example", "A", _many_addresses(120))
    reply = await query("huge.victim.example", "A", lab.host, lab.port)
    assert len(reply.rr) == 120
    with pytest.raises(ValueError):
        await query("www.victim.example", "NOPE", lab.host, lab.port)
    with pytest.raises(ValueError):
        await query("x" * 70 + ".victim.example", "A", lab.host, lab.port)


def _dig_args(**kw) -> SimpleNamespace:
    base = dict(name="shop.customer.example", type="A", tcp=False, server=None, state=".lab", json=False)
    return SimpleNamespace(**{**base, **kw})


@pytest.mark.parametrize("tcp", [False, True])
async def test_dig_command_prints_the_answer(lab, capsys, tcp):
    code = await asyncio.to_thread(dig_command, _dig_args(server=f"{lab.host}:{lab.port}", tcp=tcp))
    out = capsys.readouterr().out
    assert code == 0
    assert "status: NOERROR" in out and "customers.saas.example." in out and SAAS_V1 in out
    assert f"SERVER: {lab.host}#{lab.port}({'TCP' if tcp else 'UDP'})" in out


async def test_dig_command_json_via_endpoints_file(lab, capsys, tmp_path):
    (tmp_path / "endpoints.json").write_text(json.dumps({"dns": {"host": lab.host, "port": lab.port}}))
    code = await asyncio.to_thread(dig_command, _dig_args(name="nope.victim.example", state=str(tmp_path), json=True))
    got = json.loads(capsys.readouterr().out)
    assert code == 0
    assert got["status"] == "NXDOMAIN" and "aa" in got["flags"]
    assert got["authority"][0]["type"] == "SOA" and got["authority"][0]["name"] == "victim.example"


async def test_dig_command_shows_poisoning(lab, capsys):
    lab.resolver.set_override("www.victim.example", "A", "listener:saas-v1")
    await asyncio.to_thread(dig_command, _dig_args(name="www.victim.example", server=f"{lab.host}:{lab.port}", json=True))
    assert [a["value"] for a in json.loads(capsys.readouterr().out)["answer"]] == [SAAS_V1]


@pytest.mark.parametrize("kw, code, message", [
    (dict(state="/nonexistent-lab-state"), 2, "start the lab with `sni-lab up` or pass --server"),
    (dict(server="127.0.0.1:5353", type="BOGUS"), 2, "unknown record type"),
    (dict(server="localhost"), 2, "HOST:PORT"),
    (dict(server="127.0.0.1:5353", name="bad name!"), 2, "bad host"),
])
def test_dig_command_user_mistakes(capsys, kw, code, message):
    assert dig_command(_dig_args(**kw)) == code
    err = capsys.readouterr().err
    assert err.startswith("sni-lab: error: ") and message in err and "Traceback" not in err


def test_dig_command_no_answer_is_a_clear_error(capsys):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:  # bound, never answers
        silent.bind((HOST, 0))
        code = dig_command(_dig_args(server=f"{HOST}:{silent.getsockname()[1]}"))
    err = capsys.readouterr().err
    assert code == 1 and "no answer" in err and "sni-lab up" in err


def test_dig_command_nothing_listening_over_tcp(capsys):
    with socket.socket() as s:  # a port that was free a moment ago
        s.bind((HOST, 0))
        port = s.getsockname()[1]
    code = dig_command(_dig_args(server=f"{HOST}:{port}", tcp=True))
    err = capsys.readouterr().err
    assert code == 1 and "cannot reach" in err
