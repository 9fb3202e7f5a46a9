"""The edge's TLS on both engines, checked with openssl s_client and real sockets.

The certificate follows the name the policy routes on (or the handshake fails with 112),
sessions never resume across listeners or names, TLS 1.2 offers AEAD suites only, the
handshake timeout and the connection caps come from `world.limits`.
"""
import asyncio
import dataclasses
import logging
import re
import ssl
import subprocess
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509

from lab.edge.admission import Refusals
from lab.run import Lab
from tests.conftest import NATIVE_ONLY, need

# The async tests share the module's lab, so its loop too (a module-wide mark would also hit the one sync test).
in_lab_loop = pytest.mark.asyncio(loop_scope="module")
ROOT = Path(__file__).resolve().parent.parent

VICTIM = ["victim.example", "*.victim.example"]
SAAS = ["saas.example", "*.saas.example"]
SAAS2 = ["saas2.example", "*.saas2.example"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(engine, world, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"tls-{engine}")
    async with Lab(world.with_free_ports(), tmp / "certs", engine=engine, state_dir=tmp / "state",
                   verify_interval=3600) as running:
        yield running


def with_limits(lab, **changes):
    lab.set_world(dataclasses.replace(lab.world, limits=dataclasses.replace(lab.world.limits, **changes)))


@dataclasses.dataclass
class Handshake:
    text: str
    cert_names: list[str] | None  # None: no certificate came
    response: bytes

    @property
    def alert(self) -> int | None:
        m = re.search(r"alert number (\d+)", self.text)
        return int(m.group(1)) if m else None

    def line(self, prefix: str) -> str | None:
        return next((l.strip() for l in self.text.splitlines() if l.strip().startswith(prefix)), None)


async def s_client(lab, listener: str, sni: bytes | str | None, *args: str, request: bytes = b"") -> Handshake:
    """openssl s_client to a listener; `request` is written after the handshake, then the answer read to EOF."""
    l = lab.world.listener_by_name[listener]
    cmd = [need("openssl"), "s_client", "-connect", f"{l.host}:{l.port}", "-CAfile", str(lab.ca.cert_path), *args]
    cmd += ["-noservername"] if sni is None else ["-servername", sni]  # bytes go to argv as they are
    if request:
        cmd.append("-ign_eof")
    res = await asyncio.to_thread(subprocess.run, cmd, input=request, capture_output=True, timeout=15)
    out = res.stdout.decode("latin-1") + res.stderr.decode("latin-1")
    names = None
    pem = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", out, re.S)
    if pem:
        cert = x509.load_pem_x509_certificate(pem.group(0).encode())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)
    body = res.stdout.split(b"HTTP/1.", 1)
    return Handshake(out, names, b"HTTP/1." + body[1] if len(body) > 1 else b"")


# ---- SNI: the certificate of exactly the name the policy routes on ------------------------

# SNI as sent -> the certificate's names and the host the policy routes on, or None: alert 112.
SNI_FORMS = [
    # every SNI of the catalog (test_every_catalog_sni_is_covered keeps this list whole)
    ("www.victim.example", VICTIM, "www.victim.example"),
    ("victim.example", VICTIM, "victim.example"),
    ("other.victim.example", VICTIM, "other.victim.example"),
    ("shop.victim.example", VICTIM, "shop.victim.example"),
    ("app.saas.example", SAAS, "app.saas.example"),
    ("app.saas2.example", SAAS2, "app.saas2.example"),
    ("shop.customer.example", ["shop.customer.example"], "shop.customer.example"),
    ("nothing.example", None, None),
    ("www.newshop.test", None, None),  # pending in its scenarios: no certificate in the default world
    ("app.saas3.example", None, None),  # a zone only added at run time (new-v1-zone-refused)
    (None, None, None),  # no SNI (the catalog's sni = "")
    # forms the policy normalises: case, one trailing dot, an IDN's A-label
    ("WWW.Victim.EXAMPLE", VICTIM, "www.victim.example"),
    ("www.victim.example.", VICTIM, "www.victim.example"),
    ("xn--bcher-kva.victim.example", VICTIM, "xn--bcher-kva.victim.example"),
    # forms that are no host name the policy would route as one
    ("www.victim.example..", None, None),
    ("www..victim.example", None, None),
    ("*.victim.example", None, None),
    ("a.b.victim.example", None, None),  # a wildcard covers one label
    ("www.victim.example:443", None, None),
    ("127.0.0.10", None, None),
    ("x" * 64 + ".victim.example", None, None),
    ("bücher.victim.example".encode(), None, None),  # a U-label as raw UTF-8: SNI is ASCII
    (b"\xff\xfe.victim.example", None, None),
]


