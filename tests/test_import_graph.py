"""mxq's import graph: no cycles, and no import from the lower layers up into the higher ones.

Every ``import`` / ``from ... import`` of an ``mxq`` module counts, at module level and inside functions
alike (a function-level import is still a dependency, only a deferred one); imports under
``if TYPE_CHECKING:`` are for type checkers only, never executed, and do not count. Layers, lowest first:
``io``, ``formats`` and ``model`` hold data and file formats; ``plan``, ``evaluate`` and ``run`` decide and
drive, so the former must never import the latter.
"""
from __future__ import annotations

import ast
from pathlib import Path

import mxq

ROOT = Path(mxq.__file__).resolve().parent
LOWER = ("mxq.io", "mxq.formats", "mxq.model")
HIGHER = ("mxq.plan", "mxq.evaluate", "mxq.run")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The mxq modules ``path`` imports (``from pkg import name`` counts ``pkg.name`` when that is a module)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.split(".")[0] == "mxq")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] == "mxq":
                    for a in child.names:
                        sub = f"{target}.{a.name}"
                        out.add(sub if sub in modules else target)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in out if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    return {m: _imports(p, set(files)) for m, p in files.items()}


def _under(mod: str, prefixes: tuple[str, ...]) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _without_reexports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop each package ``__init__``'s imports of its own submodules (its public re-exports): a submodule
    must not import its package back, and that edge stays, so a real circle through an ``__init__`` is
    still found."""
    return {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}


def test_no_import_cycles():
    cycles = _cycles(_without_reexports(_graph()))
    assert not cycles, "import cycles in mxq: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_lower_layers_do_not_import_higher_ones():
    bad = sorted(f"{m} imports {d}" for m, deps in _graph().items() if _under(m, LOWER)
                 for d in deps if _under(d, HIGHER))
    assert not bad, "io/formats/model must not import plan/evaluate/run: " + "; ".join(bad)


def test_the_checker_sees_a_cycle_and_a_function_level_import(tmp_path):
    g = {"mxq.a": {"mxq.b"}, "mxq.b": {"mxq.c"}, "mxq.c": {"mxq.a"}, "mxq.d": set()}
    assert _cycles(g) == [["mxq.a", "mxq.b", "mxq.c"]]
    src = ROOT / "io" / "reader.py"
    deps = _imports(src, set(_graph()))
    assert "mxq.presets" in deps          # imported inside resolve_source, a function
