"""Every shipped config loads and validates, against tiny files in its dataset's real format; a
config for a paper's number names that number, its expected GPU time and its evaluation command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT
from formats import write_cifar, write_folder, write_idx, write_stl10

CONFIGS = sorted(Path(ROOT, "configs").glob("*/*.yaml"))


def header(path: Path) -> str:
    """The comment block at the top of a config."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].strip())
    return " ".join(lines)


@pytest.fixture(scope="module")
def data_roots(tmp_path_factory):
    """Tiny datasets in the official formats, enough images for every config's settings."""
    root = tmp_path_factory.mktemp("formats")
    write_stl10(root / "stl10", n_unl=40, n_train=20, n_test=10)
    write_cifar(root / "c10", "cifar10", n_per_batch=12)
    write_cifar(root / "c100", "cifar100", n_per_batch=40)
    for split in ("train", "val"):
        write_folder(root / "folder" / split, per_class=6, size=(48, 40))
    write_idx(root / "idx", n_train=40, n_test=10)
    return {
        "stl10": root / "stl10",
        "cifar10": root / "c10",
        "cifar100": root / "c100",
        "folder": root / "folder",
        "idx": root / "idx",
    }


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_config_validates(path, data_roots):
    import yaml

    from fastssl.config import load_config

    source = (yaml.safe_load(path.read_text()).get("data") or {}).get("source", "builtin")
    # the tiny files hold fewer images than a real batch or surrogate-class budget: those are scaled down
    overrides = [] if source == "builtin" else [f"data.path={data_roots[source]}", "data.batch_size=8"]
    if source != "builtin" and path.parent.name == "exemplar":
        overrides.append("method.num_classes=8")
    cfg = load_config(str(path), overrides)
    assert cfg.method.name == path.parent.name


@pytest.mark.parametrize(
    "path",
    [p for p in CONFIGS if not p.name.startswith(("builtin", "folder"))],  # (folder.yaml: tests/test_folder_configs.py)
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_a_headline_config_states_its_number_time_and_command(path):
    """A config for a real dataset says what it reproduces (a table or the authors' script, with the
    published number, or "no published number" and why), the expected GPU time and the command
    that evaluates it."""
    text = header(path)
    assert "Reproduces:" in text, f"{path}: no 'Reproduces:' line"
    assert re.search(r"\d+(\.\d+)?%", text) or "no published number" in text, f"{path}: no published number"
    assert "Expected GPU time" in text, f"{path}: no expected GPU time"
    assert re.search(r"fastssl(\.eval)? (eval|--checkpoint)|-m fastssl\.eval", text), f"{path}: no evaluation command"
