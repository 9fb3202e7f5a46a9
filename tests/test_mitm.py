"""The mitmproxy engine: byte-for-byte parity with the native engine side by side, and clean embedding.

The checks both engines must pass are parametrized over the `engine` fixture where they
live (test_edge, test_http1, test_http2, test_tls, test_faults_origin); here is what only
the mitmproxy engine has: answers compared with a native engine running next to it, the
flows file, start/stop, hook errors.
"""
import asyncio
import errno
import logging
import re
import socket
import sys
from pathlib import Path

import pytest

pytest.importorskip("mitmproxy.master", reason="the mitmproxy engine needs the extra: pip install 'sni-lab[mitmproxy]'")

import pytest_asyncio  # noqa: E402

from lab.client import probe  # noqa: E402
from lab.edge.mitm import MitmEdge  # noqa: E402
from lab.run import Lab  # noqa: E402
from lab.topology import default_path  # noqa: E402

from tests.test_edge import get, run  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def certs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("certs")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(world, certs_dir):
    if MitmEdge._active is not None:
        pytest.skip("another mitmproxy engine runs in this process (the scenario plugin's?): mitmproxy allows one")
    async with Lab(world.with_free_ports(), certs_dir, engine="mitmproxy") as running:
        assert isinstance(running.edge, MitmEdge)
        yield running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def native(world, certs_dir):
    async with Lab(world.with_free_ports(), certs_dir, engine="native") as running:
        yield running


# ---- parity with the native engine ----------------------------------------------------

def _raw(host_lines: str) -> bytes:
    return f"GET / HTTP/1.1\r\n{host_lines}\r\n".encode()


REFUSALS = [
    pytest.param("saas-v1", "www.victim.example", None, "v1-waf", (), id="403-waf-block"),
    pytest.param("saas-v1", "www.victim.example", None, "v1-waf", (("Accept", "application/json"),), id="403-json"),
    pytest.param("anycast", "shop.customer.example", "www.victim.example", "v2-strict", (), id="421-sni-host-mismatch"),
    pytest.param("anycast", "www.victim.example", "nothing.example", "v2", (), id="421-unknown-host"),
]


async def _both(lab, native, listener, sni, host, model, http2=False, headers=(), raw=None):
    out = []
    for running in (native, lab):
        if raw is not None:
            running.set_model(model)
            l = running.world.listener_by_name[listener]
            out.append(await probe(l.host, l.port, sni, [{"raw": raw}], str(running.ca.cert_path)))
        else:
            out.append(await get(running, listener, sni, host, model=model, http2=http2, headers=headers))
    return out


def _same_answer(a, b, *, body=True):
    assert a.tls_error is None and b.tls_error is None, (a, b)
    ra, rb = a.response, b.response
    assert rb is not None, b
    assert (rb.status, rb.decision) == (ra.status, ra.decision)
    # Connection management is each HTTP stack's own (the native engine closes after a request
    # its parser calls malformed); everything else is the same.
    ha = [(k, v) for k, v in ra.headers if k.lower() != "connection"]
    hb = [(k, v) for k, v in rb.headers if k.lower() != "connection"]
    assert [k.lower() for k, _ in hb] == [k.lower() for k, _ in ha], (ha, hb)
    if body:
        assert rb.body == ra.body
        assert hb == ha


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
@pytest.mark.parametrize("listener,sni,host,model,headers", REFUSALS)
async def test_refusal_pages_identical_to_native(lab, native, http2, listener, sni, host, model, headers):
    nat, mitm = await _both(lab, native, listener, sni, host, model, http2=http2, headers=headers)
    assert nat.response.status in (400, 403, 421) and nat.response.origin is None
    assert mitm.alpn == nat.alpn == ("h2" if http2 else "http/1.1")
    _same_answer(nat, mitm)  # status, headers (X-Lab-Decision included) and body, byte for byte


async def test_bad_host_is_refused_like_native(lab, native):
    nat, mitm = await _both(lab, native, "anycast", "www.victim.example", "nothing.example:http", "v2")
    assert nat.response.status == 400 and "bad-host" in nat.response.decision
    _same_answer(nat, mitm)
    # Over HTTP/2, mitmproxy parses :authority itself, before any hook: one it cannot parse
    # ends the connection where the native engine answers 400. No origin sees it either way.
    nat, mitm = await _both(lab, native, "anycast", "www.victim.example", "nothing.example:http", "v2", http2=True)
    assert nat.response.status == 400 and "bad-host" in nat.response.decision
    assert mitm.responses == [] and "connection closed before every stream ended" in mitm.error


