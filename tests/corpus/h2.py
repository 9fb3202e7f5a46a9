"""HTTP/2 through the edge, frame by frame: malformed requests, size ladders, floods, stream limits, bad frames.

Frames are built with hyperframe and header blocks with hpack (the libraries h2 itself
is made of), so the corpus can send what the h2 state machine would refuse to: a
`RawH2` connection writes any frame sequence and reads back per-stream answers, RST_STREAMs,
GOAWAY and PING acknowledgements. `send` is a function of a `Writer` returning the
frames (bytes) to write and the stream ids whose answers to wait for.

`expect` is one of
  ("status", {codes}, origin)   the answer on stream 1 (origin None: the edge's own)
  ("streams", n_answered, refused_ids)  n streams answered, these reset with REFUSED_STREAM, no GOAWAY
  ("conn-error", None)          a connection error: GOAWAY (not NO_ERROR) or a close
  ("stream-refused", None)      RST_STREAM on stream 1, or a 4xx from the edge, connection fine
  ("calm", None)                a flood: the edge ends the connection (GOAWAY or close) before all of it is acked
  ("survives", None)            the awaited stream answered, or GOAWAY/close: anything but a hang or a crash
"""
from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass, field

import hpack
from hyperframe.frame import (ContinuationFrame, DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame,
                              PriorityFrame, RstStreamFrame, SettingsFrame, WindowUpdateFrame)

from tests.corpus import Case, unique

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HOST = "www.victim.example"
EDGE = None
REFUSED_STREAM, NO_ERROR = 0x7, 0x0
MAX_FRAME = 16384


class Writer:
    """Frames for one connection; one HPACK encoder so indexed headers stay consistent."""

    def __init__(self) -> None:
        self.enc = hpack.Encoder()

    def preface(self, **settings) -> bytes:
        return PREFACE + SettingsFrame(0, settings=settings).serialize()

    def headers(self, sid: int, headers, end_stream: bool = True, max_frame: int = MAX_FRAME) -> bytes:
        block = self.enc.encode(headers)
        parts = [block[i:i + max_frame] for i in range(0, len(block), max_frame)] or [b""]
        first = HeadersFrame(sid, data=parts[0], flags=(["END_STREAM"] if end_stream else [])
                             + (["END_HEADERS"] if len(parts) == 1 else []))
        out = first.serialize()
        for i, part in enumerate(parts[1:], 1):
            out += ContinuationFrame(sid, data=part, flags=["END_HEADERS"] if i == len(parts) - 1 else []).serialize()
        return out

    def get(self, sid: int, path: str = "/", authority: str = HOST, method: str = "GET", scheme: str = "https",
            extra=(), end_stream: bool = True) -> bytes:
        hs = [(":method", method), (":scheme", scheme), (":path", path), (":authority", authority), *extra]
        return self.headers(sid, hs, end_stream)


def data(sid: int, payload: bytes, end_stream: bool = True) -> bytes:
    out = b""
    for i in range(0, max(len(payload), 1), MAX_FRAME):
        last = i + MAX_FRAME >= len(payload)
        out += DataFrame(sid, data=payload[i:i + MAX_FRAME], flags=["END_STREAM"] if end_stream and last else []).serialize()
    return out


def frame(type_: int, flags: int, sid: int, payload: bytes) -> bytes:
    """A frame by hand, for what hyperframe will not serialise."""
    return len(payload).to_bytes(3, "big") + bytes([type_, flags]) + (sid & 0x7FFFFFFF).to_bytes(4, "big") + payload


@dataclass
class Stream:
    status: int | None = None
    headers: list = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    ended: bool = False
    reset: int | None = None

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class H2Result:
    streams: dict = field(default_factory=dict)
    goaway: int | None = None
    closed: bool = False
    pings_acked: int = 0
    alpn: str | None = None
    error: str | None = None


