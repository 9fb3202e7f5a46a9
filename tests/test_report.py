"""lab.report: what a user and a CI system read from a run of the catalog."""
from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from lab.report import (MODELS, PROTECTED, VERDICTS, CaseResult, RequestResult, explain, from_json, junit,
                        markdown, parse_decision, summary, summary_line, table, to_json)

ANSI = re.compile(r"\x1b\[[0-9;]*m")
TITLE = "Poisoned DNS sends www.victim.example to the SaaS v1 address"
V1_REASON = "v1: connection arrived on listener saas-v1, the address of zone saas.example; host not consulted"


def req(**kw) -> RequestResult:
    base = dict(sni="www.victim.example", host="www.victim.example", address="127.0.0.11", port=8443,
                dns="www.victim.example A 127.0.0.11 (poisoned by ovr-1)", cert_names=["www.victim.example"],
                cert_valid=True, tls_error=None, status=200, origin="victim",
                decision="model=v2; rule=v2-custom-hostname; origin=victim; reason=v2: zone victim.example",
                verdict="SAFE", why="origin victim is authorized for www.victim.example", outcome="victim",
                expected="victim", trace=None)
    base.update(kw)
    return RequestResult(**base)


def misrouted(**kw) -> RequestResult:
    return req(**{"origin": "saas", "decision": f"model=v1; rule=v1-listener; origin=saas; reason={V1_REASON}",
                  "verdict": "MISROUTED", "outcome": "saas", "expected": "saas",
                  "why": "certificate valid for www.victim.example, but origin saas answered; "
                         "www.victim.example belongs to victim", **kw})


def waf_block() -> RequestResult:
    return req(origin=None, status=403, verdict="REFUSED", outcome="refused:403:waf-block",
               expected="refused:403:waf-block", why="the edge answered itself; no origin was reached",
               decision="model=v1-waf; rule=waf-saas; refused=403 waf-block; reason=v1-waf: host not authorized")


def case(scenario: str, model: str, verdict: str, requests: list[RequestResult], *, engine: str = "native",
         failure: str | None = None, title: str = TITLE, ms: float = 10.0) -> CaseResult:
    return CaseResult(scenario=scenario, title=title, model=model, engine=engine, verdict=verdict,
                      passed=failure is None, failure=failure, ms=ms, requests=requests)


def poison_row(engine: str = "native") -> list[CaseResult]:
    out = []
    for model in MODELS:
        if model == "v1":
            out.append(case("dns-poison-victim", model, "MISROUTED", [misrouted()], engine=engine))
        elif model == "v1-waf":
            out.append(case("dns-poison-victim", model, "REFUSED", [waf_block()], engine=engine))
        else:
            out.append(case("dns-poison-victim", model, "SAFE", [req()], engine=engine))
    return out


def fronting_row() -> list[CaseResult]:
    """A second scenario; under host it fails its expectation (over-blocking)."""
    out = []
    for model in MODELS:
        if model == "host":
            out.append(case("fronting", model, "REFUSED", [waf_block()],
                            failure="request 1: expected victim, got refused:403:waf-block", title="Domain fronting"))
        else:
            out.append(case("fronting", model, "SAFE", [req(cert_valid=False)], title="Domain fronting"))
    return out


@pytest.fixture
def results() -> list[CaseResult]:
    return poison_row() + fronting_row()


@pytest.fixture
def two_engines() -> list[CaseResult]:
    """The poison row on two engines, where mitmproxy misroutes under v2 (and so fails)."""
    other = poison_row("mitmproxy")
    v2 = next(r for r in other if r.model == "v2")
    v2.verdict, v2.requests = "MISROUTED", [misrouted()]
    v2.passed, v2.failure = False, "MISROUTED under protected model v2: certificate valid for www.victim.example"
    return poison_row() + other


def _grid(text: str) -> dict[str, dict[str, str]]:
    """The matrix of a plain table: scenario -> model -> cell text."""
    lines = text.splitlines()
    header = lines[0]
    starts = {m: re.search(rf"(?<= ){re.escape(m)}(?= |$)", header).start() for m in MODELS}
    order = sorted(starts, key=starts.get)
    title = header.find(" title")
    grid = {}
    for line in lines[2:]:
        if not line.strip():
            break
        name = line.split("  ")[0]
        cells = {}
        for k, m in enumerate(order):
            end = starts[order[k + 1]] if k + 1 < len(order) else (title if title > 0 else None)
            cells[m] = line[starts[m]:end].strip()
        grid[name] = cells
    return grid


# ---- table --------------------------------------------------------------------------------

