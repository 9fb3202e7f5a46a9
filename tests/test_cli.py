"""The CLI as a user reads it: `sni-lab events` (newest first, internal traffic hidden) and
every printing command behind a pipe whose reader stops early."""
import asyncio
import json
import os
import signal
import subprocess
import sys

import aiohttp

from lab.client import probe
from lab.dns import query
from tests.test_control import UpProcess, up  # noqa: F401 - the fixture

LAB = [sys.executable, "-m", "lab"]


def _cli(up, *args, **kw):
    return subprocess.run([*LAB, *args, "--state", str(up.dir / "state")], capture_output=True, text=True,
                          timeout=30, **kw)


async def _visit(up, trace):
    l = up.listener("saas-v1")
    out = await probe(l["host"], l["port"], "www.victim.example",
                      [{"host": "www.victim.example", "headers": [("X-Lab-Trace", trace)]}], up.ep["ca"])
    assert out.response is not None and out.response.status == 200, out


async def _events(up, *args):
    res = await asyncio.to_thread(_cli, up, "events", *args, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


async def test_events_shows_the_newest_oldest_first(up):
    traces = [f"visit-{i:02d}" for i in range(20)]
    for t in traces:
        await _visit(up, t)
    five = await _events(up, "--kind", "route", "--limit", "5")
    assert [e["trace"] for e in five] == traces[-5:]
    lines = (await asyncio.to_thread(_cli, up, "events", "--kind", "route", "--limit", "5")).stdout.splitlines()
    assert [line.split()[3] for line in lines] == traces[-5:]  # the last line is the latest
    after = await _events(up, "--kind", "route", "--since", str(five[1]["id"]))
    assert [e["trace"] for e in after] == traces[-3:]
    newest = await _events(up)
    ids = [e["id"] for e in newest]
    assert len(newest) == 50 and ids == sorted(ids) and ids[-1] > five[-1]["id"]  # its origin.hit came after
    # After a restart the ring buffer is empty: the newest come from the stored log.
    up.proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(up.proc.wait(), 10)
    await up.start()
    assert await _events(up, "--kind", "route", "--limit", "5") == five
    bad = await asyncio.to_thread(_cli, up, "events", "--limit", "0")
    assert bad.returncode == 2 and "argument --limit/-n: expected 1 to 10000" in bad.stderr


async def test_the_verifiers_lookups_leave_no_event_each(up):
    """`--follow`, the live page and the log show what clients asked, not the lab re-checking
    hostnames (at 100k hostnames it asks thousands): its lookups leave no `dns.answer` at all;
    a client cannot hide its own lookups by sending the mark (it does not know it)."""
    status, h = await up.api("POST", "/hostnames", {"hostname": "www.newshop.test", "zone": "saas.example"})
    assert status == 201
    dns = up.ep["dns"]
    seen = []
    async with aiohttp.ClientSession() as s:
        async with s.get(up.ep["control"]["url"] + "/events?kind=dns",
                         headers={"Accept": "text/event-stream"}) as stream:
            assert (await up.api("POST", f"/hostnames/{h['id']}/verify"))[0] == 200
            await query(h["txt_name"], "TXT", dns["host"], dns["port"], trace="mine")
            await query(h["txt_name"], "TXT", dns["host"], dns["port"], trace="forged", mark=os.urandom(16))
            while not seen or seen[-1]["trace"] != "forged":
                line = await asyncio.wait_for(stream.content.readline(), 10)
                if line.startswith(b"data: "):
                    seen.append(json.loads(line[6:]))
    # The verification asked the TXT and the A of www.newshop.test from three vantage points:
    # none of it is in the stream between, and neither in the log.
    assert [e["trace"] for e in seen if "newshop" in e["name"]] == ["mine", "forged"]
    hidden, everything = await _events(up, "--kind", "dns"), await _events(up, "--kind", "dns", "--all")
    assert not any(e.get("internal") for e in everything) and {"mine", "forged"} <= {e["trace"] for e in hidden}
    assert not any("mark" in e for e in everything)  # the secret is never told
    checked = (await up.api("GET", f"/hostnames/{h['id']}"))[1]
    assert checked["checks"] == 1 and "looked for TXT" in checked["reason"]  # and yet it did ask


def _into_closed_pipe(*args):
    """Run with stdout a pipe whose reader has already gone."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([*LAB, *args], stdout=w, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(w)


async def test_printing_commands_into_a_closed_pipe_exit_quietly(up):
    await _visit(up, "before-the-pipe")
    state = ["--state", str(up.dir / "state")]
    for args in (["events"], ["events", "--json"], ["hostnames", "list"], ["dns", "list"], ["model"]):
        res = await asyncio.to_thread(_into_closed_pipe, *args, *state)
        assert (res.returncode, res.stderr) == (0, ""), args
    # `sni-lab events -f | head -1`: the reader leaves after one line, the next event ends it.
    proc = subprocess.Popen([*LAB, "events", "--follow", "--kind", "route", *state], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert "before-the-pipe" in await asyncio.to_thread(proc.stdout.readline)
        proc.stdout.close()
        await _visit(up, "after-the-reader-left")
        await asyncio.wait_for(asyncio.to_thread(proc.wait), 10)
        assert (proc.returncode, proc.stderr.read()) == (0, "")
    finally:
        if proc.poll() is None:
            proc.kill()


def test_an_ownership_token_works_as_the_value_of_dns_set():
    from lab.cli import build_parser
    from lab.control import _token
    parser = build_parser()
    for token in {_token() for _ in range(2000)}:  # a URL-safe token would start with '-' ~31 times in 2000
        args = parser.parse_args(["dns", "set", "_sni-lab-custom-hostname.www.newshop.test", "TXT", token])
        assert args.value == [token]
