"""Faults of the control plane's world: a resolver that does not answer, a disk that refuses
writes, a process killed mid-change. Real lab, real sockets; the clock is passed, never slept."""
import asyncio
import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys

import aiohttp
import pytest

from lab.client import probe
from lab.dns import query
from lab.run import Lab

SHOP = "shop.customer.example"  # declared active in the world file: CNAME customers.saas.example


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest.fixture
async def lab(world, certs):
    async with Lab.ephemeral(world, certs) as running:
        yield running


async def api(lab, method, path, body=None, headers=None):
    ep = lab.endpoints["control"]
    async with aiohttp.ClientSession() as s:
        async with s.request(method, ep["url"] + path, json=body,
                             headers={"Authorization": f"Bearer {ep['token']}", **(headers or {})}) as r:
            return r.status, await r.json()


async def shop_origin(lab):
    anycast = lab.world.listener_by_name["anycast"]
    out = await probe(anycast.host, anycast.port, SHOP, [{"host": SHOP}], lab.endpoints["ca"])
    return out.response.origin if out.responses else out.tls_error


async def test_resolver_down_during_verification_keeps_the_state(lab):
    before = lab.state.hostname(SHOP)
    assert before.status == "active" and await shop_origin(lab) == "saas"
    await lab.resolver.stop()  # every lookup now fails: refused or timed out
    after = await lab.control.verify(before)
    assert after.status == "active" and lab.state.hostname(SHOP).status == "active"
    assert after.failures == 1 and "no answer from the lab resolver" in after.last_error
    assert after.next_check >= lab.control.clock() + lab.control.interval - 1
    errors = [e for e in lab.events.since(0) if e["kind"] == "hostname.error"]
    assert [e["hostname"] for e in errors] == [SHOP] and errors[0]["error"] == after.last_error
    assert not [e for e in lab.events.since(0) if e["kind"] == "hostname.status" and e["new"] == "moved"]
    # The background round honours the backoff: not asked again before next_check.
    await lab.control.verify_due()
    assert lab.state.hostname(SHOP).failures == 1
    assert await shop_origin(lab) == "saas"  # still certified, still routed


async def test_active_hostname_whose_cname_moved_is_moved_only_after_answers_in_a_row(lab):
    now = [1_000_000.0]
    lab.control.clock = lambda: now[0]
    limits = lab.world.limits  # defaults: 3 answers, the first and the last >= 600 s apart
    assert (limits.verify_moved_after, limits.verify_moved_span) == (3, 600.0)
    status, _ = await api(lab, "POST", "/dns/records", {"name": SHOP, "type": "CNAME", "value": "elsewhere.customer.example"})
    assert status == 201
    for step in (0, 10, 20, 300, 599):
        now[0] = 1_000_000.0 + step
        h = await lab.control.verify(lab.state.hostname(SHOP))
        assert h.status == "active", (step, h.reason)
        assert await shop_origin(lab) == "saas"
    now[0] = 1_000_600.0
    h = await lab.control.verify(lab.state.hostname(SHOP))
    assert h.status == "moved" and "no longer points at customers.saas.example" in h.reason
    assert "UNRECOGNIZED_NAME" in (await shop_origin(lab)).upper()
    # The operator's "verify now" stays conclusive: it comes back at once when DNS and proof agree.
    await api(lab, "POST", "/dns/records", {"name": SHOP, "type": "CNAME", "value": "customers.saas.example"})
    await api(lab, "POST", "/dns/records", {"name": h.to_dict()["txt_name"], "type": "TXT", "value": h.txt_token})
    status, body = await api(lab, "POST", f"/hostnames/{SHOP}/verify")
    assert status == 200 and body["status"] == "active"


def _saved(state):
    return ([h.to_dict() for h in state.hostnames()], state.records(), state.overrides(), state.get("model"))


async def _served(lab):
    dns = lab.world.resolver
    answer = await query("www.victim.example", "A", dns.host, dns.port)
    v1 = lab.world.listener_by_name["saas-v1"]
    out = await probe(v1.host, v1.port, "www.victim.example", [{"host": "www.victim.example"}], lab.endpoints["ca"])
    return [str(rr.rdata) for rr in answer.rr], out.response.origin, lab.world.model, await shop_origin(lab)


CHANGES = [
    ("POST", "/dns/records", {"name": "www.victim.example", "type": "A", "value": "127.0.0.11"}),
    ("POST", "/dns/overrides", {"name": "www.victim.example", "value": "127.0.0.12"}),
    ("PUT", "/model", {"model": "v1"}),
    ("POST", "/hostnames", {"hostname": "www.newshop.test"}),
    ("POST", "/hostnames", [{"hostname": "a.newshop.test"}, {"hostname": "b.newshop.test"}]),  # a list: one write
    ("DELETE", f"/hostnames/{SHOP}", None),
    ("DELETE", "/dns/records?name=shop.customer.example", None),
]


