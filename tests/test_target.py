"""The catalog against another edge: `--edge NAME=HOST:PORT`, an edge-only endpoints file, or
an endpoints file that names a lab. Asking for a target that does not answer is an error,
never a reason to test something else; another edge is judged verdict first."""
import argparse
import json
import subprocess
import sys

import pytest

from lab.binding import free_port
from lab.matrix import against
from lab.results import summary
from lab.run import Lab
from lab.scenarios import DEFAULT_DIR, discover, legitimate, load
from lab.target import TargetError, parse_edges


def cli(*argv, timeout=120):
    res = subprocess.run([sys.executable, "-m", "lab", *argv], capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_an_edge_that_does_not_answer_is_an_error_not_a_fallback(tmp_path):
    res = cli("run", "dns-poison-victim", "--edge", f"anycast=127.0.0.1:{free_port('127.0.0.1')}",
              "--certs", str(tmp_path / "certs"))
    assert res.returncode == 1
    assert "listener anycast at 127.0.0.1:" in res.stderr and "does not answer" in res.stderr
    assert "nothing was tested" in res.stderr and res.stdout == ""


@pytest.mark.parametrize("spec,says", [
    ("nope=127.0.0.1:8443", "the world has no listener 'nope'"),
    ("anycast", "expected NAME=HOST:PORT"),
    ("anycast=localhost:8443", "HOST must be an IP address"),
    ("anycast=127.0.0.1:99999", "out of range"),
])
def test_a_wrong_edge_flag_is_one_line_and_exit_2(spec, says):
    res = cli("run", "dns-poison-victim", "--edge", spec)
    assert res.returncode == 2 and says in res.stderr and res.stderr.count("\n") == 1


def test_two_listeners_on_one_address_cannot_be_told_apart(world):
    with pytest.raises(TargetError, match="both at 127.0.0.1:8443"):
        parse_edges(["anycast=127.0.0.1:8443", "saas-v1=127.0.0.1:8443"], world)


def test_a_state_without_a_lab_is_an_error(tmp_path):
    res = cli("run", "dns-poison-victim", "--state", str(tmp_path))
    assert res.returncode == 1 and "no running lab here" in res.stderr and "nothing was tested" in res.stderr


def test_a_lab_that_does_not_answer_is_an_error(tmp_path):
    """The endpoints file of a lab that died: once, a fresh lab was quietly tested instead."""
    port = free_port("127.0.0.1")
    (tmp_path / "endpoints.json").write_text(json.dumps({
        "control": {"url": f"http://127.0.0.1:{port}", "token": "x"}, "edge": [], "engine": "native"}))
    res = cli("run", "dns-poison-victim", "--state", str(tmp_path))
    assert res.returncode == 1 and "does not answer" in res.stderr and "--fresh" in res.stderr


def test_an_edge_only_endpoints_file_is_the_edge_to_test(tmp_path):
    port = free_port("127.0.0.10")
    (tmp_path / "endpoints.json").write_text(json.dumps({"edge": [{"name": "anycast", "host": "127.0.0.10",
                                                                   "port": port}]}))
    res = cli("run", "legit-victim", "--state", str(tmp_path))
    assert res.returncode == 1 and f"listener anycast at 127.0.0.10:{port} does not answer" in res.stderr


def test_legitimate_is_what_every_model_sends_to_one_origin(world):
    assert legitimate(load(DEFAULT_DIR / "legit-victim.toml", world)) == ["victim"]
    assert legitimate(load(DEFAULT_DIR / "dns-poison-victim.toml", world)) == [None]


@pytest.fixture
async def other_edge(world, tmp_path):
    """Another edge: a lab of its own (its edge, its origins), from the same CA."""
    async def start(model):
        lab = Lab(world.with_free_ports(), tmp_path / "certs", model=model)
        await lab.start()
        started.append(lab)
        return [f"{l['name']}={l['host']}:{l['port']}" for l in lab.endpoints["edge"]]

    started = []
    yield start
    for lab in started:
        await lab.stop()


def _args(tmp_path):
    return argparse.Namespace(config=None, certs=str(tmp_path / "certs"), fresh=False, state=None)


async def _run(world, tmp_path, specs, flavour, names=None):
    # The origins the lab runs for the other edge: free ports here, the world file's in real use.
    world = world.with_ports({o.name: free_port(o.host) for o in world.origins})
    target = parse_edges(specs, world, flavour=flavour)
    return {r.scenario: r for r in await against(target, world, _args(tmp_path), discover(names, DEFAULT_DIR, world))}


async def test_a_v1_shaped_edge_shows_the_attack(world, tmp_path, other_edge):
    specs = await other_edge("v1")
    default = await _run(world, tmp_path, specs, "default")
    attack = default["dns-poison-victim"]
    assert attack.verdict == "MISROUTED" and attack.passed and attack.model == "default"
    assert attack.requests[0].cert_valid and attack.requests[0].origin == "saas"
    # judged as protected, the same edge fails on it
    deployed = await _run(world, tmp_path, specs, "deployed", ["dns-poison-victim", "legit-victim"])
    assert not deployed["dns-poison-victim"].passed
    assert "MISROUTED under deployed" in deployed["dns-poison-victim"].failure
    assert deployed["legit-victim"].passed and deployed["legit-victim"].requests[0].legitimate


async def test_a_v2_edge_passes_and_lifecycle_cases_are_not_applicable(world, tmp_path, other_edge):
    results = await _run(world, tmp_path, await other_edge("v2"), "fixed")
    s = summary(list(results.values()))
    assert s["failed"] == 0 and s["protected_misrouted"] == [] and s["over_blocked"] == []
    na = results["custom-hostname-active"]
    assert na.verdict == "N/A" and na.passed and "control plane" in na.not_applicable
    assert all(r.not_applicable for r in results.values() if r.verdict == "N/A")
    # refusals are matched by kind and status: the lab's reference is v2's expectation
    assert results["dns-poison-victim"].requests[0].expected == "victim"


async def test_a_listener_the_edge_lacks_makes_its_cases_not_applicable(world, tmp_path, other_edge):
    specs = [s for s in await other_edge("v2") if not s.startswith("saas2-v1=")]
    results = await _run(world, tmp_path, specs, "fixed", ["saas-app-on-saas2-address", "legit-victim"])
    assert "saas2-v1" in results["saas-app-on-saas2-address"].not_applicable
    assert results["legit-victim"].verdict == "SAFE"


def test_the_catalog_passes_on_a_world_moved_to_another_24(tmp_path):
    """Scenarios name actors, not addresses: every address of the world file moved to 127.0.9.0/24."""
    from lab.topology import default_path

    moved = tmp_path / "moved.toml"
    moved.write_text(default_path().read_text().replace("127.0.0.", "127.0.9."))
    assert "127.0.0." not in moved.read_text()
    res = cli("matrix", "--fresh", "--json", "--config", str(moved), "--certs", str(tmp_path / "certs"), timeout=300)
    data = json.loads(res.stdout)
    assert res.returncode == 0, data["summary"]["failures"]
    assert {c["requests"][0]["address"].rsplit(".", 1)[0] for c in data["cases"] if c["requests"]} == {"127.0.9"}


def test_the_pytest_plugin_refuses_an_edge_that_does_not_answer(tmp_path):
    port = free_port("127.0.0.1")
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp_path),
                          "--sni-lab-scenarios", str(DEFAULT_DIR), f"--sni-lab-edge=anycast=127.0.0.1:{port}",
                          str(DEFAULT_DIR / "legit-victim.toml")], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert res.returncode == 1, res.stdout[-2000:]
    assert f"listener anycast at 127.0.0.1:{port} does not answer" in res.stdout + res.stderr
    assert "Traceback" not in res.stdout + res.stderr


@pytest.mark.parametrize("argv,says", [
    (["--edge", "anycast=127.0.0.1:9", "--model", "v1"], "--model is the lab's own edge's"),
    (["--edge", "anycast=127.0.0.1:9", "--engine", "native"], "--engine is the lab's own edge's"),
    (["--flavour", "fixed", "--fresh"], "give it with --edge"),
])
def test_flags_of_the_lab_and_of_another_edge_do_not_mix(argv, says):
    res = cli("run", "dns-poison-victim", *argv)
    assert res.returncode == 2 and says in res.stderr
