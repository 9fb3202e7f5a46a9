"""lab.results, lab.report and lab.explain on results recorded from real runs of the catalog.

Nothing here is invented: the cases come from the catalog run through an in-process lab,
as `sni-lab matrix --fresh` runs it. One real scenario is run again with a wrong
expectation and an odd name and title, so that a real failure (with the runner's own
reason) and text that needs escaping reach every format.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest

from lab.explain import explain
from lab.matrix import execute
from lab.report import junit, markdown, table
from lab.results import CaseResult, from_json, parse_decision, summary, summary_line, to_json
from lab.run import run_loop
from lab.scenarios import DEFAULT_DIR, discover
from lab.topology import MODELS

ANSI = re.compile(r"\x1b\[[0-9;]*m")
ODD = 'wrong-<on>&"purpose"'
ODD_TITLE = 'Wrong <on> purpose & | piped\x1b[2J\nsecond line'
ODD_FAILURE = "request 1: expected nobody, got victim"


def _run(tmp, scenarios, models=MODELS, engines=("native",), events=None) -> list[CaseResult]:
    args = SimpleNamespace(config=None, fresh=True, state=str(tmp / "state"), certs=str(tmp / "certs"))
    return run_loop(execute(args, scenarios, models, engines, events=events))


@pytest.fixture(scope="module")
def catalog(world):
    return {s.name: s for s in discover(None, DEFAULT_DIR, world)}


@pytest.fixture(scope="module")
def odd(catalog):
    """dns-poison-victim, expecting an origin that does not exist under v2."""
    poison = catalog["dns-poison-victim"]
    return dataclasses.replace(poison, name=ODD, title=ODD_TITLE, expect={**poison.expect, "v2": ("nobody",)})


@pytest.fixture(scope="module")
def run(catalog, odd, tmp_path_factory) -> list[CaseResult]:
    """The whole catalog under every model, then the odd scenario: one real failure."""
    return _run(tmp_path_factory.mktemp("run"), [*catalog.values(), odd])


@pytest.fixture(scope="module")
def two_engines(catalog, tmp_path_factory) -> list[CaseResult]:
    """Two scenarios on both engines. The engines agree on the catalog (the parity test holds
    them to it), so a disagreement is made: mitmproxy's v2 case of dns-poison-victim is given
    its real v1 case's requests, what an engine routing v2 like v1 would have produced."""
    pytest.importorskip("mitmproxy", reason="the mitmproxy extra is not installed")
    out = _run(tmp_path_factory.mktemp("engines"), [catalog["dns-poison-victim"], catalog["keepalive-second-host"]],
               engines=("native", "mitmproxy"))
    cases = {(r.id, r.engine): r for r in out}
    v1, v2 = cases["dns-poison-victim[v1]", "mitmproxy"], cases["dns-poison-victim[v2]", "mitmproxy"]
    v2.verdict, v2.requests = v1.verdict, copy.deepcopy(v1.requests)
    v2.passed, v2.failure = False, f"MISROUTED under protected model v2: {v1.requests[0].why}"
    return out


def _explained(tmp, scenario, model: str) -> str:
    """What `sni-lab explain SCENARIO --model MODEL` prints, with the events the lab recorded."""
    events: list[dict] = []
    (result,) = _run(tmp, [scenario], (model,), events=events)
    return result, explain(result, scenario.story, scenario.lesson, events)


def _failed(results) -> list[CaseResult]:
    return [r for r in results if not r.passed]


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
        cells = {}
        for k, m in enumerate(order):
            end = starts[order[k + 1]] if k + 1 < len(order) else (title if title > 0 else None)
            cells[m] = line[starts[m]:end].strip()
        grid[line.split("  ")[0]] = cells
    return grid


def _cell(r: CaseResult) -> str:
    return r.verdict + (" ⊘" if r.controls_off else "") + ("" if r.passed else " ✗")


# ---- results: what the run recorded --------------------------------------------------------

def test_every_decision_header_of_the_run_reads_back_and_agrees_with_the_outcome(run):
    answered = [(r, q) for r in run for q in r.requests if q.status is not None]
    assert answered
    for r, q in answered:
        told = parse_decision(q.decision)
        assert told is not None and told.model == r.model, q.decision
        if told.routed:
            assert q.origin == told.origin and q.outcome == told.origin
        else:
            assert (q.status, q.outcome) == (told.status, f"refused:{told.status}:{told.code}")


