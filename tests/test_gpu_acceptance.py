"""benchmarks/gpu_acceptance.sh --tiny on this CPU machine writes every section's file (at most 8)
and benchmarks.readme renders them; the benchmark suites' new options (sizes, implementation
choice, pipeline choice) and their per-implementation / per-run error capture."""

import argparse
import json
import os
import sys

import pytest
import torch

from conftest import PY, ROOT, run

FILES = {
    "doctor.json",
    "kernels.json",
    "compiled.md",
    "pipelines.json",
    "train_losses.json",
    "train_step.json",
    "knn.json",
    "acceptance.log",
}
GPU_SECTIONS = ("kernels", "pipelines", "train_losses", "train_step", "knn")

sys.path.insert(0, ROOT)


def test_acceptance_tiny_writes_every_section_and_the_readme_renders_it(tmp_path):
    out = tmp_path / "acc"
    p = run(
        ["bash", "benchmarks/gpu_acceptance.sh", "--tiny", str(out)], timeout=900, check=False, env_extra={"PYTHON": PY}
    )
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert set(os.listdir(out)) == FILES
    doc = json.loads((out / "doctor.json").read_text())
    assert doc["status"] == "ok" and doc["complete"] and doc["components"]
    for name in GPU_SECTIONS:
        env = json.loads((out / f"{name}.json").read_text())
        assert env["section"] == name and env["rows"] and env["markdown"].startswith(("|", "#####")), env
        if torch.cuda.is_available():
            assert env["status"] == "ok", env
        else:  # no GPU: says so, and keeps what ran on the CPU instead
            assert env["status"] == "not available" and env["why"] == "no GPU", env
            assert env["cpu_status"] == "ok" and env["ran_instead"], env
    pipes = json.loads((out / "pipelines.json").read_text())
    assert {r["method"] for r in pipes["rows"]} == {"sc", "layerwise", "invp", "splitbrain"}
    losses = json.loads((out / "train_losses.json").read_text())["rows"]
    assert {(r["method"], r["precision"]) for r in losses} == {(m, p) for m in ("sc", "invp") for p in ("fp32", "bf16")}
    assert all(r["within_tolerance"] for r in losses)
    compiled = (out / "compiled.md").read_text()
    assert compiled.startswith("<!-- acceptance {") and "| kernel |" in compiled and "sm_90" in compiled
    log = (out / "acceptance.log").read_text()
    assert "== summary" in log and "8 files" in log and "-- stderr:" in log

    r = run([PY, "-m", "benchmarks.readme", "--acceptance", str(out), "--print-acceptance"])
    md = r.stdout
    assert md.startswith("### GPU acceptance on ") and "| section | status | seconds | limit |" in md
    for heading in (
        "#### Doctor",
        "#### Fused loss kernels",
        "#### Compiled kernel",
        "#### Data pipelines",
        "#### Training losses",
        "#### Training images/s",
        "#### kNN graph",
    ):
        assert heading in md
    assert "| kernel sc_loss" in md and "| sc_fwd | fp32 | sm_90 |" in md and "| invp | fp32 | 2 |" in md
    from benchmarks import readme

    text = open(readme.TARGET).read()
    new = readme.render(text, str(out))
    assert new.count(readme.ACC_BEGIN) == 1 and new.index(readme.END) < new.index(readme.ACC_BEGIN)
    assert readme.render(new, str(out)) == new  # idempotent once the markers are in
    assert readme.render(text, str(tmp_path / "absent")) == readme.render(text, str(tmp_path / "absent2"))


