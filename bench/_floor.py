"""The floor under any Python edge on this machine: a bare TLS server, nothing of the lab's.

    .venv/bin/python -m bench._floor HOST CERT KEY   (prints its port, serves until SIGTERM; not a bench of
    its own: `python -m bench` skips modules named with a leading underscore)

uvloop, the stdlib's ssl over MemoryBIO as `lab.edge.tls` drives it, the edge's own TLS
settings (`certstore.server_context`), and one fixed answer per connection: no ClientHello
read, no HTTP parsing, no policy, no events, no origin. `bench.edge` puts it under the same
new-handshake load as our edge and nginx, so its CPU per handshake is what OpenSSL, the
kernel and the interpreter cost before the lab does anything; what our edge spends above
it is the lab's own. (uvloop's own TLS, `create_server(ssl=...)`, measured no cheaper.)
"""
from __future__ import annotations

import asyncio
import signal
import ssl
import sys

ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"


class Bare(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.shaken = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        answered = False
        try:
            if not self.shaken:
                self.tls.do_handshake()
                self.shaken = True
            if self.tls.read(65536):  # the request, whatever it is: answer it, then close
                self.tls.write(ANSWER)
                answered = True
                self.tls.unwrap()  # queues close_notify; raises WantRead waiting for the client's
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLError, OSError):
            self.transport.abort()
            return
        out = self.outgoing.read()
        if out:
            self.transport.write(out)
        if answered:
            self.transport.close()


async def serve(host: str, cert: str, key: str) -> None:
    from lab.edge.certstore import server_context

    ctx = server_context(cert, key)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Bare(ctx), host, 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.close()


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m bench._floor HOST CERT KEY", file=sys.stderr)
        return 2
    try:
        from uvloop import run
    except ImportError:
        run = asyncio.run
    run(serve(*argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