def test_table_puts_each_verdict_in_its_row_and_column(results):
    text = table(results, color=False)
    grid = _grid(text)
    assert list(grid) == ["dns-poison-victim", "fronting"]
    assert grid["dns-poison-victim"] == {"host": "SAFE", "v1": "MISROUTED", "v1-waf": "REFUSED", "v2": "SAFE",
                                         "v2-strict": "SAFE"}
    assert grid["fronting"]["host"] == "REFUSED ✗"
    assert grid["fronting"]["v1"] == "SAFE"


def test_table_summary_line_and_failed_cases(results):
    text = table(results, color=False)
    assert "10 cases, 9 passed, 1 failed; MISROUTED: 1 under v1, 0 under protected models" in text
    failed = text[text.index("failed:"):]
    assert "fronting[host]" in failed and "expected victim, got refused:403:waf-block" in failed
    assert "✗ failed expectation" in text  # the legend


def test_table_columns_follow_models_order_and_only_present_ones(results):
    some = [r for r in results if r.model in ("v2", "v1")]
    header = table(some, color=False).splitlines()[0]
    assert header.split()[:3] == ["scenario", "v1", "v2"]
    assert "v1-waf" not in header and "host" not in header


def test_table_no_ansi_without_color_and_colors_with(results):
    plain = table(results, color=False)
    assert "\x1b" not in plain
    colored = table(results, color=True)
    assert "\x1b[31mMISROUTED" in colored  # red
    assert "\x1b[32mSAFE" in colored  # green
    assert "\x1b[33mREFUSED" in colored
    assert ANSI.sub("", colored) == plain


def test_table_fits_width_and_truncates_long_names(results):
    long = "a-scenario-name-much-longer-than-any-terminal-column-would-like-to-show"
    rows = results + [case(long, m, "SAFE", [req()]) for m in MODELS]
    text = table(rows, color=False, width=80)
    matrix = text.split("\n\n")[0].splitlines()
    assert all(len(line) <= 80 for line in matrix)
    assert long not in matrix[-1] and "…" in matrix[-1]
    assert long[:10] in matrix[-1]
    wide = table(rows, color=False, width=200)
    assert long in wide and TITLE in wide  # room for names and titles


def test_table_engine_mismatch_is_flagged(two_engines):
    text = table(two_engines, color=False, engines=["native", "mitmproxy"])
    grid = _grid(text)
    assert grid["dns-poison-victim"]["v2"] == "SAFE|MISROUTED ≠ ✗"
    assert grid["dns-poison-victim"]["v1"] == "MISROUTED"  # both engines agree: one verdict
    assert "engines native vs mitmproxy: 1 mismatch" in text
    assert "dns-poison-victim[v2][mitmproxy]" in text  # failed id carries the engine
    mism = text[text.index("engine mismatches:"):]
    assert "dns-poison-victim[v2]  native SAFE, mitmproxy MISROUTED" in mism
    # the order of `engines` decides the order in the cell
    assert _grid(table(two_engines, color=False, engines=["mitmproxy", "native"]))["dns-poison-victim"]["v2"] \
        == "MISROUTED|SAFE ≠ ✗"


def test_table_scrubs_control_characters_from_titles():
    text = table([case("evil", "v1", "SAFE", [req()], title="a\x1b[2Jb\nc")], color=False, width=120)
    assert "\x1b" not in text and "\\x1b[2Jb c" in text


def test_table_empty():
    assert table([], color=False) == "no cases\n"


# ---- summary / JSON -----------------------------------------------------------------------

def test_summary_counts(results, two_engines):
    s = summary(results)
    assert (s["cases"], s["passed"], s["failed"]) == (10, 9, 1)
    assert s["verdicts"]["v1"] == {"MISROUTED": 1, "SAFE": 1, "REFUSED": 0}
    assert s["verdicts"]["host"] == {"MISROUTED": 0, "SAFE": 1, "REFUSED": 1}
    assert s["totals"] == {"MISROUTED": 1, "SAFE": 7, "REFUSED": 2}
    assert s["failed_ids"] == ["fronting[host]"]
    assert s["misrouted"]["v1"] == ["dns-poison-victim[v1]"]
    assert s["protected_misrouted"] == [] and s["engine_mismatches"] == []
    assert s["models"] == list(MODELS) and s["engines"] == ["native"]

    s2 = summary(two_engines)
    assert s2["protected_misrouted"] == ["dns-poison-victim[v2][mitmproxy]"]
    assert s2["engine_mismatches"] == [{"id": "dns-poison-victim[v2]", "scenario": "dns-poison-victim",
                                        "model": "v2", "verdicts": {"native": "SAFE", "mitmproxy": "MISROUTED"}}]
    assert summary_line(s2) == ("10 cases, 9 passed, 1 failed; MISROUTED: 2 under v1, 1 under protected models "
                                "(v2: 1); engines native vs mitmproxy: 1 mismatch")


