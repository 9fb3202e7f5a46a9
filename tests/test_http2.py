"""HTTP/2 under hostile input, on both engines over real sockets and real TLS.

Limits come from the world (`world.limits`); each test sets the ones it exercises small
through `lab.set_world`, the way a user's `[limits]` table would.
"""
import asyncio
import contextlib

import h2.errors
import h2.events
import h2.settings
import pytest
import pytest_asyncio

from lab.edge.contract import h2_malformed as malformed
from lab.edge.http2 import H2Protocol
from tests.conftest import NATIVE_ONLY, engine_lab, limits, victim_at
from tests.h2peer import Peer, get

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def lab(engine, world, tmp_path_factory):
    async with engine_lab(engine, world, tmp_path_factory.mktemp("certs")) as running:
        yield running


class Hung:
    """An origin that reads requests and never answers: counts what it holds open."""

    def __init__(self) -> None:
        self.requests = 0
        self.open = 0
        self.peak = 0
        self.changed = asyncio.Event()

    async def serve(self, reader, writer) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)
        try:
            if await reader.read(65536):
                self.requests += 1
                self.changed.set()
            while await reader.read(65536):
                pass
        finally:
            self.open -= 1
            self.changed.set()
            writer.close()

    def close(self) -> None:
        """Nothing to end: the edge drops what it opened here (a stream reset, origin_timeout)."""

    async def wait(self, cond, timeout: float = 5.0) -> None:
        async def loop():
            while not cond():
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(loop(), timeout)


@contextlib.asynccontextmanager
async def victim_served_by(lab, origin):
    """Origin `victim` replaced by `origin` (its `serve`), then put back; `origin.close()` before
    the server's wait_closed, which since Python 3.12.1 waits for the connections still open."""
    server = await asyncio.start_server(origin.serve, "127.0.0.1", 0)
    try:
        with victim_at(lab, server.sockets[0].getsockname()[1]):
            yield origin
    finally:
        server.close()
        origin.close()
        await server.wait_closed()


@pytest_asyncio.fixture(loop_scope="module")
async def hung(lab):
    """Origin `victim` replaced by one that never answers."""
    async with victim_served_by(lab, Hung()) as origin:
        yield origin


class Recording:
    """An origin that answers every request 200 and keeps the request heads it read."""

    def __init__(self) -> None:
        self.heads: list[str] = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def serve(self, reader, writer) -> None:
        self.writers.add(writer)
        try:
            while True:
                self.heads.append((await reader.readuntil(b"\r\n\r\n")).decode("latin-1"))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Lab-Origin: victim\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    def close(self) -> None:
        """Ends the connections the edge keeps alive: since Python 3.12.1 `Server.wait_closed`
        waits for them, and the edge's pool holds an idle one open as long as the origin does."""
        for writer in list(self.writers):
            writer.close()


@pytest_asyncio.fixture(loop_scope="module")
async def recording(lab):
    """Origin `victim` replaced by one that records what the edge forwards."""
    async with victim_served_by(lab, Recording()) as origin:
        yield origin


def edge_side(lab) -> list[H2Protocol]:
    return [c.app for c in lab.edge.connections if isinstance(c.app, H2Protocol)]


# ---- streams, bodies, floods, origin legs: the native engine's h2 stack (mitmproxy has its own) ----

async def test_cookie_crumbs_reach_an_http1_origin_as_one_field(lab, recording):
    # RFC 9113 8.2.3: a client may split Cookie into crumbs; HTTP/1.1 carries one field, "; "-joined.
    peer = await Peer.open(lab)
    sids = [peer.request(get() + [("cookie", "a=1"), ("accept", "*/*"), ("cookie", "b=2")]),
            peer.request(get() + [("cookie", "session=x")]), peer.request(get())]
    await peer.until(lambda: all(peer.done(s) for s in sids))
    peer.close()
    assert [peer.status[s] for s in sids] == [200] * 3
    cookies = sorted([line for line in head.split("\r\n") if line.lower().startswith("cookie:")]
                     for head in recording.heads)
    assert cookies == [[], ["cookie: a=1; b=2"], ["cookie: session=x"]]


