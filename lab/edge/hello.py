"""The ClientHello, read before any TLS library sees it: which name the client asked for.

Both engines decide the certificate from these bytes, so the SNI is the one of *this*
handshake (a resumed TLS 1.2 session would otherwise report the name it was made for),
and a name that is not ASCII is refused here, before a TLS library tries to decode it.
Pure: bytes in, a value out; no I/O.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

HANDSHAKE = 22
CLIENT_HELLO = 1
SERVER_NAME = 0
HOST_NAME = 0
MAX_RECORD = 1 << 14
MAX_HELLO = 1 << 16  # larger than any real ClientHello (post-quantum key shares included)
MAX_RECORDS = 8  # real clients send one record, two at most for a very large hello

_EXTENSION = struct.Struct(">HH").unpack_from  # an extension's type and length

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
    the whole ClientHello is there. It runs once per connection before any TLS work, so it
    reads by index, not through a reader object.
    """
    if not data:
        return None
    if data[0] != HANDSHAKE:
        raise HelloError("the client did not start TLS", alert=None)
    if len(data) < 9:
        return None
    if data[1] != 3:
        raise HelloError("the client did not start TLS", alert=None)
    if (data[3] << 8 | data[4]) < 4:
        raise HelloError("ClientHello header split over records")
    if data[5] != CLIENT_HELLO:
        raise HelloError(f"handshake message {data[5]} where a ClientHello belongs")
    needed = 4 + (data[6] << 16 | data[7] << 8 | data[8])
    if needed > MAX_HELLO:
        raise HelloError(f"ClientHello of {needed - 4} bytes")
    records, have, pos, size = [], 0, 0, len(data)
    while have < needed:
        if len(records) == MAX_RECORDS:
            raise HelloError(f"ClientHello split over more than {MAX_RECORDS} records")
        if size < pos + 5:
            return None
        if data[pos] != HANDSHAKE or data[pos + 1] != 3:
            raise HelloError("ClientHello split by another record")
        length = data[pos + 3] << 8 | data[pos + 4]
        if length == 0 or length > MAX_RECORD:
            raise HelloError(f"handshake record of {length} bytes")
        if size < pos + 5 + length:
            return None
        records.append((pos + 5, pos + 5 + length))
        have += length
        pos += 5 + length
    body = bytes(data[5:5 + needed]) if len(records) == 1 else b"".join(data[s:e] for s, e in records)[:needed]
    return Hello(sni=_sni(body, 4, needed))


def _vector(data: bytes, pos: int, width: int, end: int) -> int:
    """Where the vector at `pos` (its length in `width` bytes, 1 or 2) ends; HelloError if past `end`."""
    if pos + width > end:
        raise HelloError("truncated ClientHello")
    stop = pos + width + (data[pos] if width == 1 else data[pos] << 8 | data[pos + 1])
    if stop > end:
        raise HelloError("truncated ClientHello")
    return stop


def _sni(body: bytes, pos: int, end: int) -> bytes | None:
    """The host_name of the ClientHello body `body[pos:end]`, None without a server_name extension."""
    pos += 2 + 32  # legacy_version, random
    if pos > end:
        raise HelloError("truncated ClientHello")
    pos = _vector(body, pos, 1, end)  # legacy_session_id
    pos = _vector(body, pos, 2, end)  # cipher_suites
    pos = _vector(body, pos, 1, end)  # legacy_compression_methods
    if pos == end:
        return None  # no extensions at all
    stop = _vector(body, pos, 2, end)
    if stop != end:
        raise HelloError("bytes after the ClientHello's extensions")
    pos += 2
    sni = None
    seen = set()
    while pos < stop:
        if pos + 4 > stop:
            raise HelloError("truncated ClientHello")
        kind, length = _EXTENSION(body, pos)
        pos += 4 + length
        if pos > stop:
            raise HelloError("truncated ClientHello")
        if kind in seen:
            raise HelloError(f"extension {kind} twice")
        seen.add(kind)
        if kind == SERVER_NAME:
            sni = server_name(body[pos - length:pos])
    return sni


def server_name(ext: bytes) -> bytes:
    """The host_name of a server_name extension's body (RFC 6066 §3: exactly one, as OpenSSL reads it)."""
    end = len(ext)
    names_end = _vector(ext, 0, 2, end)
    if names_end != end:
        raise HelloError("bytes after the server_name list")
    if end < 3:
        raise HelloError("truncated ClientHello")
    if ext[2] != HOST_NAME:
        raise HelloError("server_name of an unknown type")
    name_end = _vector(ext, 3, 2, end)
    if name_end != end:
        raise HelloError("more than one server_name")
    return bytes(ext[5:name_end])  # empty, NUL or too long: not a host name, refused with 112 like any other


def shown(sni: bytes | None) -> str | None:
    """An SNI as events and logs show it: as sent, bytes outside ASCII escaped."""
    return None if sni is None else sni.decode("ascii", "backslashreplace")


def alert(description: int) -> bytes:
    """A fatal alert record, sent in the clear: nothing has been negotiated yet."""
    return bytes([21, 3, 3, 0, 2, 2, description])
