"""The edge's side of one HTTP/2 connection (RFC 9113), sans-IO: bytes in, happenings out, bytes to send.

Why not h2: measured per request of the bench's h2load load, h2's state machine alone cost
135-189 us on this machine, more than nginx's whole request (60-90 us of CPU) and most of
the edge's, with its header validation already off (bench/README.md, "HTTP/2"). This is the part of it the edge uses: a server connection, no push, priorities read
and ignored, no h2c. Header blocks are HPACK by `hpack` (h2's own), through its public API.

What the peer may do wrong is answered as RFC 9113 says: a connection error queues GOAWAY
with its code and raises `ProtocolError`; a stream error queues RST_STREAM and tells the
stream as reset. The request checks (pseudo-headers, field syntax, sizes) are not here: they
are `contract.h2_head`'s, the same for both engines.

Two shortcuts, both exact: a header block made only of one-byte indexed fields changes no
HPACK table, so when the next block is the same bytes it decodes to the same fields (clients
repeat their requests), and likewise an answer whose fields encoded to such a block encodes to
it again, until a field or the table size changes.
"""
from __future__ import annotations

import struct

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

# Error codes (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x9, 0xb

# Settings (RFC 9113 6.5.2).
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE, MAX_HEADER_LIST_SIZE = \
    range(1, 7)

# What `receive` tells, each as (what, stream id, a, b):
ON_REQUEST = "request"        # a: the header fields [(bytes, bytes)]
ON_DATA = "data"              # a: the data, b: its flow-controlled length (hand it back when done),
                              # and a fifth: whether END_STREAM came with it
ON_ENDED = "ended"            # the peer's side of the stream is done
ON_RESET = "reset"            # the stream is gone (reset by the peer, or by a stream error); a: the code
ON_WINDOW = "window"          # more may be sent (WINDOW_UPDATE, or a larger initial window)
ON_SETTINGS = "settings"      # the peer's SETTINGS (acknowledged here)
ON_SETTINGS_ACK = "settings-ack"
ON_PING = "ping"              # answered here
ON_PING_ACK = "ping-ack"
ON_PRIORITY = "priority"
ON_UNKNOWN = "unknown"        # a frame type this side does not know: ignored (RFC 9113 5.5)
ON_GOAWAY = "goaway"          # the peer is ending the connection

MAX_WINDOW = 2 ** 31 - 1
FRAME_MAX = 16384             # the largest frame this side takes (it never raises SETTINGS_MAX_FRAME_SIZE)
HEADER_TABLE = 4096           # the HPACK table this side keeps for its answers, whatever the peer allows
DECODED_MAX = 65536           # a header block decoding to more is a connection error (h2's default); less
                              # than that over MAX_HEADER_LIST_SIZE is h2_head's 431 for its stream
BLOCK_MAX = 256 * 1024        # HEADERS + CONTINUATION bytes of one block (CONTINUATION flood)
_RECENT = 256                 # streams reset lately, whose frames in flight are ignored
_HEAD = struct.Struct(">HBBBL")
_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