async def exchange(host: str, port: int, sni: str, ca: str, build, timeout: float) -> H2Result:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False
    ctx.set_alpn_protocols(["h2"])
    res = H2Result()
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni), timeout)
    res.alpn = writer.get_extra_info("ssl_object").selected_alpn_protocol()
    w = Writer()
    chunks, wait_for = build(w)
    dec = hpack.Decoder(max_header_list_size=1 << 20)
    buf = bytearray()
    pending: dict[int, bytearray] = {}

    def done() -> bool:
        if res.goaway is not None or res.closed:
            return True
        return bool(wait_for) and all(s in res.streams and (res.streams[s].ended or res.streams[s].reset is not None)
                                      for s in wait_for)

    async def read_loop() -> None:
        while not done():
            chunk = await reader.read(65536)
            if not chunk:
                res.closed = True
                return
            buf.extend(chunk)
            replies = b""
            while len(buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(buf[:9]))
                if len(buf) < 9 + length:
                    break
                f.parse_body(memoryview(bytes(buf[9:9 + length])))
                del buf[:9 + length]
                st = res.streams.setdefault(f.stream_id, Stream()) if f.stream_id else None
                if isinstance(f, (HeadersFrame, ContinuationFrame)):
                    pending.setdefault(f.stream_id, bytearray()).extend(f.data)
                    if "END_HEADERS" in f.flags:
                        hs = dec.decode(bytes(pending.pop(f.stream_id)))
                        status = next((v for k, v in hs if k == ":status"), None)
                        if status and not status.startswith("1"):
                            st.status = int(status)
                            st.headers = [(k, v) for k, v in hs if not k.startswith(":")]
                    if "END_STREAM" in getattr(f, "flags", ()) and isinstance(f, HeadersFrame):
                        st.ended = True
                elif isinstance(f, DataFrame):
                    st.body += f.data
                    if "END_STREAM" in f.flags:
                        st.ended = True
                    if f.flow_controlled_length:
                        replies += WindowUpdateFrame(0, window_increment=f.flow_controlled_length).serialize()
                        if not st.ended:
                            replies += WindowUpdateFrame(f.stream_id, window_increment=f.flow_controlled_length).serialize()
                elif isinstance(f, RstStreamFrame):
                    st.reset = f.error_code
                elif isinstance(f, GoAwayFrame):
                    res.goaway = f.error_code
                elif isinstance(f, SettingsFrame) and "ACK" not in f.flags:
                    replies += SettingsFrame(0, flags=["ACK"]).serialize()
                elif isinstance(f, PingFrame) and "ACK" in f.flags:
                    res.pings_acked += 1
            if replies:
                writer.write(replies)

    reading = asyncio.ensure_future(read_loop())
    try:
        for chunk in chunks:
            if isinstance(chunk, float):
                await asyncio.sleep(chunk)
                continue
            if reading.done():
                break
            writer.write(chunk)
            await asyncio.wait_for(writer.drain(), timeout)
        await asyncio.wait_for(asyncio.shield(reading), timeout)
    except (TimeoutError, asyncio.TimeoutError):
        res.error = "timeout"
    except (ConnectionError, OSError, ssl.SSLError) as e:
        res.closed = True
        res.error = f"{type(e).__name__}: {e}"
    except hpack.HPACKError as e:
        res.error = f"HPACK: {e}"
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)
        if reading.done() and not reading.cancelled() and reading.exception() is not None:
            res.error = f"{type(reading.exception()).__name__}: {reading.exception()}"
        writer.transport.abort()
    return res


def _one(headers=None, **kw):
    """A connection with one request on stream 1, built from the pseudo-headers given."""
    def build(w: Writer):
        hs = headers if headers is not None else [(":method", "GET"), (":scheme", "https"), (":path", "/"),
                                                  (":authority", HOST)]
        return [w.preface(), w.headers(1, hs, **kw)], {1}
    return build


def _pseudo(method="GET", scheme="https", path="/", authority=HOST, extra=()):
    hs = [(":method", method), (":scheme", scheme), (":path", path)]
    if authority is not None:
        hs.append((":authority", authority))
    return hs + list(extra)


