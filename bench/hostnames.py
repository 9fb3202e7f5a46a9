"""A lab with many custom hostnames: adds, routed requests during adds, lists, start, stop,
memory and the background verifier, in one run.

    .venv/bin/python -m bench.hostnames [--count 100000] [--quick] [--active 0.0] [--json] [--keep]

Seeding: the N hostnames (`hNNNNNN.newshop.test` of saas.example, pending, or a fraction
`--active` active) are written straight into the lab's state database through `State`
before the lab starts, in one transaction (`State.add_hostnames`; one `save_hostname` each
on code that has no batch write). They are due for a check at once, the worst case for the
verifier. The world's own hostnames are seeded by a first start on an empty state, which
also leaves the lab's bytecode cached (under the temp dir when PYTHONDONTWRITEBYTECODE is set,
which would otherwise make every start compile every module: an installed package has its
bytecode).

Then, on `sni-lab up` with N hostnames: ready and stop time (3 starts), RSS, the lab's CPU
over an idle window (the verifier and the resolver answering it) and the events it emitted,
`GET /hostnames` (first page) and `sni-lab hostnames list`, the add rate through the API
(single adds, 4 at a time, and lists of 100 where the API takes a list), and a routed
request's latency (keep-alive HTTPS to the active custom hostname shop.customer.example on
the anycast listener, paced at 100/s by a probe in its own process) idle and during a burst
of 1,000 single adds (sent by a process of their own at nice 10: on a real platform the API's
client is not on the edge's cores; here all three share two). Last, the seeded names are made
active in the database and the lab started again under model v1-waf: the routed request's
latency with the WAF's allowlist holding all of them. Every phase is bounded in time; traffic goes to 127.0.0.0/8 only; every
process is the bench's own and is stopped at exit.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench._proc import cpu_seconds
from bench.edge import BenchError, Procs, sni_lab_cmd, start_lab, write_world

ROUTED = "shop.customer.example"   # the world's active custom hostname: policy, index, certificate
LISTENER = "anycast"
ZONE = "saas.example"
VERIFIER_START = 11.0
ADDER_NICE = 10  # the API client of the burst: on a real platform it is not on the edge's cores
BURST = 1000
BATCH = 100  # the API's largest list (lab.schema.HOSTNAMES_BATCH_MAX)
TARGETS = {"add_rate": 1000.0, "burst_p99_ratio": 2.0, "list_s": 0.5, "ready_s": 1.0, "stop_s": 2.0, "rss_mb": 300.0}


def log(msg: str) -> None:
    print(f"bench.hostnames: {msg}", file=sys.stderr, flush=True)


def name(i: int) -> str:
    return f"h{i:06d}.newshop.test"


# ---- seeding -------------------------------------------------------------------------------

def seed(state_dir: Path, count: int, active: float) -> float:
    """N hostnames straight into the state database; returns the seconds it took."""
    from lab.hostnames import Hostname
    from lab.state import State

    t0 = time.perf_counter()
    now = time.time()
    every = round(1 / active) if active > 0 else 0
    rows = [Hostname(f"ch-bench{i:08d}", name(i), ZONE, "active" if every and i % every == 0 else "pending",
                     f"txt-{i}", f"http-{i}", "seeded by bench.hostnames", now, now,
                     "txt" if every and i % every == 0 else None) for i in range(count)]
    with State(state_dir) as st:
        if hasattr(st, "add_hostnames"):
            st.add_hostnames(rows)
        else:  # the code before the batch write
            for h in rows:
                st.save_hostname(h)
    return time.perf_counter() - t0


# ---- the probe: a routed request, paced, in its own process -----------------------------------

def probe(host: str, port: int, ca: str, seconds: float, rate: float) -> None:
    """Child process: GET / for ROUTED over one keep-alive TLS connection, `rate` per second,
    for `seconds` or until its stdin closes; prints one JSON list of [wall time sent, latency
    ms] (None: failed)."""
    ctx = ssl.create_default_context(cafile=ca)
    out: list = []
    deadline = time.monotonic() + seconds
    conn = None
    request = f"GET / HTTP/1.1\r\nHost: {ROUTED}\r\n\r\n".encode()
    tick = time.monotonic()
    while time.monotonic() < deadline:
        sent = time.time()
        t0 = time.perf_counter()
        try:
            if conn is None:
                conn = ctx.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=ROUTED)
            conn.sendall(request)
            status = _read_response(conn)
            out.append([sent, (time.perf_counter() - t0) * 1000 if status == 200 else None])
        except (OSError, ValueError):
            out.append([sent, None])
            conn = None
        tick += 1 / rate
        if select.select([sys.stdin], [], [], max(0.0, tick - time.monotonic()))[0] and not os.read(0, 1):
            break  # the bench closed our stdin: done
    print(json.dumps(out), flush=True)


def _read_response(conn) -> int:
    """Reads one response; returns its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("closed")
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            raise ValueError("closed")
        body += chunk
    return int(head.split(b" ", 2)[1])


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


