"""``python -m fastssl.report RUN_DIR``: report.md and its pictures from a real (tiny) run."""

import json
import os
import re

import numpy as np
import pytest

from conftest import PY, ROOT, read_metrics, run, train_cmd

PNG = b"\x89PNG\r\n\x1a\n"


def report(run_dir, capsys):
    from fastssl.report import main

    rc = main([str(run_dir)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def check_pictures(run_dir):
    """report.md links every picture in report/, and every linked picture is a real PNG."""
    md = (run_dir / "report.md").read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    drawn = sorted(f"report/{p.name}" for p in (run_dir / "report").iterdir())
    assert drawn and set(drawn) <= set(linked), (drawn, linked)
    for rel in linked:
        data = (run_dir / rel).read_bytes()
        assert len(data) > 1000 and data.startswith(PNG), rel
    return md, set(linked)


def png_size(path):
    data = path.read_bytes()
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # IHDR width, height


@pytest.fixture(scope="module")
def sc_run(tmp_path_factory):
    """One tiny SC epoch (16 steps) and its kNN evaluation, trained and random init."""
    from fastssl.eval.__main__ import main as evaluate

    out = tmp_path_factory.mktemp("report") / "sc-run"
    run(train_cmd(out, "train.epochs=1", "train.tensorboard=false"))
    ck = str(out / "checkpoints" / "last.pt")
    for flag in ([], ["--random-init"]):
        assert evaluate(["--checkpoint", ck, "--protocol", "knn", *flag]) == 0
    return out


@pytest.mark.slow
def test_report_of_a_real_run(sc_run, capsys):
    before = {p: p.stat().st_mtime_ns for p in sc_run.rglob("*")}
    rc, out, err = report(sc_run, capsys)
    assert rc == 0, err
    assert "fastssl.report: wrote report/retrieval.png" in out  # progress lines
    md, linked = check_pictures(sc_run)
    assert {"report/training.png", "report/retrieval.png", "report/filters.png"} <= linked
    # the retrieval grid: 16 rows of query + 8 + 8 tiles of 32 px shown at 64 px, 4 px borders
    from fastssl.report import grid_size

    assert grid_size(32, 16, 8) == (1298, 1222)
    assert png_size(sc_run / "report" / "retrieval.png") == (1298, 1222)
    # kNN monitor: plotted when the epoch records carry it, said so otherwise
    recs = read_metrics(sc_run)
    if any("knn_monitor" in r for r in recs):
        assert "report/knn_monitor.png" in linked
    else:
        assert "No epoch record in metrics.jsonl carries `knn_monitor`" in md
    # the evaluation table: trained next to random init, with the files' own numbers
    res = {f: json.loads((sc_run / f).read_text()) for f in ("eval_knn.json", "eval_knn_random.json")}
    row = next(line for line in md.splitlines() if line.startswith("| knn |"))
    assert (
        f"{res['eval_knn.json']['accuracy']:.2f}%" in row and f"{res['eval_knn_random.json']['accuracy']:.2f}%" in row
    )
    assert "Neighbours with the query's label, over 256 test images" in md
    assert "CPU, " in md and "`checkpoints/last.pt`: step 16" in md  # the machine and the checkpoint
    assert "<details><summary>config.yaml" in md and "name: sc" in md
    # it only reads: nothing but report.md and report/ changed
    changed = {
        p
        for p, t in before.items()
        if p.exists()
        and p.stat().st_mtime_ns != t
        and p.name != "report.md"
        and "report" not in p.relative_to(sc_run).parts
    }
    assert not changed


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    p = run([PY, "-m", "fastssl.report", str(tmp_path)], check=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and "not a run folder" in p.stderr
    assert all(x in p.stderr for x in ("config.yaml", "metrics.jsonl", os.path.join("checkpoints", "last.pt")))
    (tmp_path / "config.yaml").write_text("method: {name: sc}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    rc, out, err = report(tmp_path, capsys)
    assert rc == 2 and err.count("\n") == 1 and "no checkpoints/last.pt" in err and "config.yaml" not in err
    rc, _, err = report(tmp_path / "absent", capsys)
    assert rc == 2 and err.strip().endswith("absent: no such folder")


@pytest.mark.slow
def test_report_of_a_layerwise_run(tmp_path, capsys):
    """Another backbone (the shallow net) and two stages: the features of the last trained
    stage, the 6x6 first layer, and the run's own filters/layer1.png linked too."""
    out = tmp_path / "lw"
    run(
        train_cmd(
            out,
            "method.layers=2",
            "train.epochs=1",
            "eval.layer=layer2",
            "train.tensorboard=false",
            config="configs/layerwise/builtin.yaml",
        )
    )
    rc, _, err = report(out, capsys)
    assert rc == 0, err
    md, linked = check_pictures(out)
    assert {"report/training.png", "report/retrieval.png", "report/filters.png", "filters/layer1.png"} <= linked
    assert "pooled `layer2` features" in md
    assert "No `eval_<protocol>[_random].json` in the run folder" in md
    assert png_size(out / "report" / "retrieval.png") == (1298, 1222)


def test_layerwise_features_are_its_last_trained_stage(tiny_cfg):
    from fastssl.report import feature_stage

    lw = os.path.join(ROOT, "configs/layerwise/builtin.yaml")
    assert feature_stage(tiny_cfg("method.layers=2", config=lw)) == "layer2"
    assert feature_stage(tiny_cfg("method.layers=2", "eval.layer=layer1", config=lw)) == "layer1"
    assert feature_stage(tiny_cfg()) is None  # the backbone's last stage


def test_metrics_reading_and_unlabeled_grid(tmp_path):
    """A resumed run's repeated steps (the last record wins), a half-written last line, epoch
    records apart; a grid without labels has neutral borders and the same size."""
    from PIL import Image

    from fastssl.report import NEUTRAL, draw_grid, grid_size, pick_queries, read_metrics

    rows = [{"step": s, "epoch": s / 4, "loss": float(s), "lr": 0.1} for s in (1, 2, 3, 2, 3, 4)]
    rows.insert(4, {"step": 4, "epoch": 1, "knn_monitor": 12.5})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
    steps, epochs, bad = read_metrics(str(tmp_path / "m.jsonl"))
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and bad == 1
    assert epochs == [{"step": 4, "epoch": 1, "knn_monitor": 12.5}]

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 200)
    q = pick_queries(labels, 200, 16, rng)
    assert len(set(q)) == 16 and len(set(labels[q])) == 10  # every class shows
    imgs = rng.integers(0, 256, (3, 2, 16, 16, 3), dtype=np.uint8)
    size = draw_grid(imgs[:, 0], imgs, imgs, None, None, ("a", "b"), str(tmp_path / "g.png"))
    assert size == grid_size(16, 3, 2) == Image.open(tmp_path / "g.png").size
    assert Image.open(tmp_path / "g.png").convert("RGB").getpixel((8, 24 + 8)) == NEUTRAL  # the query's border
