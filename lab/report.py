"""What a run of the scenario catalog looks like to people and to CI.

The runner (`lab.scenarios`) produces one `CaseResult` per case (a scenario under a model,
on one engine); this module only formats them: a terminal matrix (`table`), a summary
(`summary`, `summary_line`), JSON (`to_json`, read back by `from_json`), JUnit XML
(`junit`), Markdown (`markdown`) and the step-by-step story of one case (`explain`).

Pure: no I/O beyond the arguments (the caller passes the terminal width and whether to
use colors), stdlib only. Every text that came from the outside (scenario titles, TLS
errors, headers) is made safe for its destination: control characters never reach a
terminal, XML stays well-formed, Markdown cells stay in their cell.
"""
from __future__ import annotations

import json
import re
import textwrap
import unicodedata
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable

from lab.oracle import MISROUTED, REFUSED, SAFE, name_asked, worst
from lab.topology import MODELS, PROTECTED

VERDICTS = (MISROUTED, SAFE, REFUSED)

__all__ = ["VERDICTS", "PROTECTED", "MODELS", "RequestResult", "CaseResult", "table", "summary",
           "summary_line", "to_json", "from_json", "junit", "markdown", "explain", "parse_decision"]


@dataclass
class RequestResult:
    """One request of a case: what the client did, what it saw, and the oracle's verdict."""
    sni: str | None
    host: str | None
    address: str
    port: int
    dns: str | None  # "www.victim.example A 127.0.0.11 (poisoned by ovr-1)", None when not resolved
    cert_names: list[str]
    cert_valid: bool  # valid for the request's name N
    tls_error: str | None
    status: int | None
    origin: str | None  # X-Lab-Origin
    decision: str | None  # X-Lab-Decision
    verdict: str  # MISROUTED | SAFE | REFUSED
    why: str  # the oracle's one-line reason
    outcome: str  # "saas", "refused:403:waf-block", "tls:unrecognized_name"
    expected: str
    trace: str | None = None

    @property
    def name(self) -> str | None:
        """N, the name the client believes it is talking to."""
        return name_asked(self.sni, self.host)


@dataclass
class CaseResult:
    """One scenario under one model, on one engine."""
    scenario: str
    title: str
    model: str
    engine: str
    verdict: str  # worst over its requests: MISROUTED > SAFE > REFUSED
    passed: bool
    failure: str | None
    ms: float
    requests: list[RequestResult] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.scenario}[{self.model}]"


# ---- shared helpers ---------------------------------------------------------------------

def _engines(results: list[CaseResult], order: Iterable[str] | None = None) -> list[str]:
    out = [e for e in (order or ()) if any(r.engine == e for r in results)]
    for r in results:
        if r.engine not in out:
            out.append(r.engine)
    return out


def _models(results: list[CaseResult]) -> list[str]:
    present = {r.model for r in results}
    out = [m for m in MODELS if m in present]
    for r in results:  # a model this version does not know still gets a column, after the known ones
        if r.model not in out:
            out.append(r.model)
    return out


def _scenarios(results: list[CaseResult]) -> list[str]:
    return list(dict.fromkeys(r.scenario for r in results))


def _case_id(r: CaseResult, several_engines: bool) -> str:
    return f"{r.id}[{r.engine}]" if several_engines else r.id


def _cells(results: list[CaseResult]) -> dict[tuple[str, str], dict[str, list[CaseResult]]]:
    """(scenario, model) -> engine -> results (normally one)."""
    out: dict[tuple[str, str], dict[str, list[CaseResult]]] = {}
    for r in results:
        out.setdefault((r.scenario, r.model), {}).setdefault(r.engine, []).append(r)
    return out


_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A))


def _clean(text: Any) -> str:
    """One line of printable text: whitespace runs become one space, control and bidi
    characters are shown escaped (a scenario title must not drive the terminal)."""
    s = re.sub(r"[\t\r\n\v\f]+", " ", str(text))
    return "".join(f"\\x{ord(c):02x}" if ord(c) < 0x100 and unicodedata.category(c) == "Cc"
                   else f"\\u{ord(c):04x}" if ord(c) in _BIDI or 0xD800 <= ord(c) <= 0xDFFF
                   else c for c in s)


