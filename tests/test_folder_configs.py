"""The small folder config of each method (configs/<method>/folder.yaml) and the README's "Train on
your own images": check, train, eval, export and report on a tiny folder, as a user runs them."""

import json
import os
import re

import pytest
import yaml

from conftest import PY, ROOT, read_metrics, run
from formats import write_folder

METHODS = ("sc", "exemplar", "layerwise", "invp", "splitbrain")
FASTSSL = [PY, "-m", "fastssl"]


def _config(method):
    path = os.path.join(ROOT, "configs", method, "folder.yaml")
    return path, yaml.safe_load(open(path)), open(path).read()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_has_a_small_folder_config(method):
    """(tests/test_configs.py validates every config, this one included, on a tiny folder)"""
    path, raw, text = _config(method)
    assert raw["data"]["source"] == "folder" and raw["data"]["image_size"] <= 64
    assert raw["model"]["arch"] not in ("resnet50", "split-resnet50") and raw["train"]["epochs"] <= 30
    if raw["optim"].get("schedule", "cosine") == "step":  # milestones inside the run
        assert all(0 < m <= raw["train"]["epochs"] for m in raw["optim"]["milestones"])
    else:
        assert not raw["optim"].get("milestones")
    # the header: how to train it by name on one's own folder, and how to evaluate the result
    assert f"fastssl train --config {method}/folder data.path=" in text
    assert re.search(r"fastssl eval --checkpoint runs/\S+/checkpoints/last\.pt --protocol \w", text)


@pytest.mark.slow
def test_train_on_your_own_images(tmp_path):
    """The README section's steps on a tiny folder (2 classes, train/ and val/, JPEG and PNG of
    several sizes): fastssl check, then every method's folder config trains 2 steps; SC trains one
    whole epoch (kNN monitor included) and is evaluated, exported and reported."""
    data = tmp_path / "my_images"
    for i, split in enumerate(("train", "val")):
        write_folder(data / split, classes=("circles", "squares"), per_class=12 - 6 * i, size=(90, 70), seed=i)
        write_folder(data / split, classes=("circles", "squares"), per_class=2, size=(60, 110), seed=5 + i, smooth=True)
    env = {"FASTSSL_CACHE": str(tmp_path / "cache")}
    p = run(FASTSSL + ["check", str(data)], env_extra=env)
    assert "as training reads it: 2 classes (circles, squares); splits train 24, val 12" in p.stdout
    # the steps below as `fastssl ...` commands, through the command's entry point in one process
    # (one interpreter start instead of eight)
    small = ["data.batch_size=8", "train.progress=false", "train.tensorboard=false", "data.num_workers=1"]
    runs = tmp_path / "runs"
    cmds = []
    for method in METHODS:
        extra = ["method.num_classes=16"] if method == "exemplar" else []  # (1,000 seed images by default)
        steps = ["train.epochs=1"] if method == "sc" else ["train.max_steps=2"]
        out = runs / f"{method}-mine"
        cmds.append(
            ["train", "--config", f"{method}/folder", f"data.path={data}", f"out_dir={out}", *small, *steps, *extra]
        )
    sc = runs / "sc-mine"
    ck = str(sc / "checkpoints" / "last.pt")
    cmds += [
        ["eval", "--checkpoint", ck, "--protocol", "knn"],
        ["export", "--checkpoint", ck, "--format", "state_dict", "--out", str(tmp_path / "b.pt")],
        ["report", str(sc)],
    ]
    code = (
        "import sys, json; from fastssl import cli\nfor c in json.loads(sys.argv[1]):\n    assert cli.main(c) == 0, c\n"
    )
    p = run([PY, "-c", code, json.dumps(cmds)], env_extra=env)
    for method in METHODS:
        recs = read_metrics(runs / f"{method}-mine")
        assert recs and recs[-1]["step"] == (3 if method == "sc" else 2), (method, recs[-1])
    assert any("knn_monitor" in r for r in read_metrics(sc))
    assert "knn accuracy" in p.stdout + p.stderr
    assert (tmp_path / "b.pt").is_file() and (sc / "report.md").is_file()
