"""`sni-lab demo` against real labs: the page it serves, every act played and checked in the
lab's own records, the undo, the failure said plainly, and the real Chromium of
`sni-lab browser` driven over DevTools."""
from __future__ import annotations

import asyncio
import json
import os
import random
import re
import shutil
import signal
import ssl
import sys
from pathlib import Path

import aiohttp
import pytest

from lab import demo
from lab.origins.saas import collector_urls, payload
from lab.browser import BROWSER_FILE
from lab.run import Lab, write_endpoints
from lab.state import State
from lab.topology import default_path
from tests.test_browser import CHROMIUM, SHOTS
from tests.test_proxy import VICTIM, start_lab

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DOCS_SHOT = ROOT / "docs" / "img" / "live-after-attack.png"


def world_file(tmp_path: Path, port: int, *edits: tuple[str, str]) -> Path:
    """The packaged world with its edge listeners sharing `port` (as the file's 8443 do) and
    every other part on a free port."""
    text = default_path().read_text()
    assert "port = 8443" in text and "port = 8118" in text
    text = re.sub(r"port = (5353|8000|8080|8118)\b", "port = 0", text.replace("port = 8443", f"port = {port}"))
    for old, new in edits:
        assert old in text
        text = text.replace(old, new)
    path = tmp_path / "lab.toml"
    path.write_text(text)
    return path


async def sni_lab(*args: str, stdin=asyncio.subprocess.DEVNULL) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, "-m", "lab", *args, env=ENV, stdin=stdin,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def own_demo(tmp_path: Path, *args: str, edits=(), stdin=asyncio.subprocess.DEVNULL
                   ) -> tuple[asyncio.subprocess.Process, Path]:
    """`sni-lab demo ARGS` starting its own lab; another listener port if the one tried is taken."""
    state = tmp_path / "state"
    for _ in range(5):
        config = world_file(tmp_path, random.randrange(10000, 30000), *edits)
        proc = await sni_lab("demo", "--state", str(state), "--config", str(config), "--certs", str(tmp_path / "certs"),
                             *args, stdin=stdin)
        first = await asyncio.wait_for(proc.stdout.readline(), 60)
        if first:
            return proc, state
        err = (await proc.stderr.read()).decode()
        await proc.wait()
        assert "already in use" in err, err
    raise RuntimeError("no free listener port in 5 tries")


async def run_out(proc: asyncio.subprocess.Process, within: float = 120) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), within)
    return proc.returncode, out.decode(), err.decode()


async def collected(ep: dict) -> list[dict]:
    trust = ssl.create_default_context(cafile=ep["ca"])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as s:
        async with s.get(ep["origins"]["collector"] + "/collected") as r:
            return await r.json()


@pytest.fixture
async def running(world, tmp_path):
    """A lab as `sni-lab up` runs it, found by the demo through its endpoints file."""
    state = tmp_path / "state"
    lab = await start_lab(world, tmp_path, state_dir=state, verify_interval=3600)
    write_endpoints(state, lab.endpoints)
    yield lab, state
    await lab.stop()


# ---- the page alone -------------------------------------------------------------------------

async def test_no_play_serves_the_live_page_until_sigterm(tmp_path):
    proc, state = await own_demo(tmp_path, "--no-play")
    try:
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(2)]
        page = next(line.split(": ", 1)[1].strip() for line in lines if line.startswith("The live page: "))
        ep = json.loads((state / "endpoints.json").read_text())
        assert page == f"{ep['control']['url']}/?token={ep['control']['token']}"
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
            async with s.get(page) as r:  # the token URL sets the page's cookie, then shows it
                assert r.status == 200 and "<title>sni-lab live</title>" in await r.text()
                assert [h.status for h in r.history] == [303] and str(r.url) == ep["control"]["url"] + "/"
            async with s.get(ep["control"]["url"] + "/live/state") as r:
                assert (await r.json())["write"] is True  # the page may switch models and run scenarios
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out, err = await run_out(proc, 30)
    assert code == 0, err
    assert "Every act" not in out and not (state / "endpoints.json").exists()
    with pytest.raises(OSError):  # stopped: nothing listens any more
        await asyncio.open_connection(*ep["control"]["url"].removeprefix("http://").rsplit(":", 1))


# ---- the play, scripted ----------------------------------------------------------------------