@pytest.mark.parametrize("raw", [
    _raw("Host: app.saas.example\r\nHost: www.victim.example\r\n"),
    b"GET https://www.victim.example/ HTTP/1.1\r\nHost: app.saas.example\r\n\r\n",
    b"GET / HTTP/1.1\r\n\r\n",
], ids=["duplicate-host", "absolute-form-mismatch", "http11-without-host"])
async def test_400_pages_identical_to_native(lab, native, raw):
    nat, mitm = await _both(lab, native, "saas-v1", "app.saas.example", None, "v2", raw=raw)
    assert nat.response.status == 400
    _same_answer(nat, mitm)


@pytest.mark.parametrize("raw", [
    _raw("Host: app.saas.example\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n").replace(
        b"GET", b"POST") + b"0\r\n\r\n",
    _raw("Host: app.saas.example\r\nX-Folded: a\r\n b\r\n"),
    _raw("Host: app.saas.example\r\nBad Header: x\r\n"),
], ids=["te-and-cl", "obs-fold", "bad-header-name"])
async def test_malformed_http1_refused_like_native(lab, native, raw):
    """Each HTTP/1 parser words it its own way; both answer the lab's 400 bad-request and close."""
    nat, mitm = await _both(lab, native, "saas-v1", "app.saas.example", None, "v1", raw=raw)
    for out in (nat, mitm):
        assert out.response.status == 400 and "refused=400 bad-request" in out.response.decision, out
        assert out.response.header("connection") == "close" and out.response.origin is None


async def test_http1_framing_errors_are_mitmproxys_own_400(lab, native):
    """Two Content-Lengths: mitmproxy's reader refuses before any hook, with its own page. Refused."""
    raw = _raw("Host: app.saas.example\r\nContent-Length: 1\r\nContent-Length: 2\r\n").replace(b"GET", b"POST")
    nat, mitm = await _both(lab, native, "saas-v1", "app.saas.example", None, "v1", raw=raw + b"ab")
    assert nat.response.status == mitm.response.status == 400
    assert mitm.response.origin is None and mitm.response.header("connection") == "close"


@pytest.mark.parametrize("model", ["v1", "v2"])
async def test_h2_host_header_disagreeing_with_authority(lab, native, model):
    """Refused per stream with 400 host-mismatch, the stream before it on the connection answered."""
    reqs = [{"host": "app.saas.example"}, {"host": "app.saas.example", "headers": [("host", "www.victim.example")]}]
    outs = []
    for running in (native, lab):
        running.set_model(model)
        l = running.world.listener_by_name["saas-v1"]
        outs.append(await probe(l.host, l.port, "app.saas.example", reqs, str(running.ca.cert_path), http2=True))
    nat, mitm = outs
    assert [r.status for r in nat.responses] == [r.status for r in mitm.responses] == [200, 400]
    assert "host-mismatch" in mitm.responses[1].decision and mitm.responses[1].origin is None
    assert mitm.responses[1].body == nat.responses[1].body


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
@pytest.mark.parametrize("model", ["v1", "v2"])
async def test_routed_answers_match_native(lab, native, model, http2):
    nat, mitm = await _both(lab, native, "saas-v1", "www.victim.example", None, model, http2=http2)
    assert mitm.response.origin == nat.response.origin == ("saas" if model == "v1" else "victim")
    _same_answer(nat, mitm, body=False)  # the origins' pages carry per-request details


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_upstream_failure_is_the_labs_page(lab, native, http2):
    """An origin that does not answer: the lab's 502 page (not mitmproxy's), as on the native engine."""
    saved = [(running, running.world) for running in (native, lab)]
    with socket.socket() as s:
        s.bind(("127.0.0.31", 0))  # bound, never listening: every connect is refused at once
        try:
            for running, world in saved:
                running.set_world(world.with_ports({"victim": s.getsockname()[1]}))
            nat, mitm = await _both(lab, native, "anycast", "www.victim.example", None, "v2", http2=http2)
        finally:
            for running, world in saved:
                running.set_world(world)
    assert nat.response.status == 502 and "origin=victim" in nat.response.decision
    _same_answer(nat, mitm)
    errors = [e for e in lab.events.since(0) if e["kind"] == "origin.error"]
    assert errors and errors[-1]["origin"] == "victim"


# ---- what only the mitmproxy engine has to prove ---------------------------------------

async def test_certificates_only_from_the_lab_store(lab):
    """mitmproxy's TlsConfig (which mints) is not loaded; the lab's hook is the only TLS hook."""
    chain = lab.edge.master.addons.chain
    tls_hooks = [type(a).__name__ for a in chain if hasattr(a, "tls_start_client")]
    assert tls_hooks == ["_CertBySni"]
    assert lab.edge.master.addons.get("tlsconfig") is None
    out = await get(lab, "anycast", "www.victim.example", model="v2")
    assert out.cert_verified and out.cert_names == ["victim.example", "*.victim.example"]


@pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])
async def test_exception_in_a_hook_is_a_502_naming_it(lab, monkeypatch, caplog, http2):
    def explode(*args, **kw):
        raise RuntimeError("policy exploded")

    monkeypatch.setattr("lab.edge.core.decide", explode)
    with caplog.at_level(logging.ERROR, logger="lab.edge.mitm"):
        out = await get(lab, "anycast", "www.victim.example", model="v2", http2=http2)
    assert out.response.status == 502
    assert "RuntimeError: policy exploded" in out.response.decision and "edge-error" in out.response.decision
    assert b"policy exploded" in out.response.body
    assert any("request hook failed" in r.getMessage() and r.exc_info for r in caplog.records)


async def test_exception_in_the_tls_hook_fails_the_handshake_loudly(lab, monkeypatch, caplog):
    def explode(sni):
        raise RuntimeError("store exploded")

    monkeypatch.setattr(lab.edge.certs, "lookup", explode)
    with caplog.at_level(logging.ERROR, logger="lab.edge.mitm"):
        out = await get(lab, "anycast", "www.victim.example", model="v2")
    assert not out.responses and not out.cert_names  # no answer, no certificate: the handshake failed
    errors = [e for e in lab.events.since(0) if e["kind"] == "tls.error"]
    assert "RuntimeError: store exploded" in errors[-1]["error"]
    assert any("tls_start_client hook failed" in r.getMessage() for r in caplog.records)


# ---- embedding: start, stop, errors ----------------------------------------------------

def _engine_tasks() -> set:
    def engine(task) -> bool:
        name = getattr(getattr(task.get_coro(), "cr_code", None), "co_filename", "")
        return "/mitmproxy/" in name or name.endswith("/lab/edge/mitm.py")
    return {t for t in asyncio.all_tasks() if not t.done() and engine(t)}


async def _new_tasks(baseline: set, timeout: float = 2.0) -> set:
    """Tasks born since `baseline` still alive once the dust settles (origins finish their side)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        new = {t for t in asyncio.all_tasks() - baseline if not t.done() and t is not asyncio.current_task()}
        if not new or loop.time() > deadline:
            return new
        await asyncio.sleep(0.02)


def _bind_and_release(host: str, port: int) -> None:
    """What the next server on this port does: bind and listen (EADDRINUSE if anyone still listens)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen()


@pytest_asyncio.fixture(loop_scope="module")
async def stopped_edge(lab):
    """The shared lab's edge, stopped; started again afterwards whatever the test did."""
    await lab.edge.stop()
    try:
        yield lab.edge
    finally:
        if lab.edge.master is None:
            await lab.edge.start()


async def test_start_stop_three_times_on_the_same_ports(lab, stopped_edge):
    edge = stopped_edge
    addresses = {l.name: (l.host, l.port) for l in lab.world.listeners}
    for host, port in addresses.values():
        _bind_and_release(host, port)
    bystander = asyncio.create_task(asyncio.sleep(60))  # not the engine's: stop() leaves it alone
    baseline = asyncio.all_tasks()
    loop = asyncio.get_running_loop()
    try:
        for round_ in range(3):
            bound = await edge.start()
            assert bound == addresses
            lab.set_model("v2")
            l = lab.world.listener_by_name["anycast"]
            ok = await probe(l.host, l.port, "www.victim.example", [{"host": "www.victim.example"}],
                             str(lab.ca.cert_path), http2=True)
            assert ok.response.origin == "victim", (round_, ok)
            # A connection still open when the engine stops: stop() must close it.
            reader, writer = await asyncio.open_connection(l.host, l.port, ssl=_client_ctx(lab),
                                                           server_hostname="www.victim.example")
            started = loop.time()
            await edge.stop()
            assert loop.time() - started < 1.0, "stop() waited for something that was not the engine's"
            await asyncio.wait_for(reader.read(), 5)  # the server's h2 preface, then EOF
            assert reader.at_eof(), "a live connection survived stop()"
            writer.close()
            assert not _engine_tasks(), "mitmproxy tasks left after stop()"
            for host, port in addresses.values():
                _bind_and_release(host, port)  # no port stays bound
            assert not await _new_tasks(baseline), f"round {round_}: tasks leaked"
            assert MitmEdge._active is None
    except SystemExit:  # pragma: no cover - the failure this test exists for
        pytest.fail("the mitmproxy engine called sys.exit")
    finally:
        assert not bystander.done()
        bystander.cancel()


def _client_ctx(lab):
    from lab.client import client_context

    return client_context(str(lab.ca.cert_path), ["h2"])


