"""docs/fidelity.md is true to the code: every value its "checked default" column names is read
from the config schema (the method's config dataclass, fastssl/config.py) or from the shipped
config it names, and must be equal."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import yaml

from conftest import ROOT

DOC = Path(ROOT, "docs", "fidelity.md")
SECTIONS = {  # section title -> the method whose schema its rows name
    "Exceptions to the rule": None,  # (each row names its method in its first cell)
    "Spatial Contrasting": "sc",
    "Exemplar-CNN with clustering": "exemplar",
    "Layer-wise contrastive": "layerwise",
    "Invariance Propagation": "invp",
    "Split-Brain autoencoder": "splitbrain",
}
ROW_METHOD = {"Exemplar-CNN": "exemplar", "layer-wise": "layerwise", "Split-Brain": "splitbrain", "SC": "sc"}
SPAN = re.compile(r"`(?:(configs/[\w./-]+\.yaml): )?([a-z_]+(?:\.[a-z_0-9]+)+)=([^`]*)`")


def split_row(line: str):
    """A markdown table row's cells: split at | outside code spans, except an escaped \\|."""
    cells, cur, code, prev = [], "", False, ""
    for ch in line:
        if ch == "`":
            code = not code
        if ch == "|" and not code and prev != "\\":
            cells.append(cur.strip())
            cur = ""
        else:
            cur += ch
        prev = ch
    return cells[1:]


def checked_rows():
    """(section, method, row setting, [(config file or None, key, value text)]) for every table row."""
    rows, section, col = [], None, None
    for line in DOC.read_text().splitlines():
        if line.startswith("## "):
            section, col = line[3:].strip(), None
            continue
        if not line.startswith("|"):
            col = None if not line.strip() else col
            continue
        cells = split_row(line)
        if col is None:  # a header row
            col = cells.index("checked default") if "checked default" in cells else -1
            continue
        if col < 0 or set(line) <= set("|-"):
            continue
        method = SECTIONS[section] if section in SECTIONS else None
        if section == "Exceptions to the rule":
            method = ROW_METHOD[cells[0]]
        cell = cells[col]
        spans = SPAN.findall(cell)
        rows.append((section, method, cells[0] if section != "Exceptions to the rule" else cells[1], cell, spans))
    return rows


def schema(method: str):
    from omegaconf import OmegaConf

    from fastssl.config import Config
    from fastssl.methods import get_method

    return OmegaConf.structured(Config(method=get_method(method).Config()))


def actual(method: str, file, key: str):
    """The value fastssl uses: the schema's default, or the shipped config's (merged onto the schema)."""
    from omegaconf import OmegaConf

    cfg = schema(method)
    if file:
        path = Path(ROOT, file)
        assert path.is_file(), f"fidelity.md names {file}, which does not exist"
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    assert OmegaConf.select(cfg, key, default="<absent>") != "<absent>", f"fidelity.md names {key}: not in the schema"
    v = OmegaConf.select(cfg, key)
    return OmegaConf.to_container(v) if OmegaConf.is_config(v) else v


def same(doc, code) -> bool:
    if isinstance(doc, (list, tuple)) and isinstance(code, (list, tuple)):
        return len(doc) == len(code) and all(same(a, b) for a, b in zip(doc, code))
    if isinstance(doc, bool) or isinstance(code, bool) or doc is None or code is None:
        return doc == code
    if isinstance(doc, (int, float)) and isinstance(code, (int, float)):
        return math.isclose(doc, code, rel_tol=1e-3, abs_tol=1e-12)
    return str(doc) == str(code)


ROWS = checked_rows()


def test_every_table_row_has_a_checked_default_cell():
    assert {r[0] for r in ROWS} == set(SECTIONS), "a section's table lost its 'checked default' column"
    for section, _, setting, cell, spans in ROWS:
        assert spans or cell == "-", f"fidelity.md, {section}, row {setting!r}: checked default {cell!r} unparsed"
    assert sum(len(r[4]) for r in ROWS) >= 80


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r[1]}:{r[2]}"[:60])
def test_the_documented_defaults_are_the_codes(row):
    section, method, setting, _, spans = row
    for file, key, text in spans:
        doc = yaml.safe_load(text)
        code = actual(method, file, key)
        where = f"{file}: " if file else "the schema's "  # (findall gives "" for no file)
        assert same(doc, code), (
            f"docs/fidelity.md ({section}, {setting!r}) says {key}={text}, but {where}{key} is {code!r}"
        )


def test_a_wrong_value_in_the_doc_is_caught():
    """The check itself can fail: a changed default makes its row disagree."""
    assert not same(yaml.safe_load("5"), actual("exemplar", None, "method.cluster.max_size"))
    assert not same(yaml.safe_load("[0.7, 1.5]"), actual("exemplar", None, "method.aug.scale"))
    assert same(yaml.safe_load("0.667"), actual("sc", None, "method.patch_fraction"))
    with pytest.raises(AssertionError, match="not in the schema"):
        actual("sc", None, "method.no_such_key")