@pytest.mark.parametrize("error", ["database or disk is full", "attempt to write a readonly database"])
async def test_a_change_the_disk_refuses_changes_nothing(lab, error):
    """Disk full or read-only `.lab/`: 503 with the reason, and neither the running lab nor
    the saved state moved. The seam raises SQLite's own error inside the write transaction."""
    saved, served = _saved(lab.state), await _served(lab)

    def refuse():
        raise sqlite3.OperationalError(error)

    lab.state.before_write = refuse
    for method, path, body in CHANGES:
        status, answer = await api(lab, method, path, body)
        assert status == 503 and answer["error"].startswith("not saved, nothing changed: ") and error in answer["error"]
        assert _saved(lab.state) == saved and await _served(lab) == served, (method, path)
    assert (await api(lab, "GET", "/hostnames"))[0] == 200  # reads still work
    lab.state.before_write = None
    status, _ = await api(lab, *CHANGES[0])
    assert status == 201 and (await _served(lab))[0] == ["127.0.0.11"]


def _mountable(path):
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_is_one_line_and_the_lab_keeps_serving(tmp_path):
    """`.lab/` on a 2 MB tmpfs, filled while `sni-lab up` runs."""
    state = tmp_path / "state"
    if not _mountable(state):
        pytest.skip("needs root and tmpfs to make a small full disk")
    proc = None
    try:
        proc = subprocess.Popen([sys.executable, "-m", "lab", "up", "--free-ports", "--certs", str(tmp_path / "certs"),
                                 "--state", str(state), "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        ep = json.loads(proc.stdout.readline())
        cli = lambda *a: subprocess.run([sys.executable, "-m", "lab", *a, "--state", str(state)], capture_output=True,
                                        text=True, timeout=30)
        with contextlib.suppress(OSError), open(state / "filler", "wb") as f:
            for _ in range(64):  # 4 MB at most: more than the disk
                f.write(b"\0" * 65536)
                f.flush()
        big = [f"v={i:03d}" + "x" * 3990 for i in range(15)]  # 60 KB (the API takes 64): the WAL must grow
        res = cli("dns", "set", "big.victim.example", "TXT", *big)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert res.stderr.startswith("sni-lab: error: POST /dns/records: 503 not saved, nothing changed: ")
        assert "disk is full" in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert "big.victim.example" not in cli("dns", "list").stdout  # reads work, nothing half-applied
        v1 = next(l for l in ep["edge"] if l["name"] == "saas-v1")
        out = asyncio.run(probe(v1["host"], v1["port"], "www.victim.example", [{"host": "www.victim.example"}], ep["ca"]))
        assert out.response.status == 200  # the edge keeps serving
        (state / "filler").unlink()
        assert cli("dns", "set", "big.victim.example", "TXT", *big).returncode == 0
    finally:
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
        subprocess.run(["umount", "-l", str(state)], capture_output=True)


class Up:
    """`sni-lab up --free-ports` as a subprocess, killed with SIGKILL and started again."""

    def __init__(self, tmp_path):
        self.cmd = [sys.executable, "-m", "lab", "up", "--free-ports", "--certs", str(tmp_path / "certs"),
                    "--state", str(tmp_path / "state"), "--json"]
        self.proc = self.ep = None

    async def start(self):
        self.proc = await asyncio.create_subprocess_exec(*self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 20)
        assert line, (await self.proc.stderr.read()).decode()
        self.ep = json.loads(line)

    async def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def api(self, s, method, path, body=None):
        ep = self.ep["control"]
        async with s.request(method, ep["url"] + path, json=body, headers={"Authorization": f"Bearer {ep['token']}"}) as r:
            return r.status, await r.json()


async def test_kill_9_during_hostname_transitions_leaves_no_half_state(tmp_path):
    """Registrations and deletions in flight when the process is killed: after the restart,
    every hostname's status has its event, and every event its hostname, as the edge sees it."""
    up = Up(tmp_path)
    await up.start()
    try:
        created = []
        for rnd, delay in enumerate((0.05, 0.15, 0.3)):
            async with aiohttp.ClientSession() as s:
                calls = [up.api(s, "POST", "/hostnames", {"hostname": f"n{rnd}-{i}.newshop.test"}) for i in range(40)]
                calls += [up.api(s, "DELETE", f"/hostnames/{hid}") for hid in created]
                tasks = [asyncio.ensure_future(c) for c in calls]
                await asyncio.sleep(delay)
                await up.kill()
                done = await asyncio.gather(*tasks, return_exceptions=True)
            await up.start()
            async with aiohttp.ClientSession() as s:
                _, page = await up.api(s, "GET", "/hostnames?limit=1000")
                hostnames = page["hostnames"]
                _, events = await up.api(s, "GET", "/events?kind=hostname.status&limit=10000")
            last = {}
            for e in events:
                last[e["hostname_id"]] = e["new"]
            saved = {h["id"]: h["status"] for h in hostnames}
            assert last == saved, f"round {rnd}: {len(done)} calls, {len(saved)} hostnames, {len(last)} with events"
            created = [h["id"] for h in hostnames if h["status"] == "pending"]
    finally:
        if up.proc.returncode is None:
            up.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(up.proc.wait(), 10)
