"""What a run of the scenario catalog produced, as data.

The runner (`lab.scenarios`) makes one `CaseResult` per case (a scenario under a model, on
one engine) holding a `RequestResult` per request. This module holds those types, how an
expectation matches an outcome (`matches`), the one reader of the edge's `X-Lab-Decision`
header (`parse_decision`, the inverse of `policy.Decision.header`), the counts a user or CI
checks first (`summary`, `summary_line`) and JSON that saves and loads a run (`to_json`,
`from_json`). The formats that show results to people live in `lab.report` and `lab.explain`.

Pure: no I/O, stdlib and the lab's pure core only.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable

from lab.oracle import MISROUTED, REFUSED, SAFE, name_asked, worst
from lab.policy import Decision
from lab.models import is_protected
from lab.topology import MODELS

VERDICTS = (MISROUTED, SAFE, REFUSED)
NOT_APPLICABLE = "N/A"  # a case a static edge config cannot run (it needs the lab's control plane)


@dataclass
class RequestResult:
    """One request of a case: what the client did, what it saw, and the oracle's verdict."""
    sni: str | None
    host: str | None
    address: str
    port: int
    dns: str | None  # "www.victim.example A 127.0.0.11 (poisoned by override ovr-1)", None when not resolved
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
    target: str | None = None  # the request target, when it is in absolute form (it names N)
    # Every lab model sends it to the same origin: an honest request, which an edge that
    # refuses it over-blocks.
    legitimate: bool = False
    listener: str | None = None  # the edge listener it connected to, by the world's name

    @property
    def over_blocked(self) -> bool:
        """A legitimate request that reached no origin: the edge's control refused the innocent."""
        return self.legitimate and self.origin is None

    @property
    def name(self) -> str | None:
        """N, the name the client believes it is talking to."""
        return name_asked(self.sni, self.host, self.target)


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
    # The controls its scenario turned off ("validation=single"): a protected model may be
    # MISROUTED here without failing, and every format says so.
    controls_off: list[str] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)  # what its per-case setup did ("zone x refused: ...")
    not_applicable: str | None = None  # why this case cannot run on this edge (verdict N/A, not failed)

    @property
    def id(self) -> str:
        return f"{self.scenario}[{self.model}]"


def matches(expected: str, outcome: str) -> bool:
    """A scenario's expectation against what happened: `refused` matches `refused:403:waf-block`."""
    return outcome == expected or outcome.startswith(expected + ":")


def agrees(expected: str, outcome: str) -> bool:
    """An outcome of a real edge against the lab's expectation, by kind and status only: the
    same origin; a refusal with the same status (`refused:403` agrees with
    `refused:403:waf-block`: the code is the lab's own); a failed handshake, whatever the alert."""
    kind, _, rest = expected.partition(":")
    got_kind, _, got_rest = outcome.partition(":")
    if kind != got_kind:
        return False
    if kind == "refused":
        status = rest.partition(":")[0]
        return not status or got_rest.partition(":")[0] == status
    if kind == "tls":
        return True
    return expected == outcome


# The exact shape `Decision.header()` writes; the reason is last and may hold anything.
_DECISION = re.compile(r"model=(?P<model>[^;]*); rule=(?P<rule>[^;]*); "
                       r"(?:origin=(?P<origin>[^;]*)|refused=(?P<status>\d+) (?P<code>[^;]*)); reason=(?P<reason>.*)")


def parse_decision(header: str | None) -> Decision | None:
    """The `Decision` an `X-Lab-Decision` header tells (without `host`, which the header
    does not carry); None for no header or one a lab edge did not write."""
    m = _DECISION.fullmatch(header or "")
    if m is None:
        return None
    return Decision(model=m["model"], rule=m["rule"], reason=m["reason"], origin=m["origin"],
                    status=int(m["status"] or 0), code=m["code"] or "")


# ---- grouping, shared by the summary and the formats ------------------------------------

def _ordered(items: Iterable[str], first: Iterable[str]) -> list[str]:
    """Each of `items` once: those named in `first` in its order, then the rest as they come."""
    items, first = list(dict.fromkeys(items)), list(dict.fromkeys(first))
    return [x for x in first if x in items] + [x for x in items if x not in first]


def engines_of(results: list[CaseResult], order: Iterable[str] | None = None) -> list[str]:
    """The engines present: those of `order` first, then the rest in order of appearance."""
    return _ordered((r.engine for r in results), order or ())


def models_of(results: list[CaseResult]) -> list[str]:
    """The models present in MODELS order; one this version does not know comes after them."""
    return _ordered((r.model for r in results), MODELS)


def scenarios_of(results: list[CaseResult]) -> list[str]:
    return _ordered((r.scenario for r in results), ())


def case_id(r: CaseResult, several_engines: bool) -> str:
    return f"{r.id}[{r.engine}]" if several_engines else r.id


