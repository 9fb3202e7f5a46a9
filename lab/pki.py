"""The lab CA and its leaves, cached under certs/.

The root is name-constrained to the lab TLDs (and loopback addresses), so trusting it
can never vouch for a real site. Keys are made at run time, written 0600, and reused
while valid; anything missing, expired, unreadable or from another CA is re-issued with
a message saying why.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS = 3650
LEAF_DAYS = 30
RENEW_BEFORE = dt.timedelta(days=1)
DEFAULT_TLDS = ("example", "test")
LOOPBACK_NETS = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))

Log = Callable[[str], None]


class PKIError(RuntimeError):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _write_private(path: Path, data: bytes) -> None:
    # Create with 0600 from the start: a chmod after writing leaves a window.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def file_stem(names: list[str] | tuple[str, ...]) -> str:
    return names[0].replace("*", "_wildcard")


def _san(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


@dataclass(frozen=True)
class Leaf:
    names: tuple[str, ...]
    cert_path: Path
    key_path: Path


def describe(cert: x509.Certificate) -> dict:
    """Subject, SANs, expiry and fingerprint: what `certs show` and events report."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(v) for v in sans.get_values_for_type(x509.DNSName)]
        names += [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": names,
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": cert.fingerprint(hashes.SHA256()).hex(":").upper(),
    }


class LabCA:
    """`LabCA.open("certs")` -> a usable CA; `ca.leaf(["a.example"])` -> files to serve."""

    def __init__(self, directory: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, log: Log):
        self.dir = directory
        self.key = key
        self.cert = cert
        self.log = log

    @property
    def tlds(self) -> set[str]:
        """The DNS names the root's name constraints permit (the lab TLDs)."""
        return self._tlds_of(self.cert)

    @property
    def cert_path(self) -> Path:
        return self.dir / "ca.pem"

    @classmethod
    def open(cls, directory: str | Path = "certs", tlds: tuple[str, ...] = DEFAULT_TLDS,
             log: Log = lambda msg: None) -> "LabCA":
        d = Path(directory)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise PKIError(f"{d}: cannot create certificate directory: {e.strerror}") from None
        cert_path, key_path = d / "ca.pem", d / "ca.key"
        problem = None
        if not cert_path.exists() or not key_path.exists():
            problem = None if not cert_path.exists() and not key_path.exists() else "incomplete"
        else:
            try:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                key = serialization.load_pem_private_key(key_path.read_bytes(), None)
                if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
                    problem = "key does not match certificate"
                elif cert.not_valid_after_utc - RENEW_BEFORE < _now():
                    problem = "expired"
                elif cls._tlds_of(cert) != set(tlds):
                    problem = "name constraints differ from the world's TLDs"
                else:
                    os.chmod(key_path, 0o600)
                    return cls(d, key, cert, log)
            except (ValueError, TypeError, OSError):
                problem = "unreadable"
        if problem:
            log(f"{cert_path}: lab CA {problem}; issuing a new one (re-issuing every leaf)")
            for old in d.glob("*.pem"):
                old.unlink()
        return cls._create(d, tlds, log)

    @staticmethod
    def _tlds_of(cert: x509.Certificate) -> set[str]:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
        return {str(s.value) for s in nc.permitted_subtrees or [] if isinstance(s, x509.DNSName)}

    @classmethod
    def _create(cls, d: Path, tlds: tuple[str, ...], log: Log) -> "LabCA":
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sni-lab"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "sni-lab root CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        now = _now()
        permitted = [x509.DNSName(t) for t in tlds] + [x509.IPAddress(n) for n in LOOPBACK_NETS]
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=None), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(d / "ca.key", _key_pem(key))
        (d / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        log(f"{d / 'ca.pem'}: new lab CA, name-constrained to {', '.join('.' + t for t in tlds)}")
        return cls(d, key, cert, log)

    def sign(self, names: list[str] | tuple[str, ...], key: ec.EllipticCurvePrivateKey | None = None,
             days: int = LEAF_DAYS) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Sign a server leaf for `names` (no check against the constraints: that is the verifier's job)."""
        if not names:
            raise PKIError("a leaf needs at least one name")
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key

    def leaf(self, names: list[str] | tuple[str, ...]) -> Leaf:
        """The cached leaf for exactly these names, issued (again) when it is not usable."""
        names = tuple(names)
        stem = file_stem(names)
        cert_path, key_path = self.dir / f"{stem}.pem", self.dir / f"{stem}.key"
        problem = self._leaf_problem(names, cert_path, key_path)
        if problem is None:
            return Leaf(names, cert_path, key_path)
        if problem != "missing":
            self.log(f"{cert_path}: {problem}; re-issued")
        cert, key = self.sign(names)
        _write_private(key_path, _key_pem(key))
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Leaf(names, cert_path, key_path)

    def _leaf_problem(self, names: tuple[str, ...], cert_path: Path, key_path: Path) -> str | None:
        if not cert_path.exists() or not key_path.exists():
            return "missing"
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        except (ValueError, TypeError, OSError):
            return "unreadable"
        if key.public_key() != cert.public_key():
            return "key does not match certificate"
        if cert.not_valid_after_utc - RENEW_BEFORE < _now():
            return "expired"
        try:
            self.key.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        except (InvalidSignature, TypeError):
            return "issued by another CA"
        if describe(cert)["sans"] != list(names):
            return "names differ"
        if os.stat(key_path).st_mode & 0o077:
            os.chmod(key_path, 0o600)
        return None

    def leaves(self) -> list[Path]:
        return sorted(p for p in self.dir.glob("*.pem") if p.name != "ca.pem")