def _clean_block(text: str) -> str:
    """Like `_clean`, but keeps line breaks (stories, lessons)."""
    return "\n".join(_clean(line) for line in str(text).replace("\r\n", "\n").split("\n"))


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


def parse_decision(header: str | None) -> dict[str, str]:
    """The fields of an `X-Lab-Decision` header:
    "model=v1; rule=v1-listener; origin=saas; reason=..." -> {"model": "v1", ..., "reason": "..."}.
    The reason is the rest of the line (it may contain "; "). {} for None or a foreign header."""
    if not header:
        return {}
    head, sep, reason = header.partition("reason=")
    if sep and head and not head.endswith("; "):  # "reason=" inside another value
        head, sep, reason = header.partition("; reason=")
        head += "; "
    out: dict[str, str] = {}
    for part in head.split(";"):
        key, eq, value = part.strip().partition("=")
        if eq and key:
            out[key] = value.strip()
    if sep:
        out["reason"] = reason.strip()
    return out


# ---- summary ------------------------------------------------------------------------------

def summary(results: list[CaseResult]) -> dict:
    """Counts and lists a user or CI checks first. Keys (in this order):
    cases, passed, failed, ms, models, engines, verdicts {model: {verdict: n}}, totals
    {verdict: n}, failed_ids, failures {id: text}, misrouted {model: [ids]},
    protected_misrouted [ids], engine_mismatches [{id, scenario, model, verdicts {engine: v}}].
    Ids carry an `[engine]` suffix when the results span several engines."""
    results = list(results)
    engines = _engines(results)
    several = len(engines) > 1
    models = _models(results)
    extra = [v for v in dict.fromkeys(r.verdict for r in results) if v not in VERDICTS]
    kinds = [*VERDICTS, *extra]
    verdicts = {m: dict.fromkeys(kinds, 0) for m in models}
    totals = dict.fromkeys(kinds, 0)
    misrouted: dict[str, list[str]] = {m: [] for m in models}
    for r in results:
        verdicts[r.model][r.verdict] += 1
        totals[r.verdict] += 1
        if r.verdict == "MISROUTED":
            misrouted[r.model].append(_case_id(r, several))
    failed = [r for r in results if not r.passed]
    mismatches = []
    if several:
        for (scenario, model), by_engine in _cells(results).items():
            seen = {e: worst(x.verdict for x in rs) for e, rs in by_engine.items()}
            if len(set(seen.values())) > 1:
                mismatches.append({"id": f"{scenario}[{model}]", "scenario": scenario, "model": model,
                                   "verdicts": {e: seen[e] for e in engines if e in seen}})
    return {
        "cases": len(results),
        "passed": len(results) - len(failed),
        "failed": len(failed),
        "ms": round(sum(r.ms for r in results), 1),
        "models": models,
        "engines": engines,
        "verdicts": verdicts,
        "totals": totals,
        "failed_ids": [_case_id(r, several) for r in failed],
        "failures": {_case_id(r, several): r.failure or "failed" for r in failed},
        "misrouted": misrouted,
        "protected_misrouted": [i for m in models if m in PROTECTED for i in misrouted[m]],
        "engine_mismatches": mismatches,
    }


def summary_line(results_or_summary: list[CaseResult] | dict) -> str:
    """`N cases, P passed, F failed; MISROUTED: k under v1, 0 under protected models`."""
    s = results_or_summary if isinstance(results_or_summary, dict) else summary(results_or_summary)
    line = f"{s['cases']} cases, {s['passed']} passed, {s['failed']} failed"
    parts = [f"{len(s['misrouted'][m])} under {m}" for m in s["models"]
             if m not in PROTECTED and (m == "v1" or s["misrouted"][m])]
    if any(m in PROTECTED for m in s["models"]):
        bad = {m: len(s["misrouted"][m]) for m in s["models"] if m in PROTECTED and s["misrouted"][m]}
        detail = f" ({', '.join(f'{m}: {n}' for m, n in bad.items())})" if bad else ""
        parts.append(f"{len(s['protected_misrouted'])} under protected models{detail}")
    if parts:
        line += "; MISROUTED: " + ", ".join(parts)
    if len(s["engines"]) > 1:
        n = len(s["engine_mismatches"])
        line += (f"; engines {' vs '.join(s['engines'])}: {n} mismatch{'es' if n != 1 else ''}")
    return line