# ---- the lab process -------------------------------------------------------------------------

def rss_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) / 1024
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def stop_time(procs: Procs, lab) -> float:
    t0 = time.perf_counter()
    lab.proc.send_signal(signal.SIGTERM)
    try:
        lab.proc.wait(30)
    except subprocess.TimeoutExpired:
        pass
    took = time.perf_counter() - t0
    procs.stop(lab.proc)
    return took


class Control:
    """The control plane over aiohttp (one session, keep-alive)."""

    def __init__(self, endpoints: dict) -> None:
        self.url = endpoints["control"]["url"]
        self.headers = {"Authorization": f"Bearer {endpoints['control']['token']}"}

    async def __aenter__(self):
        import aiohttp

        self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=60))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def call(self, method: str, path: str, body=None) -> tuple[int, bytes]:
        async with self.session.request(method, self.url + path, json=body) as r:
            return r.status, await r.read()

    async def last_event(self) -> int:
        _, raw = await self.call("GET", "/events?newest=1&internal=1")
        found = json.loads(raw)
        return found[-1]["id"] if found else 0

    async def single_adds(self, first: int, count: int, concurrency: int, budget: float) -> tuple[int, float, int]:
        """(added, seconds, errors): `count` single POSTs, `concurrency` at a time, within `budget` s."""
        todo = iter(range(first, first + count))
        added = errors = 0
        deadline = time.monotonic() + budget

        async def worker() -> None:
            nonlocal added, errors
            for i in todo:
                if time.monotonic() > deadline:
                    return
                status, _ = await self.call("POST", "/hostnames", {"hostname": name(i), "zone": ZONE})
                added += status == 201
                errors += status != 201

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return added, time.perf_counter() - t0, errors

    async def batch_adds(self, first: int, batches: int, budget: float) -> tuple[int, float] | None:
        """(added, seconds) of batches of BATCH in one POST each; None when the API takes no list."""
        added, t0 = 0, time.perf_counter()
        for b in range(batches):
            body = [{"hostname": name(first + b * BATCH + i), "zone": ZONE} for i in range(BATCH)]
            status, raw = await self.call("POST", "/hostnames", body)
            if status != 201:
                if b == 0:
                    return None
                raise BenchError(f"batch add: {status} {raw[:200]!r}")
            added += len(json.loads(raw)["hostnames"])
            if time.perf_counter() - t0 > budget:
                break
        return added, time.perf_counter() - t0

    async def first_page(self) -> tuple[float, int, int]:
        """(seconds, bytes, hostnames) of GET /hostnames as a client calls it first."""
        t0 = time.perf_counter()
        status, raw = await self.call("GET", "/hostnames")
        took = time.perf_counter() - t0
        if status != 200:
            raise BenchError(f"GET /hostnames: {status}")
        data = json.loads(raw)
        return took, len(raw), len(data["hostnames"] if isinstance(data, dict) else data)


def adds(control: dict, first: int, concurrency: int, budget: float) -> None:
    """Child process (niced): BURST single adds; prints [added, seconds, errors]."""
    async def main():
        async with Control({"control": control}) as api:
            return await api.single_adds(first, BURST, concurrency, budget)
    print(json.dumps(asyncio.run(main())), flush=True)


