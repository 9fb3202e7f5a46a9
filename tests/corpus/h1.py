"""HTTP/1.1 through the edge: smuggling shapes, size ladders, bodies every way, pipelining, hosts, slow clients.

`send` is a list of steps: bytes to write, or a float to wait that long (slow clients).
`expect` is one of
  ("status", {codes}, origin)   the first final response; origin None = the edge answered itself
  ("statuses", [codes])         pipelined: every response, in order
  ("answered", None)            any well-formed answer (or a close) from the edge; nothing crashes
  ("closed-within", seconds)    the edge closes the connection by then (timeouts)
"""
from __future__ import annotations

from tests.corpus import Case, unique

HOST = "www.victim.example"
EDGE = None  # origin None: the edge's own answer
LIMIT_LINE = 8190


def req(method="GET", path="/", headers=(("Host", HOST),), body=b"", version="HTTP/1.1") -> bytes:
    head = f"{method} {path} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
    return head.encode("latin-1") + body


LOGIN = b"user=a&password=b"


def _chunked(body: bytes, pieces: int, trailers: str = "") -> bytes:
    step = max(1, len(body) // pieces)
    out = b"".join(f"{len(body[i:i + step]):x}\r\n".encode() + body[i:i + step] + b"\r\n"
                   for i in range(0, len(body), step))
    return out + b"0\r\n" + trailers.encode() + b"\r\n"


def smuggling() -> list[Case]:
    h = f"Host: {HOST}\r\n"
    p = "POST /login HTTP/1.1\r\n"
    shapes = {
        "cl-te": p + h + "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "te-cl": p + h + "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
        "cl-cl-differ": p + h + "Content-Length: 3\r\nContent-Length: 5\r\n\r\nabcde",
        "cl-list": p + h + "Content-Length: 3, 5\r\n\r\nabcde",
        "cl-plus": p + h + "Content-Length: +3\r\n\r\nabc",
        "cl-negative": p + h + "Content-Length: -1\r\n\r\n",
        "cl-hex": p + h + "Content-Length: 0x3\r\n\r\nabc",
        "cl-space-inside": p + h + "Content-Length: 1 2\r\n\r\n" + "a" * 12,
        "cl-huge-number": p + h + "Content-Length: 99999999999999999999999\r\n\r\n",
        "te-xchunked": p + h + "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        "te-chunked-not-last": p + h + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        "te-identity": p + h + "Transfer-Encoding: identity\r\n\r\n",
        "te-gzip-only": p + h + "Transfer-Encoding: gzip\r\n\r\n",
        "te-space-before-colon": p + h + "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        "te-vtab": p + h + "Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
        "te-obs-fold": p + h + "Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
        "te-http10": "POST /login HTTP/1.0\r\n" + h + "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "te-twice": p + h + "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        "leading-space-header": p + " " + h + "Content-Length: 0\r\n\r\n",
        "chunk-size-overflow": p + h + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n",
        "chunk-size-bad-char": p + h + "Transfer-Encoding: chunked\r\n\r\n5g\r\nhello\r\n0\r\n\r\n",
        "chunk-ext-bare-cr": p + h + "Transfer-Encoding: chunked\r\n\r\n5;a\rb\r\nhello\r\n0\r\n\r\n",
        "chunk-data-too-long": p + h + "Transfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n",
        "chunk-missing-crlf": p + h + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello0\r\n\r\n",
        "chunk-lf-only": p + h + "Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n",
        "header-nul-value": "GET / HTTP/1.1\r\n" + h + "X-A: a\x00b\r\n\r\n",
        "header-cr-value": "GET / HTTP/1.1\r\n" + h + "X-A: a\rb\r\n\r\n",
        "header-name-space": "GET / HTTP/1.1\r\n" + h + "X Y: 1\r\n\r\n",
        "header-name-empty": "GET / HTTP/1.1\r\n" + h + ": x\r\n\r\n",
        "header-name-paren": "GET / HTTP/1.1\r\n" + h + "X(Y): 1\r\n\r\n",
        "header-no-colon": "GET / HTTP/1.1\r\n" + h + "NoColonHere\r\n\r\n",
        "request-line-extra-token": "GET / HTTP/1.1 extra\r\n" + h + "\r\n",
        "method-bad-char": "G(T / HTTP/1.1\r\n" + h + "\r\n",
        "method-lowercase": "get / HTTP/1.1\r\n" + h + "\r\n",
        "path-nul": "GET /a\x00b HTTP/1.1\r\n" + h + "\r\n",
        "path-space-tab": "GET /a\tb HTTP/1.1\r\n" + h + "\r\n",
        "version-garbage": "GET / HTXP/1.1\r\n" + h + "\r\n",
        "no-host-http11": "GET / HTTP/1.1\r\n\r\n",
        "two-hosts-same": "GET / HTTP/1.1\r\n" + h + h + "\r\n",
        "host-userinfo": f"GET / HTTP/1.1\r\nHost: user@{HOST}\r\n\r\n",
        "host-bad-port": f"GET / HTTP/1.1\r\nHost: {HOST}:abc\r\n\r\n",
        "host-empty": "GET / HTTP/1.1\r\nHost:\r\n\r\n",
        "host-list": f"GET / HTTP/1.1\r\nHost: {HOST}, app.saas.example\r\n\r\n",
        "host-0xff": f"GET / HTTP/1.1\r\nHost: {HOST}\xff\r\n\r\n",
        "host-soft-hyphen": f"GET / HTTP/1.1\r\nHost: {HOST}\xad\r\n\r\n",
        "host-ordinal-a": "GET / HTTP/1.1\r\nHost: www.victim.ex\xaample\r\n\r\n",
        "absolute-other-host": f"GET https://app.saas.example/ HTTP/1.1\r\n{h}\r\n",
    }
    why = {"no-host-http11": "RFC 9112 3.2: a 1.1 request without Host MUST get 400",
           **{k: "RFC 9112 3.2: a Host that is not a uri-host (ASCII) MUST get 400, never an IDNA-mapped guess"
              for k in ("host-0xff", "host-soft-hyphen", "host-ordinal-a")}}
    # RFC 9112 6.1: a transfer coding the server does not understand gets 501 (nginx too).
    unknown_coding = ("te-xchunked", "te-identity", "te-gzip-only")
    why.update({k: "RFC 9112 6.1: an unknown transfer coding: the edge's own 501, never forwarded"
                for k in unknown_coding})
    return [Case(f"smuggle-{k}" if not k.startswith(("host", "two-hosts", "absolute", "no-host")) else f"bad-{k}",
                 [v.encode("latin-1")], ("status", {501 if k in unknown_coding else 400}, EDGE),
                 why.get(k, "request smuggling / malformed head: the edge's own 400, never forwarded"))
            for k, v in shapes.items()]


def ladders() -> list[Case]:
    out = []
    fixed = len("GET  HTTP/1.1")
    for total in (1000, 4000, 8000):
        path = "/" + "a" * (total - fixed - 1)
        out.append(Case(f"line-{total}", [req(path=path)], ("status", {404}, "victim"), "under the 8190 line cap: forwarded"))
    for total in (LIMIT_LINE + 110, 9000, 16384, 65536):
        path = "/" + "a" * (total - fixed - 1)
        out.append(Case(f"line-{total}", [req(path=path)], ("status", {414}, EDGE),
                        "issue 6 / brief: a request line over 8190 gets 414"))
    for size in (1000, 4000, 8000):
        out.append(Case(f"field-{size}", [req(headers=(("Host", HOST), ("X-Pad", "p" * size)))],
                        ("status", {200}, "victim"), "one header field under 8190: forwarded"))
    for size in (8300, 16000, 60000):
        out.append(Case(f"field-{size}", [req(headers=(("Host", HOST), ("X-Pad", "p" * size)))],
                        ("status", {431, 400}, EDGE), "issue 6: one header field over 8190 refused by the edge"))
    for count in (60, 99):
        hs = (("Host", HOST),) + tuple((f"X-H{i}", "v") for i in range(count - 1))
        out.append(Case(f"count-{count}", [req(headers=hs)], ("status", {200}, "victim"), "up to 100 fields: forwarded"))
    for count in (101, 300, 2000):
        hs = (("Host", HOST),) + tuple((f"X-H{i}", "v") for i in range(count - 1))
        out.append(Case(f"count-{count}", [req(headers=hs)], ("status", {431, 400}, EDGE),
                        "issue 6/10: more than 100 header fields refused by the edge"))
    for n, size in ((4, 7000), (5, 7000), (10, 7000)):
        hs = (("Host", HOST),) + tuple((f"X-Big{i}", "b" * size) for i in range(n))
        ok = n * size < 32768
        out.append(Case(f"total-{n}x{size}", [req(headers=hs)],
                        ("status", {200}, "victim") if ok else ("status", {431, 400}, EDGE),
                        "all header fields together capped at 32 KiB"))
    return out


def bodies() -> list[Case]:
    form = (("Host", HOST), ("Content-Type", "application/x-www-form-urlencoded"))
    whole = req("POST", "/login", form + (("Content-Length", str(len(LOGIN))),), LOGIN)
    head, _, body = whole.partition(b"\r\n\r\n")
    chunked_head = req("POST", "/login", form + (("Transfer-Encoding", "chunked"),))
    ok = ("status", {303}, "victim")
    why = "issue 1: an HTTP/1.1 body reaches the origin; /login answers 303 with the session cookie"
    big = 1024 * 1024 + 1
    out = [
        Case("body-whole", [whole], ok, why),
        Case("body-split-after-head", [head + b"\r\n\r\n", 0.05, body], ok, why),
        Case("body-split-3", [head + b"\r\n\r\n" + body[:3], 0.05, body[3:9], 0.05, body[9:]], ok, why),
        Case("body-byte-by-byte", [head + b"\r\n\r\n"] + [x for b in body for x in (bytes([b]), 0.01)], ok, why),
        Case("body-chunked", [chunked_head + _chunked(LOGIN, 3)], ok, why),
        Case("body-chunked-split", [chunked_head, 0.05, _chunked(LOGIN, 1)], ok, why),
        Case("body-chunked-trailers", [chunked_head + _chunked(LOGIN, 2, "X-Trailer: 1\r\n")], ok, why),
        Case("body-expect-100", [req("POST", "/login", form + (("Content-Length", str(len(LOGIN))),
                                                              ("Expect", "100-continue"))), 0.3, LOGIN], ok, why),
        Case("body-empty-cl0", [req("POST", "/login", form + (("Content-Length", "0"),))], ("status", {400}, "victim"),
             "an empty login reaches the origin, which says 400"),
        Case("body-over-max", [req("POST", "/login", form + (("Content-Length", str(big)),), b"a" * big)],
             ("status", {413}, EDGE), "issue 1: MAX_BODY enforced: 413"),
        Case("body-100mb-announced", [req("POST", "/login", form + (("Content-Length", str(100 * 1024 * 1024)),)),
                                      *[b"a" * 65536] * 32], ("status", {413}, EDGE),
             "issue 1: a 100 MB body is refused with 413 early, never held in memory"),
        Case("body-chunked-over-max", [chunked_head + _chunked(b"a" * big, 17)], ("status", {413}, EDGE),
             "issue 1: MAX_BODY enforced on chunked bodies too"),
        Case("body-stalls", [req("POST", "/login", form + (("Content-Length", "100"),), b"user=a")],
             ("closed-within", 3.5), "issue 2: a body that stops coming is given up (body timeout)"),
        Case("body-then-pipelined-get", [whole + req()], ("statuses", [303, 200]),
             "issue 1: a body then the next request on the same connection"),
    ]
    return out


def pipelining() -> list[Case]:
    return [
        Case("pipeline-20", [req() * 20], ("statuses", [200] * 20), "pipelined requests answered in order"),
        Case("pipeline-200", [req() * 200], ("statuses", [200] * 200),
             "issue 4: more than the read-ahead bound still answered, with backpressure"),
        Case("pipeline-mixed-hosts", [b"".join(req(headers=(("Host", h),)) for h in
                                               (HOST, "app.saas.example", "evil.test", HOST))],
             ("statuses", [200, 200, 421, 200]), "each pipelined request decided on its own (v2)"),
        Case("pipeline-5000-unread", [req() * 5000], ("unread", None),
             "issue 4: 5000 pipelined GETs never read: bounded memory, nothing crashes"),
        Case("pipeline-bad-in-middle", [req() + b"GET / HTTP/1.1\r\nHost: a\r\nX Y: 1\r\n\r\n" + req()],
             ("statuses", [200, 400]), "a malformed request in a pipeline: answered 400, then closed"),
    ]


def hosts() -> list[Case]:
    def one(host: str) -> bytes:
        return req(headers=(("Host", host),))
    table = [
        ("evil.test", {421}, EDGE, "unknown host: 421, never a guess"),
        ("127.0.0.10", {421}, EDGE, "an IP literal is no zone's host"),
        ("[::1]", {421}, EDGE, "an IPv6 literal is no zone's host"),
        ("localhost", {421}, EDGE, "not a lab name"),
        ("www.newshop.test", {421}, EDGE, "not registered"),
        ("WWW.VICTIM.EXAMPLE.", {200}, "victim", "case and trailing dot normalised"),
        (f"{HOST}:443", {200}, "victim", "a port is not part of the host"),
        ("shop.customer.example", {200}, "saas", "an active custom hostname routes to its SaaS zone (v2)"),
        ("app.saas.example", {200}, "saas", "v2 routes by host"),
        ("other.victim.example", {421}, EDGE, "covered by the wildcard certificate, not a host of the zone"),
    ]
    out = [Case(f"host-{h}", [one(h)], ("status", codes, origin), why) for h, codes, origin, why in table]
    out += [
        Case("host-absolute-userinfo", [req(path=f"https://evil.test@{HOST}/", headers=(("Host", HOST),))],
             ("answered", None), "userinfo in absolute-form: answered, never misrouted"),
        Case("host-absolute-agrees", [req(path=f"https://{HOST}/x", headers=(("Host", HOST),))],
             ("status", {404}, "victim"), "absolute-form naming the same host: forwarded"),
        Case("host-http10-none", [b"GET / HTTP/1.0\r\n\r\n"], ("status", {200}, "victim"),
             "HTTP/1.0 without Host: the SNI is the name"),
    ]
    return out


def odd() -> list[Case]:
    return [
        # RFC 9112 3: recipients MAY split the request line on any whitespace; HTTP/0.9 may be served.
        Case("request-line-two-spaces", [b"GET  / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n"], ("answered", None),
             "tolerated by RFC 9112 3: answered, never misrouted"),
        Case("http09", [b"GET /\r\n\r\n"], ("answered", None), "HTTP/0.9: answered or closed, never misrouted"),
        Case("method-connect", [req("CONNECT", f"{HOST}:443", (("Host", f"{HOST}:443"),))], ("status", {400, 405, 501}, EDGE),
             "CONNECT is not routed as a request"),
        Case("method-trace", [req("TRACE")], ("answered", None), "answered, no crash"),
        Case("options-star", [req("OPTIONS", "*")], ("answered", None), "answered, no crash"),
        Case("upgrade-h2c", [req(headers=(("Host", HOST), ("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"),
                                          ("HTTP2-Settings", "AAMAAABkAAQAAP__")))], ("status", {200}, "victim"),
             "no h2c upgrade over TLS: an ordinary answer"),
        Case("upgrade-websocket", [req(headers=(("Host", HOST), ("Connection", "Upgrade"), ("Upgrade", "websocket"),
                                                ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                                ("Sec-WebSocket-Version", "13")))], ("answered", None),
             "answered, no crash"),
        Case("obs-text-value", [req(headers=(("Host", HOST), ("X-Latin", "caf\xe9")))], ("status", {200}, "victim"),
             "obs-text in a value is allowed (RFC 9110 5.5)"),
        Case("version-http2-in-h1", [req(version="HTTP/2.0")], ("status", {400, 505}, EDGE),
             "not an HTTP/1.x version"),
        Case("path-star-get", [req(path="*")], ("answered", None), "answered, no crash"),
        Case("slowloris-head", [b"G", 0.4, b"E", 0.4, b"T", 0.4, b" ", 0.4, b"/", 0.4, b" ", 0.4, b"H", 0.4, b"T",
                                0.4, b"T", 0.4, b"P"], ("closed-within", 2.5),
             "issue 2: a request head trickling in is cut off by the header timeout"),
        Case("idle-after-response", [req(), 0.0], ("closed-within", 5.0),
             "issue 2: an idle keep-alive connection is closed (idle timeout)"),
    ]


def attack() -> list[Case]:
    """The write-up's request and its neighbours on the SaaS zone's v1 address, in every protected model."""
    table = {
        # (sni, host): expected per model
        ("www.victim.example", "www.victim.example"): {"v1-waf": ({403}, EDGE), "v2": ({200}, "victim"),
                                                       "v2-strict": ({200}, "victim")},
        ("app.saas.example", "www.victim.example"): {"v1-waf": ({403}, EDGE), "v2": ({200}, "victim"),
                                                     "v2-strict": ({421}, EDGE)},
        ("shop.customer.example", "shop.customer.example"): {m: ({200}, "saas") for m in ("v1-waf", "v2", "v2-strict")},
        ("app.saas.example", "evil.test"): {"v1-waf": ({403}, EDGE), "v2": ({421}, EDGE), "v2-strict": ({421}, EDGE)},
        ("app.saas.example", "127.0.0.11"): {"v1-waf": ({403}, EDGE), "v2": ({421}, EDGE), "v2-strict": ({421}, EDGE)},
    }
    out = []
    for (sni, host), per_model in table.items():
        for model, (codes, origin) in per_model.items():
            out.append(Case(f"attack-{model}-{sni}-{host}", [req(headers=(("Host", host),))], ("status", codes, origin),
                            "DESIGN.md models: the protected models never hand a name to an origin not its owner's",
                            opts={"listener": "saas-v1", "sni": sni, "model": model}))
    return out


def cases() -> list[Case]:
    return unique(smuggling() + ladders() + bodies() + pipelining() + hosts() + odd() + attack())