def test_summary_names_the_failed_case_and_the_v1_misroutes(run):
    s = summary(run)
    assert s["failed_ids"] == [f"{ODD}[v2]"] and s["failures"] == {f"{ODD}[v2]": ODD_FAILURE}
    assert "dns-poison-victim[v1]" in s["misrouted"]["v1"] and s["protected_misrouted"] == []
    assert s["models"] == list(MODELS) and s["engines"] == ["native"]
    host, v1 = (sum(r.verdict == "MISROUTED" for r in run if r.model == m) for m in ("host", "v1"))
    assert host and v1  # the unverified baseline and the write-up's model both misroute somewhere
    assert summary_line(s) == (f"{len(run)} cases, {len(run) - 1} passed, 1 failed; "
                               f"MISROUTED: {host} under host, {v1} under v1, 0 under protected models; "
                               f"{len(MODELS)} cases with a control off")


def test_a_saved_run_loads_back_and_renders_the_same(run, two_engines):
    for results in (run, two_engines):
        text = to_json(results)
        assert from_json(text) == results
        assert to_json(from_json(text)) == text
        assert table(from_json(text), color=False) == table(results, color=False)


# ---- table -----------------------------------------------------------------------------------

def test_table_puts_each_verdict_in_its_row_and_column(run):
    grid = _grid(table(run, color=False, width=300))
    assert list(grid) == list(dict.fromkeys(r.scenario for r in run))
    for r in run:
        assert grid[r.scenario][r.model] == _cell(r), r.id
    assert grid["dns-poison-victim"]["v1"] == "MISROUTED" and grid[ODD]["v2"] == "SAFE ✗"


def test_table_ends_with_the_summary_line_and_the_failed_case_with_its_reason(run):
    text = table(run, color=False)
    assert summary_line(run) in text.splitlines()
    failed = text[text.index("\nfailed:"):]
    assert f"{ODD}[v2]  {ODD_FAILURE}" in failed


def test_table_fits_the_terminal_and_truncates_long_names(run):
    text = table(run, color=False, width=80)
    matrix = text.split("\n\n")[0].splitlines()
    assert all(len(line) <= 80 for line in matrix)
    shown = [line.split("  ")[0] for line in matrix[2:]]
    cut = [name for name in shown if name.endswith("…")]
    assert cut and all(any(s.startswith(name[:-1]) for s in dict.fromkeys(r.scenario for r in run)) for name in cut)
    wide = table(run, color=False, width=300)
    assert "waf-bypass-sni-victim-host-saas" in wide and run[0].title in wide


def test_table_colors_verdicts_and_only_when_asked(run):
    plain, colored = table(run, color=False), table(run, color=True)
    assert "\x1b" not in plain and ANSI.sub("", colored) == plain
    assert "\x1b[31mMISROUTED" in colored and "\x1b[32mSAFE" in colored and "\x1b[33mREFUSED" in colored


def test_table_shows_a_title_as_text_never_as_terminal_control(run):
    text = table(run, color=False, width=300)
    row = next(line for line in text.splitlines() if line.startswith(ODD))
    assert "\x1b" not in text and row.endswith("Wrong <on> purpose & | piped\\x1b[2J second line")


def test_table_flags_engines_that_disagree(two_engines):
    text = table(two_engines, color=False, engines=["native", "mitmproxy"])
    grid = _grid(text)
    assert grid["dns-poison-victim"]["v2"] == "SAFE|MISROUTED ≠ ✗"
    assert grid["dns-poison-victim"]["v1"] == "MISROUTED"  # both engines agree: one verdict
    assert summary_line(two_engines).endswith("engines native vs mitmproxy: 1 mismatch")
    assert "dns-poison-victim[v2]  native SAFE, mitmproxy MISROUTED" in text[text.index("engine mismatches:"):]
    assert "dns-poison-victim[v2][mitmproxy]  MISROUTED under protected model v2" in text
    flipped = _grid(table(two_engines, color=False, engines=["mitmproxy", "native"]))
    assert flipped["dns-poison-victim"]["v2"] == "MISROUTED|SAFE ≠ ✗"


def test_table_of_nothing():
    assert table([], color=False) == "no cases\n"


# ---- JUnit -------------------------------------------------------------------------------------

def _testcases(xml: str) -> dict[str, ET.Element]:
    root = ET.fromstring(xml)
    (suite,) = root.findall("testsuite")
    return suite, {c.get("name"): c for c in suite.findall("testcase")}


