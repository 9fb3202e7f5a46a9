"""Exercise 2 with the real browser: Debian's Chromium through the lab's proxy, trusting the lab CA
(NSS), no certificate bypass. Its checker fails on the starting state and passes once the
reference solution's commands ran and the browser did its two steps."""
from __future__ import annotations

import json

import aiohttp

from lab.browser import prepare
from lab.workshop import solve
from tests.test_browser import Shots, chromium, collected_until, launch, running  # noqa: F401 - fixtures
from tests.test_proxy import VICTIM


async def call(ep: dict, method: str, path: str) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.request(method, ep["control"]["url"] + path,
                             headers={"Authorization": f"Bearer {ep['control']['token']}"}) as r:
            assert r.status == 200, await r.text()
            return await r.json()


async def test_exercise_2_lands_the_attack_in_chromium(chromium, running, tmp_path):  # noqa: F811
    lab, proxy, ep = running
    state = tmp_path / "state"
    (state / "endpoints.json").write_text(json.dumps(ep))  # as `sni-lab up` writes it: the CLI steps find the lab
    await call(ep, "POST", "/workshop/exercises/2/start")
    before = await call(ep, "POST", "/workshop/exercises/2/check")
    assert not before["passed"] and not any(c["passed"] for c in before["checks"])

    start = prepare(ep, tmp_path / "profile")
    shots = Shots(tmp_path, "workshop-2")
    async with chromium.async_playwright() as pw:
        context = await launch(pw, start)
        try:
            page = context.pages[0] if context.pages else await context.new_page()

            async def browser(step: dict) -> None:
                if step["browser"] == "login":
                    await page.goto(step["url"])
                    await page.fill("input[name=user]", "alice")
                    await page.fill("input[name=password]", "secret")
                    async with page.expect_navigation():
                        await page.click("button")
                else:
                    proxy.dns_changed(VICTIM)  # what the lab does on every DNS change
                    resp = await page.goto(step["url"])
                    assert (await resp.all_headers())["x-lab-origin"] == "saas"
                    await collected_until(lab, lambda loot: any("session=" in str(x) for x in loot))
                    await shots.take(page, "attack-landed")

            steps = (await call(ep, "POST", "/workshop/exercises/2/solution"))["steps"]
            assert await solve.apply(ep, str(state), steps, browser=browser, say=lambda _: None) == []
        finally:
            await context.close()
    after = await call(ep, "POST", "/workshop/exercises/2/check")
    assert after["passed"], after["checks"]