async def test_the_scripted_play_lands_each_act_and_leaves_nothing_behind(running):
    lab, state = running
    code, out, err = await run_out(await sni_lab("demo", "--exit", "--state", str(state)))
    assert code == 0, out + err
    assert "scripted client" in out and "NOT AS THE STORY SAYS" not in out

    events = lab.events.since(0)
    tunnels = [e for e in events if e["kind"] == "proxy.tunnel" and e["name"] == VICTIM]
    # act 1 unpoisoned, acts 3-5 through the override targeted at the scripted client's address only
    assert {t["client"] for t in tunnels} == {demo.SCRIPTED_ADDRESS}
    assert {t["poisoned"] for t in tunnels} == {False, True}
    (override,) = {t["override"] for t in tunnels if t["poisoned"]}
    answers = [e for e in events if e["kind"] == "dns.answer" and e["name"] == VICTIM]
    assert {a["client"]: a["poisoned"] for a in answers if a["client"] == demo.BYSTANDER} == {demo.BYSTANDER: False}
    # what the edge did on the poisoned address, model by model
    decisions = [e for e in events if e["kind"] == "route.decision" and e["host"] == VICTIM and e["path"] == "/"
                 and e["listener"] == "saas-v1"]
    assert [(d["model"], d["origin"]) for d in decisions] == [("v1", "saas"), ("v1-waf", None), ("v2", "victim")]
    # the theft and the replay, as the collector holds them
    (loot,) = await collected(lab.endpoints)
    assert loot["data"]["cookie"].startswith("session=") and loot["origin"] == f"https://{VICTIM}:{tunnels[0]['port']}"
    assert loot["replay"]["opened"] and loot["replay"]["holder"] == "alice"
    # the registration was made, stayed pending, and is gone; so is the override; the model is back
    statuses = [e for e in events if e["kind"] == "hostname.status" and e["hostname"] == VICTIM]
    assert [s["new"] for s in statuses] == ["pending", "deleted"] and statuses[-1].get("purged")
    assert VICTIM not in {h.name for h in lab.control.state.hostnames()}
    assert lab.resolver.overrides() == [] and lab.control.state.overrides() == []
    assert not any(e["kind"] == "dns.answer" and e.get("override") == override and e["id"] > statuses[-1]["id"]
                   for e in events)
    assert lab.world.model == "v1"


async def test_demo_started_lab_plays_then_stops_with_exit(tmp_path):
    proc, state = await own_demo(tmp_path, "--exit")
    code, out, err = await run_out(proc)
    assert code == 0, out + err
    assert out.count("   ✓ ") >= 20 and "✗" not in out and "The attack landed" in out
    assert not (state / "endpoints.json").exists()
    saved = State(state)  # the lab's durable record, read after it stopped
    try:
        assert saved.overrides() == [] and VICTIM not in {h.name for h in saved.hostnames()}
        assert saved.get("model") == "v1"
        kinds = [(e["kind"], e.get("poisoned")) for e in saved.events(0, 100_000) if e.get("name") == VICTIM]
        assert ("proxy.tunnel", True) in kinds and ("proxy.tunnel", False) in kinds
    finally:
        saved.close()


