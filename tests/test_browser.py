"""Debian's Chromium, driven by Playwright, on the lab's network: the lab proxy for every name,
the lab CA trusted through an NSS database, no certificate bypass of any kind."""
from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from cryptography.x509.oid import NameOID

from lab.browser import CHROMIUM, prepare
from lab.hostnorm import wildcard_of
from lab.origins.bank import read_account
from tests.conftest import need
from tests.test_proxy import VICTIM, https_get, start_lab, tunnel

SHOTS = Path("/tmp/sni-lab-shots")


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt install chromium)")
    need("certutil")
    return pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install playwright)")


@pytest.fixture
async def running(world, tmp_path):
    """A lab with its control plane and its proxy, as `sni-lab up` runs it."""
    lab = await start_lab(world, tmp_path, state_dir=tmp_path / "state", verify_interval=3600, model="v2")
    yield lab, lab.proxy, lab.endpoints
    await lab.stop()


class Shots:
    def __init__(self, tmp_path: Path, prefix: str) -> None:
        self.dirs, self.prefix, self.n = (tmp_path / "shots", SHOTS), prefix, 0

    async def take(self, page, name: str) -> Path:
        self.n += 1
        path = self.dirs[0] / f"{self.prefix}-{self.n}-{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        # An error interstitial may still be painting: settle, and try a bounded few times.
        for attempt in range(3):
            try:
                await page.wait_for_load_state()
                await page.screenshot(path=str(path))
                break
            except Exception:  # playwright's Error: "Unable to capture screenshot"
                if attempt == 2:
                    raise
                await asyncio.sleep(0.5)
        self.dirs[1].mkdir(parents=True, exist_ok=True)
        shutil.copy(path, self.dirs[1] / path.name)
        return path


async def launch(pw, launch_):
    return await pw.chromium.launch_persistent_context(
        str(launch_.user_data_dir), executable_path=CHROMIUM, env=launch_.env, args=list(launch_.args),
        headless=True, viewport={"width": 1280, "height": 720})


async def api(ep: dict, method: str, path: str, body: dict) -> dict:
    control = ep["control"]
    async with aiohttp.ClientSession() as s:
        async with s.request(method, control["url"] + path, json=body,
                             headers={"Authorization": f"Bearer {control['token']}"}) as r:
            assert r.status in (200, 201), await r.text()
            return await r.json()


class Certs:
    """The certificate Chromium accepted for each response, as DevTools shows it: with its SANs
    (Playwright's security_details() names only the subject CN, and the lab's leaves have none)."""

    def __init__(self) -> None:
        self.by_url: dict[str, dict] = {}

    async def watch(self, context, page) -> None:
        session = await context.new_cdp_session(page)
        session.on("Network.responseReceived", lambda e: self.by_url.__setitem__(
            e["response"]["url"], e["response"].get("securityDetails") or {}))
        await session.send("Network.enable")

    def of(self, url: str) -> tuple[str, list[str]]:
        details = self.by_url[url]
        return details["issuer"], details["sanList"]


async def collected(lab) -> list:
    trust = ssl.create_default_context(cafile=lab.endpoints["ca"])  # the collector serves a lab certificate
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:
        async with s.get(lab.endpoints["origins"]["collector"] + "/collected") as r:
            return await r.json()


async def collected_until(lab, done, within: float = 10.0) -> list:
    deadline = asyncio.get_running_loop().time() + within
    while not done(loot := await collected(lab)):
        assert asyncio.get_running_loop().time() < deadline, f"the collector got nothing usable in {within}s: {loot}"
        await asyncio.sleep(0.1)
    return loot


def covers(sans: list[str], name: str) -> bool:
    return name in sans or wildcard_of(name) in sans


