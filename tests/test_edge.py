"""The native edge over real sockets: real TLS verified against the lab CA, real origins."""
import asyncio
import json
import subprocess

import pytest
import pytest_asyncio

from lab.client import probe
from lab.run import Lab
from tests.conftest import need

pytestmark = pytest.mark.asyncio(loop_scope="module")
MODELS = ("host", "v1", "v1-waf", "v2", "v2-strict")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(world, tmp_path_factory):
    async with Lab(world.with_free_ports(), tmp_path_factory.mktemp("certs")) as running:
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
    tls = [e for e in lab.events.since(0) if e.get("conn") == conn and e["kind"].startswith("tls.")]
    assert [e["kind"] for e in tls] == ["tls.clienthello", "tls.cert"]
    assert "www.victim.example" in tls[1]["names"] or "*.victim.example" in tls[1]["names"]


async def test_forwarding_sets_proxy_headers(lab):
    out = await get(lab, "anycast", "www.victim.example", model="v2", headers=[("Connection", "keep-alive, X-Drop"), ("X-Drop", "1")])
    assert out.response.status == 200
