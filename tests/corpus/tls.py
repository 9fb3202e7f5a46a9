"""TLS: ClientHellos with hostile SNI bytes, non-TLS bytes, odd clients, resumption, half-open connections.

A ClientHello carrying SNI bytes no TLS library would send is made by OpenSSL itself
for a placeholder name of the same length, then patched: lengths stay right, and the
server sees a real hello with exactly those bytes in its server_name extension.
"""
from __future__ import annotations

import asyncio
import random
import socket
import ssl
import struct

from tests.corpus import Case, unique

ALERT_UNRECOGNIZED_NAME = 112


def _placeholder(n: int) -> str:
    """A valid host name of exactly n characters (labels of at most 62)."""
    name = ("a" * 62 + ".") * (n // 63 + 1)
    name = name[:n]
    return name[:-1] + "a" if name.endswith(".") else name


def client_hello(sni: bytes, alpn: tuple[str, ...] = ("http/1.1",)) -> bytes:
    stand_in = _placeholder(len(sni))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(list(alpn))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=stand_in)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    hello = outgoing.read()
    # server_name_list length, host_name type 0, name length, name: unique even for a one-letter name.
    n = len(sni)
    head = struct.pack("!HBH", n + 3, 0, n)
    assert hello.count(head + stand_in.encode()) == 1, "server_name extension not found in the ClientHello"
    return hello.replace(head + stand_in.encode(), head + sni)


def first_alert(data: bytes) -> int | None:
    """The description of the first alert record the server sent, if its first record is one."""
    if len(data) >= 7 and data[0] == 0x15:
        return data[6]
    return None


