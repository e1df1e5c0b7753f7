"""python -m benchmarks.learning --tiny: every method trains on real images (Fashion-MNIST's IDX
files, or the colour photo crops for Split-Brain), is evaluated by its paper's protocol next to
random init, and the table, the curves' plot and the docs block are written."""

import json
import os

import pytest

from conftest import PY, run

FMNIST = "/usr/share/datasets/fashion-mnist"
METHODS = ("sc", "exemplar", "layerwise", "invp", "splitbrain")


@pytest.mark.slow
def test_learning_benchmark_tiny_writes_table_plot_and_docs(tmp_path):
    from formats import write_idx

    fmnist = FMNIST
    if not os.path.isdir(
        fmnist
    ):  # (docs/learning.md: apt-get install dataset-fashion-mnist) the same format, made here
        fmnist = str(tmp_path / "idx")
        write_idx(fmnist, n_train=600, n_test=300)
    docs = tmp_path / "docs" / "learning.md"
    docs.parent.mkdir()
    docs.write_text(
        "# Learning\n\nprose kept\n\n<!-- learning:begin (x) -->\nOLDBLOCK\n<!-- learning:end -->\ntail kept\n"
    )
    out = tmp_path / "out"
    p = run(
        [PY, "-m", "benchmarks.learning", "--tiny", "--out", str(out), "--work", str(tmp_path / "work")]
        + ["--fmnist", fmnist, "--docs", str(docs)],
        timeout=1200,
    )
    for m in METHODS:
        res = json.loads((out / "learning" / f"paper-{m}.json").read_text())
        assert res["evals"], m
        for e in res["evals"]:
            assert 0 <= e["trained"]["accuracy"] <= 100 and 0 <= e["random"]["accuracy"] <= 100, (m, e)
        init = [r for r in res["monitor"] if "knn_monitor_init" in r]
        curve = [r for r in res["monitor"] if "knn_monitor" in r]
        assert len(init) == 1 and init[0]["step"] == 0 and len(curve) >= 2, m  # the level, then one per epoch
    md = (out / "learning.md").read_text()
    for label in (
        "Spatial Contrasting",
        "Exemplar-CNN",
        "layer-wise contrastive",
        "Invariance Propagation",
        "Split-Brain",
    ):
        assert f"| {label} |" in md, label
    for protocol in ("finetune", "svm-folds", "transfer", "knn", "linear conv1", "linear conv5"):
        assert f"| {protocol}" in md, protocol
    assert (out / "learning.png").stat().st_size > 10_000  # the curves against the random-init lines
    assert (docs.parent / "learning.png").stat().st_size > 10_000
    text = docs.read_text()
    assert (
        "prose kept" in text and "tail kept" in text and "OLDBLOCK" not in text and "| Invariance Propagation |" in text
    )
    assert "random init" in p.stdout


def test_milestones_scale_with_the_length():
    from benchmarks.learning import scaled

    assert scaled(30, [75, 85, 92, 100], 110) == [20, 23, 25, 27]
    assert scaled(30, [400, 600, 700], 800) == [15, 22, 26]
    assert scaled(2, [75, 85, 92, 100], 110) == [1, 2, 2, 2]  # one per mark: per-milestone factors stay aligned


# methods whose named Fashion-MNIST config holds the settings of the benchmark's paper-recipe run
# (docs/learning.md measures those runs; the named config is not run again)
SAME_AS_PAPER = ("sc", "exemplar", "layerwise", "splitbrain")


@pytest.mark.parametrize("method", SAME_AS_PAPER)
def test_named_config_is_the_measured_paper_run(tmp_path, method):
    from omegaconf import OmegaConf

    from benchmarks.learning import recipes, run_overrides
    from fastssl.config import load_config
    from formats import write_idx

    paper, named = recipes(30, "paper")[method], recipes(30, "fmnist")[method]
    if paper.data == "fmnist":
        data = str(tmp_path)
        write_idx(data, n_train=600, n_test=20)
    else:  # the colour photo crops (a few per photo)
        from benchmarks.learning import photo_crops

        data = photo_crops(str(tmp_path / "photos"), 200, 20)
    a = load_config(paper.config, run_overrides(paper, data, 30, "x"))
    b = load_config(named.config, run_overrides(named, data, 30, "x"))
    for key in ("method", "model", "optim", "train.epochs", "data.batch_size", "seed"):
        va, vb = OmegaConf.select(a, key), OmegaConf.select(b, key)
        va = OmegaConf.to_container(va) if OmegaConf.is_config(va) else va
        vb = OmegaConf.to_container(vb) if OmegaConf.is_config(vb) else vb
        assert va == vb, f"{named.config}: {key} differs from the measured run's"
    # the protocols' settings that every protocol of the run shares: the named config's eval values
    # (those that differ between them, e.g. the layer of each probe, are the evaluation command's)
    settings = [dict(o.split("=", 1) for o in over) for _, _, over in paper.protocols]
    shared = {k: v for k, v in settings[0].items() if all(st.get(k) == v for st in settings)}
    for k, v in shared.items():
        assert str(OmegaConf.select(b, k)).lower() == v.lower(), f"{named.config}: {k} is not {v}"