def test_json_round_trips(results, two_engines):
    for rs in (results, two_engines):
        text = to_json(rs)
        data = json.loads(text)
        assert list(data) == ["summary", "cases"]
        assert data["summary"] == json.loads(json.dumps(summary(rs)))
        assert data["cases"][0]["id"] == "dns-poison-victim[host]"
        assert list(data["cases"][0])[:3] == ["id", "scenario", "title"]
        assert from_json(text) == rs
        assert to_json(from_json(text)) == text  # stable


# ---- JUnit ----------------------------------------------------------------------------------

def test_junit_parses_with_counts_names_and_failures(results):
    root = ET.fromstring(junit(results))
    suites = root.findall("testsuite") if root.tag == "testsuites" else [root]
    assert len(suites) == 1
    suite = suites[0]
    assert (suite.get("tests"), suite.get("failures"), suite.get("name")) == ("10", "1", "sni-lab")
    assert float(suite.get("time")) == pytest.approx(0.1)
    cases = suite.findall("testcase")
    names = [c.get("name") for c in cases]
    assert "dns-poison-victim[v1]" in names and len(names) == 10
    v1 = cases[names.index("dns-poison-victim[v1]")]
    assert v1.get("classname") == "scenarios.dns-poison-victim"
    assert v1.find("failure") is None
    out = v1.find("system-out").text
    for part in ("sni=www.victim.example", "cert: www.victim.example", "origin: saas", "verdict: MISROUTED",
                 V1_REASON):
        assert part in out
    failed = cases[names.index("fronting[host]")].find("failure")
    assert failed.get("message") == "request 1: expected victim, got refused:403:waf-block"
    assert "refused=403 waf-block" in failed.text


def test_junit_escapes_odd_names_and_engines_in_names(two_engines):
    odd = case('we<ird>&"name"', "v2", "SAFE", [req(tls_error="bad\x00\x07byte \ud800", cert_names=[])],
               failure="expected <victim> & \x1b got\nsomething")
    root = ET.fromstring(junit(two_engines + [odd], suite_name="a&b"))
    suite = root.find("testsuite")
    assert suite.get("name") == "a&b" and suite.get("failures") == "2"
    names = [c.get("name") for c in suite.iter("testcase")]
    assert "dns-poison-victim[v2][mitmproxy]" in names
    assert 'we<ird>&"name"[v2][native]' in names
    msg = suite.findall("testcase")[-1].find("failure").get("message")
    assert msg.startswith("expected <victim> & \\x1b got")


# ---- Markdown ---------------------------------------------------------------------------------

def test_markdown_table_and_failed_section(results):
    md = markdown(results)
    assert md.startswith("# ")
    assert "10 cases, 9 passed, 1 failed" in md
    rows = [ln for ln in md.splitlines() if ln.startswith("| `")]
    assert len(rows) == 2
    poison = next(r for r in rows if "dns-poison-victim" in r)
    cells = [c.strip() for c in poison.strip("|").split(" | ")]
    assert cells[1:6] == ["SAFE", "MISROUTED", "REFUSED", "SAFE", "SAFE"]
    fronting = next(r for r in rows if "fronting" in r)
    assert "❌ REFUSED" in fronting
    assert "## Failed cases" in md
    section = md[md.index("## Failed cases"):]
    assert "fronting\\[host\\]" in section and "expected victim, got refused:403:waf-block" in section


def test_markdown_cells_stay_in_their_cell(two_engines):
    md = markdown(two_engines + [case("pipe", "v2", "SAFE", [req()], title="a | b\nc")])
    row = next(ln for ln in md.splitlines() if ln.startswith("| `pipe`"))
    assert row.count(" | ") == len([c for c in row.split(" | ")]) - 1
    assert "a \\| b c" in row
    assert "## Engine mismatches" in md and "⚠️" in md


# ---- explain ---------------------------------------------------------------------------------

def _in_order(text: str, *parts: str) -> None:
    text = " ".join(text.split())  # steps wrap at the width; compare the words
    pos = -1
    for part in parts:
        found = text.find(part, pos + 1)
        assert found > pos, f"{part!r} not found after position {pos} in:\n{text}"
        pos = found


