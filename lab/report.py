"""What a run of the scenario catalog looks like to people and to CI: a terminal matrix
(`table`), JUnit XML (`junit`) and Markdown (`markdown`), all from `lab.results` data.

Pure: no I/O beyond the arguments (the caller passes the terminal width and whether to
use colors), stdlib only. Every text that came from the outside (scenario titles, TLS
errors, headers) is made safe for its destination: control characters never reach a
terminal (`clean`, shared with `lab.explain`), XML stays well-formed, Markdown cells
stay in their cell.
"""
from __future__ import annotations

import re
import textwrap
import unicodedata
import xml.etree.ElementTree as ET
from typing import Any

from lab.oracle import MISROUTED
from lab.results import (CaseResult, RequestResult, case_id, cell_verdicts, cells, engines_of, matches,
                         models_of, scenarios_of, summary, summary_line)
from lab.models import is_protected

__all__ = ["table", "junit", "markdown", "clean", "paint", "verdict_style", "wrap"]

# ---- text made safe, and painted ---------------------------------------------------------

_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def clean(text: Any) -> str:
    """One line of printable text: whitespace runs become one space, control and bidi
    characters are shown escaped (a scenario title must not drive the terminal)."""
    s = re.sub(r"[\t\r\n\v\f]+", " ", str(text))
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x100 and unicodedata.category(c) == "Cc"
                   else f"\\u{ord(c):04x}" if ord(c) in _BIDI or 0xD800 <= ord(c) <= 0xDFFF
                   else c for c in s)


def _width(s: str) -> int:
    """Columns a string takes on a terminal (wide East Asian characters and most emoji take 2)."""
    n = 0
    for c in s:
        if unicodedata.combining(c) or c in "\u200b\u200c\u200d\ufe0e\ufe0f":
            continue
        n += 2 if unicodedata.east_asian_width(c) in "WF" else 1
    return n


def _truncate(s: str, width: int) -> str:
    if _width(s) <= width:
        return s
    if width <= 0:
        return ""
    out, used = [], 0
    for c in s:
        w = _width(c)
        if used + w > width - 1:
            break
        out.append(c)
        used += w
    return "".join(out) + "…"


def wrap(text: str, width: int, indent: str) -> list[str]:
    return textwrap.wrap(text, width=max(20, width), initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False) or [indent]


_SGR = {"MISROUTED": "31", "SAFE": "32", "REFUSED": "33", "fail": "1;31", "flag": "1;35", "dim": "2",
        "head": "1"}


def paint(text: str, style: str | None, color: bool) -> str:
    if not color or not style or not text:
        return text
    return f"\x1b[{_SGR.get(style, style)}m{text}\x1b[0m"


def verdict_style(verdict: str, failed: bool) -> str | None:
    base = _SGR.get(verdict)
    if base is None:
        return "fail" if failed else None
    return f"1;{base}" if failed else verdict


# ---- terminal table -----------------------------------------------------------------------

FAIL_MARK, MISMATCH_MARK, MISSING, OFF_MARK = "✗", "≠", "-", "⊘"

Segments = list[tuple[str, str | None]]  # (text, style)


def _render(segs: Segments, color: bool) -> str:
    return "".join(paint(t, s, color) for t, s in segs)


def _seg_width(segs: Segments) -> int:
    return sum(_width(t) for t, _ in segs)


def _pad(segs: Segments, width: int, color: bool) -> str:
    return _render(segs, color) + " " * max(0, width - _seg_width(segs))


def _cell(by_engine: dict[str, list[CaseResult]] | None, engines: list[str]) -> Segments:
    if not by_engine:
        return [(MISSING, "dim")]
    failed = any(not r.passed for rs in by_engine.values() for r in rs)
    seen = cell_verdicts(by_engine)
    segs: Segments = []
    if len(set(seen.values())) > 1:
        for i, e in enumerate(x for x in engines if x in seen):
            if i:
                segs.append(("|", None))
            e_failed = any(not r.passed for r in by_engine[e])
            segs.append((clean(seen[e]), verdict_style(seen[e], e_failed)))
        segs.append((" " + MISMATCH_MARK, "flag"))
    else:
        verdict = next(iter(seen.values()))
        segs.append((clean(verdict), verdict_style(verdict, failed)))
    if any(r.controls_off for rs in by_engine.values() for r in rs):
        segs.append((" " + OFF_MARK, "flag"))
    if failed:
        segs.append((" " + FAIL_MARK, "fail"))
    return segs


