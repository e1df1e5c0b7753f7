"""docs/adding-a-method.md stays true: its two blocks (a method file and its config) are copied out of
the page, the method registers itself, its recipe makes the same pixels on every executor, a bad
setting is refused naming the key, and a short run on the built-in set trains and checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PY, ROOT, TINY, executors, read_metrics, reference

GUIDE = Path(ROOT) / "docs" / "adding-a-method.md"


def blocks() -> dict:
    """The guide's fenced blocks whose first line names a file: {path: text}."""
    out = {}
    for lang, body in re.findall(r"```(python|yaml)\n(.*?)```", GUIDE.read_text(), re.S):
        first = body.splitlines()[0]
        if first.startswith("# ") and "/" in first:
            out[first[2:].strip()] = body
    return out


@pytest.fixture(scope="module")
def guide_files(tmp_path_factory):
    """The guide's files written out; its method module imported (which registers ``simclr``)."""
    files = blocks()
    assert set(files) == {"fastssl/methods/simclr.py", "configs/simclr/builtin.yaml"}
    root = tmp_path_factory.mktemp("guide")
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    from fastssl.methods import METHODS

    assert "simclr" not in METHODS  # (not shipped: the guide's own)
    spec = importlib.util.spec_from_file_location("fastssl_guide_simclr", root / "fastssl/methods/simclr.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield root, files
    METHODS._entries.pop("simclr"), METHODS._meta.pop("simclr")  # other tests in this process see the five
    sys.modules.pop(spec.name)


def test_the_table_gives_each_files_real_line_count(guide_files):
    _, files = guide_files
    table = dict(re.findall(r"\| `([^`]+)` \| (\d+) \|", GUIDE.read_text()))
    assert {k: int(v) for k, v in table.items()} == {k: len(v.splitlines()) for k, v in files.items()}


def test_the_example_recipe_is_the_same_on_every_executor(guide_files):
    from fastssl.config import load_config
    from fastssl.data.sources import Split
    from fastssl.methods import get_method
    from fastssl.models import build_backbone

    root, _ = guide_files
    cfg = load_config(str(root / "configs/simclr/builtin.yaml"), TINY)
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    model = get_method("simclr")(cfg, build_backbone(cfg.model, 32), 32, len(images))
    r = model.recipe()
    for kind, ex in executors(Split(images=images), r).items():
        ex.set_epoch(0)
        for batch, (index, want) in zip(ex, reference(images, r, 0)):
            assert torch.equal(batch["index"], torch.from_numpy(index))
            for got, ref in zip(batch["views"], want):
                if kind == "dali-cpu":  # DALI's HSV and flip in float: within rounding
                    assert (got - ref).abs().mean() < 0.05, (kind, (got - ref).abs().mean())
                else:
                    assert torch.equal(got, ref), kind
    out = model(tuple(v for v in batch["views"]), batch["index"])
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])


def test_a_bad_setting_is_refused_naming_the_key(guide_files):
    from fastssl.config import load_config
    from fastssl.errors import ConfigError

    root, _ = guide_files
    with pytest.raises(ConfigError, match=r"^method\.crop_fraction: must be in \(0, 1\], got 1.5"):
        load_config(str(root / "configs/simclr/builtin.yaml"), TINY + ["method.crop_fraction=1.5"])
    with pytest.raises(ConfigError, match=r"method\.temprature"):
        load_config(str(root / "configs/simclr/builtin.yaml"), TINY + ["method.temprature=0.1"])


def test_a_short_run_trains_and_checkpoints(guide_files, tmp_path, monkeypatch):
    from fastssl.train import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    root, _ = guide_files
    out = tmp_path / "run"
    rc = main(
        [
            "--config",
            str(root / "configs/simclr/builtin.yaml"),
            *TINY,
            "train.max_steps=6",
            "data.pipeline=torch",
            "train.monitor_every=0",
            f"out_dir={out}",
        ]
    )
    assert rc == 0
    logged = read_metrics(out)
    losses = [r["loss"] for r in logged if "loss" in r]
    assert len(losses) >= 5 and all(np.isfinite(losses))
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=False)["config"]["method"]["name"] == "simclr"