def cli_list(state: Path, timeout: float) -> float | None:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(sni_lab_cmd() + ["hostnames", "list", "--state", str(state)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None
    if r.returncode != 0:
        raise BenchError(f"sni-lab hostnames list: {r.stderr.decode(errors='replace').strip()[-200:]}")
    return time.perf_counter() - t0


# ---- the run ---------------------------------------------------------------------------------

async def measure(args, procs: Procs, tmp: Path, lab, res: dict) -> None:
    pid = lab.proc.pid
    ca = lab.endpoints["ca"]
    anycast = next(l for l in lab.endpoints["edge"] if l["name"] == LISTENER)
    async with Control(lab.endpoints) as api:
        # Idle: what the lab spends on its own (the verifier, the resolver answering it), once
        # the verifier's first round has begun (the code before the schedule slept 10 s first).
        await asyncio.sleep(VERIFIER_START)
        c0, e0, t0 = cpu_seconds(pid), await api.last_event(), time.monotonic()
        await asyncio.sleep(args.idle)
        c1, e1, t1 = cpu_seconds(pid), await api.last_event(), time.monotonic()
        res["idle"] = {"seconds": round(t1 - t0, 1), "cpu_pct": round(100 * (c1 - c0) / (t1 - t0), 1),
                       "events_per_s": round((e1 - e0) / (t1 - t0), 1)}
        res["rss_mb"], res["rss_peak_mb"] = (round(x) for x in rss_mb(pid))
        log(f"idle: {res['idle']}; RSS {res['rss_mb']} MB")

        pages = [await api.first_page() for _ in range(3)]
        took, size, n = sorted(pages)[1]
        res["list_api"] = {"seconds": round(took, 3), "bytes": size, "hostnames": n}
        lists = [cli_list(tmp / "state", args.budget) for _ in range(3)]
        res["list_cli_s"] = None if None in lists else round(statistics.median(lists), 3)
        log(f"GET /hostnames {res['list_api']}; sni-lab hostnames list {res['list_cli_s']} s")

        # A routed request, idle then during a burst of single adds.
        span = args.idle + args.budget + 2
        child = procs.start([sys.executable, "-m", "bench.hostnames", "--probe", anycast["host"], str(anycast["port"]),
                             ca, str(span)], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        await asyncio.sleep(args.idle)
        b0 = time.time()
        adder = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.hostnames", "--adds", json.dumps(lab.endpoints["control"]), str(args.count),
            str(args.concurrency), str(args.budget), stdout=subprocess.PIPE, preexec_fn=lambda: os.nice(ADDER_NICE))
        out, _ = await adder.communicate()
        b1 = time.time()
        added, secs, errors = json.loads(out)
        res["single_adds"] = {"added": added, "seconds": round(secs, 2), "per_s": round(added / secs, 1),
                              "errors": errors, "concurrency": args.concurrency, "of": BURST}
        log(f"single adds: {res['single_adds']}")
        await asyncio.sleep(0.5)
        out, _ = await asyncio.to_thread(child.communicate, b"", timeout=span + 30)
        procs.live.remove(child)
        samples = json.loads(out)
        idle = [ms for t, ms in samples if ms is not None and t < b0 - 0.2]
        burst = [ms for t, ms in samples if ms is not None and b0 <= t <= b1]
        failed = sum(1 for _, ms in samples if ms is None)
        res["routed"] = {"idle_p50_ms": pct(idle, 0.5), "idle_p99_ms": pct(idle, 0.99), "idle_n": len(idle),
                         "burst_p50_ms": pct(burst, 0.5), "burst_p99_ms": pct(burst, 0.99), "burst_n": len(burst),
                         "burst_max_ms": max(burst, default=None), "failed": failed}
        r = res["routed"]
        r["p99_ratio"] = round(r["burst_p99_ms"] / r["idle_p99_ms"], 2) if idle and burst else None
        log(f"routed: {r}")

        batches = await api.batch_adds(args.count + BURST, args.batches, args.budget)
        res["batch_adds"] = None if batches is None else {
            "added": batches[0], "seconds": round(batches[1], 2), "per_s": round(batches[0] / batches[1], 1)}
        log(f"batch adds: {res['batch_adds'] or 'the API takes no list'}")


def activate_all(state_dir: Path) -> int:
    """Every seeded hostname active (its TXT proof taken), straight in the state database while
    the lab is stopped, as `seed` wrote them: the v1-waf phase wants 100k active names in one zone."""
    import sqlite3

    with sqlite3.connect(state_dir / "state.db") as db:
        return db.execute("UPDATE hostnames SET status = 'active', ownership = 'txt' "
                          "WHERE status = 'pending' AND id LIKE 'ch-bench%'").rowcount


async def waf_routed(args, procs: Procs, lab, res: dict) -> None:
    """A routed request under model v1-waf on the zone's own v1 address (where the WAF's host
    allowlist applies), every seeded name an active custom hostname of the zone: the
    allowlist holds them all."""
    v1 = next(l for l in lab.endpoints["edge"] if l["zone"] == ZONE)
    async with Control(lab.endpoints) as api:
        status, raw = await api.call("PUT", "/model", {"model": "v1-waf"})
        if status != 200:
            raise BenchError(f"PUT /model v1-waf: {status} {raw[:200]!r}")
        child = procs.start([sys.executable, "-m", "bench.hostnames", "--probe", v1["host"], str(v1["port"]),
                             lab.endpoints["ca"], str(args.idle + 5)], stdout=subprocess.PIPE, stdin=subprocess.PIPE)
        await asyncio.sleep(args.idle)
        out, _ = await asyncio.to_thread(child.communicate, b"", timeout=30)
        procs.live.remove(child)
    samples = json.loads(out)
    ok = [ms for _, ms in samples if ms is not None]
    res["waf_routed"] = {"p50_ms": pct(ok, 0.5), "p99_ms": pct(ok, 0.99), "n": len(ok),
                         "failed": len(samples) - len(ok), "listener": v1["name"]}
    log(f"routed under v1-waf: {res['waf_routed']}")


def run(args) -> dict:
    from lab.topology import default_path

    res: dict = {"bench": "hostnames", "settings": {"count": args.count, "active": args.active, "cpus": os.cpu_count(),
                                                     "load_avg_at_start": round(os.getloadavg()[0], 2)}}
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="sni-lab-bench-hostnames-"))
    started = time.monotonic()
    env = dict(os.environ)
    if env.get("PYTHONDONTWRITEBYTECODE"):
        # The lab starts with its bytecode cached, as an installed package does: without, every
        # start here compiled each of its modules from source (~0.25 s of `ready`).
        os.environ.pop("PYTHONDONTWRITEBYTECODE")
        os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
        res["settings"]["bytecode"] = "cached by the first start (PYTHONDONTWRITEBYTECODE was set)"
    try:
        config = tmp / "lab.toml"
        write_world(default_path(), config)
        stop_time(procs, start_lab(procs, tmp, config))  # seeds the world's hostnames, issues the zones' leaves
        empty = start_lab(procs, tmp, config)  # the baseline: the same lab with its world's hostnames only
        res["empty"] = {"ready_s": round(empty.wall_s, 2), "ready_inner_s": round(empty.ready_ms / 1000, 2),
                        "stop_s": round(stop_time(procs, empty), 2)}
        res["seed_s"] = round(seed(tmp / "state", args.count, args.active), 2)
        log(f"seeded {args.count} hostnames in {res['seed_s']} s; starting the lab")
        readies, stops = [], []
        for i in range(args.starts):
            lab = start_lab(procs, tmp, config, timeout=120)
            readies.append((lab.wall_s, lab.ready_ms / 1000))
            if i == args.starts - 1:
                try:
                    asyncio.run(measure(args, procs, tmp, lab, res))
                finally:
                    stops.append(stop_time(procs, lab))
            else:
                stops.append(stop_time(procs, lab))
        res["activated"] = activate_all(tmp / "state")
        lab = start_lab(procs, tmp, config, timeout=120)
        try:
            asyncio.run(waf_routed(args, procs, lab, res))
        finally:
            stop_time(procs, lab)
        wall, inner = zip(*readies)
        res["ready_s"] = round(statistics.median(wall), 2)
        res["ready_inner_s"] = round(statistics.median(inner), 2)
        res["ready_all_s"] = [round(w, 2) for w in wall]
        res["stop_s"] = round(statistics.median(stops), 2)
        res["stop_all_s"] = [round(s, 2) for s in stops]
    finally:
        os.environ.clear()
        os.environ.update(env)
        procs.stop_all()
        if args.keep:
            log(f"kept {tmp}")
        else:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    return res


