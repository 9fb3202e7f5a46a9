"""Host normalisation: the one function every part of the lab compares names with.

lower-case, strip one trailing dot, strip a `:port`, IDN to its A-label. IP literals
stay IP literals (IPv6 without brackets). Pure; no I/O.
"""
from __future__ import annotations

import ipaddress
import re
from functools import lru_cache

import idna

_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


class HostError(ValueError):
    pass


@lru_cache(maxsize=4096)
def normalize(value: str, allow_wildcard: bool = False) -> str:
    """Normalise a host as sent in Host, :authority, SNI or a config file."""
    host = value.strip()
    if not host:
        raise HostError("empty host")
    if host.startswith("["):  # [v6] or [v6]:port
        end = host.find("]")
        if end < 0:
            raise HostError(f"unclosed IPv6 literal: {value!r}")
        rest = host[end + 1:]
        if rest and not re.fullmatch(r":\d{1,5}", rest):
            raise HostError(f"bad port in {value!r}")
        try:
            return str(ipaddress.IPv6Address(host[1:end]))
        except ValueError:
            raise HostError(f"bad IPv6 literal: {value!r}") from None
    if host.count(":") == 1:
        host, _, port = host.partition(":")
        if not port.isdigit() or len(port) > 5:
            raise HostError(f"bad port in {value!r}")
    elif ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise HostError(f"bad host: {value!r}") from None
    if host.endswith("."):
        host = host[:-1]
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    host = host.lower()
    if not host.isascii():
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise HostError(f"bad internationalised name {value!r}: {e}") from None
    labels = host.split(".")
    for i, label in enumerate(labels):
        if label == "*" and i == 0 and allow_wildcard and len(labels) > 1:
            continue
        if not _LABEL.match(label):
            raise HostError(f"bad host: {value!r}")
    if len(host) > 253:
        raise HostError("host longer than 253 characters")
    return host


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def wildcard_of(host: str) -> str | None:
    """`a.b.c` -> `*.b.c`: the one wildcard name that may cover `host` (RFC 6125)."""
    _, dot, parent = host.partition(".")
    return f"*.{parent}" if dot and "." in parent else None


def wire_host(value: str) -> str:
    """A host as a request carries it (Host, :authority, an absolute-form target), normalised.

    On the wire a host is ASCII (RFC 9112 §3.2: uri-host; clients send IDNs as A-labels).
    A byte outside ASCII is refused, never IDNA-mapped: UTS 46 maps a soft hyphen or an
    ordinal indicator onto a protected name, and the origin would see the raw bytes.
    """
    if not value.isascii():
        raise HostError(f"host {value.encode('latin-1', 'backslashreplace').decode('ascii', 'backslashreplace')!r} "
                        "is not ASCII")
    return normalize(value)


def sni_name(sni: bytes | str) -> str:
    """The host an SNI asks for, as `normalize` names it; HostError if the SNI is no host name.

    An SNI is a bare DNS name (RFC 6066 §3): ASCII (IDNs as A-labels), no port, no IP
    literal, no `*` label. Anything else names no certificate, so the edge never has to
    guess which one it meant.
    """
    if isinstance(sni, bytes):
        if not sni.isascii():
            raise HostError(f"SNI {sni.decode('ascii', 'backslashreplace')!r} is not ASCII")
        sni = sni.decode("ascii")
    if not sni.isascii() or ":" in sni or "[" in sni or sni != sni.strip():
        raise HostError(f"SNI {sni!r} is not a host name")
    host = normalize(sni)
    if is_ip(host):
        raise HostError(f"SNI {sni!r} is an IP address")
    return host
