"""PURE: an exercise's checks, judged on facts gathered from the running lab.

Each check is a table of the exercise file; `judge(check, facts)` says whether it holds
and, when it does not, what the lab saw instead. The facts are the lab's own: its events,
the live page's request strips (with the oracle's verdict), the collector's entries, the
custom hostnames and zones, the outcomes of a catalog run. Never what the attendee says
they did: a prediction counts only when the lab's run of the same requests agrees with it.

Matching (`match` tables): a key is a field, dotted for nested ones (`decision.model`);
a value matches when equal (text case-insensitively); `""` matches an absent or empty
field; a key ending in `~` matches a substring.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lab.hostnorm import HostError, normalize

SHOWN = 5  # failures named in a detail


@dataclass(frozen=True)
class Verdict:
    kind: str
    says: str
    passed: bool
    detail: str

    def to_dict(self) -> dict:
        return {"kind": self.kind, "says": self.says, "passed": self.passed, "detail": self.detail}


@dataclass
class Facts:
    since: int = 0                     # the last event id when the exercise started
    started: float = 0.0               # its time
    events: list[dict] = field(default_factory=list)     # since `since`, the lab's own left out
    strips: list[dict] = field(default_factory=list)     # newest first
    collected: list[dict] | None = None                  # None: the collector did not answer
    hostnames: list[dict] = field(default_factory=list)
    zones: list[dict] | None = None                      # None: this lab has no zone API
    catalog: list[dict] = field(default_factory=list)    # {scenario, tags, model, verdict, passed, outcome, expected}
    catalog_error: str | None = None
    predictions: dict | None = None                      # {error} or {models: {model: [(expected, got)]}}


def value_at(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def same(value: Any, want: Any) -> bool:
    if want == "":
        return value in (None, "", [], {}, False)
    if isinstance(want, bool):
        return value is want
    if isinstance(want, str):
        return isinstance(value, str) and value.lower() == want.lower()
    return value == want


def matches(obj: dict, spec: dict) -> bool:
    for key, want in spec.items():
        if key.endswith("~"):
            got = value_at(obj, key[:-1])
            if not (isinstance(got, str) and str(want).lower() in got.lower()):
                return False
        elif not same(value_at(obj, key), want):
            return False
    return True


def _spec(spec: dict) -> str:
    return ", ".join(f"{k} {v!r}" if k.endswith("~") else f"{k}={v}" for k, v in spec.items())


def _strip_line(s: dict) -> str:
    name = s.get("name") or "?"
    model = (s.get("decision") or {}).get("model") or "-"
    answered = s.get("origin") or ((s.get("decision") or {}).get("code") and f"refused {s['decision']['code']}") or "no origin"
    return f"{name} under {model}: {answered}, {s.get('verdict') or 'no verdict yet'}"


def judge(check: dict, facts: Facts) -> Verdict:
    kind = check["kind"]
    says = check.get("says", kind)
    passed, detail = _JUDGES[kind](check, facts)
    return Verdict(kind, says, passed, detail)


def _event(check: dict, facts: Facts) -> tuple[bool, str]:
    spec = check["match"]
    if any(matches(e, spec) for e in facts.events):
        return True, "found"
    return False, f"no event since you started matches {_spec(spec)} ({len(facts.events)} events since then)"


def _request(check: dict, facts: Facts) -> tuple[bool, str]:
    spec = check["match"]
    mine = [s for s in facts.strips if s.get("at", 0) > facts.since and not s.get("internal") and s.get("verdict")]
    if any(matches(s, spec) for s in mine):
        return True, "found"
    if not mine:
        return False, "no request has reached the edge since you started"
    return False, (f"no request since you started matches {_spec(spec)}; the newest: "
                   + "; ".join(_strip_line(s) for s in mine[:3]))


def _collector(check: dict, facts: Facts) -> tuple[bool, str]:
    if facts.collected is None:
        return False, "the collector did not answer"
    want_cookie, want_page = check.get("cookie", ""), check.get("page")
    new = [e for e in facts.collected if isinstance(e.get("time"), (int, float)) and e["time"] >= facts.started]
    for e in new:
        data = e.get("data") if isinstance(e.get("data"), dict) else {}
        cookie = data.get("cookie") if isinstance(data.get("cookie"), str) else ""
        page = data.get("origin") or e.get("origin") or ""
        host = _host_of(page)
        if want_cookie in cookie and cookie and (want_page is None or host == want_page):
            return True, "found"
    if not new:
        return False, "the collector has received nothing since you started"
    return False, (f"the collector holds {len(new)} entr{'y' if len(new) == 1 else 'ies'} since you started, none "
                   f"with a cookie containing {want_cookie!r} sent from a page of {want_page}")


def _host_of(origin) -> str | None:
    """The host of a page's origin, `https://NAME:PORT`."""
    if not isinstance(origin, str) or "://" not in origin:
        return None
    try:
        return normalize(origin.split("://", 1)[1].split("/", 1)[0])
    except HostError:
        return None