def malformed() -> list[Case]:
    """Issue 10: requests the edge must refuse itself with its own 400 (RFC 9113 8.3), never forward."""
    why = "issue 10: malformed h2 request: the lab's own 400, no origin"
    bad = {
        "path-empty": _pseudo(path=""),
        "path-no-slash": _pseudo(path="x"),
        "path-space": _pseudo(path="/a b"),
        "path-tab": _pseudo(path="/a\tb"),
        "method-space": _pseudo(method="GE T"),
        "method-lowercase": _pseudo(method="get"),
        "method-empty": _pseudo(method=""),
        "header-name-tab": _pseudo(extra=[("x\tbad", "1")]),
        "header-name-upper": _pseudo(extra=[("X-Upper", "1")]),
        "header-name-colon": _pseudo(extra=[("x:y", "1")]),
        "header-name-empty": _pseudo(extra=[("", "1")]),
        "header-value-nul": _pseudo(extra=[("x-a", "a\x00b")]),
        "header-value-crlf": _pseudo(extra=[("x-a", "a\r\nx-b: c")]),
        "connection-header": _pseudo(extra=[("connection", "keep-alive")]),
        "te-not-trailers": _pseudo(extra=[("te", "gzip")]),
        "transfer-encoding": _pseudo(extra=[("transfer-encoding", "chunked")]),
        "upgrade-header": _pseudo(extra=[("upgrade", "h2c")]),
        "pseudo-after-regular": [(":method", "GET"), (":scheme", "https"), ("x-a", "1"), (":path", "/"),
                                 (":authority", HOST)],
        "pseudo-unknown": _pseudo(extra=[]) + [(":protocol", "websocket")],
        "pseudo-duplicate-path": _pseudo() + [(":path", "/other")],
        "missing-method": [(":scheme", "https"), (":path", "/"), (":authority", HOST)],
        "missing-path": [(":method", "GET"), (":scheme", "https"), (":authority", HOST)],
        "missing-scheme": [(":method", "GET"), (":path", "/"), (":authority", HOST)],
        "scheme-ftp": _pseudo(scheme="ftp"),
        "scheme-javascript": _pseudo(scheme="javascript"),
        "connect": [(":method", "CONNECT"), (":authority", f"{HOST}:443")],
        "connect-with-path": _pseudo(method="CONNECT"),
        "response-pseudo": _pseudo() + [(":status", "200")],
        "authority-userinfo": _pseudo(authority=f"user@{HOST}"),
        "authority-host-differ": _pseudo(extra=[("host", "app.saas.example")]),
    }
    return [Case(f"malformed-{k}", _one(hs), ("status", {400}, EDGE), why) for k, hs in bad.items()]


def ladders() -> list[Case]:
    out = []
    for n in (1000, 8000):
        out.append(Case(f"path-{n}", _one(_pseudo(path="/" + "a" * (n - 1))), ("status", {404}, "victim"),
                        "a :path under the cap: forwarded"))
    for n in (8300, 16384, 60000):
        out.append(Case(f"path-{n}", _one(_pseudo(path="/" + "a" * (n - 1))), ("status", {414}, EDGE),
                        "issue 6: :path capped like the HTTP/1.1 request line: 414 from the edge"))
    for n in (1000, 8000):
        out.append(Case(f"field-{n}", _one(_pseudo(extra=[("x-pad", "p" * n)])), ("status", {200}, "victim"),
                        "a header under the cap: forwarded"))
    for n in (8300, 16000, 60000):
        out.append(Case(f"field-{n}", _one(_pseudo(extra=[("x-pad", "p" * n)])), ("status", {431, 400}, EDGE),
                        "issue 6: header sizes capped alike on both protocols"))
    for n in (60, 150, 300):
        ok = n < 100  # the cap is 100 fields; whether the pseudo-headers count does not matter here
        out.append(Case(f"count-{n}", _one(_pseudo(extra=[(f"x-h{i}", "v") for i in range(n)])),
                        ("status", {200}, "victim") if ok else ("status", {431, 400}, EDGE),
                        "issue 10: at most 100 header fields"))
    return out


