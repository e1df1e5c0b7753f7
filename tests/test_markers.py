"""The test tiers are markers on the tests: each one used is declared in pyproject.toml, and
sits on a test (or a file's ``pytestmark``), where it counts; a tier marker on a helper would
otherwise silently leave the test that calls it out of its tier."""

import ast
import re
from pathlib import Path

from conftest import ROOT

TIERS = {"slow", "ddp", "learning"}
BUILTIN = {"parametrize", "skip", "skipif", "xfail", "usefixtures", "filterwarnings"}


def marks(node):
    """The ``pytest.mark.<name>`` names in ``node`` (a decorator or an assigned value)."""
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Attribute)
        and n.value.attr == "mark"
        and isinstance(n.value.value, ast.Name)
        and n.value.value.id == "pytest"
    }


def test_every_marked_name_is_a_test_in_its_file():
    text = (Path(ROOT) / "pyproject.toml").read_text()
    block = re.search(r"^markers = \[(.*?)^\]", text, re.S | re.M).group(1)
    declared = set(re.findall(r'^\s*"(\w+):', block, re.M))
    assert declared == TIERS
    used = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                tiers = set().union(*map(marks, node.decorator_list)) if node.decorator_list else set()
                for m in tiers - BUILTIN:
                    used.setdefault(m, []).append(f"{path.name}::{node.name}")
                if tiers & TIERS:
                    assert node.name.startswith(("test", "Test")), f"{path.name}: {node.name} is not a test"
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
                for m in marks(node.value) - BUILTIN:
                    used.setdefault(m, []).append(f"{path.name}: pytestmark")
    assert set(used) <= declared, {m: w for m, w in used.items() if m not in declared}
    assert set(used) == TIERS  # (each tier marks some test)
