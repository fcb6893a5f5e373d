"""Dependencies point one way (DESIGN.md): no module of tunelab.evaluate sits on an import cycle,
counting the imports inside functions too (that is where the compare <-> report cycle hid).
Read from the source with `ast`, so it costs milliseconds and sees every import, run or not."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"


def module_graph(src: Path, package: str) -> dict[str, set[str]]:
    """Every module of `package` under `src` -> the modules of the package it imports anywhere
    in its file (top level or inside functions). `from pkg.a import b` counts as pkg.a.b when b
    is a module, else as pkg.a."""
    files = {}
    for f in (src / package).rglob("*.py"):
        parts = f.relative_to(src).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = f
    graph = {}
    for name, f in files.items():
        here = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = here.split(".")[:len(here.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:
                    deps.add(f"{base}.{a.name}" if f"{base}.{a.name}" in files else base)
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_evaluate_module_is_on_an_import_cycle():
    graph = module_graph(SRC, "tunelab")
    evaluate = sorted(m for m in graph if m.startswith("tunelab.evaluate."))
    assert {"tunelab.evaluate.compare", "tunelab.evaluate.report", "tunelab.evaluate.verdict",
            "tunelab.evaluate.metrics", "tunelab.evaluate.judge"} <= set(evaluate)
    # the report sits under compare: compare writes it; the report reads fields
    assert "tunelab.evaluate.report" in graph["tunelab.evaluate.compare"]
    assert "tunelab.evaluate.compare" not in graph["tunelab.evaluate.report"]
    on_cycles = [c for c in cycles(graph) if any(m.startswith("tunelab.evaluate") for m in c)]
    assert not on_cycles, on_cycles
    for name in evaluate:           # and each imports on its own
        importlib.import_module(name)


def test_the_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "compare.py").write_text("from pkg.report import write_report\n")
    (pkg / "report.py").write_text("def f():\n    from pkg.compare import Comparison\n")
    (pkg / "leaf.py").write_text("from . import report\n")
    graph = module_graph(tmp_path, "pkg")
    assert graph["pkg.leaf"] == {"pkg.report"}
    assert cycles(graph) == [["pkg.compare", "pkg.report"]]