def _streams(n: int, reset_after: bool = False):
    """n requests at once; with reset_after each is cancelled at once (rapid reset), then one more is asked."""
    def build(w: Writer):
        chunks = [w.preface()]
        for i in range(n):
            sid = 1 + 2 * i
            chunks.append(w.get(sid))
            if reset_after:
                chunks.append(RstStreamFrame(sid, error_code=0x8).serialize())
        if reset_after:
            chunks.append(w.get(1 + 2 * n))
            return chunks, {1 + 2 * n}
        return chunks, {1 + 2 * i for i in range(n)}
    return build


def _hold_streams(n: int):
    """n requests whose bodies never end (the streams stay open), then one more that does."""
    def build(w: Writer):
        chunks = [w.preface()]
        for i in range(n):
            chunks.append(w.headers(1 + 2 * i, _pseudo(method="POST", path="/login"), end_stream=False))
        last = 1 + 2 * n
        chunks.append(w.get(last))
        return chunks, {last}
    return build


def _ping_flood(n: int, then_request: bool = True):
    def build(w: Writer):
        pings = b"".join(PingFrame(0, opaque_data=i.to_bytes(8, "big")).serialize() for i in range(n))
        return [w.preface(), pings] + ([w.get(1)] if then_request else []), {1}
    return build


def _settings_flood(n: int):
    def build(w: Writer):
        return [w.preface(), SettingsFrame(0, settings={SettingsFrame.ENABLE_PUSH: 0}).serialize() * n, w.get(1)], {1}
    return build


def _frames(*make):
    """A connection with these frames after the preface, then a request on stream 1."""
    def build(w: Writer):
        return [w.preface()] + [m(w) if callable(m) else m for m in make] + [w.get(1)], {1}
    return build


def floods() -> list[Case]:
    return [
        Case("streams-100", _streams(100), ("streams", 100, set()), "100 concurrent streams: all answered"),
        Case("stream-101-refused", _hold_streams(100), ("streams", 0, {201}),
             "issue 7: the 101st concurrent stream gets RST_STREAM REFUSED_STREAM, not GOAWAY"),
        Case("rapid-reset-200", _streams(200, reset_after=True), ("survives", None),
             "rapid reset (CVE-2023-44487): no crash, the edge stays up"),
        Case("ping-flood-5000", _ping_flood(5000), ("calm", 5000),
             "issue 5: a PING flood is rate-limited (nginx: 1000 control frames), the connection ended"),
        Case("settings-flood-3000", _settings_flood(3000), ("calm", None),
             "issue 5: a SETTINGS flood is rate-limited, the connection ended"),
        Case("empty-data-flood", _frames(lambda w: w.headers(1, _pseudo(method="POST", path="/login"), end_stream=False),
                                         data(1, b"", end_stream=False) * 3000),
             ("calm", None), "issue 5: empty DATA frames count as control frames"),
        Case("plain-get-after-preface", _frames(), ("status", {200}, "victim"), "a plain request after the preface"),
        Case("body-over-max-h2", lambda w: ([w.preface(), w.headers(1, _pseudo(method="POST", path="/login",
                                                                               extra=[("content-length", str(2 << 20))]),
                                                                    end_stream=False),
                                             data(1, b"a" * 65535, end_stream=False)], {1}),
             ("stream-refused", None), "issue 5: a body over the bound is refused (413 or RST_STREAM), not buffered"),
    ]