def test_explain_tells_the_story_in_order():
    r = case("dns-poison-victim", "v1", "MISROUTED", [misrouted()])
    text = explain(r, "The resolver is poisoned.", "Route only verified hostnames.")
    _in_order(text, "The resolver is poisoned.", "1. DNS", "poisoned by ovr-1", "2. TLS", "www.victim.example",
              "Certificate served for www.victim.example", "valid for www.victim.example", "3. Edge decision",
              "v1-listener", V1_REASON[:60], "4. Origin: saas", "5. Verdict: MISROUTED", "Lesson:",
              "Route only verified hostnames.")
    assert "\x1b" not in text
    assert "\x1b[31mMISROUTED" in explain(r, color=True)


def test_explain_refusals_and_tls_failures():
    direct = req(dns=None, sni="www.victim.example", tls_error="unrecognized_name: no certificate for this SNI",
                 cert_names=[], status=None, origin=None, decision=None, verdict="REFUSED",
                 outcome="tls:unrecognized_name", expected="tls", why="the TLS handshake failed")
    text = explain(case("no-cert", "v2", "REFUSED", [direct]))
    _in_order(text, "1. No DNS", "127.0.0.11:8443 directly", "2. TLS", "handshake failed: unrecognized_name",
              "3. Edge decision: none", "4. Origin: none", "5. Verdict: REFUSED")
    text = explain(case("dns-poison-victim", "v1-waf", "REFUSED", [waf_block()]))
    _in_order(text, "3. Edge decision (model v1-waf, rule waf-saas): refuse (403 waf-block)",
              "host not authorized", "4. Origin: none — the edge answered itself (HTTP 403, waf-block)",
              "5. Verdict: REFUSED")


def test_explain_multi_request_and_events():
    first = req(trace="t-0")
    second = misrouted(host="shop.customer.example", trace="t-0-1", expected="victim")
    r = case("coalescing", "v1", "MISROUTED", [first, second],
             failure="request 2: expected victim, got saas")
    events = [
        {"kind": "dns.answer", "trace": None, "name": "www.victim.example.", "type": "A",
         "answers": ["127.0.0.11"], "poisoned": True, "override": "ovr-1"},
        {"kind": "tls.clienthello", "trace": "c1", "conn": "c1", "listener": "saas-v1", "sni": "www.victim.example"},
        {"kind": "tls.cert", "trace": "c1", "conn": "c1", "listener": "saas-v1", "names": ["www.victim.example"],
         "version": "TLSv1.3", "alpn": "h2"},
        {"kind": "route.decision", "trace": "t-0-1", "conn": "c1", "listener": "saas-v1", "sni": "www.victim.example",
         "host": "shop.customer.example", "model": "v1", "rule": "v1-listener", "origin": "saas",
         "reason": "second request reason"},
        {"kind": "route.decision", "trace": "t-0", "conn": "c1", "listener": "saas-v1", "sni": "www.victim.example",
         "host": "www.victim.example", "model": "v1", "rule": "v1-listener", "origin": "victim",
         "reason": "first request reason"},
        {"kind": "origin.hit", "trace": "t-0-1", "origin": "saas", "method": "GET",
         "host": "shop.customer.example", "path": "/", "status": 200},
    ]
    text = explain(r, events=events)
    assert text.count("1. DNS") == 1 and text.count("3. Edge decision") == 2 and text.count("5. Verdict") == 2
    _in_order(text, "Request 1 of 2", "listener saas-v1 (127.0.0.11:8443)", "dns.answer", "tls.cert",
              "first request reason", "4. Origin: victim", "5. Verdict: SAFE",
              "Request 2 of 2", "same address, SNI and certificate", "second request reason",
              "4. Origin: saas", "origin.hit: saas served GET shop.customer.example/", "5. Verdict: MISROUTED",
              "expected victim, got saas", "FAILED: request 2")


def test_parse_decision():
    assert parse_decision(f"model=v1; rule=v1-listener; origin=saas; reason={V1_REASON}; extra") == {
        "model": "v1", "rule": "v1-listener", "origin": "saas", "reason": V1_REASON + "; extra"}
    assert parse_decision("model=v2; rule=r; refused=421 misdirected; reason=x")["refused"] == "421 misdirected"
    assert parse_decision(None) == {} and parse_decision("nginx") == {}


def test_constants():
    assert VERDICTS == ("MISROUTED", "SAFE", "REFUSED")
    assert PROTECTED == ("v1-waf", "v2", "v2-strict")
    assert case("s", "v1", "SAFE", []).id == "s[v1]"
