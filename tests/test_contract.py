"""The engine contract, checked on the source: each rule the engines share is written once.

One definition each of the body limit, the handshake timeout, the host precedence and the
request-head checks; refusals built by the policy; one `route.decision` emitter; and the
mitmproxy engine imports the contract, never the native engine's modules.
"""
import ast
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parent.parent / "lab"
EDGE = LAB / "edge"


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), str(path))


def _modules(folder: Path) -> dict[str, ast.Module]:
    return {str(p.relative_to(LAB)): _tree(p) for p in sorted(folder.rglob("*.py"))}


def _where(modules, found) -> list[str]:
    """The modules with a node `found` matches; docstrings are prose, not code, and do not count."""
    out = []
    for name, tree in modules.items():
        prose = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
        if any(found(node) for node in ast.walk(tree) if id(node) not in prose):
            out.append(name)
    return sorted(out)


def _defines(name):
    return lambda n: isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == name


def _reads(attr, on=None):
    return lambda n: (isinstance(n, ast.Attribute) and n.attr == attr
                      and (on is None or (isinstance(n.value, ast.Name) and n.value.id in on)
                           or (isinstance(n.value, ast.Attribute) and n.value.attr in on)))


def _constant(fragment):
    return lambda n: isinstance(n, ast.Constant) and isinstance(n.value, str) and fragment in n.value


@pytest.fixture(scope="module")
def edge():
    return _modules(EDGE)


@pytest.fixture(scope="module")
def lab_modules():
    return _modules(LAB)


def test_the_body_limit_is_one_function(edge):
    assert _where(edge, _defines("body_too_large")) == ["edge/contract.py"]
    assert _where(edge, _constant("body-too-large")) == ["edge/contract.py"]


def test_the_handshake_timeout_is_read_once(edge):
    assert _where(edge, _reads("handshake_timeout")) == ["edge/contract.py"]
    assert _where(edge, _constant("handshake timeout")) == ["edge/contract.py"]


def test_the_host_precedence_is_the_policys(lab_modules):
    # Target's fields (Host headers, :authority, absolute-form) are read by the policy alone;
    # everyone else asks `named_hosts` / `request_host`, or reads the Decision's host.
    assert _where(lab_modules, _defines("named_hosts")) == ["policy.py"]
    assert _where(lab_modules, _reads("hosts", on={"target", "t"})) == ["policy.py"]
    assert _where(lab_modules, _reads("absolute", on={"target", "t"})) == ["policy.py"]
    assert _where(lab_modules, _reads("authority", on={"target", "t"})) == ["policy.py"]


def test_the_request_head_checks_are_written_once(edge):
    assert _where(edge, _defines("h1_head")) == ["edge/contract.py"]
    assert _where(edge, _defines("h2_malformed")) == ["edge/contract.py"]
    for text in ("Missing 'Host' header", "bad value in header", "only chunked is served", "is not served over HTTP/1",
                 "pseudo-header"):
        assert _where(edge, _constant(text)) == ["edge/contract.py"], text


def test_answers_are_framed_once(edge):
    assert _where(edge, _defines("response_fields")) == ["edge/contract.py"]
    assert _where(edge, _defines("sent_body")) == ["edge/contract.py"]
    assert _where(edge, _reads("phrase")) == ["edge/contract.py", "edge/pages.py"]  # pages: its HTML title


def test_refusals_are_built_by_the_policy(edge):
    calls = lambda n: isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "Decision"
    assert _where(edge, calls) == []


def test_route_decision_has_one_emitter(edge):
    emitters = [name for name, tree in edge.items() for n in ast.walk(tree)
                if isinstance(n, ast.Call) and n.args and _constant("route.decision")(n.args[0])]
    assert emitters == ["edge/core.py"]


def test_tls_events_are_told_by_the_connection_state(edge):
    for kind in ("tls.clienthello", "tls.cert"):
        assert _where(edge, _constant(kind)) == ["edge/contract.py"], kind


def test_the_mitmproxy_engine_imports_the_contract_not_the_native_engine(edge):
    tree = edge["edge/mitm.py"]
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert "lab.edge.contract" in imported
    assert not imported & {"lab.edge.native", "lab.edge.http1", "lab.edge.http2", "lab.edge.tls"}
    for name, tree in edge.items():  # and nothing in the edge imports an engine
        mods = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if name not in ("edge/native.py", "edge/mitm.py"):
            assert not mods & {"lab.edge.native", "lab.edge.mitm"}, name
