"""`sni-lab explain`: the story of one case, step by step, for a person.

From a `lab.results.CaseResult` and, when the lab recorded them, its events (the resolver's
answer, the TLS handshake, the edge's `route.decision`, the origin's hit), each request is
told as DNS -> TLS -> the edge's decision -> the origin -> the verdict.

Pure: no I/O; text from the outside is made terminal-safe with `report.clean`.
"""
from __future__ import annotations

import re
import textwrap
from typing import Any

from lab.oracle import name_asked
from lab.policy import Decision
from lab.report import clean, paint, verdict_style, wrap
from lab.results import CaseResult, RequestResult, matches, parse_decision


def _norm(name: Any) -> str:
    """A name from an event, normalised as the oracle normalises the name a request asked for."""
    return name_asked(None, str(name or "")) or ""


def _clean_block(text: str) -> str:
    """Like `clean`, but keeps line breaks (stories, lessons)."""
    return "\n".join(clean(line) for line in str(text).replace("\r\n", "\n").split("\n"))


def _recorded(e: dict | None) -> Decision | None:
    """The decision a `route.decision` event recorded."""
    if e is None:
        return None
    return Decision(model=str(e.get("model") or ""), rule=str(e.get("rule") or ""), reason=str(e.get("reason") or ""),
                    origin=e.get("origin") or None, status=int(e.get("status") or 0), code=str(e.get("code") or ""))


class _EventIndex:
    """Assigns a case's events to its requests: route.decision by trace (then host, then
    order), tls.* by the decision's connection (else connections in order), origin.hit by
    trace (then origin), dns.answer by the name asked."""

    def __init__(self, events: list[dict], requests: list[RequestResult]) -> None:
        self.dns = [e for e in events if e.get("kind") in ("dns.answer", "dns.error")]
        routes = [e for e in events if e.get("kind") == "route.decision"]
        hits = [e for e in events if e.get("kind") in ("origin.hit", "origin.error")]
        tls = [e for e in events if str(e.get("kind", "")).startswith("tls.")]
        conns: dict[str, list[dict]] = {}
        for e in tls:
            conns.setdefault(str(e.get("conn") or e.get("trace")), []).append(e)
        self.route: dict[int, dict] = {}
        used: set[int] = set()

        def by_trace(q: RequestResult, e: dict) -> bool:
            return bool(q.trace) and e.get("trace") == q.trace

        def by_name(q: RequestResult, e: dict) -> bool:
            return bool(q.name) and _norm(e.get("host") or e.get("sni")) == q.name

        def in_order(q: RequestResult, e: dict) -> bool:
            return True

        for matcher in (by_trace, by_name, in_order):
            for i, q in enumerate(requests):
                if i in self.route or (matcher is not by_trace and q.tls_error):
                    continue  # a failed handshake has no decision, unless its own trace says otherwise
                for k, e in enumerate(routes):
                    if k in used or (matcher is not by_trace and q.trace and e.get("trace")):
                        continue  # both traced, and not the same trace: not this request's
                    if matcher(q, e):
                        self.route[i] = e
                        used.add(k)
                        break
        self.hit: dict[int, dict] = {}
        used_hits: set[int] = set()
        for i, q in enumerate(requests):
            trace = (self.route.get(i) or {}).get("trace") or q.trace
            pick = next((k for k, e in enumerate(hits) if k not in used_hits and trace and e.get("trace") == trace), None)
            if pick is None and q.origin:
                pick = next((k for k, e in enumerate(hits) if k not in used_hits and e.get("origin") == q.origin
                             and not e.get("trace")), None)
            if pick is not None:
                used_hits.add(pick)
                self.hit[i] = hits[pick]
        self.tls: dict[int, list[dict]] = {}
        taken = {str(e.get("conn")) for e in self.route.values() if e.get("conn")}
        spare = [c for c in conns if c not in taken]
        prev_conn = None
        for i, q in enumerate(requests):
            conn = (self.route.get(i) or {}).get("conn")
            if conn is not None and str(conn) in conns:
                self.tls[i] = conns[str(conn)] if str(conn) != prev_conn else []
                prev_conn = str(conn)
            elif conn is None and spare and (i == 0 or q.tls_error or _new_connection(requests[i - 1], q)):
                c = spare.pop(0)
                self.tls[i] = conns[c]
                prev_conn = c

    def dns_for(self, q: RequestResult, first: bool) -> list[dict]:
        if not q.dns:
            return self.dns if first else []
        asked = _norm(q.dns.split()[0]) if q.dns.split() else ""
        return [e for e in self.dns if _norm(e.get("name")) == asked] or (self.dns if first else [])