async def test_step_waits_for_enter_while_the_lab_serves(tmp_path):
    proc, state = await own_demo(tmp_path, "--step", "--exit", stdin=asyncio.subprocess.PIPE)
    seen = []
    while not (line := (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()).startswith("   [Enter: act 1"):
        assert line, "no prompt for act 1"
        seen.append(line)
    assert not any(line.startswith("Act ") for line in seen)
    ep = json.loads((state / "endpoints.json").read_text())
    async with aiohttp.ClientSession() as s:  # waiting for Enter does not stop the lab it runs
        async with s.get(ep["control"]["url"] + "/health") as r:
            assert r.status == 200
    proc.stdin.write(b"\n" * 6)
    code, out, err = await run_out(proc)
    assert code == 0, out + err
    prompts = re.findall(r"\[Enter: act (\d)", out)
    assert prompts == ["2", "3", "4", "5", "6"] and out.index("[Enter: act 3") < out.index("Act 3 of 6")


async def test_an_act_that_does_not_hold_is_said_plainly_and_exits_1(tmp_path):
    # saas.example off the v1 allowlist: v1-waf routes it as v2 does, so act 4's 403 never comes
    proc, state = await own_demo(tmp_path, "--exit", edits=[("v1_allowlisted = true", "v1_allowlisted = false")])
    code, out, err = await run_out(proc)
    assert code == 1, out + err
    (act4,) = re.findall(r"Act 4 of 6.*?(?=\nAct 5)", out, re.S)
    assert "✗ NOT AS THE STORY SAYS: the edge refused it: 403, no origin reached — status 200, origin victim" in act4
    assert "did not happen as the story says:\n   v1-waf blocks it: the edge refused it" in out
    assert "Undone: the poisoning removed" in out  # undone all the same


async def test_a_lab_on_free_ports_is_refused_in_one_line(world, tmp_path):
    state = tmp_path / "state"
    async with Lab.ephemeral(world) as lab:  # each listener on its own port: no poisoned answer can land
        state.mkdir()
        write_endpoints(state, lab.endpoints)
        code, out, err = await run_out(await sni_lab("demo", "--exit", "--state", str(state)))
        assert lab.resolver.overrides() == []
    assert code == 1 and err.startswith("sni-lab: error: the edge's anycast and saas-v1 listeners are on "
                                        "different ports") and err.count("\n") == 1


def test_the_scripted_payload_posts_where_the_attackers_page_says(world):
    page = payload(world)
    assert demo.payload_urls(f"<script>{page}</script>") == collector_urls(world) != []
    assert demo.payload_urls("<p>Victim Bank</p>") == []


# ---- the play, in a real Chromium ------------------------------------------------------------

@pytest.fixture
def playwright():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed (apt install chromium)")
    if shutil.which("certutil") is None:
        pytest.skip("certutil is not installed (apt install libnss3-tools)")
    return pytest.importorskip("playwright.async_api", reason="playwright is not installed (pip install playwright)")


async def wait_for_record(state: Path, proc, within: float = 60) -> dict:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (found := demo.attached(state)) is None:
        if proc.returncode is not None or loop.time() > deadline:
            raise AssertionError(f"sni-lab browser recorded no DevTools endpoint: {(await proc.stderr.read()).decode()}")
        await asyncio.sleep(0.1)
    return found


async def test_the_browser_of_sni_lab_browser_is_driven_and_robbed(playwright, running, tmp_path):
    lab, state = running
    browser_cmd = await sni_lab("browser", "--headless", "--state", str(state), "--profile", str(tmp_path / "profile"))
    try:
        found = await wait_for_record(state, browser_cmd)
        assert oct((state / BROWSER_FILE).stat().st_mode & 0o777) == "0o600"
        shots = []
        async with playwright.async_playwright() as pw:
            watcher = await pw.chromium.connect_over_cdp(found["cdp"])  # the test's own look at the same browser
            context = watcher.contexts[0]

            async def after_act(story, act):
                if act.key != "attack":
                    return
                # what the room sees: the live page, 1280x720, once the MISROUTED strip and the loot are up
                live = await context.new_page()
                await live.set_viewport_size({"width": 1280, "height": 720})
                await live.goto(f"{lab.endpoints['control']['url']}/?token={lab.endpoints['control']['token']}")
                await playwright.expect(live.locator('#strips li[data-verdict="MISROUTED"]')).to_have_count(1)
                await playwright.expect(live.locator("#loot li").first).to_contain_text(f"session={story.session}")
                path = tmp_path / "live-after-attack.png"
                await live.screenshot(path=str(path))
                SHOTS.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, SHOTS / path.name)
                shots.append(path)
                await live.close()

            driven = await demo.Driven.attach(lab.endpoints, found["cdp"])
            try:
                story = await demo.play(lab.endpoints, driven, say=lambda line: None, after_act=after_act)
                # the page the demo drove is the attacker's look-alike, in this browser, under the victim's name
                session = next(c["value"] for c in await context.cookies(f"https://{VICTIM}/") if c["name"] == "session")
            finally:
                await driven.close()
            await watcher.close()
        assert [a.problems for a in story.acts] == [[]] * 7, [a.problems for a in story.acts]
        attack = next(a for a in story.acts if a.key == "attack")
        assert attack.facts["seen"] == {"status": 200, "origin": "saas"}
        assert story.address == "127.0.0.1"  # the browser's own address: the override targeted it
        # the collector received this browser's session cookie, and the replay opened alice's account
        (loot,) = await collected(lab.endpoints)
        assert loot["data"]["cookie"] == f"session={session}" and loot["source"] == "127.0.0.1"
        assert loot["replay"]["holder"] == "alice" and shots
        assert lab.resolver.overrides() == []
    finally:
        browser_cmd.send_signal(signal.SIGTERM)
        code, _, err = await run_out(browser_cmd, 30)
    assert code == 130 and not (state / BROWSER_FILE).exists(), err
