"""The edge's HTTP/2 framing (lab/edge/h2conn.py), sans-IO: h2 as the client on the other side,
and h2's own server side given every frame sequence of the hostile corpus, byte for byte."""
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lab.edge import h2conn as hc
from tests.corpus import h2 as c_h2

LOCAL = {hc.MAX_CONCURRENT_STREAMS: 128, hc.INITIAL_WINDOW_SIZE: 1 << 20, hc.MAX_HEADER_LIST_SIZE: 32768}
GET = [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/"), (b":authority", b"www.victim.example"),
       (b"accept", b"*/*")]
ANSWER = [(b":status", b"200"), (b"content-type", b"text/plain"), (b"x-lab-origin", b"saas")]


def server() -> hc.ServerConnection:
    conn = hc.ServerConnection(dict(LOCAL))
    conn.initiate()
    return conn


def client() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    c.initiate_connection()
    return c


def exchange(cl, sv) -> tuple[list, list]:
    """What the client queued goes to the server, and the server's answer back."""
    happenings = sv.receive(cl.data_to_send())
    return happenings, cl.receive_data(sv.data_to_send())


def connected():
    cl, sv = client(), server()
    exchange(cl, sv)
    exchange(cl, sv)  # the client's ACK of the server's SETTINGS
    return cl, sv


def of(kind, happenings):
    return [h for h in happenings if h[0] is kind]


def test_requests_and_answers_round_trip_with_h2_as_the_client():
    cl, sv = connected()
    for sid in (1, 3, 5):  # the same block three times: the repeat shortcut must decode as HPACK does
        cl.send_headers(sid, GET, end_stream=True)
    happenings, _ = exchange(cl, sv)
    assert [(h[1], list(h[2])) for h in of(hc.ON_REQUEST, happenings)] == [(s, GET) for s in (1, 3, 5)]
    assert [h[1] for h in of(hc.ON_ENDED, happenings)] == [1, 3, 5]
    for sid in (1, 3, 5):
        sv.send_headers(sid, ANSWER + [(b"content-length", b"5")])
        sv.send_data(sid, b"hello", end_stream=True)
    events = cl.receive_data(sv.data_to_send())
    answers = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
    assert [(e.stream_id, e.headers) for e in answers] == [(s, ANSWER + [(b"content-length", b"5")]) for s in (1, 3, 5)]
    assert [(e.stream_id, e.data) for e in events if isinstance(e, h2.events.DataReceived)] == \
        [(s, b"hello") for s in (1, 3, 5)]
    assert not sv.streams  # both sides ended: nothing kept


def test_the_edge_keeps_to_the_clients_windows_and_frame_size():
    cl, sv = client(), server()
    cl.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
    exchange(cl, sv)
    exchange(cl, sv)
    cl.send_headers(1, GET, end_stream=True)
    exchange(cl, sv)
    assert sv.window(1) == 100 and sv.max_frame == 16384
    with pytest.raises(hc.StreamClosed):
        sv.send_data(1, b"x" * 101)
    sv.send_headers(1, ANSWER)
    sv.send_data(1, b"x" * 100)
    assert sv.window(1) == 0
    events = cl.receive_data(sv.data_to_send())
    data = next(e for e in events if isinstance(e, h2.events.DataReceived))
    cl.acknowledge_received_data(data.flow_controlled_length, 1)
    happenings, _ = exchange(cl, sv)
    assert of(hc.ON_WINDOW, happenings) and sv.window(1) == 100


