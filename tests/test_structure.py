"""The package's shape, read from its source: no import circle between its modules, one place
that makes ONNX Runtime sessions, one that pads table cells, one interleaved timer."""

from __future__ import annotations

import ast
from pathlib import Path

import tfsa_onnx

PACKAGE = Path(tfsa_onnx.__file__).parent


def _modules() -> dict[str, ast.Module]:
    """Every module of the package by dotted name (a package by its own name), parsed."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = [PACKAGE.name, *path.relative_to(PACKAGE).with_suffix("").parts]
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _lazy_reexports(tree: ast.Module) -> set[int]:
    """The nodes of a package's module-level __getattr__: names it hands out on first use, not
    modules the package needs (tfsa_onnx.optimize, tfsa_onnx.bench.bench_kernel)."""
    return {
        id(node)
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and f.name == "__getattr__"
        for node in ast.walk(f)
    }


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports, at module level or inside a function: an
    import inside a function is still a dependency of the design. `from P import m` with m a
    module is an edge to P.m, not to P."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, tree in modules.items():
        skip = _lazy_reexports(tree)
        targets: set[str] = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names}
                targets |= {s if s in modules else node.module for s in subs}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

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
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle():
    graph = import_graph()
    assert len(graph) > 30 and graph["tfsa_onnx.cli"]  # the graph was read
    assert circles(graph) == []


def test_the_circle_finder_finds_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def _calls(attribute: str) -> set[str]:
    """The modules that call something named `attribute` (x.attribute(...) or attribute(...))."""
    out = set()
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                f = node.func
                if (isinstance(f, ast.Attribute) and f.attr == attribute) or (
                    isinstance(f, ast.Name) and f.id == attribute
                ):
                    out.add(name)
    return out


def test_one_session_factory_one_cell_padder_one_interleaved_timer():
    assert _calls("InferenceSession") == {"tfsa_onnx.runtime"}
    assert _calls("ljust") | _calls("rjust") == {"tfsa_onnx.table"}
    # The interleaved rounds: the kernel benchmarks' timer and the genai benchmark's generations.
    assert _calls("rounds") == {"tfsa_onnx.bench.timing", "tfsa_onnx.bench.genai"}