def _wrap_items(items: list[Segments], width: int, color: bool, indent: str = "") -> list[str]:
    """Join items with ' · ' into lines no wider than `width` (an item never splits)."""
    lines, cur, cur_w = [], "", 0
    for item in items:
        w = _seg_width(item)
        if cur and cur_w + 3 + w > width:
            lines.append(cur)
            cur, cur_w = indent, len(indent)
        if cur.strip():
            cur, cur_w = cur + " · ", cur_w + 3
        cur, cur_w = cur + _render(item, color), cur_w + w
    if cur.strip():
        lines.append(cur)
    return lines


def table(results: list[CaseResult], *, color: bool, engines: list[str] | None = None,
          width: int = 100, titles: bool = True) -> str:
    """The matrix: a row per scenario, a column per model (MODELS order, present ones only),
    each cell the verdict; `✗` marks a failed case, `A|B ≠` engines that disagree (in
    `engines` order, default: order of appearance). Then a legend, the summary line, and
    the failed cases and engine mismatches with their reasons. Fits in `width` columns:
    long scenario names are truncated with …, the title column appears only when there
    is room for it (and `titles`)."""
    results = list(results)
    if not results:
        return "no cases\n"
    eng = engines_of(results, engines)
    several = len(eng) > 1
    models = models_of(results)
    by_cell = cells(results)
    scenarios = scenarios_of(results)
    title_of = {}
    for r in results:
        title_of.setdefault(r.scenario, clean(r.title or ""))

    grid = {(s, m): _cell(by_cell.get((s, m)), eng) for s in scenarios for m in models}
    col_w = {m: max([_width(m)] + [_seg_width(grid[(s, m)]) for s in scenarios]) for m in models}
    gap = "  "
    fixed = sum(col_w.values()) + len(gap) * len(models)
    names = {s: clean(s) for s in scenarios}
    natural = max([_width("scenario")] + [_width(n) for n in names.values()])
    name_w = max(min(natural, width - fixed), min(natural, 12))
    room = width - fixed - name_w - len(gap)
    show_titles = titles and room >= 12 and any(title_of.values())
    title_w = min(room, max(_width(t) for t in title_of.values())) if show_titles else 0

    def row(first: Segments, rest: list[Segments], last: Segments | None) -> str:
        parts = [_pad(first, name_w, color)] + [_pad(c, col_w[m], color) for c, m in zip(rest, models)]
        if last is not None:
            parts.append(_render(last, color))
        return gap.join(parts).rstrip()

    lines = [row([("scenario", "head")], [[(m, "head")] for m in models],
                 [("title", "head")] if show_titles else None)]
    rule_w = name_w + fixed + (len(gap) + title_w if show_titles else 0)
    lines.append("─" * min(rule_w, max(width, 1)))
    for s in scenarios:
        lines.append(row([(_truncate(names[s], name_w), None)], [grid[(s, m)] for m in models],
                         [(_truncate(title_of[s], title_w), "dim")] if show_titles else None))
    lines.append("")

    legend: list[Segments] = [[("MISROUTED", "MISROUTED"), (": valid certificate, wrong origin", None)],
                              [("SAFE", "SAFE"), (": authorized origin (or no valid certificate)", None)],
                              [("REFUSED", "REFUSED"), (": no origin reached", None)],
                              [(FAIL_MARK, "fail"), (" failed expectation", None)],
                              [(MISSING, "dim"), (" not run", None)]]
    if several:
        legend.append([("A|B ", None), (MISMATCH_MARK, "flag"), (f" engines differ ({'|'.join(eng)})", None)])
    if any(r.controls_off for r in results):
        legend.append([(OFF_MARK, "flag"), (" a control turned off by the scenario", None)])
    lines += _wrap_items(legend, width, color)

    s = summary(results)
    line = summary_line(s)
    bad = s["failed"] or s["protected_misrouted"] or s["engine_mismatches"]
    lines.append(paint(line, "fail" if bad else "SAFE", color))  # one line, never wrapped: CI logs grep it

    if s["failed_ids"]:
        lines += ["", paint("failed:", "fail", color)]
        for case_id, why in s["failures"].items():
            lines += wrap(f"{clean(case_id)}  {clean(why)}", width, "  ")
    if s["controls_off"]:
        lines += ["", paint("controls off (a protected model may be MISROUTED here):", "flag", color)]
        for case_id, off in s["controls_off"].items():
            lines += wrap(f"{clean(case_id)}  {clean(', '.join(off))}", width, "  ")
    if s["engine_mismatches"]:
        lines += ["", paint("engine mismatches:", "flag", color)]
        for m in s["engine_mismatches"]:
            told = ", ".join(f"{e} {v}" for e, v in m["verdicts"].items())
            lines += wrap(f"{clean(m['id'])}  {clean(told)}", width, "  ")
    return "\n".join(lines) + "\n"


# ---- JUnit XML ------------------------------------------------------------------------------

