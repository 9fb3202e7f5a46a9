"""`sni-lab edges matrix`: the catalog on real edges under each flavour, one report.

The write-up's attack must land on every edge's `default` config and on none of the `fixed`
ones; a legitimate request a `fixed` config refuses is shown as over-blocking, not hidden."""
import json
import subprocess
import sys

import pytest

from lab import edgereport
from lab.edges.process import available
from lab.results import CaseResult, RequestResult, agrees

INSTALLED = [e for e in ("nginx", "caddy", "haproxy") if available(e) is None]


def req(outcome, expected, verdict="SAFE", origin=None, legitimate=False, listener="saas-v1"):
    return RequestResult(sni="www.victim.example", host=None, address="127.0.0.11", port=1, dns=None, cert_names=[],
                         cert_valid=True, tls_error=None, status=None, origin=origin, decision=None, verdict=verdict,
                         why="", outcome=outcome, expected=expected, legitimate=legitimate, listener=listener)


def case(scenario, engine, model, *requests, passed=True, na=None):
    return CaseResult(scenario=scenario, title="t", model=model, engine=engine, verdict="N/A" if na else
                      max((q.verdict for q in requests), key=["REFUSED", "SAFE", "MISROUTED"].index),
                      passed=passed, failure=None, ms=1.0, requests=list(requests), not_applicable=na)


@pytest.mark.parametrize("expected,outcome,same", [
    ("refused:403:waf-block", "refused:403", True), ("refused:403:waf-block", "refused:421", False),
    ("refused", "refused:404", True), ("tls:unrecognized_name", "tls:internal_error", True),
    ("victim", "victim", True), ("victim", "saas", False), ("victim", "refused:421", False),
])
def test_another_edge_agrees_by_kind_and_status(expected, outcome, same):
    assert agrees(expected, outcome) is same


def test_the_report_counts_misrouting_over_blocking_and_differences():
    results = [
        case("attack", "nginx", "default", req("saas", "saas", "MISROUTED", origin="saas")),
        case("attack", "nginx", "fixed", req("tls:unrecognized_name", "victim", "REFUSED")),
        case("legit", "nginx", "fixed", req("refused:421", "saas", "REFUSED", legitimate=True), passed=False),
        case("lifecycle", "nginx", "fixed", na="custom hostname lifecycle"),
    ]
    configs = {("nginx", "fixed"): {"version": "1.22.1", "lines": {"saas-v1": ("ssl_reject_handshake on;",)}}}
    default, fixed = edgereport.columns(results, configs)
    assert default.counts()["misrouted"] == 1 and default.counts()["differs"] == 0
    c = fixed.counts()
    assert (c["misrouted"], c["over_blocked"], c["failed"], c["differs"], c["not_applicable"]) == (0, 1, 1, 2, 1)
    md = edgereport.markdown(results, configs, {"caddy": "caddy is not installed (apt-get install caddy)"})
    assert "| `legit` | — | REFUSED ✗ ⚑ |" in md and "**caddy skipped:** caddy is not installed" in md
    assert "ssl_reject_handshake on;" in md and "(over-blocked)" in md
    page = edgereport.to_html(results, configs)
    assert 'class="REFUSED failed over"' in page and "ssl_reject_handshake on;" in page


@pytest.fixture(scope="module")
def matrix(tmp_path_factory):
    if not INSTALLED:
        pytest.skip("none of nginx, Caddy, HAProxy is installed (scripts/sysdeps.sh installs them)")
    out = tmp_path_factory.mktemp("edges")
    res = subprocess.run([sys.executable, "-m", "lab", "edges", "matrix", "--edge", ",".join(INSTALLED), "--json",
                          "--markdown", str(out / "report.md"), "--html", str(out / "report.html"),
                          "--certs", str(out / "certs")], capture_output=True, text=True, timeout=600)
    assert res.stdout.startswith("{"), res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return json.loads(res.stdout), (out / "report.md").read_text(), res.returncode


def _cell(data, scenario, engine, flavour):
    (c,) = [c for c in data["cases"] if (c["scenario"], c["engine"], c["model"]) == (scenario, engine, flavour)]
    return c


@pytest.mark.parametrize("edge", ["nginx", "caddy", "haproxy"])
def test_the_write_up_lands_on_default_and_on_no_fixed_config(matrix, edge):
    if edge not in INSTALLED:
        pytest.skip(f"{edge} is not installed")
    data, _, _ = matrix
    attack = _cell(data, "dns-poison-victim", edge, "default")
    assert attack["verdict"] == "MISROUTED" and attack["requests"][0]["origin"] == "saas"
    assert attack["requests"][0]["cert_valid"]
    assert _cell(data, "dns-poison-victim", edge, "fixed")["verdict"] != "MISROUTED"
    fixed = [c for c in data["cases"] if c["engine"] == edge and c["model"] == "fixed"]
    assert [c["id"] for c in fixed if c["verdict"] == "MISROUTED" and not c["controls_off"]] == []
    # a legitimate request reaches its origin on both flavours
    for flavour in ("default", "fixed"):
        assert _cell(data, "legit-victim", edge, flavour)["requests"][0]["origin"] == "victim"
        assert _cell(data, "legit-saas-app", edge, flavour)["requests"][0]["origin"] == "saas"


def test_the_report_shows_over_blocking_and_what_a_static_config_cannot_run(matrix):
    data, md, code = matrix
    rows = {(r["edge"], r["flavour"]): r for r in data["edges"]}
    assert rows[("lab", "v2")]["failed"] == 0
    for edge in INSTALLED:
        assert rows[(edge, "fixed")]["misrouted_protected"] == 0
        assert rows[(edge, "default")]["misrouted"] > 0
        assert rows[(edge, "fixed")]["not_applicable"] > 0
    na = _cell(data, "custom-hostname-active", INSTALLED[0], "fixed")
    assert na["verdict"] == "N/A" and "control plane" in na["not_applicable"]
    over = [c for c in data["cases"] if any(q["legitimate"] and q["origin"] is None for q in c["requests"])]
    assert all(not c["passed"] for c in over)
    assert (code == 1) == any(not c["passed"] for c in data["cases"])
    assert "| edge | flavour |" in md and "where it differs from the lab's `v2`" in md