def _hostname(check: dict, facts: Facts) -> tuple[bool, str]:
    name = check["name"].lower()
    rows = [h for h in facts.hostnames if h.get("name") == name]
    live = [h for h in rows if h.get("status") != "deleted"] or rows[-1:]
    if not live:
        return False, f"{name} is not registered"
    h = live[0]
    spec = {"status": check["status"], **({"zone": check["zone"]} if "zone" in check else {}),
            **({"reason~": check["reason"]} if "reason" in check else {})}
    if matches(h, spec):
        return True, f"{name} is {h['status']}"
    return False, f"{name} is {h.get('status')} in {h.get('zone')} ({h.get('reason')})"


def _zone(check: dict, facts: Facts) -> tuple[bool, str]:
    if facts.zones is None:
        return False, "this lab has no zone API (GET /zones)"
    spec = check["match"]
    if any(matches(z, spec) for z in facts.zones):
        return True, "found"
    return False, f"no zone matches {_spec(spec)}; zones: " + ", ".join(str(z.get("name")) for z in facts.zones)


def _catalog(check: dict, facts: Facts) -> tuple[bool, str]:
    """No case MISROUTED; every case of a scenario tagged `legit` answered as its file expects.

    `skip_tags`: scenarios the exercise's lesson cannot reach (a control turned off, a zone
    added at run time that no rule of the attendee's zones covers)."""
    if not facts.catalog:
        return False, f"the catalog did not run: {facts.catalog_error or 'no scenario'}"
    legit_tag = check.get("legit", "legit")
    skip = set(check.get("skip_tags", ()))
    cases = [c for c in facts.catalog if not skip & set(c["tags"])]
    bad = [f"{c['scenario']}: MISROUTED" for c in cases if c["verdict"] == "MISROUTED"]
    bad += [f"{c['scenario']}: a legitimate request got {c['outcome']} (expected {c['expected']})"
            for c in cases if legit_tag in c["tags"] and not c["passed"] and c["verdict"] != "MISROUTED"]
    if not bad:
        legit = sum(legit_tag in c["tags"] for c in cases)
        return True, f"{len(cases)} cases under {check['model']}: none MISROUTED, {legit} legitimate ones answered"
    more = f" (and {len(bad) - SHOWN} more)" if len(bad) > SHOWN else ""
    return False, f"{len(bad)} problem(s) under {check['model']}: " + "; ".join(bad[:SHOWN]) + more


def _predictions(check: dict, facts: Facts) -> tuple[bool, str]:
    p = facts.predictions
    if p is None:
        return False, "no prediction file"
    if p.get("error"):
        return False, p["error"]
    wrong = []
    for model, pairs in p["models"].items():
        misses = [i + 1 for i, (expected, ok) in enumerate(pairs) if not ok]
        if misses:
            # Which predictions missed, not what happened: the attendee thinks again.
            wrong.append(f"{model}: request {', '.join(map(str, misses))} did not go as you predicted")
    if wrong:
        return False, "; ".join(wrong)
    return True, "every prediction matched what the edge did"


_JUDGES = {"event": _event, "request": _request, "collector": _collector, "hostname": _hostname, "zone": _zone,
           "catalog": _catalog, "predictions": _predictions}