_XML_BAD = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _x(text: Any) -> str:
    """Text XML 1.0 can carry (ElementTree escapes <, & and quotes; it does not drop these)."""
    return _XML_BAD.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                        else f"\\u{ord(m.group()):04x}", str(text))


def _request_lines(q: RequestResult, i: int, total: int) -> list[str]:
    """The plain story of one request, for JUnit and Markdown-free contexts."""
    head = f"request {i}" + (f" of {total}" if total > 1 else "")
    target = f"{q.address}:{q.port}" if q.address else "(no address)"
    lines = [f"{head}: sni={q.sni or '(none)'} host={q.host or '(none)'} -> {target}"]
    if q.dns:
        lines.append(f"  dns: {q.dns}")
    if q.tls_error:
        lines.append(f"  tls: failed: {q.tls_error}")
    else:
        names = ", ".join(q.cert_names) or "(none)"
        lines.append(f"  cert: {names}; valid for {q.name or '(no name)'}: {'yes' if q.cert_valid else 'no'}")
    if q.decision:
        lines.append(f"  decision: {q.decision}")
    lines.append(f"  origin: {q.origin or '(none)'}; status: {q.status if q.status is not None else '(none)'}")
    lines.append(f"  verdict: {q.verdict}; why: {q.why}")
    mark = "ok" if matches(q.expected, q.outcome) else "MISMATCH"
    lines.append(f"  expected: {q.expected}; outcome: {q.outcome} ({mark})")
    if q.trace:
        lines.append(f"  trace: {q.trace}")
    return lines


def _story(r: CaseResult) -> str:
    lines = [f"{r.id} on {r.engine}: {r.verdict} ({'passed' if r.passed else 'FAILED'})"]
    if r.controls_off:
        lines.append(f"controls off: {', '.join(r.controls_off)}")
    lines += [f"setup: {note}" for note in r.setup]
    for i, q in enumerate(r.requests, 1):
        lines += _request_lines(q, i, len(r.requests))
    return "\n".join(lines) + "\n"