# ---- terminal table -----------------------------------------------------------------------

_SGR = {"MISROUTED": "31", "SAFE": "32", "REFUSED": "33", "fail": "1;31", "flag": "1;35", "dim": "2",
        "head": "1"}
FAIL_MARK, MISMATCH_MARK, MISSING = "✗", "≠", "-"

Segments = list[tuple[str, str | None]]  # (text, style)


def _paint(text: str, style: str | None, color: bool) -> str:
    if not color or not style or not text:
        return text
    return f"\x1b[{_SGR.get(style, style)}m{text}\x1b[0m"


def _render(segs: Segments, color: bool) -> str:
    return "".join(_paint(t, s, color) for t, s in segs)


def _seg_width(segs: Segments) -> int:
    return sum(_width(t) for t, _ in segs)


def _pad(segs: Segments, width: int, color: bool) -> str:
    return _render(segs, color) + " " * max(0, width - _seg_width(segs))


def _verdict_style(verdict: str, failed: bool) -> str | None:
    base = _SGR.get(verdict)
    if base is None:
        return "fail" if failed else None
    return f"1;{base}" if failed else verdict


def _cell(by_engine: dict[str, list[CaseResult]] | None, engines: list[str]) -> Segments:
    if not by_engine:
        return [(MISSING, "dim")]
    failed = any(not r.passed for rs in by_engine.values() for r in rs)
    seen = {e: worst(r.verdict for r in rs) for e, rs in by_engine.items()}
    segs: Segments = []
    if len(set(seen.values())) > 1:
        for i, e in enumerate(x for x in engines if x in seen):
            if i:
                segs.append(("|", None))
            e_failed = any(not r.passed for r in by_engine[e])
            segs.append((_clean(seen[e]), _verdict_style(seen[e], e_failed)))
        segs.append((" " + MISMATCH_MARK, "flag"))
    else:
        verdict = next(iter(seen.values()))
        segs.append((_clean(verdict), _verdict_style(verdict, failed)))
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


def _wrap(text: str, width: int, indent: str) -> list[str]:
    return textwrap.wrap(text, width=max(20, width), initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False) or [indent]


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
    eng = _engines(results, engines)
    several = len(eng) > 1
    models = _models(results)
    cells = _cells(results)
    scenarios = _scenarios(results)
    title_of = {}
    for r in results:
        title_of.setdefault(r.scenario, _clean(r.title or ""))

    grid = {(s, m): _cell(cells.get((s, m)), eng) for s in scenarios for m in models}
    col_w = {m: max([_width(m)] + [_seg_width(grid[(s, m)]) for s in scenarios]) for m in models}
    gap = "  "
    fixed = sum(col_w.values()) + len(gap) * len(models)
    names = {s: _clean(s) for s in scenarios}
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
    lines += _wrap_items(legend, width, color)

    s = summary(results)
    line = summary_line(s)
    bad = s["failed"] or s["protected_misrouted"] or s["engine_mismatches"]
    lines.append(_paint(line, "fail" if bad else "SAFE", color))  # one line, never wrapped: CI logs grep it

    if s["failed_ids"]:
        lines += ["", _paint("failed:", "fail", color)]
        for case_id, why in s["failures"].items():
            lines += _wrap(f"{_clean(case_id)}  {_clean(why)}", width, "  ")
    if s["engine_mismatches"]:
        lines += ["", _paint("engine mismatches:", "flag", color)]
        for m in s["engine_mismatches"]:
            told = ", ".join(f"{e} {v}" for e, v in m["verdicts"].items())
            lines += _wrap(f"{_clean(m['id'])}  {_clean(told)}", width, "  ")
    return "\n".join(lines) + "\n"


# ---- JSON -----------------------------------------------------------------------------------

def _case_dict(r: CaseResult) -> dict:
    return {"id": r.id, **asdict(r)}


def to_json(results: list[CaseResult]) -> str:
    """{"summary": summary(results), "cases": [case, ...]}; each case is its dataclass fields
    (in declaration order) after an "id" key. Indent 2, ASCII only, so it is always writable."""
    results = list(results)
    return json.dumps({"summary": summary(results), "cases": [_case_dict(r) for r in results]}, indent=2)


