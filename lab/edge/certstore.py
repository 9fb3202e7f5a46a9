"""Certificates by SNI: exact name first, then the one wildcard that may cover it.

Serves only what `policy.certificate_for` allows (zones, active custom hostnames) and
never mints for anything else; an SNI it holds nothing for gets no certificate at all. The SNI is
read with `hostnorm.sni_name`, the policy's own normalisation: the certificate is always
the one for the name the policy routes on, or none. The zones' certificates are loaded with
the world; an active custom hostname's at its first handshake (the world's hostname index
says, by name, whether it is still active), and the newest `CUSTOM_CONTEXTS` are kept, so
neither the start nor the memory grows with the number of custom hostnames.

The TLS settings both engines share are here too: ALPN, TLS 1.2 suites, no tickets.
"""
from __future__ import annotations

import ssl
from typing import NamedTuple

from lab.hostnorm import HostError, sni_name
from lab.pki import LabCA
from lab.policy import certificate_for
from lab.topology import World

ALPN = ["h2", "http/1.1"]
MIN_VERSION = ssl.TLSVersion.TLSv1_2
# TLS 1.2 offers forward-secret AEAD suites only (TLS 1.3's are all AEAD already).
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
CUSTOM_CONTEXTS = 1024  # custom hostnames' contexts kept (~20 KB each); one beyond is made again when asked


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
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class CertStore:
    # SNIs as sent -> their normalised name. Only the normalisation is remembered (a pure
    # function of the bytes): which certificate a name gets follows the hostname index live.
    MEMO = 4096

    def __init__(self, ca: LabCA) -> None:
        self.ca = ca
        self.world: World | None = None
        self._names: dict[bytes | str, str] = {}
        self._zones: dict[tuple[str, ...], ssl.SSLContext] = {}
        self._custom: dict[tuple[str, ...], ssl.SSLContext] = {}  # oldest first

    def load(self, world: World) -> None:
        """Serve what `world` allows from now on; the zones' certificates at once (issuing any missing)."""
        zones = {}
        for z in world.zones:
            names = (z.name, f"*.{z.name}")
            zones[names] = self._zones.get(names) or self._context(names)
        self.world, self._zones = world, zones

    def _context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        leaf = self.ca.leaf(names)
        return server_context(str(leaf.cert_path), str(leaf.key_path))

    def lookup(self, sni: bytes | str | None) -> Cert | None:
        """The certificate for an SNI as sent (raw bytes or text); None if it names none."""
        if sni is None:
            return None
        name = self._names.get(sni)
        if name is None:
            try:
                name = sni_name(sni)
            except HostError:
                return None
            if len(self._names) >= self.MEMO:
                self._names.clear()  # many names (a wildcard's): the next lookups work them out again
            self._names[sni] = name
        names = certificate_for(self.world, name) if self.world is not None else None
        if names is None:
            return None
        ctx = self._zones.get(names)
        if ctx is None:
            ctx = self._custom.pop(names, None) or self._context(names)
            self._custom[names] = ctx  # the newest last
            if len(self._custom) > CUSTOM_CONTEXTS:
                del self._custom[next(iter(self._custom))]
        return Cert(name, names, ctx)

    def names(self) -> list[tuple[str, ...]]:
        """The certificates held now: the zones', and the custom hostnames' asked for lately."""
        return [*self._zones, *self._custom]


def refusal(sni: bytes | str | None) -> str:
    """Why an SNI got no certificate, as `tls.error` tells it."""
    if sni is None:
        return "unrecognized_name: no SNI"
    try:
        sni_name(sni)
    except HostError as e:
        return f"unrecognized_name: {e}"
    return "unrecognized_name: no certificate for this SNI"