def _id(form) -> str:
    return "no-sni" if form is None else repr(form)[:40]


@pytest.mark.parametrize("sni,names,host", SNI_FORMS, ids=[_id(f[0]) for f in SNI_FORMS])
@in_lab_loop
async def test_certificate_follows_the_policys_name(lab, sni, names, host):
    lab.set_model("v2")
    before = lab.events.since(0)[-1]["id"] if lab.events.since(0) else 0
    # HTTP/1.0 without Host: the policy routes by the SNI, so the decision names the host it took from it.
    out = await s_client(lab, "anycast", sni, request=b"GET / HTTP/1.0\r\n\r\n")
    if names is None:
        assert out.cert_names is None and out.alert == 112, out.text[-600:]
        assert not out.response
        errors = [e for e in lab.events.since(before) if e["kind"] == "tls.error"]
        assert errors and errors[-1]["error"].startswith("unrecognized_name"), errors
        return
    assert out.alert is None and "Verify return code: 0 (ok)" in out.text, out.text[-600:]
    assert sorted(out.cert_names) == sorted(names)
    decisions = [e for e in lab.events.since(before) if e["kind"] == "route.decision"]
    assert [d["host"] for d in decisions] == [host]
    assert out.response.startswith(b"HTTP/1.1 ") and b"X-Lab-Decision: " in out.response, out.response[:200]


def test_every_catalog_sni_is_covered():
    covered = {f[0] for f in SNI_FORMS}
    found = 0
    for path in sorted((ROOT / "scenarios").glob("*.toml")):
        for sni in re.findall(r'^\s*sni\s*=\s*"([^"]*)"', path.read_text(), re.M):
            assert (sni or None) in covered, f"{path.name}: SNI {sni!r} is not in SNI_FORMS"
            found += 1
    assert found, "no `sni =` in scenarios/*.toml: the catalog moved?"


@in_lab_loop
async def test_non_ascii_sni_is_one_log_line_and_no_traceback(lab, caplog):
    clock = [0.0]
    lab.edge.refusals = Refusals(lab.events, clock=lambda: clock[0])
    with caplog.at_level(logging.INFO):
        for i in range(4):
            out = await s_client(lab, "anycast", f"b\xfccher{i}.victim.example".encode())
            assert out.alert == 112, out.text[-400:]
        lines = [r for r in caplog.records if "non-ASCII SNI" in r.getMessage()]
        assert len(lines) == 1 and lines[0].levelno == logging.WARNING
        clock[0] = 61.0
        await s_client(lab, "anycast", b"\xff.victim.example")
    lines = [r.getMessage() for r in caplog.records if "non-ASCII SNI" in r.getMessage()]
    assert len(lines) == 2 and "(3 more since the last such line)" in lines[1], lines
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    sent = [e["sni"] for e in lab.events.since(0) if e["kind"] == "tls.clienthello"][-1]
    assert sent == "\\xff.victim.example"  # the event shows what was sent


# ---- resumption ---------------------------------------------------------------------------

@in_lab_loop
async def test_a_session_never_resumes_on_another_listener_or_name(lab, tmp_path):
    session = tmp_path / "session.pem"
    first = await s_client(lab, "anycast", "www.victim.example", "-tls1_2", "-sess_out", str(session))
    assert first.line("New,") and first.line("New,").startswith("New, TLSv1.2")
    if lab.engine_name == "mitmproxy":
        # pyOpenSSL can switch OpenSSL's session cache off: no session ID, nothing to resume.
        assert first.line("Session-ID:") == "Session-ID:" and not session.exists()
        return
    # The stdlib cannot: the session is bound to its listener and name instead.
    assert session.exists()
    elsewhere = [("saas-v1", "app.saas.example"), ("saas-v1", "www.victim.example"), ("anycast", "app.saas.example"),
                 ("anycast", "other.victim.example")]
    for listener, sni in elsewhere:
        out = await s_client(lab, listener, sni, "-tls1_2", "-sess_in", str(session))
        assert out.line("New,") and not out.line("Reused,"), (listener, sni, out.text[-600:])
        cert = [e for e in lab.events.since(0) if e["kind"] == "tls.cert"][-1]
        assert (cert["listener"], cert["sni"], cert["resumed"]) == (listener, sni, False)
    # where it was made, for the name it was made for, it may resume: same certificate, same name
    again = await s_client(lab, "anycast", "www.victim.example", "-tls1_2", "-sess_in", str(session))
    assert again.line("Reused,") and again.line("Reused,").startswith("Reused, TLSv1.2")
    cert = [e for e in lab.events.since(0) if e["kind"] == "tls.cert"][-1]
    assert (cert["listener"], cert["sni"], cert["names"], cert["resumed"]) == (
        "anycast", "www.victim.example", VICTIM, True)


