"""Certificates by SNI: exact name first, then the one wildcard that may cover it.

Holds only what `policy.certificate_names` allows (zones, active custom hostnames) and
never mints on demand; an SNI it holds nothing for gets no certificate at all. The SNI is
read with `hostnorm.sni_name`, the policy's own normalisation: the certificate is always
the one for the name the policy routes on, or none.

The TLS settings both engines share are here too: ALPN, TLS 1.2 suites, no tickets.
"""
from __future__ import annotations

import ssl
from typing import NamedTuple

from lab.hostnorm import HostError, sni_name, wildcard_of
from lab.pki import LabCA
from lab.policy import certificate_names
from lab.topology import World

ALPN = ["h2", "http/1.1"]
MIN_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.2 offers forward-secret AEAD suites only (TLS 1.3's are all AEAD already).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


class Cert(NamedTuple):
    name: str  # the SNI as the policy names it
    names: tuple[str, ...]  # the certificate's names
    context: ssl.SSLContext


def server_context(cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = MIN_VERSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.set_alpn_protocols(ALPN)
    # No tickets in any version. TLS 1.2 session IDs have no off switch in the stdlib:
    # lab.edge.tls keeps one session cache per listener and name instead.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    # As nginx: a client cannot make the server redo a handshake (OpenSSL 3 refuses it by
    # default, 1.1.1 does not), so a connection adds at most one session to a cache.
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class CertStore:
    MEMO = 4096  # SNIs as sent, remembered with their certificate until the next load

    def __init__(self, ca: LabCA) -> None:
        self.ca = ca
        self._by_names: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._index: dict[str, tuple[tuple[str, ...], ssl.SSLContext]] = {}
        self._memo: dict[bytes | str, Cert] = {}

    def load(self, world: World) -> None:
        """Hold exactly the certificates the world allows now (issuing any that are missing)."""
        wanted = certificate_names(world)
        contexts = {}
        for names in wanted:
            ctx = self._by_names.get(names)
            if ctx is None:
                leaf = self.ca.leaf(names)
                ctx = server_context(str(leaf.cert_path), str(leaf.key_path))
            contexts[names] = ctx
        index = {}
        for names, ctx in contexts.items():
            for name in names:
                index.setdefault(name, (names, ctx))
        self._by_names, self._index, self._memo = contexts, index, {}

    def lookup(self, sni: bytes | str | None) -> Cert | None:
        """The certificate for an SNI as sent (raw bytes or text); None if it names none."""
        if sni is None:
            return None
        cert = self._memo.get(sni)
        if cert is not None:
            return cert
        try:
            name = sni_name(sni)
        except HostError:
            return None
        found = self._index.get(name)
        if found is None:
            wildcard = wildcard_of(name)
            found = self._index.get(wildcard) if wildcard else None
        if found is None:
            return None
        if len(self._memo) >= self.MEMO:
            self._memo.clear()  # many names (a wildcard's): the next lookups work it out again
        cert = self._memo[sni] = Cert(name, *found)
        return cert

    def names(self) -> list[tuple[str, ...]]:
        return list(self._by_names)


def refusal(sni: bytes | str | None) -> str:
    """Why an SNI got no certificate, as `tls.error` tells it."""
    if sni is None:
        return "unrecognized_name: no SNI"
    try:
        sni_name(sni)
    except HostError as e:
        return f"unrecognized_name: {e}"
    return "unrecognized_name: no certificate for this SNI"