def _new_connection(prev: RequestResult, q: RequestResult) -> bool:
    def key(r: RequestResult) -> tuple:
        return r.address, r.port, r.sni, r.dns, tuple(r.cert_names), r.tls_error

    return key(prev) != key(q) or bool(q.tls_error)


def _event_line(e: dict) -> str:
    kind = e.get("kind", "?")
    if kind == "dns.answer":
        answers = ", ".join(map(str, e.get("answers") or [])) or f"no answer ({e.get('rcode', '?')})"
        extra = []
        if e.get("poisoned"):
            extra.append(f"poisoned by {e.get('override') or 'an override'}")
        if e.get("client"):
            extra.append(f"asked from {e['client']}")
        return (f"dns.answer: {_norm(e.get('name'))} {e.get('type', '')} -> {answers}"
                + (f" ({'; '.join(extra)})" if extra else ""))
    if kind == "dns.error":
        return f"dns.error: {e.get('reason', '?')}"
    if kind == "tls.clienthello":
        return (f"tls.clienthello: listener {e.get('listener', '?')} got SNI {e.get('sni') or '(none)'}"
                + (f" from {e['client']}" if e.get("client") else ""))
    if kind == "tls.cert":
        names = ", ".join(e.get("names") or []) or "(none)"
        extra = ", ".join(str(e[k]) for k in ("version", "alpn") if e.get(k))
        return f"tls.cert: listener {e.get('listener', '?')} served a certificate for {names}" + (
            f" ({extra})" if extra else "")
    if kind == "tls.error":
        return f"tls.error: listener {e.get('listener', '?')}: {e.get('error', '?')}"
    if kind == "route.decision":
        what = f"origin {e['origin']}" if e.get("origin") else f"refused {e.get('status') or ''} {e.get('code') or ''}".rstrip()
        return (f"route.decision: listener {e.get('listener', '?')}, sni {e.get('sni') or '(none)'}, host "
                f"{e.get('host') or '(none)'} -> {what}")
    if kind == "origin.hit":
        return (f"origin.hit: {e.get('origin', '?')} served {e.get('method', '')} {e.get('host', '')}"
                f"{e.get('path', '')} -> {e.get('status', '?')}")
    if kind == "origin.error":
        return f"origin.error: {e.get('origin', '?')}: {e.get('error', '?')}"
    rest = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("id", "ts", "kind", "trace"))
    return f"{kind}: {rest}"


def _decision_step(d: Decision) -> str:
    """Step 3: who decided (model, rule), what (route or refuse), and why."""
    who = ", ".join(f"{k} {v}" for k, v in (("model", d.model), ("rule", d.rule)) if v)
    refused = f"{d.status} {d.code}".strip() if d.status and not d.origin else ""
    act = f"route to origin {d.origin}" if d.origin else f"refuse ({refused})" if refused else "decided"
    return f"Edge decision{f' ({who})' if who else ''}: {act}." + (f" Reason: {d.reason}" if d.reason else "")