def cells(results: list[CaseResult]) -> dict[tuple[str, str], dict[str, list[CaseResult]]]:
    """(scenario, model) -> engine -> results (normally one)."""
    out: dict[tuple[str, str], dict[str, list[CaseResult]]] = {}
    for r in results:
        out.setdefault((r.scenario, r.model), {}).setdefault(r.engine, []).append(r)
    return out


def cell_verdicts(by_engine: dict[str, list[CaseResult]]) -> dict[str, str]:
    """engine -> the worst verdict of its results in one (scenario, model) cell."""
    return {e: worst(r.verdict for r in rs) for e, rs in by_engine.items()}


# ---- summary ------------------------------------------------------------------------------

def summary(results: list[CaseResult]) -> dict:
    """Counts and lists a user or CI checks first. Keys (in this order):
    cases, passed, failed, ms, models, engines, verdicts {model: {verdict: n}}, totals
    {verdict: n}, failed_ids, failures {id: text}, misrouted {model: [ids]},
    protected_misrouted [ids] (cases whose controls are at their defaults), controls_off {id: [controls]},
    engine_mismatches [{id, scenario, model, verdicts {engine: v}}].
    Ids carry an `[engine]` suffix when the results span several engines."""
    results = list(results)
    engines = engines_of(results)
    several = len(engines) > 1
    models = models_of(results)
    extra = [v for v in dict.fromkeys(r.verdict for r in results) if v not in VERDICTS]
    kinds = [*VERDICTS, *extra]
    verdicts = {m: dict.fromkeys(kinds, 0) for m in models}
    totals = dict.fromkeys(kinds, 0)
    misrouted: dict[str, list[str]] = {m: [] for m in models}
    protected: list[str] = []
    for r in results:
        verdicts[r.model][r.verdict] += 1
        totals[r.verdict] += 1
        if r.verdict == MISROUTED:
            misrouted[r.model].append(case_id(r, several))
            if is_protected(r.model) and not r.controls_off:
                protected.append(case_id(r, several))
    failed = [r for r in results if not r.passed]
    mismatches = []
    if several:
        for (scenario, model), by_engine in cells(results).items():
            seen = cell_verdicts(by_engine)
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
        "failed_ids": [case_id(r, several) for r in failed],
        "failures": {case_id(r, several): r.failure or "failed" for r in failed},
        "misrouted": misrouted,
        "protected_misrouted": [i for m in models if is_protected(m) for i in misrouted[m] if i in protected],
        "not_applicable": {case_id(r, several): r.not_applicable for r in results if r.not_applicable},
        "over_blocked": [case_id(r, several) for r in results if any(q.over_blocked for q in r.requests)],
        "controls_off": {case_id(r, several): list(r.controls_off) for r in results if r.controls_off},
        "engine_mismatches": mismatches,
    }


def summary_line(results_or_summary: list[CaseResult] | dict) -> str:
    """`N cases, P passed, F failed; MISROUTED: k under v1, 0 under protected models`, and how many
    cases ran with a control off (their MISROUTED under a protected model is not counted there)."""
    s = results_or_summary if isinstance(results_or_summary, dict) else summary(results_or_summary)
    line = f"{s['cases']} cases, {s['passed']} passed, {s['failed']} failed"
    parts = [f"{len(s['misrouted'][m])} under {m}" for m in s["models"]
             if not is_protected(m) and (m in ("v1", "default") or s["misrouted"][m])]
    if any(is_protected(m) for m in s["models"]):
        counted = set(s["protected_misrouted"])
        bad = {m: n for m in s["models"] if is_protected(m)
               for n in [sum(i in counted for i in s["misrouted"][m])] if n}
        detail = f" ({', '.join(f'{m}: {n}' for m, n in bad.items())})" if bad else ""
        parts.append(f"{len(s['protected_misrouted'])} under protected models{detail}")
    if parts:
        line += "; MISROUTED: " + ", ".join(parts)
    if s.get("over_blocked"):
        line += f"; {len(s['over_blocked'])} over-blocked (a legitimate request refused)"
    if s.get("not_applicable"):
        line += f"; {len(s['not_applicable'])} not applicable"
    off = s.get("controls_off", {})
    if off:
        line += f"; {len(off)} case{'s' if len(off) != 1 else ''} with a control off"
    if len(s["engines"]) > 1:
        n = len(s["engine_mismatches"])
        line += (f"; engines {' vs '.join(s['engines'])}: {n} mismatch{'es' if n != 1 else ''}")
    return line


# ---- JSON -----------------------------------------------------------------------------------

def to_json(results: list[CaseResult]) -> str:
    """{"summary": summary(results), "cases": [case, ...]}; each case is its dataclass fields
    (in declaration order) after an "id" key. Indent 2, ASCII only, so it is always writable."""
    results = list(results)
    return json.dumps({"summary": summary(results), "cases": [{"id": r.id, **asdict(r)} for r in results]},
                      indent=2)


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
