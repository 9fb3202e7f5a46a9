"""The deciding code is pure: no module of the pure set reaches I/O, a clock, randomness or
an adapter, directly or through any lab module it imports.

Read from the source with `ast`, never by importing, so nothing is executed. Imports under
`if TYPE_CHECKING:` do not count (they never run). `pathlib` and `importlib.resources` are
allowed, for naming the packaged world file (`topology.default_path`); reading a file is
what is forbidden, so calls like `open()` and `Path.read_bytes()` are looked for too.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lab

ROOT = Path(lab.__file__).parent
PURE = ("lab.compose", "lab.policy", "lab.models", "lab.waf", "lab.hostnames", "lab.oracle", "lab.hostnorm",
        "lab.topology", "lab.resolver", "lab.strips", "lab.results", "lab.edge.hello", "lab.edge.h2conn",
        "lab.workshop.checks", "lab.workshop.room", "lab.edgereport",
        # the real edges' plan and config writers (lab.edges.process starts them)
        "lab.edges", "lab.edges.plan", "lab.edges.nginx", "lab.edges.caddy", "lab.edges.haproxy", "lab.edges.mitm")  # resolver: the DNS answer; strips: the live page's fold
# Top-level modules that do I/O, read a clock or a random source, or carry bytes.
FORBIDDEN = {"asyncio", "socket", "ssl", "select", "selectors", "subprocess", "sqlite3", "os", "shutil",
             "tempfile", "signal", "multiprocessing", "concurrent", "http", "urllib", "logging", "time",
             "random", "secrets", "uuid", "aiohttp", "h2", "h11", "mitmproxy", "requests", "httpx", "uvloop"}
# Adapters of the lab, forbidden by name whatever they import.
ADAPTERS = ("lab.edge", "lab.control", "lab.state", "lab.dns", "lab.client", "lab.origins", "lab.run",
            "lab.world", "lab.events", "lab.pki")
IO_FUNCTIONS = {"open", "print", "input"}
IO_METHODS = {"read_bytes", "read_text", "write_bytes", "write_text", "unlink", "mkdir", "rmdir", "touch",
              "iterdir", "glob"}


def source_of(module: str, root: Path) -> Path | None:
    rel = Path(*module.split(".")[1:])
    for path in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def imports(module: str, root: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import the module runs; `from lab import x` names lab.x."""
    path = source_of(module, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out.append((base, node.lineno))
            out += [(f"{base}.{a.name}", node.lineno) for a in node.names
                    if source_of(f"{base}.{a.name}", root) is not None and base.split(".")[0] == "lab"]
    return out


def io_calls(module: str, root: Path) -> list[tuple[str, int]]:
    path = source_of(module, root)
    found = []
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in IO_FUNCTIONS:
                found.append((f"{f.id}()", node.lineno))
            elif isinstance(f, ast.Attribute) and f.attr in IO_METHODS:
                found.append((f".{f.attr}()", node.lineno))
    return found


def violations(module: str, root: Path = ROOT) -> list[str]:
    """What `module` and every lab module it reaches do that a pure module must not."""
    found, seen, todo = [], set(), [(module, (module,))]
    while todo:
        name, chain = todo.pop(0)  # breadth first: the shortest chain is the one reported
        if name in seen:
            continue
        seen.add(name)
        via = " -> ".join(chain)
        for what, line in io_calls(name, root):
            found.append(f"{via}: calls {what} (line {line})")
        for imported, line in imports(name, root):
            top = imported.split(".")[0]
            if top in FORBIDDEN:
                found.append(f"{via}: imports {imported} (line {line})")
            elif top == "lab":
                if any(imported == a or imported.startswith(a + ".") for a in ADAPTERS):
                    found.append(f"{via}: imports the adapter {imported} (line {line})")
                elif imported != "lab" and source_of(imported, root) is not None:
                    todo.append((imported, chain + (imported,)))
    return sorted(found)


@pytest.mark.parametrize("module", PURE)
def test_pure_module_reaches_no_io(module):
    assert source_of(module, ROOT) is not None, f"{module} is listed as pure but does not exist"
    assert violations(module) == []


def test_the_checker_finds_what_it_forbids(tmp_path):
    pkg = tmp_path / "lab"
    (pkg / "edge").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "edge" / "__init__.py").write_text("")
    (pkg / "pure.py").write_text("from typing import TYPE_CHECKING\nfrom . import helper\n"
                                 "if TYPE_CHECKING:\n    import asyncio\n")
    (pkg / "helper.py").write_text("import json\nfrom lab.edge import core\n\ndef f(p):\n    return p.read_bytes()\n"
                                   "def g():\n    import time\n    return time.time()\n")
    assert violations("lab.pure", pkg) == [
        "lab.pure -> lab.helper: calls .read_bytes() (line 5)",
        "lab.pure -> lab.helper: imports the adapter lab.edge (line 2)",
        "lab.pure -> lab.helper: imports time (line 7)",
    ]
