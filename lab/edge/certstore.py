"""Certificates by SNI: exact name first, then the one wildcard that may cover it.

Holds only what `policy.certificate_names` allows (zones, active custom hostnames) and
never mints on demand; an SNI it holds nothing for gets no certificate at all.
"""
from __future__ import annotations

import ssl

from lab.hostnorm import wildcard_of
from lab.pki import LabCA
from lab.policy import certificate_names
from lab.topology import World

ALPN = ["h2", "http/1.1"]


def server_context(cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(ALPN)
    # No resumption: a resumed session skips the SNI callback, and the lab's point is that
    # every connection's certificate is chosen by its SNI, in front of the audience.
    ctx.options |= ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class CertStore:
    def __init__(self, ca: LabCA) -> None:
        self.ca = ca
        self._by_names: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._index: dict[str, tuple[tuple[str, ...], ssl.SSLContext]] = {}

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
        self._by_names, self._index = contexts, index

    def lookup(self, sni: str | None) -> tuple[tuple[str, ...], ssl.SSLContext] | None:
        if not sni:
            return None
        sni = sni.lower().rstrip(".")
        found = self._index.get(sni)
        if found is None:
            wildcard = wildcard_of(sni)
            found = self._index.get(wildcard) if wildcard else None
        return found

    def names(self) -> list[tuple[str, ...]]:
        return list(self._by_names)
