"""DNS: malformed packets over UDP and TCP, odd names, zone-transfer asks, EDNS, TCP framing and slot floods.

`send` is ("udp", packet) | ("tcp", stream bytes, with their length prefixes) | ("tcp-idle",) | ("tcp-flood", n, source)
`expect` is one of
  ("rcode", {names}, no_answer)  a reply to this query (same id, QR set) with one of these rcodes
  ("no-reply", None)             nothing comes back (not a query: dropping is the answer)
  ("reply-or-drop", None)        random bytes: a reply must echo the id; dropping is fine
  ("address", ip)                an A answer with this address
  ("tcp-replies", n)             over TCP: n replies, then the connection may close
  ("tcp-closed", seconds)        the server closes the TCP connection by then
  ("served-while-flooded", limit) a legitimate TCP query from another address is answered while one
                                 client holds many connections; that client gets at most `limit` answers
"""
from __future__ import annotations

import random
import struct

from dnslib import EDNS0, DNSRecord, EDNSOption

from tests.corpus import Case, unique

RCODES = {"NOERROR": 0, "FORMERR": 1, "SERVFAIL": 2, "NXDOMAIN": 3, "NOTIMP": 4, "REFUSED": 5}


def header(qid=0x1234, flags=0x0100, qd=1, an=0, ns=0, ar=0) -> bytes:
    return struct.pack("!6H", qid, flags, qd, an, ns, ar)


def wire_name(*labels: bytes) -> bytes:
    return b"".join(bytes([len(l)]) + l for l in labels) + b"\x00"


def question(name: bytes, qtype: int = 1, qclass: int = 1) -> bytes:
    return name + struct.pack("!2H", qtype, qclass)


def q(name: str, qtype: str | int = "A", qid: int = 0x1234) -> bytes:
    if isinstance(qtype, int):  # any number, known to dnslib or not
        return header(qid) + question(wire_name(*(l.encode() for l in name.split("."))), qtype)
    r = DNSRecord.question(name, qtype)
    r.header.id = qid
    return r.pack()


def with_edns(name: str, version: int = 0, udp: int = 1232, opts=()) -> bytes:
    r = DNSRecord.question(name, "A")
    r.header.id = 0x1234
    r.add_ar(EDNS0(udp_len=udp, version=version, opts=list(opts)))
    return r.pack()


def tcp(*messages: bytes) -> bytes:
    return b"".join(len(m).to_bytes(2, "big") + m for m in messages)


VICTIM = wire_name(b"www", b"victim", b"example")