def from_json(text: str) -> list[CaseResult]:
    """The CaseResults of a `to_json` document (to re-render a saved run in another format)."""
    data = json.loads(text)
    cases = data["cases"] if isinstance(data, dict) else data
    req_keys = {f.name for f in fields(RequestResult)}
    case_keys = {f.name for f in fields(CaseResult)} - {"requests"}
    out = []
    for c in cases:
        reqs = [RequestResult(**{k: v for k, v in q.items() if k in req_keys}) for q in c.get("requests", [])]
        out.append(CaseResult(**{k: v for k, v in c.items() if k in case_keys}, requests=reqs))
    return out


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


def matches(expected: str, outcome: str) -> bool:
    """A scenario's expectation against what happened: `refused` matches `refused:403:waf-block`."""
    return outcome == expected or outcome.startswith(expected + ":")


def _story(r: CaseResult) -> str:
    lines = [f"{r.id} on {r.engine}: {r.verdict} ({'passed' if r.passed else 'FAILED'})"]
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
                                                 "name": _x(_case_id(r, several)),
                                                 "time": f"{r.ms / 1000:.3f}"})
        if not r.passed:
            message = r.failure or f"failed with verdict {r.verdict}"
            kind = "MISROUTED" if "MISROUTED under protected model" in message else "expectation"
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
    return _MD_SPECIAL.sub(r"\\\1", _clean(text))


def _code(text: Any) -> str:
    t = _clean(text).replace("|", "\\|")
    fence = "``" if "`" in t else "`"
    pad = " " if t.startswith("`") or t.endswith("`") else ""
    return f"{fence}{pad}{t}{pad}{fence}"