def test_junit_parses_and_names_the_failing_case_with_its_reason(run):
    suite, cases = _testcases(junit(run))
    assert set(cases) == {r.id for r in run}
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == (str(len(run)), "1", "0")
    failing = [name for name, c in cases.items() if c.find("failure") is not None]
    assert failing == [f"{ODD}[v2]"]
    failure = cases[f"{ODD}[v2]"].find("failure")
    assert cases[f"{ODD}[v2]"].get("classname") == f"scenarios.{ODD}"
    assert failure.get("message") == ODD_FAILURE and failure.get("type") == "expectation"
    assert "expected: nobody; outcome: victim (MISMATCH)" in failure.text


def test_junit_tells_each_request_the_way_the_edge_decided(run):
    _, cases = _testcases(junit(run))
    for r in run:
        out = cases[r.id].find("system-out").text
        for q in r.requests:
            assert f"verdict: {q.verdict}; why: {q.why}" in out
            assert q.decision is None or f"decision: {q.decision}" in out


def test_junit_names_carry_the_engine_when_several_ran(two_engines):
    suite, cases = _testcases(junit(two_engines, suite_name="a&b"))
    assert suite.get("name") == "a&b"
    assert set(cases) == {f"{r.id}[{r.engine}]" for r in two_engines}
    failure = cases["dns-poison-victim[v2][mitmproxy]"].find("failure")
    assert failure.get("type") == "MISROUTED"
    assert failure.get("message").startswith("MISROUTED under protected model v2: ")


# ---- Markdown ----------------------------------------------------------------------------------

def _md_rows(md: str) -> dict[str, list[str]]:
    """scenario -> the cells after it, split on the pipes that are not escaped."""
    rows = {}
    for line in md.splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
            rows[cells[0].strip("`")] = cells[1:]
    return rows


def test_markdown_has_a_row_per_scenario_with_its_verdicts(run):
    md = markdown(run)
    rows = _md_rows(md)
    assert list(rows) == list(dict.fromkeys(r.scenario for r in run))
    for r in run:
        cells = rows[r.scenario]
        assert len(cells) == len(MODELS) + 1  # a cell per model, then the title
        text = r.verdict + (" ⊘" if r.controls_off else "")
        assert cells[MODELS.index(r.model)] == (text if r.passed else f"❌ {text}"), r.id
    assert rows[ODD][-1] == r"Wrong \<on\> purpose & \| piped\\x1b\[2J second line"


def test_markdown_tells_the_failed_case_and_its_requests(run):
    md = markdown(run)
    assert f"**{summary_line(run)}**" in md
    section = md[md.index("## Failed cases"):]
    assert section.startswith("## Failed cases\n\n### wrong-\\<on\\>&\"purpose\"\\[v2\\]\n")
    assert f"- **failure:** {ODD_FAILURE}" in section
    assert "expected `nobody`, got `victim` ❌" in section


def test_markdown_lists_engine_mismatches(two_engines):
    md = markdown(two_engines)
    assert "| `dns-poison-victim[v2]` | SAFE | MISROUTED |" in md[md.index("## Engine mismatches"):]
    assert _md_rows(md)["dns-poison-victim"][MODELS.index("v2")] == "❌ SAFE (native) / MISROUTED (mitmproxy) ⚠️"


# ---- explain ---------------------------------------------------------------------------------------

def _in_order(text: str, *parts: str) -> None:
    text = " ".join(text.split())  # steps wrap at the width; compare the words
    pos = -1
    for part in parts:
        found = text.find(" ".join(part.split()), pos + 1)
        assert found > pos, f"{part!r} not found after position {pos} in:\n{text}"
        pos = found


def test_explain_tells_the_poisoned_request_step_by_step(catalog, tmp_path):
    sc = catalog["dns-poison-victim"]
    r, text = _explained(tmp_path, sc, "v1")
    (q,) = r.requests
    told = parse_decision(q.decision)
    _in_order(text, sc.story.split(". ")[0], "1. DNS", q.dns, "2. TLS", f"SNI sent: {q.sni}",
              f"Certificate served for {', '.join(q.cert_names)}", f"valid for {q.name}", "· tls.cert",
              f"3. Edge decision (model v1, rule {told.rule}): route to origin saas. Reason: {told.reason}",
              "· route.decision", "4. Origin: saas answered (HTTP 200)", "· origin.hit", f"5. Verdict: MISROUTED — {q.why}",
              "expected saas, got saas ✓", "Lesson:", sc.lesson.split(". ")[0])
    colored = explain(r, sc.story, sc.lesson, color=True)
    assert "\x1b" not in text and "\x1b[31mMISROUTED" in colored
    assert ANSI.sub("", colored) == explain(r, sc.story, sc.lesson)


