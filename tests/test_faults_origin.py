"""Origin faults through the edge, on both engines: down, hung, unreachable; the lab's own pages say which."""
import asyncio
import contextlib
import socket

import pytest
import pytest_asyncio

from lab.client import probe
from tests.conftest import engine_lab, victim_at

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(engine, world, tmp_path_factory):
    async with engine_lab(engine, world, tmp_path_factory.mktemp("certs")) as running:
        yield running


async def fetch(lab, http2):
    l = lab.world.listener_by_name["anycast"]
    out = await probe(l.host, l.port, "www.victim.example", [{"host": "www.victim.example"}], str(lab.ca.cert_path),
                      http2=http2)
    assert out.response is not None, out
    return out.response


HTTP2 = pytest.mark.parametrize("http2", [False, True], ids=["h1", "h2"])


@HTTP2
async def test_origin_down_is_a_502_with_the_reason(lab, http2):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: every connect is refused at once
        with victim_at(lab, s.getsockname()[1]):
            r = await fetch(lab, http2)
    assert r.status == 502 and "origin=victim" in r.decision and r.origin is None
    assert b"origin-unreachable" in r.body and b"Connection refused" in r.body
    error = [e for e in lab.events.since(0) if e["kind"] == "origin.error"][-1]
    assert error["origin"] == "victim" and error["status"] == 502


@HTTP2
async def test_origin_hung_is_a_504_after_origin_timeout(lab, http2):
    held = []

    async def never_answer(reader, writer):
        held.append(writer)
        await reader.read()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    try:
        with victim_at(lab, server.sockets[0].getsockname()[1], origin_timeout=0.2):
            r = await fetch(lab, http2)
    finally:
        server.close()
        for w in held:
            w.close()
    assert r.status == 504 and "origin=victim" in r.decision
    assert b"origin-timeout" in r.body and b"no response within 0.2 s" in r.body


async def test_origin_that_never_accepts_is_a_504_after_origin_connect_timeout(lab):
    # A listen backlog that is full: the kernel drops further SYNs, so connect() just waits.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(0)
        fillers = []
        try:
            for _ in range(8):
                c = socket.socket()
                c.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    c.connect(s.getsockname())
                fillers.append(c)
            with victim_at(lab, s.getsockname()[1], origin_connect_timeout=0.2):
                r = await fetch(lab, http2=False)
        finally:
            for c in fillers:
                c.close()
    assert r.status == 504 and b"origin-timeout" in r.body and b"no answer within 0.2 s" in r.body


@HTTP2
async def test_answers_name_the_edge_not_the_origins_software(lab, http2):
    r = await fetch(lab, http2)
    assert r.status == 200 and r.origin == "victim"
    servers = [v for k, v in r.headers if k.lower() == "server"]
    assert servers == ["sni-lab"]


async def test_an_idle_keep_alive_connection_to_an_origin_is_closed_after_origin_idle_timeout(lab):
    connections, closed = [], asyncio.Event()

    async def serve(reader, writer):  # keep-alive until the edge hangs up
        connections.append(writer)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        closed.set()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        with victim_at(lab, server.sockets[0].getsockname()[1], origin_idle_timeout=0.5):
            assert [(await fetch(lab, http2)).status for http2 in (False, True)] == [200, 200]
            assert len(connections) == 1  # the second request reused the idle connection
            await asyncio.wait_for(closed.wait(), 10)  # ...which the edge closes once it has been unused 0.5 s
            assert (await fetch(lab, False)).status == 200 and len(connections) == 2  # and the next one opens anew
    finally:
        server.close()
        for w in connections:
            w.close()
