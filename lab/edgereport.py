"""PURE: the report of `sni-lab edges matrix` — edges x flavours x scenarios, in Markdown and HTML.

A column is one edge under one flavour (`nginx` `fixed`), or the lab's own edge under a model
(`lab` `v2`), the reference. A cell is the case's verdict; ✗ marks a failed case, ⚑ a
legitimate request refused (over-blocking, shown, never hidden), ≠ an outcome that differs from
the lab's reference model by kind or status (`results.agrees`). Then, per column, the cases
where it differs from the lab's v2 with the config lines of the listener that made the difference.
"""
from __future__ import annotations

import html
from dataclasses import dataclass, field

from lab.models import FLAVOURS, is_protected
from lab.oracle import MISROUTED
from lab.results import NOT_APPLICABLE, CaseResult, RequestResult, agrees, scenarios_of

LAB = "lab"  # the engine name of the lab's own edge in this report


@dataclass
class Column:
    edge: str
    flavour: str  # a flavour (`default`, `fixed`) or, for the lab's own edge, a model
    version: str = ""
    lines: dict[str, list[str]] = field(default_factory=dict)  # listener -> the config lines that decide it
    cases: dict[str, CaseResult] = field(default_factory=dict)  # scenario -> its case

    @property
    def title(self) -> str:
        return f"{self.edge} {self.flavour}"

    @property
    def reference(self) -> str:
        return FLAVOURS.get(self.flavour, self.flavour)

    def differs(self, q: RequestResult) -> bool:
        return bool(q.expected) and not agrees(q.expected, q.outcome)

    def counts(self) -> dict[str, int]:
        ran = [c for c in self.cases.values() if c.verdict != NOT_APPLICABLE]
        return {
            "cases": len(self.cases),
            "passed": sum(c.passed for c in ran),
            "failed": sum(not c.passed for c in ran),
            "misrouted": sum(c.verdict == MISROUTED for c in ran),
            "misrouted_protected": sum(c.verdict == MISROUTED and not c.controls_off for c in ran)
            if is_protected(self.flavour) else 0,
            "over_blocked": sum(any(q.over_blocked for q in c.requests) for c in ran),
            "differs": sum(any(self.differs(q) for q in c.requests) for c in ran),
            "not_applicable": len(self.cases) - len(ran),
        }


def columns(results: list[CaseResult], configs: dict[tuple[str, str], dict] | None = None) -> list[Column]:
    """One column per (engine, model) in order of appearance; `configs[(edge, flavour)]` gives
    its `version` and `lines`."""
    out: dict[tuple[str, str], Column] = {}
    for r in results:
        key = (r.engine, r.model)
        if key not in out:
            extra = (configs or {}).get(key, {})
            out[key] = Column(r.engine, r.model, extra.get("version", ""), extra.get("lines", {}))
        out[key].cases[r.scenario] = r
    return list(out.values())


def cell(c: CaseResult | None) -> str:
    if c is None:
        return "—"
    if c.verdict == NOT_APPLICABLE:
        return "N/A"
    marks = ("" if c.passed else " ✗") + (" ⚑" if any(q.over_blocked for q in c.requests) else "")
    return c.verdict + marks


def differences(col: Column) -> dict[str, list[tuple[CaseResult, int, RequestResult]]]:
    """listener -> the requests on it whose outcome differs from the lab's reference."""
    out: dict[str, list[tuple[CaseResult, int, RequestResult]]] = {}
    for c in col.cases.values():
        if c.verdict == NOT_APPLICABLE:
            continue
        for i, q in enumerate(c.requests, 1):
            if col.differs(q):
                out.setdefault(q.listener or q.address or "?", []).append((c, i, q))
    return out


def _lines_title(col: Column, listener: str) -> str:
    if col.flavour == "fixed":
        return f"the lines `fixed` adds over `default` on {listener}"
    return f"what this config lacks on {listener}: the lines `fixed` adds there"


def _tag(q: RequestResult) -> str:
    return " (over-blocked)" if q.over_blocked else (" — MISROUTED" if q.verdict == MISROUTED else "")


def summary_rows(cols: list[Column]) -> list[dict]:
    return [{"edge": c.edge, "flavour": c.flavour, "version": c.version, "protected": is_protected(c.flavour),
             **c.counts()} for c in cols]


_SUMMARY_HEAD = ("edge", "flavour", "cases", "passed", "failed", "MISROUTED", "over-blocked", "≠ lab", "N/A")


def _summary_cells(row: dict) -> list[str]:
    mis = str(row["misrouted"]) + (f" ({row['misrouted_protected']} protected!)" if row["misrouted_protected"]
                                   else " (controls off)" if row["protected"] and row["misrouted"] else "")
    return [f"{row['edge']} {row['version']}".strip(), row["flavour"], str(row["cases"]), str(row["passed"]),
            str(row["failed"]), mis, str(row["over_blocked"]), str(row["differs"]), str(row["not_applicable"])]


def summary_table(cols: list[Column]) -> str:
    """The summary as a Markdown table (the closing note quotes it)."""
    out = ["| " + " | ".join(_SUMMARY_HEAD) + " |", "|" + "---|" * len(_SUMMARY_HEAD)]
    out += ["| " + " | ".join(_summary_cells(r)) + " |" for r in summary_rows(cols)]
    return "\n".join(out)