async def test_one_open_browser_follows_the_poisoning(chromium, running, tmp_path):
    lab, proxy, ep = running
    shots, certs = Shots(tmp_path, "attack"), Certs()
    start = prepare(ep, tmp_path / "profile")
    lab_ca = lab.ca.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    async with chromium.async_playwright() as pw:
        context = await launch(pw, start)
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            await certs.watch(context, page)
            resp = await page.goto(start.url)  # a certificate error would raise here
            assert resp.ok and (await resp.all_headers())["x-lab-origin"] == "victim"
            issuer, victim_sans = certs.of(start.url)
            assert issuer == lab_ca and covers(victim_sans, VICTIM) and (await resp.security_details())["issuer"] == lab_ca
            await shots.take(page, "victim")
            await page.goto(start.url + "login")
            await page.fill("input[name=user]", "alice")
            await page.fill("input[name=password]", "secret")
            async with page.expect_navigation():
                await page.click("button")
            assert read_account(await page.content()).get("holder") == "alice"
            await shots.take(page, "logged-in")
            assert {t["address"] for t in proxy.tunnels if t["name"] == VICTIM} == {"127.0.0.10"}

            # poisoned through the control plane, for this browser only, while it stays open
            await api(ep, "PUT", "/model", {"model": "v1"})
            await api(ep, "POST", "/dns/overrides", {"name": VICTIM, "value": "listener:saas-v1", "client": "127.0.0.1"})
            certs.by_url.clear()
            resp = await page.goto(start.url)
            assert (await resp.all_headers())["x-lab-origin"] == "saas"
            # the certificate the browser accepted: the lab CA's, the victim's own, on the SaaS address
            assert certs.of(start.url) == (lab_ca, victim_sans)
            (session,) = [c["value"] for c in await context.cookies() if c["name"] == "session"]  # no restart
            await shots.take(page, "poisoned")
            last = [e for e in lab.events.since(0) if e["kind"] == "proxy.tunnel" and e["name"] == VICTIM][-1]
            assert (last["address"], last["poisoned"]) == ("127.0.0.11", True)
            # the payload sent the victim's cookie to the collector; replayed, it opens alice's account
            stolen = await collected_until(lab, lambda loot: any(f"session={session}" in str(x) for x in loot))
            replay = await https_get(*await tunnel(proxy, VICTIM, ep["edge"][0]["port"], "127.0.0.7"), lab, VICTIM,
                                     path="/account", headers=f"Cookie: session={session}\r\n")
            assert replay["x-lab-origin"] == "victim" and read_account(replay["body"]).get("holder") == "alice"

            for model in ("v1-waf", "v2", "v2-strict"):  # the same poisoned browser: no loot any more
                await api(ep, "PUT", "/model", {"model": model})
                resp = await page.goto(start.url)
                await page.wait_for_load_state("networkidle")
                assert (await resp.all_headers()).get("x-lab-origin") != "saas"
                await shots.take(page, model)
                assert len(await collected(lab)) == len(stolen)
        finally:
            await context.close()


async def test_without_the_ca_in_nss_the_browser_refuses(chromium, running, tmp_path):
    lab, _, ep = running
    start = prepare(ep, tmp_path / "untrusted", trust=False)
    async with chromium.async_playwright() as pw:
        context = await launch(pw, start)
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            with pytest.raises(chromium.Error, match="net::ERR_CERT_AUTHORITY_INVALID"):
                await page.goto(start.url)
            await Shots(tmp_path, "untrusted").take(page, "cert-error")
        finally:
            await context.close()
    # the browser did reach the edge through the proxy: the refusal is its own verdict on the certificate
    assert any(e["kind"] == "proxy.tunnel" and e["name"] == VICTIM for e in lab.events.since(0))


def test_browser_command_errors_are_one_line(tmp_path):
    state = tmp_path / "state"
    run = lambda *a: subprocess.run([sys.executable, "-m", "lab", "browser", "--state", str(state), *a],
                                    capture_output=True, text=True, timeout=30,
                                    env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    done = run()
    assert done.returncode == 1 and done.stderr.startswith("sni-lab: error: ") and "Traceback" not in done.stderr
    assert "no running lab" in done.stderr
    state.mkdir()
    (state / "endpoints.json").write_text('{"ca": "ca.pem", "edge": [], "proxy": {"host": "127.0.0.1", "port": 1}}')
    done = run("--chromium", str(tmp_path / "no-such-browser"))
    assert done.returncode == 1 and done.stderr.strip() == f"sni-lab: error: --chromium {tmp_path / 'no-such-browser'}: not found"