@NATIVE_ONLY
async def test_the_stream_beyond_the_limit_is_refused_and_the_others_answered(lab):
    peer = await Peer.open(lab)
    limit = lab.world.limits.h2_max_streams
    # All HEADERS go out before the edge's SETTINGS are read: a client that ignores the limit.
    sids = [peer.request(get()) for _ in range(limit + 1)]
    await peer.until(lambda: all(peer.done(s) for s in sids) or peer.terminated is not None)
    peer.close()
    assert peer.terminated is None
    assert peer.reset == {sids[-1]: h2.errors.ErrorCodes.REFUSED_STREAM}
    assert [peer.status[s] for s in sids[:-1]] == [200] * limit
    assert all(peer.headers[s]["x-lab-origin"] == "victim" for s in sids[:-1])


@NATIVE_ONLY
async def test_request_bodies_are_held_to_the_connection_window(lab):
    """Bodies that never end, on 40 streams: the edge holds at most h2_max_buffered of them."""
    cap, body = 256 * 1024, 60 * 1024
    with limits(lab, max_body=64 * 1024, h2_max_buffered=cap):
        peer = await Peer.open(lab)
        sids = [peer.request(get("/login", "POST") + [("content-length", str(body))], end=False) for _ in range(40)]
        sent = dict.fromkeys(sids, 0)
        held = []
        for _ in range(200):  # bounded: each round sends what the windows allow, then syncs
            progressed = False
            for sid in sids:
                if peer.done(sid):
                    continue
                n = min(peer.h2.local_flow_control_window(sid), body - sent[sid], 16384)
                if n > 0:
                    peer.h2.send_data(sid, b"x" * n)
                    sent[sid] += n
                    progressed = True
            await peer.sync()
            held.append(sum(p.held for p in edge_side(lab)))
            if not progressed:
                break
        open_streams = [s for s in sids if not peer.done(s)]
        accepted = sum(sent[s] for s in open_streams)
        assert max(held) <= cap
        assert accepted == held[-1] > 0  # what the edge holds is exactly what it let in
        assert set(peer.reset.values()) == {h2.errors.ErrorCodes.REFUSED_STREAM}  # retryable, not lost
        # The bodies it holds are finished and answered by the origin.
        for sid in open_streams:
            peer.h2.send_data(sid, b"x" * (body - sent[sid]), end_stream=True)
        await peer.until(lambda: all(peer.done(s) for s in open_streams))
        peer.close()
        assert all(peer.headers[s]["x-lab-origin"] == "victim" for s in open_streams)


@NATIVE_ONLY
async def test_a_body_over_max_body_is_a_413_for_its_stream_only(lab):
    with limits(lab, max_body=16 * 1024):
        peer = await Peer.open(lab)
        big = peer.request(get("/login", "POST"), end=False)
        small = peer.request(get())
        await peer.until(lambda: peer.done(small))
        while not peer.done(big) and peer.terminated is None:
            n = min(peer.h2.local_flow_control_window(big), 16384)
            if n:
                peer.h2.send_data(big, b"x" * n)
            await peer.sync()
        peer.close()
    assert peer.status[small] == 200 and peer.status[big] == 413
    assert "refused=413 body-too-large" in peer.headers[big]["x-lab-decision"]
    assert "x-lab-origin" not in peer.headers[big]


# ---- floods -----------------------------------------------------------------------------

def _ping(peer, i):
    peer.h2.ping(i.to_bytes(8, "big"))


def _settings(peer, i):
    peer.h2.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 4096})


def _rapid_reset(peer, i):
    sid = peer.request(get())
    peer.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)


def _empty_data(peer, i):
    if i == 0:
        peer.flood_sid = peer.request(get("/login", "POST"), end=False)
    peer.h2.send_data(peer.flood_sid, b"")


@NATIVE_ONLY
@pytest.mark.parametrize("frame", [_ping, _settings, _rapid_reset, _empty_data],
                         ids=["ping", "settings", "rapid-reset", "empty-data"])
async def test_control_frame_flood_is_told_to_calm_down(lab, frame):
    with limits(lab, h2_control_frames=200):
        peer = await Peer.open(lab)
        for i in range(1000):  # 5x the limit, in one burst
            frame(peer, i)
        with contextlib.suppress(ConnectionError):
            await peer.until(lambda: peer.terminated is not None)
        peer.close()
    assert peer.terminated is not None and peer.terminated.error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM
    # ... and the edge serves the next client.
    other = await Peer.open(lab)
    sid = other.request(get())
    await other.until(lambda: other.done(sid))
    other.close()
    assert other.status[sid] == 200