def markdown(results: list[CaseResult]) -> str:
    """A Markdown report: title, summary, the matrix (❌ marks a failed case, ⚠️ engines
    that disagree), then a section per failed case with its requests."""
    results = list(results)
    s = summary(results)
    eng = s["engines"]
    several = len(eng) > 1
    models = s["models"]
    cells = _cells(results)
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
    for sc in _scenarios(results):
        row = [_code(sc)]
        for m in models:
            by_engine = cells.get((sc, m))
            if not by_engine:
                row.append("—")
                continue
            failed = any(not r.passed for rs in by_engine.values() for r in rs)
            seen = {e: worst(r.verdict for r in rs) for e, rs in by_engine.items()}
            if len(set(seen.values())) > 1:
                text = " / ".join(f"{_md(seen[e])} ({_md(e)})" for e in eng if e in seen) + " ⚠️"
            else:
                text = _md(next(iter(seen.values())))
            row.append(f"❌ {text}" if failed else text)
        row.append(_md(titles[sc]))
        out.append("| " + " | ".join(row) + " |")
    out += ["", "MISROUTED: a certificate valid for the name, and an origin not authorized for it answered · "
                "SAFE: an authorized origin answered (or the certificate was not valid for the name) · "
                "REFUSED: no origin reached · ❌ failed case" + (" · ⚠️ engines disagree" if several else ""), ""]

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
        out += [f"### {_md(_case_id(r, several))}", "",
                f"- **failure:** {_md(r.failure or 'failed')}",
                f"- **scenario:** {_code(r.scenario)} — {_md(r.title)}",
                f"- **model:** {_code(r.model)} · **engine:** {_code(r.engine)} · **verdict:** {_md(r.verdict)}"
                f" · {r.ms:.0f} ms", ""]
        for i, q in enumerate(r.requests, 1):
            target = f"{q.address}:{q.port}" if q.address else "(no address)"
            out.append(f"{i}. SNI {_code(q.sni) if q.sni else '(none)'}, host {_code(q.host) if q.host else '(none)'}"
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
            out += [f"   - {x}" for x in sub]
        out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


# ---- explain --------------------------------------------------------------------------------

def _norm(name: Any) -> str:
    return str(name or "").strip().lower().rstrip(".")


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
        return _paint(text, style, color)

    def wrap(text: str, first: str, rest: str) -> list[str]:
        return textwrap.wrap(_clean(text), width=max(20, width), initial_indent=first, subsequent_indent=rest,
                             break_on_hyphens=False) or [first]

    def step(k: int, text: str) -> None:
        out.extend(wrap(f"{k}. {text}", "  ", "     "))

    def note(e: dict) -> None:
        out.extend(wrap(f"· {_event_line(e)}", "     ", "       "))

    idx = _EventIndex(list(events or []), r.requests)
    state = "passed" if r.passed else "FAILED"
    out += [p(f"{_clean(r.id)} on {_clean(r.engine)}", "head") + (f" — {_clean(r.title)}" if r.title else ""),
           f"model {_clean(r.model)} · engine {_clean(r.engine)} · {r.ms:.0f} ms · verdict "
           f"{p(_clean(r.verdict), _verdict_style(r.verdict, False))} · {p(state, 'SAFE' if r.passed else 'fail')}"]
    if story.strip():
        for para in re.split(r"\n\s*\n", _clean_block(story).strip()):
            out += [""] + textwrap.wrap(" ".join(para.split()), width=width)
    n = len(r.requests)
    for i, q in enumerate(r.requests):
        out.append("")
        name = q.name
        shared = i > 0 and not _new_connection(r.requests[i - 1], q)
        head = f"Request {i + 1} of {n}" if n > 1 else "Request"
        detail = f"SNI {_clean(q.sni) if q.sni else '(none)'}, host {_clean(q.host) if q.host else '(none)'}"
        heading = f"{head}: {detail}" + (" — same address, SNI and certificate as the request before"
                                          if shared else "")
        out += [p(ln, "head") for ln in wrap(heading, "", "  ")]
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
        fields_ = parse_decision(q.decision)
        if route is not None:
            fields_ = {**fields_, **{k: str(route[k]) for k in ("model", "rule", "origin", "reason")
                                     if route.get(k) not in (None, "")}}
            if route.get("status") and not route.get("origin"):
                fields_["refused"] = f"{route['status']} {route.get('code') or ''}".strip()
        if q.tls_error and not fields_:
            step(3, "Edge decision: none — the connection ended in the handshake.")
        elif fields_:
            head3 = ", ".join(f"{k} {fields_[k]}" for k in ("model", "rule") if fields_.get(k))
            if fields_.get("origin"):
                act = f"route to origin {fields_['origin']}"
            elif fields_.get("refused"):
                act = f"refuse ({fields_['refused']})"
            else:
                act = "decided"
            step(3, f"Edge decision{f' ({head3})' if head3 else ''}: {act}."
                    + (f" Reason: {fields_['reason']}" if fields_.get("reason") else ""))
        elif q.decision:
            step(3, f"Edge decision: {q.decision}")
        else:
            step(3, "Edge decision: not reported (no X-Lab-Decision header: not a lab edge, or no response).")
        if route is not None:
            note(route)

        status = f" (HTTP {q.status})" if q.status is not None else ""
        if q.origin:
            step(4, f"Origin: {q.origin} answered{status}.")
        elif q.tls_error:
            step(4, "Origin: none — nothing was sent past the handshake.")
        elif q.status is not None:
            code = fields_.get("refused", "").partition(" ")[2]
            step(4, f"Origin: none — the edge answered itself (HTTP {q.status}{f', {code}' if code else ''}).")
        else:
            step(4, "Origin: none — no response came back.")
        if i in idx.hit:
            note(idx.hit[i])

        ok = matches(q.expected, q.outcome)
        verdict_lines = wrap(f"5. Verdict: {q.verdict} — {q.why}", "  ", "     ")
        verdict_lines[0] = verdict_lines[0].replace(
            _clean(q.verdict), p(_clean(q.verdict), _verdict_style(q.verdict, False)), 1)
        out += verdict_lines
        out.append(f"     expected {_clean(q.expected)}, got {_clean(q.outcome)} "
                   + (p("✓", "SAFE") if ok else p("✗ (mismatch)", "fail")))
    if not r.requests:
        out += ["", "(no requests were made)"]
    if r.failure:
        out += [""] + [p(ln, "fail") for ln in _wrap(f"FAILED: {_clean(r.failure)}", width, "")]
    if lesson.strip():
        out += ["", p("Lesson:", "head")]
        for k, para in enumerate(re.split(r"\n\s*\n", _clean_block(lesson).strip())):
            out += [""] * bool(k) + textwrap.wrap(" ".join(para.split()), width=width, initial_indent="  ",
                                                  subsequent_indent="  ")
    return "\n".join(out) + "\n"
