"""The pipeline benchmark runs end to end in a tiny mode and writes its report."""
import json

from conftest import PY, run


def test_pipeline_benchmark_tiny(tmp_path):
    run([PY, "-m", "benchmarks.pipelines", "--sizes", "32", "--images", "512", "--batch", "64", "--repeats", "1",
         "--workers", "1", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "pipelines-sc.json").read_text())
    ex = {r["executor"]: r for r in res["rows"]}
    assert {"torch-dataloader", "dali-cpu"} <= set(ex)
    assert ex["torch-dataloader"]["ratio_vs_torch"] == 1.0
    assert all(r["images_per_s"]["median"] > 0 for r in res["rows"])
    assert res["environment"]["torch"]
    assert "| sc | 32px | dali-cpu |" in (tmp_path / "pipelines-sc.md").read_text()


def test_kernel_benchmark_tiny(tmp_path):
    run([PY, "-m", "benchmarks.kernels", "--tiny", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "kernels.json").read_text())
    losses = {r["loss"] for r in res["rows"]}
    assert losses == {"sc", "triplet-hardest"}
    for r in res["rows"]:
        assert r["fused"]["median_ms"] > 0 and r["eager"]["median_ms"] > 0
        assert r["eager"]["speedup_vs_eager"] == 1.0
    assert (tmp_path / "kernels.png").stat().st_size > 1000
    assert "| sc | 64 | 32 | float32 |" in (tmp_path / "kernels.md").read_text()
