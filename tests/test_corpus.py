"""The hostile corpus (tests/corpus/) replayed against a real running lab, in this process.

One lab for the module: origins, resolver, edge and control plane on free loopback ports,
model v2, short timeouts in its world's [limits] so slow-client inputs finish quickly.
Per class (TLS, HTTP/1.1, HTTP/2, DNS, control API) every input is sent with its own
timeout and checked against its expected answer; then, for the class as a whole:
- nothing crashed: every edge listener still serving, no traceback logged (logging,
  asyncio's exception handler and unraisable exceptions are all captured);
- the test process's RSS grew by at most RSS_BOUND since the lab started;
- the oracle finds no MISROUTED among the route.decision events the class caused;
- a legitimate request is answered: through the edge over HTTP/1.1 and HTTP/2, a DNS
  query over UDP and over TCP, a control-plane read.
A failure lists every input that missed, by id, with what was expected and what came.
Everything is sent to 127.0.0.0/8 only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import ssl
import sys
import time

import pytest
import pytest_asyncio
from dnslib import DNSRecord

from lab import oracle
from lab.client import probe
from lab.dns import query
from lab.hostnorm import wildcard_of
from lab.run import Lab
from lab.topology import PROTECTED, Limits
from tests.corpus import control as c_control
from tests.corpus import dns as c_dns
from tests.corpus import h1 as c_h1
from tests.corpus import h2 as c_h2
from tests.corpus import tls as c_tls

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "v2"
RSS_BOUND = 64 * 1024 * 1024  # growth of this process (lab included) over the whole corpus
CASE_TIMEOUT = 8.0            # no single input may take longer, whatever it does
HOST = "www.victim.example"
# Short enough that slow-client inputs end in seconds; the lab reads them from its world.
LIMITS = Limits(handshake_timeout=2.0, header_timeout=1.0, idle_timeout=2.0, body_timeout=1.0,
                max_connections_per_client=32, dns_tcp_per_client=4, dns_tcp_idle_timeout=1.0)
CLASSES = ("tls", "h1", "h2", "dns", "control")
SLOW = {"closed-within", "tcp-closed"}  # waits on a timer: run together, beside the others
FLOODS = {"at-most-open", "served-while-flooded"}  # hold many connections: run alone, last


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Watch:
    """Tracebacks from logging, asyncio and unraisable exceptions; the events the corpus caused."""

    def __init__(self, lab: Lab) -> None:
        self.tracebacks: list[str] = []
        self.decisions: list[dict] = []
        self.certs: dict[str, list[str]] = {}
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = self._log
        self.unsubscribe = lab.events.subscribe(self._event)

    current = "?"  # the input being sent (the last one started, when several run at once)

    def _log(self, record: logging.LogRecord) -> None:
        if record.exc_info or "Traceback" in record.getMessage():
            exc = f" ({record.exc_info[0].__name__}: {record.exc_info[1]})" if record.exc_info else ""
            text = " ".join(f"{record.getMessage()}{exc}".split())[:200]
            self.tracebacks.append(f"during {self.current}: log {record.name}: {text}")

    def _event(self, e: dict) -> None:
        if e["kind"] == "route.decision" and e.get("origin"):
            self.decisions.append({k: e.get(k) for k in ("conn", "sni", "host", "origin", "listener", "model")})
        elif e["kind"] == "tls.cert":
            self.certs[e["conn"]] = list(e.get("names") or ())

    def loop_error(self, loop, context: dict) -> None:
        self.tracebacks.append(f"during {self.current}: asyncio: {context.get('message')}: {context.get('exception')!r}")

    def unraisable(self, u) -> None:
        self.tracebacks.append(f"during {self.current}: unraisable: {u.exc_type.__name__}: {u.exc_value} "
                               f"in {u.object!r}"[:300])

    def misrouted(self, world, start: int) -> list[str]:
        """Decisions of the protected models the oracle calls MISROUTED (all of them if start=0)."""
        out = []
        for d in self.decisions[start:]:
            if d["model"] not in PROTECTED:
                continue
            name = oracle.name_asked(d["sni"], d["host"])
            names = self.certs.get(d["conn"], [])
            valid = bool(name) and (name in names or (wildcard_of(name) or "\0") in names)
            verdict, why = oracle.judge(world, name, reached_origin=d["origin"], cert_valid=valid)
            if verdict == oracle.MISROUTED:
                out.append(f"{d}: {why}")
        return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def corpus_lab(world, tmp_path_factory):
    base = tmp_path_factory.mktemp("corpus")
    running = Lab(dataclasses.replace(world.with_free_ports(), limits=LIMITS), base / "certs",
                  state_dir=base / "state", model=MODEL, verify_interval=3600)
    await running.start()
    watch = Watch(running)
    logging.getLogger().addHandler(watch.handler)
    loop = asyncio.get_running_loop()
    old_handler, old_hook = loop.get_exception_handler(), sys.unraisablehook
    loop.set_exception_handler(watch.loop_error)
    sys.unraisablehook = watch.unraisable
    running.watch = watch
    assert not await legit(running), "the lab must answer legitimate requests before the corpus starts"
    running.rss0 = rss()
    try:
        yield running
    finally:
        sys.unraisablehook = old_hook
        loop.set_exception_handler(old_handler)
        logging.getLogger().removeHandler(watch.handler)
        watch.unsubscribe()
        await running.stop()


# ---- legitimate traffic ---------------------------------------------------------------------

def _api_request(lab: Lab, method: str, path: str, headers, body) -> bytes:
    host, port = lab.world.control.host, lab.world.control.port
    token = lab.control.token

    def fill(v):
        if isinstance(v, bytes):
            return v.replace(c_control.TOKEN.encode(), token.encode()).replace(c_control.TOKEN_CUT.encode(), token[:-1].encode())
        return (v.replace(c_control.TOKEN_CUT, token[:-1]).replace(c_control.TOKEN, token)
                .replace(c_control.HOSTPORT, f"{host}:{port}")).encode("latin-1")

    hs = [(n.encode(), fill(v)) for n, v in headers]
    if not any(n.lower() == b"host" for n, _ in hs):
        hs.insert(0, (b"Host", f"{host}:{port}".encode()))
    payload = b"" if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    if body is not None:
        hs += [(b"Content-Type", b"application/json"), (b"Content-Length", str(len(payload)).encode())]
    hs.append((b"Connection", b"close"))
    return f"{method} {path} HTTP/1.1\r\n".encode() + b"".join(n + b": " + v + b"\r\n" for n, v in hs) + b"\r\n" + payload


async def api(lab: Lab, method: str, path: str, headers=(), body=None, timeout: float = 5.0) -> tuple[int, bytes]:
    raw = _api_request(lab, method, path, headers, body)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(lab.world.control.host, lab.world.control.port),
                                            timeout)
    try:
        writer.write(raw)
        await writer.drain()
        data = await asyncio.wait_for(reader.read(-1), timeout)
    except (ConnectionError, OSError) as e:
        return 0, f"{type(e).__name__}: {e}".encode()
    finally:
        writer.transport.abort()
    head, _, body_bytes = data.partition(b"\r\n\r\n")
    try:
        return int(head.split(b" ", 2)[1]), body_bytes
    except (IndexError, ValueError):
        return 0, data[:200]


async def legit(lab: Lab) -> list[str]:
    """What a user would check after a storm: the edge (h1, h2), DNS (UDP, TCP) and the control plane answer."""
    problems = []
    l = lab.world.listener_by_name["anycast"]
    for http2 in (False, True):
        out = await probe(l.host, l.port, HOST, [{"host": HOST}], str(lab.ca.cert_path), http2=http2, timeout=5)
        r = out.response
        if r is None or r.status != 200 or r.origin != "victim":
            problems.append(f"legit {'h2' if http2 else 'h1'} GET: {out.tls_error or out.error or (r.status, r.origin)}")
    dns = lab.world.resolver
    for tcp in (False, True):
        try:
            reply = await query(HOST, "A", dns.host, dns.port, tcp=tcp)
            got = [str(rr.rdata) for rr in reply.rr if rr.rtype == 1]
        except (OSError, TimeoutError, ValueError, EOFError) as e:
            got = [f"{type(e).__name__}: {e}"]
        if got != [l.host]:
            problems.append(f"legit DNS over {'TCP' if tcp else 'UDP'}: {got}")
    for path in ("/health", "/hostnames"):
        try:
            status, body = await api(lab, "GET", path)
            ok = status == 200 and json.loads(body) is not None
        except (OSError, TimeoutError, ValueError) as e:
            status, ok = f"{type(e).__name__}: {e}", False
        if not ok:
            problems.append(f"legit control GET {path}: {status}")
    return problems


# ---- runners: one input, one result, one verdict ---------------------------------------------

def _parse_h1(buf: bytes, eof: bool) -> list[dict]:
    """Every complete final response in buf (1xx skipped)."""
    out, pos = [], 0
    while True:
        end = buf.find(b"\r\n\r\n", pos)
        if end < 0:
            return out
        lines = buf[pos:end].decode("latin-1").split("\r\n")
        try:
            status = int(lines[0].split(" ", 2)[1])
        except (IndexError, ValueError):
            out.append({"status": 0, "headers": {}, "body": b""})
            return out
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers.setdefault(k.strip().lower(), v.strip())
        start = end + 4
        if 100 <= status < 200:
            pos = start
            continue
        if "content-length" in headers:
            n = int(headers["content-length"])
            if len(buf) < start + n:
                return out
            body, pos = buf[start:start + n], start + n
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body, p = bytearray(), start
            while True:
                e = buf.find(b"\r\n", p)
                if e < 0:
                    return out
                size = int(buf[p:e].split(b";")[0] or b"0", 16)
                if size == 0:
                    t = buf.find(b"\r\n\r\n", e)
                    if t < 0:
                        return out
                    pos = t + 4
                    break
                if len(buf) < e + 2 + size + 2:
                    return out
                body += buf[e + 2:e + 2 + size]
                p = e + 2 + size + 2
        elif status in (204, 304):
            body, pos = b"", start
        elif eof:
            body, pos = buf[start:], len(buf)
        else:
            return out
        out.append({"status": status, "headers": headers, "body": bytes(body)})


def _h1_ctx(lab: Lab, alpn=("http/1.1",)) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(lab.ca.cert_path))
    ctx.check_hostname = False
    ctx.set_alpn_protocols(list(alpn))
    return ctx


class Stream:
    """A connection whose reads run beside the writes, remembering when the server closed."""

    def __init__(self, reader, writer) -> None:
        self.reader, self.writer = reader, writer
        self.buf = bytearray()
        self.eof_at: float | None = None
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            while True:
                chunk = await self.reader.read(65536)
                if not chunk:
                    break
                self.buf += chunk
        except (ConnectionError, OSError, ssl.SSLError):
            pass
        self.eof_at = time.monotonic()

    async def write(self, steps) -> None:
        for step in steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif self.eof_at is None:
                try:
                    self.writer.write(step)
                    await self.writer.drain()
                except (ConnectionError, OSError, ssl.SSLError):
                    return

    async def until(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            await asyncio.sleep(0.01)
        return predicate()

    def close(self) -> None:
        self.task.cancel()
        self.writer.transport.abort()


def _origin_ok(resp: dict, origin) -> str | None:
    """origin None: the edge answered itself (its decision says refused, no origin stamped the answer)."""
    got = resp["headers"].get("x-lab-origin")
    decision = resp["headers"].get("x-lab-decision") or ""
    if origin is None and (got is not None or "refused=" not in decision):
        return f"forwarded (origin {got}, decision {decision!r}); the edge should answer itself"
    if origin is not None and got != origin:
        return f"origin {got!r}, expected {origin!r} ({resp['headers'].get('x-lab-decision')})"
    return None


async def run_h1(lab: Lab, case) -> str | None:
    l = lab.world.listener_by_name[case.opts.get("listener", "anycast")]
    kind, arg = case.expect[0], case.expect[1]
    if "model" in case.opts:
        lab.set_model(case.opts["model"])
    reader, writer = await asyncio.open_connection(l.host, l.port, ssl=_h1_ctx(lab),
                                                   server_hostname=case.opts.get("sni", HOST))
    s = Stream(reader, writer)
    started = time.monotonic()
    try:
        await s.write(case.send)
        if kind == "unread":
            await asyncio.sleep(0.2)
            return None
        if kind == "closed-within":
            await s.until(lambda: s.eof_at is not None, max(0.0, arg - (time.monotonic() - started)))
            if s.eof_at is None:
                return f"still open {time.monotonic() - started:.1f}s after the first byte (expected closed within {arg}s)"
            return None
        need = len(arg) if kind == "statuses" else 1
        await s.until(lambda: s.eof_at is not None or len(_parse_h1(bytes(s.buf), False)) >= need, 5.0)
        got = _parse_h1(bytes(s.buf), s.eof_at is not None)
        if kind == "answered":
            return None if got or s.eof_at is not None else "no answer and no close within 5s"
        if kind == "statuses":
            statuses = [r["status"] for r in got]
            return None if statuses == arg else f"statuses {statuses[:12]}{'...' if len(statuses) > 12 else ''} " \
                                                  f"({len(statuses)}), expected {arg[:12]} ({len(arg)})"
        if not got:
            return "connection closed without a response" if s.eof_at is not None else "no response within 5s"
        resp = got[0]
        if resp["status"] not in arg:
            return f"status {resp['status']}, expected {sorted(arg)} ({resp['headers'].get('x-lab-decision')})"
        return _origin_ok(resp, case.expect[2])
    finally:
        s.close()
        if "model" in case.opts:
            lab.set_model(MODEL)


async def run_h2(lab: Lab, case) -> str | None:
    l = lab.world.listener_by_name["anycast"]
    res = await c_h2.exchange(l.host, l.port, HOST, str(lab.ca.cert_path), case.send, 6.0)
    kind, arg = case.expect[0], case.expect[1]
    s1 = res.streams.get(1)
    summary = (f"goaway={res.goaway} closed={res.closed} error={res.error} "
               f"stream1={(s1.status, s1.reset, s1.ended) if s1 else None}")
    if res.alpn != "h2":
        return f"ALPN {res.alpn}, not h2"
    if kind == "status":
        if s1 is None or s1.status is None:
            return f"no answer on stream 1: {summary}"
        if s1.status not in arg:
            return f"status {s1.status}, expected {sorted(arg)} ({s1.header('x-lab-decision')})"
        return _origin_ok({"headers": dict(s1.headers)}, case.expect[2])
    if kind == "streams":
        answered = sum(1 for s in res.streams.values() if s.status is not None and s.ended)
        refused = {sid for sid, s in res.streams.items() if s.reset == c_h2.REFUSED_STREAM}
        want_refused = case.expect[2]
        if res.goaway is not None or answered != arg or refused != want_refused:
            return f"{answered} answered (expected {arg}), refused {sorted(refused)} (expected {sorted(want_refused)}), " \
                   f"goaway={res.goaway}, error={res.error}"
        return None
    if kind == "conn-error":
        if (res.goaway is not None and res.goaway != c_h2.NO_ERROR) or res.closed:
            return None
        return f"no connection error: {summary}"
    if kind == "stream-refused":
        if res.goaway is None and s1 is not None and (s1.reset is not None or (s1.status and 400 <= s1.status < 500
                                                                                 and not s1.header("x-lab-origin"))):
            return None
        return f"not refused on its own: {summary}"
    if kind == "calm":
        if (res.goaway is not None or res.closed) and (arg is None or res.pings_acked < arg):
            return None
        return f"flood not stopped: {summary} pings_acked={res.pings_acked}"
    if kind == "survives":
        return None if res.error != "timeout" else f"hung: {summary}"
    raise AssertionError(f"unknown expectation {kind}")


async def run_tls(lab: Lab, case) -> str | None:
    kind = case.send[0]
    l = lab.world.listener_by_name["anycast"]
    ca = str(lab.ca.cert_path)
    want = case.expect[0]
    if kind == "hello":
        got = await c_tls.send_raw(l.host, l.port, c_tls.client_hello(case.send[1]), 3.0, eof=False, first=True)
        if want == "alert":
            return None if got["alert"] == case.expect[1] else \
                f"alert {got['alert']} (server hello: {got['server_hello']}, closed: {got['closed']}), expected alert {case.expect[1]}"
        return None if got["server_hello"] else f"no ServerHello (alert {got['alert']}, closed {got['closed']})"
    if kind == "raw":
        got = await c_tls.send_raw(l.host, l.port, case.send[1], 3.0)
        return None if got["closed"] else "the edge kept the connection open"
    if kind == "client":
        opts = case.send[1]
        sni = opts.get("sni", HOST)
        try:
            ctx = c_tls.tls_client_context(ca, opts)
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(l.host, l.port, ssl=ctx, server_hostname=sni), 4)
        except (ssl.SSLError, OSError, TimeoutError) as e:
            return None if want == "handshake-fails" else f"handshake failed: {e}"
        obj = writer.get_extra_info("ssl_object")
        negotiated = (obj.version(), obj.cipher()[0], obj.selected_alpn_protocol())
        if want == "handshake-fails":
            writer.transport.abort()
            return f"handshake succeeded: {negotiated}"
        try:
            if obj.selected_alpn_protocol() == "h2":
                writer.transport.abort()
                res = await c_h2.exchange(l.host, l.port, sni, ca, c_h2._frames(), 5.0)
                status = res.streams[1].status if 1 in res.streams else None
            else:
                writer.write(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
                data = await asyncio.wait_for(reader.read(-1), 5)
                got = _parse_h1(data, True)
                status = got[0]["status"] if got else None
        finally:
            writer.transport.abort()
        return None if status == case.expect[1] else f"status {status} over {negotiated}"
    if kind == "resume":
        (l1, s1), (l2, s2) = case.send[1], case.send[2]
        a, b = lab.world.listener_by_name[l1], lab.world.listener_by_name[l2]
        got = await asyncio.to_thread(c_tls.resume_pair, ca, (a.host, a.port, s1), (b.host, b.port, s2), 4.0)
        if "error" in got:
            return f"{got['error']} (reused so far {got['reused']})"
        return None if not any(got["reused"]) else f"session resumed on {l2} with SNI {s2}: {got['reused']}"
    if kind in ("idle", "stall"):
        started = time.monotonic()
        if kind == "idle":
            alpn = ["h2"] if case.send[1] == "h2" else ["http/1.1"]
            reader, writer = await asyncio.open_connection(l.host, l.port, ssl=_h1_ctx(lab, alpn), server_hostname=HOST)
        else:
            reader, writer = await asyncio.open_connection(l.host, l.port)
            writer.write(case.send[1])
        s = Stream(reader, writer)
        try:
            await s.until(lambda: s.eof_at is not None, case.expect[1])
            return None if s.eof_at is not None else f"still open after {time.monotonic() - started:.1f}s"
        finally:
            s.close()
    if kind == "flood":
        return await _tls_flood(lab, l, case.send[1], case.expect[1])
    raise AssertionError(f"unknown TLS input {kind}")


async def _tls_flood(lab: Lab, l, n: int, limit: int) -> str | None:
    """n connections from one client address, each asking one request and staying open."""
    held, served = [], 0
    try:
        for _ in range(n):
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    l.host, l.port, ssl=_h1_ctx(lab), server_hostname=HOST, local_addr=("127.0.0.77", 0)), 2)
            except (OSError, ssl.SSLError, TimeoutError):
                continue
            held.append(writer)
            writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2)
                served += head.startswith(b"HTTP/1.1 200")
            except (OSError, ssl.SSLError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                pass
        others = await legit(lab)
    finally:
        for w in held:
            w.transport.abort()
    problems = [f"{served} of {n} connections from one client served at once (limit {limit})"] if served > limit else []
    return "; ".join(problems + others) or None


def _dns_rcode(reply: DNSRecord) -> str:
    opt = next((r for r in reply.ar if r.rtype == 41), None)
    code = reply.header.rcode | (((opt.ttl >> 24) & 0xFF) << 4 if opt else 0)
    return "BADVERS" if code == 16 else next((k for k, v in c_dns.RCODES.items() if v == code), str(code))


class _UDP(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.replies: asyncio.Queue = asyncio.Queue()

    def datagram_received(self, data, addr) -> None:
        self.replies.put_nowait(data)


async def _udp(host: str, port: int, packet: bytes, wait: float) -> bytes | None:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(_UDP, remote_addr=(host, port))
    try:
        transport.sendto(packet)
        return await asyncio.wait_for(proto.replies.get(), wait)
    except TimeoutError:
        return None
    finally:
        transport.close()


def _tcp_replies(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos + 2 <= len(data):
        n = int.from_bytes(data[pos:pos + 2], "big")
        if pos + 2 + n > len(data):
            break
        out.append(data[pos + 2:pos + 2 + n])
        pos += 2 + n
    return out


def _check_reply(case, packet: bytes, reply: bytes | None) -> str | None:
    kind = case.expect[0]
    if kind == "no-reply":
        return None if reply is None else f"answered ({len(reply)} bytes); should be dropped"
    if reply is None:
        return None if kind == "reply-or-drop" else "no reply"
    if len(packet) >= 2 and reply[:2] != packet[:2]:
        return f"reply id {reply[:2].hex()} does not echo the query's {packet[:2].hex()}"
    try:
        r = DNSRecord.parse(reply)
    except Exception as e:  # noqa: BLE001 - a reply we cannot parse is the finding
        return f"unparsable reply: {type(e).__name__}: {e}"
    if not r.header.qr:
        return "reply without QR"
    if kind == "reply-or-drop":
        return None
    rcode = _dns_rcode(r)
    addrs = [str(rr.rdata) for rr in r.rr if rr.rtype == 1]
    if kind == "address":
        return None if addrs == [case.expect[1]] else f"{rcode} {addrs}, expected A {case.expect[1]}"
    if kind == "rcode":
        if rcode not in case.expect[1]:
            return f"{rcode} {[str(rr.rdata) for rr in r.rr]}, expected {sorted(case.expect[1])}"
        if case.expect[2] and r.rr:
            return f"{rcode} with answers {[str(rr.rdata) for rr in r.rr]}, expected none"
        return None
    raise AssertionError(f"unknown expectation {kind}")


async def run_dns(lab: Lab, case) -> str | None:
    dns = lab.world.resolver
    kind = case.send[0]
    if kind == "udp":
        wait = 0.3 if case.expect[0] in ("no-reply", "reply-or-drop") else 2.0
        return _check_reply(case, case.send[1], await _udp(dns.host, dns.port, case.send[1], wait))
    if kind == "tcp-flood":
        return await _dns_flood(lab, case.send[1], case.send[2], case.expect[1])
    reader, writer = await asyncio.open_connection(dns.host, dns.port)
    s = Stream(reader, writer)
    started = time.monotonic()
    try:
        if kind == "tcp":
            await s.write([case.send[1]])
            writer.write_eof()
        elif kind == "tcp-slow":
            await s.write([x for b in case.send[1] for x in (bytes([b]), 0.01)])
        want = case.expect[0]
        if want == "tcp-closed":
            await s.until(lambda: s.eof_at is not None, case.expect[1])
            return None if s.eof_at is not None else f"still open after {time.monotonic() - started:.1f}s"
        n = case.expect[1] if want == "tcp-replies" else 1
        await s.until(lambda: s.eof_at is not None or len(_tcp_replies(bytes(s.buf))) >= n, 3.0)
        replies = _tcp_replies(bytes(s.buf))
        if want == "tcp-replies-or-closed":
            return None if replies or s.eof_at is not None else "no reply and no close"
        if len(replies) != n:
            return f"{len(replies)} replies, expected {n}"
        for r in replies:
            try:
                if not DNSRecord.parse(r).header.qr:
                    return "a reply without QR"
            except Exception as e:  # noqa: BLE001
                return f"unparsable reply: {e}"
        return None
    finally:
        s.close()


async def _dns_flood(lab: Lab, n: int, source: str, limit: int) -> str | None:
    dns = lab.world.resolver
    held, answered = [], 0
    packet = c_dns.tcp(c_dns.q(HOST))
    try:
        for _ in range(n):
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(dns.host, dns.port,
                                                                                local_addr=(source, 0)), 1)
            except (OSError, TimeoutError):
                continue
            held.append((reader, writer))
            writer.write(packet)
        for reader, _ in held:
            try:
                await asyncio.wait_for(reader.readexactly(2), 0.05)
                answered += 1
            except (OSError, TimeoutError, asyncio.IncompleteReadError):
                pass
        try:
            reply = await query(HOST, "A", dns.host, dns.port, tcp=True, timeout=2)
            legit_ok = [str(rr.rdata) for rr in reply.rr if rr.rtype == 1] == [lab.world.listener_by_name["anycast"].host]
        except (OSError, TimeoutError, ValueError, EOFError) as e:  # EOFError: lab.dns.query lets IncompleteReadError out
            legit_ok = False
            answered_note = f"{type(e).__name__}"
        else:
            answered_note = ""
    finally:
        for _, w in held:
            w.transport.abort()
    problems = []
    if not legit_ok:
        problems.append(f"a legitimate TCP query from another address failed while {len(held)} connections were held "
                        f"{answered_note}".strip())
    if answered > limit:
        problems.append(f"{answered} of {n} connections from {source} answered (per-client limit {limit})")
    return "; ".join(problems) or None


async def run_control(lab: Lab, case) -> str | None:
    method, path, headers, body = case.send
    status, reply = await api(lab, method, path, headers, body)
    if status in case.expect[1]:
        return None
    return f"status {status} ({reply[:120]!r}), expected {sorted(case.expect[1])}"


def _strict_json(body: bytes):
    def refuse(name):
        raise ValueError(f"invalid JSON constant {name}")
    return json.loads(body, parse_constant=refuse)


async def control_state(lab: Lab) -> dict:
    out = {}
    for path in ("/hostnames?limit=1000", "/dns/records", "/dns/overrides", "/model"):
        status, body = await api(lab, "GET", path)
        try:
            out[path] = (status, _strict_json(body))
        except ValueError as e:
            out[path] = (status, f"not valid JSON: {e}")
    return out


def _diff(before, after) -> str:
    if isinstance(before[1], list) and isinstance(after[1], list):
        return f"added {[x for x in after[1] if x not in before[1]]}, removed {[x for x in before[1] if x not in after[1]]}"[:600]
    return f"{before} -> {after}"[:600]


async def _restore(lab: Lab, before: dict) -> None:
    """Undo what the control class's inputs were wrongly allowed to change."""
    resolver, token = lab.resolver, [("Authorization", f"Bearer {lab.control.token}")]
    for o in resolver.overrides():
        if not any(o["id"] == b.get("id") for b in before["/dns/overrides"][1]):
            await api(lab, "DELETE", f"/dns/overrides/{o['id']}", token)
    for r in resolver.records():
        if r not in before["/dns/records"][1]:
            await api(lab, "DELETE", f"/dns/records?name={r['name']}&type={r['type']}", token)
    known = {h["id"] for h in before["/hostnames?limit=1000"][1]["hostnames"]}
    status, body = await api(lab, "GET", "/hostnames?limit=1000")
    for h in json.loads(body)["hostnames"] if status == 200 else []:
        if h["id"] not in known and h["status"] != "deleted":
            await api(lab, "DELETE", f"/hostnames/{h['id']}", token)