class ProtocolError(Exception):
    """A connection error: GOAWAY with `code` is queued; the connection is over."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


class StreamClosed(Exception):
    """The stream cannot carry what was asked (it is closed, or this side already ended it)."""


def _frame(type_: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _HEAD.pack(n >> 8, n & 0xFF, type_, flags, sid) + payload


def _one_byte_indexed(block: bytes) -> bool:
    """Every byte an indexed field of one byte (1xxxxxxx, and not 0xFF, which continues): no table change."""
    return bool(block) and min(block) >= 0x80 and 0xFF not in block


class _Stream:
    __slots__ = ("remote_open", "local_open", "out_window", "in_window")

    def __init__(self, out_window: int, in_window: int, remote_open: bool) -> None:
        self.remote_open = remote_open
        self.local_open = True
        self.out_window = out_window
        self.in_window = in_window


class ServerConnection:
    """One connection, the server's side: `initiate`, then `receive` what the peer sent and
    `send_headers`/`send_data`/`reset`/`goaway`; `data_to_send` is what to write."""

    def __init__(self, settings: dict[int, int]) -> None:
        self.local = dict(settings)
        # Until the peer acknowledges them, it may still count on the defaults (RFC 9113 6.5.3).
        self._stream_window = max(settings.get(INITIAL_WINDOW_SIZE, 65535), 65535)
        self.in_window = 65535  # connection, inbound (RFC 9113 6.9.2); raised with increment_window
        self.out_window = 65535
        self.peer_initial_window = 65535
        self.max_frame = FRAME_MAX  # what the peer takes
        self.streams: dict[int, _Stream] = {}
        self.last_sid = 0  # the highest stream id the peer opened
        self.recent: dict[int, None] = {}  # reset lately, oldest first
        self.closed = False
        self._buf = bytearray()
        self._preface = True  # the client's magic is still to come
        self._settings_seen = False  # RFC 9113 3.4: the preface ends in a SETTINGS frame
        self._block: list | None = None  # [stream id, flags, self-dependent, fragments, size] awaiting CONTINUATION
        self._out: list[bytes] = []
        self.decoder = hpack.Decoder(max_header_list_size=max(DECODED_MAX, 2 * settings.get(MAX_HEADER_LIST_SIZE, 0)))
        self.encoder = hpack.Encoder()
        self.encoder.header_table_size = HEADER_TABLE
        self._last_block: bytes | None = None
        self._last_fields: list | None = None
        self._sent_fields: list | None = None
        self._sent_block = b""

    # ---- out --------------------------------------------------------------------------
    def initiate(self) -> None:
        self._out.append(_frame(SETTINGS, 0, 0, b"".join(_SETTING.pack(k, v) for k, v in self.local.items())))

    def data_to_send(self) -> bytes:
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def window(self, sid: int) -> int:
        """Bytes of DATA the stream may carry now (StreamClosed if it cannot carry any more)."""
        st = self._sendable(sid)
        return min(self.out_window, st.out_window)

    def send_headers(self, sid: int, fields: list[tuple[bytes, bytes]], end_stream: bool = False) -> None:
        st = self._sendable(sid)
        block = self._encode(fields)
        flags = END_STREAM if end_stream else 0
        size = self.max_frame
        if len(block) <= size:
            self._out.append(_frame(HEADERS, flags | END_HEADERS, sid, block))
        else:
            parts = [block[i:i + size] for i in range(0, len(block), size)]
            self._out.append(_frame(HEADERS, flags, sid, parts[0]))
            for part in parts[1:-1]:
                self._out.append(_frame(CONTINUATION, 0, sid, part))
            self._out.append(_frame(CONTINUATION, END_HEADERS, sid, parts[-1]))
        if end_stream:
            self._end_local(sid, st)

    def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        """`data` must fit `window(sid)` and `max_frame`."""
        st = self._sendable(sid)
        n = len(data)
        if n > self.max_frame or n > self.out_window or n > st.out_window:
            raise StreamClosed(f"{n} bytes over the window or frame size of stream {sid}")
        self.out_window -= n
        st.out_window -= n
        self._out.append(_frame(DATA, END_STREAM if end_stream else 0, sid, data))
        if end_stream:
            self._end_local(sid, st)

    def reset(self, sid: int, code: int) -> None:
        self.streams.pop(sid, None)
        self._remember(sid)
        self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(code)))

    def increment_window(self, n: int) -> None:
        """Hand `n` bytes of the connection's inbound window back to the peer."""
        if n <= 0 or self.in_window + n > MAX_WINDOW:
            raise ProtocolError(FLOW_CONTROL_ERROR, "window over 2^31-1")
        self.in_window += n
        self._out.append(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(n)))

    def goaway(self, code: int) -> None:
        if not self.closed:
            self.closed = True
            self._out.append(_frame(GOAWAY, 0, 0, _U32.pack(self.last_sid) + _U32.pack(code)))

    def _sendable(self, sid: int) -> _Stream:
        st = self.streams.get(sid)
        if st is None or not st.local_open or self.closed:
            raise StreamClosed(f"stream {sid} is closed")
        return st

    def _end_local(self, sid: int, st: _Stream) -> None:
        st.local_open = False
        if not st.remote_open:
            del self.streams[sid]

    def _encode(self, fields: list) -> bytes:
        if fields == self._sent_fields:
            return self._sent_block
        block = self.encoder.encode(fields)
        if _one_byte_indexed(block):
            self._sent_fields, self._sent_block = list(fields), block
        else:
            self._sent_fields = None
        return block

    def _remember(self, sid: int) -> None:
        recent = self.recent
        recent[sid] = None
        if len(recent) > _RECENT:
            del recent[next(iter(recent))]

    # ---- in ---------------------------------------------------------------------------
    def receive(self, data: bytes) -> list[tuple]:
        """What the peer's bytes say, in order; raises ProtocolError (GOAWAY queued) on a connection error."""
        if self.closed:
            return []
        try:
            return self._receive(data)
        except ProtocolError as e:
            self.goaway(e.code)
            raise

    def _receive(self, data: bytes) -> list[tuple]:
        buf = self._buf
        if buf:
            buf += data
            data = bytes(buf)
            buf.clear()
        pos = 0
        if self._preface:
            if len(data) < len(PREFACE):
                if not PREFACE.startswith(data):
                    raise ProtocolError(PROTOCOL_ERROR, "not the HTTP/2 client preface")
                self._buf += data
                return []
            if not data.startswith(PREFACE):
                raise ProtocolError(PROTOCOL_ERROR, "not the HTTP/2 client preface")
            self._preface = False
            pos = len(PREFACE)
        out: list[tuple] = []
        end = len(data)
        view = memoryview(data)
        while end - pos >= 9:
            hi, lo, type_, flags, sid = _HEAD.unpack_from(data, pos)
            length = (hi << 8) | lo
            if length > FRAME_MAX:
                raise ProtocolError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
            if end - pos - 9 < length:
                break
            payload = view[pos + 9:pos + 9 + length]
            pos += 9 + length
            self._frame(type_, flags, sid & 0x7FFFFFFF, payload, out)
            if self.closed:
                return out
        if pos < end:
            self._buf += view[pos:]
        return out

    def _frame(self, type_: int, flags: int, sid: int, payload: memoryview, out: list) -> None:
        if not self._settings_seen:
            if type_ != SETTINGS or flags & ACK:
                raise ProtocolError(PROTOCOL_ERROR, "the preface must end in SETTINGS")
            self._settings_seen = True
        if self._block is not None and (type_ != CONTINUATION or sid != self._block[0]):
            raise ProtocolError(PROTOCOL_ERROR, "a header block interrupted")
        if type_ == HEADERS:
            self._headers(flags, sid, payload, out)
        elif type_ == DATA:
            self._data(flags, sid, payload, out)
        elif type_ == CONTINUATION:
            self._continuation(flags, sid, payload, out)
        elif type_ == WINDOW_UPDATE:
            self._window_update(sid, payload, out)
        elif type_ == SETTINGS:
            self._settings(flags, sid, payload, out)
        elif type_ == PING:
            if sid:
                raise ProtocolError(PROTOCOL_ERROR, "PING on a stream")
            if len(payload) != 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "PING not of 8 bytes")
            if flags & ACK:
                out.append((ON_PING_ACK, 0, None, None))
            else:
                self._out.append(_frame(PING, ACK, 0, bytes(payload)))
                out.append((ON_PING, 0, None, None))
        elif type_ == RST_STREAM:
            self._rst_stream(sid, payload, out)
        elif type_ == PRIORITY:
            if not sid:
                raise ProtocolError(PROTOCOL_ERROR, "PRIORITY on stream 0")
            if len(payload) != 5:
                self._stream_error(sid, FRAME_SIZE_ERROR, out)
            elif _U32.unpack_from(payload)[0] & 0x7FFFFFFF == sid:
                self._stream_error(sid, PROTOCOL_ERROR, out)  # RFC 9113 5.3.1: a stream cannot depend on itself
            out.append((ON_PRIORITY, sid, None, None))
        elif type_ == GOAWAY:
            if sid:
                raise ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
            if len(payload) < 8:
                raise ProtocolError(FRAME_SIZE_ERROR, "GOAWAY under 8 bytes")
            out.append((ON_GOAWAY, 0, _U32.unpack_from(payload, 4)[0], None))
        elif type_ == PUSH_PROMISE:
            raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
        else:
            out.append((ON_UNKNOWN, sid, type_, None))

    def _stream_error(self, sid: int, code: int, out: list) -> None:
        if self._idle(sid):
            return  # RFC 9113 6.4: no RST_STREAM for an idle stream (a bad PRIORITY for one): ignored
        if self.streams.pop(sid, None) is not None:
            out.append((ON_RESET, sid, code, None))
        self._remember(sid)
        self._out.append(_frame(RST_STREAM, 0, sid, _U32.pack(code)))

    def _idle(self, sid: int) -> bool:
        return sid > self.last_sid

    def _headers(self, flags: int, sid: int, payload: memoryview, out: list) -> None:
        if not sid or not sid & 1:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on stream {sid}")
        start, stop = 0, len(payload)
        if flags & PADDED:
            if not stop:
                raise ProtocolError(FRAME_SIZE_ERROR, "PADDED HEADERS without its pad length")
            start, stop = 1, stop - payload[0]
        self_dependent = False
        if flags & PRIORITY_FLAG:
            if stop - start < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            self_dependent = _U32.unpack_from(payload, start)[0] & 0x7FFFFFFF == sid
            start += 5
        if stop < start:
            raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
        fragment = bytes(payload[start:stop])
        if not flags & END_HEADERS:
            self._block = [sid, flags, self_dependent, [fragment], len(fragment)]
            return
        self._header_block(sid, flags, self_dependent, fragment, out)

    def _continuation(self, flags: int, sid: int, payload: memoryview, out: list) -> None:
        block = self._block
        if block is None:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without HEADERS")
        block[3].append(bytes(payload))
        block[4] += len(payload)
        if block[4] > BLOCK_MAX:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"a header block over {BLOCK_MAX} bytes")
        if flags & END_HEADERS:
            self._block = None
            self._header_block(sid, block[1], block[2], b"".join(block[3]), out)

    def _header_block(self, sid: int, flags: int, self_dependent: bool, block: bytes, out: list) -> None:
        fields = self._decode(block)  # always: the HPACK state must follow every block
        ended = bool(flags & END_STREAM)
        st = self.streams.get(sid)
        if st is None:
            if sid in self.recent:
                return  # a stream reset lately: what was in flight is ignored
            if not self._idle(sid):
                raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on closed stream {sid}")
            self.last_sid = sid
            if self_dependent:
                self._stream_error(sid, PROTOCOL_ERROR, out)
                return
            self.streams[sid] = _Stream(self.peer_initial_window, self._stream_window, not ended)
            out.append((ON_REQUEST, sid, fields, None))
            if ended:
                out.append((ON_ENDED, sid, None, None))
            return
        # Trailers: they must end the stream (RFC 9113 8.1); their fields are not the edge's matter.
        if not st.remote_open:
            self._stream_error(sid, STREAM_CLOSED, out)
        elif not ended:
            self._stream_error(sid, PROTOCOL_ERROR, out)
        else:
            self._end_remote(sid, st, out)

    def _decode(self, block: bytes) -> list:
        if block == self._last_block:
            return self._last_fields
        try:
            fields = self.decoder.decode(block, raw=True)
        except hpack.OversizedHeaderListError as e:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"header block: {e}") from e
        except (hpack.HPACKError, IndexError, TypeError, UnicodeDecodeError) as e:
            raise ProtocolError(COMPRESSION_ERROR, f"header block: {e}") from e
        if _one_byte_indexed(block):
            self._last_block, self._last_fields = block, fields
        else:
            self._last_block = None
        return fields

    def _end_remote(self, sid: int, st: _Stream, out: list) -> None:
        st.remote_open = False
        out.append((ON_ENDED, sid, None, None))
        if not st.local_open:
            del self.streams[sid]

    def _data(self, flags: int, sid: int, payload: memoryview, out: list) -> None:
        if not sid:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        if length > self.in_window:
            raise ProtocolError(FLOW_CONTROL_ERROR, "DATA over the connection window")
        self.in_window -= length
        st = self.streams.get(sid)
        if st is None or not st.remote_open:
            if st is None and self._idle(sid):
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            if sid not in self.recent:
                self._stream_error(sid, STREAM_CLOSED, out)
            out.append((ON_DATA, sid, b"", length, False))  # for its window to be handed back
            return
        start, stop = 0, length
        if flags & PADDED:
            if not length or payload[0] >= length:
                raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
            start, stop = 1, length - payload[0]
        if length > st.in_window:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"DATA over the window of stream {sid}")
        st.in_window -= length
        ended = bool(flags & END_STREAM)
        out.append((ON_DATA, sid, bytes(payload[start:stop]), length, ended))
        if ended:
            self._end_remote(sid, st, out)

    def _window_update(self, sid: int, payload: memoryview, out: list) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "WINDOW_UPDATE not of 4 bytes")
        n = _U32.unpack_from(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not n:
                raise ProtocolError(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.out_window += n
            if self.out_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "connection window over 2^31-1")
            out.append((ON_WINDOW, 0, None, None))
            return
        st = self.streams.get(sid)
        if st is None:
            if self._idle(sid):
                raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not n:
            self._stream_error(sid, PROTOCOL_ERROR, out)
            return
        st.out_window += n
        if st.out_window > MAX_WINDOW:
            self._stream_error(sid, FLOW_CONTROL_ERROR, out)
            return
        out.append((ON_WINDOW, sid, None, None))

    def _rst_stream(self, sid: int, payload: memoryview, out: list) -> None:
        if not sid:
            raise ProtocolError(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "RST_STREAM not of 4 bytes")
        if self.streams.pop(sid, None) is not None:
            self._remember(sid)
            out.append((ON_RESET, sid, _U32.unpack_from(payload)[0], None))
        elif self._idle(sid):
            raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")

    def _settings(self, flags: int, sid: int, payload: memoryview, out: list) -> None:
        if sid:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if len(payload):
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            self._stream_window = self.local.get(INITIAL_WINDOW_SIZE, 65535)
            out.append((ON_SETTINGS_ACK, 0, None, None))
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        wider = False
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == HEADER_TABLE_SIZE:
                size = min(value, HEADER_TABLE)
                if size != self.encoder.header_table_size:
                    self.encoder.header_table_size = size
                    self._sent_fields = None  # the next block says the new size
            elif key == ENABLE_PUSH:
                if value > 1:
                    raise ProtocolError(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            elif key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, f"INITIAL_WINDOW_SIZE {value}")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for st in self.streams.values():  # RFC 9113 6.9.2: may go below zero
                    st.out_window += delta
                    if st.out_window > MAX_WINDOW:
                        raise ProtocolError(FLOW_CONTROL_ERROR, "a stream window over 2^31-1")
                wider = wider or delta > 0
            elif key == MAX_FRAME_SIZE:
                if not FRAME_MAX <= value <= 2 ** 24 - 1:
                    raise ProtocolError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self.max_frame = value
        self._out.append(_frame(SETTINGS, ACK, 0))
        out.append((ON_SETTINGS, 0, None, None))
        if wider:
            out.append((ON_WINDOW, 0, None, None))