async def send_raw(host: str, port: int, payload: bytes, timeout: float, eof: bool = True, first: bool = False) -> dict:
    """Send bytes, half-close (`eof`), read until the server closes, or (`first`) until its first record header."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    got = bytearray()
    closed = False
    try:
        writer.write(payload)
        await writer.drain()
        if eof:
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), max(0.01, deadline - loop.time()))
            except TimeoutError:
                break
            if not chunk:
                closed = True
                break
            got += chunk
            if first and len(got) >= 7:
                break
    except (ConnectionError, OSError):
        closed = True
    finally:
        writer.transport.abort()
    return {"data": bytes(got), "closed": closed, "alert": first_alert(bytes(got)),
            "server_hello": got[:1] == b"\x16"}


def cases(seed: int = 7) -> list[Case]:
    rnd = random.Random(seed)
    out: list[Case] = []
    # SNI names the edge holds no certificate for: alert 112 every time.
    for name in ("nothing.example", "a.b.victim.example", "victim.example.evil.test", "evil.test", "example",
                 "www.newshop.test", "xn--zz.example", "customers.saas3.example", "localhost",
                 "www.victim.example.evil", "a", "x" * 63 + ".example"):
        out.append(Case(f"sni-unknown-{name[:40]}", ("hello", name.encode()), ("alert", ALERT_UNRECOGNIZED_NAME),
                        "no certificate for this SNI: alert 112"))
    # SNI bytes no honest client sends: 112 too, one log line, never a traceback (issue 13).
    hostile = {
        "utf8-e-acute": "\u00e9.victim.example".encode(),
        "utf8-www": "www.v\u00efctim.example".encode(),
        "latin1-byte": b"www.v\xefctim.example",
        "nul": b"www.victim.example\x00",
        "nul-inside": b"www\x00victim.example",
        "space": b"www victim.example",
        "ctrl-01": b"\x01.victim.example",
        "del-7f": b"www.victim.exampl\x7f",
        "ff-bytes": b"\xff\xfe\xfd.example",
        "literal-wildcard": b"*.victim.example",
        "literal-wildcard-saas": b"*.saas.example",
        "double-dot": b"www..victim.example",
        "only-dots": b"..",
        "leading-dot": b".victim.example",
        "label-64": b"a" * 64 + b".victim.example",
        "name-255": b"a" * 255,
        "percent": b"www%2evictim.example",
        "slash": b"www.victim.example/x",
        "colon-port": b"www.victim.example:443",
        "ip-literal": b"127.0.0.10",
        "crlf": b"www.victim.example\r\n",
        "bidi": "\u202ewww.victim.example".encode(),
        "fullwidth-dot": "www.victim\uff0eexample".encode(),
    }
    for label, raw in hostile.items():
        out.append(Case(f"sni-hostile-{label}", ("hello", raw), ("alert", ALERT_UNRECOGNIZED_NAME),
                        "issue 13: a bad SNI gets alert 112 (not 80), a literal wildcard no wildcard certificate"))
    # Names it does hold, in spellings DNS treats as equal: a certificate, not an alert.
    for name in ("www.victim.example", "WWW.VICTIM.EXAMPLE", "App.Saas.Example", "shop.customer.example"):
        out.append(Case(f"sni-known-{name}", ("hello", name.encode()), ("server-hello",),
                        "a name the edge holds, case-insensitively (RFC 4343)"))
    # Bytes that are not a TLS handshake at all: the edge closes, nothing else.
    hello = client_hello(b"www.victim.example")
    raw = {
        "plain-http": b"GET / HTTP/1.1\r\nHost: www.victim.example\r\n\r\n",
        "h2-preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "sslv2-hello": bytes.fromhex("802b0103010012000000100000") + bytes(18) + bytes(range(16)),
        "half-hello": hello[: len(hello) // 2],
        "hello-5-bytes": hello[:5],
        "record-len-ffff": b"\x16\x03\x01\xff\xff" + hello[5:60],
        "record-len-zero": b"\x16\x03\x01\x00\x00",
        "alert-first": b"\x15\x03\x03\x00\x02\x02\x28",
        "appdata-first": b"\x17\x03\x03\x00\x10" + bytes(16),
        "ccs-first": b"\x14\x03\x03\x00\x01\x01",
        "hello-then-garbage": hello + bytes(rnd.randrange(256) for _ in range(300)),
        "two-hellos": hello + hello,
        "version-9-9": b"\x16\x09\x09" + hello[3:],
        "empty": b"",
    }
    for size in (1, 7, 64, 517, 4096, 20000):
        raw[f"random-{size}"] = bytes(rnd.randrange(256) for _ in range(size))
    for label, payload in raw.items():
        out.append(Case(f"raw-{label}", ("raw", payload), ("closed",), "not a handshake: closed, no crash"))
    # Real clients with odd settings.
    out += [
        Case("tls12-cbc-only", ("client", {"max": "TLSv1_2", "ciphers": "AES128-SHA:AES256-SHA:ECDHE-RSA-AES128-SHA"}),
             ("handshake-fails",), "issue 13: TLS 1.2 offers AEAD suites only"),
        Case("tls12-aead", ("client", {"max": "TLSv1_2", "ciphers": "ECDHE+AESGCM:ECDHE+CHACHA20"}), ("status", 200),
             "TLS 1.2 with AEAD suites works"),
        Case("tls13", ("client", {"min": "TLSv1_3"}), ("status", 200), "TLS 1.3 works"),
        Case("alpn-h3-only", ("client", {"alpn": ["h3"]}), ("status", 200), "no common ALPN: HTTP/1.1"),
        Case("alpn-http10", ("client", {"alpn": ["http/1.0"]}), ("status", 200), "no common ALPN: HTTP/1.1"),
        Case("alpn-none", ("client", {"alpn": []}), ("status", 200), "no ALPN: HTTP/1.1"),
        Case("alpn-many", ("client", {"alpn": [f"x-{i}" for i in range(30)] + ["h2"]}), ("status", 200),
             "h2 found among many offers"),
        Case("no-sni", ("client", {"sni": None}), ("handshake-fails",), "no SNI: no default certificate, alert 112"),
        Case("resume-across-listener-and-sni", ("resume", ("anycast", "www.victim.example"), ("saas-v1", "app.saas.example")),
             ("not-resumed",), "issue 9: no TLS 1.2 session resumption across listener and SNI"),
        Case("resume-same-listener-other-sni", ("resume", ("anycast", "www.victim.example"), ("anycast", "shop.customer.example")),
             ("not-resumed",), "issue 9: a resumed session would keep the old SNI and certificate"),
        Case("handshake-then-idle", ("idle", "h1"), ("closed-within", 3.0),
             "issue 2: an idle connection after the handshake is closed (header/idle timeout)"),
        Case("handshake-then-idle-h2", ("idle", "h2"), ("closed-within", 4.0),
             "issue 2: an h2 connection with no stream is closed (idle timeout)"),
        Case("half-open-handshake", ("stall", hello[:40]), ("closed-within", 3.0),
             "a handshake that never completes is dropped (handshake timeout)"),
        Case("per-client-connection-flood", ("flood", 48), ("at-most-open", 32),
             "issue 2: per-client connection limit; the rest of the world still served"),
    ]
    return unique(out)


def tls_client_context(ca: str, opts: dict) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False
    if "min" in opts:
        ctx.minimum_version = getattr(ssl.TLSVersion, opts["min"])
    if "max" in opts:
        ctx.maximum_version = getattr(ssl.TLSVersion, opts["max"])
    if "ciphers" in opts:
        ctx.set_ciphers(opts["ciphers"])
    alpn = opts.get("alpn", ["http/1.1"])
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


def resume_pair(ca: str, first: tuple[str, int, str], second: tuple[str, int, str], timeout: float) -> dict:
    """Blocking (run in a thread): a TLS 1.2 session from `first`, offered again to `second`."""
    ctx = tls_client_context(ca, {"max": "TLSv1_2"})
    session = None
    reused = []
    for host, port, sni in (first, second):
        with socket.create_connection((host, port), timeout=timeout) as raw:
            try:
                with ctx.wrap_socket(raw, server_hostname=sni, session=session) as s:
                    s.sendall(f"GET / HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
                    while s.recv(65536):
                        pass
                    reused.append(s.session_reused)
                    session = s.session
            except (ssl.SSLError, OSError) as e:
                return {"error": f"{type(e).__name__}: {e}", "reused": reused}
    return {"reused": reused}