def bad_frames() -> list[Case]:
    why = "a connection error (RFC 9113): GOAWAY or close, no crash"
    table = {
        "bad-preface": lambda w: ([b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"], {1}),
        "no-settings-first": lambda w: ([PREFACE + PingFrame(0).serialize() + w.get(1)], {1}),
        "data-on-stream-0": _frames(frame(0x0, 0x1, 0, b"x")),
        "headers-on-stream-0": _frames(frame(0x1, 0x5, 0, b"\x82")),
        "settings-on-stream-1": _frames(frame(0x4, 0x0, 1, b"")),
        "settings-bad-length": _frames(frame(0x4, 0x0, 0, b"\x00\x01\x00")),
        "settings-window-too-big": _frames(frame(0x4, 0x0, 0, b"\x00\x04\x80\x00\x00\x00")),
        "settings-frame-size-small": _frames(frame(0x4, 0x0, 0, b"\x00\x05\x00\x00\x00\x01")),
        "settings-push-2": _frames(frame(0x4, 0x0, 0, b"\x00\x02\x00\x00\x00\x02")),
        "settings-ack-with-body": _frames(frame(0x4, 0x1, 0, b"\x00\x01\x00\x00\x00\x01")),
        "ping-bad-length": _frames(frame(0x6, 0x0, 0, b"\x00" * 7)),
        "ping-on-stream-1": _frames(frame(0x6, 0x0, 1, b"\x00" * 8)),
        "window-update-zero-conn": _frames(frame(0x8, 0x0, 0, b"\x00\x00\x00\x00")),
        "window-update-overflow": _frames(frame(0x8, 0x0, 0, b"\x7f\xff\xff\xff") * 2),
        "goaway-on-stream-1": _frames(frame(0x7, 0x0, 1, b"\x00" * 8)),
        "rst-on-idle-stream": _frames(frame(0x3, 0x0, 5, b"\x00\x00\x00\x08")),
        "rst-stream-0": _frames(frame(0x3, 0x0, 0, b"\x00\x00\x00\x08")),
        "data-on-idle-stream": _frames(frame(0x0, 0x1, 3, b"x")),
        "continuation-alone": _frames(frame(0x9, 0x4, 1, b"\x82")),
        "headers-even-stream": _frames(lambda w: w.headers(2, _pseudo())),
        "headers-bad-hpack": _frames(frame(0x1, 0x5, 1, b"\xff\xff\xff\xff\xff\xff")),
        "headers-hpack-index-0": _frames(frame(0x1, 0x5, 1, b"\x80")),
        "headers-hpack-table-size-huge": _frames(frame(0x1, 0x5, 1, b"\x3f\xe1\xff\xff\x0f\x82")),
        "frame-over-max-size": _frames(frame(0x0, 0x0, 1, b"x" * 20000)),
        "push-promise-from-client": _frames(frame(0x5, 0x4, 1, b"\x00\x00\x00\x02\x82")),
        "padded-too-long": _frames(frame(0x1, 0x0D, 1, b"\xff\x82")),
        "stream-id-decreasing": lambda w: ([w.preface(), w.get(5), w.get(3)], {3, 5}),
    }
    out = [Case(f"frame-{k}", b, ("conn-error", None), why) for k, b in table.items()]
    # Tolerated: unknown frame types and extension frames are ignored (RFC 9113 5.5).
    out += [Case("frame-unknown-type", _frames(frame(0xFA, 0x0, 0, b"hello")), ("status", {200}, "victim"),
                 "unknown frame types are ignored (RFC 9113 5.5)"),
            Case("frame-unknown-type-stream", _frames(frame(0xFB, 0xFF, 1, b"x" * 100)), ("status", {200}, "victim"),
                 "unknown frame types are ignored, whatever their stream"),
            Case("frame-priority-self-dependency", _frames(frame(0x2, 0x0, 3, b"\x00\x00\x00\x03\x10")),
                 ("survives", None), "a stream error on another stream (RFC 9113 5.3.1): no crash"),
            Case("frame-priority-bad-length", _frames(frame(0x2, 0x0, 3, b"\x00\x00")),
                 ("survives", None), "a stream error on another stream: no crash"),
            Case("frame-priority-valid", _frames(PriorityFrame(3, depends_on=1, stream_weight=16).serialize()),
                 ("status", {200}, "victim"), "a valid PRIORITY frame changes nothing")]
    return out


def cases() -> list[Case]:
    return unique(malformed() + ladders() + floods() + bad_frames())
