"""The edge over real sockets, on both engines: real TLS verified against the lab CA, real origins."""
import asyncio
import json
import ssl
import subprocess
import time

import pytest
import pytest_asyncio

from lab.client import probe
from lab.proxy import Proxy, answer_address
from lab.run import Lab
from lab.strips import Fold
from tests.conftest import need, victim_at

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODELS = ("host", "v1", "v1-waf", "v2", "v2-strict")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(engine, world, tmp_path_factory):
    async with Lab(world.with_free_ports(), tmp_path_factory.mktemp("certs"), engine=engine) as running:
        assert running.edge.engine == engine
        yield running


async def run(*args, **kw):
    # The lab serves from this very event loop: a blocking subprocess call would starve it.
    return await asyncio.to_thread(subprocess.run, *args, **kw)


async def get(lab, listener, sni, host=None, *, model, http2=False, headers=(), path="/"):
    lab.set_model(model)
    l = lab.world.listener_by_name[listener]
    return await probe(l.host, l.port, sni, [{"host": host or sni, "path": path, "headers": list(headers)}],
                       str(lab.ca.cert_path), http2=http2)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
@pytest.mark.parametrize("listener,name,origin", [
    ("anycast", "www.victim.example", "victim"),
    ("saas-v1", "app.saas.example", "saas"),
    ("saas-v1", "shop.customer.example", "saas"),
    ("saas2-v1", "app.saas2.example", "saas2"),
])
async def test_legit_requests_reach_their_origin(lab, model, http2, listener, name, origin):
    out = await get(lab, listener, name, model=model, http2=http2)
    assert out.cert_valid_for(name), out
    assert out.alpn == ("h2" if http2 else "http/1.1")
    assert out.response.status == 200 and out.response.origin == origin, out.response.decision


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_the_attack_lands_under_v1_only(lab, http2):
    attack = lambda model: get(lab, "saas-v1", "www.victim.example", model=model, http2=http2)
    v1 = await attack("v1")
    assert v1.cert_valid_for("www.victim.example")  # the padlock is green...
    assert v1.response.origin == "saas"  # ...and the SaaS origin answers
    assert b"www.victim.example" in v1.response.body
    waf = await attack("v1-waf")
    assert waf.response.status == 403 and waf.response.origin is None
    assert "rule=v1-host-allowlist" in waf.response.decision
    for model in ("v2", "v2-strict", "host"):
        out = await attack(model)
        assert out.response.origin == "victim", out.response.decision


async def test_v2_strict_refuses_host_other_than_sni(lab):
    out = await get(lab, "anycast", "shop.customer.example", "www.victim.example", model="v2-strict")
    assert out.response.status == 421 and "sni-host-mismatch" in out.response.decision
    out = await get(lab, "anycast", "shop.customer.example", "www.victim.example", model="v2")
    assert out.response.origin == "victim"


async def test_refusal_json_variant(lab):
    out = await get(lab, "saas-v1", "www.victim.example", model="v1-waf", headers=[("Accept", "application/json")])
    body = json.loads(out.response.body)
    assert body["status"] == 403 and body["code"] == "waf-block" and body["rule"] == "v1-host-allowlist"
    html = await get(lab, "saas-v1", "www.victim.example", model="v1-waf")
    assert html.response.header("content-type").startswith("text/html") and b"waf-block" in html.response.body


async def test_unknown_sni_fails_handshake(lab):
    out = await get(lab, "anycast", "nothing.example", model="v2")
    assert out.tls_error and "UNRECOGNIZED_NAME" in out.tls_error.upper()
    assert not out.responses


async def test_openssl_sees_alert_112(lab):
    openssl = need("openssl")
    l = lab.world.listener_by_name["anycast"]
    res = await run([openssl, "s_client", "-connect", f"{l.host}:{l.port}", "-servername", "nothing.example"],
                         input="", capture_output=True, text=True, timeout=10)
    text = res.stdout + res.stderr
    assert "alert number 112" in text and "unrecognized name" in text


@pytest.mark.parametrize("model,expected", [("v1", ["saas", "saas"]), ("v2", ["saas", "victim"]),
                                            ("v2-strict", ["saas", None])])
async def test_h2_coalesced_connection_decided_per_request(lab, model, expected):
    lab.set_model(model)
    l = lab.world.listener_by_name["saas-v1"]
    out = await probe(l.host, l.port, "shop.customer.example",
                      [{"host": "shop.customer.example"}, {"host": "www.victim.example"}], str(lab.ca.cert_path), http2=True)
    assert out.alpn == "h2" and [r.origin for r in out.responses] == expected
    if model == "v2-strict":
        assert out.responses[1].status == 421