@NATIVE_ONLY
async def test_rapid_reset_leaves_no_origin_request_open(lab, hung):
    peer = await Peer.open(lab)
    sids = [peer.request(get()) for _ in range(50)]
    peer.flush()
    await hung.wait(lambda: hung.requests == 50)  # every request is on the wire to the origin
    for sid in sids:
        peer.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    await peer.sync()
    await hung.wait(lambda: hung.open == 0)  # the origin sees every one of them withdrawn
    pool = lab.edge.core.pool
    assert not pool.active and pool.queued == 0
    peer.close()


@NATIVE_ONLY
async def test_closing_the_connection_cancels_its_origin_requests(lab, hung):
    peer = await Peer.open(lab)
    for _ in range(20):
        peer.request(get())
    peer.flush()
    await hung.wait(lambda: hung.requests == 20)
    peer.close()
    await hung.wait(lambda: hung.open == 0)
    assert not lab.edge.core.pool.active


@NATIVE_ONLY
async def test_origin_connections_are_capped_and_the_queue_bounded(lab, hung):
    pool = lab.edge.core.pool
    with limits(lab, origin_max_connections=2, origin_max_queued=3):
        peer = await Peer.open(lab)
        sids = [peer.request(get()) for _ in range(6)]
        await peer.until(lambda: peer.done(sids[-1]))
        await hung.wait(lambda: hung.requests == 2)
        assert [s for s in sids if peer.done(s)] == sids[-1:] and peer.status[sids[-1]] == 503
        assert b"origin-busy" in peer.body[sids[-1]] and "origin=victim" in peer.headers[sids[-1]]["x-lab-decision"]
        assert (hung.open, len(pool.active), pool.queued) == (2, 2, 3)
        peer.close()  # the client leaves: its queued and in-flight requests go with it
        await hung.wait(lambda: hung.open == 0)
    assert (hung.peak, hung.requests, len(pool.active), pool.queued) == (2, 2, 0, 0)


@NATIVE_ONLY
async def test_idle_connection_gets_goaway(lab):
    with limits(lab, idle_timeout=0.3):
        peer = await Peer.open(lab)
        sid = peer.request(get())
        await peer.until(lambda: peer.done(sid))
        await peer.until(lambda: peer.terminated is not None)
        peer.close()
    assert peer.status[sid] == 200 and peer.terminated.error_code == h2.errors.ErrorCodes.NO_ERROR


# ---- requests the edge refuses itself -------------------------------------------------

PATH = [(":method", "GET"), (":scheme", "https"), (":authority", "www.victim.example")]
MALFORMED = {
    "empty-path": PATH + [(":path", "")],
    "relative-path": PATH + [(":path", "x")],
    "space-in-path": PATH + [(":path", "/a b")],
    "control-in-path": PATH + [(":path", "/a\x01b")],
    "space-in-method": [(":method", "GE T")] + PATH[1:] + [(":path", "/")],
    "lowercase-method": [(":method", "get")] + PATH[1:] + [(":path", "/")],
    "tab-in-name": get() + [("x\tb", "1")],
    "space-in-name": get() + [("x b", "1")],
    "uppercase-name": get() + [("X-Up", "1")],
    "colon-in-name": get() + [("x:y", "1")],
    "connection-header": get() + [("connection", "close")],
    "transfer-encoding": get() + [("transfer-encoding", "chunked")],
    "te-gzip": get() + [("te", "gzip")],
    "connect": [(":method", "CONNECT"), (":authority", "www.victim.example:443")],
    "scheme-ftp": [(":method", "GET"), (":scheme", "ftp"), (":authority", "www.victim.example"), (":path", "/")],
    "scheme-http": [(":method", "GET"), (":scheme", "http"), (":authority", "www.victim.example"), (":path", "/")],
    "pseudo-after-regular": [(":method", "GET"), ("x-a", "1"), (":scheme", "https"), (":path", "/")],
    "unknown-pseudo": get() + [(":protocol", "websocket")],
    "missing-path": PATH,
    "value-leading-space": get() + [("x-a", " 1")],
}


# mitmproxy's own HTTP/2 layer refuses these before any hook (a stream reset, not the lab's page).
MITMPROXY_REFUSES = ("lowercase-method", "connect", "scheme-ftp", "scheme-http", "pseudo-after-regular",
                     "unknown-pseudo", "missing-path")