async def test_port_in_use_is_one_clear_oserror(lab, stopped_edge):
    edge = stopped_edge
    busy = lab.world.listener_by_name["saas-v1"]
    baseline = asyncio.all_tasks()
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind((busy.host, busy.port))
        squatter.listen()
        try:
            with pytest.raises(OSError) as caught:
                await edge.start()
        except SystemExit:  # pragma: no cover
            pytest.fail("the mitmproxy engine called sys.exit")
    e = caught.value
    assert e.errno == errno.EADDRINUSE
    assert re.fullmatch(rf"edge listener saas-v1: cannot bind {busy.host}:{busy.port}: .*address already in use",
                        e.strerror), e.strerror
    assert str(e).count("\n") == 0
    for l in lab.world.listeners:  # the listeners that did bind were released
        _bind_and_release(l.host, l.port)
    assert not await _new_tasks(baseline)
    assert MitmEdge._active is None and edge.master is None
    await edge.start()  # and the engine starts fine once the port is free
    out = await get(lab, "saas-v1", "app.saas.example", model="v2")
    assert out.response.origin == "saas"


async def test_cli_up_port_in_use_prints_one_line_and_exits_1(lab, tmp_path):
    """`sni-lab up --engine mitmproxy` with a port taken: one line on stderr, exit status 1."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.10", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        text = re.sub(r"(?m)^port = \d+", "port = 0", default_path().read_text())
        text = text.replace('name = "anycast"\nhost = "127.0.0.10"\nport = 0',
                            f'name = "anycast"\nhost = "127.0.0.10"\nport = {port}')
        assert f"port = {port}" in text
        config = tmp_path / "lab.toml"
        config.write_text(text)
        res = await run([sys.executable, "-m", "lab", "up", "--engine", "mitmproxy", "--config", str(config),
                         "--certs", str(lab.ca.dir), "--state", str(tmp_path / "state")],
                        capture_output=True, text=True, timeout=30)
    assert res.returncode == 1, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"sni-lab: error: edge listener anycast: cannot bind 127.0.0.10:{port}: ")
    assert "address already in use" in lines[0]


async def test_second_engine_in_one_process_is_refused(lab):
    other = MitmEdge(lab.world, lab.events, lab.ca)
    with pytest.raises(RuntimeError, match="one engine per process"):
        await other.start()
    assert MitmEdge._active is lab.edge


async def test_flows_file_readable_by_mitmproxy(lab, stopped_edge, tmp_path):
    from mitmproxy import io as mitm_io

    flows = tmp_path / "edge.flows"
    edge = MitmEdge(lab.world, lab.events, lab.ca, flows=flows)
    await edge.start()
    try:
        lab.edge = edge  # so set_model reaches it
        await get(lab, "saas-v1", "www.victim.example", model="v1")
        await get(lab, "saas-v1", "www.victim.example", model="v1-waf", http2=True)
    finally:
        await edge.stop()
        lab.edge = stopped_edge
    with flows.open("rb") as f:
        read = list(mitm_io.FlowReader(f).stream())
    assert [(f.request.pretty_host, f.response.status_code) for f in read] == [
        ("www.victim.example", 200), ("www.victim.example", 403)]
    assert read[0].response.headers["x-lab-origin"] == "saas"
    assert read[0].client_conn.sni == "www.victim.example"
    port = lab.world.listener_by_name["saas-v1"].port
    mitmdump = Path(sys.executable).with_name("mitmdump")
    if not mitmdump.exists():
        pytest.skip("mitmdump is not installed next to this Python")
    res = await run([str(mitmdump), "-nr", str(flows), "--set", f"confdir={tmp_path / 'mitmproxy-conf'}"],
                    capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert re.search(rf"GET https://www\.victim\.example:{port}/$", lines[0]) and "<< 200" in lines[1], res.stdout
    assert re.search(rf"GET https://www\.victim\.example:{port}/ HTTP/2\.0$", lines[2]), res.stdout
    assert "<< HTTP/2.0 403" in lines[3], res.stdout


async def test_flows_file_that_cannot_be_written_is_a_clear_oserror(lab, stopped_edge, tmp_path):
    edge = MitmEdge(lab.world, lab.events, lab.ca, flows=tmp_path / "missing-dir" / "edge.flows")
    with pytest.raises(OSError, match=r"flows file .*edge\.flows: cannot write"):
        await edge.start()
    assert MitmEdge._active is None
    for l in lab.world.listeners:
        _bind_and_release(l.host, l.port)


async def test_connection_state_is_released(lab):
    """Per-connection state (listener, trace, TLS outcome) goes away with mitmproxy's client."""
    import gc

    await get(lab, "anycast", "www.victim.example", model="v2", http2=True)
    await get(lab, "anycast", "nothing.example", model="v2")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while len(lab.edge._conns) and loop.time() < deadline:
        await asyncio.sleep(0.05)
        gc.collect()
    assert len(lab.edge._conns) == 0
