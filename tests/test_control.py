"""The control plane over real sockets, against a real `sni-lab up` process that we kill and restart."""
import asyncio
import json
import re
import signal
import subprocess
import sys

import aiohttp
import pytest

from lab.client import probe
from lab.topology import default_path


class UpProcess:
    """`sni-lab up` on free ports in a temp dir; `restart()` kills it hard and starts it again."""

    def __init__(self, tmp_path, model="v2"):
        self.dir = tmp_path
        config = tmp_path / "lab.toml"
        config.write_text(re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text()))
        self.cmd = [sys.executable, "-m", "lab", "up", "--config", str(config), "--certs", str(tmp_path / "certs"),
                    "--state", str(tmp_path / "state"), "--json", "--model", model]
        self.proc = None
        self.ep = None

    async def start(self, cmd=None):
        self.proc = await asyncio.create_subprocess_exec(*(cmd or self.cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line, (await self.proc.stderr.read()).decode()
        self.ep = json.loads(line)
        return self.ep

    async def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def restart(self):
        await self.kill()
        # No --model this time: the saved one must come back.
        return await self.start([c for c in self.cmd if c not in ("--model", self.cmd[-1])])

    def listener(self, name):
        return next(l for l in self.ep["edge"] if l["name"] == name)

    async def api(self, method, path, body=None, token=True):
        headers = {"Authorization": f"Bearer {self.ep['control']['token']}"} if token else {}
        async with aiohttp.ClientSession() as s:
            async with s.request(method, self.ep["control"]["url"] + path, json=body, headers=headers) as r:
                return r.status, await r.json()

    async def get(self, listener, sni, host=None):
        l = self.listener(listener)
        return await probe(l["host"], l["port"], sni, [{"host": host or sni}], self.ep["ca"])


@pytest.fixture
async def up(tmp_path):
    lab = UpProcess(tmp_path)
    await lab.start()
    yield lab
    if lab.proc.returncode is None:
        lab.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(lab.proc.wait(), 5)


async def test_attacker_registration_stays_pending_and_unrouted(up):
    status, h = await up.api("POST", "/hostnames", {"hostname": "www.victim.example", "zone": "saas.example"})
    assert status == 201 and h["status"] == "pending" and h["txt_token"] and h["http_token"]
    # even with the resolver poisoned so the name points at the SaaS zone's address
    await up.api("POST", "/dns/overrides", {"name": "www.victim.example", "value": up.listener("saas-v1")["host"]})
    for _ in range(3):
        status, h = await up.api("POST", f"/hostnames/{h['id']}/verify")
        assert status == 200 and h["status"] == "pending" and not h["routable"]
        assert "ownership not proven" in h["reason"]
    out = await up.get("saas-v1", "www.victim.example")
    assert out.response.origin == "victim"  # v2 routes it to its owner, never the SaaS origin
    # and the only certificate for it is the victim zone's own, not one issued for the SaaS tenant
    assert "www.victim.example" not in out.cert_names and "*.victim.example" in out.cert_names


async def test_new_customer_verified_routed_moved_and_survives_restarts(up):
    status, h = await up.api("POST", "/hostnames", {"hostname": "www.newshop.test", "zone": "saas.example"})
    assert status == 201
    # before verification: no certificate at all for that SNI
    out = await up.get("anycast", "www.newshop.test")
    assert out.tls_error and "UNRECOGNIZED_NAME" in out.tls_error.upper()
    await up.api("POST", "/dns/records", {"name": "www.newshop.test", "type": "CNAME", "value": "customers.saas.example"})
    await up.api("POST", "/dns/records", {"name": h["txt_name"], "type": "TXT", "value": h["txt_token"]})

    await up.restart()  # killed between steps: records and the registration must survive
    status, h = await up.api("POST", "/hostnames/www.newshop.test/verify")
    assert h["status"] == "active", h["reason"]
    out = await up.get("anycast", "www.newshop.test")
    assert out.cert_valid_for("www.newshop.test") and out.cert_names == ["www.newshop.test"]
    assert out.response.status == 200 and out.response.origin == "saas"

    await up.restart()
    assert (await up.api("GET", "/model"))[1]["model"] == "v2"
    out = await up.get("anycast", "www.newshop.test")
    assert out.response.origin == "saas"  # still active, still certified after a restart

    await up.api("POST", "/dns/records", {"name": "www.newshop.test", "type": "CNAME", "value": "elsewhere.customer.example"})
    status, h = await up.api("POST", "/hostnames/www.newshop.test/verify")
    assert h["status"] == "moved" and "no longer points at customers.saas.example" in h["reason"]
    out = await up.get("anycast", "www.newshop.test")
    assert out.tls_error  # the edge stopped serving its certificate...
    out = await up.get("anycast", "app.saas.example", "www.newshop.test")
    assert out.response.status == 421 and out.response.origin is None  # ...and routing it

    await up.restart()
    status, h = await up.api("GET", "/hostnames/www.newshop.test")
    assert h["status"] == "moved"
    status, events = await up.api("GET", "/events?kind=hostname")
    assert [e["new"] for e in events if e["hostname"] == "www.newshop.test"] == ["pending", "active", "moved"]


async def test_mutations_need_the_token(up):
    before = await up.api("GET", "/hostnames")
    for method, path, body in [("POST", "/hostnames", {"hostname": "x.newshop.test"}), ("PUT", "/model", {"model": "v1"}),
                               ("POST", "/dns/overrides", {"name": "www.victim.example", "value": "127.0.0.11"}),
                               ("DELETE", "/hostnames/shop.customer.example", None)]:
        status, body = await up.api(method, path, body, token=False)
        assert status == 401 and "token" in body["error"]
    assert await up.api("GET", "/hostnames") == before
    assert (await up.api("GET", "/model"))[1]["model"] == "v2"
    assert (await up.api("GET", "/dns/overrides"))[1] == []
    async with aiohttp.ClientSession() as s:
        async with s.get(up.ep["control"]["url"] + "/health") as r:
            assert r.status == 200


async def test_model_switch_at_run_time_and_bad_input(up):
    assert (await up.get("saas-v1", "www.victim.example")).response.origin == "victim"
    assert (await up.api("PUT", "/model", {"model": "v1"}))[0] == 200
    assert (await up.get("saas-v1", "www.victim.example")).response.origin == "saas"
    status, body = await up.api("PUT", "/model", {"model": "v9"})
    assert status == 400 and body["error"] == "field 'model': 'v9' is not one of host, v1, v1-waf, v2, v2-strict"
    status, body = await up.api("POST", "/hostnames", {"hostname": "bad host!"})
    assert status == 400
    status, body = await up.api("POST", "/dns/overrides", {"name": "www.victim.example", "value": "not-an-ip"})
    assert status == 400


async def test_events_sse_and_openapi(up):
    url = up.ep["control"]["url"]
    async with aiohttp.ClientSession() as s:
        async with s.get(url + "/openapi.json") as r:
            doc = await r.json()
        assert doc["openapi"].startswith("3.") and {"/hostnames", "/dns/overrides", "/model", "/events"} <= set(doc["paths"])
        async with s.get(url + "/events?kind=route", headers={"Accept": "text/event-stream"}) as stream:
            assert stream.headers["Content-Type"] == "text/event-stream"
            await up.get("saas-v1", "www.victim.example")
            data = None
            while data is None:
                line = (await asyncio.wait_for(stream.content.readline(), 10)).decode()
                if line.startswith("data: "):
                    data = json.loads(line[6:])
    assert data["kind"] == "route.decision" and data["origin"] == "victim" and data["model"] == "v2"


def test_cli_over_the_api(tmp_path):
    """The CLI drives a running lab; a CLI with no lab says so in one line."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "lab", *a, "--state", str(tmp_path / "state")],
                                    capture_output=True, text=True, timeout=30)
    res = run("hostnames", "list")
    assert res.returncode == 1 and "no running lab" in res.stderr and "Traceback" not in res.stderr

    async def scenario():
        lab = UpProcess(tmp_path)
        await lab.start()
        try:
            outs = await asyncio.gather(*[asyncio.to_thread(run, *a) for a in (
                ["hostnames", "add", "www.newshop.test"], ["model", "v1-waf"],
                ["dns", "poison", "www.victim.example", "127.0.0.11", "--client", "127.0.0.1", "--expires", "30"])])
            assert all(o.returncode == 0 for o in outs), [o.stderr for o in outs]
            listed = json.loads((await asyncio.to_thread(run, "hostnames", "list", "--json")).stdout)
            assert {h["name"]: h["status"] for h in listed}["www.newshop.test"] == "pending"
            assert (await asyncio.to_thread(run, "model")).stdout.strip() == "v1-waf"
            dig = await asyncio.to_thread(run, "dig", "www.victim.example")
            assert "127.0.0.11" in dig.stdout
            cleared = await asyncio.to_thread(run, "dns", "clear")
            assert "removed 1" in cleared.stdout
            events = await asyncio.to_thread(run, "events", "--kind", "dns", "--json")
            assert any(e["poisoned"] for e in json.loads(events.stdout))
            bad = await asyncio.to_thread(run, "hostnames", "verify", "nope.example")
            assert bad.returncode == 2 and "no custom hostname" in bad.stderr
            locked = await asyncio.to_thread(run, "reset", "--yes")
            assert locked.returncode == 1 and "stop the running lab first" in locked.stderr
        finally:
            lab.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(lab.proc.wait(), 5)
        assert lab.proc.returncode == 0

    asyncio.run(scenario())
    assert run("reset").returncode == 2  # no tty, no --yes: refuses
    assert run("reset", "--yes").returncode == 0
    assert not (tmp_path / "state" / "endpoints.json").exists()
