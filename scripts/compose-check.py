"""Bring the compose stack up for real and check what an instructor and an attendee see.

Traffic rule: from the host this talks only to the port published on 127.0.0.1; every
request to a bridge address is made from inside a container of the stack (`run --rm
client ...`). Before `up`, no route of the host may cover the stack's subnet; after, the
route to every address of the stack must be its own bridge. Otherwise it stops, sending
nothing. Run by `make compose-test` (scripts/compose-test.sh) once the image is built.
"""
from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

from lab.compose import BRIDGE, bridge_world
from lab.world import load

PROJECT = os.environ.get("COMPOSE_PROJECT_NAME", "sni-lab")
COMPOSE = os.environ.get("COMPOSE", "docker-compose").split() + ["-p", PROJECT]
DOCKER = os.environ.get("DOCKER", "docker")
HEALTHY_WITHIN = 180.0


class Stop(Exception):
    """A check failed: the message says which and what was seen."""


def sh(*cmd: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise Stop(f"{' '.join(cmd)}: exit {out.returncode}\n{out.stdout[-3000:]}{out.stderr[-3000:]}")
    return out


def compose(*args: str, **kw) -> subprocess.CompletedProcess:
    return sh(*COMPOSE, *args, **kw)


def step(text: str) -> None:
    print(f"compose-test: {text}", flush=True)


def routes_covering(subnet: ipaddress.IPv4Network) -> list[str]:
    found = []
    for r in json.loads(sh("ip", "-j", "route", "show", "table", "all").stdout or "[]"):
        dst = r.get("dst", "")
        if dst in ("default", "") or ":" in dst or r.get("type") in ("broadcast", "local") and dst.startswith("127."):
            continue
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(subnet):
            found.append(f"{dst} dev {r.get('dev', '?')}")
    for a in json.loads(sh("ip", "-j", "-4", "addr").stdout or "[]"):
        for info in a.get("addr_info", []):
            if ipaddress.ip_address(info["local"]) in subnet:
                found.append(f"address {info['local']} on {a['ifname']}")
    return found


def check_routes(addresses: list[str]) -> None:
    for addr in addresses:
        got = json.loads(sh("ip", "-j", "route", "get", addr).stdout)[0]
        if got.get("dev") != BRIDGE:
            raise Stop(f"the route to {addr} is via {got.get('dev')}, not the stack's bridge {BRIDGE}: stopping "
                       f"before sending anything (set [compose] subnet in the world file to a free network)")


def wait_healthy(services: list[str]) -> None:
    deadline = time.monotonic() + HEALTHY_WITHIN
    while True:
        states = {}
        for name in services:
            cid = compose("ps", "-q", name).stdout.strip()
            info = json.loads(sh(DOCKER, "inspect", cid).stdout)[0]["State"] if cid else {}
            states[name] = info.get("Health", {}).get("Status") or info.get("Status", "missing")
        if all(s == "healthy" for s in states.values()):
            return
        if any(s in ("unhealthy", "exited", "dead", "missing") for s in states.values()) or time.monotonic() > deadline:
            raise Stop(f"services not healthy: {states}\n{compose('logs', '--no-color', '--tail', '30', check=False).stdout}")
        time.sleep(1)


def host_api(method: str, path: str, token: str | None = None, body=None) -> tuple[int, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", method=method,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def client_curl() -> tuple[int, str, str]:
    """Inside the client: a plain curl (system resolver, system trust). Status, origin, body."""
    out = compose("run", "--rm", "-T", "client", "curl", "-s", "-i", "https://www.victim.example/", check=False)
    if out.returncode != 0:
        raise Stop(f"curl in the client failed (exit {out.returncode}; 60 is a certificate it did not trust):\n"
                   f"{out.stdout[-1000:]}{out.stderr[-2000:]}")
    head, _, body = out.stdout.replace("\r\n", "\n").partition("\n\n")
    lines = head.splitlines()
    status = int(lines[0].split()[1])
    origin = next((line.split(":", 1)[1].strip() for line in lines if line.lower().startswith("x-lab-origin:")), "")
    return status, origin, body


def expect(what: str, ok: bool, seen) -> None:
    if not ok:
        raise Stop(f"{what}: got {seen!r}")
    step(f"ok: {what}")


def main() -> int:
    global PORT
    world = load()
    bw = bridge_world(world)
    PORT = world.control.port
    subnet = ipaddress.ip_network(world.compose.subnet)
    addresses = [bw.control.host, bw.resolver.host, *(l.host for l in bw.listeners), *(o.host for o in bw.origins)]
    services = ["control", "resolver", "edge", *(f"origin-{o.name}" for o in bw.origins)]
    compose("down", "-v", "--remove-orphans", check=False)  # what an interrupted run left
    covering = routes_covering(subnet)
    if covering:
        raise Stop(f"the host already routes {subnet} ({'; '.join(covering)}): the stack's bridge would collide "
                   f"with it; not bringing it up (set [compose] subnet in the world file)")
    started = time.perf_counter()
    try:
        compose("up", "-d", "--no-build")
        check_routes(addresses)
        step(f"every stack address routes via {BRIDGE}")
        wait_healthy(services)
        step(f"up and healthy in {time.perf_counter() - started:.1f} s")

        status, page = host_api("GET", "/")
        expect("the live page answers on 127.0.0.1", status == 200 and b"<html" in page.lower(), status)
        token = json.loads(compose("exec", "-T", "control", "cat", "/lab/state/endpoints.json").stdout)["control"]["token"]

        status, origin, _ = client_curl()
        expect("plain curl in the client reaches the victim origin", (status, origin) == (200, "victim"), (status, origin))
        status, _ = host_api("POST", "/dns/overrides", token, {"name": "www.victim.example", "type": "A",
                                                               "value": "listener:saas-v1"})
        expect("poisoned through the control plane (127.0.0.1, token)", status == 201, status)
        status, _ = host_api("POST", "/dns/overrides", None, {"name": "victim.example", "type": "A", "value": "127.0.0.1"})
        expect("a change without the token is refused", status == 401, status)
        wants = {"v1": (200, "saas"), "v1-waf": (403, ""), "v2": (200, "victim")}
        for model, want in wants.items():
            status, _ = host_api("PUT", "/model", token, {"model": model})
            got = client_curl()
            expect(f"under {model} the same plain curl (certificate verified, no -k) gets {want}", got[:2] == want, got[:2])
            if model == "v1":
                expect("the SaaS origin's page is the attacker tenant's", "attacker" in got[2], got[2][:200])

        # A custom hostname proven by TXT goes active on the stack: every vantage point of the
        # control container reaches the resolver over the bridge, and they agree.
        status, body = host_api("POST", "/hostnames", token, {"hostname": "www.newshop.test", "zone": "saas.example"})
        h = json.loads(body)
        expect("a custom hostname registered through the control plane", status == 201, (status, h))
        for record in ({"name": "www.newshop.test", "type": "CNAME", "value": "customers.saas.example"},
                       {"name": h["txt_name"], "type": "TXT", "value": h["txt_token"]}):
            host_api("POST", "/dns/records", token, record)
        status, body = host_api("POST", "/hostnames/www.newshop.test/verify", token)
        h = json.loads(body)
        expect("a hostname proven by TXT is verified active from every vantage point", h.get("status") == "active", h)

        out = compose("run", "--rm", "-T", "client", "sni-lab", "matrix", check=False, timeout=900)
        expect("sni-lab matrix in the client passes", out.returncode == 0, out.stdout[-1500:] + out.stderr[-1500:])

        status, body = host_api("GET", "/events?kind=dns.answer&limit=10000")
        poisoned = [e for e in json.loads(body) if e.get("poisoned")
                    and ipaddress.ip_address(e["client"]) in ipaddress.ip_network(bw.compose.subnet)]
        expect("the live page's events hold the resolver's poisoned answers to the client", bool(poisoned), len(poisoned))
    finally:
        compose("down", "-v", "--remove-orphans", check=False)
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {kind: sh(DOCKER, kind, "ls", "-q", *(["-a"] if kind == "container" else []), "--filter", label).stdout.split()
            for kind in ("container", "network", "volume")}
    bridge = sh("ip", "link", "show", BRIDGE, check=False).returncode == 0
    expect("down -v leaves no container, network or volume", not any(left.values()) and not bridge, (left, bridge))
    step(f"passed in {time.perf_counter() - started:.1f} s (up to down)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Stop as e:
        print(f"compose-test: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