RUNNERS = {"tls": (c_tls.cases, run_tls), "h1": (c_h1.cases, run_h1), "h2": (c_h2.cases, run_h2),
           "dns": (c_dns.cases, run_dns), "control": (c_control.cases, run_control)}


async def test_corpus_is_big_enough():
    counts = {name: len(make()) for name, (make, _) in RUNNERS.items()}
    assert sum(counts.values()) >= 300 and all(n >= 40 for n in counts.values()), counts


async def test_the_misrouted_check_can_fail(world):
    """The MISROUTED count above reads real events; here it is shown the write-up's outcome, and sees it."""
    class _Events:
        def subscribe(self, f):
            self.f = f
            return lambda: None
    events = _Events()
    lab = type("L", (), {"events": events})()
    watch = Watch(lab)
    events.f({"kind": "tls.cert", "conn": "c1", "names": ["www.victim.example"]})
    for model in ("v2", "v1"):
        events.f({"kind": "route.decision", "conn": "c1", "sni": "www.victim.example", "host": "www.victim.example",
                  "origin": "saas", "listener": "saas-v1", "model": model})
    found = watch.misrouted(world, 0)
    assert len(found) == 1 and "'model': 'v2'" in found[0]  # v1 misroutes by design: not counted


async def _one(lab: Lab, runner, case) -> tuple:
    lab.watch.current = case.id
    started = time.monotonic()
    try:
        problem = await asyncio.wait_for(runner(lab, case), CASE_TIMEOUT)
    except TimeoutError:
        problem = f"no outcome within {CASE_TIMEOUT}s"
    except (OSError, ssl.SSLError) as e:
        problem = f"could not talk to the lab: {type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - one input's surprise must not hide the others' results
        problem = f"unexpected {type(e).__name__}: {e}"
    return case, problem, time.monotonic() - started


