"""Our edge next to nginx, same origin, same load, one run: keep-alive req/s and new TLS handshakes/s.

    .venv/bin/python -m bench.edge [--quick] [--duration S] [--json] [--profile [--profile-load L]] [--check]

What runs (everything on loopback, in a temp dir, stopped at exit even on Ctrl-C):
  - `sni-lab origins` (the lab's origins, in their own process) and `sni-lab up --engine
    native --no-origins` (edge, resolver, control plane; model v1, events on) on a copy of
    the packaged lab.toml with every port rewritten to a free one;
  - nginx (Debian's /usr/sbin/nginx) as a TLS reverse proxy to THE SAME lab origin process,
    with a lab leaf for the same name, upstream keep-alive, worker_processes 1 (then auto);
  - wrk, one thread, as the load. wrk sends the URL's host as SNI and resolves it with
    getaddrinfo, so it runs in a private mount namespace whose /etc/hosts maps
    www.victim.example to the listener (root + unshare; the real /etc/hosts is untouched).

The request is the story request of DESIGN.md: https://www.victim.example:PORT/ on the
SaaS v1 listener (saas-v1, 127.0.0.11): the edge picks the www.victim.example certificate
by SNI and, under model v1, routes by listener to the `saas` origin, which answers 200
with the attacker tenant's page. nginx proxies to that same `saas` origin with the same
Host, so both return the same page; the origin measured directly (plain HTTP) is the ceiling.

HTTP/2: h2load (ALPN h2) with 8 connections of 10 concurrent streams each, against our edge
and against nginx with http2 on the same origin (`python -m bench.edge` prints the ratio).

The floor: `bench._floor`, a bare Python TLS server (no lab code, no origin), under the same
new-handshake load: what no Python edge can go below.

New handshakes: wrk with `Connection: close`, one request per connection. wrk keeps its
SSL object across reconnects (SSL_shutdown + SSL_clear, which keeps the session), so it
*does* offer the previous session on every reconnect and a server with tickets on
resumes it. To count full handshakes only, wrk runs with a tiny LD_PRELOAD shim (built
here with cc) that drops the session after SSL_clear. See bench/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import grp
import json
import os
import pwd
import re
import resource
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench._proc import CLK_TCK, stat_fields

NAME = "www.victim.example"  # the name the client believes it talks to (SNI and Host)
LISTENER = "saas-v1"          # the SaaS v1 listener: model v1 routes it to ORIGIN
ORIGIN = "saas"
NGINX_HOST_FALLBACK = "127.0.0.11"
TARGET_KEEPALIVE = 0.5        # the project's targets, ours / nginx (worker_processes 1)
TARGET_HANDSHAKES = 0.9       # handshakes/s: bounded by the client's core, so the figure that counts is
TARGET_HANDSHAKES_PER_CPU = 0.8  # handshakes per CPU-second of the proxy process(es)
TARGET_READY_S = 1.0
TARGET_HTTP2 = 0.5
FLOOR_LABEL = "floor: bare TLS server (bench._floor)"
H2_CONNECTIONS, H2_STREAMS = 8, 10   # h2load -c8 -m10: multiplexed, as a browser is
H2_REQUESTS = 40000                  # per measurement (--quick: 3000), fewer when the warm-up says it would be slow

# LD_PRELOADed into the client for the handshake measurements: no SSL object ever gets a
# session to offer, so every connect is a full handshake whatever the server allows.
# Symbols are looked up at run time: nothing to link.
NORESUME_C = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
typedef int (*clear_fn)(void *);
typedef int (*set_session_fn)(void *, void *);
static set_session_fn real_set_session(void) {
    static set_session_fn f;
    if (!f) f = (set_session_fn)dlsym(RTLD_NEXT, "SSL_set_session");
    return f;
}
/* wrk: SSL_clear keeps the session for the next connect; forget it. */
int SSL_clear(void *s) {
    static clear_fn real_clear;
    if (!real_clear) real_clear = (clear_fn)dlsym(RTLD_NEXT, "SSL_clear");
    int r = real_clear(s);
    if (real_set_session()) real_set_session()(s, 0);
    return r;
}
/* h2load: hands the previous session to each new SSL; hand none. */
int SSL_set_session(void *s, void *session) {
    (void)session;
    return real_set_session() ? real_set_session()(s, 0) : 1;
}
"""


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"bench.edge: {msg}", file=sys.stderr, flush=True)


# ---- processes ------------------------------------------------------------------------

class Procs:
    """Every process the bench starts, each in its own process group, stopped at exit."""

    def __init__(self) -> None:
        self.live: list[subprocess.Popen] = []

    def start(self, cmd: list[str], **kw) -> subprocess.Popen:
        p = subprocess.Popen(cmd, start_new_session=True, **kw)
        self.live.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> None:
        try:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
                try:
                    p.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            # The leader may be gone while its group lives on (nginx workers): kill the rest.
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if p.poll() is None:
                p.wait(5)
        finally:
            if p in self.live:
                self.live.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.live)):
            self.stop(p)


def group_ticks(pgid: int) -> int:
    """CPU ticks (user+system) of every live process in the process group."""
    total = 0
    for entry in os.listdir("/proc"):
        fields = stat_fields(entry) if entry.isdigit() else None
        if fields is not None and int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total


def machine_busy_ticks() -> int:
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts[:8]) - idle


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ---- the world copy, certificates, the lab -------------------------------------------------

def _free_port(host: str, held: list[socket.socket], udp_too: bool) -> int:
    for _ in range(100):
        t = socket.socket()
        t.bind((host, 0))
        port = t.getsockname()[1]
        if udp_too:
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                u.bind((host, port))
            except OSError:
                t.close()
                u.close()
                continue
            held.append(u)
        held.append(t)
        return port
    raise BenchError(f"no free port on {host}")


def write_world(src: Path, dst: Path, keep: str | None = None) -> None:
    """Copy the world file with every `port = N` rewritten to a port free on that table's host
    (except in tables whose header starts with `keep`)."""
    blocks: list[list[str]] = [[]]
    for line in src.read_text().splitlines(keepends=True):
        if re.match(r"\s*\[", line):
            blocks.append([])
        blocks[-1].append(line)
    held: list[socket.socket] = []
    out = []
    try:
        for block in blocks:
            header = block[0].strip() if block else ""
            host = next((m.group(1) for l in block if (m := re.match(r'\s*host\s*=\s*"([^"]+)"', l))), "127.0.0.1")
            for line in block:
                m = re.match(r"(\s*port\s*=\s*)\d+(.*)", line, re.S)
                if m and not (keep and header.startswith(keep)):
                    line = f"{m.group(1)}{_free_port(host, held, udp_too=header == '[resolver]')}{m.group(2)}"
                out.append(line)
    finally:
        for s in held:
            s.close()
    dst.write_text("".join(out))


def sni_lab_cmd() -> list[str]:
    script = Path(sys.executable).parent / "sni-lab"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lab"]


