"""benchmarks/gpu_acceptance.sh --tiny on this CPU machine: every section gives rows, kept as they
are measured (a section stopped half way keeps what it finished), also where NVIDIA DALI cannot be
imported; benchmarks.readme renders them; the benchmark suites' options (sizes, implementation
choice, pipeline choice) and their per-implementation / per-run error capture."""

import argparse
import json
import os
import sys
import time

import pytest
import torch

from conftest import PY, ROOT, blocked_imports, run

SECTIONS = ("imagenet", "kernels", "compiled", "pipelines", "train_losses", "knn", "doctor")
GPU_SECTIONS = ("imagenet", "kernels", "pipelines", "train_losses", "knn")

sys.path.insert(0, ROOT)


def acceptance(out, *args, env_extra=None, timeout=600):
    t0 = time.monotonic()
    p = run(
        ["bash", "benchmarks/gpu_acceptance.sh", *args, str(out)],
        timeout=timeout,
        check=False,
        env_extra={"PYTHON": PY, **(env_extra or {})},
    )
    from benchmarks.readme import read_acceptance

    rows, records = read_acceptance(str(out))
    return p, rows, records, time.monotonic() - t0


@pytest.mark.slow
def test_acceptance_tiny_gives_every_sections_rows_and_the_readme_renders_them(tmp_path):
    out = tmp_path / "acc"
    p, rows, records, took = acceptance(out, "--tiny")
    assert set(os.listdir(out)) == {"acceptance.jsonl", "acceptance.log", "summary.md"}  # (at most 6)
    assert took < 260, f"the --tiny run took {took:.0f} s"
    for name in SECTIONS:
        assert rows.get(name), f"{name}: no rows\n{p.stdout[-3000:]}"
        rec = records[name]
        status = rec.get("cpu_status", rec["status"]) if not torch.cuda.is_available() else rec["status"]
        assert status in ("ok", "timed out"), rec  # (a section cut by its limit keeps its rows)
        if name in GPU_SECTIONS and not torch.cuda.is_available():
            assert rec["status"] == "not available" and rec["why"] == "no GPU", rec
    assert {r["method"] for r in rows["pipelines"]} == {"sc", "invp"}
    assert {(r["method"], r["precision"]) for r in rows["train_losses"]} <= {
        (m, p) for m in ("sc", "invp") for p in ("fp32", "bf16")
    }
    assert all(r["within_tolerance"] for r in rows["train_losses"])
    assert {r["kernel"] for r in rows["compiled"]} >= {"sc_fwd", "bank_scan_topk"}
    log = (out / "acceptance.log").read_text()
    assert "== done in" in log and "-- stderr:" in log

    md = run([PY, "-m", "benchmarks.readme", "--acceptance", str(out), "--print-acceptance"]).stdout
    assert md.startswith("### GPU acceptance on ") and "| section | status | rows | seconds | limit |" in md
    for heading in (
        "#### Headline",
        "#### Fused loss kernels",
        "#### Compiled kernel",
        "#### Data pipelines",
        "#### Training losses",
        "#### kNN graph",
        "#### Doctor",
    ):
        assert heading in md
    assert md.strip() == (out / "summary.md").read_text().strip()
    from benchmarks import readme

    text = open(readme.TARGET).read()
    new = readme.render(text, str(out))
    assert new.count(readme.ACC_BEGIN) == 1 and new.index(readme.END) < new.index(readme.ACC_BEGIN)
    assert readme.render(new, str(out)) == new  # idempotent once the markers are in


@pytest.mark.slow
def test_a_section_stopped_half_way_keeps_the_rows_it_finished(tmp_path):
    """The kNN suite hangs after its first row (FASTSSL_BENCH_STALL_AFTER, as a stuck measurement
    would); its limit stops it, and the row it finished is in acceptance.jsonl."""
    out = tmp_path / "acc"
    p, rows, records, _ = acceptance(
        out, "--tiny", "--only", "knn", env_extra={"FASTSSL_BENCH_STALL_AFTER": "1", "LIMIT_KNN": "20"}
    )
    assert p.returncode == 1
    assert [r["impl"].split(" (")[0] for r in rows["knn"]] == ["torch brute force"]
    assert records["knn"]["cpu_status" if not torch.cuda.is_available() else "status"] == "timed out"
    md = run([PY, "-m", "benchmarks.readme", "--acceptance", str(out), "--print-acceptance"]).stdout
    assert "| knn |" in md and "torch brute force" in md  # (rendered from the rows: the suite wrote no table)


@pytest.mark.slow
def test_acceptance_without_dali_still_gives_pipeline_and_loss_rows(tmp_path):
    """With ``import nvidia.dali`` failing: the DataLoader / tensor rows are measured, the DALI rows
    are error rows saying why, and the training losses (tensor pipeline) need no DALI."""
    out = tmp_path / "acc"
    p, rows, records, _ = acceptance(
        out,
        "--tiny",
        "--only",
        "imagenet,pipelines,train_losses",
        env_extra=blocked_imports(tmp_path / "site", "nvidia.dali"),
    )
    pipes = {(r["method"], r["executor"]): r for r in rows["pipelines"]}
    assert "images_per_s" in pipes[("sc", "torch-dataloader")] and "images_per_s" in pipes[("sc", "tensor")]
    assert "nvidia.dali" in pipes[("sc", "dali-cpu")]["error"]
    img = {r["pipeline"]: r for r in rows["imagenet"]}
    assert "images_per_s" in img["torch"] and "NVIDIA DALI cannot be loaded" in img["dali-cpu"]["error"]
    assert rows["train_losses"] and all("error" not in r for r in rows["train_losses"])


def test_readme_acceptance_section_from_rows(tmp_path):
    from benchmarks import readme

    lines = [
        {
            "section": "doctor",
            "id": "faiss",
            "component": "faiss cpu vs torch",
            "status": "ok",
            "detail": "a|b",
            "seconds": 1.0,
        },
        {
            "section": "doctor",
            "id": "collectives",
            "component": "collectives (nccl)",
            "status": "failed",
            "why": "timed out after 60 s",
            "seconds": 60.0,
        },
        {
            "section": "doctor",
            "record": "versions",
            "versions": {"torch": "2.x", "gpus": ["NVIDIA H200 (sm_90, 140 GiB)"]},
        },
        {
            "section": "doctor",
            "record": "section",
            "status": "failed",
            "why": "1 of 2 components failed",
            "seconds": 3,
            "limit_s": 40,
            "device": "NVIDIA-H200",
            "stderr_tail": "Traceback\nRuntimeError: boom",
        },
        {"section": "knn", "impl": "torch brute force", "n": 1000, "seconds_median": 0.5},
        {
            "section": "knn",
            "record": "section",
            "status": "timed out",
            "why": "stopped by its 25 s limit",
            "seconds": 25,
            "limit_s": 25,
            "stderr_tail": "last words",
            "markdown": "",
        },
    ]
    (tmp_path / "acceptance.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + '\n{"section": "kn')
    md = readme.acceptance_section(str(tmp_path))
    assert md.startswith("### GPU acceptance on NVIDIA-H200")
    assert "| doctor | failed: 1 of 2 components failed | 2 | 3 | 40 |" in md
    assert "| knn | timed out: stopped by its 25 s limit | 1 | 25 | 25 |" in md and "| torch brute force | 1000 |" in md
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


@pytest.mark.slow
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
