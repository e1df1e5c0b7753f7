"""The package's import structure (docs/architecture.md): no import cycle between modules of different
folders, no loop between the package's folders and top-level modules ("units"), each unit importing
only units on a lower floor of ``FLOORS`` (all counting function-local imports, which are still
dependencies), and the config module as a leaf that loading a YAML file can import without triton,
DALI or the method modules; a run with ``loss.impl=eager`` needs no triton at all."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

PACKAGES = {"fastssl": Path(ROOT) / "fastssl"}


def modules(packages: dict = PACKAGES) -> dict:
    """Module name -> source file, for every module of the packages (name -> folder)."""
    out = {}
    for pkg, folder in packages.items():
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


# The floors of the house (docs/architecture.md), lowest first: a unit imports only units on lower
# floors (the tools on the top floor may also use each other).  A unit is a top-level module or
# folder of fastssl; the data folder is three: what the images are (sources), what is done to them
# (plan) and who does it (executors).
FLOORS = [
    ("fastssl", "fastssl.errors", "fastssl.log", "fastssl.dist"),
    ("fastssl.registry", "fastssl.config_files"),
    ("fastssl.data.sources", "fastssl.data.plan", "fastssl.knn", "fastssl.losses"),
    ("fastssl.data.executors", "fastssl.features", "fastssl.kernels"),
    ("fastssl.models",),
    ("fastssl.methods",),
    ("fastssl.engine",),
    ("fastssl.config",),
    ("fastssl.eval",),
    (
        "fastssl.train",
        "fastssl.doctor",
        "fastssl.report",
        "fastssl.export",
        "fastssl.demo",
        "fastssl.materialise",
        "fastssl.cli",
        "fastssl.__main__",
    ),
]
DATA_SOURCES = ("sources", "check", "decode")  # fastssl.data.<these> are the sources unit
DATA_PLAN = ("plan", "recipe", "ops", "lab")  # the plan unit; the rest of fastssl.data: executors


def unit(name: str) -> str:
    """The unit a module belongs to: its top-level module or folder (data: one of three)."""
    parts = name.split(".")
    if len(parts) < 2:
        return name
    if parts[1] == "data":  # (the folder's own __init__ goes with the rest: executors)
        first = parts[2] if len(parts) > 2 else ""
        sub = "sources" if first in DATA_SOURCES else "plan" if first in DATA_PLAN else "executors"
        return f"{parts[0]}.data.{sub}"
    return ".".join(parts[:2])


def unit_graph(graph: dict) -> dict:
    """Unit -> the other units its modules import (from the module graph)."""
    out = {}
    for m, targets in graph.items():
        out.setdefault(unit(m), set()).update(unit(t) for t in targets)
    return {u: deps - {u} for u, deps in out.items()}


def unit_loops(graph: dict) -> list:
    """The loops between units: each a sorted list of the units that import each other round."""
    units = unit_graph(graph)
    for deps in list(units.values()):
        for d in deps:
            units.setdefault(d, set())
    return sorted(sorted(c) for c in strongly_connected(units) if len(c) > 1)


def package_graph() -> dict:
    known = modules()
    return {m: imports_of(m, p, known) for m, p in known.items()}


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


def test_no_loop_between_folders():
    """The units' import graph has no loop: methods -> eval -> methods and engine -> eval -> engine
    were two (frozen features and kNN classification now sit below both, in features/ and knn/)."""
    graph = package_graph()
    units = unit_graph(graph)
    assert "fastssl.losses" in units["fastssl.methods"] and "fastssl.features" in units["fastssl.engine"]
    assert unit_loops(graph) == []


def test_a_method_is_one_folder_the_data_layer_never_names():
    """Exemplar-CNN's surrogate set, ops, materialised sets and clustering live in its own folder,
    Split-Brain's soft encoding in its own; nothing below the methods imports a method's module."""
    graph = package_graph()
    for name in ("surrogate", "ops", "materialised", "cluster"):
        assert f"fastssl.methods.exemplar.{name}" in graph
    assert "fastssl.methods.splitbrain.encoding" in graph
    below = ("fastssl.data.", "fastssl.knn", "fastssl.features", "fastssl.models", "fastssl.losses", "fastssl.kernels")
    leaks = sorted(
        f"{m} imports {t}"
        for m, targets in graph.items()
        if m.startswith(below)
        for t in targets
        if t.startswith("fastssl.methods")
    )
    assert not leaks, leaks


def test_the_folder_check_fails_on_a_planted_loop(tmp_path):
    """Two folders importing each other (one way in a function, the other from a module of a
    sub-folder) are a loop, though no module imports itself round: the module cycle check alone
    passes them."""
    pkg = tmp_path / "pkg"
    for folder in ("", "a", "b", "b/deep"):
        (pkg / folder).mkdir(parents=True, exist_ok=True)
        (pkg / folder / "__init__.py").write_text("")
    (pkg / "a" / "tool.py").write_text("def f():\n    from pkg.b.deep import g\n")
    (pkg / "b" / "deep" / "g.py").write_text("from pkg.a import tool\n")
    (pkg / "c.py").write_text("import pkg.a.tool\n")
    known = modules({"pkg": pkg})
    graph = {m: imports_of(m, p, known) for m, p in known.items()}
    assert graph["pkg.a.tool"] == {"pkg.b.deep.g"} and graph["pkg.b.deep.g"] == {"pkg.a.tool"}
    assert unit_loops(graph) == [["pkg.a", "pkg.b"]]
    graph["pkg.b.deep.g"] = set()  # the loop broken: clean
    assert unit_loops(graph) == []


def test_units_import_only_lower_floors():
    """Every import goes down the house of docs/architecture.md (FLOORS here is its list)."""
    floor = {u: i for i, units in enumerate(FLOORS) for u in units}
    graph = package_graph()
    units = unit_graph(graph)
    unknown = sorted(u for u in units if u not in floor)
    assert not unknown, f"units with no floor in tests/test_imports.py FLOORS (docs/architecture.md): {unknown}"
    top = len(FLOORS) - 1
    wrong = sorted(
        f"{u} (floor {floor[u]}) imports {d} (floor {floor[d]})"
        for u, deps in units.items()
        for d in deps
        if floor[d] > floor[u] or (floor[d] == floor[u] and floor[u] != top)
    )
    assert not wrong, "imports that do not go down a floor:\n" + "\n".join(wrong)


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


def test_no_triton_without_a_fused_loss():
    """``import fastssl.config`` imports no triton, and loading a config (which imports the method
    registry) imports neither triton nor DALI nor a Triton kernel module."""
    probe = (
        "import sys, fastssl.config\n"
        "assert 'triton' not in sys.modules\n"
        "cfg = fastssl.config.load_config(sys.argv[1], ['loss.impl=eager'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.startswith('nvidia.dali') or "
        "m.startswith('fastssl.kernels.') and m not in ('fastssl.kernels.runtime', 'fastssl.kernels.selfcheck')))"
    )
    for config in ("configs/sc/builtin.yaml", "configs/layerwise/builtin.yaml", "configs/invp/builtin.yaml"):
        out = subprocess.run([sys.executable, "-c", probe, config], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.strip() == "[]", (config, out.stdout, out.stderr[-2000:])


def test_training_with_eager_losses_needs_no_triton():
    """``loss.impl=eager`` trains on a machine without Triton (it is made unimportable here): the
    methods import a fused kernel only when a fused loss is chosen.  (torch itself may import
    triton where it is installed, e.g. torch.optim through torch._dynamo, so the check is that
    it is not needed, not that it stays out of sys.modules.)"""
    probe = (
        "import sys, tempfile\n"
        "sys.modules['triton'] = None  # import triton now raises ImportError\n"
        "from fastssl import train\n"
        "for m in ('sc', 'layerwise', 'invp'):\n"
        "    with tempfile.TemporaryDirectory() as d:\n"
        "        args = ['--config', f'configs/{m}/builtin.yaml', f'out_dir={d}', 'loss.impl=eager',\n"
        "                'data.builtin.num_train=256', 'data.builtin.num_test=64', 'data.batch_size=16',\n"
        "                'data.pipeline=tensor', 'model.width=16', 'train.max_steps=1', 'train.monitor_every=0',\n"
        "                'train.progress=false', 'train.tensorboard=false']\n"
        "        assert train.main(args) == 0, m\n"
        "print(sorted(m for m in sys.modules if m.startswith('fastssl.kernels.')))"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "['fastssl.kernels.runtime', 'fastssl.kernels.selfcheck']"
