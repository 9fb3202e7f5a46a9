"""Queries/s of the lab resolver next to dnsmasq, same zone data, same load, one run.

    .venv/bin/python -m bench.dns [--quick] [--seconds 10] [--rounds 8] [--load auto|dnsperf|python] [--log] [--json]

Each server runs in its own process (ours on uvloop), on a loopback address; the load
is dnsperf when installed (`apt-get install dnsperf`), else a small uvloop UDP client
keeping a bounded number of queries outstanding. Rounds alternate between the two
servers so a noisy neighbour hurts both alike; the median round is reported, and the
ratio is the median of the per-round ratios. Queries per CPU-second of each server (its
user + system time, Linux) are shown too: a neighbour that takes the server's core lowers
queries/s, not what each query costs. Our events go to the in-memory ring; `--log` also
writes them to the durable log (an EventSink into a State in a temporary directory, as
`sni-lab up` does), which costs far more per query than the answer itself.
Traffic goes to 127.0.0.0/8 only; every child process is ours and is stopped at exit.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from bench._proc import cpu_seconds

OURS_HOST, DNSMASQ_HOST = "127.0.0.201", "127.0.0.202"
SERVER_CPUS: set[int] = set()  # the core the server under test gets to itself (when there are two or more)
TXT_NAME, TXT_VALUE = "_bench.victim.example", "sni-lab bench"
DNSMASQ = "/usr/sbin/dnsmasq"


def queries(world) -> list[tuple[str, str]]:
    """Every name of the world, asked the way a client would, plus one TXT."""
    return [(r.name, r.type) for r in world.records if r.type == "A"] + \
           [(r.name, "A") for r in world.records if r.type == "CNAME"] + [(TXT_NAME, "TXT")]


def pin_cpus() -> None:
    """Give servers the last core and the load everything else, so neither starves the other."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if len(cpus) >= 2:
        SERVER_CPUS.add(cpus[-1])
        os.sched_setaffinity(0, set(cpus[:-1]))  # this process and the load it starts


def settled_cpu_seconds(pid: int, within: float = 5.0) -> float | None:
    """`cpu_seconds` once the process has gone (nearly) idle, waiting at most `within` seconds."""
    now = cpu_seconds(pid)
    deadline = time.monotonic() + within
    while now is not None and time.monotonic() < deadline:
        time.sleep(0.1)
        before, now = now, cpu_seconds(pid)
        if now - before < 0.005:
            break
    return now


def pin_server(pid: int) -> None:
    if SERVER_CPUS:
        os.sched_setaffinity(pid, SERVER_CPUS)