def markdown(results: list[CaseResult], configs: dict | None = None, skipped: dict[str, str] | None = None,
             world: str = "") -> str:
    cols = columns(results, configs)
    out = ["# sni-lab: real edges against the catalog", ""]
    if world:
        out += [f"World: `{world}` · {len(scenarios_of(results))} scenarios · the same oracle for every column.", ""]
    out += [summary_table(cols), "",
            "MISROUTED under `fixed` fails the case; a legitimate request refused is over-blocking (⚑); "
            "≠ lab: an outcome that differs from the lab's reference model (`default` ↔ `v1`, `fixed` ↔ `v2`) "
            "by kind or status; N/A: the case needs the lab's control plane (custom hostname lifecycle).", ""]
    for edge, why in (skipped or {}).items():
        out.append(f"- **{edge} skipped:** {why}")
    if skipped:
        out.append("")
    out += ["## Verdicts", "", "| scenario | " + " | ".join(f"`{c.title}`" for c in cols) + " |",
            "|---|" + "---|" * len(cols)]
    for sc in scenarios_of(results):
        out.append(f"| `{sc}` | " + " | ".join(cell(c.cases.get(sc)) for c in cols) + " |")
    out += ["", "✗ failed · ⚑ over-blocked (a legitimate request refused)", ""]
    for col in cols:
        if col.edge == LAB:
            continue
        diffs = differences(col)
        out += [f"## `{col.title}`: where it differs from the lab's `{col.reference}`", ""]
        if not diffs:
            out += ["Nowhere: every outcome agrees by kind and status.", ""]
            continue
        for listener, items in diffs.items():
            out += [f"### on `{listener}`: {len(items)} request{'s' if len(items) != 1 else ''}", ""]
            out += [f"- `{c.scenario}` request {i}: lab `{q.expected}`, {col.edge} `{q.outcome}`{_tag(q)} "
                    f"(N = {q.name})" for c, i, q in items]
            lines = col.lines.get(listener, ())
            if lines:
                out += ["", f"{_lines_title(col, listener)}:", "", "```", *lines, "```"]
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


_CSS = """
body{font:18px/1.4 system-ui,sans-serif;margin:2rem;color:#111;background:#fff}
h1{font-size:1.8rem}h2{font-size:1.3rem;margin-top:2rem}
table{border-collapse:collapse;margin:1rem 0}th,td{border:1px solid #bbb;padding:.3rem .6rem;text-align:left}
th{background:#eee;position:sticky;top:0}td.MISROUTED{background:#f8c4c4;font-weight:700}
td.SAFE{background:#d4f0d4}td.REFUSED{background:#e4e4f4}td.NA{color:#777;background:#f6f6f6}
td.failed{outline:3px solid #c00;outline-offset:-3px}td.over{background:#ffe2a8}
td:first-child{white-space:nowrap}
code,pre{font:15px/1.3 ui-monospace,monospace}pre{background:#f4f4f4;padding:.5rem;margin:.2rem 0 .8rem 1.5rem}
.legend{color:#444}
"""


def _td(c: CaseResult | None) -> str:
    if c is None:
        return "<td>—</td>"
    classes = ["NA" if c.verdict == NOT_APPLICABLE else c.verdict]
    classes += [] if c.passed else ["failed"]
    classes += ["over"] if any(q.over_blocked for q in c.requests) else []
    title = c.not_applicable or c.failure or "; ".join(q.why for q in c.requests)
    return f'<td class="{" ".join(classes)}" title="{html.escape(title)}">{html.escape(cell(c))}</td>'


def to_html(results: list[CaseResult], configs: dict | None = None, skipped: dict[str, str] | None = None,
            world: str = "") -> str:
    cols = columns(results, configs)
    e = html.escape
    out = ["<!doctype html><html lang=en><meta charset=utf-8><title>sni-lab: real edges</title>",
           f"<style>{_CSS}</style><h1>sni-lab: real edges against the catalog</h1>"]
    if world:
        out.append(f"<p>World <code>{e(world)}</code> · {len(scenarios_of(results))} scenarios · one oracle.</p>")
    out.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in _SUMMARY_HEAD) + "</tr>")
    for row in summary_rows(cols):
        bad = ' class="MISROUTED"' if row["misrouted_protected"] else ""
        out.append(f"<tr{bad}>" + "".join(f"<td>{e(x)}</td>" for x in _summary_cells(row)) + "</tr>")
    out.append("</table>")
    for edge, why in (skipped or {}).items():
        out.append(f"<p><b>{e(edge)} skipped:</b> {e(why)}</p>")
    out.append('<p class=legend>✗ failed · ⚑ over-blocked (a legitimate request refused) · N/A: needs the lab\'s '
               'control plane · hover a cell for the oracle\'s reason</p>')
    out.append("<h2>Verdicts</h2><table><tr><th>scenario</th>" + "".join(f"<th>{e(c.title)}</th>" for c in cols)
               + "</tr>")
    for sc in scenarios_of(results):
        out.append(f"<tr><td><code>{e(sc)}</code></td>" + "".join(_td(c.cases.get(sc)) for c in cols) + "</tr>")
    out.append("</table>")
    for col in cols:
        if col.edge == LAB:
            continue
        out.append(f"<h2>{e(col.title)}: where it differs from the lab's {e(col.reference)}</h2>")
        diffs = differences(col)
        if not diffs:
            out.append("<p>Nowhere: every outcome agrees by kind and status.</p>")
        for listener, items in diffs.items():
            out.append(f"<h3>on {e(listener)}: {len(items)} request{'s' if len(items) != 1 else ''}</h3><ul>")
            out += [f"<li><code>{e(c.scenario)}</code> request {i}: lab <code>{e(q.expected)}</code>, "
                    f"{e(col.edge)} <code>{e(q.outcome)}</code>{e(_tag(q))} (N = {e(q.name or '')})</li>"
                    for c, i, q in items]
            out.append("</ul>")
            lines = col.lines.get(listener, ())
            if lines:
                out.append(f"<p>{e(_lines_title(col, listener))}:</p><pre>" + e("\n".join(lines)) + "</pre>")
    return "\n".join(out) + "\n"