def explain(result: CaseResult, story: str = "", lesson: str = "", events: list[dict] | None = None,
            *, color: bool = False, width: int = 88) -> str:
    """The story of one case, in numbered steps per request: 1 DNS (or the listener it
    connected to directly), 2 TLS (SNI, certificate, valid for N or not, or the failure),
    3 the edge's decision and its reason, 4 the origin that answered or who refused,
    5 the verdict and why. A request that shares the previous one's address, SNI and
    certificate (keep-alive, HTTP/2 coalescing) gets steps 3-5 only. `events` (dicts with
    a `kind`, as the lab emits them) add what the edge, resolver and origins recorded."""
    r = result
    out: list[str] = []

    def p(text: str, style: str | None) -> str:
        return paint(text, style, color)

    def lines(text: str, first: str, rest: str) -> list[str]:
        return textwrap.wrap(clean(text), width=max(20, width), initial_indent=first, subsequent_indent=rest,
                             break_on_hyphens=False) or [first]

    def step(k: int, text: str) -> None:
        out.extend(lines(f"{k}. {text}", "  ", "     "))

    def note(e: dict) -> None:
        out.extend(lines(f"· {_event_line(e)}", "     ", "       "))

    idx = _EventIndex(list(events or []), r.requests)
    state = "passed" if r.passed else "FAILED"
    out += [p(f"{clean(r.id)} on {clean(r.engine)}", "head") + (f" — {clean(r.title)}" if r.title else ""),
           f"model {clean(r.model)} · engine {clean(r.engine)} · {r.ms:.0f} ms · verdict "
           f"{p(clean(r.verdict), verdict_style(r.verdict, False))} · {p(state, 'SAFE' if r.passed else 'fail')}"]
    if story.strip():
        for para in re.split(r"\n\s*\n", _clean_block(story).strip()):
            out += [""] + textwrap.wrap(" ".join(para.split()), width=width)
    n = len(r.requests)
    for i, q in enumerate(r.requests):
        out.append("")
        name = q.name
        shared = i > 0 and not _new_connection(r.requests[i - 1], q)
        head = f"Request {i + 1} of {n}" if n > 1 else "Request"
        detail = f"SNI {clean(q.sni) if q.sni else '(none)'}, host {clean(q.host) if q.host else '(none)'}"
        heading = f"{head}: {detail}" + (" — same address, SNI and certificate as the request before"
                                          if shared else "")
        out += [p(ln, "head") for ln in lines(heading, "", "  ")]
        tls_events = idx.tls.get(i, [])
        if not shared:
            target = f"{q.address}:{q.port}" if q.address else "no address"
            listener = next((e.get("listener") for e in tls_events + [idx.route.get(i) or {}] if e.get("listener")),
                            None)
            where = f"listener {listener} ({target})" if listener else target
            if q.dns:
                step(1, f"DNS: the lab resolver answered {q.dns}; the client connects to {where}.")
            else:
                step(1, f"No DNS: the client connected to {where} directly.")
            for e in idx.dns_for(q, i == 0):
                note(e)
            sni = f"SNI sent: {q.sni}." if q.sni else "no SNI sent."
            if q.tls_error:
                step(2, f"TLS: {sni} The handshake failed: {q.tls_error}. No request was sent.")
            elif q.cert_names:
                names = ", ".join(q.cert_names)
                if q.cert_valid:
                    verdict = f"valid for {name}: the padlock is green."
                else:
                    verdict = (f"NOT valid for {name or 'the name asked'}: a browser stops here; only a client "
                               f"that ignores it goes on.")
                step(2, f"TLS: {sni} Certificate served for {names} — {verdict}")
            else:
                step(2, f"TLS: {sni} No certificate information"
                        + ("." if q.status is None else f"; the request was still answered (HTTP {q.status})."))
            for e in tls_events:
                note(e)

        route = idx.route.get(i)
        said = parse_decision(q.decision)  # what the response's header said
        told = _recorded(route) or said  # what the edge recorded, else what the header said
        if told is None:
            step(3, "Edge decision: none — the connection ended in the handshake." if q.tls_error
                 else f"Edge decision: {q.decision}" if q.decision
                 else "Edge decision: not reported (no X-Lab-Decision header: not a lab edge, or no response).")
        else:
            step(3, _decision_step(told))
        if route is not None:
            note(route)

        status = f" (HTTP {q.status})" if q.status is not None else ""
        if q.origin:
            step(4, f"Origin: {q.origin} answered{status}.")
        elif q.tls_error:
            step(4, "Origin: none — nothing was sent past the handshake.")
        elif q.status is not None:
            code = (said or told).code if told else ""
            step(4, f"Origin: none — the edge answered itself (HTTP {q.status}{f', {code}' if code else ''}).")
        else:
            step(4, "Origin: none — no response came back.")
        if i in idx.hit:
            note(idx.hit[i])

        ok = matches(q.expected, q.outcome)
        verdict_lines = lines(f"5. Verdict: {q.verdict} — {q.why}", "  ", "     ")
        verdict_lines[0] = verdict_lines[0].replace(
            clean(q.verdict), p(clean(q.verdict), verdict_style(q.verdict, False)), 1)
        out += verdict_lines
        out.append(f"     expected {clean(q.expected)}, got {clean(q.outcome)} "
                   + (p("✓", "SAFE") if ok else p("✗ (mismatch)", "fail")))
    if not r.requests:
        out += ["", "(no requests were made)"]
    if r.failure:
        out += [""] + [p(ln, "fail") for ln in wrap(f"FAILED: {clean(r.failure)}", width, "")]
    if lesson.strip():
        out += ["", p("Lesson:", "head")]
        for k, para in enumerate(re.split(r"\n\s*\n", _clean_block(lesson).strip())):
            out += [""] * bool(k) + textwrap.wrap(" ".join(para.split()), width=width, initial_indent="  ",
                                                  subsequent_indent="  ")
    return "\n".join(out) + "\n"
