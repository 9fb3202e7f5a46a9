"""The ClientHello, read before any TLS library sees it: which name the client asked for.

Both engines decide the certificate from these bytes, so the SNI is the one of *this*
handshake (a resumed TLS 1.2 session would otherwise report the name it was made for),
and a name that is not ASCII is refused here, before a TLS library tries to decode it.
Pure: bytes in, a value out; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass

HANDSHAKE = 22
CLIENT_HELLO = 1
SERVER_NAME = 0
HOST_NAME = 0
MAX_RECORD = 1 << 14
MAX_HELLO = 1 << 16  # larger than any real ClientHello (post-quantum key shares included)
MAX_RECORDS = 8  # real clients send one record, two at most for a very large hello

# Alert descriptions (RFC 8446 §6)
DECODE_ERROR = 50
UNRECOGNIZED_NAME = 112


class HelloError(ValueError):
    """The first bytes are not a ClientHello the edge can answer; `alert` is what to send, if anything."""

    def __init__(self, reason: str, alert: int | None = DECODE_ERROR) -> None:
        super().__init__(reason)
        self.reason = reason
        self.alert = alert


@dataclass(frozen=True)
class Hello:
    sni: bytes | None  # the host_name as sent, undecoded; None without the extension


def client_hello(data: bytes) -> Hello | None:
    """The ClientHello at the start of `data`, or None while more bytes are needed.

    Cheap to call again on every read: it walks record headers and copies nothing until
    the whole ClientHello is there.
    """
    if not data:
        return None
    if data[0] != HANDSHAKE:
        raise HelloError("the client did not start TLS", alert=None)
    if len(data) < 9:
        return None
    if data[1] != 3:
        raise HelloError("the client did not start TLS", alert=None)
    if int.from_bytes(data[3:5], "big") < 4:
        raise HelloError("ClientHello header split over records")
    if data[5] != CLIENT_HELLO:
        raise HelloError(f"handshake message {data[5]} where a ClientHello belongs")
    needed = 4 + int.from_bytes(data[6:9], "big")
    if needed > MAX_HELLO:
        raise HelloError(f"ClientHello of {needed - 4} bytes")
    records, have, pos = [], 0, 0
    while have < needed:
        if len(records) == MAX_RECORDS:
            raise HelloError(f"ClientHello split over more than {MAX_RECORDS} records")
        if len(data) < pos + 5:
            return None
        ctype, major, length = data[pos], data[pos + 1], int.from_bytes(data[pos + 3:pos + 5], "big")
        if ctype != HANDSHAKE or major != 3:
            raise HelloError("ClientHello split by another record")
        if length == 0 or length > MAX_RECORD:
            raise HelloError(f"handshake record of {length} bytes")
        if len(data) < pos + 5 + length:
            return None
        records.append((pos + 5, pos + 5 + length))
        have += length
        pos += 5 + length
    body = b"".join(data[start:end] for start, end in records)
    return Hello(sni=_sni(body[4:needed]))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise HelloError("truncated ClientHello")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def number(self, n: int) -> int:
        return int.from_bytes(self.take(n), "big")

    def vector(self, n: int) -> bytes:
        return self.take(self.number(n))

    def done(self) -> bool:
        return self.pos == len(self.data)


def _sni(body: bytes) -> bytes | None:
    r = _Reader(body)
    r.take(2 + 32)  # legacy_version, random
    r.vector(1)  # legacy_session_id
    r.vector(2)  # cipher_suites
    r.vector(1)  # legacy_compression_methods
    if r.done():
        return None  # no extensions at all
    extensions = _Reader(r.vector(2))
    if not r.done():
        raise HelloError("bytes after the ClientHello's extensions")
    sni = None
    seen = set()
    while not extensions.done():
        kind, data = extensions.number(2), extensions.vector(2)
        if kind in seen:
            raise HelloError(f"extension {kind} twice")
        seen.add(kind)
        if kind == SERVER_NAME:
            sni = server_name(data)
    return sni


def server_name(ext: bytes) -> bytes:
    """The host_name of a server_name extension's body (RFC 6066 §3: exactly one, as OpenSSL reads it)."""
    names = _Reader(_Reader(ext).vector(2))
    if len(ext) != 2 + len(names.data):
        raise HelloError("bytes after the server_name list")
    if names.number(1) != HOST_NAME:
        raise HelloError("server_name of an unknown type")
    name = names.vector(2)
    if not names.done():
        raise HelloError("more than one server_name")
    return name  # empty, NUL or too long: not a host name, refused with 112 like any other


def shown(sni: bytes | None) -> str | None:
    """An SNI as events and logs show it: as sent, bytes outside ASCII escaped."""
    return None if sni is None else sni.decode("ascii", "backslashreplace")


def alert(description: int) -> bytes:
    """A fatal alert record, sent in the clear: nothing has been negotiated yet."""
    return bytes([21, 3, 3, 0, 2, 2, description])