@in_lab_loop
async def test_tls13_never_resumes(lab, tmp_path):
    session = tmp_path / "session.pem"
    out = await s_client(lab, "anycast", "www.victim.example", "-tls1_3", "-sess_out", str(session),
                         request=b"GET / HTTP/1.0\r\n\r\n")
    assert out.line("New,").startswith("New, TLSv1.3") and out.response.startswith(b"HTTP/1.1 ")
    if lab.engine_name == "native":
        assert not session.exists()  # no ticket at all (num_tickets = 0): s_client has nothing to write
        return
    # pyOpenSSL has no public num_tickets: OpenSSL sends stateful tickets that point into a
    # session cache that is off, so offering one gets a full handshake.
    assert session.exists()
    again = await s_client(lab, "anycast", "www.victim.example", "-tls1_3", "-sess_in", str(session),
                           request=b"GET / HTTP/1.0\r\n\r\n")
    assert again.line("New,").startswith("New, TLSv1.3") and not again.line("Reused,")


# ---- cipher suites -----------------------------------------------------------------------

@pytest.mark.parametrize("cipher,ok", [
    ("ECDHE-ECDSA-AES128-GCM-SHA256", True),
    ("ECDHE-ECDSA-AES256-GCM-SHA384", True),
    ("ECDHE-ECDSA-CHACHA20-POLY1305", True),
    ("ECDHE-ECDSA-AES128-SHA256", False),  # CBC
    ("ECDHE-ECDSA-AES256-SHA", False),
    ("AES128-SHA256", False),  # CBC, no forward secrecy
    ("AES128-GCM-SHA256", False),  # no forward secrecy
])
@in_lab_loop
async def test_tls12_offers_aead_suites_only(lab, cipher, ok):
    out = await s_client(lab, "anycast", "www.victim.example", "-tls1_2", "-cipher", cipher)
    if ok:
        assert out.line("New,") == f"New, TLSv1.2, Cipher is {cipher}", out.text[-400:]
    else:
        assert out.cert_names is None and out.alert == 40, out.text[-400:]  # handshake_failure


@NATIVE_ONLY  # mitmproxy's OpenSSL refuses too, but its warning alert waits for its next write: no answer to wait for
@in_lab_loop
async def test_a_client_cannot_renegotiate(lab):
    # As nginx: a handshake redone on demand costs the server a handshake for nothing, and the
    # edge's session caches count on one session per connection (lab.edge.tls.SessionContexts).
    l = lab.world.listener_by_name["anycast"]
    proc = await asyncio.create_subprocess_exec(
        need("openssl"), "s_client", "-connect", f"{l.host}:{l.port}", "-CAfile", str(lab.ca.cert_path), "-tls1_2",
        "-servername", "www.victim.example", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = b""
    try:
        while b"Verify return code" not in out:  # handshake done: now ask for another (s_client's "R" command)
            out += await asyncio.wait_for(proc.stdout.read(4096), 10) or b"\n(eof)"
            assert not out.endswith(b"(eof)"), out[-400:]
        proc.stdin.write(b"R\n")
        mark = len(out)
        try:
            while b"no renegotiation" not in out and (chunk := await asyncio.wait_for(proc.stdout.read(4096), 10)):
                out += chunk
        except TimeoutError:
            raise AssertionError(f"no answer to a renegotiation: {out[mark:]!r}") from None
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    text = out.decode("latin-1")
    assert "RENEGOTIATING" in text and "no renegotiation" in text, text[-400:]


@in_lab_loop
async def test_a_client_hello_in_pieces_gets_its_certificate(lab):
    """A ClientHello that arrives over several reads is read whole, then answered like any other."""
    l = lab.world.listener_by_name["anycast"]
    ctx = _client_ctx(lab)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="www.victim.example")
    reader, writer = await asyncio.open_connection(l.host, l.port)
    try:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        for piece in (hello[:3], hello[3:9], hello[9:100], hello[100:]):  # in the record header, in the body
            writer.write(piece)
            await writer.drain()
            for _ in range(5):  # the edge runs on this loop: let it read this piece on its own
                await asyncio.sleep(0)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                writer.write(outgoing.read())
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the edge closed the connection during the handshake"
                incoming.write(data)
        names = [v for k, v in tls.getpeercert()["subjectAltName"] if k == "DNS"]
        assert sorted(names) == sorted(VICTIM)
        tls.write(b"GET / HTTP/1.1\r\nHost: www.victim.example\r\nConnection: close\r\n\r\n")
        writer.write(outgoing.read())
        answer = b""
        while not answer.startswith(b"HTTP/1.1 ") or b"\r\n\r\n" not in answer:
            data = await asyncio.wait_for(reader.read(65536), 5)
            assert data, answer
            incoming.write(data)
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                pass
        assert b"X-Lab-Decision: " in answer, answer[:300]
    finally:
        writer.close()


