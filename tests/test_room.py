"""Room mode on one machine: an instructor's lab and three attendees' labs, each `sni-lab up --free-ports`.
The instructor's page, in Chromium, shows who solved exercise 1."""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from lab.browser import CHROMIUM
from tests.workshop_labs import UpLab

SHOTS = Path("/tmp/sni-lab-shots")


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    with ThreadPoolExecutor(4) as pool:
        started = list(pool.map(lambda n: UpLab(tmp_path_factory.mktemp(n)), ["teacher", "ada", "grace", "linus"]))
    yield started
    for lab in started:
        lab.stop()


def post(url: str, body: bytes, token: str) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/workshop/room/report", data=body, method="POST",
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def test_two_of_three_attendees_solve_exercise_1_and_the_instructor_sees_them(labs):
    playwright = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    teacher, *attendees = labs
    opened = teacher.cli("workshop", "room", "--json")
    assert opened.returncode == 0, opened.stderr
    token = json.loads(opened.stdout)["token"]
    assert token in teacher.cli("workshop", "room").stdout  # printed for the room, the same token again

    wrong = attendees[0].cli("workshop", "join", teacher.url, "--name", "ada", "--token", "not-the-token")
    assert wrong.returncode == 1 and "wrong class token" in wrong.stderr
    assert json.loads(attendees[0].cli("workshop", "list", "--json").stdout)  # the lab still answers, unchanged
    names = ["ada", "grace", "linus"]
    for lab, name in zip(attendees, names):
        done = lab.cli("workshop", "join", teacher.url, "--name", name, "--token", token)
        assert done.returncode == 0, done.stderr
        assert lab.cli("workshop", "start", "1").returncode == 0
    for lab in attendees[:2]:
        assert lab.cli("workshop", "solution", "1", "--yes").returncode == 0
    for lab in attendees:
        lab.cli("workshop", "check", "1")
    progress = json.loads(urllib.request.urlopen(attendees[2].url + "/workshop/progress").read())
    assert progress["joined"]["name"] == "linus" and progress["joined"]["error"] is None

    board = json.loads(urllib.request.urlopen(teacher.url + "/workshop/room").read())
    # only check results travelled: names, and per exercise passed / time / tries
    assert {a["name"] for a in board["attendees"]} == set(names)
    assert all(set(r) == {"passed", "time", "tries"} for a in board["attendees"] for r in a["results"].values())
    assert token not in json.dumps(board)
    for lab in attendees:
        assert lab.ep["control"]["token"] not in (teacher.state / "state.db").read_bytes().decode("latin-1")

    async with playwright.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            await page.goto(teacher.url + "/workshop")
            cell = lambda who: page.locator(f'tr[data-attendee="{who}"] td[data-exercise="01-follow-one-request"]')
            await page.wait_for_selector('tr[data-attendee="grace"] td[data-passed="true"]')
            assert await cell("ada").inner_text() == "✓" and await cell("grace").inner_text() == "✓"
            assert await cell("linus").inner_text() != "✓"
            assert await cell("linus").get_attribute("data-passed") == "false"  # tried, not solved
            assert "2/3" in await page.locator("#board-head").inner_text()
            SHOTS.mkdir(parents=True, exist_ok=True)
            await page.screenshot(path=str(SHOTS / "workshop-scoreboard.png"))
            page = await browser.new_page(viewport={"width": 1280, "height": 720})
            await page.goto(attendees[0].url + "/workshop")
            await page.wait_for_selector('li.passed[data-exercise="01-follow-one-request"]')
            await page.screenshot(path=str(SHOTS / "workshop-progress.png"))
            await page.goto(attendees[0].url + "/")
            await page.wait_for_selector("#workshop li.passed")  # exercise 1's chip
            await page.screenshot(path=str(SHOTS / "workshop-live-page.png"))
        finally:
            await browser.close()


def test_the_room_endpoint_bounds_what_it_accepts(labs):
    teacher = labs[0]
    token = json.loads(teacher.cli("workshop", "room", "--json").stdout)["token"]
    good = {"name": "mallory", "exercise": "01-follow-one-request", "passed": True, "time": 1.0}
    assert post(teacher.url, json.dumps(good).encode(), "wrong-token")[0] == 403
    assert post(teacher.url, b"{" * 2000, token)[0] == 413
    assert post(teacher.url, json.dumps({**good, "name": "<b>x</b>"}).encode(), token)[0] == 400
    assert post(teacher.url, json.dumps({**good, "cookie": "session=1"}).encode(), token)[0] == 400
    assert post(teacher.url, b"not json", token)[0] == 400
    board = json.loads(urllib.request.urlopen(teacher.url + "/workshop/room").read())
    assert "mallory" not in {a["name"] for a in board["attendees"]}  # nothing refused was kept
