"""The lab CA: real handshakes, real verifiers, and the name constraint that keeps it harmless."""
import os
import socket
import ssl
import stat
import subprocess
import threading

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from lab.pki import LabCA
from tests.conftest import need


def _write_leaf(ca, tmp_path, names):
    cert, key = ca.sign(names)
    cert_path, key_path = tmp_path / "leaf.pem", tmp_path / "leaf.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def _handshake(ca, cert_path, key_path, server_name):
    """A throwaway TLS server with the leaf; a Python client that trusts only the lab CA."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(cert_path, key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            with srv_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    cli = ssl.create_default_context(cafile=str(ca.cert_path))
    try:
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with cli.wrap_socket(raw, server_hostname=server_name) as tls:
                return tls.getpeercert()
    finally:
        listener.close()
        t.join(2)


def test_ca_is_name_constrained_root(ca):
    bc = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == 0
    assert ca.cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    nc = ca.cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert nc.critical
    assert {s.value for s in nc.value.permitted_subtrees if isinstance(s, x509.DNSName)} == {"example", "test"}


def test_private_keys_are_0600(ca):
    leaf = ca.leaf(["www.victim.example"])
    for path in (ca.dir / "ca.key", leaf.key_path):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_python_ssl_handshake_with_lab_leaf(ca):
    leaf = ca.leaf(["www.victim.example", "*.victim.example"])
    peer = _handshake(ca, leaf.cert_path, leaf.key_path, "www.victim.example")
    assert ("DNS", "www.victim.example") in peer["subjectAltName"]


def test_wildcard_leaf_covers_one_label(ca):
    leaf = ca.leaf(["*.saas.example"])
    assert _handshake(ca, leaf.cert_path, leaf.key_path, "app.saas.example")
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(ca, leaf.cert_path, leaf.key_path, "a.b.saas.example")


@pytest.mark.parametrize("name", ["www.google.com", "www.example.com.evil"])
def test_leaf_outside_lab_tlds_rejected_by_python_ssl(ca, tmp_path, name):
    cert_path, key_path = _write_leaf(ca, tmp_path, [name])
    with pytest.raises(ssl.SSLCertVerificationError) as e:
        _handshake(ca, cert_path, key_path, name)
    assert "name constraint" in str(e.value).lower() or "permitted" in str(e.value).lower()


def test_openssl_verify_accepts_lab_leaf_and_rejects_outside(ca, tmp_path):
    openssl = need("openssl")
    leaf = ca.leaf(["shop.customer.example"])
    ok = subprocess.run([openssl, "verify", "-CAfile", str(ca.cert_path), str(leaf.cert_path)], capture_output=True, text=True)
    assert ok.returncode == 0 and ": OK" in ok.stdout
    bad, _ = _write_leaf(ca, tmp_path, ["www.google.com"])
    no = subprocess.run([openssl, "verify", "-CAfile", str(ca.cert_path), str(bad)], capture_output=True, text=True)
    assert no.returncode != 0
    assert "name constraint" in (no.stdout + no.stderr).lower() or "permitted" in (no.stdout + no.stderr).lower()


def test_curl_accepts_lab_leaf(ca):
    curl = need("curl")
    leaf = ca.leaf(["www.victim.example"])
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(leaf.cert_path, leaf.key_path)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        with srv_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.recv(65536)
            tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    out = subprocess.run([curl, "-sS", "--cacert", str(ca.cert_path), "--resolve", f"www.victim.example:{port}:127.0.0.1",
                          f"https://www.victim.example:{port}/"], capture_output=True, text=True, timeout=10)
    listener.close()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "ok"


def test_reused_across_runs_and_reissued_when_broken(tmp_path):
    messages = []
    first = LabCA.open(tmp_path, log=messages.append)
    leaf = first.leaf(["www.victim.example"])
    fingerprint = leaf.cert_path.read_bytes()
    again = LabCA.open(tmp_path, log=messages.append)
    assert again.cert == first.cert
    assert again.leaf(["www.victim.example"]).cert_path.read_bytes() == fingerprint
    leaf.cert_path.write_text("garbage")
    again.leaf(["www.victim.example"])
    assert any("unreadable; re-issued" in m for m in messages)
    (tmp_path / "ca.key").write_text("garbage")
    LabCA.open(tmp_path, log=messages.append)
    assert any("lab CA unreadable" in m for m in messages)


def test_expired_leaf_is_reissued(tmp_path):
    messages = []
    ca = LabCA.open(tmp_path, log=messages.append)
    cert, key = ca.sign(["a.example"], days=0)
    (tmp_path / "a.example.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "a.example.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))
    ca.leaf(["a.example"])
    assert any("expired; re-issued" in m for m in messages)