def test_readme_acceptance_section_from_files(tmp_path):
    from benchmarks import readme

    (tmp_path / "doctor.json").write_text(
        json.dumps(
            {
                "section": "doctor",
                "status": "failed",
                "why": "1 of 2 components failed",
                "seconds": 3,
                "limit_s": 75,
                "device": "NVIDIA-H200",
                "versions": {"torch": "2.x", "gpus": ["NVIDIA H200 (sm_90, 140 GiB)"]},
                "components": [
                    {
                        "id": "faiss",
                        "component": "faiss cpu vs torch",
                        "status": "ok",
                        "why": "",
                        "detail": "a|b",
                        "seconds": 1.0,
                    },
                    {
                        "id": "collectives",
                        "component": "collectives (nccl)",
                        "status": "failed",
                        "why": "timed out after 60 s",
                        "detail": "",
                        "seconds": 60.0,
                    },
                ],
                "stderr_tail": "Traceback\nRuntimeError: boom",
            }
        )
    )
    (tmp_path / "knn.json").write_text(
        json.dumps(
            {
                "section": "knn",
                "status": "timed out",
                "why": "timed out after 45 s",
                "seconds": 45,
                "limit_s": 45,
                "markdown": "",
                "rows": [],
                "stderr_tail": "last words",
            }
        )
    )
    md = readme.acceptance_section(str(tmp_path))
    assert md.startswith("### GPU acceptance on NVIDIA-H200")
    assert (
        "| doctor | failed: 1 of 2 components failed | 3 | 75 |" in md and "| kernels | missing: no kernels.json" in md
    )
    assert "| faiss cpu vs torch | ok | a\\|b | 1.0 |" in md and "timed out after 60 s" in md
    assert "NVIDIA H200 (sm_90, 140 GiB)" in md and "RuntimeError: boom" in md and "last words" in md
    assert readme.acceptance_section(str(tmp_path / "none")) is None
    base = f"intro\n{readme.BEGIN}\nold\n{readme.END}\ntail\n"
    out = readme.render(base, str(tmp_path))
    assert f"{readme.END}\n\n{readme.ACC_BEGIN}\n### GPU acceptance" in out and out.endswith(
        f"{readme.ACC_END}\ntail\n"
    )
    gone = readme.render(out, str(tmp_path / "none"))  # markers kept, placeholder text
    assert readme.ACC_BEGIN in gone and "No GPU acceptance run yet" in gone


def test_kernel_benchmark_sizes_and_error_rows(tmp_path, monkeypatch):
    from benchmarks import kernels as K

    a = argparse.Namespace(sizes="headline", tiny=False, b=None, d=None, n=None, bank_b=None, k=None)
    assert K.sizes_of("sc", a) == [dict(B=4096, D=128)]
    assert K.sizes_of("invp-bank", a) == [dict(B=256, N=n, D=128, K=4096) for n in (65536, 262144, 1281167)]
    a.b, a.d, a.n, a.k = [512, 1024], [64], [10000], 128
    assert K.sizes_of("triplet-hardest", a) == [dict(B=512, D=64), dict(B=1024, D=64)]
    assert K.sizes_of("invp-bank", a) == [dict(B=256, N=10000, D=64, K=128)]

    def boom(*x):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setitem(K.LOSSES["sc"], "fused", boom)
    assert K.main(["--tiny", "--losses", "sc", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())["rows"]
    assert [r["fused"]["error"] for r in rows] == [
        "RuntimeError: no compiler here",
        "not run: failed at B=64 D=32 float32",
    ]
    assert all(r["eager"]["median_ms"] > 0 for r in rows)
    md = (tmp_path / "kernels.md").read_text()
    assert "| sc | B=64 D=32 | float32 | error |" in md and "* fused at sc B=64 D=32 float32: RuntimeError" in md


def test_train_step_failure_row_has_the_stderr_and_knn_impls(tmp_path):
    p = run(
        [
            PY,
            "-m",
            "benchmarks.train_step",
            "--methods",
            "sc",
            "--pipelines",
            "torch",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
            "model.width=0",
        ],
        check=False,
    )
    assert p.returncode == 1
    assert "config error: model.width" in p.stderr  # the training process's own stderr
    rows = json.loads((tmp_path / "train_step.json").read_text())["rows"]
    assert rows[0]["pipeline"] == "torch" and "exited 2" in rows[0]["error"]
    assert "| sc | torch | failed:" in (tmp_path / "train_step.md").read_text()

    run(
        [
            PY,
            "-m",
            "benchmarks.knn",
            "--n",
            "500",
            "--impls",
            "torch",
            "faiss-flat",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads((tmp_path / "knn.json").read_text())["rows"]
    assert [r["impl"].split(" (")[0] for r in rows] == ["torch brute force", "faiss-flat"]
    assert rows[0]["speedup_vs_torch"] == 1.0 and "no warm-up run" in (tmp_path / "knn.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_doctor_full_on_gpu(tmp_path):
    p = run([PY, "-m", "fastssl.doctor", "--jobs", "4", "--json", str(tmp_path / "d.json")], check=False, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:]
