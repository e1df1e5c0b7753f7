"""The test tiers name real tests: a renamed test would otherwise silently leave its tier."""

import ast
from pathlib import Path

from conftest import MARKS


def test_every_marked_name_is_a_test_in_its_file():
    here = Path(__file__).parent
    for mark, files in MARKS.items():
        for name, tests in files.items():
            defined = {n.name for n in ast.walk(ast.parse((here / name).read_text())) if isinstance(n, ast.FunctionDef)}
            assert tests <= defined, f"conftest.{mark.upper()}: {name} has no {sorted(tests - defined)}"