# ---- handshake timeout ------------------------------------------------------------------

@pytest.mark.parametrize("sent", [b"", b"\x16\x03\x01\x02\x00\x01"], ids=["nothing", "half-a-hello"])
@in_lab_loop
async def test_silent_client_is_dropped_after_the_handshake_timeout(lab, sent):
    saved = lab.world
    with_limits(lab, handshake_timeout=0.3)
    try:
        l = lab.world.listener_by_name["saas-v1"]
        reader, writer = await asyncio.open_connection(l.host, l.port)
        writer.write(sent)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    finally:
        lab.set_world(saved)
    last = [e for e in lab.events.since(0) if e["kind"] == "tls.error"][-1]
    assert last["error"] == "handshake timeout" and last["listener"] == "saas-v1"


# ---- connection caps -------------------------------------------------------------------

def _client_ctx(lab) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(lab.ca.cert_path))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


async def _tls_from(lab, source: str, listener: str = "anycast"):
    l = lab.world.listener_by_name[listener]
    return await asyncio.wait_for(asyncio.open_connection(
        l.host, l.port, ssl=_client_ctx(lab), server_hostname="www.victim.example", local_addr=(source, 0)), 5)


async def _get_from(lab, source: str) -> bytes:
    reader, writer = await _tls_from(lab, source)
    writer.write(b"GET / HTTP/1.1\r\nHost: www.victim.example\r\nConnection: close\r\n\r\n")
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def _refused(lab, source: str) -> bool:
    try:
        reader, writer = await _tls_from(lab, source)
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return True
    writer.close()
    return False


async def _health(lab) -> int:
    url = lab.control.url.removeprefix("http://")
    host, _, port = url.partition("/")[0].rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET /health HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return int(head.split(b" ", 2)[1])


@in_lab_loop
async def test_per_client_cap_refuses_that_client_only(lab, caplog):
    saved = lab.world
    with_limits(lab, max_connections_per_client=3)
    held = []
    try:
        for _ in range(3):
            held.append(await _tls_from(lab, "127.0.0.5"))  # idle, handshake done
        with caplog.at_level(logging.WARNING, logger="lab.edge"):
            assert await _refused(lab, "127.0.0.5")
            assert await _refused(lab, "127.0.0.5")
        lines = [r.getMessage() for r in caplog.records if "refused a connection from 127.0.0.5" in r.getMessage()]
        assert len(lines) == 1 and "max_connections_per_client 3" in lines[0]
        refused = [e for e in lab.events.since(0) if e["kind"] == "tls.error" and e.get("client") == "127.0.0.5"]
        assert refused and "max_connections_per_client 3" in refused[-1]["error"]
        # another client still gets a whole answer through the edge, and the control plane answers
        answer = await _get_from(lab, "127.0.0.6")
        assert answer.startswith(b"HTTP/1.1 200") and b"X-Lab-Decision" in answer
        assert await _health(lab) == 200
        # a connection that ends gives its slot back
        held.pop()[1].close()
        deadline = asyncio.get_running_loop().time() + 5
        while await _refused(lab, "127.0.0.5"):
            assert asyncio.get_running_loop().time() < deadline, "the closed connection's slot never came back"
            await asyncio.sleep(0.05)
    finally:
        for _, writer in held:
            writer.close()
        lab.set_world(saved)


@in_lab_loop
async def test_global_cap_refuses_everyone_beyond_it(lab):
    saved = lab.world
    with_limits(lab, max_connections=2)
    held = []
    try:
        deadline = asyncio.get_running_loop().time() + 5
        while len(held) < 2:  # connections of earlier tests may still be closing
            try:
                held.append(await _tls_from(lab, "127.0.0.7"))
            except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        assert await _refused(lab, "127.0.0.8")
        refused = [e for e in lab.events.since(0) if e["kind"] == "tls.error" and e.get("client") == "127.0.0.8"]
        assert "max_connections 2" in refused[-1]["error"]
        assert await _health(lab) == 200
    finally:
        for _, writer in held:
            writer.close()
        lab.set_world(saved)