def test_explain_a_failed_handshake(catalog, tmp_path):
    r, text = _explained(tmp_path, catalog["unknown-sni"], "v2")
    (q,) = r.requests
    assert q.tls_error
    _in_order(text, "2. TLS", f"The handshake failed: {q.tls_error}", "3. Edge decision: none",
              "4. Origin: none — nothing was sent past the handshake", "5. Verdict: REFUSED")


def test_explain_a_keepalive_connection_and_a_refusal(catalog, tmp_path):
    r, text = _explained(tmp_path, catalog["keepalive-second-host"], "v1-waf")
    first, second = r.requests
    told = parse_decision(second.decision)
    assert text.count("2. TLS") == 1  # one connection, told once
    _in_order(text, "Request 1 of 2", "2. TLS", f"4. Origin: {first.origin}", "Request 2 of 2",
              "same address, SNI and certificate as the request before",
              f"3. Edge decision (model v1-waf, rule {told.rule}): refuse (403 waf-block). Reason: {told.reason}",
              "4. Origin: none — the edge answered itself (HTTP 403, waf-block)", "5. Verdict: REFUSED")


def test_explain_a_failed_case_says_why(run):
    r = next(r for r in run if r.id == f"{ODD}[v2]")
    text = explain(r)
    assert "\x1b" not in text.splitlines()[0] and "\\x1b[2J second line" in text.splitlines()[0]
    _in_order(text, "5. Verdict: SAFE", "expected nobody, got victim ✗ (mismatch)", f"FAILED: {ODD_FAILURE}")


def test_a_case_that_turns_a_control_off_is_reported_as_such(run):
    off = [r for r in run if r.scenario == "validator-poisoned-single"]
    assert {r.model for r in off} == set(MODELS)
    assert all(r.controls_off == ["validation=single"] and r.verdict == "MISROUTED" and r.passed for r in off)
    # every other case runs with its controls at their defaults, and no protected model is MISROUTED there
    assert not [r.id for r in run if r.controls_off and r.scenario != "validator-poisoned-single"]
    s = summary(run)
    assert "validator-poisoned-single[v2]" in s["misrouted"]["v2"]
    assert not any(i.startswith("validator-poisoned-single") for i in s["protected_misrouted"])
    assert s["controls_off"]["validator-poisoned-single[v2]"] == ["validation=single"]
    assert "5 cases with a control off" in summary_line(s)
    # the same case with its controls at their defaults would count (and its runner would fail it)
    on = [dataclasses.replace(r, controls_off=[]) for r in off]
    assert {i for i in summary(on)["protected_misrouted"]} == {f"validator-poisoned-single[{m}]"
                                                                for m in ("v1-waf", "v2", "v2-strict")}
    text = ANSI.sub("", table(run, color=False, width=160))
    row = next(line for line in text.splitlines() if line.startswith("validator-poisoned-single"))
    assert row.count("MISROUTED ⊘") == len(MODELS)
    assert "⊘ a control turned off by the scenario" in text and "validator-poisoned-single[v2]  validation=single" in text
    root = ET.fromstring(junit(run))
    case = root.find(".//testcase[@name='validator-poisoned-single[v2]']")
    assert case.find("properties/property[@name='controls_off']").get("value") == "validation=single"
    assert case.find("failure") is None and "controls off: validation=single" in case.find("system-out").text
    md = markdown(run)
    assert "## Cases with a control off" in md and "MISROUTED ⊘" in md
    assert {r.id: r.controls_off for r in from_json(to_json(run))} == {r.id: r.controls_off for r in run}


def test_a_refused_zone_is_told_in_its_case(run):
    cases = {r.model: r for r in run if r.scenario == "new-v1-zone-refused"}
    assert cases["v1-waf"].setup[0].startswith("zone saas3.example refused: 403 v1-closed: ")
    assert "no new zone goes on v1" in cases["v1-waf"].setup[0]
    assert cases["v1"].setup == ["zone saas3.example added on v1 listener spare-v1"]
    assert cases["v1"].verdict == "MISROUTED"
