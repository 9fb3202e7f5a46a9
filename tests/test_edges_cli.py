"""`sni-lab edges list|config|up` as a user runs them."""
import asyncio
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from lab.client import probe
from lab.edges import EDGES
from lab.edges.process import available
from lab.topology import default_path

LAB = [sys.executable, "-m", "lab", "edges"]


def cli(*args, cwd=None):
    return subprocess.run([*LAB, *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_list_says_for_each_edge_whether_it_runs_and_why_not():
    rows = json.loads(cli("list", "--json").stdout)
    assert [r["edge"] for r in rows] == list(EDGES)
    for r in rows:
        assert r["installed"] == (available(r["edge"]) is None)
        if r["installed"]:
            assert r["binary"] and r["version"] and r["version"][0].isdigit()
        else:
            assert "not installed" in r["reason"]


@pytest.mark.parametrize("args, says", [
    (("config", "squid"), "argument EDGE: invalid choice: 'squid'"),
    (("config", "nginx", "--flavour", "strict"), "argument --flavour: invalid choice: 'strict'"),
    (("up", "caddy", "--flavour", "nope"), "argument --flavour: invalid choice: 'nope'"),
    ((), "edges: choose an action"),
])
def test_a_wrong_edge_or_flavour_is_a_usage_error(args, says):
    res = cli(*args)
    assert res.returncode == 2 and says in res.stderr and "Traceback" not in res.stderr


def test_config_prints_the_main_file_and_out_writes_them_all(tmp_path):
    res = cli("config", "haproxy", "--flavour", "fixed", "--certs", str(tmp_path / "certs"))
    assert res.returncode == 0, res.stderr
    assert "strict-sni" in res.stdout and "frontend saas-v1" in res.stdout
    out = tmp_path / "out"
    res = cli("config", "haproxy", "--flavour", "fixed", "--certs", str(tmp_path / "certs"), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert (out / "haproxy.cfg").read_text() == res.stdout
    assert (out / "saas-v1.crt-list").read_text().count("\n") == 2  # the SaaS zone's and its custom hostname's
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (out / "bundles").iterdir()}
    assert modes == {0o600} and stat.S_IMODE(out.stat().st_mode) == 0o700
    assert f"cd {out} && haproxy -f haproxy.cfg -db" in res.stderr


def test_config_of_a_world_it_cannot_express_is_one_line(tmp_path):
    world = tmp_path / "w.toml"
    text = default_path().read_text()
    world.write_text(text.replace('origin = "victim"', 'origin = "collector"', 1))
    res = cli("config", "nginx", "--config", str(world), "--certs", str(tmp_path / "certs"))
    assert res.returncode == 2 and "origin collector is reached over https" in res.stderr
    assert "Traceback" not in res.stderr


async def test_up_serves_the_world_with_the_edge_until_interrupted(tmp_path):
    edge = next((e for e in ("nginx", "haproxy", "caddy") if available(e) is None), None)
    if edge is None:
        pytest.skip("none of nginx, haproxy, caddy is installed")
    state = tmp_path / "state"
    proc = await asyncio.create_subprocess_exec(
        *LAB, "up", edge, "--flavour", "default", "--free-ports", "--json", "--state", str(state),
        "--certs", str(tmp_path / "certs"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, (await proc.stderr.read()).decode()
        ready = json.loads(line)
        assert ready["engine"] == edge and ready["flavour"] == "default"
        assert json.loads((state / "endpoints.json").read_text())["engine"] == edge
        v1 = next(l for l in ready["edge"] if l["name"] == "saas-v1")
        out = await probe(v1["host"], v1["port"], "www.victim.example", [{"host": "www.victim.example"}],
                          ready["ca"])
        assert out.cert_valid_for("www.victim.example") and out.response.origin == "saas"
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert not (state / "endpoints.json").exists()
    with pytest.raises(ProcessLookupError):
        os.killpg(ready["pid"], 0)
