"""The package's import structure: no import cycle between modules of different folders (counting
function-local imports, which are still dependencies), and the config module as a leaf that
loading a YAML file can import without triton, DALI or the method modules."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = {"fastssl": Path(ROOT) / "fastssl"}


def modules() -> dict:
    """Module name -> source file, for every module of the fastssl package."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([pkg, *parts])] = path
    return out


def imports_of(name: str, path: Path, known: dict) -> set:
    """The fastssl modules ``name`` imports anywhere in its file (top level or inside functions),
    except under ``if __name__ == "__main__":`` (an entry point's shim is not a dependency)."""
    tree = ast.parse(path.read_text())
    guarded = {
        id(n)
        for g in ast.walk(tree)
        if isinstance(g, ast.If) and "__main__" in ast.unparse(g.test)
        for n in ast.walk(g)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def resolve(target: str):
        while target and target not in known:  # a name imported from a module: the module
            target = target.rpartition(".")[0]
        return target or None

    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base] * bool(base))
            targets = [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        found |= {t for t in map(resolve, targets) if t and t != name}
    return found


def folder(name: str, known: dict) -> str:
    """The package folder a module lives in (a package's __init__ belongs to its own folder)."""
    return name if known[name].name == "__init__.py" else name.rpartition(".")[0]


def strongly_connected(graph: dict) -> list:
    """Tarjan's strongly connected components of ``graph`` (node -> set of nodes)."""
    index, low, stack, on, comps, count = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = count[0]
        count[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while not comp or comp[-1] != v:
                comp.append(stack.pop())
                on.discard(comp[-1])
            comps.append(comp)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in graph:
        if v not in index:
            visit(v)
    return comps


def test_no_import_cycle_between_folders():
    known = modules()
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    assert sum(map(len, graph.values())) > 100  # the walk sees the package's real imports
    assert "fastssl.config" in graph["fastssl.train"] and "fastssl.errors" in graph["fastssl.data.sources"]
    crossing = [sorted(c) for c in strongly_connected(graph) if len({folder(m, known) for m in c}) > 1]
    assert not crossing, f"import cycles across folders: {crossing}"


def test_the_cycle_check_sees_function_local_imports(tmp_path):
    """A cycle made only by an import inside a function is found (the check can fail)."""
    (tmp_path / "a.py").write_text("def f():\n    from pkg import b\n")
    (tmp_path / "b.py").write_text("import pkg.a\n")
    known = {"pkg.a": tmp_path / "a.py", "pkg.b": tmp_path / "b.py"}
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    assert graph == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert sorted(max(strongly_connected(graph), key=len)) == ["pkg.a", "pkg.b"]


def test_config_is_a_leaf():
    """``import fastssl.config`` (what loading a YAML file needs) pulls in neither triton, nor DALI,
    nor the method modules."""
    code = (
        "import sys, fastssl.config\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'nvidia') or "
        "m.startswith('fastssl.methods') or m.startswith('fastssl.kernels')))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
    errors = subprocess.run(
        [sys.executable, "-c", "import sys, fastssl.errors; print(sorted(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'fastssl.config'" not in errors and "'torch'" not in errors  # the error types import nothing of fastssl
