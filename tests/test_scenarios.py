"""Scenario files, the runner, and proof that the oracle can fail."""
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

import lab.edge.core
from lab.policy import decide as real_decide
from lab.run import Lab
from lab.scenarios import DEFAULT_DIR, Runner, ScenarioError, discover, load
from lab.topology import MODELS

GOOD = '''
title = "t"
story = "s"
lesson = "l"
[[request]]
listener = "saas-v1"
sni = "www.victim.example"
[expect]
v1 = "saas"
"*" = "victim"
'''


def write(tmp_path, text, name="case.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("old,new,key", [
    ('listener = "saas-v1"', 'listener = "nope"', "request[0].listener: unknown listener 'nope'"),
    ('"*" = "victim"', 'v2 = "victim"', "expect: no expectation for model host"),
    ('v1 = "saas"', 'v9 = "saas"', "expect.v9: unknown model"),
    ('title = "t"', 'title = ""', "title: missing"),
    ('[[request]]', '[[request]\n', "not valid TOML"),
    ('v1 = "saas"', 'v1 = "Saas!"', "expect.v1: bad expectation"),
    ('v1 = "saas"', 'v1 = ["saas", "victim"]', "expect.v1: 2 expectation(s) for 1 request(s)"),
    ('sni = "www.victim.example"', 'sni = "www.victim.example"\nclient = "client:nobody"',
     "request[0].client: unknown client 'nobody' (the world has victim)"),
    ('sni = "www.victim.example"', 'host = "{listener:nowhere}"', "request[0].host: unknown listener 'nowhere'"),
])
def test_broken_scenario_one_line(tmp_path, world, old, new, key):
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ScenarioError) as e:
        load(path, world)
    assert str(path) in str(e.value) and key in str(e.value) and "\n" not in str(e.value)


def test_cli_names_the_broken_file(tmp_path):
    path = write(tmp_path, GOOD.replace('listener = "saas-v1"', 'listener = "nope"'))
    res = subprocess.run([sys.executable, "-m", "lab", "run", str(path), "--fresh", "--state", str(tmp_path / "s")],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown listener 'nope'" in res.stderr and "Traceback" not in res.stderr


def test_catalog_size(world):
    catalog = discover(None, DEFAULT_DIR, world)
    assert len(catalog) >= 40
    assert sum(len(s.requests[0].also) + 1 for s in catalog) * 5 >= 200


@pytest.fixture
async def fresh_lab(world, tmp_path):
    async with Lab(world.with_free_ports(), tmp_path / "certs", state_dir=tmp_path / "state", verify_interval=3600) as lab:
        yield lab


async def test_broken_edge_makes_the_catalog_fail(fresh_lab, world, monkeypatch):
    """Swap v2 routing for v1 routing in the edge: the oracle must name the MISROUTED cases."""

    def broken(listener, sni, target, w, model=None):
        return real_decide(listener, sni, target, w, "v1" if (model or w.model) == "v2" else model)

    monkeypatch.setattr(lab.edge.core, "decide", broken)
    runner = Runner(fresh_lab.endpoints, fresh_lab.world)
    results = await runner.run(discover(None, DEFAULT_DIR, world), ("v2",))
    misrouted = [r for r in results if r.verdict == "MISROUTED"]
    assert misrouted, "a v1-routing edge under v2 must misroute the attack"
    assert all(not r.passed and "MISROUTED under protected model v2" in r.failure for r in misrouted if not r.controls_off)
    # only a case that turned a control off itself may be MISROUTED under v2 and pass
    assert [r.id for r in misrouted if r.passed] == ["validator-poisoned-single[v2]"]
    assert any(r.scenario.startswith("dns-poison") or "attack" in r.scenario for r in misrouted), \
        [r.scenario for r in misrouted]


async def test_unbroken_edge_passes_the_catalog_under_v2(fresh_lab, world):
    results = await Runner(fresh_lab.endpoints, fresh_lab.world).run(discover(None, DEFAULT_DIR, world), ("v2",))
    assert [r.failure for r in results if not r.passed] == []
    # with its controls at their defaults, v2 misroutes nothing
    assert [r.id for r in results if r.verdict == "MISROUTED"] == ["validator-poisoned-single[v2]"]
    assert [r.id for r in results if r.controls_off] == ["validator-poisoned-single[v2]"]


def test_matrix_cli_json_junit_and_markdown_tell_the_same_run(tmp_path):
    res = subprocess.run([sys.executable, "-m", "lab", "matrix", "--json", "--fresh", "--state", str(tmp_path / "s"),
                          "--certs", str(tmp_path / "certs"), "--junit", str(tmp_path / "j.xml"),
                          "--markdown", str(tmp_path / "m.md")], capture_output=True, text=True, timeout=120)
    assert res.stdout.startswith("{"), res.stderr[-2000:]
    data = json.loads(res.stdout)
    summary = data["summary"]
    assert res.returncode == 0, summary.get("failed")
    assert summary["protected_misrouted"] == []
    assert any(c["model"] == "v1" and c["verdict"] == "MISROUTED" for c in data["cases"])
    suite = ET.parse(tmp_path / "j.xml").getroot().find("testsuite")
    assert [c.get("name") for c in suite.iter("testcase")] == [c["id"] for c in data["cases"]]
    assert suite.find("testcase/failure") is None
    rows = [line for line in (tmp_path / "m.md").read_text().splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(dict.fromkeys(c["scenario"] for c in data["cases"]))


def test_engine_parity_over_the_catalog(tmp_path):
    """Both engines carry the same policy: every (scenario, model) must get the same verdict."""
    pytest.importorskip("mitmproxy", reason="the mitmproxy extra is not installed")
    res = subprocess.run([sys.executable, "-m", "lab", "matrix", "--engine", "native,mitmproxy", "--json", "--fresh",
                          "--state", str(tmp_path / "s"), "--certs", str(tmp_path / "certs")],
                         capture_output=True, text=True, timeout=300)
    assert res.stdout.startswith("{"), res.stderr[-2000:]
    data = json.loads(res.stdout)
    mismatches = [m["id"] for m in data["summary"]["engine_mismatches"]]
    assert mismatches == [], f"verdicts differ between engines: {mismatches}"
    cases = {engine: {(c["scenario"], c["model"]) for c in data["cases"] if c["engine"] == engine}
             for engine in ("native", "mitmproxy")}
    assert cases["native"] == cases["mitmproxy"] == {(s.name, m) for s in discover() for m in MODELS}
    assert res.returncode == 0, data["summary"]["failed_ids"]


async def test_the_story_tells_a_poisoned_answer(fresh_lab, world):
    runner = Runner(fresh_lab.endpoints, fresh_lab.world)
    hit, miss = await runner.run(discover(["targeted-poison-hit", "targeted-poison-miss"], DEFAULT_DIR, world), ("v1",))
    assert "poisoned by override" in hit.requests[0].dns and hit.verdict == "MISROUTED"
    assert "poisoned" not in miss.requests[0].dns and miss.verdict == "SAFE"
