"""The pipeline benchmark runs end to end in a tiny mode and writes its report."""

import json

import pytest

from conftest import PY, run


@pytest.mark.slow
def test_pipeline_benchmark_tiny(tmp_path):
    run(
        [
            PY,
            "-m",
            "benchmarks.pipelines",
            "--sizes",
            "32",
            "--images",
            "512",
            "--batch",
            "64",
            "--repeats",
            "1",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    res = json.loads((tmp_path / "pipelines-sc.json").read_text())
    ex = {r["executor"]: r for r in res["rows"]}
    assert {"torch-dataloader", "dali-cpu"} <= set(ex)
    assert ex["torch-dataloader"]["ratio_vs_torch"] == 1.0
    assert all(r["images_per_s"]["median"] > 0 for r in res["rows"])
    assert res["environment"]["torch"]
    assert "| sc | 32px | dali-cpu |" in (tmp_path / "pipelines-sc.md").read_text()


@pytest.mark.slow
def test_kernel_benchmark_tiny(tmp_path):
    run([PY, "-m", "benchmarks.kernels", "--tiny", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "kernels.json").read_text())
    losses = {r["loss"] for r in res["rows"]}
    assert losses == {"sc", "triplet-hardest", "invp-bank"}
    for r in res["rows"]:
        assert r["fused"]["median_ms"] > 0 and r["eager"]["median_ms"] > 0 and r["gemm"]["median_ms"] > 0
        assert r["eager"]["speedup_vs_eager"] == 1.0
        assert r["check"]["ok"] and r["check"]["max_rel_err"] <= r["check"]["tol"]  # values checked at the size
    bank = next(r for r in res["rows"] if r["loss"] == "invp-bank")
    assert bank["scan"]["median_ms"] > 0 and bank["scan"]["tb_s"] > 0  # the bank scan alone
    assert (tmp_path / "kernels.png").stat().st_size > 1000
    md = (tmp_path / "kernels.md").read_text()
    assert "| sc | B=64 D=32 | float32 |" in md and "| invp-bank | B=16 N=3000 D=32 K=64 | float32 |" in md


@pytest.mark.slow
def test_entry_point_tiny_writes_report(tmp_path):
    run([PY, "-m", "benchmarks", "--tiny", "--suites", "knn", "train_step", "--out", str(tmp_path)], timeout=900)
    report = (tmp_path / "report.md").read_text()
    assert "## knn" in report and "## train_step" in report and "faiss-flat" in report
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert {(r["method"], r["pipeline"]) for r in rows} >= {
        ("sc", "torch"),
        ("sc", "dali-cpu"),
        ("invp", "dali-cpu"),
        ("layerwise", "torch"),
    }
    assert all(0 <= r["data_stall"] <= 1 and r["images_per_s"] > 0 for r in rows)
    assert json.loads((tmp_path / "environment.json").read_text())["torch"]
    assert (tmp_path / "knn.png").stat().st_size > 1000 and (tmp_path / "train_step.png").stat().st_size > 1000


def test_readme_benchmark_section_is_in_sync():
    p = run([PY, "-m", "benchmarks.readme", "--check"], check=False)
    assert p.returncode == 0, p.stderr


@pytest.mark.slow
def test_lab_benchmark_tiny(tmp_path):
    run(
        [
            PY,
            "-m",
            "benchmarks.lab",
            "--images",
            "128",
            "--batch",
            "64",
            "--repeats",
            "1",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "lab.json").read_text())["rows"]
    assert {r["impl"].split(" (")[0] for r in rows} >= {"scikit-image + numpy", "dali-cpu"}
    assert all(r["images_per_s"]["median"] > 0 for r in rows) and rows[0]["ratio_vs_skimage"] == 1.0
    assert {r["rescale"] for r in rows} == {False, True} and (tmp_path / "lab.png").stat().st_size > 1000


@pytest.mark.slow
def test_exemplar_benchmark_tiny(tmp_path):
    run(
        [
            PY,
            "-m",
            "benchmarks.exemplar",
            "--images",
            "64",
            "--per-class",
            "4",
            "--batch",
            "64",
            "--repeats",
            "1",
            "--workers",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "exemplar.json").read_text())["rows"]
    names = [r["executor"].split(" (")[0] for r in rows]
    assert names[:2] == ["torch-dataloader", "dali-cpu"] and names[-1] == "materialised"
    assert rows[0]["ratio_vs_dataloader"] == 1.0 and all(r["patches_per_s"]["median"] > 0 for r in rows)
    assert all(r["patches"] == 256 for r in rows) and (tmp_path / "exemplar.png").stat().st_size > 1000


@pytest.mark.slow
def test_imagenet_headline_tiny_prints_its_table(tmp_path):
    """The headline benchmark at tiny sizes: an ImageNet-shaped JPEG folder made here, SC trained
    from it on the DataLoader, DALI CPU and the synthetic ceiling, rows in its table (InvP's rows:
    the acceptance run's test)."""
    p = run(
        [PY, "-m", "benchmarks.imagenet", "--tiny", "--runs", "sc", "--root", str(tmp_path / "jpegs")]
        + ["--out", str(tmp_path)]
    )
    from PIL import Image

    sizes = [Image.open(f).size for f in sorted((tmp_path / "jpegs" / "train").rglob("*.jpg"))]
    assert len(sizes) == 48 and sum(w > h for w, h in sizes) > len(sizes) / 2  # mostly landscape, as ImageNet
    rows = json.loads((tmp_path / "imagenet.json").read_text())["rows"]
    assert {(r["run"], r["pipeline"]) for r in rows} == {("sc", pipe) for pipe in ("torch", "dali-cpu", "synthetic")}
    assert all(r["images_per_s"] > 0 and 0 <= r["data_stall"] <= 1 for r in rows), rows
    assert all(r["data_stall"] < 0.05 for r in rows if r["pipeline"] == "synthetic")  # (no data work at all)
    assert "| run | pipeline | images/s | data-stall | vs synthetic (ceiling) |" in p.stdout
    assert [json.loads(x)["pipeline"] for x in (tmp_path / "imagenet.jsonl").read_text().splitlines()] == [
        r["pipeline"] for r in rows
    ]


@pytest.mark.slow
def test_bank_precision_benchmark_tiny(tmp_path):
    p = run([PY, "-m", "benchmarks.bank_precision", "--n", "4096", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bank-precision.json").read_text())["rows"]
    assert {(r["bank"], r["precision"]) for r in rows} == {
        (b, q) for b in ("random", "clustered") for q in ("bf16", "tf32")
    }
    for r in rows:
        assert 0.9 < r["topk_overlap_mean"] <= 1 and r["l_ins_max_abs_diff"] < 0.05
    assert "| bank | precision |" in p.stdout