@pytest.mark.parametrize("name", [n for n in MALFORMED if n not in MITMPROXY_REFUSES])
async def test_malformed_request_is_the_edges_own_400(lab, name):
    await _refused_by_the_lab(lab, MALFORMED[name])


@NATIVE_ONLY
@pytest.mark.parametrize("name", MITMPROXY_REFUSES)
async def test_malformed_request_mitmproxy_refuses_itself_is_the_native_edges_own_400(lab, name):
    await _refused_by_the_lab(lab, MALFORMED[name])


async def _refused_by_the_lab(lab, headers):
    peer = await Peer.open(lab)
    sid = peer.request(headers)
    await peer.until(lambda: peer.done(sid))
    peer.close()
    assert peer.status.get(sid) == 400, (peer.status, peer.reset)
    decision = peer.headers[sid]["x-lab-decision"]
    assert "refused=400 bad-request" in decision and "origin=" not in decision
    assert "x-lab-origin" not in peer.headers[sid] and peer.headers[sid]["server"] == "sni-lab"
    assert b"no origin was contacted" in peer.body[sid]


@pytest.mark.parametrize("headers,status", [
    (get("/" + "a" * 9000), 414),
    (get() + [(f"x-h{i}", "v") for i in range(300)], 431),
    (get() + [("x-big", "v" * 9000)], 431),
    (get() + [(f"x-h{i}", "v" * 4000) for i in range(9)], 431),
], ids=["path-over-cap", "300-headers", "field-over-cap", "header-list-over-cap"])
async def test_oversized_request_is_refused_for_its_stream(lab, headers, status):
    peer = await Peer.open(lab)
    sid = peer.request(headers)
    ok = peer.request(get())
    await peer.until(lambda: peer.done(sid) and peer.done(ok))
    peer.close()
    assert peer.status[sid] == status and "origin=" not in peer.headers[sid]["x-lab-decision"]
    assert peer.status[ok] == 200


async def test_the_decision_event_keeps_an_excerpt_of_the_path(lab):
    peer = await Peer.open(lab)
    sid = peer.request(get("/" + "p" * 8000) + [("x-lab-trace", "t-long-path")])
    await peer.until(lambda: peer.done(sid))
    peer.close()
    assert peer.status[sid] == 404  # under the cap: the origin answers
    decision = next(e for e in lab.events.trace("t-long-path") if e["kind"] == "route.decision")
    assert decision["origin"] == "victim" and len(decision["path"]) <= lab.world.limits.event_field


async def test_a_repeated_header_block_is_decided_and_checked_for_every_stream(lab):
    """Clients repeat their header block from stream to stream: each is still a request of its own,
    decided and told once, and a block that differs by one bad field is refused, the good one not."""
    good = get() + [("x-lab-trace", "t-repeated-block")]
    peer = await Peer.open(lab)
    sids = [peer.request(good) for _ in range(3)]
    bad = peer.request(good + [("x-a", " 1")])
    again = peer.request(good)
    await peer.until(lambda: all(peer.done(s) for s in sids + [bad, again]))
    peer.close()
    assert [peer.status[s] for s in sids + [bad, again]] == [200, 200, 200, 400, 200]
    decisions = [e for e in lab.events.trace("t-repeated-block") if e["kind"] == "route.decision"]
    assert [e["origin"] for e in decisions if e["origin"]] == ["victim"] * 4


async def test_malformed_is_one_pure_check_with_statuses():
    assert malformed(get()) is None
    assert malformed(get("*", "OPTIONS")) is None
    assert malformed(get("*")).status == 400
    assert malformed(get("/" + "a" * 9000)).status == 414


async def test_head_refusal_sends_no_body(lab):
    """A refused HEAD: the page's length, no DATA (RFC 9110 9.3.2); the next stream is answered whole."""
    peer = await Peer.open(lab)
    head = peer.request([(":method", "HEAD"), (":scheme", "https"), (":authority", "nothing.example"), (":path", "/")])
    ok = peer.request(get())
    await peer.until(lambda: peer.done(head) and peer.done(ok))
    peer.close()
    assert peer.status[head] == 421 and int(peer.headers[head]["content-length"]) > 0
    assert head not in peer.body and peer.status[ok] == 200 and len(peer.body[ok]) > 0
