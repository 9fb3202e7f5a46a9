"""The probe: connect with a chosen SNI, send a chosen host, verify against the lab CA.

Returns an `Outcome` of what the client saw. The chain is always verified against the
lab CA; whether the certificate is valid for a name is then answered per name
(`Outcome.cert_valid_for`), because the oracle asks it about the request's host, which
may differ from the SNI.
"""
from __future__ import annotations

import asyncio
import ssl
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events

from lab.hostnorm import wildcard_of


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        name = name.lower()
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def origin(self) -> str | None:
        return self.header("x-lab-origin")

    @property
    def decision(self) -> str | None:
        return self.header("x-lab-decision")


@dataclass
class Outcome:
    address: str
    port: int
    sni: str | None
    tls_error: str | None = None
    cert_names: list[str] = field(default_factory=list)
    cert_verified: bool = False
    alpn: str | None = None
    responses: list[Response] = field(default_factory=list)
    error: str | None = None
    ms: float = 0.0

    def cert_valid_for(self, name: str | None) -> bool:
        if not self.cert_verified or not name:
            return False
        name = name.lower().rstrip(".")
        return name in self.cert_names or (wildcard_of(name) or "\0") in self.cert_names

    @property
    def response(self) -> Response | None:
        return self.responses[0] if self.responses else None


def client_context(ca: str, alpn: list[str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(ca)
    ctx.check_hostname = False  # checked per name by the oracle, see Outcome.cert_valid_for
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(alpn)
    return ctx


def _cert_names(sslobj) -> list[str]:
    cert = sslobj.getpeercert() or {}
    return [v.lower() for k, v in cert.get("subjectAltName", ()) if k in ("DNS", "IP Address")]


async def probe(address: str, port: int, sni: str | None, requests: list[dict], ca: str, http2: bool = False,
                timeout: float = 5.0, local_addr: str | None = None) -> Outcome:
    """`local_addr` picks the client's source address (127.0.0.0/8 has many).

    requests: dicts with `host` (Host or :authority; None to omit), `path`, `method`, `headers` (extra
    (name, value) pairs) or `raw` (bytes sent as-is over HTTP/1.x, for what a polite client won't send)."""
    out = Outcome(address, port, sni)
    started = time.perf_counter()
    ctx = client_context(ca, ["h2"] if http2 else ["http/1.1"])
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, ssl=ctx, server_hostname=sni or None, ssl_handshake_timeout=timeout,
                                    local_addr=(local_addr, 0) if local_addr else None), timeout)
    except ssl.SSLCertVerificationError as e:
        out.tls_error = f"certificate rejected: {e.verify_message}"
        out.ms = (time.perf_counter() - started) * 1000
        return out
    except ssl.SSLError as e:
        out.tls_error = e.reason or str(e)
        out.ms = (time.perf_counter() - started) * 1000
        return out
    except (OSError, asyncio.TimeoutError) as e:
        out.error = f"connect: {e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__}"
        return out
    sslobj = writer.get_extra_info("ssl_object")
    out.cert_verified = True
    out.cert_names = _cert_names(sslobj)
    out.alpn = sslobj.selected_alpn_protocol()
    try:
        if out.alpn == "h2":
            out.responses = await asyncio.wait_for(_h2(reader, writer, requests), timeout)
        else:
            for req in requests:
                out.responses.append(await asyncio.wait_for(_h1(reader, writer, req), timeout))
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
        out.error = f"http: {type(e).__name__}: {e}"
    finally:
        writer.close()
    out.ms = (time.perf_counter() - started) * 1000
    return out


async def _h1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: dict) -> Response:
    raw = req.get("raw")
    if raw is None:
        lines = [f"{req.get('method', 'GET')} {req.get('path', '/')} HTTP/1.1"]
        if req.get("host") is not None:
            lines.append(f"Host: {req['host']}")
        lines += [f"{k}: {v}" for k, v in req.get("headers", ())]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode()
    writer.write(raw)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split()[1])
    headers = [tuple(x.strip() for x in line.split(":", 1)) for line in header_lines if ":" in line]
    length = next((int(v) for k, v in headers if k.lower() == "content-length"), None)
    if length is not None:
        body = await reader.readexactly(length)
    elif any(k.lower() == "transfer-encoding" for k, _ in headers):
        body = await _chunked(reader)
    else:
        body = await reader.read()
    return Response(status, headers, body)


async def _chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _h2(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, requests: list[dict]) -> list[Response]:
    """Several requests on one HTTP/2 connection, as a browser coalescing hosts would send them."""
    # No outbound validation: the probe must be able to send what a polite client would not
    # (a host header disagreeing with :authority) to see what the edge makes of it.
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8",
                                                                validate_outbound_headers=False))
    conn.initiate_connection()
    streams: dict[int, list] = {}
    for req in requests:
        sid = conn.get_next_available_stream_id()
        headers = [(":method", req.get("method", "GET")), (":scheme", "https"), (":path", req.get("path", "/"))]
        if req.get("host") is not None:
            headers.insert(1, (":authority", req["host"]))
        headers += [(k.lower(), v) for k, v in req.get("headers", ())]
        conn.send_headers(sid, headers, end_stream=True)
        streams[sid] = [None, [], bytearray(), False]
    writer.write(conn.data_to_send())
    await writer.drain()
    while not all(s[3] for s in streams.values()):
        data = await reader.read(65536)
        if not data:
            raise ConnectionError("connection closed before every stream ended")
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                hs = [(k, v) for k, v in event.headers if not k.startswith(":")]
                streams[event.stream_id][0] = int(dict(event.headers)[":status"])
                streams[event.stream_id][1] = hs
            elif isinstance(event, h2.events.DataReceived):
                streams[event.stream_id][2] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                streams[event.stream_id][3] = True
        writer.write(conn.data_to_send())
    return [Response(s[0] or 0, s[1], bytes(s[2])) for s in streams.values()]