def junit(results: list[CaseResult], suite_name: str = "sni-lab") -> str:
    """JUnit XML for CI: <testsuites> holding one <testsuite> (tests, failures, errors,
    skipped, time), a <testcase classname="scenarios.<scenario>" name="<scenario>[<model>]">
    per case (`[engine]` appended when several engines ran), with <failure> when failed
    and the per-request story in <system-out>."""
    results = list(results)
    s = summary(results)
    several = len(s["engines"]) > 1
    seconds = f"{s['ms'] / 1000:.3f}"
    counts = {"tests": str(s["cases"]), "failures": str(s["failed"]), "errors": "0", "skipped": "0",
              "time": seconds}
    root = ET.Element("testsuites", {"name": _x(suite_name), **counts})
    suite = ET.SubElement(root, "testsuite", {"name": _x(suite_name), **counts})
    props = ET.SubElement(suite, "properties")
    for key, value in (("models", ",".join(s["models"])), ("engines", ",".join(s["engines"])),
                       ("summary", summary_line(s))):
        ET.SubElement(props, "property", {"name": key, "value": _x(value)})
    for r in results:
        case = ET.SubElement(suite, "testcase", {"classname": _x(f"scenarios.{r.scenario}"),
                                                 "name": _x(case_id(r, several)),
                                                 "time": f"{r.ms / 1000:.3f}"})
        if r.controls_off:
            case_props = ET.SubElement(case, "properties")
            ET.SubElement(case_props, "property", {"name": "controls_off", "value": _x(",".join(r.controls_off))})
        if not r.passed:
            message = r.failure or f"failed with verdict {r.verdict}"
            kind = MISROUTED if r.verdict == MISROUTED and is_protected(r.model) else "expectation"
            fail = ET.SubElement(case, "failure", {"message": _x(message), "type": kind})
            details = [message, ""] + [ln for i, q in enumerate(r.requests, 1)
                                       for ln in _request_lines(q, i, len(r.requests))]
            fail.text = _x("\n".join(details) + "\n")
        ET.SubElement(case, "system-out").text = _x(_story(r))
    ET.indent(root, space="  ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


# ---- Markdown -------------------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


def _md(text: Any) -> str:
    """Inline Markdown text that renders as itself and stays within a table cell."""
    return _MD_SPECIAL.sub(r"\\\1", clean(text))


def _code(text: Any) -> str:
    t = clean(text).replace("|", "\\|")
    fence = "``" if "`" in t else "`"
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def _md_request_lines(q: RequestResult, i: int) -> list[str]:
    """One request of a failed case, as a Markdown list item with its facts below."""
    target = f"{q.address}:{q.port}" if q.address else "(no address)"
    head = (f"{i}. SNI {_code(q.sni) if q.sni else '(none)'}, host {_code(q.host) if q.host else '(none)'}"
            f" → {_code(target)}")
    sub = []
    if q.dns:
        sub.append(f"DNS: {_md(q.dns)}")
    if q.tls_error:
        sub.append(f"TLS failed: {_md(q.tls_error)}")
    else:
        names = ", ".join(_code(n) for n in q.cert_names) or "(none)"
        sub.append(f"certificate: {names} — {'valid' if q.cert_valid else '**not valid**'} for "
                   f"{_code(q.name) if q.name else '(no name)'}")
    if q.decision:
        sub.append(f"decision: {_code(q.decision)}")
    sub.append(f"origin: {_code(q.origin) if q.origin else '(none)'}, status "
               f"{q.status if q.status is not None else '(none)'}")
    sub.append(f"verdict: **{_md(q.verdict)}** — {_md(q.why)}")
    ok = "✅" if matches(q.expected, q.outcome) else "❌"
    sub.append(f"expected {_code(q.expected)}, got {_code(q.outcome)} {ok}")
    if q.trace:
        sub.append(f"trace: {_code(q.trace)}")
    return [head] + [f"   - {x}" for x in sub]


def markdown(results: list[CaseResult]) -> str:
    """A Markdown report: title, summary, the matrix (❌ marks a failed case, ⚠️ engines
    that disagree), then a section per failed case with its requests."""
    results = list(results)
    s = summary(results)
    eng = s["engines"]
    several = len(eng) > 1
    models = s["models"]
    by_cell = cells(results)
    out = ["# sni-lab report", "", f"**{_md(summary_line(s))}**", ""]
    if results:
        out.append(f"Engines: {', '.join(_code(e) for e in eng)} · models: {', '.join(_code(m) for m in models)}"
                   f" · {s['ms'] / 1000:.1f} s of cases")
        out.append("")
    if s["protected_misrouted"]:
        out += [f"> **MISROUTED under a protected model:** {', '.join(_code(i) for i in s['protected_misrouted'])}",
                ""]
    if not results:
        return "\n".join(out) + "no cases\n"

    titles = {}
    for r in results:
        titles.setdefault(r.scenario, r.title or "")
    out.append("| scenario | " + " | ".join(_code(m) for m in models) + " | title |")
    out.append("|---|" + "---|" * len(models) + "---|")
    for sc in scenarios_of(results):
        row = [_code(sc)]
        for m in models:
            by_engine = by_cell.get((sc, m))
            if not by_engine:
                row.append("—")
                continue
            failed = any(not r.passed for rs in by_engine.values() for r in rs)
            seen = cell_verdicts(by_engine)
            if len(set(seen.values())) > 1:
                text = " / ".join(f"{_md(seen[e])} ({_md(e)})" for e in eng if e in seen) + " ⚠️"
            else:
                text = _md(next(iter(seen.values())))
            if any(r.controls_off for rs in by_engine.values() for r in rs):
                text += " ⊘"
            row.append(f"❌ {text}" if failed else text)
        row.append(_md(titles[sc]))
        out.append("| " + " | ".join(row) + " |")
    out += ["", "MISROUTED: a certificate valid for the name, and an origin not authorized for it answered · "
                "SAFE: an authorized origin answered (or the certificate was not valid for the name) · "
                "REFUSED: no origin reached · ❌ failed case" + (" · ⚠️ engines disagree" if several else "")
            + (" · ⊘ a control turned off by the scenario" if s["controls_off"] else ""), ""]
    if s["controls_off"]:
        out += ["## Cases with a control off", "",
                "A protected model may be MISROUTED in these: the scenario turned the control off to show what it "
                "prevents.", ""]
        out += [f"- {_code(i)}: {', '.join(_code(c) for c in off)}" for i, off in s["controls_off"].items()]
        out.append("")

    if s["engine_mismatches"]:
        out += ["## Engine mismatches", "", "| case | " + " | ".join(_code(e) for e in eng) + " |",
                "|---|" + "---|" * len(eng)]
        for m in s["engine_mismatches"]:
            out.append(f"| {_code(m['id'])} | " + " | ".join(_md(m["verdicts"].get(e, "—")) for e in eng) + " |")
        out.append("")

    failed = [r for r in results if not r.passed]
    if failed:
        out += ["## Failed cases", ""]
    for r in failed:
        out += [f"### {_md(case_id(r, several))}", "",
                f"- **failure:** {_md(r.failure or 'failed')}",
                f"- **scenario:** {_code(r.scenario)} — {_md(r.title)}",
                f"- **model:** {_code(r.model)} · **engine:** {_code(r.engine)} · **verdict:** {_md(r.verdict)}"
                f" · {r.ms:.0f} ms", ""]
        for i, q in enumerate(r.requests, 1):
            out += _md_request_lines(q, i)
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"

