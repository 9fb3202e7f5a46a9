"""The control plane over real sockets, against a real `sni-lab up` process that we kill and restart."""
import asyncio
import json
import signal
import subprocess
import sys

import aiohttp
import pytest

from lab.client import probe


class UpProcess:
    """`sni-lab up` on free ports in a temp dir; `restart()` kills it hard and starts it again."""

    def __init__(self, tmp_path, model="v2"):
        self.dir = tmp_path
        self.cmd = [sys.executable, "-m", "lab", "up", "--free-ports", "--certs", str(tmp_path / "certs"),
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

    async def api(self, method, path, body=None, token=True, headers=None, data=None):
        headers = {**({"Authorization": f"Bearer {self.ep['control']['token']}"} if token else {}), **(headers or {})}
        async with aiohttp.ClientSession() as s:
            async with s.request(method, self.ep["control"]["url"] + path, json=body, data=data, headers=headers) as r:
                return r.status, await r.json()

    async def raw(self, request: bytes) -> bytes:
        """Bytes no polite client sends, straight to the control plane; the status line back."""
        host, port = self.ep["control"]["url"].removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(request.replace(b"{port}", port.encode()))
            return await asyncio.wait_for(reader.readline(), 5)
        finally:
            writer.close()

    async def everything(self):
        return [await self.api("GET", p) for p in ("/hostnames", "/dns/records", "/dns/overrides", "/model")]

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
        # the published request schemas are the tables the API validates with
        override = doc["components"]["schemas"]["NewOverride"]
        assert override["required"] == ["name", "value"] and override["additionalProperties"] is False
        assert override["properties"]["expires_in"]["exclusiveMinimum"] == 0
        assert override["properties"]["client"]["format"] == "ip"
        assert doc["components"]["schemas"]["Record"]["properties"]["ttl"] == {
            "type": "integer", "minimum": 0, "maximum": 2 ** 31 - 1, "description": "seconds (default: the world's ttl)"}
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
            assert {h["name"]: h["status"] for h in listed["hostnames"]}["www.newshop.test"] == "pending"
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


RECORD = {"name": "x.victim.example", "type": "A", "value": "127.0.0.11"}
OVERRIDE = {"name": "www.victim.example", "value": "127.0.0.11"}
BAD_BODIES = [
    ("POST", "/dns/records", {**RECORD, "ttl": None}, "field 'ttl': expected an integer, got null"),
    ("POST", "/dns/records", {**RECORD, "ttl": [1]}, "field 'ttl': expected an integer, got a list"),
    ("POST", "/dns/records", {**RECORD, "ttl": True}, "field 'ttl': expected an integer, got a boolean"),
    ("POST", "/dns/records", {**RECORD, "ttl": 1.5}, "field 'ttl': expected an integer, got a number"),
    ("POST", "/dns/records", {**RECORD, "ttl": -1}, "field 'ttl': must be at least 0, got -1"),
    ("POST", "/dns/records", {**RECORD, "ttl": 2 ** 31}, "field 'ttl': must be at most 2.14748e+09, got 2147483648"),
    ("POST", "/dns/records", {**RECORD, "value": 5}, "field 'value' value: expected a string, got an integer"),
    ("POST", "/dns/records", {**RECORD, "value": ["127.0.0.11", 5]}, "field 'value'[1]: expected a string, got an integer"),
    ("POST", "/dns/records", {**RECORD, "value": []}, "field 'value': expected 1 to 64 values, got 0"),
    ("POST", "/dns/records", {**RECORD, "value": "not-an-ip"}, "not an A address or known listener:/origin: name"),
    ("POST", "/dns/records", {**RECORD, "type": "MX"}, "field 'type': 'MX' is not one of A, AAAA, CNAME, TXT"),
    ("POST", "/dns/records", {**RECORD, "name": 5}, "field 'name': expected a string, got an integer"),
    ("POST", "/dns/records", {**RECORD, "name": "a" * 300}, "field 'name': longer than 253 characters"),
    ("POST", "/dns/records", {**RECORD, "name": "x.elsewhere.org"}, "outside the lab zones"),
    ("POST", "/dns/records", {**RECORD, "tll": 5}, "unknown field(s): 'tll'"),
    ("POST", "/dns/records", {"name": "x.victim.example"}, "missing field(s): type, value"),
    ("POST", "/dns/records", [RECORD], "body must be a JSON object, got a list"),
    ("POST", "/dns/overrides", {**OVERRIDE, "expires_in": [1]}, "field 'expires_in': expected a number, got a list"),
    ("POST", "/dns/overrides", {**OVERRIDE, "expires_in": "10"}, "field 'expires_in': expected a number, got a string"),
    ("POST", "/dns/overrides", {**OVERRIDE, "expires_in": 0}, "field 'expires_in': must be greater than 0, got 0"),
    ("POST", "/dns/overrides", {**OVERRIDE, "expires_in": 1e12}, "field 'expires_in': must be at most"),
    ("POST", "/dns/overrides", {**OVERRIDE, "client": 2130706433}, "field 'client': expected a string, got an integer"),
    ("POST", "/dns/overrides", {**OVERRIDE, "client": "localhost"}, "field 'client': not an IP address: 'localhost'"),
    ("POST", "/dns/overrides", {**OVERRIDE, "value": 5}, "field 'value' value: expected a string, got an integer"),
    ("POST", "/dns/overrides", {**OVERRIDE, "ttl": None}, "field 'ttl': expected an integer, got null"),
    ("PUT", "/model", {"model": 5}, "field 'model': expected a string, got an integer"),
    ("PUT", "/model", {}, "missing field(s): model"),
    ("POST", "/hostnames", {"hostname": None}, "field 'hostname': expected a string, got null"),
    ("POST", "/hostnames", {"hostname": "x.newshop.test", "zone": 5}, "field 'zone': expected a string, got an integer"),
]
BAD_TEXT = [  # JSON that Python's parser would take and no other would, or numbers beyond a double
    '{"name": "www.victim.example", "value": "127.0.0.11", "expires_in": 1e400}',
    '{"name": "www.victim.example", "value": "127.0.0.11", "expires_in": Infinity}',
    '{"name": "www.victim.example", "value": "127.0.0.11", "expires_in": NaN}',
    '{"name": "www.victim.example", "value": "127.0.0.11", "expires_in": -Infinity}',
    '{"name": "www.victim.example", "value": "127.0.0.11"',
]
BAD_QUERIES = [("GET", "/events?since=abc"), ("GET", "/events?since=-1"), ("GET", "/events?limit=0"),
               ("GET", "/events?limit=99999999999"), ("GET", "/events?colour=red"), ("DELETE", "/dns/records"),
               ("DELETE", "/dns/records?name=x.victim.example&type=MX")]


async def test_bad_input_is_a_clear_400_and_changes_nothing(up):
    before = await up.everything()
    for method, path, body, message in BAD_BODIES:
        status, answer = await up.api(method, path, body)
        assert status == 400 and message in answer["error"], (body, answer)
    for text in BAD_TEXT:
        status, answer = await up.api("POST", "/dns/overrides", data=text, headers={"Content-Type": "application/json"})
        assert status == 400 and answer["error"] in ("body is not valid JSON", "field 'expires_in': must be a finite "
                                                                                "number, got inf"), (text, answer)
    for method, path in BAD_QUERIES:
        status, answer = await up.api(method, path)
        assert status == 400 and ("parameter" in answer["error"] or "field" in answer["error"]), (path, answer)
    assert await up.everything() == before
    # what every reader gets is strict JSON
    async with aiohttp.ClientSession() as s:
        for path in ("/dns/overrides", "/events", "/hostnames"):
            async with s.get(up.ep["control"]["url"] + path) as r:
                json.loads(await r.text(), parse_constant=lambda c: pytest.fail(f"{path} sent {c}"))


async def test_authorization_scheme_is_case_insensitive_and_odd_bytes_are_401(up):
    token = up.ep["control"]["token"]
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, _ = await up.api("PUT", "/model", {"model": "v1"}, token=False,
                                 headers={"Authorization": f"{scheme} {token}"})
        assert status == 200, scheme
    for value in (b"Bearer \xff\xfe\xfd", b"Bearer " + token.encode() + b"\xff", b"\xff" + token.encode()):
        line = await up.raw(b"PUT /model HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: " + value +
                            b"\r\nContent-Type: application/json\r\nContent-Length: 15\r\n\r\n{\"model\": \"v2\"}")
        assert line.startswith(b"HTTP/1.1 401"), (value, line)
    assert (await up.api("GET", "/model"))[1]["model"] == "v1"


async def test_only_the_labs_own_names_in_host(up):
    """A DNS-rebinding page (its name now resolving to 127.0.0.1) reads nothing and changes nothing."""
    port = up.ep["control"]["url"].rsplit(":", 1)[1]
    before = await up.everything()
    for host in (f"evil.test:{port}", "evil.test", f"127.0.0.1.evil.test:{port}", f"localhost:{int(port) + 1}"):
        for method, path, body in (("GET", "/hostnames", None), ("GET", "/events", None), ("GET", "/health", None),
                                   ("PUT", "/model", {"model": "v1"})):
            status, answer = await up.api(method, path, body, headers={"Host": host})
            assert status == 403 and "is not a name of this lab's control plane" in answer["error"], (host, path)
    assert await up.everything() == before
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LocalHost:{port}", f"[::1]:{port}", "localhost"):
        assert (await up.api("GET", "/hostnames", headers={"Host": host}))[0] == 200, host
    assert (await up.raw(b"GET /health HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 400")


def test_cli_refuses_an_expiry_that_is_not_a_number_of_seconds(tmp_path):
    for bad in ("inf", "nan", "1e400", "-5", "0", "soon"):
        res = subprocess.run([sys.executable, "-m", "lab", "dns", "poison", "www.victim.example", "127.0.0.11",
                              "--expires", bad, "--state", str(tmp_path)], capture_output=True, text=True, timeout=30)
        assert res.returncode == 2 and "Traceback" not in res.stderr, bad
        assert "argument --expires: expected seconds" in res.stderr.splitlines()[-1], res.stderr


def test_run_against_a_running_lab_leaves_no_hostname_behind(tmp_path):
    """Undo means gone: a scenario's hostnames are purged, while a user's own `rm` keeps history."""
    run = lambda *a: subprocess.run([sys.executable, "-m", "lab", *a, "--state", str(tmp_path / "state")],
                                    capture_output=True, text=True, timeout=120)
    listed = lambda: json.loads(run("hostnames", "list", "--all", "--json").stdout)["hostnames"]

    async def scenario():
        lab = UpProcess(tmp_path)
        await lab.start()
        try:
            before = await asyncio.to_thread(listed)
            res = await asyncio.to_thread(run, "run", "custom-hostname-active", "custom-hostname-deleted",
                                          "--model", "v1,v2")
            assert res.returncode == 0, res.stdout + res.stderr
            assert [(h["id"], h["name"], h["status"]) for h in await asyncio.to_thread(listed)] == \
                   [(h["id"], h["name"], h["status"]) for h in before]
            added = json.loads((await asyncio.to_thread(run, "hostnames", "add", "www.newshop.test", "--json")).stdout)
            assert (await asyncio.to_thread(run, "hostnames", "rm", "www.newshop.test")).returncode == 0
            mine = [h for h in await asyncio.to_thread(listed) if h["id"] == added["id"]]
            assert [h["status"] for h in mine] == ["deleted"]
            # purging is a change like any other: the token, and a valid flag
            assert (await lab.api("DELETE", f"/hostnames/{added['id']}?purge=1", token=False))[0] == 401
            status, answer = await lab.api("DELETE", f"/hostnames/{added['id']}?purge=2")
            assert status == 400 and "field 'purge': must be at most 1" in answer["error"]
            assert [h["id"] for h in await asyncio.to_thread(listed)].count(added["id"]) == 1
        finally:
            lab.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(lab.proc.wait(), 5)

    asyncio.run(scenario())


async def test_validation_mode_saved_applied_and_restored(up):
    status, v = await up.api("GET", "/validation")
    assert status == 200 and v["mode"] == "multi" and v["vantages"] == ["127.0.0.41", "127.0.0.42", "127.0.0.43"]
    assert not v["http_through_edge"]
    status, _ = await up.api("PUT", "/validation", {"mode": "single"}, token=False)
    assert status == 401
    status, err = await up.api("PUT", "/validation", {"mode": "none"})
    assert status == 400 and "mode" in err["error"]
    assert (await up.api("GET", "/validation"))[1]["mode"] == "multi"  # an error changes nothing
    status, v = await up.api("PUT", "/validation", {"mode": "single"})
    assert status == 200 and v["mode"] == "single" and v["vantages"] == ["127.0.0.1"] and v["http_through_edge"]
    status, events = await up.api("GET", "/events?kind=lab.validation")
    assert [e["mode"] for e in events] == ["single"]
    await up.restart()
    assert (await up.api("GET", "/validation"))[1]["mode"] == "single"


async def poison_validator(up, h, clients):
    """The attacker's forged proof: the TXT token and a CNAME to the target, for `clients` only."""
    for client in clients:
        for rtype, name, value in (("TXT", h["txt_name"], h["txt_token"]),
                                   ("CNAME", "www.victim.example", "customers.saas.example")):
            status, _ = await up.api("POST", "/dns/overrides", {"name": name, "type": rtype, "value": value,
                                                                "client": client})
            assert status == 201


async def test_a_poisoned_single_validator_activates_the_victims_name_and_v2_sends_it_to_the_saas(up):
    await up.api("PUT", "/validation", {"mode": "single"})
    _, h = await up.api("POST", "/hostnames", {"hostname": "www.victim.example", "zone": "saas.example"})
    await poison_validator(up, h, ["127.0.0.1"])
    _, h = await up.api("POST", f"/hostnames/{h['id']}/verify")
    assert h["status"] == "active" and h["ownership"] == "txt", h["reason"]
    assert h["poisoned_by"]  # the lab knows; the provider did not
    # the victim's own DNS never changed, but an exact active custom hostname beats the zone (v2)
    out = await up.get("anycast", "www.victim.example")
    assert out.cert_valid_for("www.victim.example") and out.response.origin == "saas"
    assert "an exact custom hostname beats zone victim.example's own host" in out.response.decision


async def test_multi_vantage_validation_is_not_fooled_by_poisoning_one_vantage(up):
    _, h = await up.api("POST", "/hostnames", {"hostname": "www.victim.example", "zone": "saas.example"})
    await poison_validator(up, h, ["127.0.0.1", "127.0.0.41"])
    _, h = await up.api("POST", f"/hostnames/{h['id']}/verify")
    assert h["status"] == "pending"
    assert "vantage points disagree" in h["last_error"] and "not evidence" in h["last_error"]
    out = await up.get("anycast", "www.victim.example")
    assert out.response.origin == "victim"
    # the poisoning gone, the vantage points agree: nothing proven, and HTTP proof is never
    # taken for a name the edge already serves (the reason says so)
    for name in (h["txt_name"], "www.victim.example"):
        assert (await up.api("DELETE", "/dns/overrides/" + name))[0] == 200
    _, h = await up.api("POST", f"/hostnames/{h['id']}/verify")
    assert h["last_error"] is None
    assert h["status"] == "pending" and "HTTP proof not accepted: its name is already served by the edge" in h["reason"]


async def test_zones_added_listed_refused_under_v1_waf_restored_and_removed(up):
    body = {"name": "saas3.example", "origin": "saas2", "saas": True, "v1_listener": "spare-v1",
            "hosts": ["saas3.example", "app.saas3.example"], "cname_target": "app.saas3.example"}
    await up.api("PUT", "/model", {"model": "v1-waf"})
    status, err = await up.api("POST", "/zones", body)
    assert status == 403 and err["code"] == "v1-closed" and "no new zone goes on v1" in err["error"]
    status, zones = await up.api("GET", "/zones")
    assert "saas3.example" not in {z["name"] for z in zones}
    # the zone already on the allowlist keeps v1 routing (its WAF allowlist blocks the victim's name)
    out = await up.get("saas-v1", "www.victim.example")
    assert out.response.status == 403
    # a v2 zone is welcome under v1-waf; then removed
    status, z = await up.api("POST", "/zones", {k: v for k, v in body.items() if k != "v1_listener"})
    assert status == 201 and z["added"] and not z["v1_listener"]
    assert (await up.api("DELETE", "/zones/saas3.example"))[0] == 200

    await up.api("PUT", "/model", {"model": "v1"})
    status, z = await up.api("POST", "/zones", body)
    assert status == 201 and z["v1_listener"] == "spare-v1" and not z["v1_allowlisted"]
    out = await up.get("spare-v1", "www.victim.example")  # v1: the new zone's address ignores Host
    assert out.cert_valid_for("www.victim.example") and out.response.origin == "saas2"
    await up.restart()
    status, zones = await up.api("GET", "/zones")
    assert {z["name"]: z["added"] for z in zones}["saas3.example"] is True
    out = await up.get("spare-v1", "app.saas3.example")
    assert out.cert_valid_for("app.saas3.example") and out.response.origin == "saas2"
    status, err = await up.api("DELETE", "/zones/victim.example")
    assert status == 400 and "world file" in err["error"]
    assert (await up.api("DELETE", "/zones/saas3.example"))[0] == 200
    await up.restart()
    assert "saas3.example" not in {z["name"] for z in (await up.api("GET", "/zones"))[1]}


@pytest.mark.parametrize("body, message", [
    ({"name": "x.example", "origin": "nowhere"}, "unknown origin"),
    ({"name": "x.example", "origin": "saas2", "v1_listener": "spare-v1"}, "only a SaaS zone"),
    ({"name": "x.example", "origin": "saas2", "saas": True, "v1_listener": "saas-v1"}, "already the v1 address"),
    ({"name": "x.example", "origin": "saas2", "saas": True, "v1_listener": "nope"}, "unknown listener"),
    ({"name": "x.example", "origin": "saas2", "hosts": ["www.other.example"]}, "not inside zone"),
    ({"name": "login.victim.example", "origin": "saas2"}, "overlaps zone victim.example"),
    ({"name": "x.com", "origin": "saas2"}, "outside the lab's TLDs"),
    ({"name": "x.example", "origin": "saas2", "saas": "yes"}, "expected true or false"),
    ({"name": "x.example"}, "missing field"),
])
async def test_a_bad_zone_is_a_clear_error_and_changes_nothing(up, body, message):
    await up.api("PUT", "/model", {"model": "v1"})
    before = await up.api("GET", "/zones")
    status, err = await up.api("POST", "/zones", body)
    assert status in (400, 409) and message in err["error"], err
    assert await up.api("GET", "/zones") == before


def test_cli_validation_and_zones(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "lab", *a, "--state", str(tmp_path / "state")],
                                    capture_output=True, text=True, timeout=30)

    async def scenario():
        lab = UpProcess(tmp_path, model="v1-waf")
        await lab.start()
        try:
            res = await asyncio.to_thread(run, "validation")
            assert res.returncode == 0 and res.stdout.startswith("multi: from 127.0.0.41, 127.0.0.42, 127.0.0.43")
            res = await asyncio.to_thread(run, "validation", "single", "--json")
            assert json.loads(res.stdout)["mode"] == "single"
            res = await asyncio.to_thread(run, "zones", "add", "saas3.example", "--origin", "saas2", "--saas",
                                          "--v1-listener", "spare-v1")
            assert res.returncode == 1 and "no new zone goes on v1" in res.stderr and "Traceback" not in res.stderr
            res = await asyncio.to_thread(run, "zones", "add", "saas3.example", "--origin", "saas2", "--saas",
                                          "--host", "app.saas3.example")
            assert res.returncode == 0 and "[added]" in res.stdout
            listed = json.loads((await asyncio.to_thread(run, "zones", "list", "--json")).stdout)
            assert {z["name"]: z["added"] for z in listed} == {"victim.example": False, "saas.example": False,
                                                               "saas2.example": False, "saas3.example": True}
            assert (await asyncio.to_thread(run, "zones", "rm", "saas3.example")).returncode == 0
            res = await asyncio.to_thread(run, "zones", "rm", "saas.example")
            assert res.returncode == 2 and "world file" in res.stderr
        finally:
            lab.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(lab.proc.wait(), 5)

    asyncio.run(scenario())
