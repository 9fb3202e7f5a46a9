"""The edge's own answers (refusals, upstream failures), looking like a CDN's error pages.

Pure: a Decision in, (status, headers, body) out; both engines serve exactly these bytes.
"""
from __future__ import annotations

import html
import json
from http import HTTPStatus
from typing import TYPE_CHECKING

from lab.policy import Decision, refused

if TYPE_CHECKING:
    from lab.edge.upstream import Failure

SERVER = ("Server", "sni-lab")  # on every answer of the edge, its own and the origins' alike

_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{status} {phrase} | sni-lab edge</title>
<style>body{{font:16px system-ui,sans-serif;margin:3em auto;max-width:42em;color:#222}}
code{{background:#f3f3f3;padding:.1em .3em}}h1{{color:#b00}}</style></head>
<body><h1>Error {status}: {phrase}</h1>
<p>The sni-lab edge answered this request itself; no origin was contacted.</p>
<p>Lab error code: <code>{code}</code></p><p>{reason}</p>
<p><small>model <code>{model}</code> &middot; rule <code>{rule}</code></small></p></body></html>
"""


def wants_json(accept: str | None) -> bool:
    return bool(accept) and "application/json" in accept and "text/html" not in accept


def refusal(decision: Decision, accept: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    status = decision.status
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    if wants_json(accept):
        body = json.dumps({"status": status, "code": decision.code, "reason": decision.reason,
                           "model": decision.model, "rule": decision.rule, "host": decision.host}).encode()
        ctype = "application/json"
    else:
        body = _PAGE.format(status=status, phrase=phrase, code=html.escape(decision.code),
                            reason=html.escape(decision.reason), model=html.escape(decision.model),
                            rule=html.escape(decision.rule)).encode()
        ctype = "text/html; charset=utf-8"
    headers = [("Content-Type", ctype), ("Cache-Control", "no-store"), SERVER,
               ("X-Lab-Decision", decision.header())]
    return status, headers, body


def upstream_failure(decision: Decision, failure: "Failure",
                     accept: str | None = None) -> tuple[int, list[tuple[str, str]], bytes]:
    """The decision routed, but the origin gave no answer: 502, 503 or 504, saying which and why."""
    failed = refused(decision.model, failure.status, failure.code, f"origin {decision.origin} failed: {failure.reason}",
                     decision.host, decision.rule)
    status, headers, body = refusal(failed, accept)
    return status, headers[:-1] + [("X-Lab-Decision", decision.header())], body
