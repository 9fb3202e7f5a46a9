"""`sni-lab up` as a user runs it: ready line, endpoints file, clean shutdown, clear bind errors."""
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from urllib.parse import urlsplit

import pytest

from lab.topology import default_path
from tests.conftest import need


def _config(tmp_path, text=None):
    path = tmp_path / "lab.toml"
    path.write_text(text or re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text()))
    return path


def _up(tmp_path, config, *extra):
    return subprocess.Popen([sys.executable, "-m", "lab", "up", "--config", str(config), "--certs", str(tmp_path / "certs"),
                             "--state", str(tmp_path / "state"), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _free(host, port):
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def test_sigterm_stops_and_frees_every_port(tmp_path):
    proc = _up(tmp_path, _config(tmp_path), "--json")
    ep = json.loads(proc.stdout.readline())
    endpoints_file = tmp_path / "state" / "endpoints.json"
    assert json.loads(endpoints_file.read_text())["control"]["token"] == ep["control"]["token"]
    assert stat.S_IMODE(os.stat(endpoints_file).st_mode) == 0o600
    assert {"model", "engine", "ca", "edge", "origins", "dns", "control"} <= set(ep)
    bound = [(l["host"], l["port"]) for l in ep["edge"]] + [(ep["dns"]["host"], ep["dns"]["port"])]
    bound += [(u.hostname, u.port) for u in map(urlsplit, ep["origins"].values())]
    bound = [(h, int(p)) for h, p in bound]
    assert not any(_free(h, p) for h, p in bound)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    # `up` gives its parts 2 s to stop; the bound here only catches a hang, on a loaded CI machine.
    assert time.monotonic() - started < 5.0
    assert proc.returncode == 0
    assert all(_free(h, p) for h, p in bound)
    assert not endpoints_file.exists()


def test_port_in_use_is_one_line_and_exit_1(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.10", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    text = re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text())
    text = text.replace('host = "127.0.0.10"\nport = 0', f'host = "127.0.0.10"\nport = {port}')
    try:
        proc = _up(tmp_path, _config(tmp_path, text))
        out, err = proc.communicate(timeout=20)
    finally:
        blocker.close()
    assert proc.returncode == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("sni-lab: error:")]
    assert errors == [f"sni-lab: error: edge listener anycast: cannot bind 127.0.0.10:{port}: address already in use "
                      f"(another `sni-lab up` or program holds the port; stop it or pick other ports with --config)"]


def test_origins_in_their_own_process(tmp_path):
    """`sni-lab origins` + `sni-lab up --no-origins`: one world spread over two processes."""
    refused = _up(tmp_path, _config(tmp_path), "--no-origins")  # port 0: the edge could not find them
    _, err = refused.communicate(timeout=20)
    assert refused.returncode == 1 and "the world must give their ports" in err
    text = re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text())
    for host in ("127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34"):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        text = text.replace(f'host = "{host}"\nport = 0', f'host = "{host}"\nport = {port}')
    config = _config(tmp_path, text)
    origins = subprocess.Popen([sys.executable, "-m", "lab", "origins", "--config", str(config), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lab = None
    try:
        urls = json.loads(origins.stdout.readline())["origins"]
        lab = _up(tmp_path, config, "--no-origins", "--json")
        ep = json.loads(lab.stdout.readline())
        assert ep["origins"] == urls
        v1 = next(l for l in ep["edge"] if l["name"] == "saas-v1")
        res = subprocess.run([need("curl"), "-sS", "-i", "--cacert", ep["ca"], "--resolve",
                              f"www.victim.example:{v1['port']}:{v1['host']}", f"https://www.victim.example:{v1['port']}/"],
                             capture_output=True, text=True, timeout=10)
        assert "x-lab-origin: saas" in res.stdout.lower()
    finally:
        for proc in (lab, origins):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(10)


def test_control_plane_off_loopback_needs_allow_remote(tmp_path):
    text = re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text())
    assert '[control]\nhost = "127.0.0.1"' in text
    config = _config(tmp_path, text.replace('[control]\nhost = "127.0.0.1"', '[control]\nhost = "0.0.0.0"'))
    proc = _up(tmp_path, config)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 2 and "Traceback" not in err and out == ""
    assert err.splitlines() == ["sni-lab: error: the control plane would listen on 0.0.0.0, reachable from other "
                                "machines (its token changes the lab; its hostnames hold verification tokens): use a "
                                "127.0.0.0/8 address, or pass --allow-remote if that is what you want"]
    assert not (tmp_path / "state" / "endpoints.json").exists()
    # (With --allow-remote it would bind 0.0.0.0 and warn; the tests bind nothing beyond loopback.)


def test_free_ports_runs_the_packaged_world_beside_another(tmp_path):
    """`--free-ports`: the world's addresses, any free port, so two labs (or a busy 8443) coexist."""
    first = _up(tmp_path / "a", default_path(), "--free-ports", "--json")
    second = _up(tmp_path / "b", default_path(), "--free-ports", "--json")
    try:
        a, b = (json.loads(p.stdout.readline()) for p in (first, second))
        ports = lambda ep: {l["port"] for l in ep["edge"]} | {ep["dns"]["port"]}
        assert not ports(a) & ports(b) and 8443 not in ports(a) | ports(b)
        assert [l["host"] for l in a["edge"]] == [l["host"] for l in b["edge"]]  # the world's own addresses
    finally:
        for proc in (first, second):
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    assert first.returncode == second.returncode == 0


def _bound(ep):
    """Every (host, port) a running `up` listens on, from its endpoints."""
    bound = [(l["host"], l["port"]) for l in ep["edge"]] + [(ep["dns"]["host"], ep["dns"]["port"])]
    bound += [(u.hostname, u.port) for u in map(urlsplit, ep["origins"].values())]
    bound.append(tuple(ep["control"]["url"].removeprefix("http://").rsplit(":", 1)))
    return [(h, int(p)) for h, p in bound]


def _udp_free(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


async def test_sigterm_with_two_sse_clients_ends_their_streams_and_loses_no_event(tmp_path):
    """The live page holds an SSE stream open: SIGTERM still stops everything, promptly, and the
    event log keeps every event told before the signal."""
    import asyncio

    import aiohttp

    from lab.client import probe
    from lab.state import State

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lab", "up", "--config", str(_config(tmp_path)), "--certs", str(tmp_path / "certs"),
        "--state", str(tmp_path / "state"), "--json", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ep = json.loads(await asyncio.wait_for(proc.stdout.readline(), 20))
        bound = _bound(ep)
        seen: list[list[int]] = [[], []]
        async with aiohttp.ClientSession() as s:
            streams = [await s.get(ep["control"]["url"] + "/events", headers={"Accept": "text/event-stream"})
                       for _ in seen]

            async def read(ids, stream):  # to the end of the stream
                async for line in stream.content:
                    if line.startswith(b"data: "):
                        ids.append(json.loads(line[6:]))
            readers = [asyncio.create_task(read(ids, st)) for ids, st in zip(seen, streams)]
            v1 = next(l for l in ep["edge"] if l["name"] == "saas-v1")
            traces = []
            for i in range(5):
                traces.append(f"stop-{i}")
                out = await probe(v1["host"], v1["port"], "www.victim.example",
                                  [{"host": "www.victim.example", "headers": [("X-Lab-Trace", traces[-1])]}], ep["ca"])
                assert out.response is not None and out.response.status == 200, out
            told = lambda ids: {e["trace"] for e in ids if e["kind"] == "origin.hit"} >= set(traces)
            while not all(told(ids) for ids in seen):
                await asyncio.wait([*readers], timeout=0.05)
                assert not any(r.done() for r in readers), "a stream ended before the signal"
            started = asyncio.get_running_loop().time()
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 10)
            stopped = asyncio.get_running_loop().time() - started
            await asyncio.wait_for(asyncio.gather(*readers), 5)  # both streams ended
        print(f"stopped {stopped * 1000:.0f} ms after SIGTERM with two SSE clients")
        assert proc.returncode == 0, (await proc.stderr.read()).decode()
        assert stopped < 2.0, f"took {stopped:.2f} s to stop"
        assert all(_free(h, p) for h, p in bound) and _udp_free(ep["dns"]["host"], ep["dns"]["port"])
        with State(tmp_path / "state") as st:
            stored = {e["id"] for e in st.events(0, 100000)}
        last = max(e["id"] for ids in seen for e in ids)
        assert set(range(1, last + 1)) <= stored, sorted(set(range(1, last + 1)) - stored)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize("fault", ["raises", "hangs"])
async def test_a_part_that_fails_to_stop_does_not_keep_the_others_running(tmp_path, world, fault, caplog):
    import asyncio

    from lab.run import Lab
    from lab.state import State

    lab = Lab(world.with_free_ports(), tmp_path / "certs", state_dir=tmp_path / "state", verify_interval=3600)
    await lab.start()
    edge, stop_edge = lab.edge, lab.edge.stop

    async def broken():  # the fault, injected into one real part
        if fault == "raises":
            raise RuntimeError("injected")
        await asyncio.Event().wait()
    edge.stop = broken
    dns = lab.world.resolver
    control = lab.control.url.removeprefix("http://").rsplit(":", 1)
    lab.set_model("v1")  # told just before the stop
    last = lab.events.since(0)[-1]["id"]
    try:
        await asyncio.wait_for(lab.stop(), 5)
        assert ("edge failed to stop" if fault == "raises" else "edge did not stop in time") in caplog.text
        assert _free(dns.host, dns.port) and _udp_free(dns.host, dns.port) and _free(control[0], int(control[1]))
        with State(tmp_path / "state", exclusive=True) as st:  # the lab let go of it
            assert st.last_event_id() == last and st.events(last - 1)[0]["kind"] == "lab.model"
    finally:
        await stop_edge()