def issue_leaf(tmp: Path, config: Path) -> tuple[str, str, str]:
    certs = tmp / "certs"
    r = subprocess.run(sni_lab_cmd() + ["certs", "issue", NAME, "--certs", str(certs), "--config", str(config), "--json"],
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise BenchError(f"sni-lab certs issue failed: {r.stderr.strip()}")
    leaf = json.loads(r.stdout)
    return leaf["cert"], leaf["key"], str(certs / "ca.pem")


def _read_line(p: subprocess.Popen, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    buf = b""
    fd = p.stdout.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            buf += chunk
            if b"\n" in buf:
                return buf.split(b"\n", 1)[0].decode()
        elif p.poll() is not None:
            return None
    return None


@dataclass
class LabProc:
    proc: subprocess.Popen
    endpoints: dict
    wall_s: float        # process start -> ready line read
    ready_ms: float      # as the lab reports it


def start_origins(procs: Procs, tmp: Path, config: Path, timeout: float = 30.0) -> subprocess.Popen:
    """The lab's origins in their own process, proxied to by our edge and by nginx alike: in
    one process with the edge they would share its core (the GIL), which nginx's do not."""
    err = open(tmp / "origins.stderr", "ab")
    p = procs.start(sni_lab_cmd() + ["origins", "--config", str(config), "--json"], stdout=subprocess.PIPE,
                    stderr=err, stdin=subprocess.DEVNULL)
    err.close()
    if not _read_line(p, timeout):
        raise BenchError("sni-lab origins did not become ready: "
                         + (tmp / "origins.stderr").read_text(errors="replace").strip()[-300:])
    return p


def start_lab(procs: Procs, tmp: Path, config: Path, timeout: float = 30.0, no_origins: bool = False,
              engine: str = "native") -> LabProc:
    err = open(tmp / "lab.stderr", "ab")
    state = tmp / ("state" if engine == "native" else f"state-{engine}")
    cmd = sni_lab_cmd() + ["up", "--engine", engine, "--certs", str(tmp / "certs"), "--state", str(state),
                           "--config", str(config), "--json"] + (["--no-origins"] if no_origins else [])
    t0 = time.perf_counter()
    p = procs.start(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    line = _read_line(p, timeout)
    wall = time.perf_counter() - t0
    err.close()
    if not line:
        procs.stop(p, signal.SIGINT)
        tail = (tmp / "lab.stderr").read_text(errors="replace").strip().splitlines()[-5:]
        raise BenchError("sni-lab up did not become ready: " + (" | ".join(tail) or "no output"))
    data = json.loads(line)
    return LabProc(p, data, wall, float(data.get("ready_ms", 0.0)))


# ---- probes ----------------------------------------------------------------------------------

def https_get(ip: str, port: int, ctx: ssl.SSLContext, session=None, host: str | None = None) -> dict:
    """One GET / over TLS with SNI NAME, verified against the lab CA."""
    with socket.create_connection((ip, port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=NAME, session=session) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: {host or NAME}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except (ssl.SSLError, ConnectionResetError):
                pass  # a close without close_notify after the whole response
            head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
            return {"status": int(head[0].split()[1]), "headers": headers, "version": s.version(),
                    "reused": s.session_reused, "session": s.session}


def check_target(label: str, ip: str, port: int, ca: str) -> dict:
    """The target answers 200 from the lab origin; does it resume a session it issued?"""
    ctx = ssl.create_default_context(cafile=ca)
    first = https_get(ip, port, ctx, host=f"{NAME}:{port}")
    origin = first["headers"].get("x-lab-origin")
    if first["status"] != 200 or origin != ORIGIN:
        raise BenchError(f"{label}: GET https://{NAME}:{port}/ (at {ip}) answered {first['status']} from origin "
                         f"{origin!r}; expected 200 from {ORIGIN!r}")
    resumed = None
    if first["session"] is not None:
        try:
            resumed = https_get(ip, port, ctx, session=first["session"], host=f"{NAME}:{port}")["reused"]
        except (OSError, ssl.SSLError):
            resumed = None
    return {"status": first["status"], "origin": origin, "tls": first["version"], "resumes_sessions": bool(resumed)}


def check_origin(url: str) -> None:
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.sendall(f"GET / HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    if status != 200:
        raise BenchError(f"origin {url}: GET / with Host {NAME} answered {status}")


def check_h2(h2load: str, label: str, url: str, connect: str) -> None:
    """The target speaks HTTP/2 (ALPN h2) and answers 200s."""
    r = subprocess.run(h2load_cmd(h2load, url, connect, 20), capture_output=True, text=True, timeout=30)
    run = Run(label, label)
    parse_h2load(r.stdout, run)
    if "Application protocol: h2" not in r.stdout or run.requests != 20 or run.non_2xx_3xx or run.socket_errors:
        raise BenchError(f"{label}: h2load over HTTP/2 at {connect} did not get 20 answers 2xx over h2:\n"
                         f"{(r.stdout + r.stderr).strip()[-600:]}")


def namespace_works(tmp: Path, hosts: Path, ip: str) -> tuple[bool, str]:
    if os.geteuid() != 0:
        return False, "not root: cannot give wrk its own /etc/hosts in a private mount namespace"
    if not shutil.which("unshare"):
        return False, "unshare not found"
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind "$1" /etc/hosts && exec getent hosts "$2"',
                        "sh", str(hosts), NAME], capture_output=True, text=True, timeout=10)
    if r.returncode != 0 or ip not in r.stdout:
        return False, f"unshare -m + mount --bind failed: {(r.stderr or r.stdout).strip() or r.returncode}"
    return True, ""


def build_noresume(tmp: Path) -> tuple[str | None, str]:
    cc = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if cc is None:
        return None, "no C compiler to build the no-resumption shim"
    src, out = tmp / "noresume.c", tmp / "noresume.so"
    src.write_text(NORESUME_C)
    r = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(src), "-ldl"], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        return None, f"building the no-resumption shim failed: {r.stderr.strip()[:200]}"
    return str(out), ""


# ---- nginx -------------------------------------------------------------------------------------

NGINX_CONF = """\
# written by bench/edge.py; runs in the foreground: nginx -p {dir} -c nginx.conf -g 'daemon off;'
worker_processes {workers};
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    # measure keep-alive, not nginx's periodic reconnects (its default closes after 1000 requests)
    keepalive_requests 1000000;

    upstream lab_origin {{
        server {origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen} ssl;
        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_tickets off;
        ssl_session_cache off;
{no_tickets}        location / {{
            proxy_pass http://lab_origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
        }}
    }}
{extra}}}
"""

# Only for the resumption self-check: tickets on, and a log of $ssl_session_reused.
NGINX_CHECK_SERVER = """
    log_format reuse "$ssl_session_reused";
    server {{
        listen {listen} ssl;
        server_name {name};
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_session_tickets on;
        ssl_session_cache shared:bench:1m;
        access_log {dir}/reuse.log reuse;
        location / {{ return 200 "ok\\n"; }}
    }}
"""


def free_tcp_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_tcp(host: str, port: int, p: subprocess.Popen, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def start_nginx(procs: Procs, nginx: str, base: Path, workers: str, ip: str, origin_url: str, cert: str, key: str,
                check_port: int | None = None, http2: bool = False) -> tuple[subprocess.Popen, int]:
    d = base / f"nginx-{'h2-' if http2 else ''}{workers}"
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    port = free_tcp_port(ip)
    user = ""
    if os.geteuid() == 0:  # as root nginx drops workers to `nobody`, whose group Debian names differently
        user = f"user {pwd.getpwuid(os.geteuid()).pw_name} {grp.getgrgid(os.getegid()).gr_name};\n"
    fmt = dict(dir=d, name=NAME, cert=cert, key=key)
    extra = NGINX_CHECK_SERVER.format(listen=f"{ip}:{check_port}", **fmt) if check_port else ""
    # As our edge: no TLS 1.3 ticket at all (`ssl_session_tickets off` alone still sends two
    # stateful ones, which `ssl_session_cache off` never resumes). ssl_conf_command: nginx >= 1.19.4.
    version = tuple(int(x) for x in nginx_version(nginx).split(".") if x.isdigit())
    no_tickets = "        ssl_conf_command NumTickets 0;\n" if version >= (1, 19, 4) else ""
    # `listen ... http2` is what nginx before 1.25.1 knows (later ones accept it, deprecated).
    listen = f"{ip}:{port}" + (" http2" if http2 else "")
    conf = NGINX_CONF.format(workers=workers, user=user, origin=origin_url.split("//", 1)[1], listen=listen,
                             extra=extra, no_tickets=no_tickets, **fmt)
    (d / "nginx.conf").write_text(conf)
    cmd = [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", "nginx.conf", "-g", "daemon off;"]
    t = subprocess.run(cmd + ["-t", "-q"], capture_output=True, text=True, timeout=20)
    if t.returncode != 0:
        raise BenchError(f"nginx -t failed: {(t.stderr or t.stdout).strip()}")
    p = procs.start(cmd, stdout=subprocess.DEVNULL, stderr=open(d / "stderr.log", "ab"), stdin=subprocess.DEVNULL)
    if not wait_tcp(ip, port, p):
        log_tail = (d / "error.log").read_text(errors="replace").strip().splitlines()[-3:] if (d / "error.log").exists() else []
        procs.stop(p)
        raise BenchError(f"nginx did not start: {' | '.join(log_tail)}")
    return p, port


def start_floor(procs: Procs, tmp: Path, ip: str, cert: str, key: str, timeout: float = 20.0) -> tuple[subprocess.Popen, int]:
    """`bench._floor`, the bare Python TLS server, on the listener's address; returns (process, port)."""
    err = open(tmp / "floor.stderr", "ab")
    p = procs.start([sys.executable, "-m", "bench._floor", ip, cert, key], stdout=subprocess.PIPE, stderr=err,
                    stdin=subprocess.DEVNULL, cwd=Path(__file__).resolve().parent.parent)
    err.close()
    line = _read_line(p, timeout)
    if not line or not line.strip().isdigit():
        procs.stop(p)
        raise BenchError("bench._floor did not start: " + (tmp / "floor.stderr").read_text(errors="replace").strip()[-300:])
    return p, int(line)


# ---- load ---------------------------------------------------------------------------------------

@dataclass
class Run:
    target: str
    label: str
    rps: float | None = None
    requests: int = 0
    seconds: float = 0.0
    latency_ms: float | None = None
    socket_errors: dict = field(default_factory=dict)
    non_2xx_3xx: int = 0
    cpu_server_pct: float | None = None   # % of one core: edge (lab process) or nginx (all workers)
    cpu_lab_pct: float | None = None      # % of one core: the origins' process
    cpu_client_pct: float | None = None   # wrk
    cpu_other_pct: float | None = None    # everything else on the machine (noisy neighbours)
    skipped: str | None = None
    note: str | None = None
    per_cpu_s: float | None = None        # req/s per core of proxy + origin (edge: the lab process)
    per_proxy_cpu_s: float | None = None  # req/s per core of the proxy alone (edge: the lab process; nginx: all its)
    proxy_us: float | None = None         # proxy CPU per request (one request per connection: per handshake)
    client_us: float | None = None        # client CPU per request: what it took to talk to this server
    rounds: list = field(default_factory=list)  # req/s of every round (the row is the median round)
    raw: str = ""


def _to_ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        return float("nan")
    v, unit = float(m.group(1)), m.group(2)
    return {"us": v / 1000, "ms": v, "s": v * 1000, "m": v * 60000}[unit]


def parse_wrk(out: str, run: Run) -> None:
    if m := re.search(r"Requests/sec:\s*([\d.]+)", out):
        run.rps = float(m.group(1))
    if m := re.search(r"(\d+) requests in ([\d.]+)(m?s)", out):
        run.requests = int(m.group(1))
        run.seconds = float(m.group(2)) / (1000 if m.group(3) == "ms" else 1)
    if m := re.search(r"Latency\s+(\S+)", out):
        run.latency_ms = round(_to_ms(m.group(1)), 3)
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        run.socket_errors = {k: int(v) for k, v in zip(("connect", "read", "write", "timeout"), m.groups()) if int(v)}
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        run.non_2xx_3xx = int(m.group(1))


def parse_h2load(out: str, run: Run) -> None:
    if m := re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out):
        run.seconds = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
        run.rps = float(m.group(3))
    if m := re.search(r"requests: \d+ total, \d+ started, (\d+) done, \d+ succeeded, (\d+) failed, (\d+) errored, "
                      r"(\d+) timeout", out):
        run.requests = int(m.group(1))
        run.socket_errors = {k: int(v) for k, v in zip(("failed", "errored", "timeout"), m.groups()[1:]) if int(v)}
    if m := re.search(r"status codes: \d+ 2xx, \d+ 3xx, (\d+) 4xx, (\d+) 5xx", out):
        run.non_2xx_3xx = int(m.group(1)) + int(m.group(2))
    if m := re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out):
        run.latency_ms = round(_to_ms(m.group(1)), 3)


class Load:
    """The load generator: wrk (SNI via a private /etc/hosts), or h2load (--connect-to) as the fallback."""

    def __init__(self, args, procs: Procs, client: str, hosts: Path | None, noresume: str | None) -> None:
        self.args = args
        self.procs = procs
        self.client = client
        self.hosts = hosts
        self.noresume = noresume
        self.wrk = shutil.which("wrk") or "/usr/bin/wrk"
        self.h2load = shutil.which("h2load") or "/usr/bin/h2load"

    def _preload(self, close: bool) -> list[str]:
        return ["env", f"LD_PRELOAD={self.noresume}"] if (close and self.noresume) else []

    def cmd(self, url: str, seconds: int | None, close: bool, host_header: str | None, connect: str | None,
            requests: int | None = None, connections: int | None = None) -> list[str]:
        """`connect`: the address behind a lab name in the URL (None for a URL that names an IP)."""
        conns = connections or self.args.connections
        if self.client == "h2load":
            cmd = self._preload(close) + [self.h2load, "--h1", f"-t{self.args.threads}", f"-c{conns}"]
            cmd += [f"-n{requests}"] if requests else [f"-D{seconds}"]
            if close:
                cmd += ["-H", "connection: close"]
            if host_header:
                cmd += ["-H", f"host: {host_header}"]
            if connect:
                cmd.append(f"--connect-to={connect}")
            return cmd + [url]
        wrk = [self.wrk, f"-t{self.args.threads}", f"-c{conns}", f"-d{seconds}s", "--timeout", "5s"]
        if close:
            wrk += ["-H", "Connection: close"]
        if host_header:
            wrk += ["-H", f"Host: {host_header}"]
        wrk.append(url)
        if not connect:
            return wrk
        return ["unshare", "-m", "sh", "-c", 'h=$1; shift; mount --bind "$h" /etc/hosts && exec "$@"', "sh",
                str(self.hosts)] + self._preload(close) + wrk

    def _once(self, url: str, seconds: int, close: bool, host_header: str | None, connect: str | None,
              warmup: bool = False) -> str:
        """One load run of about `seconds`; h2load cannot reconnect in its timed mode, so for
        one-request-per-connection it gets a request count sized from the last rate seen."""
        if self.client == "h2load" and close:
            if warmup or not getattr(self, "_close_rate", None):
                n = max(20 * self.args.connections, 200)
                t0 = time.monotonic()
                out = self._exec(self.cmd(url, None, close, host_header, connect, requests=n), 60)
                self._close_rate = n / max(time.monotonic() - t0, 0.05)
                if warmup:
                    return out
            n = max(int(self._close_rate * seconds), 20 * self.args.connections)
            return self._exec(self.cmd(url, None, close, host_header, connect, requests=n), seconds * 4 + 30)
        return self._exec(self.cmd(url, seconds, close, host_header, connect), seconds + 15)

    def run(self, run: Run, url: str, *, close: bool = False, host_header: str | None = None, connect: str | None = None,
            server_pgid: int | None = None, lab_pgid: int | None = None, seconds: int | None = None) -> Run:
        seconds = seconds or self.args.duration
        self._close_rate = None
        if self.args.warmup > 0:
            self._once(url, self.args.warmup, close, host_header, connect, warmup=True)
        return self.measured(run, lambda: self._once(url, seconds, close, host_header, connect),
                             parse_h2load if self.client == "h2load" else parse_wrk, server_pgid, lab_pgid)

    def measured(self, run: Run, load, parse, server_pgid: int | None, lab_pgid: int | None) -> Run:
        """`load()` (the client's output), with the CPU of the client, the proxy and the origin over it."""
        s0 = group_ticks(server_pgid) if server_pgid else 0
        l0 = group_ticks(lab_pgid) if lab_pgid else 0
        m0, c0, t0 = machine_busy_ticks(), children_cpu(), time.monotonic()
        out = load()
        wall = time.monotonic() - t0
        s1 = group_ticks(server_pgid) if server_pgid else 0
        l1 = group_ticks(lab_pgid) if lab_pgid else 0
        m1, c1 = machine_busy_ticks(), children_cpu()
        run.raw = out
        parse(out, run)
        if run.rps is None:
            raise BenchError(f"{run.label}: could not read the load generator's output:\n{out}")
        server = (s1 - s0) / CLK_TCK
        lab = (l1 - l0) / CLK_TCK
        client = c1 - c0
        ours = client + lab + (server if server_pgid != lab_pgid else 0)
        run.cpu_server_pct = round(100 * server / wall, 1) if server_pgid else None
        run.cpu_lab_pct = round(100 * lab / wall, 1) if lab_pgid else None
        run.cpu_client_pct = round(100 * client / wall, 1)
        run.cpu_other_pct = round(max(0.0, 100 * ((m1 - m0) / CLK_TCK - ours) / wall), 1)
        served = lab + (server if server_pgid and server_pgid != lab_pgid else 0)
        if served > 0 and run.requests:
            run.per_cpu_s = round(run.requests / served)
        if run.requests:
            run.client_us = round(1e6 * client / run.requests)
            if server_pgid and server_pgid != lab_pgid and server > 0:
                run.per_proxy_cpu_s = round(run.requests / server)
                run.proxy_us = round(1e6 * server / run.requests)
        return run

    def _exec(self, cmd: list[str], timeout: float) -> str:
        p = self.procs.start(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.procs.stop(p, signal.SIGKILL)
            raise BenchError(f"{self.client} did not finish: {' '.join(cmd)}") from None
        self.procs.stop(p)
        if p.returncode != 0:
            raise BenchError(f"{self.client} failed ({p.returncode}): {out.decode(errors='replace').strip()[-400:]}")
        return out.decode(errors="replace")


def resumption_check(load: Load, ip: str, port: int, tmp: Path) -> dict:
    """Does the client resume sessions on reconnect, and does the shim stop it? Counted by nginx itself."""
    logf = tmp / "nginx-1" / "reuse.log"
    url = f"https://{NAME}:{port}/"
    out = {}
    saved = load.args.connections
    load.args.connections = 2
    try:
        for label, shim in (("plain", None), ("shim", load.noresume)):
            if label == "shim" and not shim:
                continue
            if logf.exists():
                logf.write_text("")  # nginx appends: the count starts from zero
            keep, load.noresume = load.noresume, shim
            try:
                load._close_rate = None
                load._once(url, 1, True, None, f"{ip}:{port}")
            finally:
                load.noresume = keep
            time.sleep(0.2)  # nginx writes the log line after the response
            marks = logf.read_text().split() if logf.exists() else []
            out[label] = {"handshakes": len(marks), "resumed": marks.count("r")}
    finally:
        load.args.connections = saved
    return out


# ---- HTTP/2 ---------------------------------------------------------------------------------------

def h2load_cmd(h2load: str, url: str, connect: str, requests: int) -> list[str]:
    """h2load over TLS with ALPN h2: the URL's host is the SNI and :authority, `connect` the address."""
    return [h2load, f"-n{requests}", f"-c{H2_CONNECTIONS}", f"-m{H2_STREAMS}", "-t1", f"--connect-to={connect}", url]


def run_h2(load: Load, run: Run, url: str, connect: str, server_pgid: int, lab_pgid: int) -> Run:
    """One HTTP/2 measurement of `args.h2_requests` requests; a warm-up first, which also bounds the
    run: fewer requests when that many would take longer than `args.h2_max_s` at the warm-up's rate."""
    args = load.args
    warm = max(args.h2_requests // 20, 300)
    t0 = time.monotonic()
    load._exec(h2load_cmd(load.h2load, url, connect, warm), 60)
    rate = warm / max(time.monotonic() - t0, 0.05)
    n = min(args.h2_requests, max(int(rate * args.h2_max_s), 1000))
    if n < args.h2_requests:
        run.note = (f"{n} requests, not {args.h2_requests}: the warm-up's {rate:.0f} req/s would take over "
                    f"{args.h2_max_s} s")
    return load.measured(run, lambda: load._exec(h2load_cmd(load.h2load, url, connect, n), n / rate * 3 + 30),
                         parse_h2load, server_pgid, lab_pgid)


# ---- profile --------------------------------------------------------------------------------------

def profile_edge(load: Load, procs: Procs, lab: LabProc, url: str, ip: str, port: int, tmp: Path,
                 out_path: str | None, close: bool = False, http2: bool = False) -> dict:
    """py-spy on the lab process under keep-alive load, new handshakes (`close`) or HTTP/2 (`http2`)."""
    pyspy = Path(sys.executable).parent / "py-spy"
    pyspy = str(pyspy) if pyspy.exists() else shutil.which("py-spy")
    if not pyspy:
        return {"skipped": "py-spy not installed (.venv/bin/pip install py-spy)"}
    raw = Path(out_path) if out_path else tmp / f"profile{'-handshakes' if close else ''}.txt"
    seconds = load.args.duration
    cmd = [pyspy, "record", "--pid", str(lab.proc.pid), "--duration", str(seconds), "--rate", "200",
           "--format", "raw", "--output", str(raw)] + (["--native"] if load.args.profile_native else [])
    connect = f"{ip}:{port}"
    load._close_rate = None
    if http2:  # h2load has no timed mode worth using here: runs of a size that lasts about `seconds`, until it ends
        n = max(load.args.h2_requests // 20, 300)
        t0 = time.monotonic()
        load._exec(h2load_cmd(load.h2load, url, connect, n), 60)
        n = max(int(n / max(time.monotonic() - t0, 0.05) * seconds / 4), 500)
    elif load.args.warmup > 0 or close:  # h2load sizes a run of new connections from its warm-up
        load._once(url, max(load.args.warmup, 1), close, None, connect, warmup=True)
    spy = procs.start(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / "py-spy.log", "ab"), stdin=subprocess.DEVNULL)
    time.sleep(0.3)
    if http2:
        out, until = "", time.monotonic() + seconds
        while time.monotonic() < until and spy.poll() is None:
            out = load._exec(h2load_cmd(load.h2load, url, connect, n), seconds + 30)
    else:
        out = load._once(url, seconds, close, None, connect)
    try:
        spy.wait(seconds + 20)
    except subprocess.TimeoutExpired:
        pass
    procs.stop(spy, signal.SIGINT)
    if not raw.exists():
        return {"skipped": "py-spy wrote nothing: " + (tmp / "py-spy.log").read_text(errors="replace").strip()[-300:]}
    r = Run("edge", "profiled")
    (parse_h2load if load.client == "h2load" or http2 else parse_wrk)(out, r)
    return {"load": "HTTP/2" if http2 else "new handshakes" if close else "keep-alive",
            **summarize_profile(raw, r.rps, str(raw) if out_path else None)}


def summarize_profile(raw: Path, rps: float | None, kept: str | None, top: int = 10) -> dict:
    """Hot spots from py-spy's collapsed stacks (frames carry the line being run).

    The event-loop thread (stacks from `<module>`) is what serves requests; other threads
    (the event sink's worker, ...) are summed apart. A thread waiting for the GIL counts as
    busy for py-spy, so other threads' share is an upper bound of their CPU.
    """
    main_self: dict[str, int] = {}
    main_incl: dict[str, int] = {}
    other_self: dict[str, int] = {}
    total = main_total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        if not frames[0].startswith("<module>"):
            other_self[frames[-1]] = other_self.get(frames[-1], 0) + n
            continue
        main_total += n
        main_self[frames[-1]] = main_self.get(frames[-1], 0) + n
        for f in {re.sub(r":\d+\)$", ")", f) for f in frames}:  # inclusive: by function, any line
            main_incl[f] = main_incl.get(f, 0) + n
    if not total:
        return {"skipped": "no samples"}
    pct = lambda n: round(100 * n / total, 1)  # noqa: E731
    by_self = sorted(main_self.items(), key=lambda kv: -kv[1])[:top]
    # skip the frames every loop sample goes through (interpreter and loop entry points)
    by_incl = sorted(((f, n) for f, n in main_incl.items() if n < 0.97 * main_total), key=lambda kv: -kv[1])[:top]
    return {"samples": total, "rps_while_profiled": rps, "raw": kept,
            "loop_thread_pct": pct(main_total), "other_threads_pct": pct(total - main_total),
            "self": [{"function": f, "pct": pct(n)} for f, n in by_self],
            "inclusive": [{"function": f, "pct": pct(n)} for f, n in by_incl],
            "other_threads": [{"function": f, "pct": pct(n)}
                              for f, n in sorted(other_self.items(), key=lambda kv: -kv[1])[:5]]}


def _short(frame: str) -> str:
    """`fn (/path/site-packages/aiohttp/web_protocol.py:123)` -> `fn (aiohttp/web_protocol.py:123)`."""
    m = re.match(r"(.*) \((.*)\)$", frame)
    if not m:
        return frame
    fn, where = m.groups()
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in where:
            where = where.split(marker, 1)[1]
            if marker == "/lib/python3":
                where = where.split("/", 1)[1] if "/" in where else where
    return f"{fn} ({where})"


# ---- report -------------------------------------------------------------------------------------

def ratio(a: Run | None, b: Run | None) -> float | None:
    if not a or not b or not a.rps or not b.rps:
        return None
    return round(a.rps / b.rps, 3)


def fmt_row(r: Run, base: Run | None, target: float | None) -> str:
    if r.skipped:
        return f"  {r.label:<44} {'skipped':>9}  {r.skipped}"
    q = ratio(r, base) if base is not None and r is not base and r.target.startswith("edge") else None
    verdict = ""
    if q is not None and target is not None:
        verdict = f"  (target >= {target}x: {'ok' if q >= target else 'MISSED'})"
    rq = f"{q:.2f}x" if q is not None else ""
    cpu = []
    if r.cpu_server_pct is not None:
        cpu.append(f"{'edge' if r.target.startswith('edge') else 'nginx'} {r.cpu_server_pct:.0f}%")
    if r.cpu_lab_pct is not None:
        cpu.append(f"origins {r.cpu_lab_pct:.0f}%")
    if r.cpu_client_pct is not None:
        cpu.append(f"client {r.cpu_client_pct:.0f}%")
    if r.cpu_other_pct is not None and r.cpu_other_pct >= 10:
        cpu.append(f"OTHER {r.cpu_other_pct:.0f}%")
    lat = f"{r.latency_ms:.1f}ms" if r.latency_ms is not None else ""
    eff = f"{r.per_cpu_s:.0f}" if r.per_cpu_s else ""
    line = f"  {r.label:<44} {r.rps:>9.0f} {rq:>7} {lat:>8} {eff:>8}  cpu: {', '.join(cpu)}{verdict}"
    return line + _row_tail(r, "rounds")


def _row_tail(r: Run, rounds: str) -> str:
    """What a row says after its figures: errors, each round's figure, a note."""
    errs = ([f"non-2xx/3xx {r.non_2xx_3xx}"] if r.non_2xx_3xx else []) + \
        (["socket errors " + ", ".join(f"{k} {v}" for k, v in r.socket_errors.items())] if r.socket_errors else [])
    tail = "  ERRORS: " + "; ".join(errs) if errs else ""
    if len(r.rounds) > 1:
        tail += f"  {rounds}: " + "/".join(f"{x:.0f}" for x in r.rounds)
    if r.note:
        tail += f"  [{r.note}]"
    return tail


def print_handshakes(res: dict) -> None:
    """New handshakes, per CPU-second first: the client saturates its core, so handshakes/s flatter the slower server."""
    runs = [Run(**r) for r in res["handshakes"]]
    base = next((r for r in runs if r.target == "nginx-1" and not r.skipped), None)
    q, q_all = res.get("handshakes_per_proxy_cpu_ratio"), res.get("handshakes_per_cpu_ratio")
    head = "\nnew TLS handshakes per CPU-second (Connection: close, no resumption, one request each)"
    if q is not None:
        ok = "ok" if q >= TARGET_HANDSHAKES_PER_CPU else "MISSED"
        head += (f": ours / nginx worker_processes 1 = {q:.2f}x of the proxy's CPU (target >= "
                 f"{TARGET_HANDSHAKES_PER_CPU}x: {ok})" + (f", {q_all:.2f}x of proxy + origin" if q_all else ""))
    print(head if base else head + "  (no nginx baseline: no ratio)")
    print(f"  {'target':<44} {'hs/cpu-s':>8} {'+origin':>8} {'proxy':>7} {'client':>7} {'hs/s':>7} {'ours/ng1':>8}"
          "  cpu (% of one core)")
    print(f"  {'':<44} {'(proxy)':>8} {'':>8} {'us/hs':>7} {'us/hs':>7}")
    for r in runs:
        if r.skipped:
            print(f"  {r.label:<44} {'skipped':>8}  {r.skipped}")
            continue
        rq = ratio(r, base) if base is not None and r is not base and not r.target.startswith("nginx") else None
        cpu = [f"{r.target.split('-')[0]} {r.cpu_server_pct:.0f}%",
               f"origins {r.cpu_lab_pct:.0f}%", f"client {r.cpu_client_pct:.0f}%"]
        if r.cpu_other_pct is not None and r.cpu_other_pct >= 10:
            cpu.append(f"OTHER {r.cpu_other_pct:.0f}%")
        num = lambda v, w: f"{v:>{w}.0f}" if v else f"{'':>{w}}"  # noqa: E731
        line = (f"  {r.label:<44} {num(r.per_proxy_cpu_s, 8)} {num(r.per_cpu_s, 8)} {num(r.proxy_us, 7)} "
                f"{num(r.client_us, 7)} {r.rps:>7.0f} {f'{rq:.2f}x' if rq is not None else '':>8}  cpu: {', '.join(cpu)}")
        print(line + _row_tail(r, "rounds (hs/s)"))
    if res.get("handshakes_ratio") is not None:
        print(f"  handshakes/s, ours / nginx worker_processes 1: {res['handshakes_ratio']:.2f}x (bounded by the client's "
              f"core; target >= {TARGET_HANDSHAKES}x)")
    if res.get("handshakes_ratio_auto") is not None:
        print(f"  ours / nginx worker_processes auto: {res['handshakes_ratio_auto']:.2f}x")
    floor = next((r for r in runs if r.target == "floor" and not r.skipped), None)
    if floor is not None and floor.proxy_us:
        fq, above = res.get("handshakes_floor_per_proxy_cpu_ratio"), res.get("handshakes_above_floor_us")
        print(f"  the floor (a bare Python TLS server: uvloop, stdlib ssl, no lab code, no origin): {floor.proxy_us} us "
              f"per handshake" + (f", {fq:.2f}x nginx per CPU-second" if fq is not None else "")
              + (f"; our edge spends {above} us per handshake above it" if above is not None else ""))


def print_report(res: dict) -> None:
    s = res["settings"]
    print(f"sni-lab edge bench: {s['cpus']} CPUs, {s.get('client', 'wrk')} -t{s['threads']} -c{s['connections']}, "
          f"{s['duration_s']} s per "
          f"measurement after {s['warmup_s']} s warm-up" + (f", median of {s['rounds']} rounds" if s['rounds'] > 1 else "")
          + f"; target {s['target']}")
    print_handshakes(res)
    for key, title, target in (("keepalive", "keep-alive requests/s, HTTPS (HTTP/1.1)", TARGET_KEEPALIVE),
                               ("http2", f"HTTP/2 requests/s (h2load: {H2_CONNECTIONS} connections x {H2_STREAMS} "
                                         f"streams)", TARGET_HTTP2)):
        if not res.get(key):
            continue
        runs = [Run(**{k: v for k, v in r.items()}) for r in res[key]]
        base = next((r for r in runs if r.target == "nginx-1" and not r.skipped), None)
        print(f"\n{title}" + ("" if base else "  (no nginx baseline: no ratio)"))
        print(f"  {'target':<44} {'req/s':>9} {'ours/ng1':>7} {'latency':>8} {'req/cpu-s':>8}  cpu (% of one core)")
        for r in runs:
            print(fmt_row(r, base, target))
        if res.get(f"{key}_per_cpu_ratio") is not None:
            print(f"  ours / nginx worker_processes 1 in requests per CPU-second of proxy + origin: "
                  f"{res[f'{key}_per_cpu_ratio']:.2f}x")
        if res.get(f"{key}_ratio_auto") is not None:
            print(f"  ours / nginx worker_processes auto: {res[f'{key}_ratio_auto']:.2f}x")
    rd = res.get("ready")
    if rd:
        ok = "ok" if rd["median_s"] <= TARGET_READY_S else "MISSED"
        print(f"\nsni-lab up, process start -> ready line: median {rd['median_s'] * 1000:.0f} ms of "
              f"{', '.join(f'{x * 1000:.0f}' for x in rd['runs_s'])} ms (lab's own ready_ms median "
              f"{rd['ready_ms_median']:.0f}); target <= {TARGET_READY_S:.0f} s: {ok}; first start with leaf issuance "
              f"{rd['cold_s'] * 1000:.0f} ms")
    rs = res.get("resumption")
    if rs:
        print("\nsession resumption:")
        for k, v in rs.items():
            print(f"  {k}: {v}")
    for prof in (res.get("profile_handshakes"), res.get("profile"), res.get("profile_http2")):
        if not prof:
            continue
        if prof.get("skipped"):
            print(f"\nprofile: skipped: {prof['skipped']}")
        else:
            print(f"\nprofile of the lab process under {prof.get('load', 'keep-alive')} load (py-spy, 200 Hz, "
                  f"{prof['samples']} busy samples, {prof['rps_while_profiled'] or 0:.0f} req/s while sampled); "
                  "% of all busy samples")
            print(f"  event-loop thread {prof['loop_thread_pct']:.0f}%, other threads {prof['other_threads_pct']:.0f}% "
                  f"(includes waiting for the GIL)")
            print("  event-loop thread, self time by line (where the CPU is; C calls count in their Python caller):")
            for i, e in enumerate(prof["self"], 1):
                print(f"   {i:>2}. {e['pct']:5.1f}%  {e['function']}")
            print("  event-loop thread, inclusive time by function:")
            for i, e in enumerate(prof["inclusive"], 1):
                print(f"   {i:>2}. {e['pct']:5.1f}%  {e['function']}")
            print("  other threads, self time:")
            for e in prof["other_threads"]:
                print(f"       {e['pct']:5.1f}%  {e['function']}")
            if prof.get("raw"):
                print(f"  collapsed stacks kept in {prof['raw']} (flamegraph.pl / speedscope)")
    for n in res["notes"]:
        print(f"note: {n}")
    print(f"\nwhole run: {res['elapsed_s']:.0f} s")


# ---- main -------------------------------------------------------------------------------------------

def _sigterm(signum, frame):
    raise KeyboardInterrupt


def bench(args) -> dict:
    started = time.monotonic()
    from lab.topology import default_path

    notes: list[str] = []
    res: dict = {"bench": "edge", "settings": {
        "cpus": os.cpu_count(), "threads": args.threads, "connections": args.connections, "duration_s": args.duration,
        "rounds": args.rounds, "warmup_s": args.warmup, "load_avg_at_start": os.getloadavg()[0],
        "target": f"https://{NAME}:PORT/ on listener {LISTENER} (model v1 -> origin {ORIGIN})"},
        "keepalive": [], "handshakes": [], "http2": [], "notes": notes}
    m0, t0 = machine_busy_ticks(), time.monotonic()
    time.sleep(0.5)
    busy = 100 * (machine_busy_ticks() - m0) / CLK_TCK / (time.monotonic() - t0)
    res["settings"]["cpu_busy_before_pct"] = round(busy, 1)
    if busy > 10:
        notes.append(f"machine not idle at start ({busy:.0f}% of one core busy before the bench started anything): "
                     f"other processes share the {os.cpu_count()} CPUs; see the OTHER cpu column")
    wrk = shutil.which("wrk") or ("/usr/bin/wrk" if os.path.exists("/usr/bin/wrk") else None)
    h2load = shutil.which("h2load")
    if not wrk and not h2load or (args.client == "wrk" and not wrk) or (args.client == "h2load" and not h2load):
        missing = {"wrk": "wrk (apt-get install wrk)", "h2load": "h2load (apt-get install nghttp2-client)"}
        what = missing[args.client] if args.client != "auto" else f"{missing['wrk']} nor {missing['h2load']}"
        notes.append(f"no load generator: {what} not installed; nothing measured")
        res["skipped"] = "no load generator"
        res["elapsed_s"] = round(time.monotonic() - started, 1)
        return res
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    procs = Procs()
    tmp = Path(tempfile.mkdtemp(prefix="sni-lab-bench-edge-"))
    # Ctrl-C, kill and a closed terminal all end in the `finally` below. SIGINT explicitly
    # too: a shell's background job starts with it ignored.
    old = {sig: signal.signal(sig, _sigterm) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        config = tmp / "lab.toml"
        write_world(default_path(), config)
        cert, key, ca = issue_leaf(tmp, config)
        log(f"temp dir {tmp}; starting sni-lab origins, then sni-lab up --no-origins")
        origins = start_origins(procs, tmp, config)
        lab = start_lab(procs, tmp, config, no_origins=True)
        cold_s = lab.wall_s
        ep = lab.endpoints
        listener = next(l for l in ep["edge"] if l["name"] == LISTENER)
        ip, edge_port = listener["host"], listener["port"]
        origin_url = ep["origins"][ORIGIN]
        state_ep = json.loads((tmp / "state" / "endpoints.json").read_text())
        if state_ep["edge"] != ep["edge"]:
            notes.append("endpoints.json differs from the --json ready line")
        check_origin(origin_url)
        edge_check = check_target("our edge", ip, edge_port, ca)
        res["targets"] = {"edge": {"url": f"https://{NAME}:{edge_port}/", "address": ip, **edge_check},
                          "origin": {"url": origin_url, "host_header": NAME}}
        hosts = tmp / "hosts"
        hosts.write_text(f"127.0.0.1 localhost\n{ip} {NAME}\n")
        # The client: wrk needs its own /etc/hosts (SNI = the URL's host, resolved by getaddrinfo;
        # the lab names are not in the real one, which this bench never edits); h2load can
        # connect elsewhere than the URL's host (--connect-to), so it is the fallback.
        ns_ok, why = namespace_works(tmp, hosts, ip) if wrk and args.client != "h2load" else (False, "")
        if args.client == "h2load" or (not ns_ok and h2load and args.client == "auto"):
            client, tls_ok = "h2load", True
            if args.client == "auto":
                notes.append(f"load generator: h2load --h1 --connect-to, because wrk "
                             f"{'cannot be used: ' + why if wrk else 'is not installed'}")
        else:
            client, tls_ok = "wrk", ns_ok
            if not ns_ok:
                notes.append(f"TLS measurements skipped: {why}; wrk sends the URL's host as SNI and resolves it with "
                             f"getaddrinfo, the lab names are not in /etc/hosts (never edited here), and h2load "
                             f"(apt-get install nghttp2-client) is not installed")
        res["settings"]["client"] = client
        noresume, why_shim = build_noresume(tmp) if tls_ok else (None, "")
        if why_shim:
            notes.append(f"{why_shim}: {client} resumes TLS sessions on reconnect, so a server that resumes sessions "
                         f"gets resumptions in its handshake figure (flagged; then no ratio)")
        why = why or "no load generator for TLS with SNI"
        ns_ok = tls_ok
        load = Load(args, procs, client, hosts, noresume)
        lab_pg = origins.pid  # the origin process, behind both proxies
        edge_url = f"https://{NAME}:{edge_port}/"

        # The servers: our edge (running), nginx with worker_processes 1 and auto, both up
        # for the whole run (idle when not measured), on the listener's address.
        edge_label = "our edge (native, v1, events on)"
        rows: dict[tuple[str, str], Run] = {("keepalive", "origin"): Run("origin", f"origin direct, plain HTTP ({ORIGIN})"),
                                            ("keepalive", "edge"): Run("edge", edge_label),
                                            ("handshakes", "edge"): Run("edge", edge_label)}
        urls = {"edge": edge_url}
        ports = {"edge": edge_port}
        pgids = {"edge": lab.proc.pid}
        if not ns_ok:
            rows["keepalive", "edge"].skipped = rows["handshakes", "edge"].skipped = why
        mitm_label = "our edge (mitmproxy, v1, events on)"
        rows["keepalive", "edge-mitm"], rows["handshakes", "edge-mitm"] = Run("edge-mitm", mitm_label), Run("edge-mitm", mitm_label)
        skip = None if ns_ok else why
        if not skip and args.no_mitmproxy:
            skip = "--no-mitmproxy"
        if not skip and importlib.util.find_spec("mitmproxy") is None:
            skip = "mitmproxy not installed (pip install 'sni-lab[mitmproxy]')"
        if skip:
            rows["keepalive", "edge-mitm"].skipped = rows["handshakes", "edge-mitm"].skipped = skip
        else:
            # Same origins process, its own edge ports: both engines are up side by side.
            mitm_config = tmp / "lab-mitmproxy.toml"
            write_world(config, mitm_config, keep="[origin.")
            mitm = start_lab(procs, tmp, mitm_config, no_origins=True, engine="mitmproxy")
            mport = next(l for l in mitm.endpoints["edge"] if l["name"] == LISTENER)["port"]
            urls["edge-mitm"], ports["edge-mitm"], pgids["edge-mitm"] = f"https://{NAME}:{mport}/", mport, mitm.proc.pid
            res["targets"]["edge-mitm"] = {"url": urls["edge-mitm"], "address": ip,
                                           **check_target("our edge (mitmproxy)", ip, mport, ca)}
        check_port = None
        for workers in (["1"] if args.quick or args.no_auto else ["1", "auto"]):
            tgt = f"nginx-{workers}"
            label = f"nginx {nginx_version(nginx) if nginx else ''} worker_processes {workers}".replace("  ", " ")
            if workers == "auto":
                label += f" ({os.cpu_count()})"
            rows["keepalive", tgt], rows["handshakes", tgt] = Run(tgt, label), Run(tgt, label)
            skip = None if nginx else "nginx not installed (apt-get install nginx-light)"
            skip = skip or (None if ns_ok else why)
            if skip:
                rows["keepalive", tgt].skipped = rows["handshakes", tgt].skipped = skip
                continue
            cport = free_tcp_port(ip) if (workers == "1" and not args.quick) else None
            p, port = start_nginx(procs, nginx, tmp, workers, ip, origin_url, cert, key, cport)
            check_port = check_port or cport
            urls[tgt], ports[tgt], pgids[tgt] = f"https://{NAME}:{port}/", port, p.pid
            res["targets"][tgt] = {"url": urls[tgt], "address": ip, "workers": workers,
                                   **check_target(f"nginx {workers}", ip, port, ca)}

        # The floor: a bare Python TLS server under the same handshake load (handshakes only).
        rows["handshakes", "floor"] = Run("floor", FLOOR_LABEL)
        if ns_ok:
            p, port = start_floor(procs, tmp, ip, cert, key)
            urls["floor"], ports["floor"], pgids["floor"] = f"https://{NAME}:{port}/", port, p.pid
        else:
            rows["handshakes", "floor"].skipped = why

        # HTTP/2: h2load connects where it is told (--connect-to), no hosts file needed; nginx with
        # http2 is a server of its own (worker_processes 1), on the same origin with the same leaf.
        h2: dict[str, tuple[int, int]] = {}  # target -> (port, process group)
        h2load = shutil.which("h2load")
        for tgt, label in (("edge", edge_label), ("nginx-1", f"nginx {nginx_version(nginx) if nginx else ''} "
                                                             f"worker_processes 1, http2".replace("  ", " ")),
                           ("edge-mitm", mitm_label)):
            rows["http2", tgt] = Run(tgt, label)
            if not h2load:
                rows["http2", tgt].skipped = "h2load not installed (apt-get install nghttp2-client)"
            elif tgt == "nginx-1" and not nginx:
                rows["http2", tgt].skipped = "nginx not installed (apt-get install nginx-light)"
            elif tgt == "edge-mitm" and tgt not in ports:
                rows["http2", tgt].skipped = rows["keepalive", tgt].skipped
            elif tgt == "nginx-1":
                p, port = start_nginx(procs, nginx, tmp, "1", ip, origin_url, cert, key, http2=True)
                h2[tgt], pgids["nginx-h2"] = (port, p.pid), p.pid
            else:
                h2[tgt] = (ports[tgt], pgids[tgt])
        for tgt, (port, _) in h2.items():
            check_h2(h2load, rows["http2", tgt].label, f"https://{NAME}:{port}/", f"{ip}:{port}")
        res["settings"]["http2"] = (f"h2load -n{args.h2_requests} -c{H2_CONNECTIONS} -m{H2_STREAMS} -t1 "
                                    f"(at most {args.h2_max_s} s per measurement)")

        # Rounds: every measurement once per round, the order reversed every other round so
        # slow drift and a noisy neighbour hit every target alike; each row reports its median round.
        plan = [(kind, t) for (kind, t), r in rows.items() if not r.skipped and kind == "keepalive"] + \
               [(kind, t) for (kind, t), r in rows.items() if not r.skipped and kind == "handshakes"] + \
               [(kind, t) for (kind, t), r in rows.items() if not r.skipped and kind == "http2"]
        per_round: dict[tuple[str, str], list[Run]] = {k: [] for k in plan}
        for rnd in range(args.rounds):
            for kind, t in (plan if rnd % 2 == 0 else plan[::-1]):
                row = rows[kind, t]
                log(f"{'round %d: ' % (rnd + 1) if args.rounds > 1 else ''}{kind}: {row.label}")
                r = Run(row.target, row.label)
                if kind == "http2":
                    port, pgid = h2[t]
                    run_h2(load, r, f"https://{NAME}:{port}/", f"{ip}:{port}", pgid, lab_pg)
                elif t == "origin" and client == "h2load":  # h2load's -H host would add a second Host
                    ohost, oport = origin_url.split("//", 1)[1].rsplit(":", 1)
                    load.run(r, f"http://{NAME}:{oport}/", connect=f"{ohost}:{oport}", lab_pgid=lab_pg)
                elif t == "origin":
                    load.run(r, origin_url + "/", host_header=NAME, lab_pgid=lab_pg)
                else:
                    load.run(r, urls[t], close=kind == "handshakes", connect=f"{ip}:{ports[t]}",
                             server_pgid=pgids[t], lab_pgid=lab_pg)
                per_round[kind, t].append(r)
        for k, runs in per_round.items():
            med = sorted(runs, key=lambda r: r.rps)[(len(runs) - 1) // 2]
            med.rounds = [r.rps for r in runs]
            rows[k] = med
        if check_port:
            res["resumption_check"] = resumption_check(load, ip, check_port, tmp)
        for p in [p for p in procs.live if p.pid in pgids.values() and p.pid not in (lab_pg, lab.proc.pid)]:
            procs.stop(p)  # nginx
        res["keepalive"] = [r for (kind, _), r in rows.items() if kind == "keepalive"]
        res["handshakes"] = [r for (kind, _), r in rows.items() if kind == "handshakes"]
        res["http2"] = [r for (kind, _), r in rows.items() if kind == "http2"]
        # Without the shim, only a server that resumes sessions can have been offered one it accepts.
        resumed_rows = set() if noresume else {t for t, v in res["targets"].items() if v.get("resumes_sessions")}
        for r in res["handshakes"]:
            if r.target in resumed_rows:
                r.note = "server resumes sessions and the client offers them: includes resumptions"

        # 4. profile (optional)
        if args.profile and ns_ok:
            loads = ["handshakes", "keepalive"] if args.profile_load == "both" else [args.profile_load]
            for kind in loads:
                if kind == "http2" and not h2load:
                    res["profile_http2"] = {"skipped": "h2load not installed (apt-get install nghttp2-client)"}
                    continue
                log(f"profile: our edge under {kind} load (py-spy)")
                out_path = args.profile_out
                if out_path and len(loads) > 1 and kind == "handshakes":
                    out_path = str(Path(out_path).with_name(f"{Path(out_path).stem}-handshakes{Path(out_path).suffix}"))
                res[{"handshakes": "profile_handshakes", "http2": "profile_http2"}.get(kind, "profile")] = profile_edge(
                    load, procs, lab, edge_url, ip, edge_port, tmp, out_path, close=kind == "handshakes",
                    http2=kind == "http2")

        procs.stop(lab.proc, signal.SIGINT)
        procs.stop(origins)  # the timed starts below run the whole world, origins included

        # 5. ready time: 3 starts on the same world, leaves already issued
        log("timing sni-lab up")
        walls, own = [], []
        for _ in range(args.ready_runs):
            lp = start_lab(procs, tmp, config)
            walls.append(lp.wall_s)
            own.append(lp.ready_ms)
            procs.stop(lp.proc, signal.SIGINT)
        if walls:
            res["ready"] = {"runs_s": [round(w, 3) for w in walls], "median_s": round(statistics.median(walls), 3),
                            "ready_ms": own, "ready_ms_median": statistics.median(own), "cold_s": round(cold_s, 3),
                            "target_s": TARGET_READY_S}

        # ratios and session facts
        for key in ("keepalive", "handshakes", "http2"):
            runs = {r.target: r for r in res[key]}
            res[f"{key}_ratio"] = ratio(runs.get("edge"), runs.get("nginx-1"))
            res[f"{key}_ratio_auto"] = ratio(runs.get("edge"), runs.get("nginx-auto"))
            res[f"{key}_ratio_mitmproxy"] = ratio(runs.get("edge-mitm"), runs.get("nginx-1"))
            e, n = runs.get("edge"), runs.get("nginx-1")
            res[f"{key}_per_cpu_ratio"] = round(e.per_cpu_s / n.per_cpu_s, 3) if e and n and e.per_cpu_s and n.per_cpu_s else None
            res[f"{key}_per_proxy_cpu_ratio"] = (round(e.per_proxy_cpu_s / n.per_proxy_cpu_s, 3)
                                                 if e and n and e.per_proxy_cpu_s and n.per_proxy_cpu_s else None)
        runs = {r.target: r for r in res["handshakes"]}
        floor, edge, ng = runs.get("floor"), runs.get("edge"), runs.get("nginx-1")
        res["handshakes_floor_per_proxy_cpu_ratio"] = (round(floor.per_proxy_cpu_s / ng.per_proxy_cpu_s, 3)
                                                      if floor and ng and floor.per_proxy_cpu_s and ng.per_proxy_cpu_s
                                                      else None)
        res["handshakes_above_floor_us"] = (edge.proxy_us - floor.proxy_us
                                            if floor and edge and floor.proxy_us and edge.proxy_us else None)
        if resumed_rows & {"edge", "nginx-1"}:
            res["handshakes_ratio"] = res["handshakes_per_cpu_ratio"] = res["handshakes_per_proxy_cpu_ratio"] = None
        if resumed_rows & {"edge", "nginx-auto"}:
            res["handshakes_ratio_auto"] = None
        res["resumption"] = {
            "our edge resumes a session it issued": edge_check["resumes_sessions"],
            **{f"{k} resumes a session it issued": v["resumes_sessions"] for k, v in res["targets"].items()
               if k.startswith("nginx")},
            f"{client} offers the previous session on reconnect (nginx check server, tickets on)":
                res.get("resumption_check", {}).get("plain", "not checked"),
            "with the no-resumption shim": res.get("resumption_check", {}).get("shim", "not checked"),
        }
        if edge_check["resumes_sessions"]:
            notes.append("our edge issues TLS session tickets and resumes them (lab/edge/certstore.py server_context "
                         "leaves tickets on; ask for ctx.options |= ssl.OP_NO_TICKET and ctx.num_tickets = 0). "
                         "The handshake figures use full handshakes anyway (no-resumption shim), but our edge "
                         "still pays for minting 2 TLS 1.3 tickets per handshake that nginx does not")
    except BenchError as e:
        # A wrk that cannot connect usually means the lab died: say so, with its last words.
        labs = [p for p in procs.live if p.args[:len(sni_lab_cmd())] == sni_lab_cmd()]
        dead = [p for p in labs if p.poll() is not None]
        if dead:
            tail = (tmp / "lab.stderr").read_text(errors="replace").strip().splitlines()[-8:] \
                if (tmp / "lab.stderr").exists() else []
            rc = f" (exit status {dead[0].returncode})" if dead else ""
            raise BenchError(f"{e}\n  the sni-lab up process is not running{rc}; its stderr ends with:\n    "
                             + "\n    ".join(tail or ["(nothing)"])) from None
        raise
    finally:
        for sig in old:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for key in ("keepalive", "handshakes", "http2"):
        res[key] = [r if isinstance(r, dict) else asdict(r) for r in res.get(key, [])]
        for r in res[key]:
            if not args.raw:
                r.pop("raw", None)
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    return res


def nginx_version(nginx: str) -> str:
    try:
        r = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=5)
        m = re.search(r"nginx/([\d.]+)", r.stderr + r.stdout)
        return m.group(1) if m else ""
    except OSError:
        return ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.edge", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="<= 30 s: 2 s per measurement, nginx worker_processes 1 only")
    p.add_argument("--duration", type=int, help="seconds per measurement (default 8; --quick 2)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of warm-up load before each measurement (default 1)")
    p.add_argument("--rounds", type=int, default=1, help="measure everything N times, alternating; report medians")
    p.add_argument("--client", choices=("auto", "wrk", "h2load"), default="auto",
                   help="load generator (auto: wrk in a private mount namespace, else h2load)")
    p.add_argument("--connections", type=int, default=32, help="client connections (default 32)")
    p.add_argument("--threads", type=int, default=1, help="client threads (default 1: leaves a core to the server)")
    p.add_argument("--no-auto", action="store_true", help="skip nginx with worker_processes auto")
    p.add_argument("--no-mitmproxy", action="store_true", help="skip the mitmproxy engine")
    p.add_argument("--ready-runs", type=int, default=3, help="timed starts of sni-lab up (default 3)")
    p.add_argument("--profile", action="store_true", help="also profile our edge with py-spy (--profile-load)")
    p.add_argument("--profile-load", choices=("both", "handshakes", "keepalive", "http2"), default="both",
                   help="under which load --profile samples our edge (default both: new handshakes, then keep-alive; "
                        "http2: under h2load)")
    p.add_argument("--profile-out", metavar="FILE",
                   help="keep py-spy's collapsed stacks in FILE (with both loads, the handshakes' in FILE-handshakes)")
    p.add_argument("--h2-requests", type=int, help=f"HTTP/2 requests per measurement (default {H2_REQUESTS}; --quick 3000)")
    p.add_argument("--h2-max-s", type=int, help="fewer HTTP/2 requests when the warm-up says they would take longer "
                                                "(default 30 s; --quick 2 s)")
    p.add_argument("--profile-native", action="store_true", help="py-spy --native: C frames (OpenSSL, uvloop) too")
    p.add_argument("--check", action="store_true", help="exit 1 when a project target is missed")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    p.add_argument("--raw", action="store_true", help="include wrk's raw output in --json")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs) for inspection")
    args = p.parse_args(argv)
    if args.duration is None:
        args.duration = 2 if args.quick else 8
    if args.h2_requests is None:
        args.h2_requests = 3000 if args.quick else H2_REQUESTS
    if args.h2_max_s is None:
        args.h2_max_s = 2 if args.quick else 30
    if args.quick:
        args.warmup = min(args.warmup, 1)
    try:
        res = bench(args)
    except BenchError as e:
        print(f"bench.edge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench.edge: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(res, indent=2, default=str))
    else:
        print_report(res)
    if args.check:
        missed = [k for k, t in (("keepalive_ratio", TARGET_KEEPALIVE), ("handshakes_ratio", TARGET_HANDSHAKES),
                                 ("handshakes_per_proxy_cpu_ratio", TARGET_HANDSHAKES_PER_CPU),
                                 ("http2_ratio", TARGET_HTTP2))
                  if res.get(k) is not None and res[k] < t]
        if res.get("ready") and res["ready"]["median_s"] > TARGET_READY_S:
            missed.append("ready")
        if missed:
            print(f"bench.edge: targets missed: {', '.join(missed)}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