def test_a_smaller_stream_window_holds_once_the_peer_acknowledged_it():
    """RFC 9113 6.5.3: until its SETTINGS ACK a peer may count on the default 65535 bytes."""
    sv = hc.ServerConnection({hc.INITIAL_WINDOW_SIZE: 100})
    sv.initiate()
    sv.increment_window(1 << 20)
    early = c_h2.PREFACE + c_h2.frame(0x4, 0, 0, b"") + c_h2.frame(0x1, 0x4, 1, hpack.Encoder().encode(
        [(k.decode(), v.decode()) for k, v in GET]))
    sv.receive(early + c_h2.data(1, b"x" * 1000, end_stream=False))  # before the ACK: within 65535
    sv.receive(c_h2.frame(0x4, 0x1, 0, b""))  # the ACK
    sv.receive(c_h2.frame(0x1, 0x4, 3, bytes([0x82, 0x87, 0x84, 0xBE])))
    sv.receive(c_h2.frame(0x0, 0x0, 3, b"x" * 100))  # exactly the window
    with pytest.raises(hc.ProtocolError) as e:
        sv.receive(c_h2.frame(0x0, 0x0, 3, b"x"))
    assert e.value.code == hc.FLOW_CONTROL_ERROR


def test_a_large_answer_head_goes_out_in_continuation_frames():
    cl, sv = connected()
    cl.send_headers(1, GET, end_stream=True)
    exchange(cl, sv)
    big = ANSWER + [(b"x-big", b"v" * 40000)]
    sv.send_headers(1, big, end_stream=True)
    events = cl.receive_data(sv.data_to_send())
    assert next(e for e in events if isinstance(e, h2.events.ResponseReceived)).headers == big


def _headers_frame(sid: int, block: bytes) -> bytes:
    return c_h2.frame(0x1, 0x5, sid, block)  # END_STREAM | END_HEADERS


def test_a_repeated_block_after_the_table_changed_decodes_with_the_new_table():
    """The same bytes mean other fields once a literal has shifted the dynamic table: the shortcut
    must not answer from the old ones."""
    enc = hpack.Encoder()
    first = enc.encode([(":method", "GET"), (":path", "/"), ("x-a", "1")])  # x-a enters the table at 62
    indexed = bytes([0x82, 0x84, 0xBE])  # :method GET, :path /, index 62
    shifted = enc.encode([("x-b", "2")])  # x-b enters at 62, x-a moves to 63
    # Then the literal twice in a row: each time it enters the table again, so 64 is x-b, 65 x-a.
    blocks = [first, indexed, indexed, shifted, indexed, shifted, shifted, bytes([0x82, 0x84, 0xC0, 0xC1])]
    sv = server()
    happenings = sv.receive(c_h2.PREFACE + c_h2.frame(0x4, 0, 0, b"") +
                            b"".join(_headers_frame(1 + 2 * i, b) for i, b in enumerate(blocks)))
    reference = hpack.Decoder()
    expected = [list(reference.decode(b, raw=True)) for b in blocks]
    assert [list(h[2]) for h in of(hc.ON_REQUEST, happenings)] == expected
    assert expected[2][-1] == (b"x-a", b"1") and expected[4][-1] == (b"x-b", b"2")
    assert expected[7][-2:] == [(b"x-b", b"2"), (b"x-a", b"1")]


def test_a_repeated_answer_encodes_again_after_the_client_shrinks_the_table():
    cl, sv = connected()
    for sid in (1, 3):
        cl.send_headers(sid, GET, end_stream=True)
    exchange(cl, sv)
    for sid in (1, 3):
        sv.send_headers(sid, ANSWER, end_stream=True)
    cl.receive_data(sv.data_to_send())
    cl.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0})
    cl.send_headers(5, GET, end_stream=True)
    exchange(cl, sv)
    sv.send_headers(5, ANSWER, end_stream=True)  # must carry the size update: no index into a table of 0
    events = cl.receive_data(sv.data_to_send())
    assert next(e for e in events if isinstance(e, h2.events.ResponseReceived)).headers == ANSWER


class _Unbounded(h2.settings.Settings):
    @property
    def max_concurrent_streams(self) -> int:  # as the edge: the stream beyond its limit is refused above
        return 2 ** 31 - 1