def free_port(host: str) -> int:
    """A port free for both UDP and TCP on host (dnsmasq takes both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u, socket.socket() as t:
            u.bind((host, 0))
            port = u.getsockname()[1]
            try:
                t.bind((host, port))
            except OSError:
                continue
            return port
    raise SystemExit(f"bench: no free port on {host}")


# ---- the two servers ------------------------------------------------------------------

def serve(host: str, durable_log: bool = False) -> None:
    """Child process: run our resolver on uvloop until SIGTERM; print the bound port."""
    from lab.dns import Resolver
    from lab.events import Events
    from lab.state import EventSink, State
    from lab.world import load

    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run

    async def main(directory: str) -> None:
        world, events = load(), Events()  # events stay on: the lab always emits them
        sink = None
        if durable_log:
            limits = world.limits
            sink = EventSink(events, State(directory), keep_rows=limits.event_log_rows, keep_bytes=limits.event_log_bytes)
            await sink.start()
        resolver = Resolver(world, events)
        resolver.set_record(TXT_NAME, "TXT", TXT_VALUE)
        _, port = await resolver.start(host, 0)
        print(port, flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await resolver.stop()
        if sink is not None:
            await sink.close()
            sink.state.close()

    with tempfile.TemporaryDirectory(prefix="bench-dns-") as directory:
        run(main(directory))


@contextlib.contextmanager
def ours(durable_log: bool = False):
    proc = subprocess.Popen([sys.executable, "-m", "bench.dns", "--serve", OURS_HOST, *(["--log"] if durable_log else [])],
                            stdout=subprocess.PIPE, text=True)
    pin_server(proc.pid)
    try:
        line = proc.stdout.readline()
        if not line.strip().isdigit():
            raise SystemExit(f"bench: our resolver did not start (exit {proc.wait()})")
        yield OURS_HOST, int(line), proc.pid
    finally:
        proc.terminate()
        proc.wait(5)


@contextlib.contextmanager
def dnsmasq(world):
    if not os.access(DNSMASQ, os.X_OK):
        raise SystemExit(f"bench: {DNSMASQ} not found (apt-get install dnsmasq)")
    port = free_port(DNSMASQ_HOST)
    args = [DNSMASQ, "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null", "--port", str(port),
            "--listen-address", DNSMASQ_HOST, "--bind-interfaces", "--local-ttl", str(world.ttl),
            f"--txt-record={TXT_NAME},{TXT_VALUE}"]
    for r in world.records:
        if r.type == "A":
            args.append(f"--host-record={r.name},{world.address_of(r.value)}")
        elif r.type == "CNAME":
            args.append(f"--cname={r.name},{r.value}")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    pin_server(proc.pid)
    try:
        for _ in range(100):  # ready when it answers
            if proc.poll() is not None:
                raise SystemExit(f"bench: dnsmasq exited: {proc.stderr.read().strip()[-300:]}")
            if asyncio.run(probe(DNSMASQ_HOST, port)):
                break
            time.sleep(0.05)
        else:
            raise SystemExit("bench: dnsmasq did not answer")
        yield DNSMASQ_HOST, port, proc.pid
    finally:
        proc.terminate()
        proc.wait(5)


async def probe(host: str, port: int) -> bool:
    from lab.dns import query
    try:
        await query("www.victim.example", host=host, port=port, timeout=0.2)
        return True
    except (OSError, TimeoutError):
        return False


# ---- the load ----------------------------------------------------------------------

def load_dnsperf(host: str, port: int, qs, seconds: float) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as f:
        f.write("".join(f"{name} {rtype}\n" for name, rtype in qs))
        f.flush()
        out = subprocess.run(["dnsperf", "-s", host, "-p", str(port), "-d", f.name, "-l", str(seconds),
                              "-c", "4", "-q", "200", "-t", "2"],
                             capture_output=True, text=True, timeout=seconds + 30).stdout
    qps = re.search(r"Queries per second:\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    done = re.search(r"Queries completed:\s+(\d+)", out)
    if not qps or not done:
        raise SystemExit(f"bench: could not read dnsperf's output:\n{out}")
    return {"qps": float(qps.group(1)), "lost": int(lost.group(1)) if lost else 0, "answered": int(done.group(1))}


def load_python(host: str, port: int, qs, seconds: float, outstanding: int = 200) -> dict:
    """A bounded-window UDP load client: `outstanding` queries in flight, each answer sends the next."""
    from dnslib import DNSRecord
    try:
        import uvloop
        run = uvloop.run
    except ImportError:
        run = asyncio.run
    packets = [bytes(DNSRecord.question(name, rtype).pack())[2:] for name, rtype in qs]

    class Client(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.sent = self.answered = 0

        def connection_made(self, transport) -> None:
            self.transport = transport
            for _ in range(outstanding):
                self.send()

        def send(self) -> None:
            self.sent += 1
            self.transport.sendto((self.sent & 0xFFFF).to_bytes(2, "big") + packets[self.sent % len(packets)])

        def datagram_received(self, data, addr) -> None:
            self.answered += 1
            self.send()

    async def main() -> dict:
        loop = asyncio.get_running_loop()
        transport, client = await loop.create_datagram_endpoint(Client, remote_addr=(host, port))
        start = time.perf_counter()
        await asyncio.sleep(seconds)
        elapsed = time.perf_counter() - start
        transport.close()
        # A query lost in flight shrinks the window for good; report it rather than hide it.
        return {"qps": client.answered / elapsed, "lost": client.sent - client.answered - outstanding,
                "answered": client.answered}

    return run(main())


def per_cpu_second(rounds: list[dict]) -> float | None:
    cpu = [r["cpu"] for r in rounds]
    if None in cpu or not sum(cpu):
        return None
    return sum(r["answered"] for r in rounds) / sum(cpu)


# ---- main ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=10.0, help="load time per server, split into rounds (max 10)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="3 s per server in 3 rounds")
    p.add_argument("--load", choices=("auto", "dnsperf", "python"), default="auto")
    p.add_argument("--log", action="store_true", help="our events also go to the durable log, as in `sni-lab up`")
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve", metavar="HOST", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(args.serve, args.log)
        return 0

    from lab.world import load
    world = load()
    pin_cpus()
    qs = queries(world)
    if args.quick:
        args.seconds, args.rounds = 3.0, 3
    seconds = min(max(args.seconds, 1.0), 10.0) / max(args.rounds, 1)
    loader = args.load if args.load != "auto" else ("dnsperf" if shutil.which("dnsperf") else "python")
    if loader == "dnsperf" and not shutil.which("dnsperf"):
        raise SystemExit("bench: dnsperf not found (apt-get install dnsperf, or --load python)")
    run_load = load_dnsperf if loader == "dnsperf" else load_python

    def measured(host: str, port: int, pid: int) -> dict:
        before = cpu_seconds(pid)
        r = run_load(host, port, qs, seconds)
        after = settled_cpu_seconds(pid)  # with the work the round left behind (the durable log's writes)
        r["cpu"] = None if before is None or after is None else after - before
        return r

    results: dict[str, list[dict]] = {"sni-lab": [], "dnsmasq": []}
    with ours(args.log) as server, dnsmasq(world) as reference:
        for _ in range(args.rounds):
            results["sni-lab"].append(measured(*server))
            results["dnsmasq"].append(measured(*reference))
    summary = {name: {"qps": statistics.median(r["qps"] for r in rs), "lost": sum(r["lost"] for r in rs),
                      "per_cpu_second": per_cpu_second(rs), "rounds": [round(r["qps"]) for r in rs]}
               for name, rs in results.items()}
    # Rounds are paired in time (ours, then dnsmasq), so the median of the per-pair
    # ratios shrugs off a neighbour that slowed one stretch of the run for both.
    ratio = statistics.median(o["qps"] / d["qps"] for o, d in zip(results["sni-lab"], results["dnsmasq"]) if d["qps"])
    ours_cpu, theirs_cpu = summary["sni-lab"]["per_cpu_second"], summary["dnsmasq"]["per_cpu_second"]
    ratio_cpu = ours_cpu / theirs_cpu if ours_cpu and theirs_cpu else None
    if args.json:
        print(json.dumps({"load": loader, "seconds_per_round": seconds, "durable_log": args.log, "server_cpus": sorted(SERVER_CPUS), "queries": [f"{n} {t}" for n, t in qs],
                          "results": summary, "ratio": round(ratio, 3),
                          "ratio_per_cpu_second": ratio_cpu and round(ratio_cpu, 3)}, indent=2))
    else:
        pinned = f", servers pinned to CPU {min(SERVER_CPUS)}" if SERVER_CPUS else ""
        print(f"load: {loader}, {args.rounds} alternating rounds of {seconds:g}s per server, "
              f"{len(qs)} names, loopback UDP{pinned}; our events {'also to the durable log' if args.log else 'in memory'}")
        print(f"{'server':<10} {'queries/s':>11} {'q/CPU-s':>9} {'lost':>6}  rounds")
        for name, s in summary.items():
            cpu = f"{s['per_cpu_second']:,.0f}" if s["per_cpu_second"] else "-"
            print(f"{name:<10} {s['qps']:>11,.0f} {cpu:>9} {s['lost']:>6}  {', '.join(f'{q:,}' for q in s['rounds'])}")
        print(f"ratio sni-lab/dnsmasq: {ratio:.2f} (median of the paired rounds)")
        if ratio_cpu:
            print(f"ratio per CPU-second: {ratio_cpu:.2f} (all rounds: answers over the server's user+system time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