async def test_curl_http2_coalescing_and_by_hand(lab):
    curl = need("curl")
    lab.set_model("v1")
    l = lab.world.listener_by_name["saas-v1"]
    res = await run([curl, "-sS", "-i", "--cacert", str(lab.ca.cert_path), "--resolve",
                          f"www.victim.example:{l.port}:{l.host}", f"https://www.victim.example:{l.port}/"],
                         capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    assert "x-lab-origin: saas" in res.stdout.lower()
    lab.set_model("v2")
    res = await run([curl, "-sS", "-i", "--cacert", str(lab.ca.cert_path), "--resolve",
                          f"www.victim.example:{l.port}:{l.host}", f"https://www.victim.example:{l.port}/"],
                         capture_output=True, text=True, timeout=10)
    assert "x-lab-origin: victim" in res.stdout.lower()


@pytest.mark.parametrize("raw,code", [
    (b"GET / HTTP/1.1\r\nHost: app.saas.example\r\nHost: www.victim.example\r\n\r\n", "duplicate-host"),
    (b"GET https://www.victim.example/ HTTP/1.1\r\nHost: app.saas.example\r\n\r\n", "host-mismatch"),
])
async def test_self_contradicting_targets_get_400(lab, raw, code):
    lab.set_model("v2")
    l = lab.world.listener_by_name["saas-v1"]
    out = await probe(l.host, l.port, "app.saas.example", [{"raw": raw}], str(lab.ca.cert_path))
    assert out.response.status == 400 and code in out.response.decision


async def test_http10_without_host_routes_by_sni(lab):
    lab.set_model("v2")
    l = lab.world.listener_by_name["anycast"]
    out = await probe(l.host, l.port, "www.victim.example", [{"raw": b"GET / HTTP/1.0\r\n\r\n"}], str(lab.ca.cert_path))
    assert out.response.status == 200 and out.response.origin == "victim"


async def test_events_tell_one_story_per_trace(lab):
    out = await get(lab, "saas-v1", "www.victim.example", model="v1", headers=[("X-Lab-Trace", "t-attack-1")])
    assert out.response.origin == "saas"
    story = lab.events.trace("t-attack-1")
    kinds = [e["kind"] for e in story]
    assert kinds == ["route.decision", "origin.hit"]
    decision, hit = story
    assert decision["origin"] == "saas" and decision["listener"] == "saas-v1" and decision["sni"] == "www.victim.example"
    assert hit["origin"] == "saas" and hit["status"] == 200 and hit["host"].startswith("www.victim.example")
    conn = decision["conn"]
    assert decision["trace"] == "t-attack-1" and conn != "t-attack-1"  # the probe named its own trace
    tls = [e for e in lab.events.since(0) if e.get("conn") == conn and e["kind"].startswith("tls.")]
    assert [e["kind"] for e in tls] == ["tls.clienthello", "tls.cert"]
    assert tls[0]["sni"] == "www.victim.example" and tls[1]["names"] == ["victim.example", "*.victim.example"]


async def test_a_connections_first_request_carries_its_trace(lab):
    """Without a trace of its own, the first request on a connection is told under the connection's id."""
    lab.set_model("v2")
    l = lab.world.listener_by_name["anycast"]
    out = await probe(l.host, l.port, "www.victim.example", [{"host": "www.victim.example"}] * 2,
                      str(lab.ca.cert_path), http2=True)
    assert [r.origin for r in out.responses] == ["victim", "victim"]
    hello = [e for e in lab.events.since(0) if e["kind"] == "tls.clienthello"][-1]
    decisions = [e for e in lab.events.since(0) if e["kind"] == "route.decision" and e["conn"] == hello["conn"]]
    assert len(decisions) == 2 and decisions[0]["trace"] == hello["conn"] != decisions[1]["trace"]


async def test_tls_events_carry_the_peer_address(lab):
    lab.set_model("v2")
    l = lab.world.listener_by_name["anycast"]
    ctx = ssl.create_default_context(cafile=str(lab.ca.cert_path))
    for sni, kind in (("www.victim.example", "tls.cert"), ("nothing.example", "tls.error")):
        reader, writer = await asyncio.open_connection(l.host, l.port, local_addr=("127.0.0.9", 0))
        ip, port = writer.get_extra_info("sockname")[:2]
        try:
            await asyncio.wait_for(writer.start_tls(ctx, server_hostname=sni), 5)
            writer.write(f"GET / HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())  # answered: the handshake is told
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        except ssl.SSLError:
            assert kind == "tls.error"
        finally:
            writer.close()
        hello = next(e for e in reversed(lab.events.since(0)) if e["kind"] == "tls.clienthello" and e["sni"] == sni)
        assert (hello["peer"], hello["client"]) == (f"{ip}:{port}", ip)
        (then,) = [e for e in lab.events.since(0) if e.get("conn") == hello["conn"] and e["kind"] in ("tls.cert", "tls.error")]
        assert then["kind"] == kind
        if kind == "tls.error":
            assert then["peer"] == f"{ip}:{port}" and then["error"].startswith("unrecognized_name")


async def test_the_browser_proxys_tunnel_joins_the_edge_connection(lab):
    """The live page joins a tunnel to the request it carried by address: proxy `local` == edge `peer`."""
    lab.set_model("v2")
    l = lab.world.listener_by_name["anycast"]
    proxy = Proxy(lab.world, lab.events, lambda name, client: answer_address(lab.resolver.zones, name, client,
                                                                            time.time()), check_interval=3600)
    await proxy.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*proxy.address, local_addr=("127.0.0.5", 0))
        writer.write(f"CONNECT www.victim.example:{l.port} HTTP/1.1\r\nHost: www.victim.example:{l.port}\r\n\r\n"
                     .encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        ctx = ssl.create_default_context(cafile=str(lab.ca.cert_path))
        ctx.set_alpn_protocols(["http/1.1"])
        await asyncio.wait_for(writer.start_tls(ctx, server_hostname="www.victim.example"), 5)
        writer.write(b"GET / HTTP/1.1\r\nHost: www.victim.example\r\nX-Lab-Trace: t-tunnel-join\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
        writer.close()
    finally:
        await proxy.stop()
    tunnel = [e for e in lab.events.since(0) if e["kind"] == "proxy.tunnel"][-1]
    (decision,) = [e for e in lab.events.trace("t-tunnel-join") if e["kind"] == "route.decision"]
    (hello,) = [e for e in lab.events.since(0) if e["kind"] == "tls.clienthello" and e["conn"] == decision["conn"]]
    assert hello["peer"] == tunnel["local"]
    fold = Fold({lab.world.control.host})
    for e in lab.events.since(0):
        fold.add(e, lab.world)
    strip = fold.strip("r:t-tunnel-join")
    assert strip["client"] == "127.0.0.5" and strip["dns"]["name"] == "www.victim.example"


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_forwarding_sets_proxy_headers(lab, http2):
    """What the origin receives: the host as the client sent it, the proxy headers, no hop-by-hop field."""
    heads = []

    async def origin(reader, writer):
        heads.append((await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).decode("latin-1"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(origin, "127.0.0.1", 0)
    hop = [] if http2 else [("Connection", "keep-alive, X-Drop"), ("X-Drop", "1"), ("Keep-Alive", "timeout=5")]
    try:
        with victim_at(lab, server.sockets[0].getsockname()[1]):
            out = await get(lab, "anycast", "www.victim.example", "WWW.Victim.Example", model="v2", http2=http2,
                            headers=hop + [("X-Forwarded-For", "10.0.0.1"), ("X-Lab-Trace", "t-forward")])
    finally:
        server.close()
        await server.wait_closed()
    assert out.response.status == 200 and out.response.body == b"ok"
    (head,) = heads
    lines = head.split("\r\n")
    fields = [tuple(line.split(": ", 1)) for line in lines[1:] if line]
    assert lines[0] == "GET / HTTP/1.1"
    assert ("Host", "WWW.Victim.Example") in fields  # as sent: the origin picks its tenant by it
    assert dict(fields)["X-Forwarded-For"] == "10.0.0.1, 127.0.0.1"
    assert dict(fields)["X-Forwarded-Proto"] == "https" and dict(fields)["X-Lab-Trace"] == "t-forward"
    assert not {k.lower() for k, _ in fields} & {"connection", "keep-alive", "x-drop", "transfer-encoding"}


async def test_plain_http_on_a_tls_listener_is_dropped(lab):
    l = lab.world.listener_by_name["anycast"]
    reader, writer = await asyncio.open_connection(l.host, l.port)
    writer.write(b"GET / HTTP/1.1\r\nHost: www.victim.example\r\n\r\n")
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    last = [e for e in lab.events.since(0) if e["kind"] == "tls.error"][-1]
    assert last["error"] == "the client did not start TLS" and last["listener"] == "anycast"


async def test_events_carry_the_listener_hit(lab):
    out = await get(lab, "saas2-v1", "app.saas2.example", model="v2", headers=[("X-Lab-Trace", "t-listener")])
    assert out.response.origin == "saas2"
    (decision,) = [e for e in lab.events.trace("t-listener") if e["kind"] == "route.decision"]
    assert decision["listener"] == "saas2-v1" and decision["sni"] == "app.saas2.example"
    hello = [e for e in lab.events.since(0) if e["kind"] == "tls.clienthello" and e["conn"] == decision["conn"]]
    assert hello and hello[0]["listener"] == "saas2-v1" and hello[0]["client"] == "127.0.0.1"


async def test_certificates_follow_the_world(lab):
    """set_world at run time: a custom hostname that stops being active loses its certificate."""
    world = lab.world
    without = world.with_hostnames(tuple(c for c in world.custom_hostnames if c.name != "shop.customer.example"))
    try:
        lab.set_world(without)
        out = await get(lab, "saas-v1", "shop.customer.example", model="v2")
        assert "UNRECOGNIZED_NAME" in out.tls_error.upper()
    finally:
        lab.set_world(world)
    out = await get(lab, "saas-v1", "shop.customer.example", model="v2")
    assert out.cert_valid_for("shop.customer.example") and out.response.origin == "saas"