def _h2_server() -> h2.connection.H2Connection:
    c = h2.connection.H2Connection(h2.config.H2Configuration(
        client_side=False, header_encoding=None, validate_inbound_headers=False, normalize_inbound_headers=False))
    c.local_settings = _Unbounded(client=False, initial_values={
        h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: LOCAL[hc.INITIAL_WINDOW_SIZE]})
    c.initiate_connection()
    c.increment_flow_control_window(10 << 20)
    return c


def _through_h2(chunks) -> tuple[bool, list[int]]:
    c, requests = _h2_server(), []
    for chunk in chunks:
        try:
            events = c.receive_data(chunk)
        except h2.exceptions.ProtocolError:
            return True, requests
        requests += [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)]
        if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
            break
    return False, requests


def _through_ours(chunks) -> tuple[bool, list[int]]:
    c, requests = server(), []
    c.increment_window(10 << 20)
    for chunk in chunks:
        try:
            happenings = c.receive(chunk)
        except hc.ProtocolError:
            assert c.data_to_send()[-17:][3] == hc.GOAWAY  # the GOAWAY is queued, last
            return True, requests
        requests += [h[1] for h in of(hc.ON_REQUEST, happenings)]
        if of(hc.ON_GOAWAY, happenings):
            break
    return False, requests


# Where the two differ on purpose (RFC 9113): h2 ends the connection, the edge only the stream, or not even that.
STREAM_LEVEL = {
    "frame-priority-bad-length": "a PRIORITY of the wrong length is a stream error (6.3)",
    "frame-priority-self-dependency": "a stream error (5.3.1) for an idle stream, which no RST_STREAM may answer (6.4)",
}
# ... and where the edge ends it and h2 does not: a rule h2 leaves to its user (the edge enforced it over h2 too).
EDGE_RULE = {"frame-no-settings-first": "the client preface ends in a SETTINGS frame (3.4)"}


@pytest.mark.parametrize("case", [c for c in c_h2.cases()], ids=lambda c: c.id)
def test_every_corpus_frame_sequence_ends_as_it_does_through_h2(case):
    """The same bytes to both: a connection error for the same inputs, requests on the same streams."""
    chunks = [c for c in case.send(c_h2.Writer())[0] if isinstance(c, bytes)]
    theirs, ours = _through_h2(chunks), _through_ours(chunks)
    if case.id in STREAM_LEVEL:
        assert theirs[0] and not ours[0], STREAM_LEVEL[case.id]
    elif case.id in EDGE_RULE:
        assert ours == (True, []) and not theirs[0], EDGE_RULE[case.id]
    else:
        assert ours == theirs


FRAME = st.tuples(st.integers(0, 10), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7, 2 ** 31 - 1]),
                  st.binary(max_size=40))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(FRAME, max_size=12), st.integers(1, 64))
def test_any_frame_sequence_is_a_connection_error_at_worst(frames, cut):
    """Whatever arrives, in whatever pieces: happenings or a ProtocolError with GOAWAY queued, never another
    exception; no stream id is told that the peer did not open."""
    wire = c_h2.PREFACE + c_h2.frame(0x4, 0, 0, b"") + b"".join(c_h2.frame(*f) for f in frames)
    c, opened = server(), set()
    for i in range(0, len(wire), cut):
        try:
            happenings = c.receive(wire[i:i + cut])
        except hc.ProtocolError:
            assert hc.GOAWAY in {c_h2_type for c_h2_type in _frame_types(c.data_to_send())}
            return
        for h in happenings:
            if h[0] is hc.ON_REQUEST:
                assert h[1] % 2 == 1 and h[1] not in opened
                opened.add(h[1])
            elif h[0] in (hc.ON_DATA, hc.ON_ENDED, hc.ON_RESET) and h[1] not in opened:
                assert h[0] is hc.ON_DATA and h[2] == b""  # only to hand a window back
        c.data_to_send()


def _frame_types(data: bytes):
    pos = 0
    while pos + 9 <= len(data):
        yield data[pos + 3]
        pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