@pytest.mark.parametrize("cls", CLASSES)
async def test_corpus(corpus_lab, cls):
    lab = corpus_lab
    make, runner = RUNNERS[cls]
    cases = make()
    watch = lab.watch
    tracebacks0, decisions0 = len(watch.tracebacks), len(watch.decisions)
    before = await control_state(lab) if cls == "control" else None

    slow = [c for c in cases if c.expect[0] in SLOW]
    floods = [c for c in cases if c.expect[0] in FLOODS]
    rest = [c for c in cases if c not in slow and c not in floods]
    slow_task = asyncio.gather(*(_one(lab, runner, c) for c in slow))
    results = [await _one(lab, runner, c) for c in rest]
    results += await slow_task
    results += [await _one(lab, runner, c) for c in floods]

    failures = [f"{c.id}: {p}  [{c.why}]" for c, p, _ in results if p]
    for c, p, took in results:  # a summary per input, shown with -s or on failure
        print(f"{cls} {c.id}: {'FAIL ' + p if p else 'ok'} ({took * 1000:.0f} ms)")
    await asyncio.sleep(0.2)  # let the last connections' teardown run before judging the lab
    if cls == "control":
        after = await control_state(lab)
        for path in before:
            if after[path] != before[path]:
                failures.append(f"state changed by rejected inputs: GET {path}: {_diff(before[path], after[path])}")
        await _restore(lab, before)  # so what was wrongly accepted does not fail the legitimate checks below
    failures += [f"after the {cls} class: {p}" for p in await legit(lab)]
    failures += [f"crash: {t}" for t in watch.tracebacks[tracebacks0:]]
    failures += [f"listener {s.sockets[0].getsockname() if s.sockets else '?'} stopped serving"
                 for s in lab.edge.servers if not s.is_serving()]
    failures += [f"MISROUTED: {m}" for m in watch.misrouted(lab.world, decisions0)]
    grown = rss() - lab.rss0
    print(f"{cls}: RSS +{grown / 2**20:.1f} MiB since the lab started")
    if grown > RSS_BOUND:
        failures.append(f"RSS grew {grown / 2**20:.0f} MiB since the lab started (bound {RSS_BOUND / 2**20:.0f} MiB)")
    assert not failures, f"{len(failures)} of {len(cases)} {cls} inputs or checks failed:\n" + "\n".join(failures)
