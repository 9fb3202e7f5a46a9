"""The workshop as attendees use it: `sni-lab workshop ...` against a running `sni-lab up`.

Every exercise's checker is shown to fail on its starting state and to pass once its
reference solution is applied (exercise 2, which needs a browser, is in
test_workshop_browser.py). Exercises 7 and 8 need control-plane APIs another change adds;
until those are in the lab they are skipped, naming the missing API.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from lab.workshop import ExerciseError, load, load_all
from lab.workshop import checks, room
from tests.workshop_labs import UpLab

APIS = {7: "/validation", 8: "/zones"}


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    lab = UpLab(tmp_path_factory.mktemp("workshop"))
    yield lab
    lab.stop()


def _has(lab: UpLab, path: str) -> bool:
    try:
        urllib.request.urlopen(lab.url + path, timeout=5).close()
        return True
    except urllib.error.HTTPError as e:
        return e.code != 404


def test_list_json_lists_at_least_eight_exercises(up):
    done = up.cli("workshop", "list", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert len(rows) >= 8 and [r["number"] for r in rows] == list(range(1, len(rows) + 1))
    assert all(r["title"] and r["goal"] for r in rows)


@pytest.mark.parametrize("n", [1, 3, 4, 5, 6, 7, 8, 9])
def test_checker_fails_on_the_start_and_passes_with_the_solution(up, n):
    if n in APIS and not _has(up, APIS[n]):
        pytest.skip(f"exercise {n} needs the control plane's {APIS[n]} API, not in this lab yet")
    started = up.cli("workshop", "start", str(n))
    assert started.returncode == 0, started.stderr
    before = up.cli("workshop", "check", str(n), "--json")
    assert before.returncode == 1, before.stdout + before.stderr
    assert json.loads(before.stdout)["passed"] is False
    solved = up.cli("workshop", "solution", str(n), "--yes")
    assert solved.returncode == 0, solved.stdout + solved.stderr
    after = up.cli("workshop", "check", str(n), "--json")
    result = json.loads(after.stdout)
    assert after.returncode == 0 and result["passed"], result
    assert all(c["passed"] for c in result["checks"])
    # and the same state after a reset fails again: the check reads the lab, not a remembered pass
    up.cli("workshop", "reset", str(n))
    again = json.loads(up.cli("workshop", "check", str(n), "--json").stdout)
    assert not again["passed"]


def test_a_wrong_rule_is_named_by_the_catalog_check(up):
    up.cli("workshop", "start", "3")
    assert up.cli("waf", "set", "saas.example", "true").returncode == 0  # blocks everything, legitimate tenants too
    result = json.loads(up.cli("workshop", "check", "3", "--json").stdout)
    assert not result["passed"] and "legitimate request got refused:403:waf-block" in result["checks"][0]["detail"]
    bad = up.cli("waf", "set", "saas.example", "http.host ==")
    assert bad.returncode == 2 and bad.stderr.startswith("sni-lab: error: PUT /zones/saas.example/rules: 400")
    assert "true" in up.cli("waf", "list").stdout  # the broken rule changed nothing


def test_predictions_are_asked_before_any_outcome_is_shown(up):
    up.cli("workshop", "reset", "9")
    file = up.state / "workshop" / "09-one-attack-five-models.toml"
    events = lambda: json.loads(urllib.request.urlopen(up.url + "/events?kind=route.decision&newest=1000").read())
    seen = len(events())
    done = up.cli("workshop", "check", "9")
    assert done.returncode == 1 and "still \"?\"" in done.stdout and "nothing was run" in done.stdout
    assert "saas" not in done.stdout and "waf-block" not in done.stdout
    ran = up.cli("run", str(file), "--model", "v1")  # the catalog runner refuses it too
    assert ran.returncode == 2 and "a prediction is still \"?\"" in ran.stderr and "saas" not in ran.stdout
    assert len(events()) == seen  # no request was sent for an unmade prediction
    # wrong predictions: told which missed, not what happened
    file.write_text(file.read_text().replace('"?"', '"victim"'))
    done = up.cli("workshop", "check", "9")
    assert done.returncode == 1 and "v1: request 1 did not go as you predicted" in done.stdout
    assert "saas" not in done.stdout and "waf-block" not in done.stdout


def test_from_another_directory_nothing_is_written_outside_the_lab(up, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for args in (("workshop", "reset", "9"), ("workshop", "solution", "9", "--yes"), ("workshop", "check", "9")):
        done = up.cli(*args, cwd=elsewhere)
        assert done.returncode == 0, done.stdout + done.stderr
    file = up.state / "workshop" / "09-one-attack-five-models.toml"
    assert file.is_file()
    # the prediction file run with the catalog runner, against a lab started for the run: a throwaway CA
    done = up.cli("run", str(file), "--model", "v2", "--fresh", cwd=elsewhere)
    assert done.returncode == 0, done.stdout + done.stderr
    assert list(elsewhere.iterdir()) == []


def test_errors_are_one_line(up, tmp_path):
    for args, code, text in ((("workshop", "start", "42"), 2, "no exercise '42'"),
                             (("workshop", "check", "2"), 1, "is not started"),
                             (("workshop", "solution", "1"), 2, "pass --yes"),
                             (("workshop", "join", "ftp://x", "--name", "a", "--token", "abcdefgh"), 2, "url:")):
        if args[2] == "2":
            up.cli("workshop", "reset", "1")  # any other exercise: 2 stays unstarted
        done = up.cli(*args)
        assert done.returncode == code and done.stderr.startswith("sni-lab: error: ") and text in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    missing = UpLab.__new__(UpLab)
    missing.state, missing.dir = tmp_path / "none", tmp_path
    done = missing.cli("workshop", "list")
    assert done.returncode == 1 and "no running lab here" in done.stderr


def test_hints_go_from_a_nudge_to_almost_the_answer(up):
    up.cli("workshop", "reset", "2")
    texts = [json.loads(up.cli("workshop", "hint", "2", "--json").stdout)["hints"] for _ in range(4)]
    assert [len(t) for t in texts] == [1, 2, 3, 3]
    assert "listener:saas-v1" not in texts[0][0] and "listener:saas-v1" in texts[2][2]


# ---- the format and room mode's rules, without a lab ---------------------------------
def test_every_exercise_has_three_hints_a_start_a_check_and_a_solution():
    for ex in load_all():
        assert len(ex.hints) == 3 and ex.checks and ex.solution and ex.steps and ex.teaches


def test_a_broken_exercise_is_one_line_naming_file_and_key(tmp_path):
    folder = tmp_path / "10-mine"
    folder.mkdir()
    (folder / "exercise.toml").write_text('title = "t"\ngoal = "g"\nstory = "s"\nteaches = "t"\nsteps = ["a"]\n'
                                          'hints = ["one", "two"]\n')
    with pytest.raises(ExerciseError, match=r"exercise.toml: hints: 2 hints; give 3"):
        load(folder)


def test_checks_match_fields_not_claims():
    facts = checks.Facts(since=10, started=100.0, strips=[
        {"at": 11, "name": "www.victim.example", "verdict": "MISROUTED", "decision": {"model": "v1"}, "origin": "saas"},
        {"at": 5, "name": "www.victim.example", "verdict": "MISROUTED", "decision": {"model": "v2"}, "origin": "saas"}])
    want = lambda model: {"kind": "request", "match": {"name": "www.victim.example", "decision.model": model,
                                                        "verdict": "MISROUTED"}}
    assert checks.judge(want("v1"), facts).passed
    assert not checks.judge(want("v2"), facts).passed  # before the exercise started: does not count
    cookie = {"kind": "collector", "cookie": "session=", "page": "www.victim.example"}
    facts.collected = [{"time": 99.0, "data": {"cookie": "session=x", "origin": "https://www.victim.example:1"}}]
    assert not checks.judge(cookie, facts).passed
    facts.collected.append({"time": 101.0, "data": {"cookie": "session=y", "origin": "https://www.victim.example:1"}})
    assert checks.judge(cookie, facts).passed


def test_room_reports_are_bounded():
    ids = {"01-follow-one-request"}
    ok = {"name": "Ada L.", "exercise": "01-follow-one-request", "passed": True, "time": 1.0}
    assert room.parse_report(ok, ids)["name"] == "Ada L."
    for bad in ({**ok, "token": "x"}, {**ok, "name": "<script>"}, {**ok, "name": "x" * 33}, {**ok, "exercise": "99"},
                {**ok, "passed": "yes"}, {**ok, "time": float("nan")}, {**ok, "cookie": "session=1"}, []):
        with pytest.raises(room.RoomError):
            room.parse_report(bad, ids)
    full = {f"a{i}": {} for i in range(room.MAX_ATTENDEES)}
    with pytest.raises(room.RoomError, match="full"):
        room.record(full, ok, 2.0)
    once = room.record({}, ok, 2.0)
    assert room.record(once, {**ok, "passed": False}, 3.0)["Ada L."]["01-follow-one-request"]["passed"]  # a pass stays


def test_the_class_token_works_as_printed_in_the_join_line():
    from lab.cli import build_parser
    from lab.workshop.server import class_token
    parser = build_parser()
    for token in {class_token() for _ in range(2000)}:  # a URL-safe token would start with '-' ~31 times in 2000
        args = parser.parse_args(["workshop", "join", "http://127.0.0.1:8000", "--name", "ada", "--token", token])
        assert args.token == token and room.check_token(token) == token
