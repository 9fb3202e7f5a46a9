"""The pure pieces of the edge's TLS: reading the ClientHello, the SNI's name, the caps, the throttle."""
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from lab.edge import hello
from lab.edge.admission import ConnectionCaps, Throttle
from lab.edge.certstore import refusal
from lab.hostnorm import HostError, normalize, sni_name
from lab.topology import Limits

ROOT = Path(__file__).resolve().parent.parent


def real_hello(sni: str | None, *, tls13: bool = True) -> bytes:
    """A ClientHello as the stdlib's OpenSSL writes it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    if not tls13:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    out = ssl.MemoryBIO()
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def hand_hello(extensions: bytes, *, record_version: bytes = b"\x03\x01") -> bytes:
    """A minimal ClientHello around `extensions`, for shapes no TLS library would send."""
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    msg = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16" + record_version + len(msg).to_bytes(2, "big") + msg


def sni_ext(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + len(n).to_bytes(2, "big") + n for n in names)
    data = len(entries).to_bytes(2, "big") + entries
    return b"\x00\x00" + len(data).to_bytes(2, "big") + data


@pytest.mark.parametrize("sni", ["www.victim.example", "WWW.Victim.EXAMPLE.", "xn--bcher-kva.example", None])
@pytest.mark.parametrize("tls13", [True, False], ids=["tls13", "tls12"])
def test_reads_the_sni_of_a_real_hello(sni, tls13):
    data = real_hello(sni, tls13=tls13)
    assert hello.client_hello(data) == hello.Hello(sni=sni.encode() if sni else None)


def test_needs_more_until_the_hello_is_whole():
    data = real_hello("www.victim.example")
    assert all(hello.client_hello(data[:n]) is None for n in range(len(data)))
    assert hello.client_hello(data + b"\x14\x03\x03\x00\x01\x01").sni == b"www.victim.example"  # what follows is OpenSSL's


def test_a_hello_over_two_records():
    data = real_hello("app.saas.example")
    msg = data[5:]
    split = data[:3] + (100).to_bytes(2, "big") + msg[:100] + data[:3] + (len(msg) - 100).to_bytes(2, "big") + msg[100:]
    assert hello.client_hello(split).sni == b"app.saas.example"


def test_raw_bytes_stay_raw():
    assert hello.client_hello(hand_hello(sni_ext("bücher.example".encode()))).sni == "bücher.example".encode()
    assert hello.client_hello(hand_hello(sni_ext(b"\xff.example"))).sni == b"\xff.example"
    assert hello.shown(b"\xff.example") == "\\xff.example"
    assert hello.client_hello(hand_hello(sni_ext(b""))).sni == b""  # empty: refused as no host name
    assert hello.client_hello(hand_hello(b"")).sni is None


@pytest.mark.parametrize("data,reason,alert", [
    (b"GET / HTTP/1.1\r\n", "the client did not start TLS", None),
    (b"\x80\x2e\x01\x03\x01", "the client did not start TLS", None),  # SSLv2-style hello
    (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "handshake message 2", hello.DECODE_ERROR),
    (hand_hello(sni_ext(b"a.example", b"b.example")), "more than one server_name", hello.DECODE_ERROR),
    (hand_hello(sni_ext(b"a.example", kind=1)), "server_name of an unknown type", hello.DECODE_ERROR),
    (hand_hello(sni_ext(b"a.example") + sni_ext(b"b.example")), "extension 0 twice", hello.DECODE_ERROR),
    (b"\x16\x03\x01\x00\x04\x01\x00\x00\x05\x16\x03\x01\x00\x05" + bytes(5), "truncated ClientHello",
     hello.DECODE_ERROR),
    (b"\x16\x03\x01\x00\x04\x01\xff\xff\xff", "ClientHello of 16777215 bytes", hello.DECODE_ERROR),
    (b"\x16\x03\x01\x00\x04\x01\x00\x00\x40" + b"\x16\x03\x01\x00\x01\x00" * 9, "more than 8 records",
     hello.DECODE_ERROR),
])
def test_refuses_what_is_no_client_hello(data, reason, alert):
    with pytest.raises(hello.HelloError) as e:
        hello.client_hello(data)
    assert reason in e.value.reason and e.value.alert == alert


def test_the_alert_record():
    assert hello.alert(hello.UNRECOGNIZED_NAME) == b"\x15\x03\x03\x00\x02\x02\x70"


@pytest.mark.parametrize("sni,name", [
    ("www.victim.example", "www.victim.example"),
    ("WWW.Victim.Example.", "www.victim.example"),
    (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
])
def test_sni_name_is_the_policys_normalisation(sni, name):
    assert sni_name(sni) == name == normalize(sni.decode() if isinstance(sni, bytes) else sni)


@pytest.mark.parametrize("sni", ["www.victim.example..", "*.victim.example", "www.victim.example:443", "127.0.0.1",
                                 "[::1]", "::1", " www.victim.example", "bücher.example", "bücher.example".encode(),
                                 b"\xff.example", "", b"a\x00b.example"])
def test_sni_name_refuses_what_is_no_host_name(sni):
    with pytest.raises(HostError):
        sni_name(sni)
    assert refusal(sni).startswith("unrecognized_name: ") and "no certificate" not in refusal(sni)


def test_refusal_reasons():
    assert refusal(None) == "unrecognized_name: no SNI"
    assert refusal(b"nothing.example") == "unrecognized_name: no certificate for this SNI"


def test_caps_count_per_client_and_in_all():
    limits = Limits(max_connections=3, max_connections_per_client=2)
    caps = ConnectionCaps()
    assert caps.admit("a", limits) is None and caps.admit("a", limits) is None
    assert "max_connections_per_client 2" in caps.admit("a", limits)
    assert caps.admit("b", limits) is None
    assert "max_connections 3" in caps.admit("c", limits)
    caps.release("a")
    assert caps.admit("c", limits) is None
    assert (caps.count.refused, caps.count.total, caps.count.open) == (2, 3, {"a": 1, "b": 1, "c": 1})
    small = ConnectionCaps(descriptors=1)  # the descriptor cap wins when it is the smaller
    assert small.admit("a", limits) is None and "max_connections 1" in small.admit("b", limits)


def test_descriptor_cap_raises_the_soft_limit():
    resource = pytest.importorskip("resource")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY or hard < 512:
        pytest.skip(f"hard descriptor limit {hard}")
    code = ("import resource; from lab.edge.admission import descriptor_cap\n"
            "hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
            "cap = descriptor_cap(100)\n"
            "print(cap, *resource.getrlimit(resource.RLIMIT_NOFILE))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT,
                         check=True)
    cap, soft, new_hard = map(int, out.stdout.split())
    assert soft == new_hard == hard and cap == hard - 100


def test_a_small_descriptor_limit_still_leaves_the_edge_half():
    resource = pytest.importorskip("resource")
    code = ("import resource; from lab.edge.admission import descriptor_cap\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300))\n"
            "print(descriptor_cap(256))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=ROOT,
                         check=True)
    assert int(out.stdout) == 150


def test_throttle_reports_once_per_interval():
    clock = [0.0]
    t = Throttle(10.0, clock=lambda: clock[0])
    assert [t.hit("k") for _ in range(3)] == [0, None, None]
    assert t.hit("other") == 0
    clock[0] = 10.0
    assert t.hit("k") == 2


def test_throttle_memory_is_bounded():
    t = Throttle(10.0, clock=lambda: 0.0, max_keys=4)
    assert all(t.hit(i) == 0 for i in range(100))
    assert len(t._next) <= 4