def cases(seed: int = 11) -> list[Case]:
    rnd = random.Random(seed)
    out: list[Case] = []
    rc = lambda *names, empty=True: ("rcode", set(names), empty)
    # Not a full header, or not a query: dropped.
    for n in (1, 2, 5, 11):
        out.append(Case(f"udp-short-{n}", ("udp", header()[:n]), ("no-reply", None), "no full header: dropped"))
    out.append(Case("udp-qr-set", ("udp", header(flags=0x8100) + question(VICTIM)), ("no-reply", None),
                    "a response is never answered (no loops between servers)"))
    # Opcodes the lab does not implement.
    for op in (1, 2, 3, 4, 5, 6, 15):
        out.append(Case(f"udp-opcode-{op}", ("udp", header(flags=op << 11) + question(VICTIM)), rc("NOTIMP"),
                        "RFC 1035: opcodes other than QUERY get NOTIMP"))
    # Counts that lie or ask too much.
    for label, h in (("qd0", header(qd=0)), ("qd2", header(qd=2)), ("qd65535", header(qd=65535)),
                     ("an1", header(an=1)), ("ns1", header(ns=1)), ("ar2", header(ar=2)), ("ar65535", header(ar=65535))):
        out.append(Case(f"udp-counts-{label}", ("udp", h + question(VICTIM)), rc("FORMERR"), "counts that lie: FORMERR"))
    # Names that do not parse.
    bad_names = {
        "label-64": b"\x40" + b"a" * 64 + b"\x00",
        "name-over-255": b"".join(b"\x3f" + b"a" * 63 for _ in range(5)) + b"\x00",
        "pointer-loop": b"\xc0\x0c",
        "pointer-forward": b"\xc0\xff",
        "pointer-into-header": b"\xc0\x02",
        "reserved-label-bits-40": b"\x41abc\x00",
        "reserved-label-bits-80": b"\x81a\x00",
        "unterminated": b"\x03www\x06victim",
        "no-qtype": VICTIM,
        "half-qtype": VICTIM + b"\x00",
    }
    for label, name in bad_names.items():
        body = name + (b"\x00\x01\x00\x01" if label not in ("no-qtype", "half-qtype", "unterminated") else b"")
        # A pointer into the header happens to spell a one-label name there: outside the zones.
        expect = rc("FORMERR", "REFUSED") if label == "pointer-into-header" else rc("FORMERR")
        out.append(Case(f"udp-name-{label}", ("udp", header() + body), expect, "unparsable name: FORMERR"))
    # A wire label holding a dot is one label, not two (issue 13): never www.victim.example's answer.
    for label, labels in (("one-label-with-dots", (b"www.victim.example",)),
                          ("www.victim+example", (b"www.victim", b"example")),
                          ("www+victim.example", (b"www", b"victim.example")),
                          ("shop.customer+example", (b"shop.customer", b"example"))):
        out.append(Case(f"udp-dot-in-label-{label}", ("udp", header() + question(wire_name(*labels))),
                        rc("NXDOMAIN", "REFUSED", "FORMERR"),
                        "issue 13: a label containing a dot is not two labels"))
    for label, raw in (("nul", b"a\x00b"), ("space", b"a b"), ("ff", b"\xff\xfe"), ("slash", b"a/b")):
        out.append(Case(f"udp-odd-label-{label}", ("udp", header() + question(wire_name(raw, b"victim", b"example"))),
                        rc("NXDOMAIN", "FORMERR"), "no such name inside a lab zone"))
    # Zone transfers are not served over UDP (issue 13).
    for zone in ("victim.example", "saas.example"):
        for t in ("AXFR", "IXFR"):
            out.append(Case(f"udp-{t.lower()}-{zone}", ("udp", q(zone, t)), rc("REFUSED"),
                            "issue 13: AXFR/IXFR over UDP are refused"))
    # Types and classes.
    for t in ("ANY", 0, 65535, 65, 10, 255 + 1, 99):
        out.append(Case(f"udp-qtype-{t}", ("udp", q("www.victim.example", t)), rc("NOERROR", "NOTIMP", "FORMERR",
                                                                              "REFUSED", empty=False),
                        "any type: a reply, no crash"))
    for cls in (3, 4, 254, 255, 0):
        out.append(Case(f"udp-qclass-{cls}", ("udp", header() + question(VICTIM, 1, cls)), rc("REFUSED", "NOTIMP"),
                        "only class IN is served"))
    # Outside the lab zones: not an open resolver.
    for name in ("www.google.com", "example", "test", "localhost", "10.in-addr.arpa", "victim.example.evil.test"):
        out.append(Case(f"udp-outside-{name}", ("udp", q(name)), rc("REFUSED"), "not an open resolver: REFUSED"))
    out.append(Case("udp-root", ("udp", header() + question(b"\x00")), rc("REFUSED"), "the root is not a lab zone"))
    # EDNS.
    out += [
        Case("udp-edns-version-1", ("udp", with_edns("www.victim.example", version=1)), ("rcode", {"BADVERS"}, True),
             "RFC 6891: an unknown EDNS version gets BADVERS"),
        Case("udp-edns-udp-0", ("udp", with_edns("www.victim.example", udp=0)), ("address", "127.0.0.10"),
             "a UDP size under 512 means 512"),
        Case("udp-edns-udp-65535", ("udp", with_edns("www.victim.example", udp=65535)), ("address", "127.0.0.10"),
             "a huge UDP size is capped, still answered"),
        Case("udp-edns-unknown-option", ("udp", with_edns("www.victim.example", opts=[EDNSOption(65001, b"x" * 40)])),
             ("address", "127.0.0.10"), "unknown EDNS options are ignored"),
        Case("udp-edns-ecs-garbage", ("udp", with_edns("www.victim.example", opts=[EDNSOption(8, b"\xff" * 3)])),
             ("address", "127.0.0.10"), "a malformed client-subnet option is ignored"),
        Case("udp-mixed-case", ("udp", q("WwW.ViCtIm.ExAmPlE")), ("address", "127.0.0.10"),
             "0x20 case randomisation is answered (names are case-insensitive)"),
        Case("udp-trailing-garbage", ("udp", q("www.victim.example") + b"\x00" * 20), ("reply-or-drop", None),
             "trailing bytes after the question: no crash"),
        Case("udp-oversize-5000", ("udp", header() + question(VICTIM) + b"\x00" * 5000), rc("FORMERR"),
             "bigger than any honest query: FORMERR"),
    ]
    for i in range(20):
        size = rnd.choice((12, 13, 17, 29, 64, 300, 512, 600))
        pkt = bytes(rnd.randrange(256) for _ in range(size))
        out.append(Case(f"udp-random-{i}-{size}", ("udp", pkt), ("reply-or-drop", None), "random bytes: no crash"))
    # TCP framing.
    good = q("www.victim.example")
    out += [
        Case("tcp-prefix-0", ("tcp", b"\x00\x00"), ("tcp-closed", 2.0), "a zero length prefix: closed"),
        Case("tcp-prefix-11", ("tcp", tcp(header()[:11])), ("tcp-closed", 2.0), "a message shorter than a header"),
        Case("tcp-prefix-65535-short", ("tcp", b"\xff\xff" + b"\x00" * 100), ("tcp-closed", 2.0),
             "a prefix announcing more than comes, then EOF"),
        Case("tcp-one-byte", ("tcp", b"\x00"), ("tcp-closed", 2.0), "half a prefix, then EOF"),
        Case("tcp-two-pipelined", ("tcp", tcp(good, q("app.saas.example", qid=7))), ("tcp-replies", 2),
             "RFC 7766: pipelined queries on one connection are all answered"),
        Case("tcp-ten-pipelined", ("tcp", tcp(*[q("www.victim.example", qid=i) for i in range(10)])), ("tcp-replies", 10),
             "RFC 7766: pipelined queries on one connection are all answered"),
        Case("tcp-good-then-garbage", ("tcp", tcp(good) + b"\x00\x05abc"), ("tcp-replies", 1),
             "a good query is answered before the garbage closes the connection"),
        Case("tcp-formerr", ("tcp", tcp(header(qd=2) + question(VICTIM))), ("tcp-replies", 1), "FORMERR over TCP too"),
        Case("tcp-axfr", ("tcp", tcp(q("victim.example", "AXFR"))), ("tcp-replies-or-closed", None),
             "a zone transfer over TCP: answered or refused, no crash"),
        Case("tcp-byte-by-byte", ("tcp-slow", tcp(good)), ("tcp-replies", 1), "a query arriving a byte at a time"),
        Case("tcp-idle", ("tcp-idle",), ("tcp-closed", 3.0),
             "issue 8: a TCP client that sends nothing is dropped after the idle timeout"),
        Case("tcp-slot-flood", ("tcp-flood", 140, "127.0.0.88"), ("served-while-flooded", 4),
             "issue 8: one client holding 140 connections: legitimate TCP queries are still answered"),
    ]
    return unique(out)