@pytest.fixture(scope="module")
def guide_checkout(guide_files, tmp_path_factory):
    """A copy of this checkout's code (fastssl/, benchmarks/, the configs link) with the guide's two
    files added and nothing else changed: the tools run there as subprocesses, so they find the
    method only because its file is in fastssl/methods/."""
    root, files = guide_files
    repo = tmp_path_factory.mktemp("guide-checkout")
    shutil.copytree(Path(ROOT) / "fastssl", repo / "fastssl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        Path(ROOT) / "benchmarks", repo / "benchmarks", ignore=shutil.ignore_patterns("__pycache__", "results")
    )
    (repo / "configs").symlink_to("fastssl/configs")
    for rel in files:
        assert not (repo / rel).exists()
        (repo / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / rel, repo / rel)
    return repo


def in_checkout(repo, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    p = subprocess.run([PY, *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


@pytest.mark.slow
def test_the_tools_take_the_example_with_no_other_edit(guide_checkout, tmp_path):
    """The doctor's rows, a benchmark row, the report and an export of the guide's method, with the
    guide's two files the only change: the tools list the registry's methods and ask each what
    they need (docs/adding-a-method.md, "What the tools ask of a method")."""
    from fastssl.methods import for_tools

    repo = guide_checkout
    assert "simclr" in for_tools() and "simclr" in for_tools("train_step")  # default rows, declared by default
    assert "simclr" in for_tools("pipelines") and "simclr" in for_tools("train_step-tiny")
    # the doctor: its pipeline row (executors against each other) and its training row
    d = in_checkout(
        repo,
        "-m",
        "fastssl",
        "doctor",
        "--only",
        "pipeline:simclr,train:simclr",
        "--jobs",
        "1",
        "--json",
        str(tmp_path / "doctor.json"),
    )
    rows = {r["id"]: r for r in json.loads((tmp_path / "doctor.json").read_text())["components"]}
    assert set(rows) == {"pipeline:simclr", "train:simclr"}, d.stdout
    assert all(r["status"] == "ok" for r in rows.values()), rows
    assert rows["train:simclr"]["detail"].startswith("2 steps, ")
    # a benchmark row: end-to-end training steps on the built-in config
    in_checkout(
        repo,
        "-m",
        "benchmarks.train_step",
        "--methods",
        "simclr",
        "--pipelines",
        "torch",
        "--steps",
        "4",
        "--out",
        str(tmp_path / "bench"),
        "data.batch_size=32",
        "data.builtin.num_train=512",
        "model.width=16",
        "data.num_workers=1",
    )
    bench = json.loads((tmp_path / "bench" / "train_step.json").read_text())["rows"]
    assert [(r["method"], r["pipeline"]) for r in bench] == [("simclr", "torch")] and bench[0]["images_per_s"] > 0
    # a short run trained in the checkout, its report and an export
    run_dir = tmp_path / "run"
    in_checkout(
        repo,
        "-m",
        "fastssl",
        "train",
        "--config",
        "configs/simclr/builtin.yaml",
        *TINY,
        "train.max_steps=2",
        "train.tensorboard=false",
        "data.pipeline=torch",
        f"out_dir={run_dir}",
    )
    p = in_checkout(repo, "-m", "fastssl", "report", str(run_dir))
    md = (run_dir / "report.md").read_text()
    assert "* **method** `simclr`" in md and "report/retrieval.png" in md, p.stdout
    out = tmp_path / "simclr.pt"
    in_checkout(
        repo, "-m", "fastssl", "export", "--checkpoint", str(run_dir / "checkpoints" / "last.pt"), "--out", str(out)
    )
    meta = torch.load(out, weights_only=True)["meta"]
    assert meta["method"] == "simclr" and meta["input"] == {
        "pixels": "(x / 255 - mean) / std",
        "mean": [0.5] * 3,
        "std": [0.3] * 3,
    }