def report(res: dict) -> None:
    s = res["settings"]
    r, single, batch, w = res["routed"], res["single_adds"], res["batch_adds"], res["waf_routed"]
    ok = lambda good: "ok" if good else "MISSED"
    fast = max(single["per_s"], batch["per_s"] if batch else 0)
    rows = [
        ("hostnames", f"{s['count']:,} seeded ({s['active']:.0%} active) in {res['seed_s']} s", ""),
        ("add, single", f"{single['per_s']:,.0f}/s ({single['added']} of {single['of']} in {single['seconds']} s, "
                        f"{single['concurrency']} at a time, {single['errors']} errors)", ""),
        ("add, batch", f"{batch['per_s']:,.0f}/s ({batch['added']} in {batch['seconds']} s, {BATCH} a request)"
                       if batch else "n/a (the API takes no list)", ok(fast >= TARGETS["add_rate"])),
        ("routed p50/p99 idle", f"{r['idle_p50_ms']:.2f} / {r['idle_p99_ms']:.2f} ms ({r['idle_n']} requests)"
                                if r["idle_n"] else "no request completed", ""),
        ("routed p50/p99 adds", f"{r['burst_p50_ms']:.2f} / {r['burst_p99_ms']:.2f} ms ({r['burst_n']} requests, "
                                f"max {r['burst_max_ms']:.1f} ms, {r['failed']} failed); p99 ratio {r['p99_ratio']}x"
                                if r["burst_n"] and r["idle_n"] else
                                f"no request completed during the adds ({r['failed']} failed)",
         ok(r["p99_ratio"] is not None and r["p99_ratio"] <= TARGETS["burst_p99_ratio"])),
        ("routed p50/p99 v1-waf", f"{w['p50_ms']:.2f} / {w['p99_ms']:.2f} ms ({w['n']} requests, {w['failed']} failed; "
                                  f"model v1-waf on {w['listener']}, {res['activated']:,} seeded names active in {ZONE})"
                                  if w["n"] else f"no request routed ({w['failed']} failed)", ""),
        ("GET /hostnames", f"{res['list_api']['seconds'] * 1000:.0f} ms, {res['list_api']['bytes']:,} bytes, "
                           f"{res['list_api']['hostnames']:,} hostnames", ""),
        ("hostnames list (CLI)", f"{res['list_cli_s']} s" if res["list_cli_s"] is not None else "timed out",
         ok(res["list_cli_s"] is not None and res["list_cli_s"] <= TARGETS["list_s"])),
        ("ready", f"{res['ready_s']} s (in the process {res['ready_inner_s']} s; {res['ready_all_s']}; "
                  f"empty state {res['empty']['ready_s']} s, {res['empty']['ready_inner_s']} s in the process)",
         ok(res["ready_s"] <= TARGETS["ready_s"])),
        ("stop", f"{res['stop_s']} s ({res['stop_all_s']})", ok(res["stop_s"] <= TARGETS["stop_s"])),
        ("RSS", f"{res['rss_mb']} MB (peak {res['rss_peak_mb']} MB)", ok(res["rss_peak_mb"] <= TARGETS["rss_mb"])),
        ("idle lab CPU", f"{res['idle']['cpu_pct']}% of a core, {res['idle']['events_per_s']:,} events/s "
                         f"(over {res['idle']['seconds']} s: the verifier and the resolver answering it)", ""),
    ]
    print(f"bench.hostnames: {s['count']:,} custom hostnames, {s['cpus']} CPUs, load {s['load_avg_at_start']} "
          f"at start, {res['elapsed_s']} s" + (f"; bytecode {s['bytecode']}" if "bytecode" in s else ""))
    for label, value, verdict in rows:
        print(f"  {label:<22} {value}" + (f"  [{verdict}]" if verdict else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hostnames", description=__doc__.split("\n")[0])
    p.add_argument("--count", type=int, default=100_000, help="hostnames seeded before the lab starts (100000)")
    p.add_argument("--quick", action="store_true", help="10,000 hostnames, shorter windows")
    p.add_argument("--active", type=float, default=0.0, help="fraction of the seeded hostnames that are active (0)")
    p.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (state, lab.stderr)")
    p.add_argument("--probe", nargs=4, metavar=("HOST", "PORT", "CA", "SECONDS"), help=argparse.SUPPRESS)
    p.add_argument("--adds", nargs=4, metavar=("CONTROL", "FIRST", "CONCURRENCY", "BUDGET"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.adds:
        control, first, concurrency, budget = args.adds
        adds(json.loads(control), int(first), int(concurrency), float(budget))
        return 0
    if args.probe:
        host, port, ca, seconds = args.probe
        probe(host, int(port), ca, float(seconds), rate=100.0)
        return 0
    if args.quick and args.count == p.get_default("count"):
        args.count = 10_000
    args.idle = 3.0 if args.quick else 5.0
    args.budget = 15.0 if args.quick else 30.0  # seconds any one phase may take
    args.starts = 2 if args.quick else 3
    args.batches = 50 if args.quick else 100
    args.concurrency = 4
    if not 0 <= args.active <= 1 or args.count < 1:
        p.error("--count must be positive and --active between 0 and 1")
    try:
        res = run(args)
    except BenchError as e:
        print(f"bench.hostnames: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        report(res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
